//! The stdio transport: a child process in its own process group, with a
//! minimal environment, its stdout read through a bounded filter and its
//! stderr logged at debug, rate-limited and redacted.
//!
//! The filter sits between the child's stdout and rmcp. It passes each
//! JSON-RPC line on unchanged, except:
//! - a line longer than the message limit is not buffered; if it was the
//!   answer to a request, rmcp gets an error answer for that request id at
//!   once (so the call fails with "too large" instead of timing out);
//! - notifications beyond [`NOTIFICATIONS_PER_SEC`] are dropped.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use process_wrap::tokio::{ChildWrapper, CommandWrap, KillOnDrop, ProcessGroup};
use rmcp::RoleClient;
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::transport::async_rw::AsyncRwTransport;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::process::ChildStdin;
use tokio_util::task::TaskTracker;

use super::config::InheritEnv;
use crate::config::{Redactor, Secret};

/// Variables every stdio server gets from mcpcord's environment (the set
/// MCP's reference SDKs pass), before its own `env`.
pub const DEFAULT_ENV: &[&str] = &["HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER"];
/// mcpcord's own secrets: never inherited, only passed when a server's
/// `env` names them.
pub const OWN_SECRETS: &[&str] = &["OPENROUTER_API_KEY", "DISCORD_TOKEN", "DATABASE_URL"];

/// Notifications a server may send per second; the rest are dropped.
pub const NOTIFICATIONS_PER_SEC: u32 = 50;
/// Server stderr lines logged per second (after a burst of as many again).
pub const STDERR_LINES_PER_SEC: u32 = 20;
/// Bytes of one stderr line that are logged; the rest of it is skipped.
pub const STDERR_LINE_MAX: usize = 2048;
/// Room between the filter and rmcp's reader.
const PIPE_BYTES: usize = 64 * 1024;
/// How long a closing server may take to exit before its group is killed.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// What starting a stdio server needs.
#[derive(Debug)]
pub struct Launch<'a> {
    pub server: &'a str,
    pub command: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, Secret>,
    pub cwd: Option<&'a std::path::Path>,
    pub inherit: &'a InheritEnv,
    pub max_message_bytes: usize,
}

/// A running stdio server as an rmcp transport.
pub struct ChildTransport {
    inner: AsyncRwTransport<RoleClient, DuplexStream, ChildStdin>,
    /// Killed (with its whole group) on close or drop.
    child: Option<Box<dyn ChildWrapper>>,
}

impl std::fmt::Debug for ChildTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildTransport").finish_non_exhaustive()
    }
}

/// The environment a server starts with, from `lookup` (mcpcord's own).
pub fn environment(
    launch: &Launch<'_>,
    vars: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in vars {
        let inherited = match launch.inherit {
            InheritEnv::Default => DEFAULT_ENV.contains(&name.as_str()),
            InheritEnv::All => !OWN_SECRETS.contains(&name.as_str()),
            InheritEnv::Names(names) => {
                DEFAULT_ENV.contains(&name.as_str()) || names.contains(&name)
            }
        };
        if inherited {
            out.insert(name, value);
        }
    }
    for (name, value) in launch.env {
        out.insert(name.clone(), value.expose().to_owned());
    }
    out
}

impl ChildTransport {
    /// Starts the server. Its stdout filter and stderr logger run on `tasks`.
    pub fn spawn(
        launch: &Launch<'_>,
        redactor: &Redactor,
        tasks: &TaskTracker,
    ) -> Result<ChildTransport, String> {
        if let Some(cwd) = launch.cwd
            && !cwd.is_dir()
        {
            return Err(format!(
                "its working directory {} (\"cwd\") does not exist or is not a folder",
                cwd.display()
            ));
        }
        let mut cmd = tokio::process::Command::new(launch.command);
        cmd.args(launch.args)
            .env_clear()
            .envs(environment(launch, std::env::vars()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = launch.cwd {
            cmd.current_dir(cwd);
        }
        let mut wrapped = CommandWrap::from(cmd);
        // Its own process group, so `npx`/`uvx` grandchildren die with it.
        wrapped.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
        let mut child = wrapped
            .spawn()
            .map_err(|e| format!("could not run {:?}: {e}", launch.command))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            child.stdin().take(),
            child.stdout().take(),
            child.stderr().take(),
        ) else {
            return Err("its standard streams could not be opened".into());
        };
        let (to_rmcp, from_filter) = tokio::io::duplex(PIPE_BYTES);
        let limit = launch.max_message_bytes;
        let server = launch.server.to_owned();
        tasks.spawn(filter_stdout(stdout, to_rmcp, limit, server.clone()));
        tasks.spawn(log_stderr(stderr, server, redactor.clone()));
        let inner = AsyncRwTransport::new_client(from_filter, stdin)
            // The filter already enforces the limit; its own error lines are short.
            .with_max_line_length(limit.saturating_add(4096));
        Ok(ChildTransport {
            inner,
            child: Some(child),
        })
    }
}

impl Transport<RoleClient> for ChildTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleClient>>> + Send {
        self.inner.receive()
    }

    /// Closes stdin, gives the server a moment to exit, then kills its group.
    async fn close(&mut self) -> Result<(), Self::Error> {
        self.inner.close().await?;
        if let Some(mut child) = self.child.take()
            && tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err()
        {
            Box::into_pin(child.kill()).await?;
        }
        Ok(())
    }
}

/// Copies JSON-RPC lines from the server to rmcp, within the bounds.
async fn filter_stdout(
    stdout: impl AsyncRead + Unpin,
    mut out: impl AsyncWrite + Unpin,
    limit: usize,
    server: String,
) {
    let mut reader = BufReader::new(stdout);
    let mut lines = BoundedLines::new(limit);
    let mut notifications = RateLimit::new(NOTIFICATIONS_PER_SEC);
    while let Some(line) = lines.next(&mut reader).await {
        let forward = match line {
            Line::Whole(bytes) => {
                let mut envelope = Envelope::default();
                envelope.feed(&bytes);
                if envelope.is_notification() && !notifications.allow() {
                    continue;
                }
                if notifications.take_dropped() > 0 {
                    tracing::warn!(server = %server, "the MCP server sent more than {NOTIFICATIONS_PER_SEC} notifications a second; the excess was ignored");
                }
                bytes
            }
            Line::Oversized { bytes, envelope } => {
                let Some(id) = envelope.id() else {
                    tracing::warn!(server = %server, bytes, limit, "dropped a message from the MCP server larger than MCP_MAX_MESSAGE_BYTES");
                    continue;
                };
                tracing::warn!(server = %server, bytes, limit, "an answer of the MCP server was larger than MCP_MAX_MESSAGE_BYTES; the call fails");
                too_large(&id, bytes, limit).into_bytes()
            }
        };
        if out.write_all(&forward).await.is_err() || out.write_all(b"\n").await.is_err() {
            break;
        }
    }
    let _ = out.shutdown().await;
}

/// The JSON-RPC error answer that replaces an oversized result.
fn too_large(id: &serde_json::Value, bytes: usize, limit: usize) -> String {
    let message = format!(
        "the tool's result was {} MiB, more than the limit of {} MiB (MCP_MAX_MESSAGE_BYTES), so it was dropped. Ask for less at once (a smaller range, one page, a summary).",
        mib(bytes),
        mib(limit)
    );
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": message}})
        .to_string()
}

fn mib(bytes: usize) -> String {
    let value = bytes as f64 / (1024.0 * 1024.0);
    if value >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// Logs a server's stderr at debug: decoded lossily, long lines cut,
/// secrets redacted, at most [`STDERR_LINES_PER_SEC`] lines a second.
async fn log_stderr(stderr: impl AsyncRead + Unpin, server: String, redactor: Redactor) {
    let mut reader = BufReader::new(stderr);
    let mut lines = BoundedLines::new(STDERR_LINE_MAX);
    let mut rate = RateLimit::new(STDERR_LINES_PER_SEC);
    while let Some(line) = lines.next(&mut reader).await {
        if !rate.allow() {
            continue;
        }
        let dropped = rate.take_dropped();
        if dropped > 0 {
            tracing::debug!(target: "mcpcord::mcp::stderr", server = %server, "({dropped} lines not logged: more than {STDERR_LINES_PER_SEC} a second)");
        }
        let text = match &line {
            Line::Whole(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            Line::Oversized { .. } => "(a line longer than 2 KiB, not logged)".to_owned(),
        };
        let text = redactor.redact(text.trim_end_matches('\r'));
        tracing::debug!(target: "mcpcord::mcp::stderr", server = %server, "{text}");
    }
}

/// One line read by [`BoundedLines`].
#[derive(Debug)]
enum Line {
    Whole(Vec<u8>),
    /// Longer than the limit: only its size and JSON-RPC envelope are known.
    Oversized {
        bytes: usize,
        envelope: Envelope,
    },
}

/// Reads newline-terminated lines without ever holding more than `limit`
/// bytes of one.
#[derive(Debug)]
struct BoundedLines {
    limit: usize,
    buffer: Vec<u8>,
}

impl BoundedLines {
    fn new(limit: usize) -> Self {
        BoundedLines {
            limit,
            buffer: Vec::new(),
        }
    }

    /// The next line, or `None` at the end of the stream (or on an error).
    async fn next(&mut self, reader: &mut (impl AsyncBufReadExt + Unpin)) -> Option<Line> {
        let mut oversized: Option<(usize, Envelope)> = None;
        loop {
            let available = reader.fill_buf().await.ok()?;
            if available.is_empty() {
                // A last line without a newline is still a line.
                return match oversized {
                    Some((bytes, envelope)) => Some(Line::Oversized { bytes, envelope }),
                    None if !self.buffer.is_empty() => {
                        Some(Line::Whole(std::mem::take(&mut self.buffer)))
                    }
                    None => None,
                };
            }
            let newline = available.iter().position(|b| *b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let consumed = newline.map_or(chunk.len(), |i| i + 1);
            match &mut oversized {
                Some((bytes, envelope)) => {
                    *bytes += chunk.len();
                    envelope.feed(chunk);
                }
                None if self.buffer.len() + chunk.len() > self.limit => {
                    let mut envelope = Envelope::default();
                    envelope.feed(&self.buffer);
                    envelope.feed(chunk);
                    oversized = Some((self.buffer.len() + chunk.len(), envelope));
                    self.buffer = Vec::new();
                }
                None => self.buffer.extend_from_slice(chunk),
            }
            reader.consume(consumed);
            if newline.is_some() {
                return Some(match oversized {
                    Some((bytes, envelope)) => Line::Oversized { bytes, envelope },
                    None => Line::Whole(std::mem::take(&mut self.buffer)),
                });
            }
        }
    }
}

/// The top level of a JSON-RPC message, read byte by byte without parsing
/// the rest: its `id` and whether it has a `method`.
#[derive(Debug, Default)]
struct Envelope {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// At depth 1, whether the next string is a key.
    expect_key: bool,
    reading_key: bool,
    key: Vec<u8>,
    /// The raw bytes of the `id` value while it is being read.
    id_bytes: Option<Vec<u8>>,
    id: Option<Vec<u8>>,
    has_method: bool,
}

/// Bytes of a key or an id that are kept.
const ENVELOPE_FIELD_MAX: usize = 256;

impl Envelope {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b);
        }
    }

    fn step(&mut self, b: u8) {
        let top = self.depth == 1;
        if top && let Some(id) = &mut self.id_bytes {
            if !self.in_string && (b == b',' || b == b'}') {
                self.id = self.id_bytes.take();
            } else if id.len() < ENVELOPE_FIELD_MAX {
                id.push(b);
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                self.reading_key = false;
                return;
            }
            if self.reading_key && self.key.len() < ENVELOPE_FIELD_MAX {
                self.key.push(b);
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                if top && self.expect_key {
                    self.reading_key = true;
                    self.key.clear();
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth == 1 {
                    self.expect_key = true;
                }
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if top => {
                self.expect_key = false;
                match self.key.as_slice() {
                    b"id" => self.id_bytes = Some(Vec::new()),
                    b"method" => self.has_method = true,
                    _ => {}
                }
            }
            b',' if top => self.expect_key = true,
            _ => {}
        }
    }

    /// The message's `id`, when it has one that parses.
    fn id(&self) -> Option<serde_json::Value> {
        let raw = self.id.as_ref()?;
        serde_json::from_slice::<serde_json::Value>(raw)
            .ok()
            .filter(|id| id.is_number() || id.is_string())
    }

    fn is_notification(&self) -> bool {
        self.has_method && self.id.is_none() && self.id_bytes.is_none()
    }
}

/// A per-second allowance with a burst of one second's worth.
#[derive(Debug)]
struct RateLimit {
    per_sec: u32,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec,
            tokens: f64::from(per_sec) * 2.0,
            last: Instant::now(),
            dropped: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(self.per_sec);
        self.tokens = (self.tokens + refill).min(f64::from(self.per_sec) * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(text: &str) -> Envelope {
        let mut e = Envelope::default();
        e.feed(text.as_bytes());
        e
    }

    #[test]
    fn the_envelope_finds_the_top_level_id_wherever_it_is() {
        let e = envelope(
            r#"{"result":{"content":[{"id":99,"text":"a\"id\":5"}]},"jsonrpc":"2.0","id":7}"#,
        );
        assert_eq!(e.id(), Some(serde_json::json!(7)));
        assert!(!e.is_notification());
        let e = envelope(r#"{"jsonrpc":"2.0","id":"abc","result":{}}"#);
        assert_eq!(e.id(), Some(serde_json::json!("abc")));
        let e = envelope(r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#);
        assert!(e.is_notification());
        assert_eq!(e.id(), None);
    }

    #[tokio::test]
    async fn lines_are_bounded_and_the_last_one_needs_no_newline() {
        let input = format!(
            "short\n{}\n{{\"id\":3,\"x\":\"{}\"}}\ntail",
            "x".repeat(50),
            "y".repeat(40)
        );
        let mut reader = BufReader::with_capacity(8, input.as_bytes());
        let mut lines = BoundedLines::new(20);
        let mut seen = Vec::new();
        while let Some(line) = lines.next(&mut reader).await {
            seen.push(match line {
                Line::Whole(bytes) => String::from_utf8(bytes).unwrap(),
                Line::Oversized { bytes, envelope } => {
                    format!("{bytes} bytes, id {:?}", envelope.id())
                }
            });
        }
        assert_eq!(
            seen,
            [
                "short",
                "50 bytes, id None",
                "55 bytes, id Some(Number(3))",
                "tail"
            ]
        );
    }

    #[tokio::test]
    async fn an_oversized_answer_becomes_an_error_for_its_request() {
        let input = format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}}\n{{\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"{}\"}}]}},\"jsonrpc\":\"2.0\",\"id\":12}}\n",
            "z".repeat(3 * 1024 * 1024)
        );
        let mut out = Vec::new();
        filter_stdout(input.as_bytes(), &mut out, 1024 * 1024, "s".into()).await;
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let error: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(error["id"], 12);
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("3.0 MiB, more than the limit of 1.0 MiB"),
            "{message}"
        );
    }

    #[test]
    fn the_environment_is_minimal_unless_asked() {
        let env: BTreeMap<String, Secret> = [("OWN".to_owned(), Secret::new("mine"))]
            .into_iter()
            .collect();
        let vars = || {
            [
                ("PATH", "/bin"),
                ("HOME", "/home/u"),
                ("OPENROUTER_API_KEY", "sk-or-secret"),
                ("DISCORD_TOKEN", "discord-secret"),
                ("LANG", "C.UTF-8"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        };
        let names = |inherit: &InheritEnv| -> Vec<String> {
            let launch = Launch {
                server: "s",
                command: "x",
                args: &[],
                env: &env,
                cwd: None,
                inherit,
                max_message_bytes: 1,
            };
            environment(&launch, vars()).into_keys().collect()
        };
        assert_eq!(names(&InheritEnv::Default), ["HOME", "OWN", "PATH"]);
        assert_eq!(names(&InheritEnv::All), ["HOME", "LANG", "OWN", "PATH"]);
        assert_eq!(
            names(&InheritEnv::Names(vec!["LANG".into()])),
            ["HOME", "LANG", "OWN", "PATH"]
        );
    }
}
