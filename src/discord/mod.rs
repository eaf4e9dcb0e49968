//! The Discord surface: a serenity gateway client that turns mentions into
//! threads and threads into conversations, and renders each turn there.
//!
//! - [`render`]: message splitting and tool notices (pure).
//! - [`rest`]: the REST calls, with 429s honoured.
//! - `bot`: the event handler: routing, access lists, turns, slash commands,
//!   approval buttons.

mod bot;
pub mod health;
pub mod render;
pub mod rest;

use std::sync::Arc;
use std::time::Duration;

use serenity::all::{GatewayIntents, HttpBuilder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::DiscordConfig;
use bot::{Bot, Handler};

/// How often the health file is refreshed.
const HEALTH_EVERY: Duration = Duration::from_secs(15);
use rest::Rest;

/// What the bot needs from Discord: messages in servers and DMs (with their
/// content, so follow-ups in threads need no mention) and guild/thread events.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
}

/// Runs the bot until `shutdown` resolves, then stops taking messages, lets
/// running turns finish within the grace period (cutting the rest cleanly),
/// and returns; the caller closes MCP sessions and the database.
pub async fn run(
    app: Arc<App>,
    config: DiscordConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let rest = Rest::new(&config.api_base, config.token.clone())?;
    // Fails early, with a clear message, on a missing or rejected token.
    let application = rest.current_application().await?;
    let application_id: u64 = application["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);

    let turns = TaskTracker::new();
    let cut = CancellationToken::new();
    let bot = Arc::new(Bot::new(
        app,
        rest,
        config.clone(),
        application_id,
        turns.clone(),
        cut.clone(),
    ));

    let mut http = HttpBuilder::new(config.token.expose());
    if config.api_base != rest::DEFAULT_API_BASE {
        // serenity only rewrites the host with its own rate limiter off; our
        // REST calls honour 429s themselves.
        http = http
            .proxy(config.api_base.clone())
            .ratelimiter_disabled(true);
    }
    let mut client = serenity::all::ClientBuilder::new_with_http(http.build(), intents())
        .event_handler(Handler(bot.clone()))
        .await?;
    let shards = client.shard_manager.clone();
    let mut gateway = tokio::spawn(async move { client.start().await });
    let health = config.health_file.clone().map(|path| {
        let shards = shards.clone();
        let stop = CancellationToken::new();
        let done = stop.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HEALTH_EVERY);
            loop {
                tokio::select! {
                    () = done.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let connected = shards
                    .runners
                    .lock()
                    .await
                    .values()
                    .any(|runner| runner.stage == serenity::gateway::ConnectionStage::Connected);
                if let Err(error) = health::write(&path, connected) {
                    tracing::warn!(%error, path = %path.display(), "could not write the health file");
                }
            }
        });
        stop
    });

    tokio::select! {
        () = shutdown => tracing::info!("shutting down: no new messages are taken"),
        result = &mut gateway => {
            result??;
            anyhow::bail!("the Discord gateway connection ended");
        }
    }
    bot.stop_accepting();
    if let Some(health) = health {
        health.cancel();
    }
    if let Some(path) = &config.health_file {
        let _ = health::write(path, false);
    }
    shards.shutdown_all().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), gateway).await;
    turns.close();
    if tokio::time::timeout(config.shutdown_grace, turns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = config.shutdown_grace.as_secs(),
            "turns still running after the grace period; cutting them"
        );
        cut.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), turns.wait()).await;
    }
    Ok(())
}
