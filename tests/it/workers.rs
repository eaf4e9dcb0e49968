//! The conversations' workers and the engine over in-memory ports, with
//! tokio's clock paused: order, inputs kept before their turn, panics,
//! shutdown cuts and restarts, settings that never wait for a turn.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::memory::{
    FakeTools, Gate, MemoryStore, Scripted, ScriptedModel, answer, calls,
};
use async_trait::async_trait;
use mcpcord::conversation::{
    Accepted, ApprovalRequest, ApproveAll, Approver, Decision, Engine, EngineSettings, Inbound,
    Stopped, TimedApprover, TurnEvent, TurnInput, TurnRunner, Workers,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const GRACE: Duration = Duration::from_secs(30);

/// The engine's settings in these tests.
fn settings() -> EngineSettings {
    EngineSettings {
        default_model: "test/model".into(),
        system_prompt: None,
        timezone: jiff::tz::TimeZone::UTC,
        transcription_model: None,
        clock: Default::default(),
        max_tool_rounds: 2,
        fallback_context_tokens: 100_000,
    }
}

/// What the runner saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Ran(String, String, bool),
    Crashed(String, u64),
    Stopped(String, Stopped),
}

/// Runs turns with the engine and notes what happened. An input whose
/// text has a gate waits there before its turn (as for a slow download).
struct Runner {
    engine: Arc<Engine>,
    seen: Arc<Mutex<Vec<Seen>>>,
    done: Arc<tokio::sync::Notify>,
    before: std::collections::HashMap<String, Arc<Gate>>,
}

#[async_trait]
impl TurnRunner for Runner {
    async fn run(
        &self,
        conversation: &str,
        input: Inbound,
        resumed: bool,
        stop: CancellationToken,
    ) {
        if let Some(gate) = self.before.get(&input.text) {
            gate.pass().await;
        }
        let (events, _received) = mpsc::unbounded_channel();
        let turn = TurnInput {
            ask: mcpcord::conversation::Ask::New(mcpcord::conversation::Message::user(
                input.text.clone(),
            )),
            kept: Some(input.position),
            stop,
            place: Default::default(),
        };
        let _ = self
            .engine
            .run_turn(conversation, turn, &events, &ApproveAll)
            .await;
        self.note(Seen::Ran(conversation.to_owned(), input.text, resumed));
    }

    async fn crashed(&self, conversation: &str, input: &Inbound) {
        self.note(Seen::Crashed(conversation.to_owned(), input.position));
    }

    async fn stopped(&self, conversation: &str, stopped: Stopped) {
        self.note(Seen::Stopped(conversation.to_owned(), stopped));
    }
}

impl Runner {
    fn note(&self, seen: Seen) {
        self.seen.lock().unwrap().push(seen);
        self.done.notify_one();
    }
}

struct Setup {
    store: Arc<MemoryStore>,
    model: Arc<ScriptedModel>,
    engine: Arc<Engine>,
    workers: Workers,
    seen: Arc<Mutex<Vec<Seen>>>,
    done: Arc<tokio::sync::Notify>,
}

impl Setup {
    fn new(script: impl IntoIterator<Item = Scripted>) -> Setup {
        Setup::with(
            Arc::new(MemoryStore::default()),
            ScriptedModel::new(script),
            FakeTools::new(&["files__read"]),
        )
    }

    fn with(store: Arc<MemoryStore>, model: Arc<ScriptedModel>, tools: FakeTools) -> Setup {
        Setup::gated(store, model, tools, Default::default())
    }

    fn gated(
        store: Arc<MemoryStore>,
        model: Arc<ScriptedModel>,
        tools: FakeTools,
        before: std::collections::HashMap<String, Arc<Gate>>,
    ) -> Setup {
        let engine = Arc::new(Engine::new(
            model.clone(),
            Arc::new(tools),
            store.clone(),
            settings(),
        ));
        let seen = Arc::default();
        let done = Arc::new(tokio::sync::Notify::new());
        let runner = Runner {
            engine: engine.clone(),
            seen: Arc::clone(&seen),
            done: done.clone(),
            before,
        };
        let workers = Workers::new(store.clone(), Arc::new(runner));
        Setup {
            store,
            model,
            engine,
            workers,
            seen,
            done,
        }
    }

    /// Waits until the runner has noted `count` things, and returns them.
    async fn seen(&self, count: usize) -> Vec<Seen> {
        loop {
            let notified = self.done.notified();
            {
                let seen = self.seen.lock().unwrap();
                if seen.len() >= count {
                    return seen.clone();
                }
            }
            notified.await;
        }
    }
}

fn input(position: u64, text: &str) -> Inbound {
    Inbound {
        position,
        author: 7,
        author_name: "Ada".into(),
        text: text.to_owned(),
        ..Default::default()
    }
}

fn ran(text: &str) -> Seen {
    Seen::Ran("c".into(), text.into(), false)
}

#[tokio::test(start_paused = true)]
async fn inputs_are_answered_in_position_order_whatever_order_they_arrive_in() {
    let s = Setup::new([answer("to one"), answer("to two"), answer("to three")]);
    // The handler of message 1 has started but not finished routing when
    // the handlers of messages 2 and 3 are done.
    let first = s.workers.arriving("c", 1);
    assert_eq!(
        s.workers.accept("c", input(3, "three")).await.unwrap(),
        Accepted::Queued
    );
    assert_eq!(
        s.workers.accept("c", input(2, "two")).await.unwrap(),
        Accepted::Queued
    );
    tokio::task::yield_now().await;
    assert!(
        s.model.requests().is_empty(),
        "no turn starts while an earlier message arrives"
    );
    s.workers.accept("c", input(1, "one")).await.unwrap();
    drop(first);
    assert_eq!(s.seen(3).await, [ran("one"), ran("two"), ran("three")]);
    assert_eq!(s.model.asked(), ["one", "two", "three"]);
    assert_eq!(s.store.user_texts("c"), ["one", "two", "three"]);
    assert!(s.store.kept().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_arrival_that_is_turned_away_does_not_hold_up_the_next() {
    let s = Setup::new([answer("ok")]);
    let ignored = s.workers.arriving("c", 1);
    s.workers.accept("c", input(2, "two")).await.unwrap();
    drop(ignored);
    assert_eq!(s.seen(1).await, [ran("two")]);
}

#[tokio::test(start_paused = true)]
async fn an_input_is_kept_before_its_turn_and_forgotten_once_stored() {
    let gate = Gate::new();
    let s = Setup::new([Scripted::Held(gate.clone(), Box::new(answer("hi")))]);
    s.workers.accept("c", input(5, "hello")).await.unwrap();
    assert_eq!(
        s.store.kept(),
        [("c".to_owned(), 5)],
        "kept as soon as accepted"
    );
    gate.reached().await;
    // The model is being asked: the input moved from the inbox to the history.
    assert!(s.store.kept().is_empty());
    assert_eq!(s.store.user_texts("c"), ["hello"]);
    gate.open();
    s.seen(1).await;
    assert_eq!(
        s.workers.live(),
        0,
        "an idle worker exits and its state goes"
    );
}

#[tokio::test(start_paused = true)]
async fn the_same_message_delivered_twice_is_answered_once() {
    let s = Setup::new([answer("once")]);
    assert_eq!(
        s.workers.accept("c", input(1, "hi")).await.unwrap(),
        Accepted::Queued
    );
    assert_eq!(
        s.workers.accept("c", input(1, "hi")).await.unwrap(),
        Accepted::Duplicate
    );
    assert_eq!(s.seen(1).await, [ran("hi")]);
    assert_eq!(s.model.remaining(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_turn_that_panics_does_not_silence_its_conversation() {
    let s = Setup::new([Scripted::Panic, answer("still here")]);
    s.workers.accept("c", input(1, "boom")).await.unwrap();
    s.workers.accept("c", input(2, "again")).await.unwrap();
    assert_eq!(
        s.seen(2).await,
        [Seen::Crashed("c".into(), 1), ran("again")]
    );
    let messages = s.store.messages("c");
    assert_eq!(messages.last().unwrap().text(), "still here");
    assert!(
        s.store.kept().is_empty(),
        "the input that panicked is not tried again"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_long_turn_and_what_waits_is_answered_after_the_restart() {
    let gate = Gate::new();
    let store = Arc::new(MemoryStore::default());
    let model = ScriptedModel::new([Scripted::Held(gate.clone(), Box::new(answer("never")))]);
    let s = Setup::with(store.clone(), model, FakeTools::new(&[]));
    s.workers.accept("c", input(1, "slow")).await.unwrap();
    s.workers.accept("c", input(2, "queued")).await.unwrap();
    gate.reached().await;
    // The paused clock runs through the grace period at once.
    let cut = s.workers.shutdown(GRACE).await;
    assert_eq!(cut, 1);
    let seen = s.seen(1).await;
    assert!(
        seen.contains(&Seen::Stopped(
            "c".into(),
            Stopped {
                cut: true,
                waiting: 1
            }
        )),
        "{seen:?}"
    );
    assert_eq!(store.kept(), [("c".to_owned(), 2)]);

    // The restart: a new engine and workers on the same store.
    let model = ScriptedModel::new([answer("answered after the restart")]);
    let after = Setup::with(store.clone(), model.clone(), FakeTools::new(&[]));
    assert_eq!(after.workers.resume().await.unwrap(), 1);
    assert_eq!(
        after.seen(1).await,
        [Seen::Ran("c".into(), "queued".into(), true)]
    );
    assert_eq!(model.asked(), ["queued"]);
    assert!(store.kept().is_empty());
    // The cut turn's history is valid: its input is there, then the next.
    assert_eq!(store.user_texts("c"), ["slow", "queued"]);
}

/// Holds every approval at a gate, then approves.
struct HeldApprover(Arc<Gate>);

#[async_trait]
impl Approver for HeldApprover {
    async fn decide(&self, _request: &ApprovalRequest) -> Decision {
        self.0.pass().await;
        Decision::Approve
    }
}

#[tokio::test(start_paused = true)]
async fn settings_answer_while_a_turn_waits_for_an_approval() {
    let store = Arc::new(MemoryStore::default());
    let model = ScriptedModel::new([calls(&["files__write"]), answer("written")]);
    let tools = FakeTools::new(&[]).needing_approval("files__write");
    let s = Setup::with(store, model, tools);
    let gate = Gate::new();
    let engine = s.engine.clone();
    let approver = HeldApprover(gate.clone());
    let turn = tokio::spawn(async move {
        let (events, _received) = mpsc::unbounded_channel();
        engine
            .run_turn(
                "c",
                mcpcord::conversation::Message::user("write it"),
                &events,
                &approver,
            )
            .await
    });
    gate.reached().await;
    // The turn holds its conversation; none of these waits for it.
    assert_eq!(s.engine.model_of("c").await.unwrap(), "test/model");
    assert_eq!(
        s.engine.set_model("c", Some("test/other")).await.unwrap(),
        "test/other"
    );
    assert_eq!(s.engine.model_of("c").await.unwrap(), "test/other");
    gate.open();
    let outcome = turn.await.unwrap().unwrap();
    assert!(outcome.answered);
    assert_eq!(
        outcome.model, "test/model",
        "a running turn keeps its model"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stopped_turn_lets_the_next_input_go_on() {
    let gate = Gate::new();
    let s = Setup::new([
        Scripted::Held(gate.clone(), Box::new(answer("never shown"))),
        answer("next"),
    ]);
    s.workers.accept("c", input(1, "long")).await.unwrap();
    s.workers.accept("c", input(2, "short")).await.unwrap();
    gate.reached().await;
    assert!(!s.workers.stop_turn("c", Some(2)), "not the running turn");
    assert!(s.workers.stop_turn("c", Some(1)));
    assert_eq!(s.seen(2).await, [ran("long"), ran("short")]);
    assert!(!s.workers.stop_turn("c", None), "nothing runs any more");
    assert_eq!(s.store.user_texts("c"), ["long", "short"]);
}

#[tokio::test(start_paused = true)]
async fn the_round_limit_declines_further_calls_and_says_so() {
    let s = Setup::new([
        calls(&["files__read"]),
        calls(&["files__read"]),
        calls(&["files__read"]),
    ]);
    let (events, mut received) = mpsc::unbounded_channel();
    let outcome = s
        .engine
        .run_turn(
            "c",
            mcpcord::conversation::Message::user("loop"),
            &events,
            &ApproveAll,
        )
        .await
        .unwrap();
    drop(events);
    assert!(!outcome.answered);
    assert_eq!(outcome.rounds, 3);
    let mut warnings = Vec::new();
    while let Some(event) = received.recv().await {
        if let TurnEvent::Warning(w) = event {
            warnings.push(w);
        }
    }
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Stopped after 2 rounds")),
        "{warnings:?}"
    );
    let last = s.store.messages("c").last().unwrap().clone();
    assert!(
        last.text().contains("already used its 2 tool rounds"),
        "{last:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_declined_call_is_not_run_and_the_model_hears_why() {
    let store = Arc::new(MemoryStore::default());
    let model = ScriptedModel::new([calls(&["files__write"]), answer("fine")]);
    let s = Setup::with(
        store.clone(),
        model.clone(),
        FakeTools::new(&[]).needing_approval("files__write"),
    );
    let (events, _received) = mpsc::unbounded_channel();
    let decline = mcpcord::conversation::DeclineAll("nobody may write".into());
    s.engine
        .run_turn(
            "c",
            mcpcord::conversation::Message::user("write"),
            &events,
            &decline,
        )
        .await
        .unwrap();
    let second = &model.requests()[1];
    let result = second.last().unwrap().text();
    assert!(
        result.contains("declined") && result.contains("nobody may write"),
        "{result}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_of_the_input_is_not_kept_either() {
    let s = Setup::new([]);
    s.store.fail_writes(Some("disk full"));
    // Keeping the input fails: the surface tells the person.
    assert!(s.workers.accept("c", input(1, "hi")).await.is_err());
    assert!(s.store.kept().is_empty());
    assert!(s.model.requests().is_empty());
}

/// Never answers; notes when its question expired.
#[derive(Default)]
struct Unanswered {
    expired: Mutex<Vec<(String, Duration)>>,
}

#[async_trait]
impl Approver for Unanswered {
    async fn decide(&self, _request: &ApprovalRequest) -> Decision {
        std::future::pending().await
    }

    async fn expired(&self, request: &ApprovalRequest, after: Duration) {
        self.expired
            .lock()
            .unwrap()
            .push((request.tool.clone(), after));
    }
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_approval_counts_as_declined_after_its_timeout() {
    let store = Arc::new(MemoryStore::default());
    let model = ScriptedModel::new([calls(&["files__write"]), answer("not written")]);
    let tools = FakeTools::new(&[]).needing_approval("files__write");
    let s = Setup::with(store, model.clone(), tools);
    let approver = TimedApprover {
        inner: Unanswered::default(),
        timeout: Duration::from_secs(300),
    };
    let (events, _received) = mpsc::unbounded_channel();
    let started = tokio::time::Instant::now();
    let outcome = s
        .engine
        .run_turn(
            "c",
            mcpcord::conversation::Message::user("write"),
            &events,
            &approver,
        )
        .await
        .unwrap();
    assert!(outcome.answered);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(300),
        "the paused clock ran to the timeout"
    );
    let result = model.requests()[1].last().unwrap().text().to_owned();
    assert!(
        result.contains("nobody approved it within 300 seconds"),
        "{result}"
    );
    assert_eq!(
        *approver.inner.expired.lock().unwrap(),
        [("files__write".to_owned(), Duration::from_secs(300))]
    );
}

#[tokio::test(start_paused = true)]
async fn the_engine_keeps_a_bounded_cache_whatever_it_is_asked() {
    // Many conversations asked for their model only.
    let s = Setup::new([]);
    for i in 0..500 {
        s.engine.model_of(&format!("c{i}")).await.unwrap();
    }
    assert!(s.engine.cached().0 <= 65, "{:?}", s.engine.cached());

    // Histories of 2 MiB each: the cache stays under its 64 MiB.
    let big = "x".repeat(2 * 1024 * 1024);
    let s = Setup::new((0..40).map(|_| answer("ok")));
    let (events, _received) = mpsc::unbounded_channel();
    for i in 0..40 {
        let message = mcpcord::conversation::Message::user(big.clone());
        s.engine
            .run_turn(&format!("big{i}"), message, &events, &ApproveAll)
            .await
            .unwrap();
    }
    let (_, bytes) = s.engine.cached();
    assert!(bytes <= 64 * 1024 * 1024, "{bytes} bytes cached");
    assert!(bytes >= 30 * 1024 * 1024, "the cache is used: {bytes}");
}

#[tokio::test(start_paused = true)]
async fn a_turn_cut_before_its_input_was_stored_is_answered_after_the_restart() {
    let gate = Gate::new();
    let store = Arc::new(MemoryStore::default());
    let s = Setup::gated(
        store.clone(),
        ScriptedModel::new([]),
        FakeTools::new(&[]),
        [("slow download".to_owned(), gate.clone())].into(),
    );
    s.workers
        .accept("c", input(1, "slow download"))
        .await
        .unwrap();
    gate.reached().await;
    assert_eq!(s.workers.shutdown(GRACE).await, 1);
    // Not "cut short": nothing of it was stored, so it just waits.
    assert_eq!(
        s.seen(1).await,
        [Seen::Stopped(
            "c".into(),
            Stopped {
                cut: false,
                waiting: 1
            }
        )]
    );
    assert_eq!(store.kept(), [("c".to_owned(), 1)]);
    let model = ScriptedModel::new([answer("fetched")]);
    let after = Setup::with(store.clone(), model, FakeTools::new(&[]));
    after.workers.resume().await.unwrap();
    assert_eq!(
        after.seen(1).await,
        [Seen::Ran("c".into(), "slow download".into(), true)]
    );
    assert_eq!(store.user_texts("c"), ["slow download"]);
}

#[tokio::test(start_paused = true)]
async fn the_prompt_names_the_place_and_the_time_goes_with_each_new_message() {
    use mcpcord::conversation::{Ask, Clock, Place};
    let store = Arc::new(MemoryStore::default());
    let model = ScriptedModel::new([answer("noted"), answer("again")]);
    let at: jiff::Timestamp = "2026-12-03T23:30:00Z".parse().unwrap();
    let engine = Engine::new(
        model.clone(),
        Arc::new(FakeTools::new(&[])),
        store.clone(),
        EngineSettings {
            default_model: "test/model".into(),
            system_prompt: Some("Global.".into()),
            timezone: jiff::tz::TimeZone::get("Europe/Paris").unwrap(),
            transcription_model: None,
            clock: Clock::fixed(at),
            max_tool_rounds: 2,
            fallback_context_tokens: 100_000,
        },
    );
    engine
        .set_system_prompt(
            "c",
            Some("You help in {channel} on {server}. Today is {weekday} {date}."),
        )
        .await
        .unwrap();
    let place = Place {
        channel: "#general".into(),
        server: "Makers".into(),
    };
    for text in ["first", "second"] {
        let (events, _received) = mpsc::unbounded_channel();
        let input = TurnInput {
            ask: Ask::New(mcpcord::conversation::Message::user(text)),
            kept: None,
            stop: Default::default(),
            place: place.clone(),
        };
        engine
            .run_turn("c", input, &events, &ApproveAll)
            .await
            .unwrap();
    }
    let systems = model.systems();
    assert_eq!(systems[0], systems[1], "the prompt stays the same");
    let system = systems[0].clone().unwrap();
    assert!(
        system.starts_with("You help in #general on Makers. Today is the weekday"),
        "{system}"
    );
    assert!(!system.contains("2026"), "no date in the prompt: {system}");
    // Each new message carries the time it was sent, in TIMEZONE.
    let sent = &model.requests()[1];
    assert_eq!(sent[0].text(), "[Friday 2026-12-04 00:30 CET] first");
    assert_eq!(sent[2].text(), "[Friday 2026-12-04 00:30 CET] second");
    // Without a prompt of its own, a conversation has the global one.
    engine.set_system_prompt("c", None).await.unwrap();
    assert_eq!(
        engine.system_prompt_of("c").await.unwrap().as_deref(),
        Some("Global.")
    );
}

#[tokio::test(start_paused = true)]
async fn an_edit_whose_message_cannot_be_stored_leaves_nothing_of_the_old_exchange_behind() {
    use mcpcord::conversation::{Ask, Message, TurnError};
    let store = Arc::new(MemoryStore::default());
    let model = ScriptedModel::new([answer("old answer"), answer("fresh answer")]);
    let engine = Engine::new(
        model.clone(),
        Arc::new(FakeTools::new(&[])),
        store.clone(),
        settings(),
    );
    let turn = |ask, kept| TurnInput {
        ask,
        kept,
        stop: Default::default(),
        place: Default::default(),
    };
    let (events, _received) = mpsc::unbounded_channel();
    let first = Message::user("old question");
    engine
        .run_turn("c", turn(Ask::New(first), Some(10)), &events, &ApproveAll)
        .await
        .unwrap();
    // The edit replaces the exchange, then cannot store its new text.
    store.fail_takes(Some("disk full"));
    let edited = Ask::Edited {
        message: Message::user("edited question"),
        of: 10,
    };
    let error = engine
        .run_turn("c", turn(edited, Some(11)), &events, &ApproveAll)
        .await
        .unwrap_err();
    assert!(matches!(error, TurnError::InputNotStored(_)), "{error:?}");
    store.fail_takes(None);
    engine
        .run_turn(
            "c",
            turn(Ask::New(Message::user("next question")), None),
            &events,
            &ApproveAll,
        )
        .await
        .unwrap();
    // The model sees what the store holds: the old exchange is gone.
    let texts: Vec<String> = model.requests()[1]
        .iter()
        .map(|m| m.text().to_owned())
        .collect();
    assert_eq!(texts, ["next question"], "{texts:?}");
}
