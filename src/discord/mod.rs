//! The Discord surface: a serenity gateway client that turns mentions into
//! threads and threads into conversations, and renders each turn there.
//!
//! - [`access`]: who may talk where, and who is an admin (pure).
//! - `inbound`: routing, mentions, thread names, attachments.
//! - `turns`: one turn shown in its thread; `stream`: the streamed answer.
//! - `commands`: slash commands and autocomplete.
//! - `approvals`: Approve / Deny buttons.
//! - `handler`: serenity's event handler.
//! - [`render`]: message splitting and tool notices (pure).
//! - [`rest`]: the REST calls, with 429s honoured (`retry`: how it waits).
//!
//! Messages reach the conversation's worker ([`Workers`]) as soon as they
//! are routed and stored; the turn itself runs there, in order.

pub mod access;
mod approvals;
pub mod budgets;
mod commands;
mod controls;
mod edits;
mod handler;
pub mod health;
mod inbound;
pub mod limiter;
mod picks;
pub mod protocol;
mod questions;
pub mod render;
pub mod rest;
mod retry;
mod servers;
mod stream;
mod tasks;
mod turns;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use serenity::all::{GatewayIntents, HttpBuilder, RoleId};
use tokio_util::sync::CancellationToken;

use crate::config::DiscordConfig;
use crate::conversation::{
    ChatModel, Claims, Engine, Place, Store, StoreError, ToolHost, UsageTotals, Workers,
};
use access::Access;
use approvals::Approvals;
use handler::Handler;
use rest::Rest;

/// How often the health file is refreshed.
const HEALTH_EVERY: Duration = Duration::from_secs(15);
/// Channel and server names kept for the prompt's placeholders.
const MAX_NAMES: usize = 10_000;
/// How long the gateway gets to close at shutdown.
const GATEWAY_CLOSE: Duration = Duration::from_secs(10);

/// The thread table: threads the bot started, and usage per thread and
/// per server.
#[async_trait]
pub trait Threads: Send + Sync {
    /// The parent channel of the thread of `conversation`, when the bot
    /// started that thread.
    async fn parent(&self, conversation: &str) -> Result<Option<u64>, StoreError>;
    /// Who started the thread of `conversation`, when the bot started it.
    async fn starter(&self, conversation: &str) -> Result<Option<u64>, StoreError>;
    /// Remembers a thread the bot started in `parent`.
    async fn add(
        &self,
        conversation: &str,
        guild: Option<u64>,
        parent: u64,
        started_by: u64,
    ) -> Result<(), StoreError>;
    /// Tokens and cost of one conversation's answers.
    async fn usage(&self, conversation: &str) -> Result<UsageTotals, StoreError>;
    /// Tokens and cost of the bot's threads in one server since `since_unix`.
    async fn guild_usage_since(
        &self,
        guild: u64,
        since_unix: i64,
    ) -> Result<UsageTotals, StoreError>;
    /// The server of the bot's thread of `conversation`, when known.
    async fn guild_of(&self, conversation: &str) -> Result<Option<u64>, StoreError>;
    /// Dollars spent since `since_unix` on the turns `user` started,
    /// everywhere.
    async fn user_spent_since(&self, user: u64, since_unix: i64) -> Result<f64, StoreError>;
    /// The caps a server's admins set (none set: the defaults).
    async fn guild_budget(&self, guild: u64) -> Result<budgets::GuildBudget, StoreError>;
    async fn set_guild_budget(
        &self,
        guild: u64,
        budget: &budgets::GuildBudget,
    ) -> Result<(), StoreError>;
}

/// What the surface talks to: the domain's ports and its own.
pub struct Ports {
    pub engine: Arc<Engine>,
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ChatModel>,
    pub tools: Arc<dyn ToolHost>,
    pub threads: Arc<dyn Threads>,
    /// The MCP file, read again by `/reload`.
    pub mcp_file: crate::mcp::McpFile,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").finish_non_exhaustive()
    }
}

/// What every part of the surface shares.
pub(crate) struct Surface {
    rest: Rest,
    config: DiscordConfig,
    access: Access,
    engine: Arc<Engine>,
    model: Arc<dyn ChatModel>,
    tools: Arc<dyn ToolHost>,
    threads: Arc<dyn Threads>,
    mcp_file: crate::mcp::McpFile,
    approvals: Approvals,
    application_id: u64,
    /// The bot's own user id, once the gateway said it.
    me: AtomicU64,
    /// Names of channels and servers, for the prompt's placeholders (read
    /// once: a prompt that changed with a rename would lose its cache).
    names: Mutex<HashMap<String, String>>,
    /// Held from reading the gateway state to writing the health file, so
    /// a stale state never overwrites a newer one.
    health: tokio::sync::Mutex<()>,
    /// Which answer of each thread carries Retry.
    answer_rows: controls::AnswerRows,
    /// Servers' questions waiting for an answer.
    questions: questions::Questions,
    /// The resources behind Read buttons.
    links: picks::Links,
    /// Shards that were ready once (a later READY is a reconnection).
    shards_ready: Mutex<std::collections::HashSet<u32>>,
}

impl Surface {
    fn me(&self) -> u64 {
        self.me.load(Ordering::SeqCst)
    }

    fn set_me(&self, id: u64) {
        self.me.store(id, Ordering::SeqCst);
    }

    /// The name of a channel (`#name`; a thread's is its channel's) and of
    /// its server, for `{channel}` and `{server}`.
    async fn place(&self, channel: u64) -> Place {
        let read = self.rest.channel(channel).await.unwrap_or_default();
        let kind = read["type"].as_u64().unwrap_or(0);
        if kind == protocol::DM_CHANNEL_TYPE {
            return Place {
                channel: "direct messages".into(),
                server: "direct messages".into(),
            };
        }
        let named = match inbound::snowflake(&read["parent_id"]) {
            Some(parent) if protocol::THREAD_CHANNEL_TYPES.contains(&kind) => parent,
            _ => channel,
        };
        let channel_name = self
            .name(format!("channel:{named}"), async {
                let read = self.rest.channel(named).await.ok()?;
                Some(format!("#{}", read["name"].as_str()?))
            })
            .await;
        let server = match inbound::snowflake(&read["guild_id"]) {
            Some(guild) => {
                self.name(format!("guild:{guild}"), async {
                    let read = self.rest.guild(guild).await.ok()?;
                    Some(read["name"].as_str()?.to_owned())
                })
                .await
            }
            None => String::new(),
        };
        Place {
            channel: channel_name,
            server,
        }
    }

    /// A name from the cache, or read (and kept, when found).
    async fn name(&self, key: String, read: impl Future<Output = Option<String>>) -> String {
        if let Some(name) = self.names.lock().expect("names poisoned").get(&key) {
            return name.clone();
        }
        match read.await {
            Some(name) => {
                let mut names = self.names.lock().expect("names poisoned");
                if names.len() > MAX_NAMES {
                    names.clear();
                }
                names.insert(key, name.clone());
                name
            }
            None => String::new(),
        }
    }

    /// Posts `content` in `channel`; a failure is only logged.
    async fn say(&self, channel: u64, content: &str) {
        if let Err(error) = self
            .rest
            .create_message(channel, json!({"content": content}))
            .await
        {
            tracing::warn!(%error, channel, "could not post in a channel");
        }
    }
}

/// The surface and the conversations' workers.
pub(crate) struct Bot {
    surface: Arc<Surface>,
    workers: Workers,
}

/// Whether whoever used an interaction is an admin here.
fn presser_is_admin(surface: &Surface, press: &serenity::all::ComponentInteraction) -> bool {
    is_admin(surface, press.user.id.get(), press.member.as_ref())
}

/// Whether `user`, with `member`'s roles and permissions, is an admin.
fn is_admin(surface: &Surface, user: u64, member: Option<&serenity::all::Member>) -> bool {
    let roles = role_ids(member.map(|m| m.roles.as_slice()));
    let permissions = member.and_then(|m| m.permissions);
    surface.access.is_admin(user, &roles, permissions)
}

/// An interaction's answer that only the person who used it sees.
fn ephemeral(content: &str) -> serde_json::Value {
    interaction_answer(content, false)
}

/// An interaction's answer, seen by everyone when `public`, otherwise only
/// by the person who used it. It pings nobody.
fn interaction_answer(content: &str, public: bool) -> serde_json::Value {
    let mut data = json!({"content": content, "allowed_mentions": {"parse": []}});
    if !public {
        data["flags"] = protocol::flags::EPHEMERAL.into();
    }
    json!({"type": protocol::response::MESSAGE, "data": data})
}

/// A key for a button that no earlier run of the bot can have given out:
/// `n` (a counter) mixed with this process's random seed, so a press of a
/// button from before a restart finds nothing instead of something else.
fn button_key(n: u64) -> u64 {
    use std::hash::BuildHasher;
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    SEED.get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(n)
}

/// The text inputs of a submitted modal: (custom id, value).
fn modal_inputs(modal: &serenity::all::ModalInteraction) -> Vec<(String, String)> {
    modal
        .data
        .components
        .iter()
        .flat_map(|row| &row.components)
        .filter_map(|c| match c {
            serenity::all::ActionRowComponent::InputText(input) => Some((
                input.custom_id.clone(),
                input.value.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

/// Role ids of a member.
fn role_ids(roles: Option<&[RoleId]>) -> Vec<u64> {
    roles.unwrap_or_default().iter().map(|r| r.get()).collect()
}

/// What the bot needs from Discord: messages in servers and DMs (with their
/// content, so follow-ups in threads need no mention) and guild/thread events.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
}

/// Runs the bot until `shutdown` resolves, then stops taking messages, lets
/// running turns finish within the grace period (cutting the rest cleanly;
/// messages still waiting stay stored), and returns; the caller closes MCP
/// sessions and the database. Messages kept from before a restart are
/// answered first.
pub async fn run(
    ports: Ports,
    config: DiscordConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let rest =
        Rest::new(&config.api_base, config.token.clone())?.with_global_limit(config.global_limit);
    // Fails early, with a clear message, on a missing or rejected token.
    let application = rest.current_application().await?;
    let application_id: u64 = inbound::snowflake(&application["id"]).unwrap_or(0);

    let surface = Arc::new(Surface {
        rest,
        access: Access::new(&config),
        config: config.clone(),
        engine: ports.engine,
        model: ports.model,
        tools: ports.tools,
        threads: ports.threads,
        mcp_file: ports.mcp_file,
        approvals: Approvals::new(config.approval_remember),
        application_id,
        me: AtomicU64::new(0),
        names: Mutex::default(),
        health: tokio::sync::Mutex::new(()),
        answer_rows: Default::default(),
        questions: Default::default(),
        links: Default::default(),
        shards_ready: Mutex::default(),
    });
    // A process is known by its shards: one restarted in its place takes
    // its claims back at once; another takes them over once they expire.
    let claims = Claims {
        owner: match config.shards {
            Some(shards) => format!("shards {shards}"),
            None => "all shards".to_owned(),
        },
        ttl: config.lease,
    };
    let workers =
        Workers::with_claims(ports.store, Arc::new(turns::Turns(surface.clone())), claims);
    match workers.resume().await {
        Ok(0) => {}
        Ok(kept) => tracing::info!(kept, "answering messages kept from before the restart"),
        Err(error) => {
            tracing::error!(%error, "could not read the messages kept from before the restart")
        }
    }
    let bot = Arc::new(Bot { surface, workers });
    let delivery = Arc::new(tasks::Delivery(Arc::downgrade(&bot)));
    match bot.surface.engine.tasks().start(delivery).await {
        Ok(0) => {}
        Ok(followed) => tracing::info!(followed, "following tool calls that run in the background"),
        Err(error) => {
            tracing::error!(%error, "could not read the background tasks kept from before")
        }
    }

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
    let shards_of = config.shards;
    let mut gateway = tokio::spawn(async move {
        match shards_of {
            Some(shards) => {
                tracing::info!(%shards, "running these Discord shards");
                client
                    .start_shard_range(shards.first..shards.last, shards.total)
                    .await
            }
            None => client.start_autosharded().await,
        }
    });
    crate::metrics::needs_gateway();
    let health = {
        let path = config.health_file.clone();
        let shards = shards.clone();
        let surface = bot.surface.clone();
        let stop = CancellationToken::new();
        let done = stop.clone();
        let writer = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HEALTH_EVERY);
            loop {
                tokio::select! {
                    () = done.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                // serenity updates a runner's stage before it dispatches
                // the event that changed it: a ready handler that wrote
                // before this lock reads as connected here too.
                let _writing = surface.health.lock().await;
                let connected =
                    shards.runners.lock().await.values().any(|runner| {
                        runner.stage == serenity::gateway::ConnectionStage::Connected
                    });
                crate::metrics::gateway(connected);
                if let Some(path) = &path
                    && let Err(error) = health::write(path, connected)
                {
                    tracing::warn!(%error, path = %path.display(), "could not write the health file");
                }
            }
        });
        (stop, writer)
    };

    let ended = tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down: no new messages are taken");
            None
        }
        result = &mut gateway => Some(match result {
            Ok(Ok(())) => anyhow::anyhow!("the Discord gateway connection ended"),
            Ok(Err(error)) => error.into(),
            Err(error) => error.into(),
        })
    };
    let (stop, writer) = health;
    stop.cancel();
    let _ = writer.await;
    crate::metrics::gateway(false);
    if let Some(path) = &config.health_file {
        let _ = health::write(path, false);
    }
    shards.shutdown_all().await;
    if ended.is_none() {
        let _ = tokio::time::timeout(GATEWAY_CLOSE, gateway).await;
    }
    bot.workers.shutdown(config.shutdown_grace).await;
    ended.map_or(Ok(()), Err)
}
