//! What is sent where: prompt caching markers and a stable prefix, who is
//! speaking, the provider pin of a turn, reasoning only to its own model,
//! web search citations, and the plain OpenAI dialect with cut tool calls.
//! The fake refuses what the real endpoints refuse (see `support`).

use crate::support;

use crate::support::{Api, FakeModel, Reply, call, sse_reply, text, turn, turn_with};
use mcpcord::app::App;
use mcpcord::conversation::{
    Author, Message, ModelError, Role, Store, ToolCall, TurnError, TurnEvent,
};
use serde_json::{Value, json};
use tempfile::TempDir;

struct Setup {
    dir: TempDir,
    model: FakeModel,
}

async fn setup(api: Api, servers: Value) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), servers);
    Setup {
        dir,
        model: FakeModel::start_as(api).await,
    }
}

async fn app(s: &Setup, extra: &[(&str, &str)]) -> App {
    App::build(&support::config(&s.model, s.dir.path(), extra))
        .await
        .unwrap()
}

fn messages(request: &Value) -> &Vec<Value> {
    request["messages"].as_array().unwrap()
}

/// The indices of the messages that carry a `cache_control` marker.
fn marked(request: &Value) -> Vec<usize> {
    messages(request)
        .iter()
        .enumerate()
        .filter(|(_, m)| m.to_string().contains("cache_control"))
        .map(|(i, _)| i)
        .collect()
}

fn markers(request: &Value) -> usize {
    request.to_string().matches("cache_control").count()
}

fn answer(events: &[TurnEvent]) -> Option<&str> {
    events.iter().find_map(|e| match e {
        TurnEvent::Answer { text: a, .. } => Some(a.as_str()),
        _ => None,
    })
}

fn no_reasoning(request: &Value) -> bool {
    messages(request)
        .iter()
        .all(|m| m.get("reasoning_details").is_none() && m.get("reasoning").is_none())
}

#[tokio::test]
async fn an_anthropic_tool_conversation_reads_each_earlier_write_and_keeps_its_prefix() {
    support::needs_servers!();
    let files = tempfile::tempdir().unwrap();
    let a = files.path().join("a.txt");
    std::fs::write(&a, "alpha").unwrap();
    let s = setup(
        Api::OpenRouter,
        json!({"fs": support::filesystem(files.path()),
               "time": {"command": support::time_server(), "args": []}}),
    )
    .await;
    let read = json!({"path": a}).to_string();
    let twelve = (1..=12)
        .map(|i| {
            (
                format!("d{i}"),
                "fs__read_text_file".to_owned(),
                read.clone(),
            )
        })
        .collect();
    s.model.script([
        call("c1", "fs__read_text_file", &read),
        text("A is alpha."),
        Reply::Calls(twelve),
        text("All twelve say alpha."),
        text("You're welcome."),
    ]);
    let app = app(
        &s,
        &[
            ("DEFAULT_MODEL", "anthropic/claude-test"),
            ("SYSTEM_PROMPT", "You read files when asked."),
        ],
    )
    .await;
    for ask in ["read a", "read it twelve times", "thanks"] {
        let (result, _) = turn(&app, "terminal:t", ask).await;
        assert!(result.unwrap().answered, "{:?}", s.model.rejected());
    }
    let requests = s.model.requests();
    assert_eq!(requests.len(), 5, "{:?}", s.model.rejected());
    assert_eq!(
        s.model.prefix_breaks(),
        Vec::<String>::new(),
        "each request begins with the one before"
    );
    for request in &requests {
        assert_eq!(request["session_id"], "terminal:t");
        assert_eq!(
            request["plugins"],
            json!([{"id": "context-compression", "enabled": false}])
        );
        assert!(markers(request) <= 4, "{request}");
        assert_eq!(marked(request)[0], 0, "the system prompt ends the prefix");
        let names: Vec<&str> = request["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert!(names.is_sorted(), "{names:?}");
        let newest = messages(request).len() - 1;
        assert_eq!(marked(request).last(), Some(&newest));
    }
    let attribution = s.model.attribution();
    assert_eq!(
        attribution[0].0.as_deref(),
        Some("https://github.com/mcpcord/mcpcord")
    );
    assert_eq!(attribution[0].1.as_deref(), Some("mcpcord"));
    // The round of twelve results: the previous request's newest message,
    // a bridge within Anthropic's lookback, and the newest.
    let round = &requests[3];
    let asked = messages(&requests[2]).len() - 1;
    let newest = messages(round).len() - 1;
    assert_eq!(marked(round), [0, asked, asked + 4, newest], "{round}");
    assert!(messages(round)[newest]["content"][0]["cache_control"].is_object());
    // The next request reads at the last tool result, where this one wrote.
    assert!(marked(&requests[4]).contains(&newest));
    app.shutdown().await;
}

#[tokio::test]
async fn a_follow_up_round_stays_on_the_provider_of_its_reasoning_and_goes_elsewhere_once_it_is_gone()
 {
    support::needs_servers!();
    let s = setup(
        Api::OpenRouter,
        json!({"fs": support::filesystem(std::path::Path::new("/tmp"))}),
    )
    .await;
    let signed = json!({
        "chunk": {"provider": "Google AI Studio"},
        "delta": {"reasoning_details": [{"type": "reasoning.encrypted", "data": "sig-1",
                                         "format": "google-gemini-v1", "index": 0}]}
    });
    s.model.script([
        call("c1", "fs__list_allowed_directories", "{}").with(signed.clone()),
        call("c2", "fs__list_allowed_directories", "{}").with(signed),
        Reply::Status(
            404,
            "No endpoints found matching your data policy".into(),
            None,
        ),
        text("Listed twice."),
    ]);
    let app = app(
        &s,
        &[
            ("DEFAULT_MODEL", "google/gemini-test"),
            ("OPENROUTER_PROVIDER", r#"{"data_collection":"deny"}"#),
        ],
    )
    .await;
    let (result, events) = turn(&app, "terminal:t", "list twice").await;
    assert!(result.unwrap().answered, "{events:?}");
    assert_eq!(answer(&events), Some("Listed twice."));
    let requests = s.model.requests();
    assert_eq!(requests.len(), 4);
    let unpinned = json!({"data_collection": "deny"});
    let pinned =
        json!({"data_collection": "deny", "order": ["Google AI Studio"], "allow_fallbacks": false});
    assert_eq!(requests[0]["provider"], unpinned);
    assert_eq!(requests[1]["provider"], pinned);
    assert!(
        messages(&requests[1])[1]["reasoning_details"].is_array(),
        "the signed reasoning goes back to where it was signed"
    );
    assert_eq!(requests[2]["provider"], pinned);
    // The pinned provider has no endpoint: once more, anywhere, without
    // this turn's signatures.
    assert_eq!(requests[3]["provider"], unpinned);
    assert!(no_reasoning(&requests[3]), "{}", requests[3]);
    for request in &requests {
        // Gemini reads only the last marker.
        assert_eq!(markers(request), 1, "{request}");
        assert_eq!(marked(request), [messages(request).len() - 1]);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn reasoning_goes_back_only_to_the_model_that_wrote_it() {
    let s = setup(Api::OpenRouter, json!({})).await;
    let thought = json!({"delta": {"reasoning_details": [
        {"type": "reasoning.text", "text": "hmm", "signature": "sig-a", "index": 0}]}});
    s.model.script([
        text("Thought about it.").with(thought),
        text("Again."),
        text("Switched."),
        text("Back."),
    ]);
    let app = app(
        &s,
        &[
            ("DEFAULT_MODEL", "anthropic/claude-test"),
            ("REASONING_EFFORT", "low"),
        ],
    )
    .await;
    let key = "terminal:t";
    turn(&app, key, "think").await.0.unwrap();
    turn(&app, key, "again").await.0.unwrap();
    app.engine
        .set_model(key, Some("google/gemini-test"))
        .await
        .unwrap();
    turn(&app, key, "on the other model").await.0.unwrap();
    app.engine.set_model(key, None).await.unwrap();
    turn(&app, key, "and back").await.0.unwrap();
    let requests = s.model.requests();
    // Both models list `reasoning` in the catalogue.
    assert!(
        requests
            .iter()
            .all(|r| r["reasoning"] == json!({"effort": "low"}))
    );
    let first_answer = |r: &Value| messages(r)[1].clone();
    assert_eq!(first_answer(&requests[1])["content"], "Thought about it.");
    assert!(first_answer(&requests[1])["reasoning_details"].is_array());
    assert_eq!(requests[2]["model"], "google/gemini-test");
    assert!(no_reasoning(&requests[2]), "{}", requests[2]);
    assert_eq!(
        support::said(&first_answer(&requests[2])),
        "Thought about it.",
        "the text is kept"
    );
    assert_eq!(requests[3]["model"], "anthropic/claude-test");
    assert!(first_answer(&requests[3])["reasoning_details"].is_array());
    app.shutdown().await;
}

#[tokio::test]
async fn web_search_is_offered_and_its_citations_end_the_answer() {
    let s = setup(Api::OpenRouter, json!({})).await;
    let cited = json!({"delta": {"annotations": [
        {"type": "url_citation", "url_citation": {"url": "https://example.org/rust-1.0",
         "title": "Announcing [Rust] 1.0", "content": "Rust 1.0 is here."}}]}});
    s.model
        .script([text("Rust 1.0 came out in 2015.").with(cited)]);
    let app = app(
        &s,
        &[
            ("WEB_SEARCH", "true"),
            ("WEB_SEARCH_MAX_RESULTS", "2"),
            ("REASONING_EFFORT", "high"),
        ],
    )
    .await;
    let (result, events) = turn(&app, "terminal:t", "when was Rust 1.0?").await;
    result.unwrap();
    assert_eq!(
        answer(&events),
        Some(
            "Rust 1.0 came out in 2015.\n\nSources:\n- [Announcing Rust 1.0](<https://example.org/rust-1.0>)"
        )
    );
    let request = &s.model.requests()[0];
    assert_eq!(
        request["tools"][0],
        json!({"type": "openrouter:web_search", "parameters": {"max_results": 2, "max_uses": 3}})
    );
    assert!(
        request.get("reasoning").is_none(),
        "test/tools does not list reasoning"
    );
    app.shutdown().await;
}

fn from(id: u64, name: &str, text: &str) -> Message {
    Message {
        author: Some(Author {
            id,
            name: name.into(),
        }),
        ..Message::user(text)
    }
}

#[tokio::test]
async fn the_model_is_told_who_speaks_and_the_endpoint_gets_only_a_stable_pseudonym() {
    let s = setup(Api::OpenRouter, json!({})).await;
    s.model.script([
        text("<@111111> (Alice): Hi Alice."),
        text("Hi Bob."),
        text("Welcome back."),
    ]);
    let key = "discord:1:2";
    let first = app(&s, &[]).await;
    let (_, events) = turn_with(&first, key, from(111111, "Alice", "hello")).await;
    assert_eq!(
        answer(&events),
        Some("Hi Alice."),
        "the prefix is not repeated"
    );
    turn_with(&first, key, from(222222, "Bo(b)", "me too"))
        .await
        .0
        .unwrap();
    first.shutdown().await;
    // The salt is kept: after a restart the same person has the same name.
    let second = app(&s, &[]).await;
    turn_with(&second, key, from(111111, "Alice", "back"))
        .await
        .0
        .unwrap();
    let stored = second.store.history(key).await.unwrap();
    assert_eq!(
        stored[0].author,
        Some(Author {
            id: 111111,
            name: "Alice".into()
        })
    );
    second.shutdown().await;

    let requests = s.model.requests();
    let user = |i: usize| requests[i]["user"].as_str().unwrap().to_owned();
    for request in &requests {
        let pseudonym = request["user"].as_str().unwrap();
        assert!(
            pseudonym.starts_with("u_") && pseudonym.len() == 18,
            "{pseudonym}"
        );
        assert!(!pseudonym.contains("111111") && !pseudonym.contains("222222"));
        assert_eq!(request["session_id"], key);
    }
    assert_ne!(user(0), user(1));
    assert_eq!(user(0), user(2));
    let sent = messages(&requests[2]);
    assert!(sent[0]["content"].as_str().unwrap().contains("<@id>"));
    assert_eq!(sent[1]["content"], "<@111111> (Alice): hello");
    assert_eq!(sent[2]["content"], "Hi Alice.");
    assert_eq!(sent[3]["content"], "<@222222> (Bob): me too");
}

#[tokio::test]
async fn a_plain_openai_server_gets_plain_fields_and_still_reports_usage() {
    support::needs_servers!();
    let s = setup(
        Api::OpenAi,
        json!({"fs": support::filesystem(std::path::Path::new("/tmp"))}),
    )
    .await;
    s.model.script([
        call("c1", "fs__list_allowed_directories", "{}"),
        text("Listed."),
        text("Second."),
    ]);
    let app = app(&s, &[("DEFAULT_MODEL", "test/tools")]).await;
    turn(&app, "terminal:t", "list").await.0.unwrap();
    turn(&app, "terminal:t", "again").await.0.unwrap();
    assert_eq!(s.model.rejected(), Vec::<String>::new());
    let requests = s.model.requests();
    assert_eq!(requests.len(), 3);
    // The server's list says nothing of tools: they are sent anyway.
    assert!(
        requests[0]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );
    // Nor of the context: the fallback keeps the earlier exchange.
    assert_eq!(support::user_said(&requests[2]), ["list", "again"]);
    let usage = app.store.usage("terminal:t").await.unwrap();
    assert_eq!((usage.responses, usage.prompt_tokens), (3, 300));
    assert!(
        s.model.attribution().iter().all(|a| *a == (None, None)),
        "attribution is OpenRouter's"
    );
    app.shutdown().await;
}

/// A tool call cut by the output limit inside its arguments, as
/// llama-server streams it.
fn cut_call() -> Reply {
    sse_reply(
        &[
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "cut1",
                "type": "function", "function": {"name": "fs__write_file", "arguments": "{\"path\": \"/tmp/x\", \"content\": \"aaa"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 384}}),
        ],
        true,
    )
}

#[tokio::test]
async fn a_tool_call_cut_at_the_output_limit_does_not_wedge_the_conversation() {
    support::needs_servers!();
    let s = setup(
        Api::OpenAi,
        json!({"fs": support::filesystem(std::path::Path::new("/tmp"))}),
    )
    .await;
    s.model
        .script([cut_call(), text("I will write less."), text("Still here.")]);
    let app = app(&s, &[]).await;
    turn(&app, "terminal:t", "write a long file")
        .await
        .0
        .unwrap();
    let (result, _) = turn(&app, "terminal:t", "and now?").await;
    assert!(result.unwrap().answered, "{:?}", s.model.rejected());
    let requests = s.model.requests();
    let sent = messages(&requests[1]);
    assert_eq!(sent[1]["tool_calls"][0]["function"]["arguments"], "{}");
    let result = support::tool_results(&requests[1]);
    assert!(
        result[0].contains("cut off at the model's output limit"),
        "{result:?}"
    );
    assert!(
        !std::path::Path::new("/tmp/x").exists(),
        "the cut call did not run"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_reply_cut_before_it_said_anything_is_not_kept() {
    let s = setup(Api::OpenRouter, json!({})).await;
    s.model.script([
        sse_reply(
            &[
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
            ],
            true,
        ),
        text("Here it is."),
    ]);
    let app = app(&s, &[]).await;
    let (result, events) = turn(&app, "terminal:t", "think hard").await;
    assert!(
        matches!(
            result,
            Err(TurnError::Model(ModelError::NothingBeforeLimit))
        ),
        "{result:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TurnEvent::Error(t) if t.contains("output limit")))
    );
    // An empty assistant message in the history would be refused from now on.
    let (result, _) = turn(&app, "terminal:t", "shorter, please").await;
    assert!(result.unwrap().answered, "{:?}", s.model.rejected());
    app.shutdown().await;
}

#[tokio::test]
async fn a_history_stored_with_cut_arguments_is_repaired_on_load() {
    support::needs_servers!();
    let s = setup(
        Api::OpenAi,
        json!({"fs": support::filesystem(std::path::Path::new("/tmp"))}),
    )
    .await;
    s.model.script([text("Repaired.")]);
    let app = app(&s, &[]).await;
    let key = "terminal:old";
    let broken = Message {
        role: Some(Role::Assistant),
        content: None,
        tool_calls: vec![ToolCall {
            id: "old1".into(),
            name: "fs__write_file".into(),
            arguments: "{\"path\": \"/tmp/y\", \"con".into(),
        }],
        ..Default::default()
    };
    app.store
        .append(
            key,
            &[
                Message::user("write"),
                broken,
                Message::tool_result("old1", "ERROR: cut"),
                Message::assistant("Cut."),
            ],
        )
        .await
        .unwrap();
    let (result, _) = turn(&app, key, "go on").await;
    assert!(result.unwrap().answered, "{:?}", s.model.rejected());
    let sent = messages(&s.model.requests()[0]).clone();
    assert_eq!(sent[1]["tool_calls"][0]["function"]["arguments"], "{}");
    app.shutdown().await;
}

fn record(cost: f64) -> Value {
    json!({"id": "x", "total_cost": cost, "tokens_prompt": 1100, "tokens_completion": 7,
           "native_tokens_prompt": 1200, "native_tokens_completion": 8,
           "native_tokens_cached": 1000, "cancelled": false})
}

#[tokio::test]
async fn a_reply_cut_midstream_is_billed_once_openrouter_has_its_record() {
    let s = setup(Api::OpenRouter, json!({})).await;
    s.model.script([text("Fine."), Reply::MidStreamError]);
    // Not recorded yet at the first lookup; then the record.
    s.model.generation("gen-2", [Value::Null, record(0.0123)]);
    let app = app(&s, &[]).await;
    turn(&app, "terminal:t", "hello").await.0.unwrap();
    let (result, _) = turn(&app, "terminal:t", "and then?").await;
    assert!(result.is_err());
    let before = app.store.usage("terminal:t").await.unwrap();
    assert_eq!(before.responses, 1, "only the answer counts so far");

    let now = mcpcord::conversation::billing::unix_now();
    assert_eq!(app.bill_cut_replies(now).await.unwrap(), 0, "not due yet");
    assert_eq!(
        app.bill_cut_replies(now + 10).await.unwrap(),
        0,
        "404: not ready"
    );
    assert_eq!(
        app.bill_cut_replies(now + 10).await.unwrap(),
        0,
        "waits its turn"
    );
    assert_eq!(app.bill_cut_replies(now + 60).await.unwrap(), 1);
    assert_eq!(
        app.bill_cut_replies(now + 100_000).await.unwrap(),
        0,
        "billed once"
    );
    assert_eq!(
        s.model.looked_up(),
        ["gen-2", "gen-2"],
        "an answer with usage is never looked up"
    );
    let after = app.store.usage("terminal:t").await.unwrap();
    assert_eq!(after.responses, 2);
    assert_eq!(after.prompt_tokens, before.prompt_tokens + 1200);
    assert_eq!(after.cached_tokens, before.cached_tokens + 1000);
    assert!(
        (after.cost - before.cost - 0.0123).abs() < 1e-9,
        "{after:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_turn_stopped_midstream_is_billed_and_a_missing_record_is_given_up() {
    let s = setup(Api::OpenRouter, json!({})).await;
    s.model
        .script([Reply::Stall("Thinking".into()), Reply::MidStreamError]);
    s.model.generation("gen-1-header", [record(0.5)]);
    let app = std::sync::Arc::new(app(&s, &[]).await);
    let (running, mut events) = support::spawn_turn(&app, "terminal:t", "write a lot");
    support::wait_for_event(&mut events, |e| matches!(e, TurnEvent::Text(_))).await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    app.engine.flush().await;
    // The second reply is never recorded by OpenRouter.
    let (result, _) = turn(&app, "terminal:t", "again").await;
    assert!(result.is_err());

    let mut now = mcpcord::conversation::billing::unix_now();
    let mut billed = 0;
    for _ in 0..mcpcord::conversation::billing::MAX_LOOKUPS + 2 {
        now += 3600;
        billed += app.bill_cut_replies(now).await.unwrap();
    }
    assert_eq!(billed, 1);
    let looked_up = s.model.looked_up();
    assert_eq!(looked_up[0], "gen-1-header", "the header's id is used");
    assert_eq!(
        looked_up.iter().filter(|id| *id == "gen-2").count(),
        mcpcord::conversation::billing::MAX_LOOKUPS as usize,
        "a record that never comes is given up: {looked_up:?}"
    );
    let usage = app.store.usage("terminal:t").await.unwrap();
    assert!((usage.cost - 0.5).abs() < 1e-9, "{usage:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn inline_think_blocks_are_kept_as_reasoning_and_never_shown() {
    let s = setup(Api::OpenAi, json!({})).await;
    s.model.script([
        text("<think>The user wants a sum. 2 + 2 is 4.</think>\n\nIt is 4."),
        text("You are welcome."),
    ]);
    let app = app(&s, &[]).await;
    let (result, events) = turn(&app, "terminal:t", "what is 2 + 2?").await;
    result.unwrap();
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            TurnEvent::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, "It is 4.");
    assert_eq!(answer(&events), Some("It is 4."));
    let stored = app.store.history("terminal:t").await.unwrap();
    assert_eq!(stored[1].text(), "It is 4.");
    assert_eq!(
        stored[1].reasoning.as_deref(),
        Some("The user wants a sum. 2 + 2 is 4.")
    );
    turn(&app, "terminal:t", "thanks").await.0.unwrap();
    let sent = messages(&s.model.requests()[1]).clone();
    assert_eq!(sent[1]["content"], "It is 4.");
    app.shutdown().await;
}
