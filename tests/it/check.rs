//! `mcpcord check` catches the common mistakes and says what to fix.

use crate::support;

use std::path::Path;
use std::process::{Output, Stdio};

use crate::support::FakeModel;
use crate::support::discord::FakeDiscord;
use serde_json::json;

async fn check(model: &FakeModel, dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = support::mcpcord(model, dir);
    cmd.arg("check").stdin(Stdio::null());
    for (name, value) in env {
        cmd.env(name, value);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn report(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn a_good_setup_passes_and_lists_tools_as_the_model_sees_them() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let discord = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let env = [
        ("DISCORD_TOKEN", support::discord::TOKEN),
        ("DISCORD_API_BASE_URL", discord.base_url.as_str()),
    ];
    let output = check(&model, dir.path(), &env).await;
    let text = report(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("MCP server \"fs\": 14 tool(s): fs__read_file, fs__read_text_file"),
        "{text}"
    );
    assert!(
        text.contains("default model test/tools: supports tools"),
        "{text}"
    );
    assert!(
        text.contains("Discord: the token belongs to the application \"mcpcord\""),
        "{text}"
    );
    assert!(text.contains("All checks passed."));
    assert!(!text.contains(support::KEY) && !text.contains(support::discord::TOKEN));
}

#[tokio::test]
async fn each_common_mistake_is_named_with_what_to_do() {
    support::needs_servers!();
    let model = FakeModel::start().await;
    let discord = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({}));

    let output = check(&model, dir.path(), &[("OPENROUTER_API_KEY", "")]).await;
    assert!(!output.status.success());
    assert!(
        report(&output).contains("Missing OPENROUTER_API_KEY"),
        "{}",
        report(&output)
    );

    let output = check(
        &model,
        dir.path(),
        &[("OPENROUTER_API_KEY", "sk-or-v1-wrong")],
    )
    .await;
    assert!(!output.status.success());
    assert!(
        report(&output).contains("API key was rejected"),
        "{}",
        report(&output)
    );

    let output = check(&model, dir.path(), &[("DEFAULT_MODEL", "test/no-tools")]).await;
    assert!(!output.status.success());
    assert!(
        report(&output).contains("default model test/no-tools cannot use tools"),
        "{}",
        report(&output)
    );

    let output = check(&model, dir.path(), &[("DEFAULT_MODEL", "gpt-4o")]).await;
    assert!(
        report(&output).contains("is not in the model list"),
        "{}",
        report(&output)
    );

    let env = [
        ("DISCORD_TOKEN", "wrong"),
        ("DISCORD_API_BASE_URL", discord.base_url.as_str()),
    ];
    let output = check(&model, dir.path(), &env).await;
    assert!(!output.status.success());
    assert!(
        report(&output).contains("Discord rejected the bot token"),
        "{}",
        report(&output)
    );

    std::fs::write(
        dir.path().join("mcp.json"),
        r#"{"mcpServers": {"fs": {"command": "npx", "args": "-y"}}}"#,
    )
    .unwrap();
    let output = check(&model, dir.path(), &[]).await;
    assert!(!output.status.success());
    assert!(
        report(&output).contains("server \"fs\", key \"args\": must be a list of strings"),
        "{}",
        report(&output)
    );

    support::write_mcp(
        dir.path(),
        json!({"broken": {"command": "/nonexistent/server"}, "fs": support::filesystem(dir.path())}),
    );
    let output = check(&model, dir.path(), &[]).await;
    let text = report(&output);
    assert!(!output.status.success());
    assert!(
        text.contains("PROBLEM  MCP server \"broken\"") && text.contains("Check its command"),
        "{text}"
    );
    assert!(text.contains("ok       MCP server \"fs\""), "{text}");
    assert!(text.contains("1 problem found"), "{text}");
}
