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
use crate::conversation::{Hold, Notices, ToolHost, ToolList, ToolOutcome, ToolProgress, ToolSpec};
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
    step: Step,
    problem: String,
}

/// What a server failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Starting: the process, the connection or `initialize`.
    Start,
    /// Listing its tools.
    List,
}

/// Why a server's tools cannot be used now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// It failed to start or to list its tools, and is not tried again
    /// before `retry_in`.
    #[error("{problem}; it will be tried again in {}", seconds(*retry_in))]
    Failed {
        step: Step,
        problem: String,
        retry_in: Duration,
    },
    /// Every session it may have is in use by other conversations.
    #[error(
        "all {cap} of its sessions stayed in use by other conversations for {} (MCP_MAX_SESSIONS_PER_SERVER, MCP_SESSION_WAIT_SECS); try again in a moment",
        seconds(*waited)
    )]
    Busy { cap: usize, waited: Duration },
}

/// A server whose tools are left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The tool server \"{server}\" is unavailable ({why}); its tools are left out.")]
pub struct ServerProblem {
    pub server: String,
    pub why: Unavailable,
}

/// A session slot: (server index, owner). The async mutex serialises
/// starting and restarting; calls clone the `Arc<Session>` and run freely.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Session>>>>;

/// After this long waiting for a free session, the turn says so.
const SESSION_WAIT_NOTICE: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct SlotEntry {
    slot: Slot,
    last_used: Instant,
    /// One clone per turn using the session (see [`Lease`]); a session is
    /// closed for someone else only when no clone is out.
    users: Arc<()>,
    /// The slot's place under its server's cap (per-conversation sessions),
    /// held until the entry is dropped.
    _place: Option<Place>,
}

impl SlotEntry {
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.users) > 1
    }
}

/// A place under a server's session cap. It is given back when the entry
/// holding it is dropped, which is after its session has closed: a process
/// still shutting down counts.
#[derive(Debug)]
struct Place {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for Place {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.freed.notify_waiters();
    }
}

/// A turn's use of one session: while it is held, the session is not
/// closed to make room for another conversation.
#[derive(Debug)]
struct Lease {
    users: Option<Arc<()>>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.users.take());
        self.freed.notify_waiters();
    }
}

/// The names offered to a conversation, and the turns still holding them.
#[derive(Debug)]
struct Routes {
    holders: Vec<std::sync::Weak<Vec<Lease>>>,
    names: Arc<HashMap<String, Route>>,
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
    /// Per server: its cap on per-conversation sessions, and what wakes
    /// turns waiting for a place (a session closed or no longer in use).
    caps: Vec<(Arc<tokio::sync::Semaphore>, Arc<tokio::sync::Notify>)>,
    /// Per conversation: the names last offered to the model, kept while a
    /// turn that got them holds its tools.
    routes: Mutex<HashMap<String, Routes>>,
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
    /// The servers that are unavailable, and why.
    pub problems: Vec<ServerProblem>,
    /// Per server: what was wrong with its tool list (tools changed or left out).
    pub warnings: Vec<(String, String)>,
    /// Per server: its instructions for using it, in the configured order.
    pub instructions: Vec<(String, String)>,
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
        let cap = limits.max_sessions_per_server.max(1);
        let caps = servers
            .iter()
            .map(|_| (Arc::new(tokio::sync::Semaphore::new(cap)), Arc::default()))
            .collect();
        McpHost {
            servers,
            limits,
            caps,
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
        self.list_holding(conversation, &(), &[]).await.0
    }

    /// [`McpHost::list`], and the leases that keep the listed sessions for
    /// the caller.
    async fn list_holding(
        &self,
        conversation: &str,
        notices: &dyn Notices,
        off: &[String],
    ) -> (Listing, Vec<Lease>) {
        let on: Vec<usize> = (0..self.servers.len())
            .filter(|&i| !off.contains(&self.servers[i].name))
            .collect();
        let per_server = join_all(
            on.iter()
                .map(|&i| self.server_tools(i, conversation, notices)),
        )
        .await;
        let mut leases = Vec::new();
        let mut found: Vec<(usize, RemoteTool)> = Vec::new();
        let mut listing = Listing::default();
        for (&i, result) in on.iter().zip(per_server) {
            let name = &self.servers[i].name;
            match result {
                Ok((tools, lease)) => {
                    leases.push(lease);
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
                    if let Some(text) = &tools.instructions {
                        listing.instructions.push((name.clone(), text.clone()));
                    }
                }
                Err(why) => listing.problems.push(ServerProblem {
                    server: name.clone(),
                    why,
                }),
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
        (listing, leases)
    }

    /// A server's tools. A failure to start or to list backs the server off.
    async fn server_tools(
        &self,
        server: usize,
        conversation: &str,
        notices: &dyn Notices,
    ) -> Result<(Arc<ServerTools>, Lease), Unavailable> {
        let (session, lease) = self.session(server, conversation, notices).await?;
        match session.tools(&self.limits).await {
            Ok(tools) => {
                // Only a listed server counts as working again: one that
                // starts but never lists keeps backing off further.
                self.failures
                    .lock()
                    .expect("failures poisoned")
                    .remove(&server);
                Ok((tools, lease))
            }
            Err(problem) => {
                // A server that cannot list its tools is no use; close it
                // so that the next try starts it afresh.
                session.close().await;
                Err(self.record_failure(server, Step::List, problem))
            }
        }
    }

    /// Remembers that `server` failed and says when it will be tried again.
    fn record_failure(&self, server: usize, step: Step, problem: String) -> Unavailable {
        let mut failures = self.failures.lock().expect("failures poisoned");
        let count = failures.get(&server).map_or(0, |f| f.failures) + 1;
        let wait = RETRY_MIN
            .saturating_mul(2u32.saturating_pow(count - 1))
            .min(self.limits.mcp_retry_max);
        let why = Unavailable::Failed {
            step,
            problem: problem.clone(),
            retry_in: wait,
        };
        tracing::warn!(server = %self.servers[server].name, failures = count, "MCP server unavailable: {why}");
        failures.insert(
            server,
            Failure {
                failures: count,
                retry_at: Instant::now() + wait,
                step,
                problem,
            },
        );
        why
    }

    /// Why `server` is not tried now, while it is backed off.
    fn backed_off(&self, server: usize) -> Option<Unavailable> {
        let failures = self.failures.lock().expect("failures poisoned");
        let failure = failures.get(&server)?;
        let left = failure.retry_at.checked_duration_since(Instant::now())?;
        Some(Unavailable::Failed {
            step: failure.step,
            problem: failure.problem.clone(),
            retry_in: left,
        })
    }

    /// The live session of `server` for `conversation`, started (or
    /// restarted after a crash) as needed, and a lease on it.
    async fn session(
        &self,
        server: usize,
        conversation: &str,
        notices: &dyn Notices,
    ) -> Result<(Arc<Session>, Lease), Unavailable> {
        let spec = &self.servers[server];
        let owner = match spec.scope {
            Scope::Shared => SHARED.to_owned(),
            Scope::Conversation => conversation.to_owned(),
        };
        let (slot, lease) = self.slot(server, owner, notices).await?;
        let mut guard = slot.lock().await;
        if let Some(session) = guard.as_ref() {
            if !session.is_closed() {
                return Ok((session.clone(), lease));
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
            .map_err(|problem| self.record_failure(server, Step::Start, problem))?;
        let session = Arc::new(session);
        tracing::info!(server = %spec.name, conversation, elapsed_ms = started.elapsed().as_millis() as u64, "MCP session started");
        *guard = Some(session.clone());
        Ok((session, lease))
    }

    /// Finds or makes the slot, marking it used, and leases it. A new
    /// per-conversation slot needs a place under the server's cap: when all
    /// are taken, the least recently used session nobody is using is closed
    /// to make one; when every session is in use, the turn waits (saying so
    /// after a few seconds) up to `MCP_SESSION_WAIT_SECS`.
    async fn slot(
        &self,
        server: usize,
        owner: String,
        notices: &dyn Notices,
    ) -> Result<(Slot, Lease), Unavailable> {
        let key = (server, owner);
        if let Some(found) = self.existing(&key) {
            return Ok(found);
        }
        let place = if key.1 == SHARED {
            None
        } else {
            Some(self.place(server, notices).await?)
        };
        let mut slots = self.slots.lock().expect("slots poisoned");
        // Another call of the same owner may have made it meanwhile; then
        // the place just taken is given back.
        let entry = slots.entry(key).or_insert_with(|| SlotEntry {
            slot: Slot::default(),
            last_used: Instant::now(),
            users: Arc::new(()),
            _place: place,
        });
        entry.last_used = Instant::now();
        let lease = self.lease(server, entry);
        Ok((entry.slot.clone(), lease))
    }

    fn existing(&self, key: &(usize, String)) -> Option<(Slot, Lease)> {
        let mut slots = self.slots.lock().expect("slots poisoned");
        let entry = slots.get_mut(key)?;
        entry.last_used = Instant::now();
        let lease = self.lease(key.0, entry);
        Some((entry.slot.clone(), lease))
    }

    fn lease(&self, server: usize, entry: &SlotEntry) -> Lease {
        Lease {
            users: Some(entry.users.clone()),
            freed: self.caps[server].1.clone(),
        }
    }

    /// A place under `server`'s cap for a new per-conversation session.
    async fn place(&self, server: usize, notices: &dyn Notices) -> Result<Place, Unavailable> {
        let (cap, freed) = &self.caps[server];
        let started = tokio::time::Instant::now();
        let deadline = started + self.limits.mcp_session_wait;
        let mut told = false;
        loop {
            // Registered before looking, so a place freed meanwhile wakes us.
            let woken = freed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Ok(permit) = cap.clone().try_acquire_owned() {
                return Ok(Place {
                    permit: Some(permit),
                    freed: freed.clone(),
                });
            }
            if let Some((owner, entry)) = self.take_least_used_idle(server) {
                tracing::info!(server = %self.servers[server].name, conversation = %owner, "closing the least recently used MCP session to make room");
                close_entry(entry).await;
                continue;
            }
            let notice_at = started + SESSION_WAIT_NOTICE;
            let until = if told {
                deadline
            } else {
                notice_at.min(deadline)
            };
            if tokio::time::timeout_at(until, woken).await.is_ok() {
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Unavailable::Busy {
                    cap: self.limits.max_sessions_per_server,
                    waited: self.limits.mcp_session_wait,
                });
            }
            if !told {
                told = true;
                notices.notice(format!(
                    "All {} sessions of the tool server \"{}\" are in use by other conversations; waiting for one to become free (at most {}).",
                    self.limits.max_sessions_per_server,
                    self.servers[server].name,
                    seconds(self.limits.mcp_session_wait)
                ));
            }
        }
    }

    /// Removes the least recently used per-conversation entry of `server`
    /// that no turn is using.
    fn take_least_used_idle(&self, server: usize) -> Option<(String, SlotEntry)> {
        let mut slots = self.slots.lock().expect("slots poisoned");
        let oldest = slots
            .iter()
            .filter(|((s, o), e)| *s == server && o != SHARED && !e.in_use())
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())?;
        slots.remove(&oldest).map(|e| (oldest.1, e))
    }

    /// Closes sessions unused for longer than the idle timeout.
    pub async fn close_idle(&self) {
        let idle = self.limits.session_idle_timeout;
        let expired: Vec<SlotEntry> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            let keys: Vec<_> = slots
                .iter()
                .filter(|(_, e)| e.last_used.elapsed() >= idle && !e.in_use())
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| slots.remove(k)).collect()
        };
        join_all(expired.into_iter().map(close_entry)).await;
    }

    /// How often [`McpHost::close_idle`] should run.
    pub fn idle_check_interval(&self) -> Duration {
        (self.limits.session_idle_timeout / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Closes every session and waits for the stderr forwarders to end.
    pub async fn shutdown(&self) {
        let all: Vec<SlotEntry> = self
            .slots
            .lock()
            .expect("slots poisoned")
            .drain()
            .map(|(_, e)| e)
            .collect();
        join_all(all.into_iter().map(close_entry)).await;
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

/// Closes an entry's session, then gives back its place under the cap.
async fn close_entry(entry: SlotEntry) {
    if let Some(session) = entry.slot.lock().await.take() {
        session.close().await;
    }
    drop(entry);
}

#[async_trait]
impl ToolHost for McpHost {
    async fn tools(&self, conversation: &str) -> ToolList {
        self.tools_for_turn(conversation, &(), &[]).await
    }

    async fn servers(&self, _conversation: &str) -> Vec<String> {
        self.servers.iter().map(|s| s.name.clone()).collect()
    }

    async fn close_server(&self, conversation: &str, server: &str) {
        let Some(index) = self.servers.iter().position(|s| s.name == server) else {
            return;
        };
        let entries: Vec<SlotEntry> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            let keys: Vec<_> = slots
                .keys()
                .filter(|(s, o)| *s == index && o == conversation)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| slots.remove(k)).collect()
        };
        join_all(entries.into_iter().map(close_entry)).await;
    }

    async fn tools_for_turn(
        &self,
        conversation: &str,
        notices: &dyn Notices,
        off: &[String],
    ) -> ToolList {
        let (
            Listing {
                tools: mut listed,
                problems,
                instructions,
                ..
            },
            leases,
        ) = self.list_holding(conversation, notices, off).await;
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
        let hold = Arc::new(leases);
        let mut all = self.routes.lock().expect("routes poisoned");
        // Names nobody holds any more are forgotten, so the map stays as
        // large as the turns running now.
        all.retain(|_, r| {
            r.holders.retain(|h| h.strong_count() > 0);
            !r.holders.is_empty()
        });
        let entry = all
            .entry(conversation.to_owned())
            .or_insert_with(|| Routes {
                holders: Vec::new(),
                names: Arc::default(),
            });
        entry.holders.push(Arc::downgrade(&hold));
        entry.names = Arc::new(routes);
        ToolList {
            specs,
            problems: problems.iter().map(ToString::to_string).collect(),
            instructions,
            hold: Hold::new(hold),
        }
    }

    async fn call(&self, conversation: &str, name: &str, arguments: Value) -> ToolOutcome {
        self.call_reporting(conversation, name, arguments, &())
            .await
    }

    async fn call_reporting(
        &self,
        conversation: &str,
        name: &str,
        arguments: Value,
        progress: &dyn ToolProgress,
    ) -> ToolOutcome {
        let routes = self
            .routes
            .lock()
            .expect("routes poisoned")
            .get(conversation)
            .map(|r| r.names.clone());
        let Some(route) = routes.as_ref().and_then(|r| r.get(name)).cloned() else {
            let known: Vec<&str> = routes
                .iter()
                .flat_map(|r| r.keys())
                .map(String::as_str)
                .collect();
            return ToolOutcome::no_such_tool(name, &known);
        };
        let spec = &self.servers[route.server];
        let timeout = spec.timeout.unwrap_or(self.limits.tool_timeout);
        // The lease keeps the session for the call, also for callers that
        // do not hold their tool list.
        let (session, _lease) = match self.session(route.server, conversation, &()).await {
            Ok(found) => found,
            Err(problem) => {
                return ToolOutcome::error(format!(
                    "the tool server \"{}\" is unavailable: {problem}",
                    spec.name
                ));
            }
        };
        let most = timeout.max(self.limits.tool_max);
        let watched = Watched {
            inner: progress,
            last: std::sync::Mutex::new(None),
        };
        let call = session.call(&route.tool, arguments, &watched);
        match within(timeout, most, &watched, call).await {
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
            Err(Late::Silent) => ToolOutcome::error(format!(
                "the tool did not finish within {} seconds and was cancelled.",
                timeout.as_secs()
            )),
            Err(Late::PastMost) => ToolOutcome::error(format!(
                "the tool kept reporting progress but did not finish within {} seconds (TOOL_MAX_SECS), and was cancelled.",
                most.as_secs()
            )),
        }
    }

    async fn close_conversation(&self, conversation: &str) {
        let mine: Vec<SlotEntry> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            let keys: Vec<_> = slots
                .keys()
                .filter(|(_, o)| o == conversation)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| slots.remove(k)).collect()
        };
        join_all(mine.into_iter().map(close_entry)).await;
        self.routes
            .lock()
            .expect("routes poisoned")
            .remove(conversation);
    }
}

/// Passes progress on and notes when it last came.
struct Watched<'a> {
    inner: &'a dyn ToolProgress,
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl ToolProgress for Watched<'_> {
    fn progress(&self, progress: f64, total: Option<f64>, message: Option<String>) {
        *self.last.lock().expect("progress time poisoned") = Some(tokio::time::Instant::now());
        self.inner.progress(progress, total, message);
    }
}

/// Why a call was given up.
#[derive(Debug, PartialEq)]
enum Late {
    /// No answer and no progress for the whole timeout.
    Silent,
    /// Progress went on, but past the most a call may take.
    PastMost,
}

/// Runs `call` for `timeout`, and for `timeout` more after each progress
/// report, but never past `most` from the start.
async fn within<T>(
    timeout: Duration,
    most: Duration,
    watched: &Watched<'_>,
    call: impl std::future::Future<Output = T>,
) -> Result<T, Late> {
    let start = tokio::time::Instant::now();
    let end = start + most;
    tokio::pin!(call);
    let mut deadline = start + timeout;
    loop {
        tokio::select! {
            done = &mut call => return Ok(done),
            () = tokio::time::sleep_until(deadline) => {
                let last = *watched.last.lock().expect("progress time poisoned");
                let next = last.map_or(deadline, |at| (at + timeout).min(end));
                if next <= tokio::time::Instant::now() {
                    return Err(if last.is_some() && next >= end { Late::PastMost } else { Late::Silent });
                }
                deadline = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that reports progress every half second `reports` times, then
    /// answers after `then` more.
    async fn reporting(watched: &Watched<'_>, reports: u32, then: Duration) -> &'static str {
        for i in 0..reports {
            tokio::time::sleep(Duration::from_millis(500)).await;
            watched.progress(f64::from(i), None, None);
        }
        tokio::time::sleep(then).await;
        "done"
    }

    fn watched() -> Watched<'static> {
        Watched {
            inner: &(),
            last: std::sync::Mutex::new(None),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_gives_a_call_its_timeout_again_up_to_the_most() {
        let (timeout, most) = (Duration::from_secs(1), Duration::from_secs(10));
        let w = watched();
        // Six seconds of progress, then the answer: well past one timeout.
        let call = reporting(&w, 12, Duration::from_millis(900));
        assert_eq!(within(timeout, most, &w, call).await, Ok("done"));
        // Silent for longer than the timeout.
        let w = watched();
        let call = reporting(&w, 0, Duration::from_secs(2));
        assert_eq!(within(timeout, most, &w, call).await, Err(Late::Silent));
        // Progress, then silence.
        let w = watched();
        let call = reporting(&w, 3, Duration::from_secs(5));
        assert_eq!(within(timeout, most, &w, call).await, Err(Late::Silent));
        // Progress for ever: cut at the most.
        let w = watched();
        let started = tokio::time::Instant::now();
        let call = reporting(&w, u32::MAX, Duration::ZERO);
        assert_eq!(within(timeout, most, &w, call).await, Err(Late::PastMost));
        assert_eq!(started.elapsed(), most);
    }
}
