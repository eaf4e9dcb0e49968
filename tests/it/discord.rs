//! The Discord bot end to end: the real serenity client against a loopback
//! Discord (REST + gateway), the real engine, SQLite and MCP servers, and the
//! loopback model.

use crate::support;
use base64::Engine as _;

use std::path::Path;
use std::sync::Arc;

use crate::support::discord::{ALICE, BOB, BOT, CHANNEL, FakeDiscord};
use crate::support::{FakeModel, Reply, call, said, text, user_said};
use mcpcord::app::App;
use mcpcord::config::DiscordConfig;
use mcpcord::conversation::Clock;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    app: Arc<App>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        self.app.shutdown().await;
    }
}

async fn start(
    discord: &FakeDiscord,
    model: &FakeModel,
    dir: &Path,
    extra: &[(&str, &str)],
) -> Running {
    start_at(discord, model, dir, extra, Clock::system()).await
}

/// [`start`] with the clock the bot reads.
async fn start_at(
    discord: &FakeDiscord,
    model: &FakeModel,
    dir: &Path,
    extra: &[(&str, &str)],
    clock: Clock,
) -> Running {
    if !dir.join("mcp.json").exists() {
        support::write_mcp(dir, json!({}));
    }
    let app = Arc::new(
        App::build_with_clock(&support::config(model, dir, extra), clock)
            .await
            .unwrap(),
    );
    let mut env: Vec<(String, String)> = vec![
        ("DISCORD_TOKEN".into(), "discord-secret-token".into()),
        ("DISCORD_API_BASE_URL".into(), discord.base_url.clone()),
        ("STREAM_EDIT_INTERVAL_MS".into(), "50".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = DiscordConfig::from_lookup(|name| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    let registered = discord.registrations();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(mcpcord::discord::run(
        app.discord_ports(),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    discord.wait_registered(registered).await;
    Running { stop, task, app }
}

/// Alice mentions the bot in `CHANNEL` with message `id`.
fn mention(discord: &FakeDiscord, id: u64, text: &str) {
    let message = discord.message(id, CHANNEL, ALICE, &format!("<@{BOT}> {text}"), true);
    discord.dispatch("MESSAGE_CREATE", message);
}

/// `author` writes `text` in `channel` without a mention.
fn say(discord: &FakeDiscord, id: u64, channel: u64, author: u64, text: &str) {
    discord.dispatch(
        "MESSAGE_CREATE",
        discord.message(id, channel, author, text, false),
    );
}

fn contents(posts: &[Value]) -> Vec<String> {
    posts
        .iter()
        .map(|p| p["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_mention_opens_a_thread_where_tools_run_and_the_answer_lands() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "buy milk").unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let list = json!({"path": dir.path()}).to_string();
    model.script([
        call("c1", "fs__list_directory", &list),
        text("You have notes.txt."),
        text("It was notes.txt."),
        text("You are welcome."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;

    let first = 500_000_000_000_000_001;
    mention(&discord, first, "what files do I have?");
    let thread = discord
        .wait_for("a thread", |c| {
            c.path == format!("/channels/{CHANNEL}/messages/{first}/threads")
        })
        .await;
    assert_eq!(thread.body["name"], "what files do I have?");
    let answer = discord
        .wait_for("the answer", |c| c.body["content"] == "You have notes.txt.")
        .await;
    assert_eq!(answer.path, format!("/channels/{first}/messages"));
    let notice = &discord.posts(first)[0];
    assert!(
        notice["content"]
            .as_str()
            .unwrap()
            .starts_with("🔧 `fs › list_directory`"),
        "{notice}"
    );
    assert_eq!(notice["allowed_mentions"], json!({"parse": []}));
    discord
        .wait_for("the notice edited to done", |c| {
            c.method == "PATCH"
                && c.body["content"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("✅ `fs › list_directory`"))
        })
        .await;
    assert!(
        discord
            .calls()
            .iter()
            .any(|c| c.path == format!("/channels/{first}/typing"))
    );

    // A follow-up in the thread needs no mention and continues the conversation.
    say(&discord, first + 1, first, ALICE, "which one was it?");
    discord
        .wait_for("the follow-up answer", |c| {
            c.body["content"] == "It was notes.txt."
        })
        .await;
    let sent = &model.requests()[2]["messages"];
    assert_eq!(sent[0]["role"], "system");
    assert_eq!(said(&sent[1]), "what files do I have?");
    assert!(sent[1]["content"].as_str().unwrap().starts_with("<@"));
    assert_eq!(
        said(sent.as_array().unwrap().last().unwrap()),
        "which one was it?"
    );
    assert!(model.rejected().is_empty());
    // A message in the channel that does not mention the bot is ignored:
    // the message after it is answered, and it was not.
    say(&discord, first + 2, CHANNEL, BOB, "unrelated chatter");
    say(&discord, first + 3, first, ALICE, "thanks");
    discord
        .wait_for("the answer to the later message", |c| {
            c.body["content"] == "You are welcome."
        })
        .await;
    bot.stop().await;
    assert_eq!(model.requests().len(), 4);
    assert!(!model_saw(&model, "unrelated chatter"));
    assert_eq!(
        discord.posts(CHANNEL).len(),
        0,
        "nothing said in the channel"
    );
    let all = format!("{:?}", discord.calls());
    assert!(!all.contains("discord-secret-token") && !all.contains("sk-or-v1-test-secret"));
}

#[tokio::test]
async fn long_answers_are_split_with_code_blocks_intact_and_429s_are_waited_out() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let code: String = (0..120)
        .map(|i| format!("let value_{i} = compute({i});\n"))
        .collect();
    let long = format!("Here is the program:\n\n```rust\n{code}```\n\nThat is all.");
    model.script([Reply::Text(long.clone())]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("STREAM_RESPONSES", "false")],
    )
    .await;
    let first = 510_000_000_000_000_001;
    discord.rate_limit_next(&format!("/channels/{first}/messages"), 0.3);
    mention(&discord, first, "write it");
    discord
        .wait_for("the end of the answer", |c| {
            c.body["content"]
                .as_str()
                .is_some_and(|s| s.ends_with("That is all."))
        })
        .await;
    let posts = contents(&discord.posts(first));
    assert!(posts.len() >= 2, "{posts:?}");
    for post in &posts {
        assert!(post.chars().count() <= 2000);
        assert_eq!(
            post.matches("```").count() % 2,
            0,
            "unbalanced fences: {post}"
        );
    }
    assert!(posts[1].starts_with("```rust"), "{}", posts[1]);
    assert!(posts.join("\n").contains("let value_119 = compute(119);"));
    assert!(
        discord.calls().iter().any(|c| c.method == "POST (429)"),
        "the 429 was scripted"
    );
    bot.stop().await;
}

#[tokio::test]
async fn two_quick_messages_are_answered_in_order() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([
        text("Hello."),
        text("Answer to one."),
        text("Answer to two."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let first = 520_000_000_000_000_001;
    mention(&discord, first, "hi");
    discord
        .wait_for("the greeting", |c| c.body["content"] == "Hello.")
        .await;
    say(&discord, first + 1, first, ALICE, "one");
    say(&discord, first + 2, first, BOB, "two");
    discord
        .wait_for("the second answer", |c| {
            c.body["content"] == "Answer to two."
        })
        .await;
    let requests = model.requests();
    let last_user = |r: &Value| said(r["messages"].as_array().unwrap().last().unwrap());
    assert_eq!(last_user(&requests[1]), "one");
    assert_eq!(last_user(&requests[2]), "two");
    let answers: Vec<String> = contents(&discord.posts(first))
        .into_iter()
        .filter(|c| c.starts_with("Answer"))
        .collect();
    assert_eq!(answers, ["Answer to one.", "Answer to two."]);
    bot.stop().await;
}

#[tokio::test]
async fn slash_commands_answer_in_time() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    model.script([text("Hi!")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("ADMIN_USERS", &ALICE.to_string())],
    )
    .await;
    let thread = 530_000_000_000_000_001;
    mention(&discord, thread, "hi");
    discord
        .wait_for("the answer", |c| c.body["content"] == "Hi!")
        .await;

    let command =
        |id: u64, user: u64, data: Value| discord.interaction(id, 2, thread, user, data, None);
    let original = |id: u64| {
        format!(
            "/webhooks/{}/token-{id}/messages/@original",
            support::discord::APP
        )
    };

    discord.dispatch(
        "INTERACTION_CREATE",
        command(1, ALICE, json!({"id": "1", "name": "usage", "type": 1})),
    );
    let usage = discord.wait_for("/usage", |c| c.path == original(1)).await;
    let usage = usage.body["content"].as_str().unwrap().to_owned();
    assert!(
        usage.contains(
            "This thread: 1 responses, 100 prompt tokens (60% read from cache, 30 written to it)"
        ) && usage.contains("This server today"),
        "{usage}"
    );
    let deferred = discord
        .calls()
        .into_iter()
        .find(|c| c.path == "/interactions/1/token-1/callback")
        .unwrap();
    assert_eq!(deferred.body["type"], 5);

    discord.dispatch(
        "INTERACTION_CREATE",
        command(2, ALICE, json!({"id": "2", "name": "tools", "type": 1})),
    );
    let tools = discord.wait_for("/tools", |c| c.path == original(2)).await;
    assert!(
        tools.body["content"]
            .as_str()
            .unwrap()
            .starts_with("✅ **fs**: `read_file`, `read_text_file`"),
        "{}",
        tools.body
    );

    let autocomplete = json!({"id": "3", "name": "model", "type": 1,
        "options": [{"name": "model", "type": 3, "value": "TOOL", "focused": true}]});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(3, 4, thread, ALICE, autocomplete, None),
    );
    let choices = discord
        .wait_for("autocomplete", |c| {
            c.path == "/interactions/3/token-3/callback"
        })
        .await;
    assert_eq!(
        choices.body,
        json!({"type": 8, "data": {"choices": [{"name": "test/tools", "value": "test/tools"}]}})
    );

    let set = |model: &str| json!({"id": "4", "name": "model", "type": 1, "options": [{"name": "model", "type": 3, "value": model}]});
    discord.dispatch("INTERACTION_CREATE", command(4, BOB, set("test/small")));
    let refused = discord
        .wait_for("/model by a non-admin", |c| c.path == original(4))
        .await;
    assert!(
        refused.body["content"]
            .as_str()
            .unwrap()
            .contains("Only admins"),
        "{}",
        refused.body
    );
    discord.dispatch(
        "INTERACTION_CREATE",
        command(5, ALICE, set("test/no-tools")),
    );
    let refused = discord
        .wait_for("/model without tools", |c| c.path == original(5))
        .await;
    assert!(
        refused.body["content"]
            .as_str()
            .unwrap()
            .contains("cannot use tools"),
        "{}",
        refused.body
    );
    discord.dispatch("INTERACTION_CREATE", command(6, ALICE, set("test/small")));
    let set = discord.wait_for("/model", |c| c.path == original(6)).await;
    assert!(
        set.body["content"]
            .as_str()
            .unwrap()
            .contains("uses `test/small` from now on")
    );
    assert_eq!(
        bot.app
            .engine
            .model_of(&format!("discord:{thread}"))
            .await
            .unwrap(),
        "test/small"
    );

    discord.dispatch(
        "INTERACTION_CREATE",
        command(7, ALICE, json!({"id": "7", "name": "reset", "type": 1})),
    );
    discord.wait_for("/reset", |c| c.path == original(7)).await;
    use mcpcord::conversation::Store;
    assert!(
        bot.app
            .store
            .history(&format!("discord:{thread}"))
            .await
            .unwrap()
            .is_empty()
    );
    bot.stop().await;
}

#[tokio::test]
async fn approvals_are_granted_denied_timed_out_and_guarded() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let write = |name: &str| json!({"path": dir.path().join(name), "content": "x"}).to_string();
    model.script([
        call("w1", "fs__write_file", &write("approved.txt")),
        text("Written."),
        call("w2", "fs__write_file", &write("denied.txt")),
        text("Not written."),
        call("w3", "fs__write_file", &write("ignored.txt")),
        text("Nobody answered."),
    ]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("APPROVAL_TIMEOUT_SECS", "1")],
    )
    .await;
    let thread = 540_000_000_000_000_001;
    let question = |n: usize| {
        let discord = discord.clone();
        async move {
            let mut asked = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while asked.len() < n {
                asked = discord
                    .posts(thread)
                    .into_iter()
                    .filter(|p| {
                        p["components"][0]["components"][0]["custom_id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with("approve:"))
                    })
                    .collect();
                assert!(std::time::Instant::now() < deadline, "no approval question");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let post = asked.pop().unwrap();
            let key = post["components"][0]["components"][0]["custom_id"]
                .as_str()
                .unwrap()
                .to_owned();
            (post, key.trim_start_matches("approve:").to_owned())
        }
    };
    let press = |id: u64, user: u64, custom_id: String, post: &Value| {
        let data = json!({"custom_id": custom_id, "component_type": 2});
        let message = json!({"id": "1", "channel_id": thread.to_string(), "author": support::discord::user(BOT, "mcpcord", true),
            "content": post["content"], "timestamp": "2026-11-26T12:00:00+00:00", "edited_timestamp": null, "tts": false,
            "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0});
        discord.interaction(id, 3, thread, user, data, Some(message))
    };

    mention(&discord, thread, "write approved.txt");
    let (post, key) = question(1).await;
    assert!(
        post["content"]
            .as_str()
            .unwrap()
            .contains("fs › write_file")
    );
    // Bob did not start this turn and is no admin.
    discord.dispatch(
        "INTERACTION_CREATE",
        press(11, BOB, format!("approve:{key}"), &post),
    );
    let refused = discord
        .wait_for("Bob's refusal", |c| {
            c.path == "/interactions/11/token-11/callback"
        })
        .await;
    assert_eq!(refused.body["data"]["flags"], 64);
    discord.dispatch(
        "INTERACTION_CREATE",
        press(12, ALICE, format!("approve:{key}"), &post),
    );
    discord
        .wait_for("the approved answer", |c| c.body["content"] == "Written.")
        .await;
    assert!(dir.path().join("approved.txt").exists());
    let update = discord
        .calls()
        .into_iter()
        .find(|c| c.path == "/interactions/12/token-12/callback")
        .unwrap();
    assert_eq!(update.body["type"], 7);
    assert_eq!(update.body["data"]["components"], json!([]));

    say(&discord, thread + 1, thread, ALICE, "now denied.txt");
    let (post, key) = question(2).await;
    discord.dispatch(
        "INTERACTION_CREATE",
        press(13, ALICE, format!("deny:{key}"), &post),
    );
    discord
        .wait_for("the denied answer", |c| c.body["content"] == "Not written.")
        .await;
    assert!(!dir.path().join("denied.txt").exists());

    say(&discord, thread + 2, thread, ALICE, "and ignored.txt");
    question(3).await;
    discord
        .wait_for("the timed-out answer", |c| {
            c.body["content"] == "Nobody answered."
        })
        .await;
    assert!(!dir.path().join("ignored.txt").exists());
    assert!(discord.calls().iter().any(|c| {
        c.body["content"]
            .as_str()
            .is_some_and(|s| s.contains("No answer within 1 seconds"))
    }));
    let results = support::tool_results(&model.requests()[5]);
    assert!(
        results[1].contains("declined") && results[2].contains("nobody approved"),
        "{results:?}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn every_message_in_an_auto_thread_channel_opens_a_thread_without_a_mention() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Opened for you."), text("Still here.")]);
    let elsewhere = CHANNEL + 1;
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("AUTO_THREAD_CHANNELS", &CHANNEL.to_string())],
    )
    .await;
    let first = 555_000_000_000_000_001;
    say(&discord, first, elsewhere, ALICE, "not here");
    // Discord's own notes (here: a member joined) open no thread.
    let mut joined = discord.message(first - 1, CHANNEL, ALICE, "", false);
    joined["type"] = 7.into();
    discord.dispatch("MESSAGE_CREATE", joined);
    say(&discord, first + 1, CHANNEL, ALICE, "help me plan a trip");
    let thread = discord
        .wait_for("a thread", |c| {
            c.path == format!("/channels/{CHANNEL}/messages/{}/threads", first + 1)
        })
        .await;
    assert_eq!(thread.body["name"], "help me plan a trip");
    discord
        .wait_for("the answer in the thread", |c| {
            c.path == format!("/channels/{}/messages", first + 1)
                && c.body["content"] == "Opened for you."
        })
        .await;
    say(&discord, first + 2, first + 1, ALICE, "and then?");
    discord
        .wait_for("the follow-up", |c| c.body["content"] == "Still here.")
        .await;
    bot.stop().await;
    assert_eq!(model.requests().len(), 2);
    assert!(!model_saw(&model, "not here"));
    let threads = discord
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with("/threads"))
        .count();
    assert_eq!(threads, 1, "only the real message opened a thread");
}

#[tokio::test]
async fn a_restarted_bot_carries_on_in_its_threads() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Noted: blue."), text("You said blue.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 550_000_000_000_000_001;
    mention(&discord, thread, "my colour is blue");
    discord
        .wait_for("the first answer", |c| c.body["content"] == "Noted: blue.")
        .await;
    bot.stop().await;

    let bot = start(&discord, &model, dir.path(), &[]).await;
    say(&discord, thread + 1, thread, ALICE, "what is my colour?");
    discord
        .wait_for("the answer after the restart", |c| {
            c.body["content"] == "You said blue."
        })
        .await;
    assert_eq!(user_said(&model.requests()[1])[0], "my colour is blue");
    bot.stop().await;
}

#[tokio::test]
async fn access_lists_refuse_what_they_should() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Hello Alice."), text("Still here.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("ALLOWED_USERS", &ALICE.to_string())],
    )
    .await;
    let bob = 560_000_000_000_000_001;
    discord.dispatch(
        "MESSAGE_CREATE",
        discord.message(bob, CHANNEL, BOB, &format!("<@{BOT}> hi"), true),
    );
    let alice = bob + 1;
    mention(&discord, alice, "hi");
    discord
        .wait_for("Alice's answer", |c| c.body["content"] == "Hello Alice.")
        .await;
    assert!(
        !discord
            .calls()
            .iter()
            .any(|c| c.path.contains(&bob.to_string())),
        "Bob must be ignored"
    );
    // DMs are off by default.
    let mut dm = discord.message(
        alice + 1,
        570_000_000_000_000_001,
        ALICE,
        "hello in private",
        false,
    );
    dm.as_object_mut().unwrap().remove("guild_id");
    dm.as_object_mut().unwrap().remove("member");
    discord.dispatch("MESSAGE_CREATE", dm);
    // A later message is answered; the DM before it was not.
    mention(&discord, alice + 2, "still there?");
    discord
        .wait_for("Alice's second answer", |c| {
            c.body["content"] == "Still here."
        })
        .await;
    bot.stop().await;
    assert_eq!(model.requests().len(), 2);
    assert!(!model_saw(&model, "hello in private"));
    assert!(discord.posts(570_000_000_000_000_001).is_empty());
}

/// Whether any request to the model contained `text`.
fn model_saw(model: &FakeModel, text: &str) -> bool {
    model
        .requests()
        .iter()
        .any(|r| r.to_string().contains(text))
}

#[tokio::test]
async fn attachments_become_text_images_or_a_notice() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Got them.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 580_000_000_000_000_001;
    let mut message = discord.message(
        thread,
        CHANNEL,
        ALICE,
        &format!("<@{BOT}> look at these"),
        true,
    );
    let file = |id: u64, name: &str, kind: &str| {
        json!({"id": id.to_string(), "filename": name, "size": 10, "url": discord.attachment_url(name),
               "proxy_url": discord.attachment_url(name), "content_type": kind})
    };
    message["attachments"] = json!([
        file(1, "notes.txt", "text/plain"),
        file(2, "pixel.png", "image/png"),
        file(3, "archive.zip", "application/zip"),
        file(4, "endless.log", "text/plain")
    ]);
    discord.dispatch("MESSAGE_CREATE", message);
    discord
        .wait_for("the answer", |c| c.body["content"] == "Got them.")
        .await;
    let sent = &model.requests()[0]["messages"][1]["content"];
    let text = sent[0]["text"].as_str().unwrap();
    let text = text.split_once("): ").unwrap().1;
    assert!(
        text.starts_with(
            "look at these\n\n[attached file notes.txt]\nline one\nline two\n\n[attached file endless.log]\ntick tock\n"
        ),
        "{}",
        &text[..200]
    );
    // The endless file is read up to the cap, not forever.
    assert!(text.ends_with("[cut: the file is longer; the first 100000 bytes are shown]"));
    // The image goes as its bytes, never as Discord's expiring link.
    let url = sent[1]["image_url"]["url"].as_str().unwrap();
    assert!(url.starts_with("data:image/png;base64,"), "{url}");
    assert!(!url.contains(&discord.attachment_url("pixel.png")));
    let notices = contents(&discord.posts(thread));
    assert!(
        notices
            .iter()
            .any(|n| n.contains("archive.zip was left out")),
        "{notices:?}"
    );
    bot.stop().await;

    // After a restart the image still goes as its bytes, from the database;
    // Discord's link (expired by then) is never sent.
    model.script([support::text("Still see it.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    say(&discord, thread + 1, thread, ALICE, "and now?");
    discord
        .wait_for("the answer after the restart", |c| {
            c.body["content"] == "Still see it."
        })
        .await;
    let later = &model.requests()[1];
    assert_eq!(&later["messages"][1]["content"][1]["image_url"]["url"], url);
    assert!(!later.to_string().contains(&discord.attachment_url("")));
    bot.stop().await;
}

#[tokio::test]
async fn a_truncated_tool_result_is_attached_in_full() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.txt"), "word ".repeat(200)).unwrap();
    support::write_mcp(dir.path(), json!({"fs": support::filesystem(dir.path())}));
    let read = json!({"path": dir.path().join("big.txt")}).to_string();
    model.script([call("r1", "fs__read_text_file", &read), text("It is long.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("TOOL_RESULT_MAX_CHARS", "50")],
    )
    .await;
    let thread = 590_000_000_000_000_001;
    mention(&discord, thread, "read big.txt");
    discord
        .wait_for("the answer", |c| c.body["content"] == "It is long.")
        .await;
    let file = discord
        .posts(thread)
        .into_iter()
        .find(|p| p["has_file"] == true)
        .expect("the full output as a file");
    assert_eq!(
        file["attachments"][0]["filename"],
        "fs-read_text_file-output.txt"
    );
    bot.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_the_grace_period_then_cuts_the_turn_cleanly() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([Reply::Hang]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("SHUTDOWN_GRACE_SECS", "1")],
    )
    .await;
    let thread = 600_000_000_000_000_001;
    mention(&discord, thread, "think hard");
    model.wait_for_requests(1).await;
    bot.stop().await;
    assert!(
        contents(&discord.posts(thread))
            .iter()
            .any(|c| c.contains("cut short"))
    );
    // What the user wrote is kept, and nothing dangles.
    let url = support::database_url(dir.path());
    let store = mcpcord::store::SqlStore::open(&url).await.unwrap();
    use mcpcord::conversation::Store;
    let history = store.history(&format!("discord:{thread}")).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].text(), "think hard");
}

#[tokio::test]
async fn direct_messages_work_when_allowed() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Hello in private.")]);
    let bot = start(&discord, &model, dir.path(), &[("ALLOW_DMS", "true")]).await;
    let dm_channel = 610_000_000_000_000_001;
    let mut dm = discord.message(
        610_000_000_000_000_002,
        dm_channel,
        ALICE,
        "hi there",
        false,
    );
    dm.as_object_mut().unwrap().remove("guild_id");
    dm.as_object_mut().unwrap().remove("member");
    discord.dispatch("MESSAGE_CREATE", dm);
    discord
        .wait_for("the DM answer", |c| {
            c.path == format!("/channels/{dm_channel}/messages")
                && c.body["content"] == "Hello in private."
        })
        .await;
    bot.stop().await;
}

#[tokio::test]
async fn the_run_command_explains_token_problems_and_stops_on_sigterm() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let command = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mcpcord"));
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("OPENROUTER_API_KEY", "sk-or-v1-test-secret")
            .env("OPENROUTER_BASE_URL", &model.base_url)
            .env("MODEL_API", model.model_api())
            .env("DISCORD_API_BASE_URL", &discord.base_url)
            .env("DATABASE_URL", support::database_url(dir.path()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(token) = token {
            cmd.env("DISCORD_TOKEN", token);
        }
        cmd
    };
    let output = tokio::task::spawn_blocking({
        let mut cmd = command(None);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Missing DISCORD_TOKEN"));

    let output = tokio::task::spawn_blocking({
        let mut cmd = command(Some("wrong-token"));
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        err.contains("rejected the bot token") && !err.contains("wrong-token"),
        "{err}"
    );

    // With the right token it connects and says so to `mcpcord health`;
    // SIGTERM stops it cleanly.
    let health_file = dir.path().join("health");
    let health = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mcpcord"))
            .arg("health")
            .env("HEALTH_FILE", &health_file)
            .output()
            .unwrap()
    };
    assert!(!health().status.success(), "healthy before the bot ran");
    let registered = discord.registrations();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = free.local_addr().unwrap().to_string();
    drop(free);
    let child = command(Some(support::discord::TOKEN))
        .env("HEALTH_FILE", &health_file)
        .env("METRICS_ADDR", &metrics_addr)
        .spawn()
        .unwrap();
    discord.wait_registered(registered).await;
    let checked = health();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    // The same on the metrics address, with the REST calls counted by route
    // (ids left out).
    let (status, body) = support::http_get(&metrics_addr, "/healthz").await;
    assert!(status.contains("200"), "{status} {body}");
    let (_, metrics) = support::http_get(&metrics_addr, "/metrics").await;
    assert_eq!(
        support::sample(
            &metrics,
            r#"mcpcord_discord_requests_total{route="PUT /applications/{id}/commands"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(!metrics.contains(support::discord::TOKEN));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn in_other_threads_a_mention_is_needed_and_errors_are_explained() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([Reply::Status(402, "Insufficient credits".into(), None)]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 620_000_000_000_000_001;
    discord.add_thread(thread);
    say(&discord, thread + 1, thread, ALICE, "no mention here");
    discord.dispatch(
        "MESSAGE_CREATE",
        discord.message(thread + 2, thread, ALICE, &format!("<@{BOT}> now?"), true),
    );
    let error = discord
        .wait_for("the explained error", |c| {
            c.path == format!("/channels/{thread}/messages")
                && c.body["content"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("❌"))
        })
        .await;
    assert!(
        error.body["content"]
            .as_str()
            .unwrap()
            .contains("out of credits"),
        "{}",
        error.body
    );
    assert!(
        !discord.calls().iter().any(|c| c.path.ends_with("/threads")),
        "no new thread inside a thread"
    );
    bot.stop().await;
    assert_eq!(model.requests().len(), 1, "only the mention is a turn");
    assert_eq!(user_said(&model.requests()[0]), ["now?"]);
}

#[tokio::test]
async fn a_channel_allow_list_covers_the_threads_of_its_channels() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("In the allowed channel."), text("In its thread.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("ALLOWED_CHANNELS", &CHANNEL.to_string())],
    )
    .await;
    let elsewhere = 630_000_000_000_000_001;
    discord.add_channel(elsewhere);
    let refused = elsewhere + 1;
    discord.dispatch(
        "MESSAGE_CREATE",
        discord.message(refused, elsewhere, ALICE, &format!("<@{BOT}> hi"), true),
    );
    let thread = elsewhere + 2;
    mention(&discord, thread, "hi");
    discord
        .wait_for("the answer", |c| {
            c.body["content"] == "In the allowed channel."
        })
        .await;
    say(&discord, thread + 1, thread, ALICE, "and here?");
    discord
        .wait_for("the answer in the thread", |c| {
            c.body["content"] == "In its thread."
        })
        .await;
    bot.stop().await;
    assert!(
        !discord
            .calls()
            .iter()
            .any(|c| c.path.contains(&format!("/messages/{refused}/")))
    );
    assert_eq!(model.requests().len(), 2);
}

/// The inputs kept in the database in `dir` (waiting for their turn).
async fn kept(dir: &Path) -> Vec<(String, u64)> {
    use mcpcord::conversation::Store;
    let url = support::database_url(dir);
    let store = mcpcord::store::SqlStore::open(&url).await.unwrap();
    let kept = store.kept_inputs().await.unwrap();
    store.close().await;
    kept.into_iter().map(|(c, i)| (c, i.position)).collect()
}

/// Waits (up to 20 s) until message `position` is kept in the database.
async fn wait_kept(dir: &Path, position: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !kept(dir).await.iter().any(|(_, p)| *p == position) {
        assert!(
            std::time::Instant::now() < deadline,
            "message {position} was never kept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_earlier_message_with_a_slow_attachment_is_still_answered_first() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Hello."), text("Read it."), text("Answer to two.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 640_000_000_000_000_001;
    mention(&discord, thread, "hi");
    discord
        .wait_for("the greeting", |c| c.body["content"] == "Hello.")
        .await;
    let mut slow = discord.message(thread + 1, thread, ALICE, "read this", false);
    slow["attachments"] = json!([discord.file(1, "held.txt", "text/plain")]);
    discord.dispatch("MESSAGE_CREATE", slow);
    say(&discord, thread + 2, thread, BOB, "two");
    // Message two is taken in while the file of message one is still coming.
    wait_kept(dir.path(), thread + 2).await;
    discord.release_held();
    discord
        .wait_for("the second answer", |c| {
            c.body["content"] == "Answer to two."
        })
        .await;
    let answers: Vec<String> = contents(&discord.posts(thread))
        .into_iter()
        .filter(|c| c.starts_with("Read") || c.starts_with("Answer"))
        .collect();
    assert_eq!(answers, ["Read it.", "Answer to two."]);
    let requests = model.requests();
    let last_user = |r: &Value| said(r["messages"].as_array().unwrap().last().unwrap());
    assert!(
        last_user(&requests[1]).starts_with("read this\n\n[attached file held.txt]\nheld contents")
    );
    assert_eq!(last_user(&requests[2]), "two");
    bot.stop().await;
}

#[tokio::test]
async fn a_message_waiting_behind_a_cut_turn_is_answered_after_the_restart() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([Reply::Hang]);
    let grace = [("SHUTDOWN_GRACE_SECS", "1")];
    let bot = start(&discord, &model, dir.path(), &grace).await;
    let thread = 650_000_000_000_000_001;
    mention(&discord, thread, "think hard");
    model.wait_for_requests(1).await;
    say(&discord, thread + 1, thread, BOB, "and this too");
    wait_kept(dir.path(), thread + 1).await;
    bot.stop().await;
    let said = contents(&discord.posts(thread));
    assert!(said.iter().any(|c| c.contains("cut short")), "{said:?}");
    assert!(
        said.iter()
            .any(|c| c.contains("1 message(s) waiting here are kept")),
        "{said:?}"
    );
    assert_eq!(
        kept(dir.path()).await,
        [(format!("discord:{thread}"), thread + 1)]
    );

    model.script([text("Answered after the restart.")]);
    let bot = start(&discord, &model, dir.path(), &grace).await;
    discord
        .wait_for("the answer after the restart", |c| {
            c.body["content"] == "Answered after the restart."
        })
        .await;
    let said = contents(&discord.posts(thread));
    assert!(
        said.iter()
            .any(|c| c.contains("sent before the bot restarted")),
        "{said:?}"
    );
    let sent = model.requests()[1]["messages"].clone();
    let users: Vec<String> = sent
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(crate::support::said)
        .collect();
    assert_eq!(users, ["think hard", "and this too"]);
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
    bot.stop().await;
    assert!(kept(dir.path()).await.is_empty());
}

#[tokio::test]
async fn a_message_waiting_when_the_bot_is_killed_is_answered_after_the_restart() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({}));
    model.script([Reply::Hang]);
    let registered = discord.registrations();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mcpcord"))
        .arg("run")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENROUTER_API_KEY", "sk-or-v1-test-secret")
        .env("OPENROUTER_BASE_URL", &model.base_url)
        .env("MODEL_API", model.model_api())
        .env("DEFAULT_MODEL", "test/tools")
        .env("DISCORD_TOKEN", support::discord::TOKEN)
        .env("DISCORD_API_BASE_URL", &discord.base_url)
        .env("DATABASE_URL", support::database_url(dir.path()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    discord.wait_registered(registered).await;
    let thread = 660_000_000_000_000_001;
    mention(&discord, thread, "think hard");
    model.wait_for_requests(1).await;
    say(&discord, thread + 1, thread, BOB, "and this too");
    wait_kept(dir.path(), thread + 1).await;
    child.kill().unwrap();
    child.wait().unwrap();

    model.script([text("Answered after the crash.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    discord
        .wait_for("the answer after the crash", |c| {
            c.body["content"] == "Answered after the crash."
        })
        .await;
    let sent = model.requests()[1]["messages"].clone();
    let last = sent.as_array().unwrap().last().unwrap().clone();
    assert_eq!(said(&last), "and this too");
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
    bot.stop().await;
}

#[tokio::test]
async fn commands_answer_while_a_turn_waits_for_an_approval_in_a_listed_channel() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut fs = support::filesystem(dir.path());
    fs["approval"] = json!("ask");
    support::write_mcp(dir.path(), json!({"fs": fs}));
    let list = json!({"path": dir.path()}).to_string();
    model.script([call("c1", "fs__list_directory", &list), text("Listed.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("ALLOWED_CHANNELS", &CHANNEL.to_string())],
    )
    .await;
    let thread = 670_000_000_000_000_001;
    mention(&discord, thread, "list my files");
    let question = discord
        .wait_for("the approval question", |c| {
            c.body["content"]
                .as_str()
                .is_some_and(|s| s.starts_with("🔐"))
        })
        .await;
    // The notice comes before its question.
    let said = contents(&discord.posts(thread));
    let notice = said.iter().position(|c| c.starts_with("🔧")).unwrap();
    let asked = said.iter().position(|c| c.starts_with("🔐")).unwrap();
    assert!(notice < asked, "{said:?}");
    // Bob (not an admin) asks for the model in the bot's thread, under the
    // channel allow-list, while the turn waits for Alice's answer.
    let command = discord.interaction(
        680_000_000_000_000_001,
        2,
        thread,
        BOB,
        json!({"id": "1", "name": "model", "type": 1}),
        None,
    );
    discord.dispatch("INTERACTION_CREATE", command);
    let reply = discord
        .wait_for("the /model answer", |c| {
            c.method == "PATCH" && c.path.contains("/token-680000000000000001/")
        })
        .await;
    assert_eq!(
        reply.body["content"],
        "This conversation uses `test/tools`."
    );
    let key = question.body["components"][0]["components"][0]["custom_id"].clone();
    let press = discord.interaction(
        680_000_000_000_000_002,
        3,
        thread,
        ALICE,
        json!({"custom_id": key, "component_type": 2}),
        Some(json!({"id": "1", "channel_id": thread.to_string(), "content": question.body["content"],
                    "author": support::discord::user(BOT, "mcpcord", true), "timestamp": "2026-11-26T12:00:00+00:00",
                    "edited_timestamp": null, "tts": false, "mention_everyone": false, "mentions": [],
                    "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0})),
    );
    discord.dispatch("INTERACTION_CREATE", press);
    discord
        .wait_for("the answer", |c| c.body["content"] == "Listed.")
        .await;
    bot.stop().await;
}

#[tokio::test]
async fn a_broken_database_does_not_make_the_bot_answer_where_nobody_asked() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = start(&discord, &model, dir.path(), &[]).await;
    // The thread table goes away under the bot: every lookup fails.
    support::execute(
        &support::database_url(dir.path()),
        "ALTER TABLE discord_threads RENAME TO gone",
    )
    .await;
    say(
        &discord,
        690_000_000_000_000_001,
        CHANNEL,
        BOB,
        "chatter, not for the bot",
    );
    mention(&discord, 690_000_000_000_000_002, "are you there?");
    let error = discord
        .wait_for("the error for the mention", |c| {
            c.body["content"]
                .as_str()
                .is_some_and(|s| s.starts_with("❌"))
        })
        .await;
    let text = error.body["content"].as_str().unwrap();
    assert!(text.contains("not saved; send it again"), "{text}");
    bot.stop().await;
    let errors = contents(&discord.posts(CHANNEL));
    assert_eq!(errors.len(), 1, "only the mention is answered: {errors:?}");
    assert!(model.requests().is_empty());
}

/// A press of the button `custom_id` by `user` under a bot message.
fn press(discord: &FakeDiscord, id: u64, channel: u64, user: u64, custom_id: &str) -> Value {
    let data = json!({"custom_id": custom_id, "component_type": 2});
    let message = json!({"id": "1", "channel_id": channel.to_string(), "author": support::discord::user(BOT, "mcpcord", true),
        "content": "", "timestamp": "2026-11-26T12:00:00+00:00", "edited_timestamp": null, "tts": false,
        "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0});
    discord.interaction(id, 3, channel, user, data, Some(message))
}

/// The custom id of the first button of a posted message.
fn first_button(post: &Value) -> Option<&str> {
    post["components"][0]["components"][0]["custom_id"].as_str()
}

#[tokio::test]
async fn stop_cancels_a_running_tool_call_and_keeps_a_partial_answer() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hang.log");
    support::write_mcp(
        dir.path(),
        json!({"h": support::hostile("hang", Some(log.to_str().unwrap()))}),
    );
    model.script([
        call("c1", "h__hang", "{}"),
        text("Back again."),
        call("c2", "h__hang", "{}"),
        Reply::Stall("Here is the first half of".into()),
        text("Fine."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 660_000_000_000_000_001;
    let callback = |id: u64| format!("/interactions/{id}/token-{id}/callback");

    // The tool's notice carries Stop while the call runs.
    mention(&discord, thread, "wait for it");
    let notice = discord
        .wait_for("the notice with Stop", |c| {
            c.path == format!("/channels/{thread}/messages")
                && c.body["content"]
                    .as_str()
                    .unwrap_or("")
                    .contains("h › hang")
        })
        .await;
    let stop = first_button(&notice.body).unwrap().to_owned();
    assert_eq!(stop, format!("stop:{thread}"));
    let is_question = |c: &support::discord::Call| {
        first_button(&c.body).is_some_and(|b| b.starts_with("approve:"))
    };
    // The custom id of Approve on the `n`th question.
    let question = |n: usize| {
        let discord = discord.clone();
        async move {
            let asked = || {
                discord
                    .calls()
                    .into_iter()
                    .filter(is_question)
                    .collect::<Vec<_>>()
            };
            discord
                .wait_for("an approval question", |_| asked().len() >= n)
                .await;
            first_button(&asked()[n - 1].body).unwrap().to_owned()
        }
    };
    let approve = question(1).await;
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 20, thread, ALICE, &approve),
    );
    let called = support::wait_for_line(&log, |l| l.starts_with("called ")).await;

    // Bob did not ask and is no admin: refused, only to him.
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 21, thread, BOB, &stop),
    );
    let refused = discord
        .wait_for("Bob's refusal", |c| c.path == callback(21))
        .await;
    assert_eq!(refused.body["data"]["flags"], 64);
    assert!(
        refused.body["data"]["content"]
            .as_str()
            .unwrap()
            .contains(&format!("<@{ALICE}>")),
        "{refused:?}"
    );
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 22, thread, ALICE, &stop),
    );
    let stopped = discord
        .wait_for("Alice's stop", |c| c.path == callback(22))
        .await;
    assert_eq!(
        stopped.body["data"]["flags"],
        Value::Null,
        "said to everyone"
    );
    let finished = discord
        .wait_for("the notice marked interrupted", |c| {
            c.method == "PATCH"
                && c.body["content"]
                    .as_str()
                    .unwrap_or("")
                    .contains("interrupted by the user")
        })
        .await;
    assert_eq!(finished.body["components"], json!([]), "the button is gone");

    // The next turn is accepted by the strict model, with the call's result.
    say(&discord, thread + 1, thread, ALICE, "are you there?");
    discord
        .wait_for("the next answer", |c| c.body["content"] == "Back again.")
        .await;
    let requests = model.requests();
    assert_eq!(
        requests.len(),
        2,
        "nothing more was asked in the stopped turn"
    );
    assert!(support::tool_results(&requests[1])[0].contains("interrupted by the user"));
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());

    // Stop while an approval is asked: the question is withdrawn.
    say(&discord, thread + 2, thread, ALICE, "once more");
    question(2).await;
    let stop = format!("stop:{}", thread + 2);
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 26, thread, ALICE, &stop),
    );
    let withdrawn = discord
        .wait_for("the question withdrawn", |c| {
            c.method == "PATCH"
                && c.body["content"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Withdrawn")
        })
        .await;
    assert_eq!(withdrawn.body["components"], json!([]));
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("called")
            .count(),
        1,
        "the unapproved call never ran"
    );

    // /stop while the answer streams: what was shown is kept, marked.
    say(&discord, thread + 3, thread, ALICE, "tell me a long story");
    discord
        .wait_for("the partial answer", |c| {
            c.body["content"] == "Here is the first half of"
                && first_button(&c.body) == Some(&format!("stop:{}", thread + 3))
        })
        .await;
    let command = json!({"id": "1", "name": "stop", "type": 1});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(23, 2, thread, BOB, command.clone(), None),
    );
    let refused = discord
        .wait_for("Bob's /stop", |c| c.path == callback(23))
        .await;
    assert_eq!(refused.body["data"]["flags"], 64);
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(24, 2, thread, ALICE, command.clone(), None),
    );
    discord
        .wait_for("Alice's /stop", |c| c.path == callback(24))
        .await;
    let marked = discord
        .wait_for("the answer marked stopped", |c| {
            c.method == "PATCH"
                && c.body["content"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("stopped")
        })
        .await;
    assert!(
        marked.body["content"]
            .as_str()
            .unwrap()
            .starts_with("Here is the first half of")
    );
    assert_eq!(marked.body["components"], json!([]));
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(25, 2, thread, ALICE, command, None),
    );
    let nothing = discord
        .wait_for("/stop when idle", |c| c.path == callback(25))
        .await;
    assert_eq!(nothing.body["data"]["flags"], 64);

    say(&discord, thread + 4, thread, ALICE, "go on");
    discord
        .wait_for("the answer after", |c| c.body["content"] == "Fine.")
        .await;
    let sent = &model.requests()[4]["messages"];
    let partial = sent
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "assistant" && m["content"].is_string())
        .map(|m| m["content"].clone());
    assert!(
        sent.as_array()
            .unwrap()
            .iter()
            .any(|m| m["content"] == "Here is the first half of"),
        "the partial answer is in the history: {partial:?}"
    );
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
    bot.stop().await;

    // The server was told: the call it got was cancelled.
    let log = std::fs::read_to_string(&log).unwrap();
    let called = called.strip_prefix("called ").unwrap();
    assert!(
        log.lines().any(|l| l == format!("cancelled {called}")),
        "{log}"
    );
}

/// Alice edits her message `id` in `channel` to `text`, now.
fn edit(discord: &FakeDiscord, id: u64, channel: u64, text: &str) {
    let event = json!({
        "id": id.to_string(), "channel_id": channel.to_string(), "guild_id": support::discord::GUILD.to_string(),
        "author": support::discord::user(ALICE, "someone", false), "content": text,
        "edited_timestamp": serenity::model::Timestamp::now().to_string(), "mentions": [],
    });
    discord.dispatch("MESSAGE_UPDATE", event);
}

#[tokio::test]
async fn retry_edits_deletions_and_undo_replace_exchanges() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([
        text("Seven."),
        text("Three."),
        text("B."),
        text("Second answer."),
        Reply::Stall("Working".into()),
        Reply::Stall("Still working".into()),
        text("Short."),
        text("Fresh."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 670_000_000_000_000_001;
    let callback = |id: u64| format!("/interactions/{id}/token-{id}/callback");
    let users = |n: usize| user_said(&model.requests()[n]);
    let sent = |n: usize, text: &str| model.requests()[n].to_string().contains(text);

    // The answer carries Retry; only Alice (who asked) or an admin may.
    mention(&discord, thread, "pick a number");
    let answer = discord
        .wait_for("the answer", |c| c.body["content"] == "Seven.")
        .await;
    let retry = first_button(&answer.body).unwrap().to_owned();
    assert_eq!(retry, format!("retry:{thread}"));
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 31, thread, BOB, &retry),
    );
    let refused = discord
        .wait_for("Bob's retry", |c| c.path == callback(31))
        .await;
    assert_eq!(refused.body["data"]["flags"], 64);
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 32, thread, ALICE, &retry),
    );
    let three = discord
        .wait_for("another answer", |c| c.body["content"] == "Three.")
        .await;
    let pressed = discord
        .wait_for("Alice's retry", |c| c.path == callback(32))
        .await;
    assert_eq!(
        pressed.body["data"]["components"],
        json!([]),
        "the old answer loses Retry"
    );
    assert_eq!(users(1), ["pick a number"]);
    assert!(!sent(1, "Seven."), "the replaced answer is not sent");

    // Editing the last message answers its new text instead.
    edit(
        &discord,
        thread,
        CHANNEL,
        &format!("<@{BOT}> pick a letter"),
    );
    let b = discord
        .wait_for("the answer to the edit", |c| c.body["content"] == "B.")
        .await;
    assert_eq!(users(2), ["pick a letter"]);
    assert!(!sent(2, "Three."));
    // The replaced answer loses its buttons (they would act on this one).
    let unbuttoned = |id: u64| {
        let path = format!("/channels/{thread}/messages/{id}");
        move |c: &support::discord::Call| {
            c.method == "PATCH" && c.path == path && c.body["components"] == json!([])
        }
    };
    discord
        .wait_for("Three. without buttons", unbuttoned(three.id))
        .await;

    // Editing an older one changes nothing, and says so for a while.
    say(&discord, thread + 1, thread, ALICE, "second");
    discord
        .wait_for("the second answer", |c| {
            c.body["content"] == "Second answer."
        })
        .await;
    // Only the newest answer carries Retry.
    discord.wait_for("B. without Retry", unbuttoned(b.id)).await;
    edit(&discord, thread, CHANNEL, "pick a colour");
    let notice = discord
        .wait_for("the notice", |c| {
            c.body["content"]
                .as_str()
                .unwrap_or("")
                .contains("Only your last message")
        })
        .await;
    assert_eq!(
        notice.body["message_reference"]["message_id"],
        thread.to_string()
    );

    // A deleted message is never answered; an edit of the message being
    // answered stops that turn and answers the new text.
    say(&discord, thread + 2, thread, ALICE, "a long task");
    discord
        .wait_for("the partial answer", |c| c.body["content"] == "Working")
        .await;
    // (Discord's ids are far apart: the answer to an edit of message `n`
    // is queued as `n + 1`.)
    say(&discord, thread + 30, thread, ALICE, "never mind");
    wait_kept(dir.path(), thread + 30).await;
    discord.dispatch(
        "MESSAGE_DELETE",
        json!({"id": (thread + 30).to_string(), "channel_id": thread.to_string(), "guild_id": support::discord::GUILD.to_string()}),
    );
    edit(&discord, thread + 2, thread, "a shorter task");
    discord
        .wait_for("the partial answer to the edit", |c| {
            c.body["content"] == "Still working"
        })
        .await;
    // Edited again while that edit is answered: the same once more.
    edit(&discord, thread + 2, thread, "a short task");
    discord
        .wait_for("the answer to the edit", |c| c.body["content"] == "Short.")
        .await;
    assert_eq!(users(5), ["pick a letter", "second", "a shorter task"]);
    assert_eq!(users(6), ["pick a letter", "second", "a short task"]);
    assert!(!sent(6, "Working"), "the stopped exchanges were replaced");

    // /undo takes the last exchange out.
    let undo = json!({"id": "1", "name": "undo", "type": 1});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(33, 2, thread, BOB, undo.clone(), None),
    );
    let original = |id: u64| {
        format!(
            "/webhooks/{}/token-{id}/messages/@original",
            support::discord::APP
        )
    };
    let refused = discord
        .wait_for("Bob's /undo", |c| c.path == original(33))
        .await;
    assert!(
        refused.body["content"]
            .as_str()
            .unwrap()
            .starts_with("❌ Only"),
        "{refused:?}"
    );
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(34, 2, thread, ALICE, undo, None),
    );
    let undone = discord
        .wait_for("Alice's /undo", |c| c.path == original(34))
        .await;
    assert!(
        undone.body["content"].as_str().unwrap().starts_with("↩️"),
        "{undone:?}"
    );
    say(&discord, thread + 4, thread, ALICE, "what now?");
    discord
        .wait_for("the last answer", |c| c.body["content"] == "Fresh.")
        .await;
    assert_eq!(users(7), ["pick a letter", "second", "what now?"]);
    assert_eq!(
        model.requests().len(),
        8,
        "the deleted message was never answered"
    );
    assert!(!model_saw(&model, "never mind"));
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
    bot.stop().await;
}

#[tokio::test]
async fn a_channels_prompt_and_model_are_inherited_by_its_new_threads() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Hello from general."), text("Plain.")]);
    let at: jiff::Timestamp = "2026-12-03T23:30:00Z".parse().unwrap();
    let bot = start_at(
        &discord,
        &model,
        dir.path(),
        &[
            ("ADMIN_USERS", &ALICE.to_string()),
            ("SYSTEM_PROMPT", "Be brief."),
            ("TIMEZONE", "Europe/Paris"),
        ],
        Clock::fixed(at),
    )
    .await;
    let original = |id: u64| {
        format!(
            "/webhooks/{}/token-{id}/messages/@original",
            support::discord::APP
        )
    };
    let command = |id: u64, user: u64, channel: u64, data: Value| {
        discord.dispatch(
            "INTERACTION_CREATE",
            discord.interaction(id, 2, channel, user, data, None),
        );
    };
    let system =
        |options: Value| json!({"id": "1", "name": "system", "type": 1, "options": options});
    let prompt = "You help in {channel} on {server}. Today is {weekday} {date}.";

    // Bob is no admin.
    command(
        41,
        BOB,
        CHANNEL,
        system(json!([{"name": "prompt", "type": 3, "value": prompt}])),
    );
    let refused = discord
        .wait_for("Bob's /system", |c| c.path == original(41))
        .await;
    assert!(
        refused.body["content"]
            .as_str()
            .unwrap()
            .starts_with("❌ Only admins"),
        "{refused:?}"
    );
    command(
        42,
        ALICE,
        CHANNEL,
        system(json!([{"name": "prompt", "type": 3, "value": prompt}])),
    );
    let set = discord
        .wait_for("Alice's /system", |c| c.path == original(42))
        .await;
    assert!(
        set.body["content"]
            .as_str()
            .unwrap()
            .starts_with("New threads in this channel follow"),
        "{set:?}"
    );
    command(
        43,
        ALICE,
        CHANNEL,
        json!({"id": "1", "name": "model", "type": 1, "options": [{"name": "model", "type": 3, "value": "test/small"}]}),
    );
    discord
        .wait_for("Alice's /model", |c| c.path == original(43))
        .await;

    // A thread started there later has both.
    let thread = 680_000_000_000_000_001;
    mention(&discord, thread, "hi");
    discord
        .wait_for("the answer", |c| c.body["content"] == "Hello from general.")
        .await;
    let request = &model.requests()[0];
    assert_eq!(request["model"], "test/small");
    let system_text = request["messages"][0].to_string();
    assert!(
        system_text.contains("You help in #general on Makers. Today is the weekday"),
        "{system_text}"
    );
    assert!(
        !system_text.contains("2026"),
        "no date in the prompt: {system_text}"
    );
    // The date and time (in TIMEZONE) go with the newest message instead.
    let newest = request["messages"][1]["content"].as_str().unwrap();
    assert!(
        newest.ends_with(": [Friday 2026-12-04 00:30 CET] hi"),
        "{newest}"
    );
    command(44, BOB, thread, system(json!([])));
    let shown = discord
        .wait_for("/system in the thread", |c| c.path == original(44))
        .await;
    assert!(
        shown.body["content"]
            .as_str()
            .unwrap()
            .contains("> You help in {channel} on {server}. Today is {weekday} {date}."),
        "{shown:?}"
    );

    // Cleared in the thread, it follows the global prompt again.
    command(
        45,
        ALICE,
        thread,
        system(json!([{"name": "clear", "type": 5, "value": true}])),
    );
    discord
        .wait_for("the clear", |c| c.path == original(45))
        .await;
    say(&discord, thread + 1, thread, ALICE, "and now?");
    discord
        .wait_for("the second answer", |c| c.body["content"] == "Plain.")
        .await;
    let system_text = model.requests()[1]["messages"][0].to_string();
    assert!(
        system_text.contains("Be brief.") && !system_text.contains("You help"),
        "{system_text}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn reasoning_is_shown_only_to_the_presser_and_its_effort_is_set_per_thread() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let long = "step ".repeat(600);
    model.script([
        text("Four.").with(json!({"delta": {"reasoning": "two and two"}})),
        text("Five.").with(json!({"delta": {"reasoning": long}})),
    ]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[
            ("ADMIN_USERS", &ALICE.to_string()),
            ("DEFAULT_MODEL", "anthropic/claude-test"),
        ],
    )
    .await;
    let thread = 690_000_000_000_000_001;
    let callback = |id: u64| format!("/interactions/{id}/token-{id}/callback");
    mention(&discord, thread, "what is 2 + 2?");
    let answer = discord
        .wait_for("the answer", |c| c.body["content"] == "Four.")
        .await;
    assert!(
        !answer.body["content"]
            .as_str()
            .unwrap()
            .contains("two and two")
    );
    let buttons = &answer.body["components"][0]["components"];
    assert_eq!(buttons[1]["custom_id"], format!("reasoning:{thread}"));
    let first = answer.id;
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 51, thread, BOB, &format!("reasoning:{thread}")),
    );
    let shown = discord
        .wait_for("the reasoning", |c| c.path == callback(51))
        .await;
    assert_eq!(shown.body["data"]["flags"], 64, "only Bob sees it");
    assert!(
        shown.body["data"]["content"]
            .as_str()
            .unwrap()
            .contains("two and two")
    );

    let effort = json!({"id": "1", "name": "reasoning", "type": 1, "options": [{"name": "effort", "type": 3, "value": "high"}]});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(52, 2, thread, ALICE, effort, None),
    );
    let original = format!(
        "/webhooks/{}/token-52/messages/@original",
        support::discord::APP
    );
    discord.wait_for("/reasoning", |c| c.path == original).await;
    say(&discord, thread + 1, thread, ALICE, "and 2 + 3?");
    let answer = discord
        .wait_for("the second answer", |c| c.body["content"] == "Five.")
        .await;
    let requests = model.requests();
    assert_eq!(requests[0].get("reasoning"), None);
    assert_eq!(requests[1]["reasoning"], json!({"effort": "high"}));
    // Long reasoning comes as a file.
    let custom_id = answer.body["components"][0]["components"][1]["custom_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(custom_id, format!("reasoning:{}", thread + 1));
    // The older answer keeps Reasoning, and only the newest has Retry.
    let path = format!("/channels/{thread}/messages/{first}");
    let trimmed = discord
        .wait_for("the older answer's row", |c| {
            c.method == "PATCH" && c.path == path
        })
        .await;
    let kept: Vec<&Value> = trimmed.body["components"][0]["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| &b["custom_id"])
        .collect();
    assert_eq!(kept, [&json!(format!("reasoning:{thread}"))]);
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 53, thread, ALICE, &custom_id),
    );
    let file = discord
        .wait_for("the reasoning file", |c| c.path == callback(53))
        .await;
    assert_eq!(file.body["has_file"], true, "{file:?}");
    assert_eq!(file.body["data"]["flags"], 64);
    bot.stop().await;
}

#[tokio::test]
async fn servers_are_switched_per_thread_and_a_tool_can_be_allowed_in_it() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("h.log");
    support::write_mcp(
        dir.path(),
        json!({"fs": support::filesystem(dir.path()), "h": support::hostile("counted", Some(log.to_str().unwrap()))}),
    );
    let write = |name: &str| json!({"path": dir.path().join(name), "content": "x"}).to_string();
    model.script([
        text("Hi."),
        call("w1", "fs__write_file", &write("a.txt")),
        text("Written."),
        call("w2", "fs__write_file", &write("b.txt")),
        text("Again."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 700_000_000_000_000_001;
    let callback = |id: u64| format!("/interactions/{id}/token-{id}/callback");
    mention(&discord, thread, "hi");
    discord
        .wait_for("the answer", |c| c.body["content"] == "Hi.")
        .await;

    let tools = json!({"id": "1", "name": "tools", "type": 1});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(61, 2, thread, BOB, tools, None),
    );
    let original = format!(
        "/webhooks/{}/token-61/messages/@original",
        support::discord::APP
    );
    let listed = discord.wait_for("/tools", |c| c.path == original).await;
    let content = listed.body["content"].as_str().unwrap();
    assert!(
        content.contains("✅ **fs**: ") && content.contains("✅ **h**: `echo`"),
        "{content}"
    );
    let menu = &listed.body["components"][0]["components"][0];
    assert_eq!(menu["custom_id"], "servers");
    assert_eq!(menu["options"].as_array().unwrap().len(), 2);

    let choose = |id: u64, user: u64| {
        let data = json!({"custom_id": "servers", "component_type": 3, "values": ["fs"]});
        let mut event = press(&discord, id, thread, user, "servers");
        event["data"] = data;
        discord.dispatch("INTERACTION_CREATE", event);
    };
    choose(62, BOB);
    let refused = discord
        .wait_for("Bob's choice", |c| c.path == callback(62))
        .await;
    assert_eq!(
        refused.body["data"]["flags"], 64,
        "only the starter or an admin"
    );
    choose(63, ALICE);
    let deferred = discord
        .wait_for("Alice's choice", |c| c.path == callback(63))
        .await;
    assert_eq!(deferred.body["type"], 6);
    let edited = format!(
        "/webhooks/{}/token-63/messages/@original",
        support::discord::APP
    );
    let updated = discord
        .wait_for("the new listing", |c| c.path == edited)
        .await;
    assert!(
        updated.body["content"]
            .as_str()
            .unwrap()
            .contains("⛔ **h**: switched off here")
    );
    // Its session in this thread was closed.
    support::wait_for_line(&log, |l| l.starts_with("end ")).await;

    // Allow in this thread: asked once, then not again.
    say(&discord, thread + 1, thread, ALICE, "write a.txt");
    let question = discord
        .wait_for("the question", |c| {
            first_button(&c.body).is_some_and(|b| b.starts_with("approve:"))
        })
        .await;
    let allow = question.body["components"][0]["components"][1]["custom_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(allow.starts_with("allow:"), "{allow}");
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 64, thread, ALICE, &allow),
    );
    discord
        .wait_for("the first write", |c| c.body["content"] == "Written.")
        .await;
    say(&discord, thread + 2, thread, ALICE, "write b.txt");
    discord
        .wait_for("the second write", |c| c.body["content"] == "Again.")
        .await;
    assert!(dir.path().join("a.txt").exists() && dir.path().join("b.txt").exists());
    let questions = discord
        .calls()
        .into_iter()
        .filter(|c| first_button(&c.body).is_some_and(|b| b.starts_with("approve:")))
        .count();
    assert_eq!(questions, 1, "the second call was allowed without asking");
    let offered: Vec<String> = model.requests()[1]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        offered.iter().any(|t| t.starts_with("fs__"))
            && !offered.iter().any(|t| t.starts_with("h__")),
        "{offered:?}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn mcp_progress_updates_the_tools_notice() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut everything = support::everything();
    everything["approval"] = json!("auto");
    support::write_mcp(dir.path(), json!({"everything": everything}));
    model.script([
        call(
            "p1",
            "everything__trigger-long-running-operation",
            r#"{"duration": 1, "steps": 4}"#,
        ),
        text("Done."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 710_000_000_000_000_001;
    mention(&discord, thread, "take a second");
    let progress = discord
        .wait_for("a progress edit", |c| {
            c.method == "PATCH"
                && c.body["content"].as_str().is_some_and(|t| {
                    t.starts_with("⏳ `everything › trigger-long-running-operation`")
                        && t.contains('%')
                })
        })
        .await;
    assert_eq!(
        first_button(&progress.body),
        Some(format!("stop:{thread}").as_str()),
        "Stop stays while it runs"
    );
    discord
        .wait_for("the answer", |c| c.body["content"] == "Done.")
        .await;
    let finished = discord
        .calls()
        .into_iter()
        .filter(|c| c.method == "PATCH")
        .filter_map(|c| c.body["content"].as_str().map(str::to_owned))
        .rfind(|t| t.contains("trigger-long-running-operation"))
        .unwrap();
    assert!(
        finished.starts_with("✅"),
        "the last edit is the finished notice: {finished}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn pdfs_go_to_openrouters_parser_and_elsewhere_are_explained() {
    use crate::support::Api;
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    // OpenRouter says what it parsed; sent back, it is not parsed again.
    let parsed = json!([{"type": "file", "file": {"hash": "abc", "name": "report.pdf",
        "content": [{"type": "text", "text": "A tiny report."}]}}]);
    model.script([
        text("Read it.").with(json!({"delta": {"annotations": parsed}})),
        text("Still read."),
    ]);
    let caps = [
        ("DOCUMENT_MAX_BYTES", "1024"),
        ("DOCUMENTS_PER_MESSAGE", "2"),
    ];
    let bot = start(&discord, &model, dir.path(), &caps).await;
    let thread = 720_000_000_000_000_001;
    let mut message = discord.message(thread, CHANNEL, ALICE, &format!("<@{BOT}> summarise"), true);
    message["attachments"] = json!([
        discord.file(1, "report.pdf", "application/pdf"),
        discord.file(2, "huge.pdf", "application/pdf"),
        discord.file(3, "appendix.pdf", "application/pdf"),
        discord.file(5, "extra.pdf", "application/pdf"),
    ]);
    discord.dispatch("MESSAGE_CREATE", message);
    discord
        .wait_for("the answer", |c| c.body["content"] == "Read it.")
        .await;
    let request = &model.requests()[0];
    let part = &request["messages"][1]["content"][1];
    assert_eq!(part["type"], "file");
    assert_eq!(part["file"]["filename"], "report.pdf");
    assert!(
        part["file"]["file_data"]
            .as_str()
            .unwrap()
            .starts_with("data:application/pdf;base64,")
    );
    assert!(
        request["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "file-parser"),
        "{}",
        request["plugins"]
    );
    let notices = contents(&discord.posts(thread)).join("\n");
    assert_eq!(
        request["messages"][1]["content"][2]["file"]["filename"],
        "appendix.pdf"
    );
    assert!(
        notices.contains("huge.pdf is larger than 1024 bytes (DOCUMENT_MAX_BYTES)"),
        "{notices}"
    );
    assert!(
        notices.contains("(DOCUMENTS_PER_MESSAGE), so extra.pdf was left out"),
        "{notices}"
    );
    // After a restart too, the answer goes back with what was parsed.
    bot.stop().await;
    let bot = start(&discord, &model, dir.path(), &caps).await;
    say(&discord, thread + 1, thread, ALICE, "and the second page?");
    discord
        .wait_for("the second answer", |c| c.body["content"] == "Still read.")
        .await;
    let again = &model.requests()[1]["messages"];
    assert_eq!(again[2]["role"], "assistant");
    assert_eq!(again[2]["annotations"], parsed);
    assert!(model.rejected().is_empty(), "{:?}", model.rejected());
    bot.stop().await;

    // A plain endpoint does not take them: the person is told.
    let plain = FakeModel::start_as(Api::OpenAi).await;
    plain.script([text("Only the text.")]);
    let dir = tempfile::tempdir().unwrap();
    let bot = start(&discord, &plain, dir.path(), &[]).await;
    let thread = 720_000_000_000_000_101;
    let mut message = discord.message(thread, CHANNEL, ALICE, &format!("<@{BOT}> and this?"), true);
    message["attachments"] = json!([discord.file(4, "report.pdf", "application/pdf")]);
    discord.dispatch("MESSAGE_CREATE", message);
    discord
        .wait_for("the plain answer", |c| {
            c.body["content"] == "Only the text."
        })
        .await;
    assert!(!plain.requests()[0].to_string().contains("file_data"));
    let notices = contents(&discord.posts(thread)).join("\n");
    assert!(
        notices.contains("PDFs are read through OpenRouter only"),
        "{notices}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn a_voice_note_is_transcribed_quoted_and_answered_as_text() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Buy milk and eggs."), text("Added to your list.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("TRANSCRIPTION_MODEL", "test/ears")],
    )
    .await;
    let thread = 730_000_000_000_000_001;
    let mut message = discord.message(thread, CHANNEL, ALICE, &format!("<@{BOT}>"), true);
    message["attachments"] = json!([discord.file(1, "voice-message.ogg", "audio/ogg")]);
    message["flags"] = json!(8192);
    discord.dispatch("MESSAGE_CREATE", message);
    discord
        .wait_for("the answer", |c| c.body["content"] == "Added to your list.")
        .await;
    let requests = model.requests();
    // The thread's model does not hear: TRANSCRIPTION_MODEL does.
    assert_eq!(requests[0]["model"], "test/ears");
    let audio = &requests[0]["messages"][0]["content"][1];
    assert_eq!(audio["type"], "input_audio");
    // Discord's Ogg/Opus is sent as WAV, which every audio model takes.
    assert_eq!(audio["input_audio"]["format"], "wav");
    let wav = base64::engine::general_purpose::STANDARD
        .decode(audio["input_audio"]["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(&wav[..4], b"RIFF");
    assert!(wav.len() > 60_000, "two seconds at 16 kHz: {}", wav.len());
    assert_eq!(requests[1]["model"], "test/tools");
    assert_eq!(user_said(&requests[1]), ["Buy milk and eggs."]);
    assert!(
        !requests[1].to_string().contains("input_audio"),
        "kept as its words"
    );
    let posts = contents(&discord.posts(thread));
    assert!(
        posts
            .iter()
            .any(|p| p.ends_with("said:\n> Buy milk and eggs.")),
        "{posts:?}"
    );
    bot.stop().await;

    // Without a model that hears, the person is told what to do.
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Nothing heard.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 730_000_000_000_000_101;
    let mut message = discord.message(thread, CHANNEL, ALICE, &format!("<@{BOT}> listen"), true);
    message["attachments"] = json!([
        discord.file(2, "voice-message.ogg", "audio/ogg"),
        discord.file(3, "broken-voice.ogg", "audio/ogg")
    ]);
    discord.dispatch("MESSAGE_CREATE", message);
    discord
        .wait_for("the answer", |c| c.body["content"] == "Nothing heard.")
        .await;
    let notices = contents(&discord.posts(thread)).join("\n");
    assert!(
        notices.contains("cannot hear audio and no TRANSCRIPTION_MODEL is set"),
        "{notices}"
    );
    assert!(
        notices.contains(
            "broken-voice.ogg could not be transcribed: it is not a playable Ogg Opus file"
        ),
        "{notices}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn reload_reads_the_mcp_file_again_for_admins_and_keeps_the_old_one_when_broken() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let counted = |name: &str| {
        let log = dir.path().join(format!("{name}.log"));
        support::hostile("counted", Some(log.to_str().unwrap()))
    };
    support::write_mcp(dir.path(), json!({"first": counted("first")}));
    model.script([text("One."), text("Two.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("ADMIN_USERS", &ALICE.to_string())],
    )
    .await;
    let thread = 530_000_000_000_000_101;
    let offered = |request: &Value| -> Vec<String> {
        request["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    mention(&discord, thread, "hi");
    discord
        .wait_for("the first answer", |c| c.body["content"] == "One.")
        .await;
    assert_eq!(offered(&model.requests()[0]), ["first__echo"]);

    let command = |id: u64, user: u64| {
        discord.interaction(
            id,
            2,
            thread,
            user,
            json!({"id": id.to_string(), "name": "reload", "type": 1}),
            None,
        )
    };
    let answer = |id: u64| {
        let path = format!(
            "/webhooks/{}/token-{id}/messages/@original",
            support::discord::APP
        );
        let discord = &discord;
        async move {
            let call = discord.wait_for("/reload", |c| c.path == path).await;
            call.body["content"].as_str().unwrap().to_owned()
        }
    };
    support::write_mcp(
        dir.path(),
        json!({"first": counted("first"), "second": counted("second")}),
    );
    discord.dispatch("INTERACTION_CREATE", command(1, BOB));
    let refused = answer(1).await;
    assert!(refused.contains("Only admins"), "{refused}");
    discord.dispatch("INTERACTION_CREATE", command(2, ALICE));
    let reloaded = answer(2).await;
    assert!(
        reloaded.contains("The MCP file was reloaded: added: second; 1 unchanged"),
        "{reloaded}"
    );
    say(&discord, thread + 10, thread, ALICE, "and now?");
    discord
        .wait_for("the second answer", |c| c.body["content"] == "Two.")
        .await;
    assert_eq!(
        offered(&model.requests()[1]),
        ["first__echo", "second__echo"]
    );

    std::fs::write(dir.path().join("mcp.json"), "{\"mcpServers\": ").unwrap();
    discord.dispatch("INTERACTION_CREATE", command(3, ALICE));
    let kept = answer(3).await;
    assert!(
        kept.contains("not reloaded; the servers in use stay as they were")
            && kept.contains("mcp.json: not valid JSON"),
        "{kept}"
    );
    let names: Vec<String> = bot.app.mcp.servers().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["first", "second"]);
    bot.stop().await;
}

#[tokio::test]
async fn a_servers_form_and_page_are_answered_in_the_thread_by_the_asker_only() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = support::hostile("asking", None);
    server["approval"] = json!("auto");
    support::write_mcp(dir.path(), json!({ "asking": server }));
    model.script([
        call("q1", "asking__book", "{}"),
        text("Booked."),
        call("q2", "asking__signin", "{}"),
        text("Signed in."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 560_000_000_000_000_001;
    let asked = |n: usize| {
        let discord = discord.clone();
        async move {
            let questions = || -> Vec<support::discord::Call> {
                discord
                    .calls()
                    .into_iter()
                    .filter(|c| {
                        c.method == "POST"
                            && c.body["content"]
                                .as_str()
                                .is_some_and(|t| t.starts_with("🔌 **asking** asks"))
                    })
                    .collect()
            };
            discord
                .wait_for("a question", |_| questions().len() >= n)
                .await;
            questions()[n - 1].clone()
        }
    };
    let message = |call: &support::discord::Call| {
        json!({"id": call.id.to_string(), "channel_id": thread.to_string(), "author": support::discord::user(BOT, "mcpcord", true),
            "content": call.body["content"], "timestamp": "2026-11-26T12:00:00+00:00", "edited_timestamp": null, "tts": false,
            "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0})
    };
    let answer_of = |id: u64| {
        let discord = discord.clone();
        async move {
            let path = format!("/interactions/{id}/token-{id}/callback");
            discord
                .wait_for("an interaction's answer", |c| c.path == path)
                .await
                .body
        }
    };

    mention(&discord, thread, "book a table");
    let form = asked(1).await;
    let content = form.body["content"].as_str().unwrap();
    assert!(
        content.contains("asks, for `book`:\n> Where and when?"),
        "{content}"
    );
    assert!(
        content.contains("• **Your name** (required): _not set_"),
        "{content}"
    );
    assert!(
        content.contains("• **Outside**: No"),
        "the default: {content}"
    );
    let rows = form.body["components"].as_array().unwrap();
    let key = rows[0]["components"][0]["custom_id"]
        .as_str()
        .unwrap()
        .trim_start_matches("ask:")
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        rows[0]["components"][0]["type"], 3,
        "the time is a select menu"
    );
    assert_eq!(rows[1]["components"][0]["label"], "Outside: Yes");
    let labels: Vec<&str> = rows[2]["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["Fill in…", "Send", "Decline", "Cancel"]);
    let component = |id: u64, user: u64, data: Value| {
        discord.dispatch(
            "INTERACTION_CREATE",
            discord.interaction(id, 3, thread, user, data, Some(message(&form))),
        );
    };
    let button =
        |action: &str| json!({"custom_id": format!("ask:{key}:{action}"), "component_type": 2});

    // Bob did not start the turn.
    component(11, BOB, button("send"));
    let refused = answer_of(11).await;
    assert!(
        refused["data"]["content"]
            .as_str()
            .unwrap()
            .contains("Only the person who started this turn")
    );
    // Sending too soon names what is missing.
    component(12, ALICE, button("send"));
    let missing = answer_of(12).await;
    assert_eq!(missing["data"]["flags"], 64);
    assert!(
        missing["data"]["content"]
            .as_str()
            .unwrap()
            .contains("still needed: Your name, time"),
        "{missing}"
    );
    component(
        13,
        ALICE,
        json!({"custom_id": format!("ask:{key}:pick:1"), "component_type": 3, "values": ["1"]}),
    );
    let picked = answer_of(13).await;
    assert_eq!(picked["type"], 7);
    assert!(
        picked["data"]["content"]
            .as_str()
            .unwrap()
            .contains("• **time** (required): 9 pm")
    );
    component(14, ALICE, button("fill"));
    let modal = answer_of(14).await;
    assert_eq!(modal["type"], 9);
    assert_eq!(modal["data"]["custom_id"], format!("askform:{key}:0"));
    let inputs: Vec<&str> = modal["data"]["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["components"][0]["label"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["Your name", "guests"]);
    let submit = |id: u64, name: &str, guests: &str| {
        let data = json!({"custom_id": format!("askform:{key}:0"), "components": [
            {"type": 1, "components": [{"type": 4, "custom_id": "0", "value": name}]},
            {"type": 1, "components": [{"type": 4, "custom_id": "2", "value": guests}]}]});
        discord.dispatch(
            "INTERACTION_CREATE",
            discord.interaction(id, 5, thread, ALICE, data, Some(message(&form))),
        );
    };
    submit(15, "Ada", "lots");
    let wrong = answer_of(15).await;
    assert!(
        wrong["data"]["content"]
            .as_str()
            .unwrap()
            .contains("guests must be a number, not \"lots\""),
        "{wrong}"
    );
    let kept = discord
        .wait_for("the question shows what fitted", |c| {
            c.method == "PATCH" && c.path.ends_with(&format!("/messages/{}", form.id))
        })
        .await;
    assert!(
        kept.body["content"]
            .as_str()
            .unwrap()
            .contains("• **Your name** (required): ✓ filled in")
    );
    submit(16, "Ada", "4");
    assert_eq!(answer_of(16).await["type"], 7);
    component(17, ALICE, button("send"));
    let sent = answer_of(17).await;
    assert_eq!(sent["data"]["components"], json!([]));
    assert!(
        sent["data"]["content"]
            .as_str()
            .unwrap()
            .ends_with(&format!("✅ Answered by <@{ALICE}>."))
    );
    discord
        .wait_for("the answer", |c| c.body["content"] == "Booked.")
        .await;
    assert_eq!(
        support::tool_results(&model.requests()[1]),
        [r#"book: accept {"guests": 4, "name": "Ada", "outside": false, "time": "21"}"#]
    );

    // A page to open: shown whole, never previewed, with its site in bold.
    say(&discord, thread + 7, thread, ALICE, "sign me in");
    let page = asked(2).await;
    let content = page.body["content"].as_str().unwrap();
    assert!(
        content.contains("`https://auth.example.com/connect?state=xyz`"),
        "{content}"
    );
    assert!(
        content.contains("The site is **auth.example.com**."),
        "{content}"
    );
    assert_eq!(page.body["flags"], 4, "no link preview");
    let buttons = page.body["components"][0]["components"].as_array().unwrap();
    assert_eq!(
        buttons[0]["url"],
        "https://auth.example.com/connect?state=xyz"
    );
    assert_eq!(buttons[1]["label"], "Done");
    let done = buttons[1]["custom_id"].as_str().unwrap().to_owned();
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(
            18,
            3,
            thread,
            ALICE,
            json!({"custom_id": done, "component_type": 2}),
            Some(message(&page)),
        ),
    );
    discord
        .wait_for("the second answer", |c| c.body["content"] == "Signed in.")
        .await;
    assert_eq!(
        support::tool_results(&model.requests()[3]).last().unwrap(),
        "signin: accept null"
    );
    bot.stop().await;
}

#[tokio::test]
async fn an_unanswered_question_counts_as_cancelled() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = support::hostile("asking", None);
    server["approval"] = json!("auto");
    support::write_mcp(dir.path(), json!({ "asking": server }));
    model.script([call("q1", "asking__book", "{}"), text("Nobody answered.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[("APPROVAL_TIMEOUT_SECS", "1")],
    )
    .await;
    let thread = 560_000_000_000_000_101;
    mention(&discord, thread, "book a table");
    let expired = discord
        .wait_for("the question marked as expired", |c| {
            c.method == "PATCH"
                && c.body["content"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("⌛ No answer within 1 seconds: cancelled."))
        })
        .await;
    assert_eq!(expired.body["components"], json!([]));
    discord
        .wait_for("the answer", |c| c.body["content"] == "Nobody answered.")
        .await;
    assert_eq!(
        support::tool_results(&model.requests()[1]),
        ["book: cancel null"]
    );
    bot.stop().await;
}

#[tokio::test]
async fn prompts_and_resources_are_picked_with_autocomplete_modals_and_files() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"everything": support::everything()}));
    model.script([text("Hello."), text("Sunny."), text("Read it.")]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 570_000_000_000_000_001;
    mention(&discord, thread, "hi");
    discord
        .wait_for("the first answer", |c| c.body["content"] == "Hello.")
        .await;
    let callback = |id: u64| {
        let discord = discord.clone();
        async move {
            let path = format!("/interactions/{id}/token-{id}/callback");
            discord
                .wait_for("an interaction's answer", |c| c.path == path)
                .await
                .body
        }
    };
    let original = |id: u64| {
        let discord = discord.clone();
        async move {
            let path = format!(
                "/webhooks/{}/token-{id}/messages/@original",
                support::discord::APP
            );
            discord
                .wait_for("the command's answer", |c| c.path == path)
                .await
                .body
        }
    };
    let complete = |id: u64, name: &str, options: Value| {
        let data = json!({"id": id.to_string(), "name": name, "type": 1, "options": options});
        discord.dispatch(
            "INTERACTION_CREATE",
            discord.interaction(id, 4, thread, ALICE, data, None),
        );
    };
    let command = |id: u64, name: &str, options: Value| {
        let data = json!({"id": id.to_string(), "name": name, "type": 1, "options": options});
        discord.dispatch(
            "INTERACTION_CREATE",
            discord.interaction(id, 2, thread, ALICE, data, None),
        );
    };

    complete(
        1,
        "prompt",
        json!([{"name": "name", "type": 3, "value": "argu", "focused": true}]),
    );
    assert_eq!(
        callback(1).await["data"]["choices"],
        json!([{"name": "Arguments Prompt (everything)", "value": "everything__args-prompt"}])
    );
    complete(
        2,
        "prompt",
        json!([
        {"name": "name", "type": 3, "value": "everything__completable-prompt"},
        {"name": "arguments", "type": 3, "value": "department=E", "focused": true}]),
    );
    assert_eq!(
        callback(2).await["data"]["choices"],
        json!([{"name": "department=Engineering", "value": "department=Engineering"}])
    );
    // No arguments given: a modal asks for them.
    command(
        3,
        "prompt",
        json!([{"name": "name", "type": 3, "value": "everything__args-prompt"}]),
    );
    let modal = callback(3).await;
    assert_eq!(modal["type"], 9);
    assert_eq!(modal["data"]["custom_id"], "prompt:everything__args-prompt");
    let inputs: Vec<(&str, bool)> = modal["data"]["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let input = &row["components"][0];
            (
                input["custom_id"].as_str().unwrap(),
                input["required"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(inputs, [("city", true), ("state", false)]);
    let submitted = json!({"custom_id": "prompt:everything__args-prompt", "components": [
        {"type": 1, "components": [{"type": 4, "custom_id": "city", "value": "Paris"}]},
        {"type": 1, "components": [{"type": 4, "custom_id": "state", "value": ""}]}]});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(4, 5, thread, ALICE, submitted, None),
    );
    assert_eq!(
        original(4).await["content"],
        format!("📝 <@{ALICE}> used the prompt **Arguments Prompt** of everything: city=Paris")
    );
    discord
        .wait_for("the prompt's answer", |c| c.body["content"] == "Sunny.")
        .await;
    let said = user_said(&model.requests()[1]);
    assert!(
        said.last()
            .unwrap()
            .ends_with("[Prompt \"Arguments Prompt\" of everything]\nWhat's weather in Paris?"),
        "{said:?}"
    );

    complete(
        5,
        "resource",
        json!([{"name": "uri", "type": 3, "value": "dynamic/text", "focused": true}]),
    );
    let choices = callback(5).await;
    assert_eq!(
        choices["data"]["choices"][0]["value"],
        "demo://resource/dynamic/text/{resourceId}"
    );
    command(
        6,
        "resource",
        json!([
        {"name": "uri", "type": 3, "value": "demo://resource/dynamic/text/3"},
        {"name": "to", "type": 3, "value": "file"}]),
    );
    assert!(
        original(6).await["content"]
            .as_str()
            .unwrap()
            .starts_with("📎 Attached 1 part(s)")
    );
    let file = discord
        .calls()
        .into_iter()
        .find(|c| c.body["has_file"] == true && c.path == format!("/channels/{thread}/messages"))
        .expect("the resource as a file");
    assert_eq!(file.body["attachments"][0]["filename"], "3.txt");
    command(
        7,
        "resource",
        json!([
        {"name": "uri", "type": 3, "value": "demo://resource/dynamic/text/4"},
        {"name": "question", "type": 3, "value": "What is it?"}]),
    );
    assert!(
        original(7).await["content"]
            .as_str()
            .unwrap()
            .contains("added `demo://resource/dynamic/text/4` of everything")
    );
    discord
        .wait_for("the resource's answer", |c| c.body["content"] == "Read it.")
        .await;
    let said = user_said(&model.requests()[2]);
    let last = said.last().unwrap();
    assert!(
        last.contains("[Resource demo://resource/dynamic/text/4 of everything, chosen by the user]\nResource 4:")
            && last.ends_with("\n\nWhat is it?"),
        "{last}"
    );
    bot.stop().await;
}

#[tokio::test]
async fn resource_links_in_a_tool_result_get_read_buttons() {
    support::needs_servers!();
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), json!({"everything": support::everything()}));
    model.script([
        call("l1", "everything__get-resource-links", r#"{"count": 2}"#),
        text("Two links."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 570_000_000_000_000_101;
    mention(&discord, thread, "links please");
    discord
        .wait_for("the answer", |c| c.body["content"] == "Two links.")
        .await;
    let notice = discord
        .calls()
        .into_iter()
        .find(|c| {
            c.method == "PATCH"
                && c.body["components"][0]["components"][0]["custom_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("read:"))
        })
        .expect("the finished notice carries Read buttons");
    let buttons = notice.body["components"][0]["components"]
        .as_array()
        .unwrap();
    assert_eq!(buttons.len(), 2);
    assert!(buttons[0]["label"].as_str().unwrap().starts_with("Read "));
    let read = buttons[0]["custom_id"].as_str().unwrap();
    // The button reads nothing for another thread.
    discord.dispatch(
        "INTERACTION_CREATE",
        press(&discord, 8, thread + 5, BOB, read),
    );
    let elsewhere = discord
        .wait_for("the refusal elsewhere", |c| {
            c.path == "/interactions/8/token-8/callback"
        })
        .await;
    assert_eq!(elsewhere.body["data"]["flags"], 64);
    assert!(
        elsewhere.body["data"]["content"]
            .as_str()
            .unwrap()
            .contains("no longer works")
    );
    discord.dispatch("INTERACTION_CREATE", press(&discord, 9, thread, BOB, read));
    let path = format!(
        "/webhooks/{}/token-9/messages/@original",
        support::discord::APP
    );
    let said = discord
        .wait_for("the Read answer", |c| c.path == path)
        .await;
    assert!(
        said.body["content"]
            .as_str()
            .unwrap()
            .starts_with("📎 Attached 1 part(s) of `demo://"),
        "{}",
        said.body
    );
    let file = discord
        .calls()
        .into_iter()
        .find(|c| c.body["has_file"] == true)
        .expect("the resource attached");
    assert!(
        file.body["content"]
            .as_str()
            .unwrap()
            .contains(&format!("for <@{BOB}>"))
    );
    bot.stop().await;
}

#[tokio::test]
async fn a_background_task_is_listed_guarded_and_its_result_answered_in_the_thread() {
    use crate::support::board::{Board, serve_board};
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let board = Board::default();
    let stop_board = tokio_util::sync::CancellationToken::new();
    let url = serve_board(&board, &stop_board).await;
    support::write_mcp(
        dir.path(),
        json!({"jobs": {"url": url, "timeoutSecs": 1, "approval": "auto"}}),
    );
    model.script([
        call("b1", "jobs__research", r#"{"topic":"tides"}"#),
        text("It runs in the background; I will report."),
        text("The report is in: tides."),
        call("b2", "jobs__research", r#"{"topic":"comets"}"#),
        text("Comets are on their way."),
    ]);
    let bot = start(&discord, &model, dir.path(), &[]).await;
    let thread = 720_000_000_000_000_001;
    mention(&discord, thread, "research tides");
    discord
        .wait_for("the first answer", |c| {
            c.body["content"] == "It runs in the background; I will report."
        })
        .await;
    let command = |id: u64, user: u64, options: Value| {
        discord.interaction(
            id,
            2,
            thread,
            user,
            json!({"id": id.to_string(), "name": "tasks", "type": 1, "options": options}),
            None,
        )
    };
    let answer = |id: u64| {
        let path = format!(
            "/webhooks/{}/token-{id}/messages/@original",
            support::discord::APP
        );
        let discord = &discord;
        async move {
            let call = discord.wait_for("/tasks", |c| c.path == path).await;
            call.body["content"].as_str().unwrap().to_owned()
        }
    };
    discord.dispatch(
        "INTERACTION_CREATE",
        command(720_000_000_000_000_101, ALICE, json!([])),
    );
    let listed = answer(720_000_000_000_000_101).await;
    assert!(
        listed.contains("`job-1`")
            && listed.contains("**jobs** › `research`")
            && listed.contains(&format!("<@{ALICE}>")),
        "{listed}"
    );
    // Bob did not start it and is no admin.
    discord.dispatch(
        "INTERACTION_CREATE",
        command(
            720_000_000_000_000_103,
            BOB,
            json!([{"name": "cancel", "type": 3, "value": "job-1"}]),
        ),
    );
    let refused = answer(720_000_000_000_000_103).await;
    assert!(
        refused.contains("Only whoever started this task"),
        "{refused}"
    );
    assert!(board.cancels().is_empty());

    board.finish("job-1");
    discord
        .wait_for("the result's notice", |c| {
            c.body["content"].as_str().is_some_and(|t| {
                t.starts_with("📬 The background task `job-1` of **jobs** › `research` finished")
            })
        })
        .await;
    discord
        .wait_for("the answer to the result", |c| {
            c.body["content"] == "The report is in: tides."
        })
        .await;
    // It comes as Alice's input: she started it.
    let request = &model.requests()[2];
    let last = request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["role"] == "user")
        .unwrap();
    let content = last["content"].to_string();
    assert!(content.contains(&format!("<@{ALICE}>")), "{content}");
    let said = said(last);
    assert!(
        said.starts_with("[The background task job-1 of the tool jobs__research finished.")
            && said.ends_with("report on tides"),
        "{said}"
    );
    discord.dispatch(
        "INTERACTION_CREATE",
        command(720_000_000_000_000_105, ALICE, json!([])),
    );
    assert_eq!(
        answer(720_000_000_000_000_105).await,
        "No tool call runs in the background here."
    );

    // A second one, picked by autocomplete and cancelled by its starter.
    say(
        &discord,
        720_000_000_000_000_201,
        thread,
        ALICE,
        "and comets",
    );
    discord
        .wait_for("the second answer", |c| {
            c.body["content"] == "Comets are on their way."
        })
        .await;
    let id = 720_000_000_000_000_203;
    let data = json!({"id": id.to_string(), "name": "tasks", "type": 1,
        "options": [{"name": "cancel", "type": 3, "value": "job", "focused": true}]});
    discord.dispatch(
        "INTERACTION_CREATE",
        discord.interaction(id, 4, thread, ALICE, data, None),
    );
    let path = format!("/interactions/{id}/token-{id}/callback");
    let choices = discord.wait_for("the choices", |c| c.path == path).await;
    assert_eq!(
        choices.body["data"]["choices"],
        json!([{"name": "jobs › research (job-2)", "value": "job-2"}])
    );
    discord.dispatch(
        "INTERACTION_CREATE",
        command(
            720_000_000_000_000_205,
            ALICE,
            json!([{"name": "cancel", "type": 3, "value": "job-2"}]),
        ),
    );
    assert_eq!(
        answer(720_000_000_000_000_205).await,
        "🛑 Cancelled the background task `job-2` of **jobs** › `research`."
    );
    assert_eq!(board.cancels(), ["job-2"]);
    bot.stop().await;
    stop_board.cancel();
}

#[tokio::test]
async fn a_spent_budget_refuses_the_next_turn_until_an_admin_raises_it() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The fake bills $0.001 a reply: Alice's second turn goes over $0.0015.
    model.script([text("One."), text("Two."), text("Bob's.")]);
    let bot = start(
        &discord,
        &model,
        dir.path(),
        &[
            ("BUDGET_USER_DAILY", "0.0015"),
            ("BUDGET_GUILD_MONTHLY", "5"),
            ("ADMIN_USERS", &ALICE.to_string()),
        ],
    )
    .await;
    let thread = 710_000_000_000_000_001;
    mention(&discord, thread, "one");
    discord
        .wait_for("the first answer", |c| c.body["content"] == "One.")
        .await;
    say(&discord, thread + 1, thread, ALICE, "two");
    discord
        .wait_for("the second answer", |c| c.body["content"] == "Two.")
        .await;
    say(&discord, thread + 2, thread, ALICE, "three");
    let refused = discord
        .wait_for("the refusal", |c| {
            c.body["content"]
                .as_str()
                .is_some_and(|s| s.starts_with("⛔"))
        })
        .await;
    let refusal = refused.body["content"].as_str().unwrap();
    assert!(
        refusal.contains(&format!(
            "<@{ALICE}>, your daily budget of $0.0015 is spent ($0.0020 today)"
        )) && refusal.contains("resets at 00:00 UTC (in ")
            && refusal.contains("an admin of this server can raise it with /budget"),
        "{refusal}"
    );
    // Not answered, and not kept for later either.
    assert_eq!(model.requests().len(), 2);
    assert!(kept(dir.path()).await.is_empty());

    // Bob's own budget is untouched in the same thread.
    say(&discord, thread + 3, thread, BOB, "my turn");
    discord
        .wait_for("Bob's answer", |c| c.body["content"] == "Bob's.")
        .await;

    let command =
        |id: u64, user: u64, data: Value| discord.interaction(id, 2, thread, user, data, None);
    let original = |id: u64| {
        format!(
            "/webhooks/{}/token-{id}/messages/@original",
            support::discord::APP
        )
    };
    discord.dispatch(
        "INTERACTION_CREATE",
        command(1, ALICE, json!({"id": "1", "name": "usage", "type": 1})),
    );
    let usage = discord.wait_for("/usage", |c| c.path == original(1)).await;
    let usage = usage.body["content"].as_str().unwrap().to_owned();
    assert!(
        usage.contains("Your budget today: $0.00 of $0.0015 left")
            && usage.contains("This server's budget this month: $4.9970 of $5.00 left"),
        "{usage}"
    );

    let raise = |id: u64, user: u64| {
        command(
            id,
            user,
            json!({"id": id.to_string(), "name": "budget", "type": 1,
                   "options": [{"name": "daily", "type": 10, "value": 1.0}]}),
        )
    };
    discord.dispatch("INTERACTION_CREATE", raise(2, BOB));
    let refused = discord
        .wait_for("/budget by a non-admin", |c| c.path == original(2))
        .await;
    assert!(
        refused.body["content"]
            .as_str()
            .unwrap()
            .contains("Only admins"),
        "{}",
        refused.body
    );
    discord.dispatch("INTERACTION_CREATE", raise(3, ALICE));
    let raised = discord.wait_for("/budget", |c| c.path == original(3)).await;
    let raised = raised.body["content"].as_str().unwrap();
    assert!(
        raised.contains("$5.00 a month for the server, $1.00 a day for each person")
            && raised.contains("Your budget today: $0.9980 of $1.00 left")
            && raised.contains("$4.9970 of $5.00 left"),
        "{raised}"
    );
    model.script([text("Four.")]);
    say(&discord, thread + 4, thread, ALICE, "four");
    discord
        .wait_for("the answer after the raise", |c| {
            c.body["content"] == "Four."
        })
        .await;

    // The server's cap, set to what four answers cost, holds for everyone.
    discord.dispatch(
        "INTERACTION_CREATE",
        command(
            4,
            ALICE,
            json!({"id": "4", "name": "budget", "type": 1,
                   "options": [{"name": "monthly", "type": 10, "value": 0.004}]}),
        ),
    );
    discord
        .wait_for("/budget monthly", |c| c.path == original(4))
        .await;
    say(&discord, thread + 5, thread, BOB, "and me?");
    let refused = discord
        .wait_for("the server's refusal", |c| {
            c.body["content"]
                .as_str()
                .is_some_and(|s| s.starts_with("⛔ This server's monthly budget"))
        })
        .await;
    let refusal = refused.body["content"].as_str().unwrap();
    assert!(
        refusal.contains("of $0.0040 is spent ($0.0040 this month)")
            && refusal.contains("It resets on ")
            && refusal.contains(" UTC (in "),
        "{refusal}"
    );
    assert_eq!(model.requests().len(), 4);
    bot.stop().await;
}

#[tokio::test]
async fn many_busy_threads_keep_within_discords_limits() {
    let discord = FakeDiscord::start().await;
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Each answer takes six messages: one more than a channel may get in
    // five seconds. Twenty threads at once go past 50 requests a second.
    let threads = 20u64;
    let answer = format!("{}the end.", "word ".repeat(2_200));
    model.script((0..threads).map(|_| text(&answer)));
    let bot = start(&discord, &model, dir.path(), &[]).await;
    discord.enforce_limits();
    let first = 730_000_000_000_000_001;
    for n in 0..threads {
        mention(&discord, first + n, "go");
    }
    for n in 0..threads {
        let thread = first + n;
        discord
            .wait_for("the end of every answer", |c| {
                c.path == format!("/channels/{thread}/messages")
                    && c.body["content"]
                        .as_str()
                        .is_some_and(|s| s.contains("the end."))
            })
            .await;
    }
    let posts = |thread: u64| {
        discord
            .calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path == format!("/channels/{thread}/messages"))
            .count()
    };
    assert!((0..threads).all(|n| posts(first + n) >= 6));
    let over: Vec<String> = discord
        .calls()
        .iter()
        .filter(|c| c.method.ends_with("(429)"))
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert_eq!(
        discord.limited(),
        0,
        "the bot went past Discord's limits: {over:?}"
    );
    bot.stop().await;
}
