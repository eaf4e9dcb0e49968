//! The MCP host against real servers: Streamable HTTP, session scopes, the
//! LRU cap, idle closing, crash restarts, and no orphan processes.

use crate::support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcpcord::config::Limits;
use mcpcord::conversation::ToolHost;
use mcpcord::mcp::{McpHost, config};
use serde_json::{Value, json};

fn host(servers: Value, limits: Limits) -> McpHost {
    mcpcord::app::install_crypto();
    let text = json!({"mcpServers": servers}).to_string();
    let env = |name: &str| (name == "GREETING").then(|| "hello from the environment".to_owned());
    McpHost::new(config::parse(&text, "mcp.json", &env).unwrap(), limits)
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(marker)
                .then_some(pid)
        })
        .collect()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn fs_server(root: &Path) -> Value {
    support::filesystem(root)
}

#[tokio::test]
async fn each_conversation_gets_its_own_session_capped_by_lru() {
    support::needs_servers!();
    let root = tempfile::tempdir().unwrap();
    let marker = root.path().display().to_string();
    let limits = Limits {
        max_sessions_per_server: 2,
        ..Limits::default()
    };
    let host = host(json!({"fs": fs_server(root.path())}), limits);
    for conversation in ["a", "b"] {
        let tools = host.tools(conversation).await;
        assert!(tools.problems.is_empty(), "{:?}", tools.problems);
        assert!(tools.specs.iter().any(|t| t.name == "fs__read_text_file"));
    }
    assert_eq!(host.open_sessions(), 2);
    wait_until("two servers run", || processes_with(&marker).len() == 2).await;
    // A third conversation closes the least recently used session.
    host.tools("c").await;
    assert_eq!(host.open_sessions(), 2);
    wait_until("the evicted server is gone", || {
        processes_with(&marker).len() == 2
    })
    .await;
    host.close_conversation("b").await;
    assert_eq!(host.open_sessions(), 1);
    host.shutdown().await;
    wait_until("no server is left running", || {
        processes_with(&marker).is_empty()
    })
    .await;
}

#[tokio::test]
async fn idle_sessions_are_closed_and_started_again_when_needed() {
    support::needs_servers!();
    let root = tempfile::tempdir().unwrap();
    let marker = root.path().display().to_string();
    let limits = Limits {
        session_idle_timeout: Duration::ZERO,
        ..Limits::default()
    };
    let host = host(json!({"fs": fs_server(root.path())}), limits);
    host.tools("a").await;
    host.close_idle().await;
    assert_eq!(host.open_sessions(), 0);
    wait_until("the idle server is gone", || {
        processes_with(&marker).is_empty()
    })
    .await;
    let outcome = host
        .call("a", "fs__list_allowed_directories", json!({}))
        .await;
    assert!(!outcome.is_error, "{}", outcome.content);
    host.shutdown().await;
}

#[tokio::test]
async fn a_crashed_server_is_reported_and_restarted() {
    support::needs_servers!();
    let root = tempfile::tempdir().unwrap();
    let marker = root.path().display().to_string();
    let host = host(json!({"fs": fs_server(root.path())}), Limits::default());
    host.tools("a").await;
    let before = processes_with(&marker);
    assert_eq!(before.len(), 1);
    Command::new("kill")
        .arg("-9")
        .arg(before[0].to_string())
        .status()
        .unwrap();
    // The first call after the crash either fails with a clear message or
    // already runs on a fresh session; the one after it must work.
    let first = host
        .call("a", "fs__list_allowed_directories", json!({}))
        .await;
    if first.is_error {
        assert!(
            first.content.contains("started again") || first.content.contains("unavailable"),
            "{}",
            first.content
        );
    }
    let second = host
        .call("a", "fs__list_allowed_directories", json!({}))
        .await;
    assert!(!second.is_error, "{}", second.content);
    let after = processes_with(&marker);
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
    host.shutdown().await;
}

#[tokio::test]
async fn a_server_that_cannot_start_is_a_problem_not_a_failure() {
    support::needs_servers!();
    let root = tempfile::tempdir().unwrap();
    let host = host(
        json!({"broken": {"command": "/nonexistent/mcp-server"}, "fs": fs_server(root.path())}),
        Limits::default(),
    );
    let tools = host.tools("a").await;
    assert_eq!(tools.problems.len(), 1);
    assert!(
        tools.problems[0].contains("\"broken\""),
        "{}",
        tools.problems[0]
    );
    assert!(!tools.specs.is_empty());
    host.shutdown().await;
}

#[tokio::test]
async fn streamable_http_shared_server_with_env_and_rich_results() {
    support::needs_servers!();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut server: Child = Command::new("node")
        .arg(support::node_server("server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the HTTP server listens", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;

    let host = host(
        json!({
            "web": {"url": format!("http://127.0.0.1:{port}/mcp"), "scope": "shared",
                    "headers": {"X-Greeting": "${GREETING}"}, "blockedTools": ["get-env"]},
            "local": {"command": "node", "args": [support::node_server("server-everything")],
                      "env": {"GREETING": "${GREETING}"}, "allowedTools": ["get-env", "echo"]}
        }),
        Limits {
            tool_result_max_chars: 4000,
            ..Limits::default()
        },
    );
    let tools = host.tools("a").await;
    assert!(tools.problems.is_empty(), "{:?}", tools.problems);
    let names: Vec<&str> = tools.specs.iter().map(|t| t.name.as_str()).collect();
    assert!(
        names.contains(&"web__echo") && names.contains(&"web__get-tiny-image"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"web__get-env"),
        "blockedTools must hide get-env"
    );
    let mut local: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("local__"))
        .collect();
    local.sort();
    assert_eq!(local, ["local__echo", "local__get-env"]);
    for spec in &tools.specs {
        assert!(spec.parameters["properties"].is_object(), "{}", spec.name);
        assert!(spec.parameters.get("$schema").is_none(), "{}", spec.name);
    }

    let echo = host.call("a", "web__echo", json!({"message": "hi"})).await;
    assert!(
        echo.content.contains("hi") && !echo.is_error,
        "{}",
        echo.content
    );
    let image = host.call("a", "web__get-tiny-image", json!({})).await;
    assert!(image.content.contains("image/png"), "{}", image.content);
    let structured = host
        .call(
            "a",
            "web__get-structured-content",
            json!({"location": "New York"}),
        )
        .await;
    assert!(
        !structured.is_error && structured.content.contains("temperature"),
        "{}",
        structured.content
    );
    let env = host.call("a", "local__get-env", json!({})).await;
    assert!(
        env.content.contains("hello from the environment"),
        "env values reach the child"
    );
    // Shared scope: another conversation reuses the same HTTP session.
    let before = host.open_sessions();
    host.tools("b").await;
    assert_eq!(
        host.open_sessions(),
        before + 1,
        "only the per-conversation server starts again"
    );
    host.shutdown().await;
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn a_slow_tool_times_out_with_a_message() {
    support::needs_servers!();
    let host = host(
        json!({"everything": {"command": "node", "args": [support::node_server("server-everything")], "timeoutSecs": 1}}),
        Limits::default(),
    );
    host.tools("a").await;
    let started = Instant::now();
    let outcome = host
        .call(
            "a",
            "everything__trigger-long-running-operation",
            json!({"duration": 30, "steps": 3}),
        )
        .await;
    assert!(
        outcome.is_error && outcome.content.contains("did not finish within 1 seconds"),
        "{}",
        outcome.content
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    host.shutdown().await;
}

#[tokio::test]
async fn prompts_and_resources_of_a_real_server_are_listed_filled_in_and_read() {
    use mcpcord::conversation::offers::ResourceBody;
    support::needs_servers!();
    let host = host(
        json!({"everything": support::everything()}),
        Limits::default(),
    );
    let prompts = host.prompts("c", &[]).await;
    let args = prompts
        .iter()
        .find(|p| p.name == "args-prompt")
        .expect("the prompt with arguments");
    assert_eq!(args.title, "Arguments Prompt");
    assert_eq!(args.key(), "everything__args-prompt");
    let arguments: Vec<(&str, bool)> = args
        .arguments
        .iter()
        .map(|a| (a.name.as_str(), a.required))
        .collect();
    assert_eq!(arguments, [("city", true), ("state", false)]);
    let mut given = serde_json::Map::new();
    given.insert("city".into(), json!("Paris"));
    let text = host
        .get_prompt("c", "everything", "args-prompt", given, &())
        .await
        .unwrap();
    assert_eq!(text, "What's weather in Paris?");
    let missing = host
        .get_prompt("c", "everything", "no-such-prompt", Default::default(), &())
        .await
        .unwrap_err();
    assert!(
        missing.contains("the tool server \"everything\" could not do it"),
        "{missing}"
    );
    let suggested = host
        .complete_argument("c", "everything", "completable-prompt", "department", "E")
        .await;
    assert_eq!(suggested, ["Engineering"]);
    // Off in this conversation: nothing is offered from it.
    assert!(host.prompts("c", &["everything".into()]).await.is_empty());

    let resources = host.resources("c", &[]).await;
    assert!(
        resources
            .iter()
            .any(|r| !r.template && r.uri == "demo://resource/static/document/architecture.md")
    );
    let template = resources
        .iter()
        .find(|r| r.template)
        .expect("a resource template");
    assert_eq!(template.uri, "demo://resource/dynamic/text/{resourceId}");
    let read = host
        .read_resource("c", "everything", "demo://resource/dynamic/text/3")
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].mime.as_deref(), Some("text/plain"));
    assert!(matches!(&read[0].body, ResourceBody::Text(t) if t.starts_with("Resource 3:")));
    host.shutdown().await;
}
