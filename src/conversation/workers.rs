//! One worker per live conversation: inputs are kept in the store when they
//! are accepted, then answered one at a time in the order of their
//! positions, whatever order the surface's handlers ran in.
//!
//! - `accept` stores the input and hands it to its conversation's worker; it
//!   never waits for a turn.
//! - A surface marks a position as arriving as soon as it sees a message,
//!   before its slow checks; a worker does not take a later input while an
//!   earlier one is still arriving.
//! - A turn that panics is logged, its input forgotten, and the surface told;
//!   the worker goes on with the next input.
//! - Idle workers exit and their state is dropped.
//! - At shutdown no new turn starts; running ones get the grace period and
//!   are then cut. Inputs still waiting stay stored, and `resume` answers
//!   them after the restart.
//! - With [`Claims`] (several processes on one database), a worker claims
//!   its conversation in the store before its turns run and lets go when
//!   it exits; the claims are renewed while the process lives. A worker
//!   that finds the conversation claimed by a live process leaves its
//!   inputs to that one. Inputs of conversations whose claim expired (their
//!   process died) are taken over.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ports::{Store, StoreError};
use super::types::Inbound;

/// How long cut turns get to drop their work and say so, after the grace
/// period.
const CUT_WAIT: Duration = Duration::from_secs(5);

/// How this process claims the conversations it serves, when it shares
/// the database with others.
#[derive(Debug, Clone)]
pub struct Claims {
    /// This process, unique among those sharing the database.
    pub owner: String,
    /// How long a claim lasts without being renewed (renewed every third
    /// of it); a dead process's conversations are taken over after it.
    pub ttl: Duration,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What happened to a conversation's work when the workers stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Its running turn was cut short after its input was stored (the
    /// person is asked to say "continue" later).
    pub cut: bool,
    /// Inputs still waiting (kept in the store, answered after a restart).
    pub waiting: usize,
}

/// The surface's side of a turn: fetch what the input needs, run the
/// engine's turn, show it. The workers decide when.
#[async_trait]
pub trait TurnRunner: Send + Sync + 'static {
    /// Answers one input. `resumed` is true for an input kept from before a
    /// restart. `stop` is cancelled when someone stops the turn: the runner
    /// hands it to the engine, which ends the turn cleanly.
    async fn run(&self, conversation: &str, input: Inbound, resumed: bool, stop: CancellationToken);
    /// The turn for `input` panicked (a bug): say so in the conversation.
    async fn crashed(&self, conversation: &str, input: &Inbound);
    /// Shutdown stopped this conversation's work: say so in it.
    async fn stopped(&self, conversation: &str, stopped: Stopped);
}

/// A running turn: what stops it, and whose input it answers.
#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    turn: RunningTurn,
}

/// Which input a conversation's running turn answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningTurn {
    pub position: u64,
    /// Who sent the input (who may stop the turn, besides admins).
    pub author: u64,
}

/// One input waiting for its turn.
#[derive(Debug)]
struct Job {
    input: Inbound,
    resumed: bool,
}

/// The state of one conversation.
#[derive(Debug, Default)]
struct Slot {
    waiting: BTreeMap<u64, Job>,
    /// Positions seen by the surface and not yet accepted or turned away,
    /// with how many handlers hold each.
    arriving: BTreeMap<u64, usize>,
    /// Whether a worker task runs for this conversation.
    worker: bool,
    /// The running turn.
    running: Option<Running>,
    /// Wakes the worker when an arrival ends.
    wake: Arc<Notify>,
}

impl Slot {
    fn idle(&self) -> bool {
        self.waiting.is_empty() && self.arriving.is_empty() && !self.worker
    }
}

#[derive(Debug)]
struct Shared {
    slots: Mutex<HashMap<String, Slot>>,
    accepting: AtomicBool,
    tasks: TaskTracker,
    /// Cancelled when the grace period is over.
    cut: CancellationToken,
    claims: Option<Claims>,
    /// Cancelled once every worker is done, at shutdown.
    done: CancellationToken,
}

/// The conversations' workers.
pub struct Workers {
    store: Arc<dyn Store>,
    runner: Arc<dyn TurnRunner>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// Marks a position as arriving until dropped (see [`Workers::arriving`]).
#[derive(Debug)]
#[must_use = "the position counts as arriving only while this is held"]
pub struct Arrival {
    shared: Arc<Shared>,
    conversation: String,
    position: u64,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut slots = self.shared.slots.lock().expect("slots poisoned");
        let Some(slot) = slots.get_mut(&self.conversation) else {
            return;
        };
        if let Some(count) = slot.arriving.get_mut(&self.position) {
            *count -= 1;
            if *count == 0 {
                slot.arriving.remove(&self.position);
            }
        }
        slot.wake.notify_one();
        if slot.idle() {
            slots.remove(&self.conversation);
        }
    }
}

/// Whether an accepted input will be answered now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Queued for its conversation's worker.
    Queued,
    /// The same position was already kept; nothing more is done.
    Duplicate,
    /// Kept, but the workers are stopping: it is answered after a restart.
    Kept,
}

impl Workers {
    pub fn new(store: Arc<dyn Store>, runner: Arc<dyn TurnRunner>) -> Self {
        Self::build(store, runner, None)
    }

    /// Workers that claim their conversations (see [`Claims`]). Renewing
    /// the claims and taking over those of dead processes runs in the
    /// background until [`Workers::shutdown`] is done.
    pub fn with_claims(store: Arc<dyn Store>, runner: Arc<dyn TurnRunner>, claims: Claims) -> Self {
        let workers = Self::build(store, runner, Some(claims.clone()));
        workers.keep_claims(claims);
        workers
    }

    fn build(store: Arc<dyn Store>, runner: Arc<dyn TurnRunner>, claims: Option<Claims>) -> Self {
        Workers {
            store,
            runner,
            shared: Arc::new(Shared {
                slots: Mutex::default(),
                accepting: AtomicBool::new(true),
                tasks: TaskTracker::new(),
                cut: CancellationToken::new(),
                claims,
                done: CancellationToken::new(),
            }),
        }
    }

    /// Renews this process's claims every third of their time, and every
    /// half of it takes over the inputs no live process has claimed.
    fn keep_claims(&self, claims: Claims) {
        let store = self.store.clone();
        let done = self.shared.done.clone();
        let ttl_secs = claims.ttl.as_secs().max(1) as i64;
        let owner = claims.owner.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval((claims.ttl / 3).max(Duration::from_millis(100)));
            loop {
                tokio::select! {
                    () = done.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                if let Err(error) = store.renew_claims(&owner, unix_now() + ttl_secs).await {
                    tracing::warn!(%error, "could not renew this process's claims on its conversations");
                }
            }
        });
        let workers = Workers {
            store: self.store.clone(),
            runner: self.runner.clone(),
            shared: self.shared.clone(),
        };
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval((claims.ttl / 2).max(Duration::from_millis(100)));
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = workers.shared.done.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                if !workers.shared.accepting.load(Ordering::SeqCst) {
                    break;
                }
                let now = unix_now();
                // An input this young may still be on its way to its own
                // process's worker.
                match workers.store.unclaimed_inputs(now, now - ttl_secs).await {
                    Ok(unclaimed) => {
                        for (conversation, input) in unclaimed {
                            tracing::info!(
                                conversation,
                                position = input.position,
                                "taking over a message its process left"
                            );
                            workers.queue(&conversation, input, true);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not look for messages other processes left")
                    }
                }
            }
        });
    }

    /// Marks `position` of `conversation` as arriving: until the returned
    /// guard is dropped, no later input of it starts its turn. Call it before
    /// any await in the handler that will accept the input.
    pub fn arriving(&self, conversation: &str, position: u64) -> Arrival {
        let mut slots = self.shared.slots.lock().expect("slots poisoned");
        let slot = slots.entry(conversation.to_owned()).or_default();
        *slot.arriving.entry(position).or_default() += 1;
        Arrival {
            shared: self.shared.clone(),
            conversation: conversation.to_owned(),
            position,
        }
    }

    /// Keeps `input` in the store, then queues it for its conversation's
    /// worker. Waits for the store only, never for a turn.
    pub async fn accept(&self, conversation: &str, input: Inbound) -> Result<Accepted, StoreError> {
        if !self.store.keep_input(conversation, &input).await? {
            return Ok(Accepted::Duplicate);
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Ok(Accepted::Kept);
        }
        self.queue(conversation, input, false);
        Ok(Accepted::Queued)
    }

    /// Queues every input kept in the store (from before a restart). Call it
    /// once at start, before new input is accepted. Returns how many.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let kept = self.store.kept_inputs().await?;
        let count = kept.len();
        for (conversation, input) in kept {
            self.queue(&conversation, input, true);
        }
        Ok(count)
    }

    /// The running turn of `conversation`, if any.
    pub fn running(&self, conversation: &str) -> Option<RunningTurn> {
        let slots = self.shared.slots.lock().expect("slots poisoned");
        slots.get(conversation)?.running.as_ref().map(|r| r.turn)
    }

    /// Stops the running turn of `conversation` (only when it answers
    /// `position`, if given): the engine ends it cleanly, keeping what was
    /// shown. Inputs still waiting are answered after it. Returns whether
    /// a turn was stopped.
    pub fn stop_turn(&self, conversation: &str, position: Option<u64>) -> bool {
        let slots = self.shared.slots.lock().expect("slots poisoned");
        let running = slots
            .get(conversation)
            .and_then(|s| s.running.as_ref())
            .filter(|r| position.is_none_or(|p| p == r.turn.position));
        running.inspect(|r| r.stop.cancel()).is_some()
    }

    /// Replaces the text (and files) of an input still waiting for its
    /// turn, in the store too. `false` when it is not waiting (any more).
    pub async fn amend(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let waiting = {
            let slots = self.shared.slots.lock().expect("slots poisoned");
            slots
                .get(conversation)
                .is_some_and(|s| s.waiting.contains_key(&input.position))
        };
        if !waiting || !self.store.update_input(conversation, input).await? {
            return Ok(false);
        }
        let mut slots = self.shared.slots.lock().expect("slots poisoned");
        let job = slots
            .get_mut(conversation)
            .and_then(|s| s.waiting.get_mut(&input.position));
        match job {
            Some(job) => {
                job.input = input.clone();
                Ok(true)
            }
            // Its turn started meanwhile, with the text from before.
            None => Ok(false),
        }
    }

    /// Takes an input out of the queue (its message was deleted), or stops
    /// its turn when it is running. Returns whether there was one.
    pub async fn withdraw(&self, conversation: &str, position: u64) -> Result<bool, StoreError> {
        let waiting = {
            let mut slots = self.shared.slots.lock().expect("slots poisoned");
            slots
                .get_mut(conversation)
                .and_then(|s| s.waiting.remove(&position))
                .is_some()
        };
        if waiting {
            crate::metrics::queued(-1.0);
            self.store.drop_input(conversation, position).await?;
            return Ok(true);
        }
        Ok(self.stop_turn(conversation, Some(position)))
    }

    /// How many conversations have a worker or waiting input.
    pub fn live(&self) -> usize {
        self.shared.slots.lock().expect("slots poisoned").len()
    }

    /// Stops taking turns: running ones get `grace` to finish, then are cut.
    /// Waiting inputs stay stored. Returns how many turns were cut.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        let cut = self.wind_down(grace).await;
        self.shared.done.cancel();
        // What is left is free at once for a process that starts next.
        if let Some(claims) = &self.shared.claims
            && let Err(error) = self.store.release(None, &claims.owner).await
        {
            tracing::warn!(%error, "could not let go of this process's claims");
        }
        cut
    }

    async fn wind_down(&self, grace: Duration) -> usize {
        self.shared.accepting.store(false, Ordering::SeqCst);
        self.shared.tasks.close();
        if tokio::time::timeout(grace, self.shared.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let running = {
            let slots = self.shared.slots.lock().expect("slots poisoned");
            slots.values().filter(|s| s.running.is_some()).count()
        };
        tracing::warn!(
            grace_secs = grace.as_secs(),
            running,
            "turns still running after the grace period; cutting them"
        );
        self.shared.cut.cancel();
        let _ = tokio::time::timeout(CUT_WAIT, self.shared.tasks.wait()).await;
        running
    }

    fn queue(&self, conversation: &str, input: Inbound, resumed: bool) {
        let mut slots = self.shared.slots.lock().expect("slots poisoned");
        let slot = slots.entry(conversation.to_owned()).or_default();
        // An input already waiting keeps its place (and whether it was
        // resumed).
        if let std::collections::btree_map::Entry::Vacant(entry) =
            slot.waiting.entry(input.position)
        {
            entry.insert(Job { input, resumed });
            crate::metrics::queued(1.0);
        }
        slot.wake.notify_one();
        if slot.worker {
            return;
        }
        slot.worker = true;
        crate::metrics::live_conversation(1.0);
        let worker = Worker {
            conversation: conversation.to_owned(),
            store: self.store.clone(),
            runner: self.runner.clone(),
            shared: self.shared.clone(),
        };
        self.shared.tasks.spawn(worker.work());
    }
}

/// The task of one conversation.
struct Worker {
    conversation: String,
    store: Arc<dyn Store>,
    runner: Arc<dyn TurnRunner>,
    shared: Arc<Shared>,
}

/// What the worker does next.
enum Next {
    Run(Job, CancellationToken),
    Wait(Arc<Notify>),
    /// Nothing to do: let go of the claim first, still marked as running
    /// (so that no second worker claims meanwhile), then look again.
    Release,
    /// Input came while the claim was let go: claim again before it runs.
    Reclaim,
    Exit(Option<usize>),
}

impl Worker {
    async fn work(self) {
        if !self.claim().await {
            return;
        }
        let mut released = false;
        loop {
            match self.next(released) {
                Next::Run(job, stop) => self.run(job, stop).await,
                Next::Wait(wake) => tokio::select! {
                    () = wake.notified() => {}
                    () = self.shared.cut.cancelled() => {}
                },
                Next::Release => {
                    if let Some(claims) = &self.shared.claims
                        && let Err(error) = self
                            .store
                            .release(Some(&self.conversation), &claims.owner)
                            .await
                    {
                        tracing::warn!(conversation = self.conversation, %error, "could not let go of a conversation's claim");
                    }
                    released = true;
                }
                Next::Reclaim => {
                    if !self.claim().await {
                        return;
                    }
                    released = false;
                }
                Next::Exit(waiting) => {
                    if let Some(waiting) = waiting {
                        let stopped = Stopped {
                            cut: false,
                            waiting,
                        };
                        self.runner.stopped(&self.conversation, stopped).await;
                    }
                    return;
                }
            }
        }
    }

    /// Claims the conversation for this process, when claims are on.
    /// Claimed by a live process, its inputs are left to that one (they are
    /// kept in the store) and the worker is gone: `false`.
    async fn claim(&self) -> bool {
        let Some(claims) = &self.shared.claims else {
            return true;
        };
        let now = unix_now();
        let until = now + claims.ttl.as_secs().max(1) as i64;
        match self
            .store
            .claim(&self.conversation, &claims.owner, now, until)
            .await
        {
            Ok(true) => true,
            // The turn will find out whether the database works.
            Err(error) => {
                tracing::warn!(conversation = self.conversation, %error, "could not claim a conversation; serving it anyway");
                true
            }
            Ok(false) => {
                tracing::info!(
                    conversation = self.conversation,
                    "another process serves this conversation; leaving its messages to it"
                );
                let mut slots = self.shared.slots.lock().expect("slots poisoned");
                if let Some(slot) = slots.get_mut(&self.conversation) {
                    crate::metrics::queued(-(slot.waiting.len() as f64));
                    slot.waiting.clear();
                    slot.worker = false;
                    crate::metrics::live_conversation(-1.0);
                    if slot.idle() {
                        slots.remove(&self.conversation);
                    }
                }
                false
            }
        }
    }

    /// Takes the next input, unless an earlier one is still arriving. Marks
    /// the worker gone when there is nothing (more) to do; at shutdown says
    /// how many inputs are left waiting.
    fn next(&self, released: bool) -> Next {
        let mut slots = self.shared.slots.lock().expect("slots poisoned");
        let Some(slot) = slots.get_mut(&self.conversation) else {
            return Next::Exit(None);
        };
        slot.running = None;
        let stopping = !self.shared.accepting.load(Ordering::SeqCst);
        let first = slot.waiting.first_key_value().map(|(&p, _)| p);
        let next = match first {
            Some(_) if stopping => Next::Exit(Some(slot.waiting.len())),
            None if self.shared.claims.is_some() && !released && !stopping => {
                return Next::Release;
            }
            None => Next::Exit(None),
            Some(first) if slot.arriving.range(..first).next().is_some() => {
                return Next::Wait(slot.wake.clone());
            }
            Some(_) if released => return Next::Reclaim,
            Some(_) => {
                let (_, job) = slot.waiting.pop_first().expect("checked above");
                crate::metrics::queued(-1.0);
                let stop = CancellationToken::new();
                slot.running = Some(Running {
                    stop: stop.clone(),
                    turn: RunningTurn {
                        position: job.input.position,
                        author: job.input.author,
                    },
                });
                return Next::Run(job, stop);
            }
        };
        slot.worker = false;
        crate::metrics::live_conversation(-1.0);
        if stopping {
            // What waits is in the store; forget it here.
            crate::metrics::queued(-(slot.waiting.len() as f64));
            slot.waiting.clear();
        }
        if slot.idle() {
            slots.remove(&self.conversation);
        }
        next
    }

    async fn run(&self, job: Job, stop: CancellationToken) {
        let conversation = self.conversation.as_str();
        let turn =
            AssertUnwindSafe(
                self.runner
                    .run(conversation, job.input.clone(), job.resumed, stop),
            )
            .catch_unwind();
        tokio::select! {
            result = turn => {
                if let Err(panic) = result {
                    let message = panic_message(panic.as_ref());
                    tracing::error!(conversation, position = job.input.position, panic = %message, "a turn panicked; the conversation goes on with its next message");
                    // The input may not have reached the history; it is not
                    // tried again (it could panic again), and the person is told.
                    if let Err(error) = self.store.drop_input(conversation, job.input.position).await {
                        tracing::warn!(conversation, %error, "could not forget the input of a turn that panicked");
                    }
                    self.runner.crashed(conversation, &job.input).await;
                }
            }
            () = self.shared.cut.cancelled() => {
                let waiting = {
                    let mut slots = self.shared.slots.lock().expect("slots poisoned");
                    slots.get_mut(conversation).map_or(0, |s| std::mem::take(&mut s.waiting).len())
                };
                // Cut before its input reached the history, the input is
                // still kept and is answered after the restart like the rest.
                let position = job.input.position;
                let still_kept = self.store.kept_inputs().await.is_ok_and(|kept| {
                    kept.iter().any(|(c, i)| c == conversation && i.position == position)
                });
                let stopped = Stopped {
                    cut: !still_kept,
                    waiting: waiting + usize::from(still_kept),
                };
                self.runner.stopped(conversation, stopped).await;
            }
        }
    }
}

/// The text of a panic, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
