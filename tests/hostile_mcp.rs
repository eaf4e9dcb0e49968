//! MCP servers that misbehave (tests/peers/hostile_mcp.py): each costs one
//! bounded failure, never a hang, a memory blow-up or a leaked secret.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcpcord::config::Limits;
use mcpcord::conversation::ToolHost;
use mcpcord::mcp::{self, McpHost, config};
use serde_json::{Value, json};

/// The Python interpreter itself, not a shim script that adds variables.
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let output = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    })
}

fn hostile(mode: &str, arg: Option<&str>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/hostile_mcp.py");
    let mut args = vec![script.display().to_string(), mode.to_owned()];
    args.extend(arg.map(str::to_owned));
    json!({"command": python(), "args": args})
}

fn host(servers: Value, limits: Limits) -> McpHost {
    let text = json!({"mcpServers": servers}).to_string();
    McpHost::new(config::parse(&text, "mcp.json", &|_| None).unwrap(), limits)
}

fn quick() -> Limits {
    Limits {
        mcp_start_timeout: Duration::from_secs(2),
        mcp_list_timeout: Duration::from_secs(2),
        tool_timeout: Duration::from_secs(20),
        ..Limits::default()
    }
}

#[tokio::test]
async fn a_server_that_never_answers_is_bounded_then_backed_off() {
    for (mode, expected) in [
        ("never-init", "did not finish starting within 2 s"),
        (
            "silent-list",
            "took longer than 2 s (MCP_LIST_TIMEOUT_SECS)",
        ),
    ] {
        let host = host(json!({"mute": hostile(mode, None)}), quick());
        let listing = host.list("a").await;
        assert!(listing.tools.is_empty());
        let problem = &listing.problems[0];
        assert!(problem.contains(expected), "{problem}");
        assert!(
            problem.contains("it will be tried again in 5 s"),
            "{problem}"
        );
        // The next turn does not wait for the server again.
        let started = Instant::now();
        let again = host.tools("b").await;
        assert!(started.elapsed() < quick().mcp_list_timeout);
        assert!(
            again.problems[0].contains(expected) && again.problems[0].contains("tried again in"),
            "{:?}",
            again.problems
        );
        host.shutdown().await;
    }
}

#[tokio::test]
async fn endless_pages_stop_at_the_page_bound() {
    let host = host(json!({"pages": hostile("endless-pages", None)}), quick());
    let listing = host.list("a").await;
    assert!(listing.problems.is_empty(), "{:?}", listing.problems);
    assert_eq!(listing.tools.len(), mcp::MAX_LIST_PAGES);
    assert!(
        listing.warnings[0].1.contains("goes on past 32 pages"),
        "{:?}",
        listing.warnings
    );
    host.shutdown().await;
}

#[tokio::test]
async fn exponential_schemas_are_replaced_by_an_open_object() {
    let host = host(json!({"refs": hostile("exponential-refs", None)}), quick());
    let listing = host.list("a").await;
    let deep = listing
        .tools
        .iter()
        .find(|t| t.tool.name == "deep")
        .unwrap();
    assert_eq!(deep.tool.parameters, mcp::schema::open_object());
    let (_, warning) = &listing.warnings[0];
    assert!(
        warning.contains("\"deep\"") && warning.contains("once its $refs are inlined"),
        "{warning}"
    );
    host.shutdown().await;
}

#[tokio::test]
async fn check_stays_small_on_an_exponential_schema() {
    // Under a 4 GB address-space limit: without the size bound this schema
    // needs far more, and the process would abort instead of reporting.
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(
        dir.path(),
        json!({"refs": hostile("exponential-refs", None)}),
    );
    let model = support::FakeModel::start().await;
    let mut check = support::mcpcord(&model, dir.path());
    check.arg("check");
    let mut cmd = support::wrapped(&["prlimit", "--as=4000000000"], &check);
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("MCP server \"refs\": 2 tool(s)"), "{text}");
    assert!(
        text.contains("note     MCP server \"refs\": the tool \"deep\" is offered with an open argument schema"),
        "{text}"
    );
}

#[tokio::test]
async fn one_bad_tool_or_block_loses_only_itself() {
    let host = host(json!({"bad": hostile("bad-tools", None)}), quick());
    let tools = host.tools("a").await;
    assert!(tools.problems.is_empty(), "{:?}", tools.problems);
    let names: Vec<&str> = tools.specs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "bad__echo",
            "bad__no_schema",
            "bad__string_schema",
            "bad__mixed"
        ]
    );
    assert_eq!(tools.specs[1].parameters, mcp::schema::open_object());
    let outcome = host.call("a", "bad__mixed", json!({})).await;
    assert!(!outcome.is_error, "{}", outcome.content);
    assert_eq!(outcome.content, "before\n[hologram content]\nafter");
    host.shutdown().await;
}

#[tokio::test]
async fn tools_are_capped_per_server_and_per_request() {
    let limits = Limits {
        mcp_max_tools_per_server: 100,
        ..quick()
    };
    let servers = json!({
        "one": hostile("many-tools", Some("150")),
        "two": hostile("many-tools", Some("80")),
    });
    let host = host(servers, limits);
    let listing = host.list("a").await;
    let from = |server: &str| listing.tools.iter().filter(|t| t.server == server).count();
    assert_eq!((from("one"), from("two")), (100, 81));
    let (server, warning) = &listing.warnings[0];
    assert_eq!(server, "one");
    assert!(
        warning.contains("more than 100 tools (MCP_MAX_TOOLS_PER_SERVER)")
            && warning.contains("tool_99, tool_100"),
        "{warning}"
    );
    let tools = host.tools("a").await;
    assert_eq!(tools.specs.len(), mcp::MAX_TOOLS_PER_REQUEST);
    host.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_floods_on_stderr_do_not_block_the_server() {
    let host = host(json!({"noisy": hostile("bad-stderr", None)}), quick());
    host.tools("a").await;
    // Each call writes about 60 KB of broken stderr first: a reader that
    // stopped would leave the server blocked on a full pipe by the second.
    for i in 0..4 {
        let outcome = host
            .call("a", "noisy__echo", json!({"text": i.to_string()}))
            .await;
        assert_eq!(outcome.content, format!("echo: {i}"));
    }
    host.shutdown().await;
}

#[tokio::test]
async fn a_result_over_the_size_limit_fails_at_once_and_the_session_goes_on() {
    let limits = Limits {
        mcp_max_message_bytes: 4 * 1024 * 1024,
        tool_timeout: Duration::from_secs(300),
        ..quick()
    };
    let host = host(json!({"big": hostile("huge-result", Some("6"))}), limits);
    host.tools("a").await;
    let outcome = host.call("a", "big__big", json!({})).await;
    assert!(outcome.is_error);
    assert!(
        outcome
            .content
            .contains("was 6.0 MiB, more than the limit of 4.0 MiB (MCP_MAX_MESSAGE_BYTES)"),
        "{}",
        outcome.content
    );
    let after = host
        .call("a", "big__echo", json!({"text": "still here"}))
        .await;
    assert_eq!(after.content, "echo: still here");
    host.shutdown().await;
}

#[tokio::test]
async fn a_notification_flood_is_absorbed() {
    let host = host(json!({"flood": hostile("flood", None)}), quick());
    let tools = host.tools("a").await;
    assert!(tools.problems.is_empty(), "{:?}", tools.problems);
    let outcome = host.call("a", "flood__echo", json!({"text": "hi"})).await;
    assert_eq!(outcome.content, "echo: hi");
    assert_eq!(host.tools("a").await.specs.len(), 1);
    host.shutdown().await;
}

#[tokio::test]
async fn servers_get_a_minimal_environment_and_secrets_stay_out_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.json");
    let given = dir.path().join("given.json");
    let mut with_key = hostile("env", Some(&given.display().to_string()));
    with_key["env"] = json!({"PASSED_KEY": "${OPENROUTER_API_KEY}"});
    support::write_mcp(
        dir.path(),
        json!({"plain": hostile("env", Some(&plain.display().to_string())), "given": with_key}),
    );
    let model = support::FakeModel::start().await;
    let discord = support::discord::FakeDiscord::start().await;
    let secret = support::KEY;
    let discord_secret = support::discord::TOKEN;
    let mut cmd = support::mcpcord(&model, dir.path());
    cmd.arg("check")
        .stdin(Stdio::null())
        .env("HOME", dir.path())
        .env("LANG", "C.UTF-8")
        .env("DISCORD_TOKEN", discord_secret)
        .env("DISCORD_API_BASE_URL", &discord.base_url)
        .env("RUST_LOG", "mcpcord=debug");
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let read = |path: &Path| -> serde_json::Map<String, Value> {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let plain_env = read(&plain);
    // Python itself adds LC_CTYPE when no locale is set (PEP 538).
    let names: Vec<&str> = plain_env
        .keys()
        .map(String::as_str)
        .filter(|n| *n != "LC_CTYPE")
        .collect();
    assert_eq!(names, ["HOME", "PATH"], "{log}");
    let given_env = read(&given);
    assert_eq!(given_env["PASSED_KEY"], secret);
    assert!(!given_env.contains_key("DISCORD_TOKEN"));
    // The server that was given the key printed it; the log shows it redacted.
    assert!(log.contains("PASSED_KEY=[redacted]"), "{log}");
    assert!(
        !log.contains(secret) && !log.contains(discord_secret),
        "{log}"
    );
    assert!(output.status.success(), "{log}");
}

#[tokio::test]
async fn a_missing_working_directory_is_named_as_such() {
    let mut server = hostile("bad-tools", None);
    server["cwd"] = json!("/nonexistent/mcpcord-test");
    let host = host(json!({"lost": server}), quick());
    let listing = host.list("a").await;
    let problem = &listing.problems[0];
    assert!(
        problem
            .contains("its working directory /nonexistent/mcpcord-test (\"cwd\") does not exist"),
        "{problem}"
    );
    host.shutdown().await;
}
