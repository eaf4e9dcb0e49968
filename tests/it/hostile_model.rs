//! Model endpoints that misbehave: cut streams, duplicate tool-call ids,
//! bodies that are not JSON, answers without end. Each is one clear error
//! for the person, and the next turn works.

use crate::support;

use crate::support::{FakeModel, Reply, text};
use mcpcord::app::App;
use mcpcord::conversation::{ModelError, TurnError, TurnEvent, TurnOutcome};
use serde_json::{Value, json};
use tempfile::TempDir;

struct Setup {
    dir: TempDir,
    model: FakeModel,
    app: App,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let model = FakeModel::start().await;
    let app = App::build(&support::config(&model, dir.path(), extra))
        .await
        .unwrap();
    Setup { dir, model, app }
}

async fn turn(app: &App, message: &str) -> (Result<TurnOutcome, TurnError>, Vec<TurnEvent>) {
    support::turn(app, "terminal:t", message).await
}

use support::sse_reply as sse;

fn assistant_texts(request: &Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant")
        .filter_map(|m| m["content"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_stream_that_stops_without_an_end_is_not_kept_as_an_answer() {
    let s = setup(&[]).await;
    s.model.script([
        sse(
            &[json!({"choices": [{"index": 0, "delta": {"content": "The answer is forty"}}]})],
            false,
        ),
        text("The answer is 42."),
    ]);
    let (result, events) = turn(&s.app, "what is it?").await;
    assert!(
        matches!(result, Err(TurnError::Model(ModelError::Cut))),
        "{result:?}"
    );
    let said = events.iter().find_map(|e| match e {
        TurnEvent::Error(text) => Some(text.clone()),
        _ => None,
    });
    assert!(said.unwrap().contains("cut off"));
    let (result, _) = turn(&s.app, "what is it?").await;
    assert!(result.unwrap().answered);
    let sent = &s.model.requests()[1];
    assert!(
        assistant_texts(sent).is_empty(),
        "the cut answer was kept: {sent}"
    );
    s.app.shutdown().await;
}

async fn duplicate_ids_run_every_call(extra: &[(&str, &str)]) {
    let s = setup(extra).await;
    let list = "fs__list_allowed_directories";
    s.model.script([
        Reply::Calls(vec![
            ("dup".into(), list.into(), "{}".into()),
            ("dup".into(), list.into(), "{}".into()),
            (String::new(), list.into(), "{}".into()),
        ]),
        text("Listed three times."),
        text("And again."),
    ]);
    let (result, _) = turn(&s.app, "list").await;
    let outcome = result.unwrap();
    assert_eq!(outcome.tool_calls, 3);
    let requests = s.model.requests();
    assert_eq!(support::tool_results(&requests[1]).len(), 3);
    // A strict provider accepts the later turns too.
    let (result, _) = turn(&s.app, "again").await;
    assert!(result.unwrap().answered);
    assert!(s.model.rejected().is_empty(), "{:?}", s.model.rejected());
    let _ = &s.dir;
    s.app.shutdown().await;
}

#[tokio::test]
async fn duplicate_tool_call_ids_are_renamed_when_streamed() {
    support::needs_servers!();
    duplicate_ids_run_every_call(&[]).await;
}

#[tokio::test]
async fn duplicate_tool_call_ids_are_renamed_when_not_streamed() {
    support::needs_servers!();
    duplicate_ids_run_every_call(&[("STREAM_RESPONSES", "false")]).await;
}

#[tokio::test]
async fn a_reply_that_is_not_json_is_named_as_such() {
    let s = setup(&[("STREAM_RESPONSES", "false")]).await;
    s.model
        .script([Reply::Raw("text/html", "<html>login</html>".into())]);
    let (result, _) = turn(&s.app, "hi").await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.contains("not an answer") && error.contains("<html>login"),
        "{error}"
    );
    assert!(!error.contains("could not be reached"), "{error}");
    s.app.shutdown().await;
}

#[tokio::test]
async fn an_endless_answer_stops_at_the_size_bound() {
    let s = setup(&[("MODEL_MAX_RESPONSE_BYTES", "100000")]).await;
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": "blah ".repeat(200)}}]});
    s.model
        .script([sse(&vec![chunk; 200], true), text("short")]);
    let (result, _) = turn(&s.app, "talk").await;
    assert!(
        matches!(result, Err(TurnError::Model(ModelError::TooLarge { .. }))),
        "{result:?}"
    );
    let (result, _) = turn(&s.app, "briefly").await;
    assert!(result.unwrap().answered);
    s.app.shutdown().await;
}

#[tokio::test]
async fn a_call_id_reused_in_a_later_reply_is_renamed() {
    support::needs_servers!();
    let s = setup(&[]).await;
    let list = "fs__list_allowed_directories";
    for _ in 0..2 {
        s.model
            .script([support::call("call_0", list, "{}"), text("Listed.")]);
        let (result, _) = turn(&s.app, "list").await;
        assert!(result.unwrap().answered);
    }
    assert!(s.model.rejected().is_empty(), "{:?}", s.model.rejected());
    s.app.shutdown().await;
}

#[tokio::test]
async fn a_reply_with_too_many_calls_runs_only_the_first_ones() {
    support::needs_servers!();
    use mcpcord::conversation::MAX_CALLS_PER_REPLY;
    let s = setup(&[]).await;
    let calls = (0..MAX_CALLS_PER_REPLY + 8)
        .map(|i| {
            (
                format!("c{i}"),
                "fs__list_allowed_directories".to_owned(),
                "{}".to_owned(),
            )
        })
        .collect();
    s.model.script([Reply::Calls(calls), text("Done.")]);
    let (result, events) = turn(&s.app, "list a lot").await;
    assert!(result.unwrap().answered);
    let results = support::tool_results(&s.model.requests()[1]);
    assert_eq!(results.len(), MAX_CALLS_PER_REPLY + 8);
    let skipped = results
        .iter()
        .filter(|r| r.contains("not run: at most 32"))
        .count();
    assert_eq!(skipped, 8);
    let started = events
        .iter()
        .filter(|e| matches!(e, TurnEvent::ToolStarted { .. }))
        .count();
    assert_eq!(started, MAX_CALLS_PER_REPLY);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TurnEvent::Warning(w) if w.contains("first 32 were run")))
    );
    s.app.shutdown().await;
}
