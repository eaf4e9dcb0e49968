//! The MCP host against an rmcp server running in this process (Streamable
//! HTTP on loopback): tool list changes, strict schemas, parallel calls.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpcord::config::Limits;
use mcpcord::conversation::ToolHost;
use mcpcord::mcp::{McpHost, config};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListPromptsResult,
    ListToolsResult, PaginatedRequestParams, Prompt, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A small server: `add`; `meet`, which answers "met" only once three calls
/// are inside it at the same time; and `unlock`, which adds a `secret` tool
/// and announces `tools/list_changed`.
#[derive(Clone)]
struct Toolbox {
    unlocked: Arc<Mutex<bool>>,
    meeting: Arc<tokio::sync::Barrier>,
}

fn object(schema: Value) -> Arc<serde_json::Map<String, Value>> {
    Arc::new(schema.as_object().unwrap().clone())
}

impl Toolbox {
    fn tools(&self) -> Vec<Tool> {
        let mut tools = vec![
            Tool::new(
                "add",
                "Adds two numbers",
                object(json!({
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "object",
                    "properties": {"a": {"type": "number"}, "b": {"type": ["number", "null"]}},
                    "required": ["a", "b", "c"]
                })),
            ),
            Tool::new(
                "meet",
                "Waits for two other callers",
                object(json!({"type": "object"})),
            ),
            Tool::new(
                "unlock",
                "Reveals another tool",
                object(json!({"type": "object"})),
            )
            .annotate(ToolAnnotations::new().read_only(true)),
            Tool::new(
                "era",
                "Says which protocol revision the request came in",
                object(json!({"type": "object"})),
            ),
            Tool::new(
                "big",
                "Answers with `bytes` bytes of text",
                object(json!({"type": "object", "properties": {"bytes": {"type": "integer"}}})),
            ),
        ];
        if *self.unlocked.lock().unwrap() {
            tools.push(Tool::new(
                "secret",
                "The hidden tool",
                object(json!({"type": "object"})),
            ));
        }
        tools
    }
}

impl ServerHandler for Toolbox {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_prompts()
                .enable_prompts_list_changed()
                .build(),
        )
        .with_instructions("Add numbers with add.")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let mut prompts = vec![Prompt::new("greet", Some("Says hello"), None)];
        if *self.unlocked.lock().unwrap() {
            prompts.push(Prompt::new("confide", Some("Shares the secret"), None));
        }
        Ok(ListPromptsResult::with_all_items(prompts))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let args = request.arguments.unwrap_or_default();
        let text = match request.name.as_ref() {
            "add" => {
                let sum = args.get("a").and_then(Value::as_f64).unwrap_or(0.0)
                    + args.get("b").and_then(Value::as_f64).unwrap_or(0.0);
                sum.to_string()
            }
            "meet" => {
                let met = tokio::time::timeout(Duration::from_secs(5), self.meeting.wait()).await;
                if met.is_ok() { "met" } else { "alone" }.to_owned()
            }
            "unlock" => {
                *self.unlocked.lock().unwrap() = true;
                let _ = context.peer.notify_tool_list_changed().await;
                let _ = context.peer.notify_prompt_list_changed().await;
                "unlocked".to_owned()
            }
            "secret" => "the secret is 42".to_owned(),
            "era" => match context.meta.protocol_version() {
                Some(version) => version.to_string(),
                None => "initialize-era".to_owned(),
            },
            "big" => "x".repeat(args.get("bytes").and_then(Value::as_u64).unwrap_or(0) as usize),
            other => {
                return Err(McpError::invalid_params(
                    format!("Unknown tool: {other}"),
                    None,
                ));
            }
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }
}

async fn serve(stop: &CancellationToken) -> String {
    let toolbox = Toolbox {
        unlocked: Arc::default(),
        meeting: Arc::new(tokio::sync::Barrier::new(3)),
    };
    let base = support::serve_router(support::mcp_router(toolbox, stop), stop).await;
    format!("{base}/mcp")
}

fn host(url: &str) -> McpHost {
    host_with(url, Limits::default())
}

fn host_with(url: &str, limits: Limits) -> McpHost {
    mcpcord::app::install_crypto();
    let text = json!({"mcpServers": {"box": {"url": url}}}).to_string();
    McpHost::new(config::parse(&text, "mcp.json", &|_| None).unwrap(), limits)
}

#[tokio::test]
async fn an_http_result_over_the_size_limit_fails_and_the_server_stays_usable() {
    let stop = CancellationToken::new();
    let url = serve(&stop).await;
    let limits = Limits {
        mcp_max_message_bytes: 1024 * 1024,
        tool_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let host = host_with(&url, limits);
    host.tools("a").await;
    let started = Instant::now();
    let outcome = host
        .call("a", "box__big", json!({"bytes": 3 * 1024 * 1024}))
        .await;
    assert!(
        outcome.is_error,
        "{}",
        &outcome.content[..200.min(outcome.content.len())]
    );
    assert!(
        !outcome.content.contains("did not finish"),
        "{}",
        outcome.content
    );
    assert!(
        outcome
            .content
            .contains("larger than 1 MiB (MCP_MAX_MESSAGE_BYTES)"),
        "{}",
        outcome.content
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let small = host.call("a", "box__big", json!({"bytes": 5})).await;
    assert_eq!(small.content, "xxxxx");
    host.shutdown().await;
    stop.cancel();
}

#[tokio::test]
async fn list_changed_notifications_refresh_the_tools_and_prompts() {
    let stop = CancellationToken::new();
    let host = host(&serve(&stop).await);
    let names = |specs: &[mcpcord::conversation::ToolSpec]| -> Vec<String> {
        specs.iter().map(|t| t.name.clone()).collect()
    };
    let before = host.tools("a").await;
    assert!(before.problems.is_empty(), "{:?}", before.problems);
    assert_eq!(
        names(&before.specs),
        [
            "box__add",
            "box__meet",
            "box__unlock",
            "box__era",
            "box__big"
        ]
    );

    let prompts = |listed: Vec<mcpcord::conversation::offers::PromptInfo>| -> Vec<String> {
        listed.into_iter().map(|p| p.name).collect()
    };
    assert_eq!(prompts(host.prompts("a", &[]).await), ["greet"]);
    let unlocked = host.call("a", "box__unlock", json!({})).await;
    assert_eq!(unlocked.content, "unlocked");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = host.tools("a").await;
        if names(&now.specs).contains(&"box__secret".to_owned()) {
            break;
        }
        assert!(Instant::now() < deadline, "the list change never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secret = host.call("a", "box__secret", json!({})).await;
    assert_eq!(secret.content, "the secret is 42");
    // The prompts were listed before; the change is seen without a restart.
    loop {
        if prompts(host.prompts("a", &[]).await) == ["greet", "confide"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the prompt list change never showed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.shutdown().await;
    stop.cancel();
}

#[tokio::test]
async fn schemas_are_normalised_and_calls_run_in_parallel() {
    let stop = CancellationToken::new();
    let host = std::sync::Arc::new(host(&serve(&stop).await));
    let tools = host.tools("a").await;
    let add = tools.specs.iter().find(|t| t.name == "box__add").unwrap();
    assert_eq!(
        add.parameters,
        json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]})
    );
    let meet = tools.specs.iter().find(|t| t.name == "box__meet").unwrap();
    assert_eq!(meet.parameters, json!({"type": "object", "properties": {}}));

    assert_eq!(
        host.call("a", "box__add", json!({"a": 2, "b": 3}))
            .await
            .content,
        "5"
    );
    // Three calls on one session are inside the server at once.
    let calls = (0..3).map(|_| {
        let host = host.clone();
        tokio::spawn(async move { host.call("a", "box__meet", json!({})).await })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.unwrap().content, "met", "calls ran one at a time");
    }
    std::sync::Arc::into_inner(host).unwrap().shutdown().await;
    stop.cancel();
}

#[tokio::test]
async fn the_engine_runs_all_calls_of_a_reply_at_once() {
    let stop = CancellationToken::new();
    let url = serve(&stop).await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"box": {"url": url}}));
    let model = support::FakeModel::start().await;
    let calls = (0..3)
        .map(|i| (format!("m{i}"), "box__meet".to_owned(), "{}".to_owned()))
        .collect();
    model.script([support::Reply::Calls(calls), support::text("All met.")]);
    let app = mcpcord::app::App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap();
    let (events, _received) = tokio::sync::mpsc::unbounded_channel();
    let outcome = app
        .engine
        .run_turn(
            "terminal:t",
            mcpcord::conversation::Message::user("meet"),
            &events,
            &mcpcord::conversation::ApproveAll,
        )
        .await
        .unwrap();
    assert_eq!(outcome.tool_calls, 3);
    let results = support::tool_results(&model.requests()[1]);
    assert_eq!(
        results,
        ["met", "met", "met"],
        "the calls did not run concurrently"
    );
    app.shutdown().await;
    stop.cancel();
}

/// Declines `box__add`, approves the rest, and remembers what it was asked.
#[derive(Default)]
struct Recorder {
    asked: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl mcpcord::conversation::Approver for Recorder {
    async fn decide(
        &self,
        request: &mcpcord::conversation::ApprovalRequest,
    ) -> mcpcord::conversation::Decision {
        self.asked.lock().unwrap().push(request.tool.clone());
        if request.tool == "box__add" {
            mcpcord::conversation::Decision::Decline("not today".into())
        } else {
            mcpcord::conversation::Decision::Approve
        }
    }
}

#[tokio::test]
async fn approvals_follow_the_server_policy_and_declines_reach_the_model() {
    let stop = CancellationToken::new();
    let url = serve(&stop).await;
    for (policy, expected) in [
        ("annotations", vec!["box__add"]),
        ("ask", vec!["box__add", "box__unlock"]),
        ("auto", vec![]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        support::write_mcp(dir.path(), json!({"box": {"url": url, "approval": policy}}));
        let model = support::FakeModel::start().await;
        model.script([
            support::Reply::Calls(vec![
                ("a1".into(), "box__add".into(), r#"{"a":1,"b":2}"#.into()),
                ("a2".into(), "box__unlock".into(), "{}".into()),
            ]),
            support::text("Done."),
        ]);
        let app = mcpcord::app::App::build(&support::config(&model, dir.path(), &[]))
            .await
            .unwrap();
        let recorder = Recorder::default();
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        app.engine
            .run_turn(
                "terminal:t",
                mcpcord::conversation::Message::user("go"),
                &events,
                &recorder,
            )
            .await
            .unwrap();
        drop(events);
        let mut asked = recorder.asked.lock().unwrap().clone();
        asked.sort();
        assert_eq!(asked, expected, "policy {policy}");
        let results = support::tool_results(&model.requests()[1]);
        let mut warned = false;
        while let Some(event) = received.recv().await {
            if let mcpcord::conversation::TurnEvent::Warning(w) = event {
                warned |= w.contains("box__add was declined: not today");
            }
        }
        if policy == "auto" {
            assert_eq!(results[0], "3");
            assert!(!warned);
        } else {
            assert!(
                results[0].starts_with("ERROR: the user declined")
                    && results[0].contains("not today"),
                "{}",
                results[0]
            );
            assert!(warned, "the user is told about the decline");
        }
        assert_eq!(results[1], "unlocked");
        app.shutdown().await;
    }
    stop.cancel();
}

#[tokio::test]
async fn a_server_of_the_current_revision_is_spoken_to_statelessly_over_http() {
    let stop = CancellationToken::new();
    let url = serve(&stop).await;
    let host = host(&url);
    let tools = host.tools("c").await;
    assert_eq!(
        tools.instructions,
        [("box".to_owned(), "Add numbers with add.".to_owned())]
    );
    let outcome = host.call("c", "box__era", json!({})).await;
    assert_eq!(outcome.content, "2026-07-28", "{outcome:?}");
    host.shutdown().await;
    stop.cancel();
}
