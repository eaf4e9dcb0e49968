//! mcpcord against a real OpenAI-compatible server: llama.cpp's own
//! `llama-server` with SmolLM2-135M-Instruct, and the real time MCP server.
//!
//! Optional: it needs a llama.cpp build, so it skips with a message unless
//! `REAL_LLM` names a directory that holds `build/bin/llama-server`,
//! `model/SmolLM2-135M-Instruct.Q4_1.gguf` and `model/chatml-tools.jinja`
//! (a chat template that carries tools). See the README's "A real model
//! server".
//!
//! The model never calls a tool on its own, but it copies a tool call
//! exactly when asked to, and `--temp 0` makes it do the same every time.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcpcord::app::App;
use mcpcord::conversation::{Role, Store, TurnEvent};
use serde_json::{Value, json};

/// A running `llama-server`, killed when dropped.
struct LlamaServer {
    child: Child,
    base_url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn real_llm_dir() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("REAL_LLM").map(PathBuf::from) else {
        eprintln!(
            "skipped: no real model server: set REAL_LLM to a llama.cpp build (see the README)"
        );
        return None;
    };
    let needed = [
        "build/bin/llama-server",
        "model/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model/chatml-tools.jinja",
    ];
    match needed.iter().find(|p| !dir.join(p).is_file()) {
        None => Some(dir),
        Some(missing) => {
            eprintln!(
                "skipped: no real model server: {} is missing (set REAL_LLM to a llama.cpp build; see the README)",
                dir.join(missing).display()
            );
            None
        }
    }
}

/// Starts `llama-server` with an output limit of `max_tokens` and waits
/// until it is healthy.
async fn llama_server(dir: &Path, max_tokens: u32) -> LlamaServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = dir.join("model");
    let child = Command::new(dir.join("build/bin/llama-server"))
        .arg("-m")
        .arg(model.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .args(["--alias", "smollm2-135m", "--jinja", "--chat-template-file"])
        .arg(model.join("chatml-tools.jinja"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", "8192", "-n", &max_tokens.to_string()])
        .args(["--temp", "0", "-t", "2", "-np", "1", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server starts");
    let server = LlamaServer {
        child,
        base_url: format!("http://127.0.0.1:{port}/v1"),
    };
    let health = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = reqwest::get(&health)
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "llama-server never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The id of the model the server lists.
async fn listed_model(server: &LlamaServer) -> String {
    let list: Value = reqwest::get(format!("{}/models", server.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"][0]["id"].as_str().unwrap().to_owned()
}

/// Asks the model to copy a call of `tool` with `arguments`.
fn copy_call(tool: &str, arguments: Value) -> String {
    format!(
        "Reply with exactly this and nothing else: <tool_call> {} </tool_call>",
        json!({"name": tool, "arguments": arguments})
    )
}

async fn events_of(app: &App, key: &str, text: &str) -> Vec<TurnEvent> {
    let (result, events) = support::turn(app, key, text).await;
    assert!(result.is_ok(), "{result:?} {events:?}");
    events
}

#[tokio::test]
async fn a_real_openai_compatible_server_runs_tools_keeps_usage_and_survives_a_cut_call() {
    let Some(real) = real_llm_dir() else {
        return;
    };
    mcpcord::app::install_crypto();
    support::needs_servers!();
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(
        dir.path(),
        json!({"time": {"command": support::time_server(), "args": []}}),
    );

    // 1. A server with room to answer; MODEL_API is unset, so the loopback
    //    host means the plain OpenAI dialect.
    let server = llama_server(&real, 384).await;
    let model = listed_model(&server).await;
    let check = support::mcpcord_for(&server.base_url, dir.path())
        .env("DEFAULT_MODEL", &model)
        .arg("check")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}");
    assert!(report.contains("All checks passed"), "{report}");

    let config = [("DEFAULT_MODEL", model.as_str())];
    let app = App::build(&support::config_for(&server.base_url, dir.path(), &config))
        .await
        .unwrap();
    let key = "terminal:real";
    let ask = copy_call("time__get_current_time", json!({"timezone": "UTC"}));
    let events = events_of(&app, key, &ask).await;
    assert!(
        events.iter().any(|e| matches!(e,
            TurnEvent::ToolFinished { name, ok: true, .. } if name == "time__get_current_time")),
        "{events:?}"
    );
    events_of(&app, key, "What did the tool say?").await;
    let history = app.store.history(key).await.unwrap();
    let tool = history.iter().find(|m| m.role() == Role::Tool).unwrap();
    assert!(
        tool.text().contains("\"timezone\": \"UTC\""),
        "the real time server answered: {}",
        tool.text()
    );
    let asked: Vec<&str> = history
        .iter()
        .filter(|m| m.role() == Role::User)
        .map(|m| m.text())
        .collect();
    assert_eq!(asked, [ask.as_str(), "What did the tool say?"]);
    let usage = app.store.usage(key).await.unwrap();
    assert!(usage.responses >= 3, "{usage:?}");
    assert!(
        usage.prompt_tokens > 0 && usage.completion_tokens > 0,
        "{usage:?}"
    );
    app.shutdown().await;
    drop(server);

    // 2. An output limit that cuts the call inside its arguments: it is
    //    not run, not kept as it came, and the server takes every later
    //    request of the conversation.
    let server = llama_server(&real, 32).await;
    let app = App::build(&support::config_for(&server.base_url, dir.path(), &config))
        .await
        .unwrap();
    let key = "terminal:cut";
    let ask = copy_call(
        "time__convert_time",
        json!({"source_timezone": "Europe/Amsterdam", "time": "16:30", "target_timezone": "Asia/Tokyo"}),
    );
    events_of(&app, key, &ask).await;
    let history = app.store.history(key).await.unwrap();
    let cut = history
        .iter()
        .find(|m| !m.tool_calls.is_empty())
        .expect("the model began the call");
    assert_eq!(cut.tool_calls[0].arguments, "{}");
    let result = history.iter().find(|m| m.role() == Role::Tool).unwrap();
    assert!(result.text().contains("cut off"), "{}", result.text());
    let (result, events) = support::turn(&app, key, "Hello").await;
    assert!(result.unwrap().answered, "{events:?}");
    app.shutdown().await;
}
