//! The event handler: who may talk, which conversation a message belongs to,
//! turns in order per channel, what the thread shows, slash commands and
//! approval buttons.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Value, json};
use serenity::all::{
    CommandDataOptionValue, CommandInteraction, ComponentInteraction, Context, EventHandler,
    Interaction, Message as DiscordMessage, Permissions, Ready,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::render::{MAX_MESSAGE_CHARS, notice_finished, notice_started, split_message};
use super::rest::{Attachment, Rest};
use crate::app::App;
use crate::config::DiscordConfig;
use crate::conversation::{ApprovalRequest, Approver, Decision, Message, TurnEvent};

/// A typing indicator lasts ten seconds; it is renewed a little sooner.
const TYPING_EVERY: Duration = Duration::from_secs(8);
/// Text attachments are read up to this size.
const MAX_TEXT_ATTACHMENT_BYTES: usize = 100_000;
/// Autocomplete may offer at most this many choices.
const MAX_CHOICES: usize = 25;
/// Thread names are at most this long.
const MAX_THREAD_NAME: usize = 90;

/// One message waiting for its turn.
struct Queued {
    conversation: String,
    author: u64,
    input: Message,
}

/// The per-channel queue: messages ordered by id, one worker at a time.
#[derive(Default)]
struct ChannelQueue {
    waiting: Mutex<BTreeMap<u64, Queued>>,
    /// Whether a worker is draining this queue.
    busy: AtomicBool,
}

/// A question waiting for a button press.
struct PendingApproval {
    /// Who may answer (besides admins).
    asker: u64,
    answer: oneshot::Sender<Decision>,
}

pub struct Bot {
    app: Arc<App>,
    rest: Rest,
    config: DiscordConfig,
    application_id: u64,
    me: AtomicU64,
    accepting: AtomicBool,
    queues: Mutex<HashMap<u64, Arc<ChannelQueue>>>,
    approvals: Mutex<HashMap<String, PendingApproval>>,
    next_approval: AtomicU64,
    /// Running turns; shutdown waits for them.
    turns: TaskTracker,
    /// Cancelled when the shutdown grace period is over.
    cut: CancellationToken,
}

impl Bot {
    pub fn new(
        app: Arc<App>,
        rest: Rest,
        config: DiscordConfig,
        application_id: u64,
        turns: TaskTracker,
        cut: CancellationToken,
    ) -> Self {
        Bot {
            app,
            rest,
            config,
            application_id,
            me: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            queues: Mutex::default(),
            approvals: Mutex::default(),
            next_approval: AtomicU64::new(1),
            turns,
            cut,
        }
    }

    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    fn is_admin(&self, user: u64, roles: &[u64], permissions: Option<Permissions>) -> bool {
        if self.config.admin_users.contains(&user)
            || roles.iter().any(|r| self.config.admin_roles.contains(r))
        {
            return true;
        }
        let nobody_named = self.config.admin_users.is_empty() && self.config.admin_roles.is_empty();
        nobody_named && permissions.is_some_and(|p| p.manage_threads() || p.administrator())
    }

    /// The allow-lists (an empty list allows everyone).
    fn allowed(
        &self,
        guild: Option<u64>,
        channel: u64,
        parent: Option<u64>,
        user: u64,
        roles: &[u64],
    ) -> bool {
        let c = &self.config;
        let Some(guild) = guild else {
            return c.allow_dms && (c.allowed_users.is_empty() || c.allowed_users.contains(&user));
        };
        let listed = |list: &[u64], id: u64| list.is_empty() || list.contains(&id);
        listed(&c.allowed_guilds, guild)
            && (c.allowed_channels.is_empty()
                || c.allowed_channels.contains(&channel)
                || parent.is_some_and(|p| c.allowed_channels.contains(&p)))
            && listed(&c.allowed_users, user)
            && (c.allowed_roles.is_empty() || roles.iter().any(|r| c.allowed_roles.contains(r)))
    }

    /// Decides whether `msg` starts a turn, and where.
    async fn route(&self, msg: &DiscordMessage) -> anyhow::Result<Option<(u64, String)>> {
        let me = self.me.load(Ordering::SeqCst);
        let channel = msg.channel_id.get();
        let user = msg.author.id.get();
        let roles: Vec<u64> = msg
            .member
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.get()).collect())
            .unwrap_or_default();
        let mentioned = msg.mentions.iter().any(|u| u.id.get() == me);
        let Some(guild) = msg.guild_id.map(|g| g.get()) else {
            let key = format!("discord:{channel}");
            return Ok(self
                .allowed(None, channel, None, user, &roles)
                .then_some((channel, key)));
        };
        let key = format!("discord:{channel}");
        if let Some(parent) = self.app.store.discord_thread_parent(&key).await? {
            let parent = Some(parent);
            return Ok(self
                .allowed(Some(guild), channel, parent, user, &roles)
                .then_some((channel, key)));
        }
        if !mentioned {
            return Ok(None);
        }
        let info = self.rest.channel(channel).await?;
        let is_thread = matches!(info["type"].as_u64(), Some(10..=12));
        let parent = if is_thread {
            snowflake(&info["parent_id"])
        } else {
            None
        };
        if !self.allowed(Some(guild), channel, parent, user, &roles) {
            return Ok(None);
        }
        if is_thread {
            return Ok(Some((channel, key)));
        }
        let name = thread_name(&strip_mention(&msg.content, me));
        let thread = self.rest.start_thread(channel, msg.id.get(), &name).await?;
        let key = format!("discord:{thread}");
        self.app
            .store
            .add_discord_thread(&key, Some(guild), channel, user)
            .await?;
        Ok(Some((thread, key)))
    }

    /// The user's message as the model sees it: text without the mention,
    /// images for models that read them, text files inline.
    async fn input(
        &self,
        msg: &DiscordMessage,
        model_reads_images: bool,
        notices: &mut Vec<String>,
    ) -> Message {
        let me = self.me.load(Ordering::SeqCst);
        let mut text = strip_mention(&msg.content, me);
        let mut images = Vec::new();
        for attachment in &msg.attachments {
            let kind = attachment.content_type.clone().unwrap_or_default();
            if kind.starts_with("image/") && model_reads_images {
                images.push(attachment.url.clone());
            } else if kind.starts_with("text/")
                || kind.contains("json")
                || is_text_name(&attachment.filename)
            {
                match self.download(&attachment.url).await {
                    Some(body) => text.push_str(&format!(
                        "\n\n[attached file {}]\n{body}",
                        attachment.filename
                    )),
                    None => notices.push(format!("I could not read {}.", attachment.filename)),
                }
            } else if kind.starts_with("image/") {
                notices.push(format!(
                    "This model cannot see images, so {} was left out.",
                    attachment.filename
                ));
            } else {
                notices.push(format!(
                    "I can only read text files and images, so {} was left out.",
                    attachment.filename
                ));
            }
        }
        Message {
            images,
            ..Message::user(text)
        }
    }

    async fn download(&self, url: &str) -> Option<String> {
        let (bytes, longer) = self.rest.download(url, MAX_TEXT_ATTACHMENT_BYTES).await?;
        let mut body = String::from_utf8_lossy(&bytes).into_owned();
        if longer {
            body.push_str(&format!(
                "\n[cut: the file is longer; the first {} bytes are shown]",
                bytes.len()
            ));
        }
        Some(body)
    }

    /// Queues a message for its channel and makes sure a worker drains it.
    fn enqueue(self: &Arc<Self>, channel: u64, id: u64, queued: Queued) {
        let queue = self
            .queues
            .lock()
            .expect("queues poisoned")
            .entry(channel)
            .or_default()
            .clone();
        queue
            .waiting
            .lock()
            .expect("queue poisoned")
            .insert(id, queued);
        if queue.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let bot = self.clone();
        self.turns.spawn(async move {
            // Other message events already dispatched get to queue first, so
            // that the lowest id is taken even when tasks start out of order.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            loop {
                let next = queue.waiting.lock().expect("queue poisoned").pop_first();
                let Some((_, queued)) = next else {
                    queue.busy.store(false, Ordering::SeqCst);
                    // A message queued between the pop and the flag is picked up.
                    if queue.waiting.lock().expect("queue poisoned").is_empty() || queue.busy.swap(true, Ordering::SeqCst) {
                        break;
                    }
                    continue;
                };
                tokio::select! {
                    () = bot.turn(channel, queued) => {}
                    () = bot.cut.cancelled() => {
                        let _ = bot.rest.create_message(channel, json!({"content": "⚠️ The bot is restarting; this answer was cut short. Ask again in a moment."})).await;
                        break;
                    }
                }
            }
        });
    }

    /// Runs one turn and renders it in `channel`.
    async fn turn(self: &Arc<Self>, channel: u64, queued: Queued) {
        let (events, received) = mpsc::unbounded_channel();
        let approver = Buttons {
            bot: self.clone(),
            channel,
            asker: queued.author,
        };
        let typing = self.typing(channel);
        let render = self.render(channel, received);
        let run = async {
            let result = self
                .app
                .engine
                .run_turn(&queued.conversation, queued.input, &events, &approver)
                .await;
            drop(events);
            result
        };
        let (_, ()) = tokio::join!(run, render);
        typing.cancel();
    }

    /// Keeps the typing indicator on until the returned token is cancelled.
    fn typing(&self, channel: u64) -> CancellationToken {
        let stop = CancellationToken::new();
        let rest = self.rest.clone();
        let done = stop.clone();
        self.turns.spawn(async move {
            loop {
                let _ = rest.typing(channel).await;
                tokio::select! {
                    () = done.cancelled() => break,
                    () = tokio::time::sleep(TYPING_EVERY) => {}
                }
            }
        });
        stop
    }

    /// Shows a turn's events in the thread.
    async fn render(&self, channel: u64, mut events: mpsc::UnboundedReceiver<TurnEvent>) {
        let mut answer = Answer::new(channel, self.config.stream_interval);
        let mut notices: HashMap<String, (u64, String)> = HashMap::new();
        let mut tick = tokio::time::interval(self.config.stream_interval);
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = tick.tick() => {
                    answer.flush(&self.rest, false).await;
                    continue;
                }
            };
            let Some(event) = event else {
                break;
            };
            let posted = match event {
                TurnEvent::Text(fragment) => {
                    answer.text.push_str(&fragment);
                    Ok(())
                }
                TurnEvent::ToolStarted {
                    call_id,
                    name,
                    arguments,
                } => {
                    answer.flush(&self.rest, true).await;
                    answer = Answer::new(channel, self.config.stream_interval);
                    let content = notice_started(&name, &arguments);
                    self.rest
                        .create_message(channel, json!({"content": content}))
                        .await
                        .map(|id| {
                            notices.insert(call_id, (id, arguments));
                        })
                }
                TurnEvent::ToolFinished {
                    call_id,
                    name,
                    ok,
                    summary,
                    full_output,
                } => {
                    let arguments = notices
                        .get(&call_id)
                        .map(|(_, a)| a.clone())
                        .unwrap_or_default();
                    let content = notice_finished(&name, &arguments, ok, &summary);
                    let mut result = match notices.get(&call_id) {
                        Some((id, _)) => {
                            self.rest
                                .edit_message(channel, *id, json!({"content": content}))
                                .await
                        }
                        None => self
                            .rest
                            .create_message(channel, json!({"content": content}))
                            .await
                            .map(drop),
                    };
                    if let (Some(full), Ok(())) = (full_output, &result) {
                        let file = Attachment {
                            name: format!("{}-output.txt", name.replace("__", "-")),
                            bytes: full.into_bytes(),
                        };
                        let body = json!({"content": "The model saw a shortened result; here is all of it."});
                        result = self
                            .rest
                            .create_message_with_file(channel, body, &file)
                            .await
                            .map(drop);
                    }
                    result
                }
                TurnEvent::Answer(text) => {
                    answer.text = text;
                    answer.flush(&self.rest, true).await;
                    answer = Answer::new(channel, self.config.stream_interval);
                    Ok(())
                }
                TurnEvent::Warning(warning) => self
                    .rest
                    .create_message(channel, json!({"content": format!("⚠️ {warning}")}))
                    .await
                    .map(drop),
                TurnEvent::Error(error) => self
                    .rest
                    .create_message(channel, json!({"content": format!("❌ {error}")}))
                    .await
                    .map(drop),
            };
            if let Err(error) = posted {
                tracing::warn!(%error, channel, "could not show a turn event");
            }
        }
        answer.flush(&self.rest, true).await;
    }

    async fn command(&self, command: &CommandInteraction) -> anyhow::Result<()> {
        // Deferred first: Discord wants an answer within three seconds.
        self.rest
            .respond(command.id.get(), &command.token, json!({"type": 5}))
            .await?;
        let reply = self.command_reply(command).await;
        let content = match reply {
            Ok(text) => text,
            Err(error) => format!("❌ {error}"),
        };
        self.rest
            .edit_original(
                command.application_id.get(),
                &command.token,
                json!({"content": truncate(&content)}),
            )
            .await?;
        Ok(())
    }

    async fn command_reply(&self, command: &CommandInteraction) -> anyhow::Result<String> {
        let conversation = format!("discord:{}", command.channel_id.get());
        let user = command.user.id.get();
        let roles: Vec<u64> = command
            .member
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.get()).collect())
            .unwrap_or_default();
        let permissions = command.member.as_ref().and_then(|m| m.permissions);
        let guild = command.guild_id.map(|g| g.get());
        if !self.allowed(guild, command.channel_id.get(), None, user, &roles)
            && !self.is_admin(user, &roles, permissions)
        {
            anyhow::bail!("You are not allowed to use this bot here.");
        }
        match command.data.name.as_str() {
            "reset" => {
                self.app.engine.reset(&conversation).await?;
                Ok("🧹 This conversation starts over: its history is cleared and its tool sessions are closed.".into())
            }
            "model" => {
                let wanted = command.data.options.iter().find_map(|o| match &o.value {
                    CommandDataOptionValue::String(s) if o.name == "model" => Some(s.clone()),
                    _ => None,
                });
                match wanted {
                    None => Ok(format!(
                        "This conversation uses `{}`.",
                        self.app.engine.model_of(&conversation).await?
                    )),
                    Some(_) if !self.is_admin(user, &roles, permissions) => {
                        anyhow::bail!(
                            "Only admins (or people with Manage Threads) can change the model."
                        )
                    }
                    Some(model) => {
                        let model = self
                            .app
                            .engine
                            .set_model(&conversation, Some(&model))
                            .await?;
                        Ok(format!("This conversation now uses `{model}`."))
                    }
                }
            }
            "tools" => {
                let crate::mcp::Listing {
                    tools, problems, ..
                } = self.app.mcp.list(&conversation).await;
                let mut by_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for tool in tools {
                    by_server
                        .entry(tool.server)
                        .or_default()
                        .push(format!("`{}`", tool.tool.name));
                }
                let mut lines: Vec<String> = by_server
                    .into_iter()
                    .map(|(server, tools)| format!("**{server}**: {}", tools.join(", ")))
                    .collect();
                lines.extend(problems.into_iter().map(|p| format!("⚠️ {p}")));
                if lines.is_empty() {
                    lines.push("No tools are configured.".into());
                }
                Ok(lines.join("\n"))
            }
            "usage" => {
                let here = self.app.store.usage(&conversation).await?;
                let mut text = format!(
                    "This thread: {} responses, {} prompt + {} completion tokens, ${:.4}.",
                    here.responses, here.prompt_tokens, here.completion_tokens, here.cost
                );
                if let Some(guild) = guild {
                    let today = start_of_today();
                    let server = self.app.store.guild_usage_since(guild, today).await?;
                    text.push_str(&format!(
                        "\nThis server today (UTC): {} responses, {} prompt + {} completion tokens, ${:.4}.",
                        server.responses, server.prompt_tokens, server.completion_tokens, server.cost
                    ));
                }
                Ok(text)
            }
            other => anyhow::bail!("Unknown command /{other}."),
        }
    }

    /// Models that support tools, matching what was typed, from the cached
    /// catalogue (autocomplete has no deferred answer).
    async fn autocomplete(&self, command: &CommandInteraction) -> anyhow::Result<()> {
        let typed = command
            .data
            .autocomplete()
            .map(|o| o.value.to_lowercase())
            .unwrap_or_default();
        let mut choices: Vec<String> = match self.app.model.catalogue().await {
            Some(catalogue) => catalogue
                .models
                .values()
                .filter(|m| m.supports_tools && m.id.to_lowercase().contains(&typed))
                .map(|m| m.id.clone())
                .collect(),
            None => Vec::new(),
        };
        choices.sort();
        choices.truncate(MAX_CHOICES);
        let choices: Vec<Value> = choices
            .into_iter()
            .filter(|id| id.chars().count() <= 100)
            .map(|id| json!({"name": id, "value": id}))
            .collect();
        self.rest
            .respond(
                command.id.get(),
                &command.token,
                json!({"type": 8, "data": {"choices": choices}}),
            )
            .await?;
        Ok(())
    }

    async fn button(&self, press: &ComponentInteraction) -> anyhow::Result<()> {
        let Some((verdict, key)) = press.data.custom_id.split_once(':') else {
            return Ok(());
        };
        let user = press.user.id.get();
        let roles: Vec<u64> = press
            .member
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.get()).collect())
            .unwrap_or_default();
        let permissions = press.member.as_ref().and_then(|m| m.permissions);
        // `Err(true)`: someone else's question; `Err(false)`: no such question.
        let pending = {
            let mut approvals = self.approvals.lock().expect("approvals poisoned");
            match approvals.get(key) {
                Some(p) if p.asker == user || self.is_admin(user, &roles, permissions) => {
                    approvals.remove(key).ok_or(false)
                }
                Some(_) => Err(true),
                None => Err(false),
            }
        };
        let pending = match pending {
            Ok(pending) => pending,
            Err(not_yours) => {
                let content = if not_yours {
                    "Only the person who started this turn, or an admin, can decide."
                } else {
                    "This question was already answered or has expired."
                };
                let body = json!({"type": 4, "data": {"flags": 64, "content": content}});
                self.rest
                    .respond(press.id.get(), &press.token, body)
                    .await?;
                return Ok(());
            }
        };
        let approved = verdict == "approve";
        let decision = if approved {
            Decision::Approve
        } else {
            Decision::Decline(format!("<@{user}> denied it"))
        };
        let _ = pending.answer.send(decision);
        let original = press.message.content.clone();
        let outcome = if approved {
            format!("✅ Approved by <@{user}>")
        } else {
            format!("🚫 Denied by <@{user}>")
        };
        let body = json!({"type": 7, "data": {"content": format!("{original}\n{outcome}"), "components": [], "allowed_mentions": {"parse": []}}});
        self.rest
            .respond(press.id.get(), &press.token, body)
            .await?;
        Ok(())
    }

    async fn register_commands(&self) -> anyhow::Result<()> {
        let commands = json!([
            {"name": "reset", "description": "Start this conversation over", "type": 1},
            {"name": "model", "description": "Show or change this conversation's model", "type": 1,
             "options": [{"name": "model", "description": "A model that supports tools", "type": 3,
                          "required": false, "autocomplete": true}]},
            {"name": "tools", "description": "The tools available here", "type": 1},
            {"name": "usage", "description": "Tokens and cost so far", "type": 1}
        ]);
        self.rest
            .set_commands(self.application_id, commands)
            .await?;
        Ok(())
    }
}

/// An answer being streamed into one or more messages.
struct Answer {
    channel: u64,
    text: String,
    /// Posted messages and what each shows now.
    posted: Vec<(u64, String)>,
    interval: Duration,
    last_flush: Option<Instant>,
}

impl Answer {
    fn new(channel: u64, interval: Duration) -> Self {
        Answer {
            channel,
            text: String::new(),
            posted: Vec::new(),
            interval,
            last_flush: None,
        }
    }

    /// Brings the messages up to date with `text`; unless `now`, at most once
    /// per interval.
    async fn flush(&mut self, rest: &Rest, now: bool) {
        if self.text.trim().is_empty() {
            return;
        }
        if !now && self.last_flush.is_some_and(|t| t.elapsed() < self.interval) {
            return;
        }
        self.last_flush = Some(Instant::now());
        for (i, part) in split_message(&self.text, MAX_MESSAGE_CHARS)
            .into_iter()
            .enumerate()
        {
            let result = match self.posted.get_mut(i) {
                Some((_, shown)) if *shown == part => Ok(()),
                Some((id, shown)) => {
                    let result = rest
                        .edit_message(self.channel, *id, json!({"content": part}))
                        .await;
                    *shown = part;
                    result
                }
                None => rest
                    .create_message(self.channel, json!({"content": part}))
                    .await
                    .map(|id| self.posted.push((id, part))),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "could not show the answer");
            }
        }
    }
}

/// Asks in the thread with Approve / Deny buttons.
struct Buttons {
    bot: Arc<Bot>,
    channel: u64,
    asker: u64,
}

#[async_trait]
impl Approver for Buttons {
    async fn decide(&self, request: &ApprovalRequest) -> Decision {
        let key = self
            .bot
            .next_approval
            .fetch_add(1, Ordering::SeqCst)
            .to_string();
        let (answer, decided) = oneshot::channel();
        self.bot
            .approvals
            .lock()
            .expect("approvals poisoned")
            .insert(
                key.clone(),
                PendingApproval {
                    asker: self.asker,
                    answer,
                },
            );
        let content = format!(
            "🔐 May I run {}?",
            notice_started(&request.tool, &request.arguments).trim_start_matches("🔧 ")
        );
        let body = json!({"content": content, "components": [{"type": 1, "components": [
            {"type": 2, "style": 3, "label": "Approve", "custom_id": format!("approve:{key}")},
            {"type": 2, "style": 4, "label": "Deny", "custom_id": format!("deny:{key}")}
        ]}]});
        let message = match self.bot.rest.create_message(self.channel, body).await {
            Ok(id) => id,
            Err(error) => {
                self.bot
                    .approvals
                    .lock()
                    .expect("approvals poisoned")
                    .remove(&key);
                return Decision::Decline(format!(
                    "the approval question could not be posted ({error})"
                ));
            }
        };
        let timeout = self.bot.config.approval_timeout;
        match tokio::time::timeout(timeout, decided).await {
            Ok(Ok(decision)) => decision,
            _ => {
                self.bot
                    .approvals
                    .lock()
                    .expect("approvals poisoned")
                    .remove(&key);
                let note = format!(
                    "{content}\n⌛ No answer within {} seconds: denied.",
                    timeout.as_secs()
                );
                let _ = self
                    .bot
                    .rest
                    .edit_message(
                        self.channel,
                        message,
                        json!({"content": note, "components": []}),
                    )
                    .await;
                Decision::Decline(format!(
                    "nobody approved it within {} seconds",
                    timeout.as_secs()
                ))
            }
        }
    }
}

/// serenity's handler: it gets `&self`, and turns need an owned `Arc<Bot>`.
pub struct Handler(pub Arc<Bot>);

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        let bot = &self.0;
        bot.me.store(ready.user.id.get(), Ordering::SeqCst);
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "connected to Discord");
        if let Some(path) = &bot.config.health_file
            && let Err(error) = super::health::write(path, true)
        {
            tracing::warn!(%error, "could not write the health file");
        }
        if let Err(error) = bot.register_commands().await {
            tracing::error!(%error, "could not register slash commands");
        }
    }

    async fn message(&self, _ctx: Context, msg: DiscordMessage) {
        let bot = &self.0;
        if msg.author.bot || !bot.accepting.load(Ordering::SeqCst) {
            return;
        }
        let (channel, conversation) = match bot.route(&msg).await {
            Ok(Some(target)) => target,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "could not handle a message");
                let _ = bot
                    .rest
                    .create_message(
                        msg.channel_id.get(),
                        json!({"content": format!("❌ {error}")}),
                    )
                    .await;
                return;
            }
        };
        let model = bot
            .app
            .engine
            .model_of(&conversation)
            .await
            .unwrap_or_default();
        let reads_images = bot
            .app
            .model
            .catalogue()
            .await
            .and_then(|c| c.get(&model).map(|m| m.supports_images))
            .unwrap_or(false);
        let mut notices = Vec::new();
        let input = bot.input(&msg, reads_images, &mut notices).await;
        for notice in notices {
            let _ = bot
                .rest
                .create_message(channel, json!({"content": format!("⚠️ {notice}")}))
                .await;
        }
        let queued = Queued {
            conversation,
            author: msg.author.id.get(),
            input,
        };
        bot.enqueue(channel, msg.id.get(), queued);
    }

    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let bot = &self.0;
        let result = match &interaction {
            Interaction::Command(command) => bot.command(command).await,
            Interaction::Autocomplete(command) => bot.autocomplete(command).await,
            Interaction::Component(press) => bot.button(press).await,
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "could not answer an interaction");
        }
    }
}

fn snowflake(value: &Value) -> Option<u64> {
    value.as_str().and_then(|s| s.parse().ok())
}

/// The text without `<@me>` / `<@!me>` mentions.
fn strip_mention(content: &str, me: u64) -> String {
    content
        .replace(&format!("<@{me}>"), "")
        .replace(&format!("<@!{me}>"), "")
        .trim()
        .to_owned()
}

fn thread_name(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let name: String = line.chars().take(MAX_THREAD_NAME).collect();
    if name.is_empty() {
        "Conversation".to_owned()
    } else {
        name
    }
}

fn is_text_name(name: &str) -> bool {
    const TEXT: &[&str] = &[
        "txt", "md", "csv", "json", "yaml", "yml", "toml", "log", "rs", "py", "js", "ts", "html",
        "css", "sh", "xml",
    ];
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| TEXT.contains(&ext.to_lowercase().as_str()))
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    format!("{cut}…")
}

fn start_of_today() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now - now % 86_400
}
