//! Storage faults: a database this user cannot write, a database file
//! deleted while running, and writes that fail mid-turn. Each says exactly
//! what was kept and what to do.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{FakeModel, text, wrapped};
use mcpcord::app::App;
use mcpcord::conversation::{ApproveAll, Message, Store, TurnError};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// `mcpcord SUBCOMMAND` run by a user who cannot write the database in
/// `dir`: as root, an unprivileged uid; otherwise, on a read-only file.
fn command_without_write_access(model: &FakeModel, dir: &Path, subcommand: &str) -> Command {
    let plain = support::mcpcord(model, dir);
    let mut cmd = if is_root() {
        wrapped(
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ],
            &plain,
        )
    } else {
        let db = dir.join("mcpcord.db");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
        plain
    };
    cmd.arg(subcommand).stdin(Stdio::null()).env(
        "DATABASE_URL",
        format!("sqlite://{}", dir.join("mcpcord.db").display()),
    );
    cmd
}

#[tokio::test]
async fn a_database_this_user_cannot_write_is_caught_by_check_and_at_start() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), serde_json::json!({}));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Made by this user, as a volume made by root would be.
    App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap()
        .shutdown()
        .await;
    let check = command_without_write_access(&model, dir.path(), "check");
    let check = tokio::task::spawn_blocking(move || {
        let mut check = check;
        check.output().unwrap()
    });
    let output = check.await.unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!output.status.success(), "{report}");
    let line = report
        .lines()
        .find(|l| l.contains(" database: "))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("PROBLEM") && line.contains("cannot be written by uid"),
        "{line}"
    );
    assert!(line.contains("chown -R 10001:10001 /data"), "{line}");
    if is_root() {
        assert!(
            line.contains("by uid 65534") && line.contains("belongs to uid 0"),
            "{line}"
        );
    }
    let mut chat = command_without_write_access(&model, dir.path(), "chat");
    let output = tokio::task::spawn_blocking(move || chat.output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(err.contains("cannot be written by uid"), "{err}");
}

#[tokio::test]
async fn a_deleted_database_file_stops_the_process_with_the_reason() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    model.script([text("Hello there.")]);
    let mut child = support::mcpcord(&model, dir.path())
        .arg("chat")
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let dir_path = dir.path().to_owned();
    let finished = tokio::task::spawn_blocking(move || {
        stdin.write_all(b"hi\n").unwrap();
        stdin.flush().unwrap();
        let mut answer = String::new();
        BufReader::new(stdout).read_line(&mut answer).unwrap();
        assert_eq!(answer.trim(), "Hello there.");
        for name in ["mcpcord.db", "mcpcord.db-wal", "mcpcord.db-shm"] {
            let _ = std::fs::remove_file(dir_path.join(name));
        }
        // stdin stays open: only the lost file can end the chat.
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the chat went on without its database"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        drop(stdin);
        (status, err)
    });
    let (status, err) = finished.await.unwrap();
    assert!(!status.success());
    assert!(
        err.contains("was deleted while mcpcord was running"),
        "{err}"
    );
}

/// Makes SQLite refuse inserts of one role, as a full disk would.
async fn refuse(dir: &Path, role: &str) {
    let url = format!("sqlite://{}", dir.join("mcpcord.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let trigger = match role {
        "user" => {
            "CREATE TRIGGER refuse_user BEFORE INSERT ON messages WHEN NEW.role = 'user'
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        }
        _ => {
            "CREATE TRIGGER refuse_assistant BEFORE INSERT ON messages WHEN NEW.role = 'assistant'
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        }
    };
    sqlx::query(trigger).execute(&pool).await.unwrap();
    pool.close().await;
}

async fn failed_turn(app: &App, message: &str) -> TurnError {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    app.engine
        .run_turn("terminal:t", Message::user(message), &tx, &ApproveAll)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn store_errors_say_what_was_kept() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), serde_json::json!({}));
    let config = support::config(&model, dir.path(), &[]);
    App::build(&config).await.unwrap().shutdown().await;

    refuse(dir.path(), "assistant").await;
    model.script([text("An answer that cannot be saved.")]);
    let app = App::build(&config).await.unwrap();
    let error = failed_turn(&app, "first").await;
    assert!(matches!(error, TurnError::AnswerNotStored(_)));
    let said = error.to_string();
    assert!(
        said.contains("database or disk is full")
            && said.contains("Your message was saved, but the answer could not be")
            && said.contains("no need to send your message again"),
        "{said}"
    );
    let history = app.store.history("terminal:t").await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].text(), "first");
    app.shutdown().await;

    refuse(dir.path(), "user").await;
    let app = App::build(&config).await.unwrap();
    let said = failed_turn(&app, "second").await.to_string();
    assert!(
        said.contains("Your message was not saved; send it again"),
        "{said}"
    );
    assert_eq!(app.store.history("terminal:t").await.unwrap().len(), 1);
    app.shutdown().await;
}

/// `mcpcord ARGS` in `dir` (its default database, `dir/mcpcord.db`).
fn maintenance(model: &FakeModel, dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = support::mcpcord(model, dir).args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn backups_are_taken_while_running_restored_when_stopped_and_exported() {
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(dir.path(), serde_json::json!({}));
    model.script([text("Noted: the tide is high."), text("Second answer.")]);
    let app = App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap();
    support::turn(&app, "discord:42", "remember the tide")
        .await
        .0
        .unwrap();

    // While the bot holds the database.
    let (ok, out, err) = maintenance(&model, dir.path(), &["backup", "first.db"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("Backed up to first.db"), "{out}");
    let (ok, _, err) = maintenance(&model, dir.path(), &["backup", "first.db"]);
    assert!(!ok && err.contains("exists already"), "{err}");
    let (ok, _, err) = maintenance(&model, dir.path(), &["restore", "first.db"]);
    assert!(!ok && err.contains("in use by a running mcpcord"), "{err}");

    support::turn(&app, "discord:42", "and the moon")
        .await
        .0
        .unwrap();
    app.shutdown().await;
    let (ok, out, _) = maintenance(&model, dir.path(), &["export", "42"]);
    assert!(ok && out.contains("and the moon"), "{out}");

    std::fs::write(dir.path().join("junk.db"), "not a database").unwrap();
    let (ok, _, err) = maintenance(&model, dir.path(), &["restore", "junk.db"]);
    assert!(
        !ok && err.contains("is not a usable mcpcord backup"),
        "{err}"
    );

    let (ok, out, err) = maintenance(&model, dir.path(), &["restore", "first.db"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("kept as") && out.contains("mcpcord.db.before-restore-"),
        "{out}"
    );
    let (ok, markdown, err) = maintenance(&model, dir.path(), &["export", "42"]);
    assert!(ok, "{err}");
    assert!(
        markdown.starts_with("# Conversation discord:42"),
        "{markdown}"
    );
    assert!(
        markdown.contains("remember the tide") && markdown.contains("Noted: the tide is high.")
    );
    assert!(
        !markdown.contains("and the moon"),
        "the restored database is the backup's: {markdown}"
    );
    let (ok, json, _) = maintenance(
        &model,
        dir.path(),
        &["export", "discord:42", "--format", "json"],
    );
    assert!(ok);
    let exported: serde_json::Value = serde_json::from_str(&json).unwrap();
    let roles: Vec<&str> = exported["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant"]);
    let (ok, _, err) = maintenance(&model, dir.path(), &["export", "7"]);
    assert!(!ok && err.contains("discord:7 has no messages"), "{err}");

    // The bot starts on the restored database.
    let app = App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap();
    assert_eq!(app.store.history("discord:42").await.unwrap().len(), 2);
    app.shutdown().await;
}
