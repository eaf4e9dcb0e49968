//! The real bot under load: the `mcpcord` binary against the loopback
//! Discord and the fake model of the integration tests, the model taking
//! 200 ms a reply.
//!
//! Run with `cargo bench --bench load`. Prints:
//! 1. how long one mentioned thread takes to be answered, and 1,000
//!    threads mentioned at once (and their ratio): first with the bot's
//!    global limit lifted (`DISCORD_GLOBAL_LIMIT`), which is the bot's own
//!    concurrency, then at Discord's 50 requests a second, which bounds
//!    any bot (each new thread takes two requests at least);
//! 2. the bot's resident memory with those 1,000 conversations live (and
//!    a shared-scope MCP server, when `.ci/install-test-servers` has run);
//! 3. with the loopback Discord enforcing Discord's real limits (5 messages
//!    and 5 edits per 5 s per channel, 50 requests a second), 50 threads
//!    with long streamed answers at once: how long, and how many 429s.

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::discord::{ALICE, BOT, CHANNEL, FakeDiscord, TOKEN};
use support::{FakeModel, text};

const LATENCY: Duration = Duration::from_millis(200);
const MANY: u64 = 1_000;
const BUSY: u64 = 50;
/// The longest any step may take before the benchmark gives up.
const PATIENCE: Duration = Duration::from_secs(600);

fn bot(discord: &FakeDiscord, model: &FakeModel, dir: &Path, extra: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mcpcord"))
        .arg("run")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENROUTER_API_KEY", support::KEY)
        .env("OPENROUTER_BASE_URL", &model.base_url)
        .env("MODEL_API", model.model_api())
        .env("DEFAULT_MODEL", "test/tools")
        .env("DISCORD_TOKEN", TOKEN)
        .env("DISCORD_API_BASE_URL", &discord.base_url)
        .env("DATABASE_URL", support::sqlite_url(dir))
        .env("RUST_LOG", "error")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the mcpcord binary")
}

fn mention(discord: &FakeDiscord, id: u64) {
    let message = discord.message(id, CHANNEL, ALICE, &format!("<@{BOT}> hello"), true);
    discord.dispatch("MESSAGE_CREATE", message);
}

/// Waits until the threads `first..first + count` each have a post that
/// contains `ending`.
async fn answered(discord: &FakeDiscord, first: u64, count: u64, ending: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let calls = discord.calls();
        let done: std::collections::HashSet<&str> = calls
            .iter()
            .filter(|c| {
                c.method == "POST"
                    && c.body["content"]
                        .as_str()
                        .is_some_and(|s| s.contains(ending))
            })
            .map(|c| c.path.as_str())
            .collect();
        let all = (first..first + count)
            .all(|t| done.contains(format!("/channels/{t}/messages").as_str()));
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "not every thread was answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `VmRSS` and `VmHWM` of process `pid`, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::main]
async fn main() {
    mcpcord::app::install_crypto();
    let model = FakeModel::start().await;
    model.set_latency(LATENCY);
    many_threads(
        &model,
        &[("DISCORD_GLOBAL_LIMIT", "1000000")],
        "the global limit lifted",
    )
    .await;
    many_threads(&model, &[], "Discord's global limit").await;
    busy_threads(&model).await;
}

/// One thread, then `MANY` at once, then the bot's memory.
async fn many_threads(model: &FakeModel, extra: &[(&str, &str)], how: &str) {
    println!("With {how}:");
    let discord = FakeDiscord::start().await;
    model.always(text("Answered."));
    let dir = tempfile::tempdir().unwrap();
    let shared = support::servers_installed();
    let servers = if shared {
        let mut everything = support::everything();
        everything["scope"] = "shared".into();
        serde_json::json!({"everything": everything})
    } else {
        serde_json::json!({})
    };
    support::write_mcp(dir.path(), servers);
    let child = bot(&discord, model, dir.path(), extra);
    discord.wait_registered(0).await;

    let first = 800_000_000_000_000_001;
    let started = Instant::now();
    mention(&discord, first);
    answered(&discord, first, 1, "Answered.").await;
    let one = started.elapsed();
    println!(
        "  one thread mentioned: answered in {} ms (the model takes {} ms)",
        one.as_millis(),
        LATENCY.as_millis()
    );

    let started = Instant::now();
    for n in 1..=MANY {
        mention(&discord, first + n);
    }
    answered(&discord, first + 1, MANY, "Answered.").await;
    let many = started.elapsed();
    println!(
        "  {MANY} threads mentioned at once: all answered in {} ms, {:.1}x one thread, {} requests",
        many.as_millis(),
        many.as_secs_f64() / one.as_secs_f64(),
        discord.calls().len()
    );
    let (rss, peak) = memory(child.id());
    println!(
        "  resident memory with {} live conversations{}: {rss:.1} MiB now, {peak:.1} MiB at most",
        MANY + 1,
        if shared {
            " and a shared-scope MCP server"
        } else {
            " (no MCP server: run .ci/install-test-servers)"
        }
    );
    stop(child);
}

/// `BUSY` threads with long streamed answers, under Discord's limits.
async fn busy_threads(model: &FakeModel) {
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), serde_json::json!({}));
    let discord = FakeDiscord::start().await;
    let long = format!("{}the end.", "word ".repeat(2_200));
    model.always(text(&long));
    let child = bot(&discord, model, dir.path(), &[]);
    discord.wait_registered(0).await;
    discord.enforce_limits();
    let first = 900_000_000_000_000_001;
    let started = Instant::now();
    for n in 0..BUSY {
        mention(&discord, first + n);
    }
    answered(&discord, first, BUSY, "the end.").await;
    let took = started.elapsed();
    let requests = discord.calls().len();
    println!(
        "{BUSY} busy threads (answers of 6 messages each) under Discord's limits: answered in {} ms, {requests} requests, {} answered 429",
        took.as_millis(),
        discord.limited()
    );
    stop(child);
}
