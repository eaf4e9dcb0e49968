//! The engine end to end: the real OpenRouter client against the loopback
//! fake, a SQLite file, and the real filesystem and time MCP servers.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{FakeModel, Reply, call, spawn_turn, text, turn, wait_for_event};
use mcpcord::app::App;
use mcpcord::conversation::{Message, ModelError, Role, Store, TurnError, TurnEvent};
use serde_json::{Value, json};
use tempfile::TempDir;

struct Setup {
    dir: TempDir,
    model: FakeModel,
}

async fn setup(servers: Value) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), servers);
    Setup {
        dir,
        model: FakeModel::start().await,
    }
}

async fn app(setup: &Setup, extra: &[(&str, &str)]) -> App {
    App::build(&support::config(&setup.model, setup.dir.path(), extra))
        .await
        .unwrap()
}

fn answer(events: &[TurnEvent]) -> Option<&str> {
    events.iter().find_map(|e| match e {
        TurnEvent::Answer { text: a, .. } => Some(a.as_str()),
        _ => None,
    })
}

fn messages(request: &Value) -> Vec<Value> {
    request["messages"].as_array().unwrap().clone()
}

fn files_setup_dir() -> TempDir {
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("a.txt"), "alpha contents").unwrap();
    std::fs::write(files.path().join("b.txt"), "bravo contents").unwrap();
    files
}

#[tokio::test]
async fn lists_a_directory_and_reads_two_files_in_one_reply() {
    support::needs_servers!();
    let files = files_setup_dir();
    let root = files.path().display().to_string();
    let s = setup(json!({"fs": support::filesystem(files.path())})).await;
    s.model.script([
        call(
            "c1",
            "fs__list_directory",
            &json!({"path": root}).to_string(),
        ),
        Reply::Calls(vec![
            (
                "c2".into(),
                "fs__read_text_file".into(),
                json!({"path": format!("{root}/a.txt")}).to_string(),
            ),
            (
                "c3".into(),
                "fs__read_text_file".into(),
                json!({"path": format!("{root}/b.txt")}).to_string(),
            ),
        ]),
        text("Both files are read."),
    ]);
    let app = app(&s, &[]).await;
    let (result, events) = turn(&app, "terminal:t", "what is in my files?").await;
    let outcome = result.unwrap();
    assert_eq!((outcome.rounds, outcome.tool_calls), (3, 3));
    assert!(outcome.answered);
    assert!((outcome.usage.cost - 0.003).abs() < 1e-9);
    assert_eq!(answer(&events), Some("Both files are read."));
    let started = events
        .iter()
        .filter(|e| matches!(e, TurnEvent::ToolStarted { .. }))
        .count();
    let finished_ok = events
        .iter()
        .filter(|e| matches!(e, TurnEvent::ToolFinished { ok: true, .. }))
        .count();
    assert_eq!((started, finished_ok), (3, 3));

    let requests = s.model.requests();
    assert_eq!(requests.len(), 3);
    assert!(s.model.rejected().is_empty(), "{:?}", s.model.rejected());
    let names: Vec<&str> = requests[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"fs__read_text_file") && names.contains(&"fs__list_directory"));
    // Tools go with every request of the loop.
    assert!(
        requests
            .iter()
            .all(|r| r["tools"].as_array().is_some_and(|t| !t.is_empty()))
    );
    let listing = &support::tool_results(&requests[1])[0];
    assert!(
        listing.contains("a.txt") && listing.contains("b.txt"),
        "{listing}"
    );
    let reads = support::tool_results(&requests[2]);
    assert!(
        reads[1].contains("alpha contents") && reads[2].contains("bravo contents"),
        "{reads:?}"
    );

    let stored = app.store.history("terminal:t").await.unwrap();
    let roles: Vec<Role> = stored.iter().map(Message::role).collect();
    use Role::*;
    assert_eq!(
        roles,
        [User, Assistant, Tool, Assistant, Tool, Tool, Assistant]
    );
    assert_eq!(app.store.usage("terminal:t").await.unwrap().responses, 3);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_arguments_and_unknown_tools_become_results_for_the_model() {
    support::needs_servers!();
    let files = files_setup_dir();
    let s = setup(json!({"fs": support::filesystem(files.path())})).await;
    s.model.script([
        Reply::Calls(vec![
            ("x1".into(), "fs__read_text_file".into(), "{not json".into()),
            ("x2".into(), "nope__tool".into(), "{}".into()),
            (
                "x3".into(),
                "fs__read_text_file".into(),
                r#"{"wrong": 1}"#.into(),
            ),
            (
                "x4".into(),
                "fs__list_allowed_directories".into(),
                "".into(),
            ),
        ]),
        text("I could not read it."),
    ]);
    let app = app(&s, &[]).await;
    let (result, events) = turn(&app, "terminal:t", "read it").await;
    assert!(result.unwrap().answered);
    let results = support::tool_results(&s.model.requests()[1]);
    assert!(
        results[0].starts_with("ERROR:") && results[0].contains("not valid JSON"),
        "{}",
        results[0]
    );
    assert!(
        results[1].starts_with("ERROR:") && results[1].contains("no tool named"),
        "{}",
        results[1]
    );
    assert!(
        results[2].starts_with("ERROR:"),
        "the server rejects the arguments: {}",
        results[2]
    );
    assert!(
        !results[3].starts_with("ERROR:"),
        "empty arguments mean {{}}: {}",
        results[3]
    );
    let failed = events
        .iter()
        .filter(|e| matches!(e, TurnEvent::ToolFinished { ok: false, .. }))
        .count();
    assert_eq!(failed, 3);
    assert!(s.model.rejected().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_429_is_retried_after_retry_after() {
    let s = setup(json!({})).await;
    s.model.script([
        Reply::Status(429, "Rate limit exceeded".into(), Some("1".into())),
        text("hello"),
    ]);
    let app = app(&s, &[]).await;
    let started = Instant::now();
    let (result, events) = turn(&app, "terminal:t", "hi").await;
    assert!(result.unwrap().answered);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After was not honoured"
    );
    assert_eq!(answer(&events), Some("hello"));
    assert_eq!(s.model.requests().len(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    let s = setup(json!({})).await;
    s.model.script([
        Reply::Status(502, "Provider returned error".into(), Some("0".into())),
        text("recovered"),
        Reply::Status(400, "Invalid parameter".into(), None),
    ]);
    let app = app(&s, &[]).await;
    let (result, _) = turn(&app, "terminal:t", "one").await;
    assert!(result.unwrap().answered);
    let (result, events) = turn(&app, "terminal:t", "two").await;
    assert!(matches!(
        result,
        Err(TurnError::Model(ModelError::BadRequest { status: 400, .. }))
    ));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TurnEvent::Error(m) if m.contains("Invalid parameter")))
    );
    assert_eq!(s.model.requests().len(), 3, "a 400 must not be retried");
    app.shutdown().await;
}

#[tokio::test]
async fn running_out_of_credits_is_explained_and_nothing_is_lost() {
    let s = setup(json!({})).await;
    s.model.script([
        Reply::Status(402, "Insufficient credits".into(), None),
        text("back again"),
    ]);
    let app = app(&s, &[]).await;
    let (result, events) = turn(&app, "terminal:t", "first words").await;
    assert!(matches!(
        result,
        Err(TurnError::Model(ModelError::CreditsExhausted))
    ));
    let error = events.iter().find_map(|e| match e {
        TurnEvent::Error(m) => Some(m.clone()),
        _ => None,
    });
    assert!(error.unwrap().contains("out of credits"));
    assert_eq!(s.model.requests().len(), 1, "a 402 must not be retried");
    let (result, _) = turn(&app, "terminal:t", "second words").await;
    assert!(result.unwrap().answered);
    let sent = messages(&s.model.requests()[1]);
    let users: Vec<&str> = sent
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["first words", "second words"]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_mid_stream_error_is_reported_and_the_history_stays_valid() {
    let s = setup(json!({})).await;
    s.model.script([Reply::MidStreamError, text("fine now")]);
    let app = app(&s, &[]).await;
    let (result, events) = turn(&app, "terminal:t", "hi").await;
    assert!(matches!(
        result,
        Err(TurnError::Model(ModelError::Provider { .. }))
    ));
    assert!(events.contains(&TurnEvent::Text("Partial ".into())));
    let (result, _) = turn(&app, "terminal:t", "again").await;
    assert!(result.unwrap().answered);
    assert!(s.model.rejected().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn non_streaming_mode_runs_tools_and_answers() {
    support::needs_servers!();
    let files = files_setup_dir();
    let s = setup(json!({"fs": support::filesystem(files.path())})).await;
    let path = files.path().join("a.txt").display().to_string();
    s.model.script([
        call(
            "n1",
            "fs__read_text_file",
            &json!({"path": path}).to_string(),
        ),
        text("It says alpha."),
    ]);
    let app = app(&s, &[("STREAM_RESPONSES", "false")]).await;
    let (result, events) = turn(&app, "terminal:t", "read a").await;
    assert!(result.unwrap().answered);
    assert_eq!(answer(&events), Some("It says alpha."));
    let requests = s.model.requests();
    assert_eq!(requests[0]["stream"], false);
    assert!(support::tool_results(&requests[1])[0].contains("alpha contents"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_conversation_continues_after_a_restart() {
    let s = setup(json!({})).await;
    s.model
        .script([text("Nice to meet you, Ada."), text("You are Ada.")]);
    let first = app(&s, &[]).await;
    turn(&first, "terminal:me", "My name is Ada.")
        .await
        .0
        .unwrap();
    first.shutdown().await;

    let second = app(&s, &[]).await;
    turn(&second, "terminal:me", "What is my name?")
        .await
        .0
        .unwrap();
    let sent = messages(&s.model.requests()[1]);
    let texts: Vec<&str> = sent
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "My name is Ada.",
            "Nice to meet you, Ada.",
            "What is my name?"
        ]
    );
    // Another conversation starts empty.
    s.model.script([text("Hello.")]);
    turn(&second, "terminal:other", "Hi").await.0.unwrap();
    assert_eq!(messages(&s.model.requests()[2]).len(), 1);
    second.shutdown().await;
}

#[tokio::test]
async fn a_turn_aborted_during_a_tool_call_leaves_a_valid_history() {
    support::needs_servers!();
    let s = setup(json!({"everything": support::everything()})).await;
    s.model.script([call(
        "slow",
        "everything__trigger-long-running-operation",
        r#"{"duration": 30, "steps": 3}"#,
    )]);
    let app = Arc::new(app(&s, &[]).await);
    let (running, mut rx) = spawn_turn(&app, "terminal:t", "take your time");
    wait_for_event(&mut rx, |e| matches!(e, TurnEvent::ToolStarted { .. })).await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    // The reply that asked for the tool was billed before it ran.
    let billed = app.store.usage("terminal:t").await.unwrap();
    assert_eq!(billed.responses, 1);
    assert!(billed.cost > 0.0, "{billed:?}");

    s.model.script([text("Sorry, where were we?")]);
    let (result, _) = turn(&app, "terminal:t", "are you there?").await;
    assert!(result.unwrap().answered);
    assert!(s.model.rejected().is_empty(), "{:?}", s.model.rejected());
    let sent = messages(&s.model.requests()[1]);
    let users: Vec<&str> = sent
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["take your time", "are you there?"]);
    Arc::into_inner(app).unwrap().shutdown().await;
}

#[tokio::test]
async fn a_turn_aborted_while_the_model_thinks_keeps_the_finished_tool_round() {
    support::needs_servers!();
    let files = files_setup_dir();
    let s = setup(json!({"fs": support::filesystem(files.path())})).await;
    s.model.script([
        call(
            "l1",
            "fs__list_directory",
            &json!({"path": files.path()}).to_string(),
        ),
        Reply::Hang,
    ]);
    let app = Arc::new(app(&s, &[]).await);
    let (running, mut rx) = spawn_turn(&app, "terminal:t", "list");
    wait_for_event(&mut rx, |e| matches!(e, TurnEvent::ToolFinished { .. })).await;
    // The round is stored before the model is asked again.
    s.model.wait_for_requests(2).await;
    running.abort();
    let _ = running.await;

    s.model.script([text("Here is the listing.")]);
    let (result, _) = turn(&app, "terminal:t", "so?").await;
    assert!(result.unwrap().answered);
    assert!(s.model.rejected().is_empty(), "{:?}", s.model.rejected());
    let roles: Vec<String> = messages(&s.model.requests()[2])
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "user"]);
    Arc::into_inner(app).unwrap().shutdown().await;
}

#[tokio::test]
async fn the_round_limit_stops_the_turn_and_says_so() {
    support::needs_servers!();
    let files = files_setup_dir();
    let s = setup(json!({"fs": support::filesystem(files.path())})).await;
    let list = json!({"path": files.path()}).to_string();
    s.model.script([
        call("r1", "fs__list_directory", &list),
        call("r2", "fs__list_directory", &list),
    ]);
    let app = app(&s, &[("MAX_TOOL_ROUNDS", "1")]).await;
    let (result, events) = turn(&app, "terminal:t", "loop").await;
    let outcome = result.unwrap();
    assert!(!outcome.answered);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TurnEvent::Warning(w) if w.contains("Stopped after 1 rounds")))
    );
    let started = events
        .iter()
        .filter(|e| matches!(e, TurnEvent::ToolStarted { .. }))
        .count();
    assert_eq!(started, 1, "the second round must not run");
    s.model.script([text("ok")]);
    let (result, _) = turn(&app, "terminal:t", "continue").await;
    assert!(result.unwrap().answered);
    let last = support::tool_results(&s.model.requests()[2]);
    assert!(last[1].contains("not run"), "{last:?}");
    assert!(s.model.rejected().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_long_history_is_fitted_to_the_context_window() {
    let s = setup(json!({})).await;
    let app = app(&s, &[("DEFAULT_MODEL", "test/small")]).await;
    let long = "word ".repeat(800);
    // Warned when the window first overflows, not again on every turn.
    for i in 0..4 {
        s.model.script([text(&format!("answer {i}"))]);
        let message = if i < 3 {
            format!("{i} {long}")
        } else {
            "short".into()
        };
        let (result, events) = turn(&app, "terminal:t", &message).await;
        result.unwrap();
        let trimmed = events
            .iter()
            .any(|e| matches!(e, TurnEvent::Warning(w) if w.contains("oldest exchange")));
        assert_eq!(trimmed, i == 2, "turn {i}");
    }
    // Over the window, the history drops to two thirds of it at once (so
    // the start, and the prompt cache with it, moves seldom): both older
    // exchanges go, not just the oldest.
    let sent = messages(&s.model.requests()[2]);
    assert!(
        sent[0]["content"].as_str().unwrap().starts_with("2 "),
        "the two oldest exchanges go at once"
    );
    // The next turn fits again and sends from the same start.
    let sent = messages(&s.model.requests()[3]);
    assert!(sent[0]["content"].as_str().unwrap().starts_with("2 "));
    // Nothing was deleted: the store still has everything.
    assert_eq!(app.store.history("terminal:t").await.unwrap().len(), 8);
    app.shutdown().await;
}

#[tokio::test]
async fn a_model_without_tools_is_refused_with_the_reason() {
    support::needs_servers!();
    let files = files_setup_dir();
    let s = setup(json!({"fs": support::filesystem(files.path())})).await;
    let app = app(&s, &[]).await;
    let refused = app
        .engine
        .set_model("terminal:t", Some("test/no-tools"))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("cannot use tools"),
        "{refused}"
    );
    let unknown = app
        .engine
        .set_model("terminal:t", Some("test/ghost"))
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("does not exist"), "{unknown}");
    assert_eq!(
        app.engine
            .set_model("terminal:t", Some("test/small"))
            .await
            .unwrap(),
        "test/small"
    );
    assert_eq!(
        app.engine.model_of("terminal:t").await.unwrap(),
        "test/small"
    );
    app.shutdown().await;

    let app = self::app(&s, &[("DEFAULT_MODEL", "test/no-tools")]).await;
    let (result, events) = turn(&app, "terminal:u", "hi").await;
    assert!(matches!(
        result,
        Err(TurnError::Model(ModelError::NoToolSupport { .. }))
    ));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TurnEvent::Error(m) if m.contains("Pick another model")))
    );
    assert!(s.model.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn the_time_server_from_pypi_answers() {
    support::needs_servers!();
    let s = setup(json!({"time": {"command": support::time_server(), "args": ["--local-timezone", "UTC"], "scope": "shared"}})).await;
    s.model.script([
        call("t1", "time__get_current_time", r#"{"timezone":"UTC"}"#),
        text("It is now."),
    ]);
    let app = app(&s, &[]).await;
    let (result, _) = turn(&app, "terminal:t", "what time is it?").await;
    assert!(result.unwrap().answered);
    let output = &support::tool_results(&s.model.requests()[1])[0];
    assert!(
        output.contains("UTC") && output.contains("datetime"),
        "{output}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn reset_clears_the_history() {
    let s = setup(json!({})).await;
    s.model.script([text("one"), text("two")]);
    let app = app(&s, &[]).await;
    turn(&app, "terminal:t", "remember this").await.0.unwrap();
    app.engine.reset("terminal:t").await.unwrap();
    turn(&app, "terminal:t", "fresh start").await.0.unwrap();
    assert_eq!(messages(&s.model.requests()[1]).len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn images_from_tools_reach_models_that_read_images() {
    support::needs_servers!();
    let s = setup(json!({"everything": support::everything()})).await;
    let app = app(&s, &[]).await;
    s.model.script([
        call("i1", "everything__get-tiny-image", "{}"),
        text("A tiny image."),
    ]);
    turn(&app, "terminal:vision", "show me").await.0.unwrap();
    let sent = messages(&s.model.requests()[1]);
    let last = sent.last().unwrap();
    assert_eq!(last["role"], "user");
    let parts = last["content"].as_array().expect("content parts");
    assert!(
        parts[1]["image_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"),
        "{last}"
    );
    assert!(support::tool_results(&s.model.requests()[1])[0].contains("image/png"));

    // The next turn does not send the image again, only a note of it.
    s.model.script([text("Still tiny.")]);
    turn(&app, "terminal:vision", "and now?").await.0.unwrap();
    let later = s.model.requests()[2].to_string();
    assert!(!later.contains("data:image/png"), "{later}");
    assert!(later.contains("shown in that turn and are not sent again"));

    // A text-only model gets the description alone.
    app.engine
        .set_model("terminal:text", Some("test/small"))
        .await
        .unwrap();
    s.model.script([
        call("i2", "everything__get-tiny-image", "{}"),
        text("Noted."),
    ]);
    turn(&app, "terminal:text", "show me").await.0.unwrap();
    let sent = messages(&s.model.requests()[4]);
    assert_eq!(sent.last().unwrap()["role"], "tool");
    assert!(s.model.rejected().is_empty());
    app.shutdown().await;
}
