//! Tool calls that their servers run as tasks: the experimental tasks of
//! 2025-11-25 against the real server-everything (`simulate-research-query`
//! requires them), and the tasks extension of the current revision against
//! an rmcp server in this process whose tasks outlive mcpcord's restarts.

use crate::support;
use crate::support::board::{Board, serve_board};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mcpcord::app::App;
use mcpcord::config::Limits;
use mcpcord::conversation::{
    Answer, CallContext, Message, Question, TaskPoll, TaskRecord, TaskSink, TaskStep, TaskTicket,
    ToolHost, ToolOutcome, TurnEvent, TurnInput,
};
use mcpcord::mcp::{McpHost, config};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn host(servers: Value) -> McpHost {
    mcpcord::app::install_crypto();
    let text = json!({"mcpServers": servers}).to_string();
    McpHost::new(
        config::parse(&text, "mcp.json", &|_| None).unwrap(),
        Limits::default(),
    )
}

/// What a call told its turn: task steps, progress messages, questions;
/// questions are answered with `answer`.
#[derive(Default)]
struct Recorder {
    steps: Mutex<Vec<(String, TaskStep)>>,
    messages: Mutex<Vec<String>>,
    asked: Mutex<Vec<String>>,
    answer: Option<(String, String)>,
}

#[async_trait]
impl CallContext for Recorder {
    fn progress(&self, _progress: f64, _total: Option<f64>, message: Option<String>) {
        self.messages.lock().unwrap().extend(message);
    }

    async fn elicit(&self, question: Question) -> Answer {
        self.asked.lock().unwrap().push(question.message);
        match &self.answer {
            Some((field, value)) => {
                let mut content = serde_json::Map::new();
                content.insert(field.clone(), json!(value));
                Answer::Accept(content)
            }
            None => Answer::Decline,
        }
    }

    async fn task(&self, ticket: &TaskTicket, step: TaskStep) {
        self.steps
            .lock()
            .unwrap()
            .push((ticket.task_id.clone(), step));
    }
}

impl Recorder {
    fn steps(&self) -> Vec<TaskStep> {
        self.steps.lock().unwrap().iter().map(|(_, s)| *s).collect()
    }
}

const RESEARCH: &str = "everything__simulate-research-query";

#[tokio::test]
async fn a_task_of_2025_11_25_is_waited_for_within_the_call() {
    support::needs_servers!();
    let host = host(json!({"everything": support::everything()}));
    host.tools("c").await;
    let recorder = Recorder::default();
    let outcome = host
        .call_reporting("c", RESEARCH, json!({"topic": "rust"}), &recorder)
        .await;
    assert!(!outcome.is_error, "{}", outcome.content);
    assert!(
        outcome.content.contains("# Research Report: rust"),
        "{}",
        outcome.content
    );
    assert_eq!(recorder.steps(), [TaskStep::Started, TaskStep::Finished]);
    // The server's stages came through as the call's progress.
    let messages = recorder.messages.lock().unwrap().clone();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("Synthesizing") || m.contains("Generating")),
        "{messages:?}"
    );
    host.shutdown().await;
}

#[tokio::test]
async fn a_task_of_2025_11_25_asks_its_question_through_tasks_result() {
    support::needs_servers!();
    let host = host(json!({"everything": support::everything()}));
    host.tools("c").await;
    let recorder = Recorder {
        answer: Some(("interpretation".into(), "snake".into())),
        ..Recorder::default()
    };
    let outcome = host
        .call_reporting(
            "c",
            RESEARCH,
            json!({"topic": "python", "ambiguous": true}),
            &recorder,
        )
        .await;
    assert!(!outcome.is_error, "{}", outcome.content);
    let asked = recorder.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].contains("multiple interpretations"), "{asked:?}");
    assert!(
        outcome.content.contains("Research Report: python (snake)"),
        "{}",
        outcome.content
    );
    host.shutdown().await;
}

#[tokio::test]
async fn a_task_that_outlasts_its_call_goes_on_and_is_polled_to_its_end() {
    support::needs_servers!();
    let mut server = support::everything();
    server["timeoutSecs"] = json!(1);
    let host = host(json!({"everything": server}));
    host.tools("c").await;
    let recorder = Recorder::default();
    let outcome = host
        .call_reporting("c", RESEARCH, json!({"topic": "tides"}), &recorder)
        .await;
    assert!(!outcome.is_error, "{}", outcome.content);
    assert!(
        outcome.content.contains("goes on in the background"),
        "{}",
        outcome.content
    );
    assert_eq!(recorder.steps(), [TaskStep::Started, TaskStep::Detached]);
    let task_id = recorder.steps.lock().unwrap()[0].0.clone();
    assert!(outcome.content.contains(&task_id));
    let ticket = TaskTicket {
        server: "everything".into(),
        tool: RESEARCH.into(),
        task_id,
        legacy: true,
        poll_ms: None,
    };
    let mut polls = 0;
    let done = loop {
        polls += 1;
        assert!(polls < 100, "the task never ended");
        match host.poll_task("c", &ticket).await {
            TaskPoll::Working { .. } => tokio::time::sleep(Duration::from_millis(200)).await,
            TaskPoll::Done(outcome) => break outcome,
            TaskPoll::Unreachable(why) => panic!("unreachable: {why}"),
        }
    };
    assert!(
        done.content.contains("# Research Report: tides"),
        "{}",
        done.content
    );
    host.shutdown().await;
}

// The tasks extension of the current revision, against an rmcp server
// whose tasks live on a board that outlives mcpcord.

/// Collects what background tasks deliver.
struct Inbox(tokio::sync::mpsc::UnboundedSender<(TaskRecord, ToolOutcome)>);

#[async_trait]
impl TaskSink for Inbox {
    async fn deliver(&self, task: &TaskRecord, outcome: &ToolOutcome) -> Result<(), String> {
        self.0
            .send((task.clone(), outcome.clone()))
            .map_err(|_| "the test ended".to_owned())
    }
}

fn inbox() -> (
    Arc<Inbox>,
    tokio::sync::mpsc::UnboundedReceiver<(TaskRecord, ToolOutcome)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Arc::new(Inbox(tx)), rx)
}

struct Setup {
    dir: tempfile::TempDir,
    model: support::FakeModel,
    board: Board,
    stop: CancellationToken,
}

/// The board served, with `timeout_secs` as its server's call timeout.
async fn setup(timeout_secs: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let board = Board::default();
    let stop = CancellationToken::new();
    let url = serve_board(&board, &stop).await;
    support::write_mcp(
        dir.path(),
        json!({"jobs": {"url": url, "timeoutSecs": timeout_secs}}),
    );
    Setup {
        dir,
        model: support::FakeModel::start().await,
        board,
        stop,
    }
}

async fn app(setup: &Setup) -> App {
    App::build(&support::config(&setup.model, setup.dir.path(), &[]))
        .await
        .unwrap()
}

const JOB: &str = "jobs__research";

#[tokio::test]
async fn a_task_of_the_current_revision_that_ends_in_time_is_the_calls_result() {
    use mcpcord::conversation::Store;
    let s = setup(30).await;
    s.model.script([
        support::call("c1", JOB, r#"{"topic":"instant tides"}"#),
        support::text("Here is the report."),
    ]);
    let app = app(&s).await;
    let (result, _events) = support::turn(&app, "t", "research tides").await;
    result.unwrap();
    let results = support::tool_results(&s.model.requests()[1]);
    assert_eq!(results, ["report on instant tides"]);
    assert!(
        app.store.tasks().await.unwrap().is_empty(),
        "a finished task is forgotten"
    );
    app.shutdown().await;
    s.stop.cancel();
}

#[tokio::test]
async fn a_background_task_outlives_a_restart_and_its_result_is_delivered() {
    use mcpcord::conversation::Store;
    let s = setup(1).await;
    s.model.script([
        support::call("c1", JOB, r#"{"topic":"tides"}"#),
        support::text("It is running; I will tell you."),
    ]);
    let first = app(&s).await;
    let (result, events) = support::turn(&first, "t", "research tides").await;
    result.unwrap();
    let results = support::tool_results(&s.model.requests()[1]);
    assert!(
        results[0].contains("goes on in the background as task job-1"),
        "{results:?}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, TurnEvent::ToolProgress { message: Some(m), .. } if m.contains("job-1"))
        ),
        "the notice says it runs as a task"
    );
    first.shutdown().await;

    // After the restart the task is followed again, from the store.
    let second = app(&s).await;
    let kept = second.store.tasks().await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].ticket.task_id, "job-1");
    assert_eq!(kept[0].conversation, "t");
    assert!(!kept[0].ticket.legacy);
    let (sink, mut delivered) = inbox();
    assert_eq!(second.engine.tasks().start(sink).await.unwrap(), 1);
    assert_eq!(second.engine.tasks().running("t").len(), 1);
    s.board.finish("job-1");
    let (record, outcome) = delivered.recv().await.unwrap();
    assert_eq!(record.ticket.task_id, "job-1");
    assert_eq!(outcome.content, "report on tides");
    let input = mcpcord::conversation::tasks::result_input(&record, &outcome);
    assert!(input.contains("job-1") && input.contains(JOB) && input.ends_with("report on tides"));
    // Delivered: no longer running, and forgotten.
    assert!(second.engine.tasks().running("t").is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !second.store.tasks().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the task was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.board.cancels().is_empty());
    second.shutdown().await;
    s.stop.cancel();
}

#[tokio::test]
async fn a_background_task_can_be_cancelled() {
    use mcpcord::conversation::Store;
    let s = setup(1).await;
    s.model.script([
        support::call("c1", JOB, r#"{"topic":"comets"}"#),
        support::text("Started."),
    ]);
    let app = app(&s).await;
    let (sink, mut delivered) = inbox();
    app.engine.tasks().start(sink).await.unwrap();
    support::turn(&app, "t", "research comets").await.0.unwrap();
    let tasks = app.engine.tasks();
    assert_eq!(tasks.running("other"), []);
    let found = tasks.find("t", "").unwrap();
    assert_eq!(found.ticket.task_id, "job-1");
    assert!(
        tasks
            .find("t", "job-9")
            .unwrap_err()
            .contains("running: job-1")
    );
    tasks.cancel(&found).await.unwrap();
    assert_eq!(s.board.cancels(), ["job-1"]);
    assert!(tasks.running("t").is_empty());
    assert!(app.store.tasks().await.unwrap().is_empty());
    assert!(
        tasks
            .find("t", "")
            .unwrap_err()
            .contains("no background task")
    );
    // Nothing comes of it afterwards.
    s.board.finish("job-1");
    app.shutdown().await;
    assert!(delivered.try_recv().is_err());
    s.stop.cancel();
}

#[tokio::test]
async fn stopping_a_turn_cancels_the_task_it_waits_for() {
    use mcpcord::conversation::{ApproveAll, Store};
    let s = setup(60).await;
    s.model
        .script([support::call("c1", JOB, r#"{"topic":"storms"}"#)]);
    let app = Arc::new(app(&s).await);
    let stop = CancellationToken::new();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let running = {
        let app = app.clone();
        let input = TurnInput {
            stop: stop.clone(),
            ..TurnInput::from(Message::user("research storms"))
        };
        tokio::spawn(async move { app.engine.run_turn("t", input, &tx, &ApproveAll).await })
    };
    support::wait_for_event(
        &mut events,
        |e| matches!(e, TurnEvent::ToolProgress { message: Some(m), .. } if m.contains("job-1")),
    )
    .await;
    assert_eq!(
        app.store.tasks().await.unwrap().len(),
        1,
        "kept while it runs"
    );
    stop.cancel();
    let _ = running.await.unwrap();
    assert_eq!(s.board.cancels(), ["job-1"]);
    assert!(app.store.tasks().await.unwrap().is_empty());
    assert_eq!(s.board.ids(), ["job-1"]);
    app.shutdown().await;
    s.stop.cancel();
}
