//! Two bot processes, each running one of two Discord shards, sharing one
//! database (the SQLite file, or PostgreSQL under `.ci/with-postgres`),
//! against one loopback Discord that sends each server's events to the
//! shard Discord would.

use crate::support;

use std::process::{Child, Command, Stdio};

use crate::support::discord::{ALICE, BOB, BOT, CHANNEL, FakeDiscord, GUILD, TOKEN, shard_of};
use crate::support::{FakeModel, Reply, said, text};
use mcpcord::conversation::Store;

/// A server whose events go to the other shard than `GUILD`'s.
const OTHER_GUILD: u64 = GUILD + (1 << 22);
const OTHER_CHANNEL: u64 = 100_000_000_000_000_200;

fn bot(discord: &FakeDiscord, model: &FakeModel, dir: &std::path::Path, shards: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mcpcord"))
        .arg("run")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENROUTER_API_KEY", "sk-or-v1-test-secret")
        .env("OPENROUTER_BASE_URL", &model.base_url)
        .env("MODEL_API", model.model_api())
        .env("DEFAULT_MODEL", "test/tools")
        .env("DISCORD_TOKEN", TOKEN)
        .env("DISCORD_API_BASE_URL", &discord.base_url)
        .env("DATABASE_URL", support::database_url(dir))
        .env("SHARDS", shards)
        .env("LEASE_SECS", "2")
        // The fake bills $0.001 a reply: a person's third answer of the day
        // is over, wherever the first two were.
        .env("BUDGET_USER_DAILY", "0.0015")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn mention_in(discord: &FakeDiscord, channel: u64, id: u64, author: u64, words: &str) {
    let message = discord.message(id, channel, author, &format!("<@{BOT}> {words}"), true);
    discord.dispatch("MESSAGE_CREATE", message);
}

/// How many messages with exactly `content` the bots posted.
fn posted(discord: &FakeDiscord, content: &str) -> usize {
    discord
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.body["content"] == content)
        .count()
}

#[tokio::test]
async fn two_processes_answer_each_message_once_and_take_over_a_dead_ones_threads() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), serde_json::json!({}));
    discord.add_channel_in(OTHER_GUILD, OTHER_CHANNEL);
    assert_ne!(shard_of(Some(GUILD), 2), shard_of(Some(OTHER_GUILD), 2));
    // The tables are made once, before the two start together.
    mcpcord::store::SqlStore::open(&support::database_url(dir.path()))
        .await
        .unwrap()
        .close()
        .await;
    let mut first = bot(&discord, &model, dir.path(), "0/2");
    let mut second = bot(&discord, &model, dir.path(), "1/2");
    let mut shards: Vec<u64> = discord
        .wait_identified(2)
        .await
        .iter()
        .map(|s| s.0)
        .collect();
    shards.sort();
    assert_eq!(shards, [0, 1]);

    model.script([text("Answer here.")]);
    let here = 720_000_000_000_000_001;
    mention_in(&discord, CHANNEL, here, ALICE, "hello");
    discord
        .wait_for("the first server's answer", |c| {
            c.body["content"] == "Answer here."
        })
        .await;
    model.script([text("Answer there.")]);
    mention_in(&discord, OTHER_CHANNEL, here + 1, ALICE, "hello there");
    discord
        .wait_for("the other server's answer", |c| {
            c.body["content"] == "Answer there."
        })
        .await;
    // Each message was asked about once and answered once; the commands
    // were registered once, by shard 0's process.
    assert_eq!(model.requests().len(), 2);
    assert_eq!(posted(&discord, "Answer here."), 1);
    assert_eq!(posted(&discord, "Answer there."), 1);
    assert_eq!(discord.registrations(), 1);

    // Alice's budget counts what both processes spent for her.
    mention_in(&discord, OTHER_CHANNEL, here + 2, ALICE, "once more");
    let refused = discord
        .wait_for("the refusal over the budget", |c| {
            c.body["content"]
                .as_str()
                .is_some_and(|s| s.starts_with("⛔"))
        })
        .await;
    let refusal = refused.body["content"].as_str().unwrap();
    assert!(refusal.contains("($0.0020 today)"), "{refusal}");
    assert_eq!(model.requests().len(), 2);

    // The process of the first server dies mid-turn, with a message waiting.
    let (dying, survivor) = if shard_of(Some(GUILD), 2) == 0 {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    model.script([Reply::Hang]);
    let thread = here + 10;
    mention_in(&discord, CHANNEL, thread, BOB, "think hard");
    model.wait_for_requests(3).await;
    let waiting = discord.message(thread + 1, thread, BOB, "and this too", false);
    discord.dispatch("MESSAGE_CREATE", waiting);
    let store = mcpcord::store::SqlStore::open(&support::database_url(dir.path()))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !store
        .kept_inputs()
        .await
        .unwrap()
        .iter()
        .any(|(_, input)| input.position == thread + 1)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the message was never kept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    store.close().await;
    dying.kill().unwrap();
    dying.wait().unwrap();

    // Once its claim expires, the other process answers what it left.
    model.script([text("Taken over.")]);
    discord
        .wait_for("the answer of the process that took over", |c| {
            c.body["content"] == "Taken over."
        })
        .await;
    let asked = model.requests().last().unwrap()["messages"].clone();
    assert_eq!(
        said(asked.as_array().unwrap().last().unwrap()),
        "and this too"
    );
    assert_eq!(posted(&discord, "Taken over."), 1);
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());

    std::process::Command::new("kill")
        .args(["-TERM", &survivor.id().to_string()])
        .status()
        .unwrap();
    survivor.wait().unwrap();
}
