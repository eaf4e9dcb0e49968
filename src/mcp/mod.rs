//! The MCP host: configured servers, their sessions, and the tools the model
//! sees.
//!
//! Sessions start lazily when a turn needs them. A `conversation`-scoped
//! server gets one session per conversation (capped per server, least
//! recently used closed first, idle ones closed by [`McpHost::close_idle`]);
//! a `shared` one gets one session for everyone. A session that crashed is
//! started again on its next use; one that fails to start is tried again
//! only after a growing pause (at most `MCP_RETRY_MAX_SECS`).
//!
//! [`McpHost::reload`] applies a new servers file: unchanged servers keep
//! their sessions, changed ones get new sessions while turns that already
//! listed the old ones finish on them, and removed ones are closed once no
//! turn uses them.

pub mod config;
mod elicit;
pub mod naming;
pub mod oauth;
pub mod result;
pub mod schema;
mod session;
pub mod stdio;
pub mod tasks;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Limits, Redactor, Secret};
use crate::conversation::offers::{PromptInfo, ResourceContent, ResourceInfo};
use crate::conversation::{
    CallContext, Hold, Notices, TaskPoll, TaskStep, TaskTicket, ToolHost, ToolList, ToolOutcome,
    ToolSpec,
};
pub use config::{Approval, InheritEnv, OAuth, Scope, ServerSpec, Transport};
use session::{CallError, Session};
pub use session::{MAX_LIST_PAGES, RemoteTool, ServerTools, shorten_list};
use tasks::State as TaskState;

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
    /// A reload of the servers file changed or removed it after this turn
    /// listed its tools.
    #[error(
        "the MCP file was reloaded and this server changed or was removed since the turn began; ask again to use it as it is now"
    )]
    Reloaded,
}

/// A server whose tools are left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The tool server \"{server}\" is unavailable ({why}); its tools are left out.")]
pub struct ServerProblem {
    pub server: String,
    pub why: Unavailable,
}

/// A session slot: (server id, owner). The async mutex serialises
/// starting and restarting; calls clone the `Arc<Session>` and run freely.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Session>>>>;

/// A configured server as the host runs it. A reload makes a new one for a
/// changed server; turns that listed the old one finish on it.
#[derive(Debug)]
struct Server {
    /// Unique for the host's life: slots and failures are keyed by it.
    id: u64,
    spec: ServerSpec,
    /// Its cap on per-conversation sessions.
    cap: Arc<tokio::sync::Semaphore>,
    /// Wakes turns waiting for a place (a session closed or no longer in
    /// use), and the closing of a retired server's sessions.
    freed: Arc<tokio::sync::Notify>,
    /// Set when a reload changed or removed it: no new session starts.
    retired: AtomicBool,
    /// The revision its last session found it speaks.
    era: Mutex<session::Era>,
}

/// How long a suggestion for an argument may take (people are typing).
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Where an exposed tool name leads: the server as it was when the turn
/// listed it.
#[derive(Debug, Clone)]
struct Route {
    server: Arc<Server>,
    tool: String,
}

/// The servers in force, in the file's order.
type Servers = Arc<Vec<Arc<Server>>>;

/// The MCP side of mcpcord.
#[derive(Debug)]
pub struct McpHost {
    servers: RwLock<Servers>,
    /// The next [`Server::id`].
    next_id: AtomicU64,
    limits: Limits,
    slots: Mutex<HashMap<(u64, String), SlotEntry>>,
    /// Per conversation: the names last offered to the model, kept while a
    /// turn that got them holds its tools.
    routes: Mutex<HashMap<String, Routes>>,
    /// Tasks that filter server stdout and forward stderr to the log, and
    /// that close retired servers' sessions.
    tasks: TaskTracker,
    /// Cancelled at shutdown.
    stopping: CancellationToken,
    /// Secret values blanked out of server stderr before it is logged:
    /// mcpcord's own and those of the servers in force.
    redactor: RwLock<Redactor>,
    own_secrets: Vec<Secret>,
    /// Per server id: its last failure to start, while it is backed off.
    failures: Mutex<HashMap<u64, Failure>>,
    /// Where OAuth servers' tokens are kept.
    vault: Option<Arc<dyn oauth::TokenVault>>,
}

/// What a reload of the servers file changed, by server name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    /// Restarted: new sessions use the new entry; turns already running
    /// finish on the old one.
    pub changed: Vec<String>,
    /// Closed once no running turn uses them.
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl fmt::Display for Reloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut part = |names: &[String], what: &str| {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        };
        part(&self.added, "added");
        part(&self.changed, "restarted");
        part(&self.removed, "removed");
        if parts.is_empty() {
            return write!(
                f,
                "The MCP file was read again; nothing changed ({} server(s)).",
                self.unchanged.len()
            );
        }
        write!(f, "The MCP file was reloaded: {}", parts.join("; "))?;
        if !self.unchanged.is_empty() {
            write!(f, "; {} unchanged", self.unchanged.len())?;
        }
        if !self.changed.is_empty() || !self.removed.is_empty() {
            write!(f, ". Answers being written now finish with the old servers")?;
        }
        write!(f, ".")
    }
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

/// The servers file a host was built from, read again on a reload.
#[derive(Debug, Clone)]
pub struct McpFile {
    pub path: std::path::PathBuf,
    pub host: Arc<McpHost>,
}

impl McpFile {
    /// Reads the file again and puts it in force (see [`McpHost::reload`]).
    /// A file that cannot be read or is not valid changes nothing. Its
    /// `${VAR}`s are filled from the environment mcpcord started with.
    pub fn reload(&self) -> Result<Reloaded, config::McpConfigError> {
        // Missing is an error now, also when no file was named: the bot
        // started without it, and "no servers" would close them all.
        let specs = config::load(&self.path, true, &|name| std::env::var(name).ok()).inspect_err(
            |error| {
                tracing::warn!(
                    "the MCP file was not reloaded; the servers in use stay as they were: {error}"
                );
            },
        )?;
        Ok(self.host.reload(specs))
    }
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
        let host = McpHost {
            servers: RwLock::default(),
            next_id: AtomicU64::new(0),
            limits,
            slots: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            redactor: RwLock::default(),
            own_secrets: Vec::new(),
            failures: Mutex::new(HashMap::new()),
            vault: None,
        };
        let servers = servers.into_iter().map(|s| host.server(s)).collect();
        *host.servers.write().expect("servers poisoned") = Arc::new(servers);
        host.update_redactor();
        host
    }

    /// Keeps OAuth servers' tokens in `vault`.
    pub fn with_vault(mut self, vault: Arc<dyn oauth::TokenVault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// Also redacts `secrets` (mcpcord's own) from server stderr.
    pub fn redacting<'a>(mut self, secrets: impl IntoIterator<Item = &'a Secret>) -> Self {
        self.own_secrets = secrets.into_iter().cloned().collect();
        self.update_redactor();
        self
    }

    /// A server for `spec` with an id of its own.
    fn server(&self, spec: ServerSpec) -> Arc<Server> {
        let cap = self.limits.max_sessions_per_server.max(1);
        Arc::new(Server {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            spec,
            cap: Arc::new(tokio::sync::Semaphore::new(cap)),
            freed: Arc::default(),
            retired: AtomicBool::new(false),
            era: Mutex::default(),
        })
    }

    fn update_redactor(&self) {
        let servers = self.current();
        let specs = servers.iter().map(|s| &s.spec);
        let all = server_secrets(specs).chain(&self.own_secrets);
        *self.redactor.write().expect("redactor poisoned") = Redactor::new(all.map(Secret::expose));
    }

    /// The servers in force now.
    fn current(&self) -> Servers {
        self.servers.read().expect("servers poisoned").clone()
    }

    /// The configured servers, in the file's order.
    pub fn servers(&self) -> Vec<ServerSpec> {
        self.current().iter().map(|s| s.spec.clone()).collect()
    }

    /// Puts `specs` in force. A server whose entry is unchanged keeps its
    /// sessions. A changed or removed one is retired: turns that listed its
    /// tools finish on it, no new session of it starts, and its sessions are
    /// closed as soon as no turn uses them.
    pub fn reload(self: &Arc<Self>, specs: Vec<ServerSpec>) -> Reloaded {
        let mut report = Reloaded::default();
        let retired: Vec<Arc<Server>> = {
            let mut servers = self.servers.write().expect("servers poisoned");
            let old = servers.clone();
            let next: Vec<Arc<Server>> = specs
                .into_iter()
                .map(|spec| {
                    let name = spec.name.clone();
                    match old.iter().find(|s| s.spec.name == spec.name) {
                        Some(same) if same.spec == spec => {
                            report.unchanged.push(name);
                            same.clone()
                        }
                        Some(_) => {
                            report.changed.push(name);
                            self.server(spec)
                        }
                        None => {
                            report.added.push(name);
                            self.server(spec)
                        }
                    }
                })
                .collect();
            let retired: Vec<Arc<Server>> = old
                .iter()
                .filter(|s| !next.iter().any(|n| Arc::ptr_eq(n, s)))
                .cloned()
                .collect();
            report.removed = retired
                .iter()
                .filter(|s| !next.iter().any(|n| n.spec.name == s.spec.name))
                .map(|s| s.spec.name.clone())
                .collect();
            *servers = Arc::new(next);
            retired
        };
        self.update_redactor();
        let mut failures = self.failures.lock().expect("failures poisoned");
        for server in retired {
            server.retired.store(true, Ordering::Release);
            failures.remove(&server.id);
            let host = self.clone();
            self.tasks
                .spawn(async move { host.close_when_free(&server).await });
        }
        tracing::info!(
            added = ?report.added,
            restarted = ?report.changed,
            removed = ?report.removed,
            unchanged = report.unchanged.len(),
            "MCP file reloaded"
        );
        report
    }

    /// Closes `server`'s sessions as the turns using them end.
    async fn close_when_free(&self, server: &Server) {
        loop {
            // Registered before looking, so a lease given back meanwhile
            // wakes us.
            let woken = server.freed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let (free, left) = {
                let mut slots = self.slots.lock().expect("slots poisoned");
                let keys: Vec<_> = slots
                    .iter()
                    .filter(|((id, _), _)| *id == server.id)
                    .map(|(k, e)| (k.clone(), e.in_use()))
                    .collect();
                let left = keys.iter().filter(|(_, used)| *used).count();
                let free: Vec<SlotEntry> = keys
                    .iter()
                    .filter(|(_, used)| !used)
                    .filter_map(|(k, _)| slots.remove(k))
                    .collect();
                (free, left)
            };
            if !free.is_empty() {
                tracing::info!(server = %server.spec.name, sessions = free.len(), "closing the sessions of a server the MCP file changed or removed");
            }
            join_all(free.into_iter().map(close_entry)).await;
            if left == 0 {
                return;
            }
            tokio::select! {
                () = woken => {}
                () = self.stopping.cancelled() => return,
            }
        }
    }

    /// How many sessions are open now (for tests and reports).
    pub fn open_sessions(&self) -> usize {
        self.slots.lock().expect("slots poisoned").len()
    }

    /// The tools `conversation` may use, with the names the model sees,
    /// one sentence per server that failed, and what was wrong with the
    /// lists of the others.
    pub async fn list(&self, conversation: &str) -> Listing {
        self.list_holding(&self.current(), conversation, &(), &[])
            .await
            .0
    }

    /// [`McpHost::list`] over `servers`, and the leases that keep the
    /// listed sessions for the caller.
    async fn list_holding(
        &self,
        servers: &[Arc<Server>],
        conversation: &str,
        notices: &dyn Notices,
        off: &[String],
    ) -> (Listing, Vec<Lease>) {
        let on: Vec<&Arc<Server>> = servers
            .iter()
            .filter(|s| !off.contains(&s.spec.name))
            .collect();
        let per_server = join_all(
            on.iter()
                .map(|s| self.server_tools(s, conversation, notices)),
        )
        .await;
        let mut leases = Vec::new();
        let mut found: Vec<(&Arc<Server>, RemoteTool)> = Vec::new();
        let mut listing = Listing::default();
        for (&server, result) in on.iter().zip(per_server) {
            let name = &server.spec.name;
            match result {
                Ok((tools, lease)) => {
                    leases.push(lease);
                    found.extend(
                        tools
                            .tools
                            .iter()
                            .filter(|t| server.spec.permits(&t.name))
                            .map(|t| (server, t.clone())),
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
            .map(|(s, t)| (s.spec.name.as_str(), t.name.as_str()))
            .collect();
        let names = naming::exposed_names(&pairs);
        listing.tools = found
            .into_iter()
            .zip(names)
            .map(|((server, tool), exposed)| ListedTool {
                exposed,
                server: server.spec.name.clone(),
                tool,
            })
            .collect();
        (listing, leases)
    }

    /// A server's tools. A failure to start or to list backs the server off.
    async fn server_tools(
        &self,
        server: &Arc<Server>,
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
                    .remove(&server.id);
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
    fn record_failure(&self, server: &Server, step: Step, problem: String) -> Unavailable {
        let mut failures = self.failures.lock().expect("failures poisoned");
        let count = failures.get(&server.id).map_or(0, |f| f.failures) + 1;
        let wait = RETRY_MIN
            .saturating_mul(2u32.saturating_pow(count - 1))
            .min(self.limits.mcp_retry_max);
        let why = Unavailable::Failed {
            step,
            problem: problem.clone(),
            retry_in: wait,
        };
        tracing::warn!(server = %server.spec.name, failures = count, "MCP server unavailable: {why}");
        if !server.retired.load(Ordering::Acquire) {
            failures.insert(
                server.id,
                Failure {
                    failures: count,
                    retry_at: Instant::now() + wait,
                    step,
                    problem,
                },
            );
        }
        why
    }

    /// Why `server` is not tried now, while it is backed off.
    fn backed_off(&self, server: &Server) -> Option<Unavailable> {
        let failures = self.failures.lock().expect("failures poisoned");
        let failure = failures.get(&server.id)?;
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
        server: &Arc<Server>,
        conversation: &str,
        notices: &dyn Notices,
    ) -> Result<(Arc<Session>, Lease), Unavailable> {
        let spec = &server.spec;
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
        let redactor = self.redactor.read().expect("redactor poisoned").clone();
        let era = *server.era.lock().expect("era poisoned");
        let started_as = Session::start(
            spec,
            &self.limits,
            &redactor,
            &self.tasks,
            era,
            self.vault.as_ref(),
        )
        .await;
        // A server that changed revision is probed again next time.
        *server.era.lock().expect("era poisoned") = started_as
            .as_ref()
            .map_or(session::Era::Unknown, Session::era);
        let session = Arc::new(
            started_as.map_err(|problem| self.record_failure(server, Step::Start, problem))?,
        );
        tracing::info!(server = %spec.name, conversation, elapsed_ms = started.elapsed().as_millis() as u64, "MCP session started");
        *guard = Some(session.clone());
        Ok((session, lease))
    }

    /// Finds or makes the slot, marking it used, and leases it. A new
    /// per-conversation slot needs a place under the server's cap: when all
    /// are taken, the least recently used session nobody is using is closed
    /// to make one; when every session is in use, the turn waits (saying so
    /// after a few seconds) up to `MCP_SESSION_WAIT_SECS`. A retired server
    /// gets no new slot.
    async fn slot(
        &self,
        server: &Arc<Server>,
        owner: String,
        notices: &dyn Notices,
    ) -> Result<(Slot, Lease), Unavailable> {
        let key = (server.id, owner);
        if let Some(found) = self.existing(server, &key) {
            return Ok(found);
        }
        let place = if key.1 == SHARED {
            None
        } else {
            Some(self.place(server, notices).await?)
        };
        let mut slots = self.slots.lock().expect("slots poisoned");
        // Checked under the lock the closing of retired sessions takes, so
        // no slot is made after they were closed.
        if server.retired.load(Ordering::Acquire) {
            return Err(Unavailable::Reloaded);
        }
        // Another call of the same owner may have made it meanwhile; then
        // the place just taken is given back.
        let entry = slots.entry(key).or_insert_with(|| SlotEntry {
            slot: Slot::default(),
            last_used: Instant::now(),
            users: Arc::new(()),
            _place: place,
        });
        entry.last_used = Instant::now();
        let lease = lease(server, entry);
        Ok((entry.slot.clone(), lease))
    }

    fn existing(&self, server: &Server, key: &(u64, String)) -> Option<(Slot, Lease)> {
        let mut slots = self.slots.lock().expect("slots poisoned");
        let entry = slots.get_mut(key)?;
        entry.last_used = Instant::now();
        let lease = lease(server, entry);
        Some((entry.slot.clone(), lease))
    }

    /// A place under `server`'s cap for a new per-conversation session.
    async fn place(&self, server: &Server, notices: &dyn Notices) -> Result<Place, Unavailable> {
        let (cap, freed) = (&server.cap, &server.freed);
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
            if server.retired.load(Ordering::Acquire) {
                return Err(Unavailable::Reloaded);
            }
            if let Some((owner, entry)) = self.take_least_used_idle(server.id) {
                tracing::info!(server = %server.spec.name, conversation = %owner, "closing the least recently used MCP session to make room");
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
                    server.spec.name,
                    seconds(self.limits.mcp_session_wait)
                ));
            }
        }
    }

    /// Removes the least recently used per-conversation entry of `server`
    /// that no turn is using.
    fn take_least_used_idle(&self, server: u64) -> Option<(String, SlotEntry)> {
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
        self.stopping.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

impl McpHost {
    /// Each server on in `conversation` with its prompts and resources,
    /// started as needed; one that fails is logged and left out.
    async fn lists(
        &self,
        conversation: &str,
        off: &[String],
    ) -> Vec<(String, Arc<session::Lists>)> {
        let servers = self.current();
        let on = servers.iter().filter(|s| !off.contains(&s.spec.name));
        let listed = join_all(on.map(|server| async move {
            let (session, _lease) = self.session(server, conversation, &()).await.ok()?;
            let offers = session.offers();
            if !offers.prompts && !offers.resources {
                return None;
            }
            match session.lists(&self.limits).await {
                Ok(lists) => Some((server.spec.name.clone(), lists)),
                Err(problem) => {
                    tracing::warn!(server = %server.spec.name, "{problem}");
                    None
                }
            }
        }))
        .await;
        listed.into_iter().flatten().collect()
    }

    /// `server`'s session in `conversation`, started as needed.
    async fn session_named(
        &self,
        conversation: &str,
        server: &str,
    ) -> Result<(Arc<Session>, Lease), String> {
        let servers = self.current();
        let found = servers
            .iter()
            .find(|s| s.spec.name == server)
            .ok_or_else(|| format!("there is no tool server \"{server}\""))?;
        self.session(found, conversation, &())
            .await
            .map_err(|why| format!("the tool server \"{server}\" is unavailable: {why}"))
    }

    /// Runs a request of `server` for `what` within the tool timeout
    /// (waiting for the person's answers does not count).
    async fn within_timeout<T>(
        &self,
        server: &str,
        context: &dyn CallContext,
        request: impl AsyncFnOnce(&Watched<'_>) -> Result<T, CallError>,
    ) -> Result<T, String> {
        let timeout = self
            .current()
            .iter()
            .find(|s| s.spec.name == server)
            .and_then(|s| s.spec.timeout)
            .unwrap_or(self.limits.tool_timeout);
        let watched = Watched::new(context);
        let most = timeout.max(self.limits.tool_max);
        match within(timeout, most, &watched, request(&watched)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(CallError::Protocol(message) | CallError::Disconnected(message))) => Err(
                format!("the tool server \"{server}\" could not do it: {message}"),
            ),
            Err(Late::Silent) => Err(format!(
                "the tool server \"{server}\" did not answer within {} seconds",
                timeout.as_secs()
            )),
            Err(Late::PastMost) => Err(format!(
                "the tool server \"{server}\" kept reporting progress but did not finish within {} seconds (TOOL_MAX_SECS)",
                most.as_secs()
            )),
        }
    }
}

/// The secret values in the servers' `env` and `headers`.
fn server_secrets<'a>(
    servers: impl Iterator<Item = &'a ServerSpec>,
) -> impl Iterator<Item = &'a Secret> {
    servers.flat_map(|s| match &s.transport {
        Transport::Stdio { env, .. } => env.values().collect::<Vec<_>>(),
        Transport::Http { headers, oauth, .. } => headers
            .values()
            .chain(oauth.iter().filter_map(|o| o.client_secret.as_ref()))
            .collect(),
    })
}

/// A turn's lease on `entry`, a session of `server`.
fn lease(server: &Server, entry: &SlotEntry) -> Lease {
    Lease {
        users: Some(entry.users.clone()),
        freed: server.freed.clone(),
    }
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
        self.current().iter().map(|s| s.spec.name.clone()).collect()
    }

    fn result_max_chars(&self) -> usize {
        self.limits.tool_result_max_chars
    }

    async fn prompts(&self, conversation: &str, off: &[String]) -> Vec<PromptInfo> {
        let lists = self.lists(conversation, off).await;
        lists
            .iter()
            .flat_map(|(server, lists)| {
                lists
                    .prompts
                    .iter()
                    .filter_map(|item| result::prompt_info(server, item))
            })
            .collect()
    }

    async fn get_prompt(
        &self,
        conversation: &str,
        server: &str,
        name: &str,
        arguments: serde_json::Map<String, Value>,
        context: &dyn CallContext,
    ) -> Result<String, String> {
        let (session, _lease) = self.session_named(conversation, server).await?;
        let result = self
            .within_timeout(server, context, async |watched| {
                session.get_prompt(name, arguments, watched).await
            })
            .await?;
        Ok(result::prompt_text(
            &result,
            self.limits.tool_result_max_chars,
        ))
    }

    async fn complete_argument(
        &self,
        conversation: &str,
        server: &str,
        prompt: &str,
        argument: &str,
        value: &str,
    ) -> Vec<String> {
        let Ok((session, _lease)) = self.session_named(conversation, server).await else {
            return Vec::new();
        };
        if !session.offers().completions {
            return Vec::new();
        }
        let reference = serde_json::json!({"type": "ref/prompt", "name": prompt});
        let others = serde_json::Map::new();
        let asked = session.complete(reference, argument, value, &others);
        match tokio::time::timeout(COMPLETION_TIMEOUT, asked).await {
            Ok(Ok(values)) => values,
            _ => Vec::new(),
        }
    }

    async fn resources(&self, conversation: &str, off: &[String]) -> Vec<ResourceInfo> {
        let lists = self.lists(conversation, off).await;
        lists
            .iter()
            .flat_map(|(server, lists)| {
                let plain = lists
                    .resources
                    .iter()
                    .filter_map(|item| result::resource_info(server, item, false));
                let templates = lists
                    .templates
                    .iter()
                    .filter_map(|item| result::resource_info(server, item, true));
                plain.chain(templates).collect::<Vec<_>>()
            })
            .collect()
    }

    async fn read_resource(
        &self,
        conversation: &str,
        server: &str,
        uri: &str,
    ) -> Result<Vec<ResourceContent>, String> {
        let (session, _lease) = self.session_named(conversation, server).await?;
        let result = self
            .within_timeout(server, &(), async |watched| {
                session.read_resource(uri, watched).await
            })
            .await?;
        Ok(result::resource_contents(&result))
    }

    async fn close_server(&self, conversation: &str, server: &str) {
        let servers = self.current();
        let Some(found) = servers.iter().find(|s| s.spec.name == server) else {
            return;
        };
        let entries: Vec<SlotEntry> = {
            let mut slots = self.slots.lock().expect("slots poisoned");
            let keys: Vec<_> = slots
                .keys()
                .filter(|(s, o)| *s == found.id && o == conversation)
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
        let servers = self.current();
        let (
            Listing {
                tools: mut listed,
                problems,
                instructions,
                ..
            },
            leases,
        ) = self
            .list_holding(&servers, conversation, notices, off)
            .await;
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
                let server = servers
                    .iter()
                    .find(|s| s.spec.name == t.server)
                    .expect("a listed tool's server is in the list");
                let needs_approval = match server.spec.approval {
                    Approval::Auto => false,
                    Approval::Ask => true,
                    Approval::Annotations => !t.tool.read_only,
                };
                routes.insert(
                    t.exposed.clone(),
                    Route {
                        server: server.clone(),
                        tool: t.tool.name.clone(),
                    },
                );
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
        progress: &dyn CallContext,
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
        let spec = &route.server.spec;
        let timeout = spec.timeout.unwrap_or(self.limits.tool_timeout);
        // The lease keeps the session for the call, also for callers that
        // do not hold their tool list.
        let (session, _lease) = match self.session(&route.server, conversation, &()).await {
            Ok(found) => found,
            Err(problem) => {
                return ToolOutcome::error(format!(
                    "the tool server \"{}\" is unavailable: {problem}",
                    spec.name
                ));
            }
        };
        let most = timeout.max(self.limits.tool_max);
        let watched = Watched::new(progress);
        let call = session.call(&route.tool, arguments, &watched);
        match within(timeout, most, &watched, call).await {
            Ok(Ok(result)) => match tasks::created(&result) {
                None => self.shaped(&result, spec),
                Some(created) => {
                    if let Some(message) = created.message {
                        progress.progress(0.0, None, Some(message));
                    }
                    let ticket = TaskTicket {
                        server: spec.name.clone(),
                        tool: name.to_owned(),
                        task_id: created.task_id,
                        legacy: created.legacy,
                        poll_ms: created.poll_ms,
                    };
                    self.wait_task(&session, spec, &route.tool, &ticket, progress, timeout)
                        .await
                }
            },
            Ok(Err(error)) => self.call_failed(spec, error),
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

    async fn poll_task(&self, conversation: &str, task: &TaskTicket) -> TaskPoll {
        let (session, _lease) = match self.session_named(conversation, &task.server).await {
            Ok(found) => found,
            Err(why) => return TaskPoll::Unreachable(why),
        };
        let Some(server) = self.find(&task.server) else {
            return TaskPoll::Unreachable(format!("there is no tool server \"{}\"", task.server));
        };
        let timeout = server.spec.timeout.unwrap_or(self.limits.tool_timeout);
        let asked = session.task_state(&task.tool, &task.task_id, task.legacy, &());
        match tokio::time::timeout(timeout, asked).await {
            Err(_) => TaskPoll::Unreachable(format!(
                "it did not answer within {} seconds",
                timeout.as_secs()
            )),
            Ok(Err(CallError::Disconnected(message))) => TaskPoll::Unreachable(message),
            Ok(Err(CallError::Protocol(message))) => TaskPoll::Done(ToolOutcome::error(format!(
                "the tool server \"{}\" could not say how the task {} ended: {message}",
                task.server, task.task_id
            ))),
            Ok(Ok(TaskState::Working { message, poll_ms })) => {
                TaskPoll::Working { message, poll_ms }
            }
            Ok(Ok(TaskState::InputRequired { message, .. })) => TaskPoll::Working {
                message,
                poll_ms: None,
            },
            Ok(Ok(ended)) => TaskPoll::Done(self.task_outcome(&server.spec, ended)),
        }
    }

    async fn cancel_task(&self, conversation: &str, task: &TaskTicket) -> Result<(), String> {
        let (session, _lease) = self.session_named(conversation, &task.server).await?;
        let timeout = self
            .find(&task.server)
            .and_then(|s| s.spec.timeout)
            .unwrap_or(self.limits.tool_timeout);
        match tokio::time::timeout(timeout, session.cancel_task(&task.task_id, task.legacy)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(CallError::Protocol(message) | CallError::Disconnected(message))) => {
                Err(format!(
                    "the tool server \"{}\" could not cancel it: {message}",
                    task.server
                ))
            }
            Err(_) => Err(format!(
                "the tool server \"{}\" did not answer within {} seconds",
                task.server,
                timeout.as_secs()
            )),
        }
    }
}

impl McpHost {
    /// A tool result as the model sees it; resource links it holds are
    /// read from `spec`'s server.
    fn shaped(&self, result: &Value, spec: &ServerSpec) -> ToolOutcome {
        let mut outcome = result::outcome(result, self.limits.tool_result_max_chars);
        for link in &mut outcome.links {
            link.server.clone_from(&spec.name);
        }
        outcome
    }

    /// The server in force named `name`.
    fn find(&self, name: &str) -> Option<Arc<Server>> {
        self.current().iter().find(|s| s.spec.name == name).cloned()
    }

    /// Waits for a call that became a task as long as the call itself
    /// would be waited for (the person's answers to its questions do not
    /// count); one that takes longer goes on in the background.
    async fn wait_task(
        &self,
        session: &Session,
        spec: &ServerSpec,
        tool: &str,
        ticket: &TaskTicket,
        context: &dyn CallContext,
        timeout: Duration,
    ) -> ToolOutcome {
        context.task(ticket, TaskStep::Started).await;
        let watched = Watched::new(context);
        let waiting = async {
            let mut poll_ms = ticket.poll_ms;
            loop {
                tokio::time::sleep(crate::conversation::tasks::poll_interval(poll_ms)).await;
                match session
                    .task_state(tool, &ticket.task_id, ticket.legacy, &watched)
                    .await?
                {
                    TaskState::Working {
                        message,
                        poll_ms: next,
                    } => {
                        poll_ms = next.or(poll_ms);
                        if message.is_some() {
                            watched.progress(0.0, None, message);
                        }
                    }
                    TaskState::InputRequired { message, .. } => {
                        if message.is_some() {
                            watched.progress(0.0, None, message);
                        }
                    }
                    ended => return Ok(ended),
                }
            }
        };
        match within(timeout, timeout, &watched, waiting).await {
            Ok(Ok(ended)) => {
                context.task(ticket, TaskStep::Finished).await;
                self.task_outcome(spec, ended)
            }
            Ok(Err(CallError::Disconnected(message)))
                if matches!(spec.transport, Transport::Http { .. }) =>
            {
                // The server may still have it: it is asked again later.
                tracing::warn!(server = %spec.name, task = %ticket.task_id, %message, "disconnected while waiting for a task");
                context.task(ticket, TaskStep::Detached).await;
                ToolOutcome::error(format!(
                    "the connection to the tool server \"{}\" ended while this call ran as its task {}. mcpcord asks it again later and adds the result to this conversation when it has it; tell the user so.",
                    spec.name, ticket.task_id
                ))
            }
            Ok(Err(error)) => {
                context.task(ticket, TaskStep::Finished).await;
                self.call_failed(spec, error)
            }
            Err(_) => {
                context.task(ticket, TaskStep::Detached).await;
                ToolOutcome {
                    content: format!(
                        "This call did not finish within {} seconds, so it goes on in the background as task {} of the tool server \"{}\". Its result will be added to this conversation as a new message when it is done; tell the user so, and do not call it again meanwhile.",
                        timeout.as_secs(),
                        ticket.task_id,
                        spec.name
                    ),
                    ..ToolOutcome::default()
                }
            }
        }
    }

    /// What a task that ended gives the model.
    fn task_outcome(&self, spec: &ServerSpec, ended: TaskState) -> ToolOutcome {
        match ended {
            TaskState::Completed {
                result: Some(result),
            } => self.shaped(&result, spec),
            TaskState::Completed { result: None } => ToolOutcome::error(format!(
                "the tool server \"{}\" finished the task without a result",
                spec.name
            )),
            TaskState::Failed { error } => ToolOutcome::error(format!(
                "the task failed on the tool server \"{}\": {error}",
                spec.name
            )),
            TaskState::Cancelled => ToolOutcome::error(format!(
                "the task was cancelled on the tool server \"{}\"",
                spec.name
            )),
            TaskState::Working { .. } | TaskState::InputRequired { .. } => ToolOutcome::error(
                format!("the tool server \"{}\" did not finish the task", spec.name),
            ),
        }
    }

    /// What a call that failed gives the model.
    fn call_failed(&self, spec: &ServerSpec, error: CallError) -> ToolOutcome {
        match error {
            CallError::Protocol(message) => ToolOutcome::error(message),
            CallError::Disconnected(message) => {
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
        }
    }
}

/// Passes progress and questions on, and notes when progress last came
/// and how long the person took to answer.
struct Watched<'a> {
    inner: &'a dyn CallContext,
    watch: std::sync::Mutex<Watch>,
}

#[derive(Debug, Default)]
struct Watch {
    /// When progress or an answer last came.
    last: Option<tokio::time::Instant>,
    /// Questions open now, and since when one has been.
    open: usize,
    since: Option<tokio::time::Instant>,
    /// Time spent waiting for the person, which no limit counts.
    paused: Duration,
}

impl<'a> Watched<'a> {
    fn new(inner: &'a dyn CallContext) -> Self {
        Watched {
            inner,
            watch: std::sync::Mutex::default(),
        }
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().expect("call watch poisoned")
    }
}

#[async_trait]
impl CallContext for Watched<'_> {
    fn progress(&self, progress: f64, total: Option<f64>, message: Option<String>) {
        self.watch().last = Some(tokio::time::Instant::now());
        self.inner.progress(progress, total, message);
    }

    async fn elicit(&self, question: crate::conversation::Question) -> crate::conversation::Answer {
        {
            let mut watch = self.watch();
            watch.open += 1;
            watch.since.get_or_insert_with(tokio::time::Instant::now);
        }
        let answer = self.inner.elicit(question).await;
        let mut watch = self.watch();
        let now = tokio::time::Instant::now();
        watch.open -= 1;
        if watch.open == 0
            && let Some(since) = watch.since.take()
        {
            watch.paused += now - since;
        }
        watch.last = Some(now);
        answer
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
/// report or answer, but never past `most` from the start. Time spent
/// waiting for the person to answer a question counts for neither.
async fn within<T>(
    timeout: Duration,
    most: Duration,
    watched: &Watched<'_>,
    call: impl std::future::Future<Output = T>,
) -> Result<T, Late> {
    let start = tokio::time::Instant::now();
    tokio::pin!(call);
    let mut deadline = start + timeout;
    loop {
        tokio::select! {
            done = &mut call => return Ok(done),
            () = tokio::time::sleep_until(deadline) => {
                let (last, open, paused) = {
                    let watch = watched.watch();
                    (watch.last, watch.open, watch.paused)
                };
                if open > 0 {
                    deadline = tokio::time::Instant::now() + timeout;
                    continue;
                }
                let end = start + most + paused;
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
        Watched::new(&())
    }

    /// A person who takes `0` to answer.
    struct Slow(Duration);

    #[async_trait]
    impl CallContext for Slow {
        fn progress(&self, _: f64, _: Option<f64>, _: Option<String>) {}
        async fn elicit(
            &self,
            _question: crate::conversation::Question,
        ) -> crate::conversation::Answer {
            tokio::time::sleep(self.0).await;
            crate::conversation::Answer::Decline
        }
    }

    fn question() -> crate::conversation::Question {
        crate::conversation::Question {
            server: "s".into(),
            tool: "t".into(),
            message: "m".into(),
            kind: crate::conversation::QuestionKind::Url("https://example.com/".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_answering_a_question_counts_for_no_limit() {
        let (timeout, most) = (Duration::from_secs(1), Duration::from_secs(10));
        let person = Slow(Duration::from_secs(60));
        let w = Watched::new(&person);
        let call = async {
            w.elicit(question()).await;
            tokio::time::sleep(Duration::from_millis(900)).await;
            "done"
        };
        assert_eq!(within(timeout, most, &w, call).await, Ok("done"));
        // The timeout starts again after the answer, and still applies.
        let w = Watched::new(&person);
        let call = async {
            w.elicit(question()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            "done"
        };
        assert_eq!(within(timeout, most, &w, call).await, Err(Late::Silent));
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
