//! MCP servers that misbehave (tests/peers/hostile_mcp.py): each costs one
//! bounded failure, never a hang, a memory blow-up or a leaked secret.

use crate::support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mcpcord::config::Limits;
use mcpcord::conversation::ToolHost;
use mcpcord::mcp::{self, McpHost, config};
use serde_json::{Value, json};

use support::hostile;

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
        let problem = listing.problems[0].to_string();
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
    let problem = listing.problems[0].to_string();
    assert!(
        problem
            .contains("its working directory /nonexistent/mcpcord-test (\"cwd\") does not exist"),
        "{problem}"
    );
    host.shutdown().await;
}

/// An engine over `host` whose model calls `counted__echo` once per turn.
fn echo_engine(
    host: std::sync::Arc<McpHost>,
    gates: std::collections::HashMap<String, std::sync::Arc<support::memory::Gate>>,
) -> mcpcord::conversation::Engine {
    let model = support::memory::EchoModel {
        tool: "counted__echo".into(),
        gates,
    };
    mcpcord::conversation::Engine::new(
        std::sync::Arc::new(model),
        host,
        std::sync::Arc::new(support::memory::MemoryStore::default()),
        mcpcord::conversation::EngineSettings {
            default_model: "test/model".into(),
            system_prompt: None,
            timezone: jiff::tz::TimeZone::UTC,
            transcription_model: None,
            clock: Default::default(),
            max_tool_rounds: 3,
            fallback_context_tokens: 100_000,
        },
    )
}

/// Runs one turn and returns its answer and warnings.
async fn echo_turn(
    engine: &mcpcord::conversation::Engine,
    conversation: &str,
) -> (String, Vec<String>) {
    use mcpcord::conversation::{ApproveAll, Message, TurnEvent};
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let outcome = engine
        .run_turn(
            conversation,
            Message::user(conversation),
            &events,
            &ApproveAll,
        )
        .await;
    drop(events);
    let (mut answer, mut warnings) = (String::new(), Vec::new());
    while let Some(event) = received.recv().await {
        match event {
            TurnEvent::Answer { text, .. } => answer = text,
            TurnEvent::Warning(text) | TurnEvent::Error(text) => warnings.push(text),
            _ => {}
        }
    }
    assert!(outcome.is_ok(), "{conversation}: {outcome:?} {warnings:?}");
    (answer, warnings)
}

/// The most processes of the `counted` server alive at once, and how many
/// were started, from its log.
fn alive_and_started(log: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut alive, mut most, mut started) = (0usize, 0usize, 0usize);
    for line in text.lines() {
        if line.starts_with("start") {
            alive += 1;
            started += 1;
            most = most.max(alive);
        } else {
            alive = alive.saturating_sub(1);
        }
    }
    (most, started)
}

#[tokio::test]
async fn more_conversations_than_sessions_wait_for_one_and_all_get_their_tools() {
    const CAP: usize = 3;
    const CONVERSATIONS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("starts.log");
    let mut server = hostile("counted", Some(log.to_str().unwrap()));
    server["scope"] = json!("conversation");
    let limits = Limits {
        max_sessions_per_server: CAP,
        ..quick()
    };
    let host = std::sync::Arc::new(host(json!({"counted": server}), limits));
    let engine = echo_engine(host.clone(), Default::default());
    let names: Vec<String> = (0..CONVERSATIONS).map(|i| format!("thread-{i}")).collect();
    let turns = names.iter().map(|name| echo_turn(&engine, name));
    let results = futures::future::join_all(turns).await;
    for (name, (answer, warnings)) in names.iter().zip(&results) {
        assert_eq!(answer, &format!("echo: {name}"), "{warnings:?}");
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
    assert!(host.open_sessions() <= CAP);
    host.shutdown().await;
    let (most, started) = alive_and_started(&log);
    assert!(
        most <= CAP,
        "{most} processes alive at once against a cap of {CAP}"
    );
    assert_eq!(
        started, CONVERSATIONS,
        "each conversation's turn started its server once"
    );
}

#[tokio::test]
async fn a_turn_waiting_for_a_session_says_so_and_goes_on_when_one_is_free() {
    use mcpcord::conversation::{ApproveAll, Message, TurnEvent};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("starts.log");
    let mut server = hostile("counted", Some(log.to_str().unwrap()));
    server["scope"] = json!("conversation");
    let limits = Limits {
        max_sessions_per_server: 1,
        mcp_session_wait: Duration::from_secs(30),
        ..quick()
    };
    let host = std::sync::Arc::new(host(json!({"counted": server}), limits));
    let gate = support::memory::Gate::new();
    let engine = echo_engine(host.clone(), [("first".to_owned(), gate.clone())].into());
    let second = async {
        // The first turn holds the only session, and waits at the gate.
        gate.reached().await;
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let run = async {
            let outcome = engine
                .run_turn("second", Message::user("second"), &events, &ApproveAll)
                .await;
            drop(events);
            outcome
        };
        let watch = async {
            while let Some(event) = received.recv().await {
                if let TurnEvent::Warning(w) = event
                    && w.contains("are in use by other conversations")
                {
                    // Only now is the first turn let go.
                    gate.open();
                    return w;
                }
            }
            panic!("the waiting turn said nothing");
        };
        tokio::join!(run, watch)
    };
    let (first, (second, notice)) = tokio::join!(echo_turn(&engine, "first"), second);
    assert_eq!(first.0, "echo: first");
    let second = second.unwrap();
    assert!(second.answered && second.tool_calls == 1, "{second:?}");
    assert!(notice.contains("\"counted\""), "{notice}");
    host.shutdown().await;
    assert_eq!(alive_and_started(&log), (1, 2));
}

#[tokio::test]
async fn a_modern_only_and_a_legacy_only_server_serve_one_conversation() {
    use crate::support::memory::{MemoryStore, ScriptedModel, answer, calls};
    use mcpcord::conversation::{ApproveAll, Message, Role};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("modern.log");
    let host = std::sync::Arc::new(host(
        json!({
            "modern": hostile("modern", Some(log.to_str().unwrap())),
            "legacy": hostile("legacy", None),
        }),
        quick(),
    ));
    let model = ScriptedModel::new([
        calls(&["modern__ask", "modern__confirm", "legacy__echo"]),
        answer("done"),
    ]);
    let engine = mcpcord::conversation::Engine::new(
        model.clone(),
        host.clone(),
        std::sync::Arc::new(MemoryStore::default()),
        mcpcord::conversation::EngineSettings {
            default_model: "test/model".into(),
            system_prompt: Some("Be brief.".into()),
            timezone: jiff::tz::TimeZone::UTC,
            transcription_model: None,
            clock: Default::default(),
            max_tool_rounds: 3,
            fallback_context_tokens: 100_000,
        },
    );
    let (events, _received) = tokio::sync::mpsc::unbounded_channel();
    engine
        .run_turn("c", Message::user("go"), &events, &ApproveAll)
        .await
        .unwrap();
    let results: Vec<String> = model.requests()[1]
        .iter()
        .filter(|m| m.role() == Role::Tool)
        .map(|m| m.text().to_owned())
        .collect();
    // The state-only round was sent again with its state; the form question
    // was declined (nobody can be asked here); the legacy server answered as
    // before.
    assert_eq!(results, ["asked twice", "answer: decline null", "echo: "]);
    // The server's instructions follow the prompt, under its name.
    let system = model.systems()[0].clone().unwrap();
    assert!(system.starts_with("Be brief."), "{system}");
    assert!(
        system.contains(
            "How to use the tools of modern, as that server says:\nCall ask before confirm."
        ),
        "{system}"
    );
    // Discover first, no initialize, and every request names the revision.
    let seen = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "server/discover 2026-07-28", "{seen}");
    assert!(!seen.contains("initialize"), "{seen}");
    assert!(lines.iter().all(|l| l.ends_with(" 2026-07-28")), "{seen}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("tools/call")).count(),
        4
    );
    host.shutdown().await;
}

/// The `counted` server logging to `dir/NAME.log`, one session per
/// conversation, with `extra` keys.
fn counted(dir: &Path, name: &str, extra: Value) -> Value {
    let log = dir.join(format!("{name}.log"));
    let mut server = hostile("counted", Some(log.to_str().unwrap()));
    server["scope"] = json!("conversation");
    for (key, value) in extra.as_object().into_iter().flatten() {
        server[key] = value.clone();
    }
    server
}

fn count_lines(dir: &Path, name: &str, prefix: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

#[tokio::test]
async fn a_reload_keeps_unchanged_servers_and_moves_changed_ones_once_their_turns_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let host = std::sync::Arc::new(host(
        json!({
            "same": counted(d, "same", json!({})),
            "edited": counted(d, "edited", json!({})),
            "gone": counted(d, "gone", json!({})),
        }),
        quick(),
    ));
    // A turn lists the tools and is still running when the file changes.
    let running = host.tools_for_turn("t", &(), &[]).await;
    assert!(running.problems.is_empty(), "{:?}", running.problems);
    let file = d.join("mcp.json");
    let write = |servers: Value| {
        std::fs::write(&file, json!({"mcpServers": servers}).to_string()).unwrap();
    };
    write(json!({
        "same": counted(d, "same", json!({})),
        "edited": counted(d, "edited", json!({"env": {"EDITED": "yes"}})),
        "added": counted(d, "added", json!({})),
    }));
    let reloaded = mcp::McpFile {
        path: file.clone(),
        host: host.clone(),
    }
    .reload()
    .unwrap();
    assert_eq!(reloaded.added, ["added"]);
    assert_eq!(reloaded.changed, ["edited"]);
    assert_eq!(reloaded.removed, ["gone"]);
    assert_eq!(reloaded.unchanged, ["same"]);
    let said = reloaded.to_string();
    assert!(
        said.contains("added: added; restarted: edited; removed: gone; 1 unchanged"),
        "{said}"
    );
    // The running turn finishes on the servers it listed, the removed one
    // too, and nothing was started or closed for it.
    for tool in ["gone__echo", "edited__echo"] {
        let outcome = host.call("t", tool, json!({"text": "still here"})).await;
        assert!(!outcome.is_error, "{tool}: {}", outcome.content);
    }
    for name in ["same", "edited", "gone"] {
        assert_eq!(count_lines(d, name, "start"), 1, "{name}");
        assert_eq!(count_lines(d, name, "end"), 0, "{name}");
    }
    // Once it ends, the old sessions of the changed and removed servers
    // close; the unchanged one stays.
    drop(running);
    support::wait_for_line(&d.join("gone.log"), |l| l.starts_with("end")).await;
    support::wait_for_line(&d.join("edited.log"), |l| l.starts_with("end")).await;
    let next = host.tools_for_turn("t", &(), &[]).await;
    let mut names: Vec<&str> = next.specs.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["added__echo", "edited__echo", "same__echo"]);
    assert_eq!(
        count_lines(d, "same", "start"),
        1,
        "the unchanged session is kept"
    );
    assert_eq!(count_lines(d, "same", "end"), 0);
    assert_eq!(
        count_lines(d, "edited", "start"),
        2,
        "the changed server restarted"
    );
    assert_eq!(count_lines(d, "added", "start"), 1);
    let outcome = host.call("t", "gone__echo", json!({})).await;
    assert!(outcome.is_error, "{}", outcome.content);
    // A broken file changes nothing and says why.
    std::fs::write(&file, "{\"mcpServers\": {\"same\": ").unwrap();
    let error = mcp::McpFile {
        path: file.clone(),
        host: host.clone(),
    }
    .reload()
    .unwrap_err();
    assert!(error.to_string().contains("not valid JSON"), "{error}");
    let names: Vec<String> = host.servers().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["added", "edited", "same"]);
    drop(next);
    host.shutdown().await;
}

/// Answers servers' questions as a person would, and notes them.
#[derive(Default)]
struct Person {
    asked: std::sync::Mutex<Vec<mcpcord::conversation::Question>>,
}

#[async_trait::async_trait]
impl mcpcord::conversation::Approver for Person {
    async fn decide(
        &self,
        _request: &mcpcord::conversation::ApprovalRequest,
    ) -> mcpcord::conversation::Decision {
        mcpcord::conversation::Decision::Approve
    }

    async fn ask(
        &self,
        question: &mcpcord::conversation::Question,
    ) -> mcpcord::conversation::Answer {
        use mcpcord::conversation::{Answer, QuestionKind};
        self.asked.lock().unwrap().push(question.clone());
        let typed: &[(&str, &str)] = match question.tool.as_str() {
            "confirm" => &[("ok", "yes")],
            "book" => &[("name", "Ada"), ("time", "9 pm"), ("guests", "4")],
            _ => &[],
        };
        let QuestionKind::Form(fields) = &question.kind else {
            return Answer::Accept(Default::default());
        };
        let mut values = serde_json::Map::new();
        for field in fields {
            let text = typed
                .iter()
                .find(|(name, _)| *name == field.name)
                .map_or("", |(_, text)| text);
            if let Some(value) = field.read(text).unwrap() {
                values.insert(field.name.clone(), value);
            }
        }
        Answer::Accept(values)
    }

    fn not_asked(&self) -> Option<&str> {
        None
    }
}

#[tokio::test]
async fn questions_of_both_eras_reach_the_person_and_forms_asking_for_secrets_do_not() {
    use crate::support::memory::{MemoryStore, ScriptedModel, answer, calls};
    use mcpcord::conversation::{Message, QuestionKind, Role, TurnEvent};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("modern.log");
    let host = std::sync::Arc::new(host(
        json!({
            "modern": hostile("modern", Some(log.to_str().unwrap())),
            "asking": hostile("asking", None),
        }),
        Limits {
            // Far less than the person takes: waiting for them counts for
            // no limit.
            tool_timeout: Duration::from_secs(5),
            ..quick()
        },
    ));
    let model = ScriptedModel::new([
        calls(&["modern__confirm", "asking__book"]),
        calls(&["asking__signin"]),
        calls(&["asking__secret"]),
        answer("done"),
    ]);
    let engine = mcpcord::conversation::Engine::new(
        model.clone(),
        host.clone(),
        std::sync::Arc::new(MemoryStore::default()),
        mcpcord::conversation::EngineSettings {
            default_model: "test/model".into(),
            system_prompt: None,
            timezone: jiff::tz::TimeZone::UTC,
            transcription_model: None,
            clock: Default::default(),
            max_tool_rounds: 5,
            fallback_context_tokens: 100_000,
        },
    );
    let person = Person::default();
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    engine
        .run_turn("c", Message::user("go"), &events, &person)
        .await
        .unwrap();
    drop(events);
    let results: Vec<String> = model
        .requests()
        .last()
        .unwrap()
        .iter()
        .filter(|m| m.role() == Role::Tool)
        .map(|m| m.text().to_owned())
        .collect();
    assert_eq!(
        results,
        [
            r#"answer: accept {"ok": true}"#,
            r#"book: accept {"guests": 4, "name": "Ada", "outside": false, "time": "21"}"#,
            "signin: accept null",
            "secret: decline null",
        ]
    );
    let asked = person.asked.lock().unwrap().clone();
    let tools: Vec<&str> = asked.iter().map(|q| q.tool.as_str()).collect();
    assert_eq!(tools.len(), 3, "the secret form never reached the person");
    assert!(tools.contains(&"confirm") && tools.contains(&"book") && tools.contains(&"signin"));
    let book = asked.iter().find(|q| q.tool == "book").unwrap();
    assert_eq!(
        (book.server.as_str(), book.message.as_str()),
        ("asking", "Where and when?")
    );
    let signin = asked.iter().find(|q| q.tool == "signin").unwrap();
    assert_eq!(
        signin.kind,
        QuestionKind::Url("https://auth.example.com/connect?state=xyz".into())
    );
    let mut warnings = Vec::new();
    while let Some(event) = received.recv().await {
        if let TurnEvent::Warning(text) = event {
            warnings.push(text);
        }
    }
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("\"asking\" asked for api_token in a form")),
        "{warnings:?}"
    );
    host.shutdown().await;
}

#[tokio::test]
async fn a_server_that_ignores_discover_is_probed_once_not_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("deaf.log");
    let mut server = hostile("deaf-discover", Some(log.to_str().unwrap()));
    server["scope"] = json!("conversation");
    let host = host(
        json!({ "deaf": server }),
        Limits {
            mcp_start_timeout: Duration::from_secs(30),
            ..quick()
        },
    );
    // The first session waits out rmcp's probe, then falls back.
    for conversation in ["a", "b", "c"] {
        let tools = host.tools(conversation).await;
        assert!(
            tools.problems.is_empty(),
            "{conversation}: {:?}",
            tools.problems
        );
        assert_eq!(tools.specs.len(), 1);
    }
    let seen = std::fs::read_to_string(&log).unwrap();
    let count = |method: &str| seen.lines().filter(|l| l.starts_with(method)).count();
    assert_eq!(count("server/discover "), 1, "{seen}");
    assert_eq!(count("initialize "), 3, "{seen}");
    host.shutdown().await;
}
