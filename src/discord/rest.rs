//! The Discord REST calls the bot makes, with 429s honoured on every request
//! (`retry_after` from the body or `Retry-After`), so nothing is dropped.
//! The gateway is serenity's; these calls use their own client so that the
//! same code works against Discord and against a Discord-compatible server.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::limiter::{Limiter, RouteKey};
use super::retry::{Paced, retrying, unreachable_for};
use crate::config::Secret;

/// Discord's HTTP API, unless `DISCORD_API_BASE_URL` says otherwise.
pub const DEFAULT_API_BASE: &str = "https://discord.com";
const API_PATH: &str = "/api/v10";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("Discord rejected the bot token (HTTP 401). Check DISCORD_TOKEN.")]
    Unauthorized,
    #[error("Discord refused {what} (HTTP {status}): {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
    #[error("Discord could not be reached for {what}: {message}")]
    Connection { what: String, message: String },
}

/// A file to attach to a message.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The Discord REST API.
#[derive(Debug, Clone)]
pub struct Rest {
    http: reqwest::Client,
    base: String,
    token: Secret,
    /// One pace for every call (see `limiter`).
    limiter: std::sync::Arc<Limiter>,
}

impl Rest {
    /// Reads at most `max_bytes` of a file Discord hosts (an attachment),
    /// without the bot token and within the request timeout. Returns the
    /// bytes read and whether the file was longer.
    pub async fn download(&self, url: &str, max_bytes: usize) -> Option<(Vec<u8>, bool)> {
        use futures::StreamExt;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .ok()?
            .error_for_status()
            .ok()?;
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.ok()?;
            let room = max_bytes - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                return Some((body, true));
            }
            body.extend_from_slice(&chunk);
        }
        Some((body, false))
    }

    pub fn new(base: &str, token: Secret) -> Result<Self, RestError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "DiscordBot (mcpcord, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| unreachable_for("the HTTP client", e))?;
        Ok(Rest {
            http,
            base: format!("{}{API_PATH}", base.trim_end_matches('/')),
            token,
            limiter: Default::default(),
        })
    }

    /// This client with Discord's global limit at `per_second` requests.
    pub fn with_global_limit(mut self, per_second: u32) -> Self {
        self.limiter = std::sync::Arc::new(Limiter::new(per_second));
        self
    }

    /// The bot's own user and application.
    pub async fn current_application(&self) -> Result<Value, RestError> {
        self.send(
            Method::GET,
            "/applications/@me",
            None,
            "reading the application",
        )
        .await
    }

    /// A channel or thread (`type`, `parent_id`, ...).
    pub async fn channel(&self, channel: u64) -> Result<Value, RestError> {
        self.send(
            Method::GET,
            &format!("/channels/{channel}"),
            None,
            "reading a channel",
        )
        .await
    }

    /// A server (`name`, ...).
    pub async fn guild(&self, guild: u64) -> Result<Value, RestError> {
        self.send(
            Method::GET,
            &format!("/guilds/{guild}"),
            None,
            "reading a server",
        )
        .await
    }

    pub async fn create_message(&self, channel: u64, body: Value) -> Result<u64, RestError> {
        let message = self
            .send(
                Method::POST,
                &format!("/channels/{channel}/messages"),
                Some(with_no_pings(body)),
                "posting a message",
            )
            .await?;
        Ok(id_of(&message))
    }

    /// Posts a message with one file attached (multipart).
    pub async fn create_message_with_file(
        &self,
        channel: u64,
        body: Value,
        file: &Attachment,
    ) -> Result<u64, RestError> {
        let mut body = with_no_pings(body);
        body["attachments"] = json!([{"id": 0, "filename": file.name}]);
        let path = format!("/channels/{channel}/messages");
        let message = self.post_file(&path, &body, file, "posting a file").await?;
        Ok(id_of(&message))
    }

    /// Answers an interaction with a message that has one file attached.
    pub async fn respond_with_file(
        &self,
        interaction: u64,
        token: &str,
        mut body: Value,
        file: &Attachment,
    ) -> Result<(), RestError> {
        body["data"]["attachments"] = json!([{"id": 0, "filename": file.name}]);
        let path = format!("/interactions/{interaction}/{token}/callback");
        self.post_file(&path, &body, file, "answering an interaction")
            .await
            .map(drop)
    }

    /// A multipart POST of `body` with `file` as `files[0]`.
    async fn post_file(
        &self,
        path: &str,
        body: &Value,
        file: &Attachment,
        what: &str,
    ) -> Result<Value, RestError> {
        let key = RouteKey::new("POST", path);
        let route = crate::metrics::route("POST", path);
        let paced = Paced {
            limiter: &self.limiter,
            key: &key,
            route: &route,
            droppable: false,
        };
        retrying(what, paced, || {
            let form = reqwest::multipart::Form::new()
                .text("payload_json", body.to_string())
                .part(
                    "files[0]",
                    reqwest::multipart::Part::bytes(file.bytes.clone())
                        .file_name(file.name.clone()),
                );
            self.request(Method::POST, path).multipart(form)
        })
        .await
    }

    pub async fn edit_message(
        &self,
        channel: u64,
        message: u64,
        body: Value,
    ) -> Result<(), RestError> {
        self.send(
            Method::PATCH,
            &format!("/channels/{channel}/messages/{message}"),
            Some(with_no_pings(body)),
            "editing a message",
        )
        .await
        .map(drop)
    }

    pub async fn delete_message(&self, channel: u64, message: u64) -> Result<(), RestError> {
        self.send(
            Method::DELETE,
            &format!("/channels/{channel}/messages/{message}"),
            None,
            "deleting a message",
        )
        .await
        .map(drop)
    }

    /// Starts a public thread from `message`; the thread id is returned.
    pub async fn start_thread(
        &self,
        channel: u64,
        message: u64,
        name: &str,
    ) -> Result<u64, RestError> {
        let body = json!({"name": name, "auto_archive_duration": 1440});
        let thread = self
            .send(
                Method::POST,
                &format!("/channels/{channel}/messages/{message}/threads"),
                Some(body),
                "starting a thread",
            )
            .await?;
        Ok(id_of(&thread))
    }

    /// Shows the typing indicator, unless Discord's limits are busy: then
    /// it is left out, before any message waits for it.
    pub async fn typing(&self, channel: u64) -> Result<(), RestError> {
        self.paced(
            Method::POST,
            &format!("/channels/{channel}/typing"),
            None,
            "showing typing",
            true,
        )
        .await
        .map(drop)
    }

    /// Answers an interaction (within Discord's three seconds).
    pub async fn respond(
        &self,
        interaction: u64,
        token: &str,
        body: Value,
    ) -> Result<(), RestError> {
        self.send(
            Method::POST,
            &format!("/interactions/{interaction}/{token}/callback"),
            Some(body),
            "answering an interaction",
        )
        .await
        .map(drop)
    }

    /// Replaces a deferred interaction's "thinking" message.
    pub async fn edit_original(
        &self,
        application: u64,
        token: &str,
        body: Value,
    ) -> Result<(), RestError> {
        self.send(
            Method::PATCH,
            &format!("/webhooks/{application}/{token}/messages/@original"),
            Some(with_no_pings(body)),
            "finishing an interaction",
        )
        .await
        .map(drop)
    }

    /// Replaces the global slash commands with `commands`.
    pub async fn set_commands(&self, application: u64, commands: Value) -> Result<(), RestError> {
        self.send(
            Method::PUT,
            &format!("/applications/{application}/commands"),
            Some(commands),
            "registering slash commands",
        )
        .await
        .map(drop)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Bot {}", self.token.expose()))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value, RestError> {
        self.paced(method, path, body, what, false).await
    }

    async fn paced(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
        droppable: bool,
    ) -> Result<Value, RestError> {
        let key = RouteKey::new(method.as_str(), path);
        let route = crate::metrics::route(method.as_str(), path);
        let paced = Paced {
            limiter: &self.limiter,
            key: &key,
            route: &route,
            droppable,
        };
        retrying(what, paced, || {
            let request = self.request(method.clone(), path);
            match &body {
                Some(body) => request.json(body),
                None => request,
            }
        })
        .await
    }
}

/// Model output must never ping @everyone, roles or users.
fn with_no_pings(mut body: Value) -> Value {
    if body.is_object() {
        body["allowed_mentions"] = json!({"parse": []});
    }
    body
}

fn id_of(value: &Value) -> u64 {
    match &value["id"] {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}
