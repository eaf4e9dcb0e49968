//! A loopback Discord: the REST routes the bot uses and a gateway WebSocket
//! that the real serenity client connects to. Tests push gateway events and
//! read back what the bot did.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub const BOT: u64 = 900_000_000_000_000_001;
pub const APP: u64 = 900_000_000_000_000_002;
pub const GUILD: u64 = 100_000_000_000_000_010;
pub const CHANNEL: u64 = 100_000_000_000_000_100;
pub const ALICE: u64 = 200_000_000_000_000_001;
pub const BOB: u64 = 200_000_000_000_000_002;

/// One REST call the bot made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
    /// The id the fake gave it (a posted message's id).
    pub id: u64,
}

#[derive(Default)]
struct State_ {
    calls: Vec<Call>,
    /// Channel id → its JSON (type, parent_id, guild_id).
    channels: HashMap<u64, Value>,
    next_id: u64,
    /// Scripted 429s: (path suffix, retry_after seconds).
    rate_limits: VecDeque<(String, f64)>,
    sequence: u64,
    /// The shards (id, total) bots identified as, in order.
    identified: Vec<(u64, u64)>,
    /// Whether Discord's limits are enforced (see `enforce_limits`).
    enforcing: bool,
    /// The global window: its start and the requests in it.
    global: Option<(std::time::Instant, u32)>,
    /// (kind, channel) → its window's start and the requests in it.
    buckets: HashMap<(&'static str, String), (std::time::Instant, u32)>,
    /// 429s sent because a limit was exceeded.
    limited: usize,
}

/// Discord's limits as the fake enforces them: messages and edits per
/// channel per window, and requests per second in all.
pub const PER_CHANNEL: u32 = 5;
pub const CHANNEL_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);
pub const GLOBAL_PER_SECOND: u32 = 50;

#[derive(Clone)]
pub struct FakeDiscord {
    pub base_url: String,
    state: Arc<Mutex<State_>>,
    /// Dispatches, with the server they are about (shards are chosen by it).
    events: broadcast::Sender<(Option<u64>, String)>,
    /// `held.txt` is sent only when a test adds a permit.
    held: Arc<tokio::sync::Semaphore>,
}

impl FakeDiscord {
    pub async fn start() -> FakeDiscord {
        let (events, _) = broadcast::channel(8192);
        let mut state = State_ {
            next_id: 700_000_000_000_000_000,
            ..Default::default()
        };
        state.channels.insert(
            CHANNEL,
            json!({"id": CHANNEL.to_string(), "type": 0, "guild_id": GUILD.to_string(), "name": "general"}),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let fake = FakeDiscord {
            base_url,
            state: Arc::new(Mutex::new(state)),
            events,
            held: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let app = Router::new()
            .route("/gateway", get(gateway))
            .route("/attachments/{name}", get(attachment))
            .route("/api/v10/{*path}", any(rest))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// Sends a gateway dispatch (`t`, `d`) to the connected bot.
    pub fn dispatch(&self, kind: &str, data: Value) {
        let sequence = {
            let mut state = self.state.lock().unwrap();
            state.sequence += 1;
            state.sequence
        };
        let guild = data["guild_id"].as_str().and_then(|g| g.parse().ok());
        let frame = json!({"op": 0, "t": kind, "s": sequence, "d": data});
        self.events
            .send((guild, frame.to_string()))
            .expect("no bot is connected");
    }

    /// From now on, enforces Discord's real limits: 5 messages and 5 edits
    /// per 5 s per channel (with `X-RateLimit-*` headers) and 50 requests a
    /// second in all (interactions aside), answering 429 past them.
    pub fn enforce_limits(&self) {
        self.state.lock().unwrap().enforcing = true;
    }

    /// How many requests went over a limit (answered 429).
    pub fn limited(&self) -> usize {
        self.state.lock().unwrap().limited
    }

    /// Waits (up to 20 s) until bots identified as `count` shards in all.
    pub async fn wait_identified(&self, count: usize) -> Vec<(u64, u64)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let identified = self.state.lock().unwrap().identified.clone();
            if identified.len() >= count {
                return identified;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {identified:?} identified"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// How many times a bot registered its commands (once per connection).
    pub fn registrations(&self) -> usize {
        let calls = self.calls();
        calls
            .iter()
            .filter(|c| c.method == "PUT" && c.path.ends_with("/commands"))
            .count()
    }

    /// Waits until a bot connects and registers its commands, when
    /// `before` registrations had happened.
    pub async fn wait_registered(&self, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.registrations() == before {
            assert!(
                Instant::now() < deadline,
                "the bot never connected; calls: {:#?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next REST call to `path_suffix` answers 429 with `retry_after`.
    pub fn rate_limit_next(&self, path_suffix: &str, retry_after: f64) {
        self.state
            .lock()
            .unwrap()
            .rate_limits
            .push_back((path_suffix.to_owned(), retry_after));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Messages posted (not edits) in `channel`, in order.
    pub fn posts(&self, channel: u64) -> Vec<Value> {
        let path = format!("/channels/{channel}/messages");
        self.calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path == path)
            .map(|c| c.body)
            .collect()
    }

    /// Waits (up to 20 s) for a call matching `wanted`, and returns it.
    pub async fn wait_for(&self, what: &str, wanted: impl Fn(&Call) -> bool) -> Call {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(call) = self.calls().into_iter().find(|c| wanted(c)) {
                return call;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; calls: {:#?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Another text channel in the guild.
    pub fn add_channel(&self, id: u64) {
        self.add_channel_in(GUILD, id);
    }

    /// A text channel in `guild`.
    pub fn add_channel_in(&self, guild: u64, id: u64) {
        let channel = json!({"id": id.to_string(), "type": 0, "guild_id": guild.to_string()});
        self.state.lock().unwrap().channels.insert(id, channel);
    }

    /// The server of `channel` (by default, `GUILD`).
    fn guild_of(&self, channel: u64) -> String {
        let state = self.state.lock().unwrap();
        state
            .channels
            .get(&channel)
            .and_then(|c| c["guild_id"].as_str())
            .unwrap_or("")
            .to_owned()
    }

    /// A thread that someone else started in `CHANNEL`.
    pub fn add_thread(&self, id: u64) {
        let thread = json!({"id": id.to_string(), "type": 11, "parent_id": CHANNEL.to_string(), "guild_id": GUILD.to_string()});
        self.state.lock().unwrap().channels.insert(id, thread);
    }

    /// Lets one download of `held.txt` finish.
    pub fn release_held(&self) {
        self.held.add_permits(1);
    }

    /// The JSON of an attachment the fake serves.
    pub fn file(&self, id: u64, name: &str, kind: &str) -> Value {
        json!({"id": id.to_string(), "filename": name, "size": 10, "url": self.attachment_url(name),
               "proxy_url": self.attachment_url(name), "content_type": kind})
    }

    /// The URL of a file the fake serves (see `attachment`).
    pub fn attachment_url(&self, name: &str) -> String {
        format!("{}/attachments/{name}", self.base_url)
    }

    /// A message from `author` in `channel`.
    pub fn message(
        &self,
        id: u64,
        channel: u64,
        author: u64,
        content: &str,
        mentions_bot: bool,
    ) -> Value {
        let mentions = if mentions_bot {
            vec![user(BOT, "mcpcord", true)]
        } else {
            vec![]
        };
        let guild = match self.guild_of(channel) {
            known if !known.is_empty() => known,
            _ => GUILD.to_string(),
        };
        json!({
            "id": id.to_string(), "channel_id": channel.to_string(), "guild_id": guild,
            "author": user(author, "someone", false),
            "member": {"roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "deaf": false, "mute": false, "flags": 0},
            "content": content, "timestamp": "2026-11-26T12:00:00+00:00", "edited_timestamp": null,
            "tts": false, "mention_everyone": false, "mentions": mentions, "mention_roles": [],
            "attachments": [], "embeds": [], "pinned": false, "type": 0
        })
    }

    /// An interaction (slash command, autocomplete or button) from `user`.
    pub fn interaction(
        &self,
        id: u64,
        kind: u8,
        channel: u64,
        user_id: u64,
        data: Value,
        message: Option<Value>,
    ) -> Value {
        // A thread unless the channel is known as something else.
        let channel_type = self
            .state
            .lock()
            .unwrap()
            .channels
            .get(&channel)
            .map_or(11, |c| c["type"].as_u64().unwrap_or(11));
        let mut interaction = json!({
            "id": id.to_string(), "application_id": APP.to_string(), "type": kind, "data": data,
            "guild_id": GUILD.to_string(), "channel_id": channel.to_string(),
            "channel": {"id": channel.to_string(), "type": channel_type},
            "member": {"user": user(user_id, "someone", false), "roles": [], "joined_at": "2026-01-01T00:00:00+00:00",
                       "deaf": false, "mute": false, "flags": 0, "permissions": "0"},
            "token": format!("token-{id}"), "version": 1, "locale": "en-US", "guild_locale": "en-US",
            "app_permissions": "0", "entitlements": [], "authorizing_integration_owners": {"0": GUILD.to_string()},
            "context": 0, "attachment_size_limit": 10485760
        });
        if let Some(message) = message {
            interaction["message"] = message;
        }
        interaction
    }
}

pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({"id": id.to_string(), "username": name, "discriminator": "0", "global_name": null, "avatar": null, "bot": bot})
}

async fn gateway(State(fake): State<FakeDiscord>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| session(fake, socket))
}

/// HELLO, then READY after IDENTIFY, heartbeat ACKs, and pushed events.
/// Whether an event about `guild` goes to shard `id` of `total` (Discord's
/// rule; events of no server go to shard 0).
pub fn shard_of(guild: Option<u64>, total: u64) -> u64 {
    guild.map_or(0, |g| (g >> 22) % total.max(1))
}

async fn session(fake: FakeDiscord, mut socket: WebSocket) {
    let mut events = fake.events.subscribe();
    // Shard 0 of 1 until IDENTIFY says otherwise.
    let mut shard = (0u64, 1u64);
    let hello = json!({"op": 10, "d": {"heartbeat_interval": 41250}});
    if socket
        .send(WsMessage::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let Some(Ok(WsMessage::Text(text))) = incoming else { break };
                let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let reply = match frame["op"].as_u64() {
                    Some(1) => json!({"op": 11}),
                    Some(2) => {
                        if let Some([id, total]) = frame["d"]["shard"].as_array().map(|s| [s[0].as_u64(), s[1].as_u64()]) {
                            shard = (id.unwrap_or(0), total.unwrap_or(1));
                        }
                        fake.state.lock().unwrap().identified.push(shard);
                        json!({"op": 0, "t": "READY", "s": 0, "d": {
                        "v": 10, "user": user(BOT, "mcpcord", true), "guilds": [], "shard": [shard.0, shard.1],
                        "session_id": "session", "resume_gateway_url": format!("{}/gateway", fake.base_url.replace("http", "ws")),
                        "application": {"id": APP.to_string(), "flags": 0}
                    }})
                    }
                    _ => continue,
                };
                if socket.send(WsMessage::Text(reply.to_string().into())).await.is_err() {
                    break;
                }
            }
            event = events.recv() => {
                let Ok((guild, event)) = event else { break };
                if shard_of(guild, shard.1) != shard.0 {
                    continue;
                }
                if socket.send(WsMessage::Text(event.into())).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The token the fake accepts.
pub const TOKEN: &str = "discord-secret-token";

/// Files that messages attach, served like Discord's CDN.
async fn attachment(State(fake): State<FakeDiscord>, Path(name): Path<String>) -> Response {
    match name.as_str() {
        // A slow host: the file comes when the test says.
        "held.txt" => {
            fake.held.acquire().await.unwrap().forget();
            "held contents".into_response()
        }
        "notes.txt" => "line one\nline two".into_response(),
        "pixel.png" => vec![0x89u8, b'P', b'N', b'G'].into_response(),
        "report.pdf" | "appendix.pdf" => b"%PDF-1.4 a tiny report".to_vec().into_response(),
        "voice-message.ogg" => include_bytes!("../../fixtures/voice-message.ogg")
            .to_vec()
            .into_response(),
        "broken-voice.ogg" => b"OggS voice".to_vec().into_response(),
        "huge.pdf" => vec![b'x'; 64 * 1024].into_response(),
        // A host that never stops sending.
        "endless.log" => axum::body::Body::from_stream(futures::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b"tick tock\n"))
        }))
        .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn rest(
    State(fake): State<FakeDiscord>,
    method: Method,
    Path(path): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let path = format!("/{path}");
    let expected = format!("Bot {TOKEN}");
    let authorised =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str());
    if !authorised && !path.starts_with("/interactions/") && !path.starts_with("/webhooks/") {
        let body = json!({"message": "401: Unauthorized", "code": 0});
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        // Multipart: keep the payload_json part, which is what a test checks.
        let text = String::from_utf8_lossy(&body);
        let payload = text
            .split("name=\"payload_json\"")
            .nth(1)
            .and_then(|rest| rest.split("\r\n\r\n").nth(1))
            .and_then(|rest| rest.split("\r\n--").next());
        let mut value = payload
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(Value::Null);
        if text.contains("name=\"files[0]\"") {
            value["has_file"] = json!(true);
        }
        value
    });
    let mut state = fake.state.lock().unwrap();
    if let Some(position) = state
        .rate_limits
        .iter()
        .position(|(suffix, _)| path.ends_with(suffix.as_str()))
    {
        let (_, retry_after) = state.rate_limits.remove(position).unwrap();
        state.calls.push(Call {
            method: format!("{method} (429)"),
            path,
            body,
            id: 0,
        });
        let limited = json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": false});
        return (StatusCode::TOO_MANY_REQUESTS, axum::Json(limited)).into_response();
    }
    let mut limit_headers: Vec<(&'static str, String)> = Vec::new();
    if state.enforcing {
        let now = std::time::Instant::now();
        let mut over: Option<(f64, bool)> = None;
        if !path.starts_with("/interactions/") && !path.starts_with("/webhooks/") {
            let window = match state.global {
                Some((start, sent))
                    if now.duration_since(start) < std::time::Duration::from_secs(1) =>
                {
                    (start, sent)
                }
                _ => (now, 0),
            };
            if window.1 >= GLOBAL_PER_SECOND {
                let left = 1.0 - now.duration_since(window.0).as_secs_f64();
                over = Some((left, true));
            }
            state.global = Some((window.0, window.1 + 1));
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let kind = match (method.as_str(), segments.as_slice()) {
            ("POST", ["channels", channel, "messages"]) => Some(("messages", channel.to_string())),
            ("PATCH", ["channels", channel, "messages", _]) => Some(("edits", channel.to_string())),
            _ => None,
        };
        if over.is_none()
            && let Some(key) = kind
        {
            let bucket = key.0;
            let entry = state.buckets.entry(key).or_insert((now, 0));
            if now.duration_since(entry.0) >= CHANNEL_WINDOW {
                *entry = (now, 0);
            }
            let reset_after = (CHANNEL_WINDOW - now.duration_since(entry.0)).as_secs_f64();
            if entry.1 >= PER_CHANNEL {
                over = Some((reset_after, false));
            } else {
                entry.1 += 1;
            }
            limit_headers = vec![
                ("x-ratelimit-bucket", bucket.to_owned()),
                ("x-ratelimit-limit", PER_CHANNEL.to_string()),
                ("x-ratelimit-remaining", (PER_CHANNEL - entry.1).to_string()),
                ("x-ratelimit-reset-after", format!("{reset_after:.3}")),
            ];
        }
        if let Some((retry_after, global)) = over {
            state.limited += 1;
            state.calls.push(Call {
                method: format!("{method} (429)"),
                path,
                body,
                id: 0,
            });
            let limited = json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": global});
            let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(limited)).into_response();
            if global {
                limit_headers = vec![("x-ratelimit-global", "true".into())];
            }
            for (name, value) in limit_headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            return response;
        }
    }
    state.next_id += 1;
    let id = state.next_id;
    state.calls.push(Call {
        method: method.to_string(),
        path: path.clone(),
        body: body.clone(),
        id,
    });
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let reply = match (method.as_str(), parts.as_slice()) {
        ("GET", ["gateway"]) | ("GET", ["gateway", "bot"]) => {
            json!({"url": fake.base_url.replace("http", "ws") + "/gateway", "shards": 1,
                   "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})
        }
        ("GET", ["applications", "@me"]) => {
            json!({"id": APP.to_string(), "name": "mcpcord", "flags": 0})
        }
        ("GET", ["users", "@me"]) => user(BOT, "mcpcord", true),
        ("GET", ["guilds", guild]) => json!({"id": guild, "name": "Makers"}),
        ("GET", ["channels", channel]) => match state.channels.get(&channel.parse().unwrap_or(0)) {
            Some(channel) => channel.clone(),
            None => {
                return (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"message": "Unknown Channel", "code": 10003})),
                )
                    .into_response();
            }
        },
        ("POST", ["channels", channel, "messages", message, "threads"]) => {
            let thread: u64 = message.parse().unwrap();
            let guild = state
                .channels
                .get(&channel.parse::<u64>().unwrap_or(0))
                .and_then(|c| c["guild_id"].as_str())
                .unwrap_or("")
                .to_owned();
            let guild = if guild.is_empty() {
                GUILD.to_string()
            } else {
                guild
            };
            let value = json!({"id": thread.to_string(), "type": 11, "parent_id": channel, "guild_id": guild, "name": body["name"]});
            state.channels.insert(thread, value.clone());
            value
        }
        ("POST", ["channels", channel, "messages"]) => {
            json!({"id": id.to_string(), "channel_id": channel, "content": body["content"]})
        }
        ("PATCH", ["channels", channel, "messages", message]) => {
            json!({"id": message, "channel_id": channel, "content": body["content"]})
        }
        ("PUT", ["applications", _, "commands"]) => body.clone(),
        _ => return StatusCode::NO_CONTENT.into_response(),
    };
    let mut response = axum::Json(reply).into_response();
    for (name, value) in limit_headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}
