//! The composition root: builds the adapters from `Config`, wires them into
//! the engine, and tears everything down in order.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Secret};
use crate::conversation::{Clock, Engine, EngineSettings, StoreError, billing};
use crate::llm::OpenRouter;
use crate::mcp::{self, McpFile, McpHost};
use crate::store::SqlStore;

/// How often due lookups of cut replies' costs are made.
const BILLING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything a surface needs, built once.
#[derive(Debug)]
pub struct App {
    pub engine: Arc<Engine>,
    pub store: SqlStore,
    pub mcp: Arc<McpHost>,
    /// The MCP file, for reloads.
    pub mcp_file: McpFile,
    pub model: Arc<OpenRouter>,
    /// Background work owned by the app (the idle-session reaper).
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// mcpcord's own secret values (the key, the Discord token, the database
/// URL), to be redacted wherever servers could echo them.
pub fn own_secrets(config: &Config) -> Vec<Secret> {
    let mut secrets = vec![config.api_key.clone()];
    secrets.extend(
        mcp::stdio::OWN_SECRETS
            .iter()
            .filter_map(|name| std::env::var(name).ok())
            .map(Secret::new),
    );
    secrets
}

/// Makes rustls use ring (reqwest is built without a default provider).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl App {
    /// Opens the database, reads the MCP file and builds the engine.
    pub async fn build(config: &Config) -> anyhow::Result<App> {
        App::build_with_clock(config, Clock::system()).await
    }

    /// [`App::build`] with the clock that dates messages and fills prompt
    /// placeholders.
    pub async fn build_with_clock(config: &Config, clock: Clock) -> anyhow::Result<App> {
        install_crypto();
        let servers = mcp::config::load(&config.mcp_config, config.mcp_config_explicit, &|name| {
            std::env::var(name).ok()
        })?;
        let store = SqlStore::open(&config.database_url).await?;
        let model = Arc::new(OpenRouter::new(config).context("cannot build the HTTP client")?);
        let mcp = Arc::new(
            McpHost::new(servers, config.limits.clone())
                .redacting(&own_secrets(config))
                .with_vault(Arc::new(store.clone())),
        );
        let settings = EngineSettings {
            default_model: config.default_model.clone(),
            system_prompt: config.system_prompt.clone(),
            timezone: config.timezone.clone(),
            transcription_model: config.transcription_model.clone(),
            clock,
            max_tool_rounds: config.limits.max_tool_rounds,
            fallback_context_tokens: config.limits.fallback_context_tokens,
        };
        let engine = Arc::new(Engine::new(
            model.clone(),
            mcp.clone(),
            Arc::new(store.clone()),
            settings,
        ));
        let mcp_file = McpFile {
            path: config.mcp_config.clone(),
            host: mcp.clone(),
        };
        let app = App {
            engine,
            store,
            mcp,
            mcp_file,
            model,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        app.start_reaper();
        Ok(app)
    }

    /// What the Discord surface talks to.
    pub fn discord_ports(&self) -> crate::discord::Ports {
        crate::discord::Ports {
            engine: self.engine.clone(),
            store: Arc::new(self.store.clone()),
            model: self.model.clone(),
            tools: self.mcp.clone(),
            threads: Arc::new(self.store.clone()),
            mcp_file: self.mcp_file.clone(),
        }
    }

    /// Reads the MCP file again on each SIGHUP, until shutdown.
    pub fn reload_on_hangup(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let file = self.mcp_file.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    got = hangups.recv() => if got.is_none() { break },
                }
                tracing::info!(path = %file.path.display(), "SIGHUP: reading the MCP file again");
                // A bad file is logged by reload and changes nothing.
                let _ = file.reload();
            }
        });
        Ok(())
    }

    /// Closes idle MCP sessions periodically until shutdown.
    fn start_reaper(&self) {
        let mcp = self.mcp.clone();
        let stop = self.stop.clone();
        let every = mcp.idle_check_interval();
        self.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => mcp.close_idle().await,
                }
            }
        });
    }

    /// Looks up the cost of replies cut before their usage arrived, as
    /// due at `now` (Unix seconds); how many were billed.
    pub async fn bill_cut_replies(&self, now: i64) -> Result<usize, StoreError> {
        billing::bill_due(self.model.as_ref(), &self.store, now).await
    }

    /// Bills cut replies as their lookups fall due, until shutdown (also
    /// those left by an earlier run). Started by the long-running modes;
    /// tests call [`App::bill_cut_replies`] instead.
    pub fn start_biller(&self) {
        let model = self.model.clone();
        let store = self.store.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(BILLING_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                // A lookup round never holds up a shutdown: what it did not
                // get to stays due.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    result = billing::bill_due(model.as_ref(), &store, billing::unix_now()) => {
                        if let Err(error) = result {
                            tracing::warn!(%error, "cut replies could not be billed; trying again later");
                        }
                    }
                }
            }
        });
    }

    /// Stops background work, closes MCP sessions, then the database.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.engine.tasks().shutdown().await;
        self.engine.flush().await;
        self.mcp.shutdown().await;
        self.store.close().await;
    }
}
