//! `mcpcord chat` as a person runs it: the real binary, stdin and stdout.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output};

use crate::support::{FakeModel, Reply, call, text};
use serde_json::json;

fn command(model: &FakeModel, dir: &Path) -> Command {
    support::mcpcord(model, dir)
}

/// Runs `mcpcord chat` with `input` on stdin, off the async runtime.
async fn chat(model: &FakeModel, dir: &Path, input: impl AsRef<[u8]>) -> Output {
    let mut cmd = command(model, dir);
    let input = input.as_ref().to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.arg("chat").spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&input).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn chat_prints_tool_lines_and_answers_and_continues_next_time() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "buy milk").unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let list = json!({"path": dir.path()}).to_string();
    model.script([
        call("c1", "fs__list_directory", &list),
        text("You have notes.txt."),
    ]);

    let output = chat(&model, dir.path(), "what files do I have?\n").await;
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(
        out.contains(&format!("→ fs__list_directory {list}")),
        "{out}"
    );
    assert!(out.trim_end().ends_with("You have notes.txt."), "{out}");

    model.script([text("It was notes.txt.")]);
    let output = chat(&model, dir.path(), "/model\nwhich file was it?\n").await;
    assert!(output.status.success());
    assert!(stdout(&output).contains("(model: test/tools)"));
    let sent = &model.requests()[2]["messages"];
    assert_eq!(sent[0]["content"], "what files do I have?");
    assert_eq!(sent.as_array().unwrap().len(), 5);
    assert!(model.rejected().is_empty());
}

#[tokio::test]
async fn killed_mid_turn_the_next_run_carries_on() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    model.script([
        call(
            "k1",
            "fs__list_directory",
            &json!({"path": dir.path()}).to_string(),
        ),
        Reply::Hang,
    ]);

    let mut child: Child = command(&model, dir.path()).arg("chat").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"list my files\n").unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap())
        .await
        .unwrap();
    assert!(first.starts_with("→ fs__list_directory"), "{first}");
    model.wait_for_requests(2).await;
    child.kill().unwrap();
    child.wait().unwrap();

    model.script([text("Still here.")]);
    let output = chat(&model, dir.path(), "are you still there?\n").await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("Still here."));
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
    let roles: Vec<String> = model.requests()[2]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "user"]);
}

#[tokio::test]
async fn configuration_mistakes_are_named() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let output = command(&model, dir.path())
        .env_remove("OPENROUTER_API_KEY")
        .arg("chat")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("Missing OPENROUTER_API_KEY"),
        "{}",
        stderr(&output)
    );

    std::fs::write(
        dir.path().join("mcp.json"),
        r#"{"mcpServers": {"fs": {"command": "npx", "scope": "everyone"}}}"#,
    )
    .unwrap();
    let output = command(&model, dir.path()).arg("chat").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("mcp.json") && err.contains("\"fs\"") && err.contains("\"scope\""),
        "{err}"
    );

    let output = command(&model, dir.path())
        .env("MCP_CONFIG", "missing.json")
        .arg("chat")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("missing.json"));
    assert!(!stderr(&output).contains("sk-or-v1-test-secret"));
}

#[tokio::test]
async fn problems_go_to_stderr_and_the_chat_goes_on() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([
        Reply::Status(402, "Insufficient credits".into(), None),
        text("Answered."),
    ]);
    let output = chat(
        &model,
        dir.path(),
        "first\n/model test/no-tools\nsecond\n/reset\n",
    )
    .await;
    assert!(output.status.success());
    let err = stderr(&output);
    assert!(err.contains("out of credits"), "{err}");
    assert!(err.contains("cannot use tools"), "{err}");
    let out = stdout(&output);
    assert!(
        out.contains("Answered.") && out.contains("(conversation cleared)"),
        "{out}"
    );
}

#[tokio::test]
async fn calls_that_need_approval_are_declined_without_yes_and_run_with_it() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let target = dir.path().join("hello.txt");
    let write = json!({"path": target, "content": "hi"}).to_string();
    model.script([
        call("w1", "fs__write_file", &write),
        text("I could not write it."),
    ]);
    let output = chat(&model, dir.path(), "write hello.txt\n").await;
    assert!(output.status.success());
    assert!(stderr(&output).contains("--yes"), "{}", stderr(&output));
    assert!(!target.exists(), "a declined call must not run");
    let result = &model.requests()[1]["messages"][2]["content"];
    assert!(result.as_str().unwrap().contains("declined"), "{result}");

    model.script([call("w2", "fs__write_file", &write), text("Written.")]);
    let mut cmd = command(&model, dir.path());
    let output = tokio::task::spawn_blocking(move || {
        let mut child = cmd.args(["chat", "--yes"]).spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"write it, please\n")
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "hi");
}

#[tokio::test]
async fn an_interactive_chat_asks_before_calls_that_need_approval() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let target = dir.path().join("asked.txt");
    let write = json!({"path": target, "content": "yes"}).to_string();
    model.script([
        call("p1", "fs__write_file", &write),
        text("Declined, then."),
        call("p2", "fs__write_file", &write),
        text("Written."),
    ]);
    let app = mcpcord::app::App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap();
    // The answers to the approval questions come from the same input.
    let input = std::io::Cursor::new(b"write it\nn\nwrite it now\ny\n".to_vec());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    mcpcord::terminal::run(
        &app.engine,
        "terminal:ask",
        input,
        mcpcord::terminal::Approvals::Ask,
        &mut tokio::sync::mpsc::unbounded_channel().1,
        &mut out,
        &mut err,
    )
    .await
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("Declined, then.") && out.contains("Written."),
        "{out}"
    );
    assert!(
        String::from_utf8(err)
            .unwrap()
            .contains("declined: the user said no")
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "yes");
    assert_eq!(
        model.requests().len(),
        4,
        "the answers were not taken as messages"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_and_unknown_commands_do_not_end_the_chat() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("one"), text("two")]);
    let output = chat(&model, dir.path(), b"hello \xff there\n/models\nsecond\n").await;
    let err = stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("this line is not valid UTF-8"), "{err}");
    assert!(err.contains("there is no command /models"), "{err}");
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0]["messages"][0]["content"],
        "hello \u{FFFD} there"
    );
    assert_eq!(requests[1]["messages"][2]["content"], "second");
    assert_eq!(requests[1]["model"], "test/tools");
}

/// Reads `out` until what was read ends with `wanted`; returns it all.
fn read_until(out: &mut impl std::io::Read, wanted: &str) -> String {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).ends_with(wanted) {
        assert_eq!(
            out.read(&mut byte).unwrap(),
            1,
            "the output ended: {seen:?}"
        );
        seen.push(byte[0]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn interrupt(child: &Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn ctrl_c_stops_the_turn_and_a_second_one_while_idle_ends_the_chat() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({}));
    model.script([
        Reply::Stall("Let me think about".into()),
        text("Still here."),
    ]);
    let mut child = command(&model, dir.path()).arg("chat").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let child = tokio::task::spawn_blocking(move || {
        stdin.write_all(b"tell me everything\n").unwrap();
        read_until(&mut out, "Let me think about");
        interrupt(&child);
        read_until(&mut out, "(stopped)\n");
        // The chat goes on, and the stopped answer is part of it.
        stdin.write_all(b"are you there?\n").unwrap();
        read_until(&mut out, "Still here.\n");
        interrupt(&child);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(child.status.success(), "{}", stderr(&child));
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    let sent: Vec<&serde_json::Value> =
        requests[1]["messages"].as_array().unwrap().iter().collect();
    assert_eq!(sent[1]["role"], "assistant");
    assert_eq!(sent[1]["content"], "Let me think about");
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
}

#[tokio::test]
async fn retry_undo_and_system_in_the_terminal() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({}));
    model.script([text("One."), text("Two."), text("Three.")]);
    let output = chat(
        &model,
        dir.path(),
        "pick\n/retry\n/undo\n/undo\n/system Answer in {channel}.\n/system\nagain\n",
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(
        out.contains("One.") && out.contains("Two.") && out.contains("Three."),
        "{out}"
    );
    assert!(
        out.contains("(the last exchange was removed)") && out.contains("(nothing to undo)"),
        "{out}"
    );
    let requests = model.requests();
    assert_eq!(support::user_said(&requests[1]), ["pick"]);
    assert!(
        !requests[1].to_string().contains("One."),
        "the retried answer is not sent"
    );
    let sent = requests[2]["messages"].as_array().unwrap();
    assert_eq!(sent.len(), 2, "undone: {sent:?}");
    assert_eq!(sent[0]["content"], "Answer in the terminal.");
    assert_eq!(support::user_said(&requests[2]), ["again"]);
    assert!(
        out.contains("(system prompt: Answer in {channel}.)"),
        "{out}"
    );
    assert!(
        requests[2].to_string().contains("Answer in the terminal."),
        "{:?}",
        requests[2]
    );
}

#[tokio::test]
async fn progress_is_printed_at_most_once_a_second() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut everything = support::everything();
    everything["approval"] = json!("auto");
    support::write_mcp(dir.path(), json!({"everything": everything}));
    model.script([
        call(
            "p1",
            "everything__trigger-long-running-operation",
            r#"{"duration": 2, "steps": 5}"#,
        ),
        text("Done."),
    ]);
    let output = chat(&model, dir.path(), "take a while\n").await;
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("  … everything__trigger-long-running-operation: "))
        .collect();
    // Five reports in two seconds: the first is shown, and the next only a
    // second later.
    assert!(!lines.is_empty() && lines.len() < 5, "{out}");
    assert!(lines[0].contains("20%"), "{out}");
    assert!(out.trim_end().ends_with("Done."), "{out}");
}

#[tokio::test]
async fn sighup_reads_the_mcp_file_again_between_turns() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({}));
    model.script([text("One."), text("Two.")]);
    let mut child = command(&model, dir.path())
        .env("RUST_LOG", "mcpcord=info")
        .arg("chat")
        .spawn()
        .unwrap();
    let (mut stdin, mut out) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let mut err = child.stderr.take().unwrap();
    let log = dir.path().join("counted.log");
    let servers = json!({"counted": support::hostile("counted", Some(log.to_str().unwrap()))});
    let path = dir.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        stdin.write_all(b"first\n").unwrap();
        read_until(&mut out, "One.\n");
        support::write_mcp(&path, servers);
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        read_until(&mut err, "MCP file reloaded");
        stdin.write_all(b"second\n").unwrap();
        read_until(&mut out, "Two.\n");
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let offered = |request: &serde_json::Value| -> Vec<String> {
        request["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let requests = model.requests();
    assert!(offered(&requests[0]).is_empty());
    assert_eq!(offered(&requests[1]), ["counted__echo"]);
}

#[tokio::test]
async fn a_servers_form_is_asked_field_by_field_and_declined_when_input_is_piped() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = support::hostile("asking", None);
    server["approval"] = json!("auto");
    support::write_mcp(dir.path(), json!({ "asking": server }));
    model.script([
        call("q1", "asking__book", "{}"),
        text("Booked."),
        call("q2", "asking__book", "{}"),
        text("Not booked."),
    ]);
    let app = mcpcord::app::App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap();
    // A value that does not fit is asked again; an empty line keeps the
    // default.
    let typed = "book a table\nAda\n10 pm\n9 pm\nlots\n4\n\n";
    let (mut out, mut err) = (Vec::new(), Vec::new());
    mcpcord::terminal::run(
        &app.engine,
        "terminal:form",
        std::io::Cursor::new(typed.as_bytes().to_vec()),
        mcpcord::terminal::Approvals::Ask,
        &mut tokio::sync::mpsc::unbounded_channel().1,
        &mut out,
        &mut err,
    )
    .await
    .unwrap();
    assert!(String::from_utf8(out).unwrap().contains("Booked."));
    let result = support::tool_results(&model.requests()[1]);
    assert_eq!(
        result,
        [r#"book: accept {"guests": 4, "name": "Ada", "outside": false, "time": "21"}"#]
    );
    assert_eq!(
        model.requests().len(),
        2,
        "the answers were not taken as messages"
    );
    app.shutdown().await;

    // Piped input: nobody can answer, so the question is declined, saying why.
    let output = chat(&model, dir.path(), "book again\n").await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(
            "asked a question during asking__book, which was declined: the input is not interactive"
        ),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        support::tool_results(&model.requests()[3]),
        ["book: decline null"]
    );
}

#[tokio::test]
async fn prompts_and_resources_are_listed_and_sent_from_the_terminal() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"everything": support::everything()}));
    model.script([text("Sunny."), text("A resource.")]);
    let input = "/prompt\n/prompt everything__args-prompt\n/prompt everything__args-prompt city=Paris\n/resource\n/resource demo://resource/dynamic/text/3 what is it?\n";
    let output = chat(&model, dir.path(), input).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(
        out.contains("everything__args-prompt — A prompt with two arguments, one required and one optional (city*, state)"),
        "{out}"
    );
    assert!(out.contains("demo://resource/dynamic/text/{resourceId} — Dynamic Text Resource [everything] (template"), "{out}");
    assert!(
        err.contains("error: the prompt everything__args-prompt needs city"),
        "{err}"
    );
    let requests = model.requests();
    assert_eq!(requests.len(), 2, "listing and the refusal sent nothing");
    assert_eq!(
        support::user_said(&requests[0]).last().unwrap(),
        "[Prompt \"Arguments Prompt\" of everything]\nWhat's weather in Paris?"
    );
    let read = support::user_said(&requests[1]).last().unwrap().clone();
    assert!(
        read.starts_with("[Resource demo://resource/dynamic/text/3 of everything, chosen by the user]\nResource 3:")
            && read.ends_with("\n\nwhat is it?"),
        "{read}"
    );
}

#[tokio::test]
async fn a_background_task_is_listed_and_its_result_answered_in_the_chat() {
    use crate::support::board::{Board, serve_board};
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let board = Board::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let url = serve_board(&board, &stop).await;
    support::write_mcp(
        dir.path(),
        json!({"jobs": {"url": url, "timeoutSecs": 1, "approval": "auto"}}),
    );
    model.script([
        call("t1", "jobs__research", r#"{"topic":"tides"}"#),
        text("Started."),
        text("The tides report is here."),
    ]);
    let mut child: Child = command(&model, dir.path()).arg("chat").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut until = async |wanted: &str| {
        while let Some(line) = lines.recv().await {
            seen.push(line.clone());
            if line.contains(wanted) {
                return;
            }
        }
        panic!("no line with {wanted:?} in {seen:?}");
    };
    stdin.write_all(b"research tides\n").unwrap();
    until("Started.").await;
    stdin.write_all(b"/tasks\n").unwrap();
    until("job-1  jobs__research").await;
    board.finish("job-1");
    until("(the background task job-1 of jobs__research finished)").await;
    until("The tides report is here.").await;
    stdin.write_all(b"/tasks\n").unwrap();
    until("(no tool call runs in the background)").await;
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let sent = &model.requests()[2]["messages"];
    let last = sent.as_array().unwrap().last().unwrap();
    assert!(
        last["content"]
            .as_str()
            .unwrap()
            .ends_with("report on tides"),
        "{last}"
    );
    stop.cancel();
}

#[tokio::test]
async fn metrics_and_health_are_served_after_a_turn() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "buy milk").unwrap();
    support::write_mcp(
        dir.path(),
        json!({"fs": dict_with(support::filesystem(dir.path()), "approval", "ask")}),
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let list = json!({"path": dir.path()}).to_string();
    model.script([
        call("c1", "fs__list_directory", &list),
        text("You have notes.txt."),
    ]);
    let mut child = command(&model, dir.path())
        .args(["chat", "--yes"])
        .env("METRICS_ADDR", &addr)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let answered = tokio::task::spawn_blocking(move || {
        stdin.write_all(b"what files do I have?\n").unwrap();
        stdin.flush().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let answered = lines
            .by_ref()
            .map(Result::unwrap)
            .any(|line| line.contains("You have notes.txt."));
        (answered, stdin)
    });
    let (answered, stdin) = answered.await.unwrap();
    assert!(answered);

    let (status, health) = support::http_get(&addr, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(health.trim(), "ok");
    let (status, metrics) = support::http_get(&addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let value = |series: &str| {
        support::sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert_eq!(value(r#"mcpcord_turns_total{outcome="answered"}"#), 1.0);
    assert_eq!(value("mcpcord_turn_duration_seconds_count"), 1.0);
    assert_eq!(
        value(r#"mcpcord_model_request_duration_seconds_count{model="test/tools"}"#),
        2.0
    );
    assert!(value(r#"mcpcord_model_first_token_seconds_count{model="test/tools"}"#) >= 1.0);
    // The fake bills 100 prompt tokens (60 of them cached) and 20
    // completion tokens for $0.001 a reply.
    let tokens = |kind: &str| {
        value(&format!(
            r#"mcpcord_tokens_total{{model="test/tools",kind="{kind}"}}"#
        ))
    };
    assert_eq!(tokens("completion"), 40.0);
    assert_eq!(tokens("cached"), 120.0);
    assert_eq!(tokens("prompt") + tokens("cached"), 200.0);
    assert!((value(r#"mcpcord_cost_dollars{model="test/tools"}"#) - 0.002).abs() < 1e-9);
    assert_eq!(
        value(r#"mcpcord_tool_calls_total{server="fs",tool="fs__list_directory",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"mcpcord_tool_call_duration_seconds_count{server="fs"}"#),
        1.0
    );
    assert_eq!(
        value(r#"mcpcord_approvals_total{decision="approved"}"#),
        1.0
    );
    assert_eq!(value(r#"mcpcord_mcp_sessions{server="fs"}"#), 1.0);
    assert!(metrics.contains("# TYPE mcpcord_turn_duration_seconds histogram"));
    drop(stdin);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}

/// `server` with `key` set to `value`.
fn dict_with(mut server: serde_json::Value, key: &str, value: &str) -> serde_json::Value {
    server[key] = json!(value);
    server
}
