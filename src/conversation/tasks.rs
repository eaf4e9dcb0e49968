//! Tool calls that their servers run as tasks (MCP tasks). A call that
//! becomes a task is kept in the store at once; the turn waits for it as
//! long as it would wait for the call. One that takes longer goes on in the
//! background: the model is told so, its server is asked at the interval it
//! gives, and when it is done its result is delivered into its conversation
//! as a new input of the person whose turn started it, so the model goes
//! on from there. Tasks kept from before a restart are followed again.
//!
//! A person can cancel a background task (`/tasks cancel`); stopping the
//! turn that waits for one cancels it too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::billing::unix_now;
use super::ports::{Store, StoreError, ToolHost, ToolOutcome};
use super::types::Author;

/// Polls of a background task, at most this often and at least this
/// rarely, whatever its server suggests.
const POLL_MIN: Duration = Duration::from_millis(500);
const POLL_MAX: Duration = Duration::from_secs(60);
/// When the server suggests no interval.
const POLL_DEFAULT: Duration = Duration::from_secs(2);
/// Polls in a row that may fail to reach the server (with growing pauses,
/// about 40 minutes in all) before the task is given up.
const MAX_UNREACHED: u32 = 12;
/// The pause before a result that could not be delivered is tried again.
const REDELIVER: Duration = Duration::from_secs(30);

/// A call its server runs as a task: enough to ask about it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTicket {
    pub server: String,
    /// The tool's exposed name (`server__tool`).
    pub tool: String,
    pub task_id: String,
    /// The experimental tasks of 2025-11-25 rather than the extension.
    pub legacy: bool,
    /// The interval the server suggested, in milliseconds.
    pub poll_ms: Option<u64>,
}

/// A kept task: its ticket, where it runs and who started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub conversation: String,
    pub ticket: TaskTicket,
    /// Who started the turn that made it (whose input its result becomes).
    pub author: Option<Author>,
    /// Unix seconds.
    pub started_at: i64,
    /// What the server last said about it.
    pub message: Option<String>,
}

/// Where a call that became a task is, as its host tells the turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStep {
    /// The server made a task of the call (it is kept now).
    Started,
    /// It finished while the turn waited (it is forgotten).
    Finished,
    /// It took longer than the turn waits: it goes on in the background.
    Detached,
}

/// One look at a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskPoll {
    Working {
        message: Option<String>,
        poll_ms: Option<u64>,
    },
    /// It ended: its result, or why there is none, for the model.
    Done(ToolOutcome),
    /// Its server could not be asked now; ask again later.
    Unreachable(String),
}

/// Where results of background tasks go: the surface shows one in its
/// conversation and queues it as an input.
#[async_trait]
pub trait TaskSink: Send + Sync {
    /// Delivers the outcome of `task`; an error (a sentence) means it was
    /// not kept, and it is tried again later.
    async fn deliver(&self, task: &TaskRecord, outcome: &ToolOutcome) -> Result<(), String>;
    /// Whether this surface (this process) shows `conversation`: others'
    /// tasks are left to their own surfaces and processes.
    async fn takes(&self, conversation: &str) -> bool {
        let _ = conversation;
        true
    }
}

/// The text of the input that brings a background task's result to the
/// model.
pub fn result_input(task: &TaskRecord, outcome: &ToolOutcome) -> String {
    let how = if outcome.is_error {
        "ended without a result"
    } else {
        "finished"
    };
    format!(
        "[The background task {} of the tool {} {how}. What it returned:]\n{}",
        task.ticket.task_id, task.ticket.tool, outcome.content
    )
}

/// A followed task, and what stops following it.
#[derive(Debug)]
struct Followed {
    record: TaskRecord,
    stop: CancellationToken,
    /// It ended and its outcome is being delivered: it no longer runs.
    ended: bool,
    /// A watcher follows it.
    spawned: bool,
}

/// The background tasks of every conversation.
pub struct BackgroundTasks {
    tools: Arc<dyn ToolHost>,
    store: Arc<dyn Store>,
    sink: tokio::sync::OnceCell<Arc<dyn TaskSink>>,
    followed: Mutex<HashMap<(String, String, String), Followed>>,
    workers: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for BackgroundTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundTasks").finish_non_exhaustive()
    }
}

/// A task is told apart by its conversation, server and id: servers with
/// a session per conversation may give out the same ids.
fn key(record: &TaskRecord) -> (String, String, String) {
    (
        record.conversation.clone(),
        record.ticket.server.clone(),
        record.ticket.task_id.clone(),
    )
}

impl BackgroundTasks {
    pub fn new(tools: Arc<dyn ToolHost>, store: Arc<dyn Store>) -> Self {
        BackgroundTasks {
            tools,
            store,
            sink: tokio::sync::OnceCell::new(),
            followed: Mutex::new(HashMap::new()),
            workers: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Starts delivering results to `sink`, and follows the tasks kept from
    /// before (a restart) and those detached meanwhile. Returns how many
    /// are followed. When the store cannot be read, those detached
    /// meanwhile are still followed.
    pub async fn start(self: &Arc<Self>, sink: Arc<dyn TaskSink>) -> Result<usize, StoreError> {
        if self.sink.set(sink.clone()).is_err() {
            return Ok(self.count());
        }
        let stored = self.store.tasks().await;
        if let Ok(records) = &stored {
            let mut taken = Vec::new();
            for record in records {
                if sink.takes(&record.conversation).await {
                    taken.push(record);
                }
            }
            let mut followed = self.followed.lock().expect("tasks poisoned");
            for record in taken {
                followed.entry(key(record)).or_insert_with(|| Followed {
                    record: record.clone(),
                    stop: self.stop.child_token(),
                    ended: false,
                    spawned: false,
                });
            }
        }
        let all: Vec<TaskRecord> = self
            .followed
            .lock()
            .expect("tasks poisoned")
            .values()
            .map(|f| f.record.clone())
            .collect();
        for record in all {
            self.spawn(record, Duration::ZERO);
        }
        stored.map(|_| self.count())
    }

    fn count(&self) -> usize {
        self.followed.lock().expect("tasks poisoned").len()
    }

    /// Follows `record` in the background (a task its turn stopped waiting
    /// for).
    pub fn follow(self: &Arc<Self>, record: TaskRecord) {
        let wait = poll_interval(record.ticket.poll_ms);
        let previous = self.followed.lock().expect("tasks poisoned").insert(
            key(&record),
            Followed {
                record: record.clone(),
                stop: self.stop.child_token(),
                ended: false,
                spawned: false,
            },
        );
        if let Some(previous) = previous {
            previous.stop.cancel();
        }
        if self.sink.initialized() {
            self.spawn(record, wait);
        }
    }

    /// Starts the watcher of `record`, once.
    fn spawn(self: &Arc<Self>, record: TaskRecord, wait: Duration) {
        let stop = {
            let mut followed = self.followed.lock().expect("tasks poisoned");
            match followed.get_mut(&key(&record)) {
                Some(entry) if !entry.spawned => {
                    entry.spawned = true;
                    entry.stop.clone()
                }
                _ => return,
            }
        };
        let this = self.clone();
        self.workers.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = this.watch(record, wait) => {}
            }
        });
    }

    /// The background tasks of `conversation`, oldest first.
    pub fn running(&self, conversation: &str) -> Vec<TaskRecord> {
        let mut found: Vec<TaskRecord> = self
            .followed
            .lock()
            .expect("tasks poisoned")
            .values()
            .filter(|f| f.record.conversation == conversation && !f.ended)
            .map(|f| f.record.clone())
            .collect();
        found.sort_by(|a, b| {
            (a.started_at, &a.ticket.task_id).cmp(&(b.started_at, &b.ticket.task_id))
        });
        found
    }

    /// The background task `task_id` of `conversation`, or the one whose
    /// id starts so when that is unique (with an empty id: the only one).
    /// The error is a sentence.
    pub fn find(&self, conversation: &str, task_id: &str) -> Result<TaskRecord, String> {
        let running = self.running(conversation);
        Ok(match running.iter().find(|r| r.ticket.task_id == task_id) {
            Some(exact) => exact.clone(),
            None => {
                let prefixed: Vec<&TaskRecord> = running
                    .iter()
                    .filter(|r| r.ticket.task_id.starts_with(task_id))
                    .collect();
                match prefixed.as_slice() {
                    [one] => (*one).clone(),
                    [] if running.is_empty() => {
                        return Err("no background task runs in this conversation".into());
                    }
                    [] => {
                        let ids: Vec<&str> =
                            running.iter().map(|r| r.ticket.task_id.as_str()).collect();
                        return Err(format!(
                            "there is no background task {task_id} here; running: {}",
                            ids.join(", ")
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "several background tasks run here; say which (one of: {})",
                            prefixed
                                .iter()
                                .map(|r| r.ticket.task_id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
            }
        })
    }

    /// Cancels a background task: its server is asked to stop it, and it
    /// is forgotten whatever the server said. The error is a sentence.
    pub async fn cancel(&self, record: &TaskRecord) -> Result<(), String> {
        let conversation = record.conversation.as_str();
        let removed = self
            .followed
            .lock()
            .expect("tasks poisoned")
            .remove(&key(record));
        if let Some(followed) = removed {
            followed.stop.cancel();
        }
        let asked = self.tools.cancel_task(conversation, &record.ticket).await;
        self.store
            .drop_task(&record.conversation, &record.ticket)
            .await
            .map_err(|e| format!("the task was cancelled, but {e}"))?;
        if let Err(problem) = asked {
            tracing::warn!(server = %record.ticket.server, task = %record.ticket.task_id, %problem, "the server was not told that a task was cancelled");
        }
        tracing::info!(conversation, server = %record.ticket.server, task = %record.ticket.task_id, "background task cancelled");
        Ok(())
    }

    /// Stops following tasks; they stay kept, and are followed again after
    /// the next start.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.workers.close();
        self.workers.wait().await;
    }

    /// Asks about `record` until it ends, then delivers its outcome.
    async fn watch(&self, mut record: TaskRecord, mut wait: Duration) {
        let mut unreached = 0u32;
        let outcome = loop {
            tokio::time::sleep(wait).await;
            match self
                .tools
                .poll_task(&record.conversation, &record.ticket)
                .await
            {
                TaskPoll::Working { message, poll_ms } => {
                    unreached = 0;
                    if poll_ms.is_some() {
                        record.ticket.poll_ms = poll_ms;
                    }
                    wait = poll_interval(record.ticket.poll_ms);
                    if message.is_some() && message != record.message {
                        record.message = message;
                        self.note(&record).await;
                    }
                }
                TaskPoll::Unreachable(why) => {
                    unreached += 1;
                    if unreached >= MAX_UNREACHED {
                        break ToolOutcome::error(format!(
                            "the tool server \"{}\" could not be reached to learn how the task ended ({why}); it was given up",
                            record.ticket.server
                        ));
                    }
                    tracing::debug!(server = %record.ticket.server, task = %record.ticket.task_id, why, "task poll failed; trying later");
                    wait = (POLL_DEFAULT * (1 << unreached.min(8))).min(Duration::from_secs(600));
                }
                TaskPoll::Done(outcome) => break outcome,
            }
        };
        self.deliver(&record, &outcome).await;
    }

    /// Keeps the server's newest word about a task.
    async fn note(&self, record: &TaskRecord) {
        if let Some(followed) = self
            .followed
            .lock()
            .expect("tasks poisoned")
            .get_mut(&key(record))
        {
            followed.record.message.clone_from(&record.message);
        }
        if let Err(error) = self.store.note_task(record).await {
            tracing::debug!(%error, "a task's status could not be kept");
        }
    }

    /// Hands the outcome to the sink until it takes it, then forgets the
    /// task.
    async fn deliver(&self, record: &TaskRecord, outcome: &ToolOutcome) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        let ticket = &record.ticket;
        if let Some(followed) = self
            .followed
            .lock()
            .expect("tasks poisoned")
            .get_mut(&key(record))
        {
            followed.ended = true;
        }
        loop {
            match sink.deliver(record, outcome).await {
                Ok(()) => break,
                Err(problem) => {
                    tracing::warn!(server = %ticket.server, task = %ticket.task_id, problem, "a background task's result could not be delivered; trying again");
                    tokio::time::sleep(REDELIVER).await;
                }
            }
        }
        tracing::info!(conversation = %record.conversation, server = %ticket.server, task = %ticket.task_id, ok = !outcome.is_error, "background task ended");
        if let Err(error) = self.store.drop_task(&record.conversation, ticket).await {
            tracing::warn!(%error, task = %ticket.task_id, "a delivered task could not be forgotten; its result may come again after a restart");
        }
        self.followed
            .lock()
            .expect("tasks poisoned")
            .remove(&key(record));
    }
}

/// The pause between polls: the server's suggestion within bounds.
pub fn poll_interval(poll_ms: Option<u64>) -> Duration {
    poll_ms
        .map_or(POLL_DEFAULT, Duration::from_millis)
        .clamp(POLL_MIN, POLL_MAX)
}

/// A record of `ticket`, started now in `conversation` by `author`.
pub fn record(conversation: &str, ticket: &TaskTicket, author: Option<&Author>) -> TaskRecord {
    TaskRecord {
        conversation: conversation.to_owned(),
        ticket: ticket.clone(),
        author: author.cloned(),
        started_at: unix_now(),
        message: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_keep_to_bounds() {
        assert_eq!(poll_interval(None), POLL_DEFAULT);
        assert_eq!(poll_interval(Some(10)), POLL_MIN);
        assert_eq!(poll_interval(Some(5_000)), Duration::from_secs(5));
        assert_eq!(poll_interval(Some(3_600_000)), POLL_MAX);
    }
}
