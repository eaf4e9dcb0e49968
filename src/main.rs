//! The `mcpcord` command: CLI, `.env`, logging, configuration, then the app.

use std::io::IsTerminal;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::io::BufReader;
use tracing_subscriber::EnvFilter;

use mcpcord::app::App;
use mcpcord::config::{Config, DiscordConfig};
use mcpcord::terminal::{self, Approvals};

/// A self-hosted assistant that uses MCP tools through OpenRouter.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// What to do; without one, the Discord bot runs.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Discord bot (needs DISCORD_TOKEN).
    Run,
    /// Check the configuration, the MCP servers, the OpenRouter key and model, and the Discord token.
    Check,
    /// Exit 0 when the running bot is connected to Discord (reads HEALTH_FILE; for HEALTHCHECK).
    Health,
    /// Authorize mcpcord at an HTTP MCP server that uses OAuth ("auth": "oauth"), storing its tokens.
    Auth {
        /// The server's name in the MCP file.
        server: String,
        /// The loopback port the browser is sent back to (0: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Copy the database to PATH while the bot runs (a consistent snapshot).
    Backup {
        /// Where the copy goes; an existing file is never overwritten.
        path: std::path::PathBuf,
    },
    /// Put the backup at PATH in place of the database (refused while mcpcord uses it).
    Restore {
        /// The backup to restore.
        path: std::path::PathBuf,
    },
    /// Copy a SQLite installation into an empty PostgreSQL database (stop the bot first).
    MigrateDb {
        /// The SQLite database, e.g. sqlite:///data/mcpcord.db.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database, e.g. postgres://mcpcord:PASSWORD@db:5432/mcpcord.
        #[arg(long)]
        to: String,
    },
    /// Print one conversation (a Discord thread id, `discord:ID`, or a terminal conversation's name).
    Export {
        conversation: String,
        #[arg(long, value_enum, default_value = "markdown")]
        format: mcpcord::backup::Format,
    },
    /// Chat in the terminal: one message per line on stdin, answers on stdout.
    Chat {
        /// Conversation name; running again with the same name continues it.
        #[arg(long, short, default_value = "default")]
        conversation: String,
        /// Model for this conversation (kept for later runs).
        #[arg(long, short)]
        model: Option<String>,
        /// Approve every tool call without asking.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Backup, restore, export and migrate-db, which need only databases.
async fn maintain(command: Command) -> anyhow::Result<()> {
    if let Command::MigrateDb { from, to } = &command {
        let from = mcpcord::config::database_url(Some(from.clone()))?;
        let to = mcpcord::config::database_url(Some(to.clone()))?;
        let copied = mcpcord::backup::migrate_db(&from, &to).await?;
        println!("Copied into {}:", mcpcord::store::redacted(&to));
        for (table, rows) in copied {
            println!("  {table}: {rows} rows");
        }
        println!("Set DATABASE_URL to it and start mcpcord; the SQLite file is left as it was.");
        return Ok(());
    }
    let url = mcpcord::config::database_url(std::env::var("DATABASE_URL").ok())?;
    match command {
        Command::Backup { path } => {
            let bytes = mcpcord::backup::backup(&url, &path).await?;
            println!(
                "Backed up to {} ({} KiB).",
                path.display(),
                bytes.div_ceil(1024)
            );
        }
        Command::Restore { path } => {
            let kept = mcpcord::backup::restore(&url, &path).await?;
            println!("Restored {}.", path.display());
            if let Some(kept) = kept {
                println!("The database it replaced is kept as {}.", kept.display());
            }
        }
        Command::Export {
            conversation,
            format,
        } => {
            let mut out = std::io::stdout().lock();
            mcpcord::backup::export(&url, &conversation, format, &mut out).await?;
        }
        _ => {}
    }
    Ok(())
}

/// `mcpcord auth SERVER`: prints the URL to open, waits for the browser
/// to come back (or for the address it ended on to be pasted), and stores
/// the tokens in the database.
async fn authorize(config: &Config, server: &str, port: u16) -> anyhow::Result<()> {
    use mcpcord::mcp::oauth::{Authorizing, CALLBACK_WAIT, oauth_server};
    use tokio::io::AsyncBufReadExt;
    mcpcord::app::install_crypto();
    let servers =
        mcpcord::mcp::config::load(&config.mcp_config, config.mcp_config_explicit, &|name| {
            std::env::var(name).ok()
        })?;
    let (url, oauth) = oauth_server(&servers, server).map_err(anyhow::Error::msg)?;
    let store = mcpcord::store::SqlStore::open(&config.database_url).await?;
    let authorizing = Authorizing::start(server, url, oauth, Arc::new(store.clone()), port)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "Open this address in a browser and allow mcpcord access to \"{server}\":\n\n{}\n",
        authorizing.url()
    );
    println!(
        "Waiting for the browser to come back. If it cannot reach this machine, paste the address it ended on here."
    );
    let (lines, pasted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let finished = tokio::time::timeout(CALLBACK_WAIT, authorizing.finish(pasted)).await;
    store.close().await;
    match finished {
        Ok(Ok(())) => {
            println!("Authorized: mcpcord keeps the tokens of \"{server}\" and refreshes them.");
            Ok(())
        }
        Ok(Err(problem)) => anyhow::bail!("{problem}"),
        Err(_) => anyhow::bail!(
            "nobody came back from the browser within {} minutes; run it again",
            CALLBACK_WAIT.as_secs() / 60
        ),
    }
}

fn init_logging(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in container logs.
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // A missing .env is normal; variables may come from the environment.
    let _ = dotenvy::dotenv();
    // The bot logs what it does; the terminal chat only its problems.
    let quiet = matches!(
        cli.command,
        Some(
            Command::Chat { .. }
                | Command::Check
                | Command::Health
                | Command::Auth { .. }
                | Command::Backup { .. }
                | Command::Restore { .. }
                | Command::Export { .. }
        )
    );
    init_logging(if quiet { "warn" } else { "mcpcord=info,warn" });
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    };
    // Everything is closed by now. Exiting here does not wait for a read of
    // stdin that may never end (the runtime would wait for it on drop).
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Health = command {
        let path = std::env::var_os("HEALTH_FILE").ok_or_else(|| {
            anyhow::anyhow!("Missing HEALTH_FILE: set it for both the bot and this check")
        })?;
        mcpcord::discord::health::read(std::path::Path::new(&path)).map_err(anyhow::Error::msg)?;
        println!("healthy: connected to Discord");
        return Ok(());
    }
    if let Command::Check = command {
        let problems = mcpcord::check::run(&mut std::io::stdout()).await?;
        anyhow::ensure!(problems == 0, "mcpcord check found {problems} problem(s)");
        return Ok(());
    }
    if let Command::Backup { .. }
    | Command::Restore { .. }
    | Command::Export { .. }
    | Command::MigrateDb { .. } = command
    {
        return maintain(command).await;
    }
    let config = Config::from_env()?;
    if let (Command::Run | Command::Chat { .. }, Some(addr)) = (&command, config.metrics_addr) {
        mcpcord::metrics::serve(addr).await?;
    }
    match command {
        Command::Check
        | Command::Health
        | Command::Backup { .. }
        | Command::Restore { .. }
        | Command::Export { .. }
        | Command::MigrateDb { .. } => Ok(()),
        Command::Auth { server, port } => authorize(&config, &server, port).await,
        Command::Run => {
            let discord = DiscordConfig::from_env()?;
            let app = Arc::new(App::build(&config).await?);
            app.start_biller();
            app.reload_on_hangup()?;
            let (stop, lost) = stop_or_lost(&app, Signals::InterruptOrTerminate);
            let result = mcpcord::discord::run(app.discord_ports(), discord, stop).await;
            app.shutdown().await;
            lost_database(&lost)?;
            result
        }
        Command::Chat {
            conversation,
            model,
            yes,
        } => {
            let app = App::build(&config).await?;
            app.start_biller();
            // At a terminal, a hang-up is the terminal closing, which ends
            // the chat; otherwise it asks for the MCP file to be read again.
            if !std::io::stdin().is_terminal() {
                app.reload_on_hangup()?;
            }
            let key = terminal::conversation_key(&conversation);
            let result = async {
                if let Some(model) = model {
                    app.engine.set_model(&key, Some(&model)).await?;
                }
                let stdin = BufReader::new(tokio::io::stdin());
                let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
                let interactive = std::io::stdin().is_terminal();
                let approvals = if yes && interactive {
                    Approvals::AllAsking
                } else if yes {
                    Approvals::All
                } else if interactive {
                    Approvals::Ask
                } else {
                    Approvals::Decline
                };
                // Ctrl-C goes to the chat (it stops a turn, or ends the
                // chat when idle or pressed twice); SIGTERM ends it like EOF.
                // MCP sessions are closed either way.
                let mut interrupts = ctrl_c_presses();
                let chat = terminal::run(
                    &app.engine,
                    &key,
                    stdin,
                    approvals,
                    &mut interrupts,
                    &mut out,
                    &mut err,
                );
                let (stop, lost) = stop_or_lost(&app, Signals::Terminate);
                tokio::select! {
                    result = chat => result?,
                    () = stop => {}
                }
                lost_database(&lost)
            }
            .await;
            app.shutdown().await;
            result
        }
    }
}

/// Why the database was lost, once it was.
type Lost = Arc<std::sync::Mutex<Option<String>>>;

/// Which signals end the process.
#[derive(Debug, Clone, Copy)]
enum Signals {
    InterruptOrTerminate,
    /// Ctrl-C is the chat's own.
    Terminate,
}

/// A future that resolves on a signal or when the database file goes
/// away (then the reason is in the returned cell).
fn stop_or_lost(app: &App, signals: Signals) -> (impl Future<Output = ()> + use<>, Lost) {
    let lost = Lost::default();
    let cell = lost.clone();
    let store = app.store.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal(signals) => {}
            reason = store.lost() => {
                tracing::error!("{reason}");
                *cell.lock().expect("lost poisoned") = Some(reason);
            }
        }
    };
    (stop, lost)
}

fn lost_database(lost: &Lost) -> anyhow::Result<()> {
    match lost.lock().expect("lost poisoned").take() {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

/// Each Ctrl-C, as a value.
fn ctrl_c_presses() -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (presses, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() && presses.send(()).is_ok() {}
    });
    received
}

/// Resolves on SIGTERM (what `docker stop` sends), and on Ctrl-C unless
/// the chat takes it.
async fn shutdown_signal(signals: Signals) {
    let ctrl_c = async {
        match signals {
            Signals::InterruptOrTerminate => {
                let _ = tokio::signal::ctrl_c().await;
            }
            Signals::Terminate => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
