//! The MCP host: configured servers, their sessions, and the tools the model
//! sees.
//!
//! Sessions start lazily when a turn needs them. A `conversation`-scoped
//! server gets one session per conversation (capped per server, least
//! recently used closed first, idle ones closed by [`McpHost::close_idle`]);
//! a `shared` one gets one session for everyone. A session that crashed is
//! started again on its next use; one that fails to start is tried again
//! only after a growing pause (at most `MCP_RETRY_MAX_SECS`).

pub mod config;
pub mod naming;
pub mod result;
pub mod schema;
mod session;
pub mod stdio;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use serde_json::Value;
use tokio_util::task::TaskTracker;

use crate::config::{Limits, Redactor, Secret};
use crate::conversation::{ToolHost, ToolList, ToolOutcome, ToolSpec};
pub use config::{Approval, InheritEnv, Scope, ServerSpec, Transport};
use session::{CallError, Session};
pub use session::{MAX_LIST_PAGES, RemoteTool, ServerTools, shorten_list};

/// The owner of a shared session.
const SHARED: &str = "";
/// Tools one request may offer: providers refuse requests with more.
pub const MAX_TOOLS_PER_REQUEST: usize = 128;
/// The first pause before a server that failed to start is tried again;
/// it doubles with each failure, up to `MCP_RETRY_MAX_SECS`.
pub const RETRY_MIN: Duration = Duration::from_secs(5);

/// A server that failed to start or to list its tools, and when it may be
/// tried again.
#[derive(Debug)]
struct Failure {
    failures: u32,
    retry_at: Instant,
    problem: String,
}

/// A session slot: (server index, owner). The async mutex serialises
/// starting and restarting; calls clone the `Arc<Session>` and run freely.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Session>>>>;

#[derive(Debug)]
struct SlotEntry {
    slot: Slot,
    last_used: Instant,
}

/// Where an exposed tool name leads.
#[derive(Debug, Clone)]
struct Route {
    server: usize,
    tool: String,
}

/// The MCP side of mcpcord.
#[derive(Debug)]
pub struct McpHost {
    servers: Vec<ServerSpec>,
    limits: Limits,
    slots: Mutex<HashMap<(usize, String), SlotEntry>>,
    /// Per conversation: the names last offered to the model.
    routes: Mutex<HashMap<String, Arc<HashMap<String, Route>>>>,
    /// Tasks that filter server stdout and forward stderr to the log.
    tasks: TaskTracker,
    /// Secret values blanked out of server stderr before it is logged.
    redactor: Redactor,
    /// Per server: its last failure to start, while it is backed off.
    failures: Mutex<HashMap<usize, Failure>>,
}

/// The tools of every server for one conversation.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub tools: Vec<ListedTool>,
    /// One sentence per server that is unavailable.
    pub problems: Vec<String>,
    /// Per server: what was wrong with its tool list (tools changed or left out).
    pub warnings: Vec<(String, String)>,
}

/// A tool as listed for a check report: the name the model sees and the
/// server's own.
#[derive(Debug, Clone)]
pub struct ListedTool {
    pub exposed: String,
    pub server: String,
    pub tool: RemoteTool,
}

impl McpHost {
    /// A host for `servers`. The secret values of their `env` and
    /// `headers` are redacted from their stderr; add mcpcord's own with
    /// [`McpHost::redacting`].
    pub fn new(servers: Vec<ServerSpec>, limits: Limits) -> Self {
        let redactor = Redactor::new(server_secrets(&servers).map(Secret::expose));
        McpHost {
            servers,
            limits,
            slots: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            redactor,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Also redacts `secrets` (mcpcord's own) from server stderr.
    pub fn redacting<'a>(mut self, secrets: impl IntoIterator<Item = &'a Secret>) -> Self {
        let own: Vec<&Secret> = secrets.into_iter().collect();
        let all = server_secrets(&self.servers).chain(own);
        self.redactor = Redactor::new(all.map(Secret::expose));
        self
    }

    pub fn servers(&self) -> &[ServerSpec] {
        &self.servers
    }

    /// How many sessions are open now (for tests and reports).
    pub fn open_sessions(&self) -> usize {
        self.slots.lock().expect("slots poisoned").len()
    }

    /// The tools `conversation` may use, with the names the model sees,
    /// one sentence per server that failed, and what was wrong with the
    /// lists of the others.
    pub async fn list(&self, conversation: &str) -> Listing {
        let per_server =
            join_all((0..self.servers.len()).map(|i| self.server_tools(i, conversation))).await;
        let mut found: Vec<(usize, RemoteTool)> = Vec::new();
        let mut listing = Listing::default();
        for (i, result) in per_server.into_iter().enumerate() {
            let name = &self.servers[i].name;
            match result {
                Ok(tools) => {
                    found.extend(
                        tools
                            .tools
                            .iter()
                            .filter(|t| self.servers[i].permits(&t.name))
                            .map(|t| (i, t.clone())),
                    );
                    listing
                        .warnings
                        .extend(tools.warnings.iter().map(|w| (name.clone(), w.clone())));
                }
                Err(problem) => listing.problems.push(format!(
                    "The tool server \"{name}\" is unavailable ({problem}); its tools are left out."
                )),
            }
        }
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|(i, t)| (self.servers[*i].name.as_str(), t.name.as_str()))
            .collect();
        let names = naming::exposed_names(&pairs);
        listing.tools = found
            .into_iter()
            .zip(names)
            .map(|((i, tool), exposed)| ListedTool {
                exposed,
                server: self.servers[i].name.clone(),
                tool,
            })
            .collect();
        listing
    }

    /// A server's tools. A failure to start or to list backs the server off.
    async fn server_tools(
        &self,
        server: usize,
        conversation: &str,
    ) -> Result<Arc<ServerTools>, String> {
        let session = self.session(server, conversation).await?;
        match session.tools(&self.limits).await {
            Ok(tools) => {
                // Only a listed server counts as working again: one that
                // starts but never lists keeps backing off further.
                self.failures
                    .lock()
                    .expect("failures poisoned")
                    .remove(&server);
                Ok(tools)
            }
            Err(problem) => {
                // A server that cannot list its tools is no use; close it
                // so that the next try starts it afresh.
                session.close().await;
                Err(self.record_failure(server, problem))
            }
        }
    }

    /// Remembers that `server` failed and says when it will be tried again.
    fn record_failure(&self, server: usize, problem: String) -> String {
        let mut failures = self.failures.lock().expect("failures poisoned");
        let count = failures.get(&server).map_or(0, |f| f.failures) + 1;
        let wait = RETRY_MIN
            .saturating_mul(2u32.saturating_pow(count - 1))
            .min(self.limits.mcp_retry_max);
        let sentence = format!("{problem}; it will be tried again in {}", seconds(wait));
        tracing::warn!(server = %self.servers[server].name, failures = count, "MCP server unavailable: {sentence}");
        failures.insert(
            server,
            Failure {
                failures: count,
                retry_at: Instant::now() + wait,
                problem,
            },
        );
        sentence
    }

    /// Why `server` is not tried now, while it is backed off.
    fn backed_off(&self, server: usize) -> Option<String> {
        let failures = self.failures.lock().expect("failures poisoned");
        let failure = failures.get(&server)?;
        let left = failure.retry_at.checked_duration_since(Instant::now())?;
        Some(format!(
            "{}; it will be tried again in {}",
            failure.problem,
            seconds(left)
        ))
    }

    /// The live session of `server` for `conversation`, started (or
    /// restarted after a crash) as needed.
    async fn session(&self, server: usize, conversation: &str) -> Result<Arc<Session>, String> {
        let spec = &self.servers[server];
        let owner = match spec.scope {
            Scope::Shared => SHARED.to_owned(),
            Scope::Conversation => conversation.to_owned(),
        };
        let (slot, evicted) = self.slot(server, owner);
        if let Some(evicted) = evicted {
            close_slot(&evicted).await;
        }
        let mut guard = slot.lock().await;
        if let Some(session) = guard.as_ref() {
            if !session.is_closed() {
                return Ok(session.clone());
            }
            tracing::warn!(server = %spec.name, "MCP session was closed; starting it again");
            session.close().await;
        }
        if let Some(problem) = self.backed_off(server) {
            return Err(problem);
        }
        let started = Instant::now();
        let session = Session::start(spec, &self.limits, &self.redactor, &self.tasks)
            .await
            .map_err(|problem| self.record_failure(server, problem))?;
        let session = Arc::new(session);
        tracing::info!(server = %spec.name, conversation, elapsed_ms = started.elapsed().as_millis() as u64, "MCP session started");
        *guard = Some(session.clone());
        Ok(session)
    }

    /// Finds or makes the slot, marking it used. When a per-conversation
    /// server is at its cap, the least recently used slot is removed and
    /// returned for closing.
    fn slot(&self, server: usize, owner: String) -> (Slot, Option<Slot>) {
        let mut slots = self.slots.lock().expect("slots poisoned");
        let key = (server, owner);
        if let Some(entry) = slots.get_mut(&key) {
            entry.last_used = Instant::now();
            return (entry.slot.clone(), None);
        }
        let mut evicted = None;
        if key.1 != SHARED {
            let same_server: Vec<_> = slots
                .iter()
                .filter(|((s, o), _)| *s == server && o != SHARED)
                .collect();
            if same_server.len() >= self.limits.max_sessions_per_server {
                let oldest = same_server
                    .into_iter()
                    .min_by_key(|(_, entry)| entry.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    tracing::info!(server = %self.servers[server].name, conversation = %oldest.1, "closing the least recently used MCP session");
                    evicted = slots.remove(&oldest).map(|e| e.slot);
                }
            }
        }
        let slot = Slot::default();
        slots.insert(
            key,
            SlotEntry {
                slot: slot.clone(),
                last_used: Instant::now(),
            },
        );
        (slot, evicted)
    }

    /// Closes sessions unused for longer than the idle timeout.
    pub async fn close_idle(&self) {
        let idle = self.limits.session_idle_timeout;
        let expired: Vec<Slot> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            let keys: Vec<_> = slots
                .iter()
                .filter(|(_, e)| e.last_used.elapsed() >= idle)
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter()
                .filter_map(|k| slots.remove(k))
                .map(|e| e.slot)
                .collect()
        };
        for slot in expired {
            close_slot(&slot).await;
        }
    }

    /// How often [`McpHost::close_idle`] should run.
    pub fn idle_check_interval(&self) -> Duration {
        (self.limits.session_idle_timeout / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Closes every session and waits for the stderr forwarders to end.
    pub async fn shutdown(&self) {
        let all: Vec<Slot> = self
            .slots
            .lock()
            .expect("slots poisoned")
            .drain()
            .map(|(_, e)| e.slot)
            .collect();
        join_all(all.iter().map(close_slot)).await;
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// The secret values in the servers' `env` and `headers`.
fn server_secrets(servers: &[ServerSpec]) -> impl Iterator<Item = &Secret> {
    servers.iter().flat_map(|s| match &s.transport {
        Transport::Stdio { env, .. } => env.values(),
        Transport::Http { headers, .. } => headers.values(),
    })
}

/// A wait as people say it: "40 s", "5 min".
fn seconds(wait: Duration) -> String {
    let secs = wait.as_secs_f64().ceil() as u64;
    if secs >= 120 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

async fn close_slot(slot: &Slot) {
    if let Some(session) = slot.lock().await.take() {
        session.close().await;
    }
}

#[async_trait]
impl ToolHost for McpHost {
    async fn tools(&self, conversation: &str) -> ToolList {
        let Listing {
            tools: mut listed,
            problems,
            ..
        } = self.list(conversation).await;
        if listed.len() > MAX_TOOLS_PER_REQUEST {
            let left_out: Vec<String> = listed
                .drain(MAX_TOOLS_PER_REQUEST..)
                .map(|t| t.exposed)
                .collect();
            tracing::warn!(
                conversation,
                left_out = left_out.len(),
                "the MCP servers offer more than {MAX_TOOLS_PER_REQUEST} tools, the most one request may carry; left out: {}",
                left_out.join(", ")
            );
        }
        let mut routes = HashMap::with_capacity(listed.len());
        let specs = listed
            .into_iter()
            .map(|t| {
                let server = self
                    .servers
                    .iter()
                    .position(|s| s.name == t.server)
                    .unwrap_or(0);
                routes.insert(
                    t.exposed.clone(),
                    Route {
                        server,
                        tool: t.tool.name.clone(),
                    },
                );
                let needs_approval = match self.servers[server].approval {
                    Approval::Auto => false,
                    Approval::Ask => true,
                    Approval::Annotations => !t.tool.read_only,
                };
                ToolSpec {
                    name: t.exposed,
                    description: t.tool.description,
                    parameters: t.tool.parameters,
                    needs_approval,
                    server: t.server,
                }
            })
            .collect();
        self.routes
            .lock()
            .expect("routes poisoned")
            .insert(conversation.to_owned(), Arc::new(routes));
        ToolList { specs, problems }
    }

    async fn call(&self, conversation: &str, name: &str, arguments: Value) -> ToolOutcome {
        let routes = self
            .routes
            .lock()
            .expect("routes poisoned")
            .get(conversation)
            .cloned();
        let Some(route) = routes.as_ref().and_then(|r| r.get(name)).cloned() else {
            let known: Vec<&str> = routes
                .iter()
                .flat_map(|r| r.keys())
                .map(String::as_str)
                .collect();
            return ToolOutcome::error(format!(
                "there is no tool named {name:?}. Available tools: {}.",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        };
        let spec = &self.servers[route.server];
        let timeout = spec.timeout.unwrap_or(self.limits.tool_timeout);
        let session = match self.session(route.server, conversation).await {
            Ok(session) => session,
            Err(problem) => {
                return ToolOutcome::error(format!(
                    "the tool server \"{}\" is unavailable: {problem}",
                    spec.name
                ));
            }
        };
        match tokio::time::timeout(timeout, session.call(&route.tool, arguments)).await {
            Ok(Ok(result)) => result::outcome(&result, self.limits.tool_result_max_chars),
            Ok(Err(CallError::Protocol(message))) => ToolOutcome::error(message),
            Ok(Err(CallError::Disconnected(message))) => {
                tracing::warn!(server = %spec.name, %message, "MCP server disconnected during a call");
                let sentence = match spec.transport {
                    Transport::Stdio { .. } => format!(
                        "the tool server \"{}\" stopped during the call ({message}). It will be started again on the next call.",
                        spec.name
                    ),
                    // rmcp's HTTP client also ends the connection on an
                    // answer over its size limit, the likelier cause.
                    Transport::Http { .. } => format!(
                        "the connection to the tool server \"{}\" ended during the call ({message}); an answer larger than {} MiB (MCP_MAX_MESSAGE_BYTES) ends it too, so if the tool returns a lot, ask for less. It will be connected again on the next call.",
                        spec.name,
                        self.limits.mcp_max_message_bytes / (1024 * 1024)
                    ),
                };
                ToolOutcome::error(sentence)
            }
            Err(_) => ToolOutcome::error(format!(
                "the tool did not finish within {} seconds and was cancelled.",
                timeout.as_secs()
            )),
        }
    }

    async fn close_conversation(&self, conversation: &str) {
        let mine: Vec<Slot> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            let keys: Vec<_> = slots
                .keys()
                .filter(|(_, o)| o == conversation)
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| slots.remove(k))
                .map(|e| e.slot)
                .collect()
        };
        join_all(mine.iter().map(close_slot)).await;
        self.routes
            .lock()
            .expect("routes poisoned")
            .remove(conversation);
    }
}
