//! PostgreSQL: processes that start together, `mcpcord migrate-db`, and a
//! server that cannot be reached. The rest of the suite runs on PostgreSQL
//! too under `.ci/with-postgres` (see `support::database_url`); these are
//! the parts only it has. They skip, saying so, without a server.

use crate::support;

use mcpcord::app::App;
use mcpcord::conversation::{Inbound, Message, Store, StoreError};
use mcpcord::discord::Threads;
use mcpcord::store::SqlStore;

use crate::support::{FakeModel, call, text, turn};

/// The server of `.ci/with-postgres`, or a return with a note.
macro_rules! needs_postgres {
    () => {
        match std::env::var("MCPCORD_TEST_POSTGRES") {
            Ok(server) if !server.is_empty() => server,
            _ => {
                eprintln!(
                    "skipped: no PostgreSQL server (run the tests through .ci/with-postgres)"
                );
                return;
            }
        }
    };
}

#[tokio::test]
async fn processes_starting_together_on_a_new_database_migrate_it_once() {
    let server = needs_postgres!();
    let dir = tempfile::tempdir().unwrap();
    let url = support::postgres_database(&server, dir.path());
    let opened = futures::future::join_all((0..4).map(|_| SqlStore::open(&url))).await;
    let stores: Vec<SqlStore> = opened
        .into_iter()
        .map(|store| store.expect("every process opens the database"))
        .collect();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied, vec![(1, true), (2, true), (3, true)]);
    // And they share one database.
    stores[0]
        .append("terminal:shared", &[Message::user("from the first")])
        .await
        .unwrap();
    let seen = stores[3].history("terminal:shared").await.unwrap();
    assert_eq!(seen[0].text(), "from the first");
    for store in stores {
        store.close().await;
    }
    pool.close().await;
}

#[tokio::test]
async fn migrate_db_copies_an_installation_and_the_bot_goes_on_from_it() {
    let server = needs_postgres!();
    support::needs_servers!();
    let model = FakeModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(
        dir.path(),
        serde_json::json!({"everything": support::everything()}),
    );
    let sqlite = support::sqlite_url(dir.path());
    // An installation with a tool round, settings, a Discord thread and a
    // message still waiting for its turn.
    model.script([
        call("c1", "everything__echo", r#"{"message": "hi"}"#),
        text("First answer."),
    ]);
    let app = App::build(&support::config(
        &model,
        dir.path(),
        &[("DATABASE_URL", &sqlite)],
    ))
    .await
    .unwrap();
    let key = "discord:42";
    let (result, _) = turn(&app, key, "hello\0there").await;
    result.unwrap();
    app.store.set_model(key, Some("test/other")).await.unwrap();
    app.store.add(key, Some(7), 41, 1234).await.unwrap();
    let waiting = Inbound {
        position: 43,
        author: 1234,
        author_name: "Alice".into(),
        text: "still waiting".into(),
        ..Inbound::default()
    };
    assert!(app.store.keep_input(key, &waiting).await.unwrap());
    let history = app.store.history(key).await.unwrap();
    let usage = app.store.usage(key).await.unwrap();
    let salt = app.store.instance_salt().await.unwrap();
    app.shutdown().await;

    let target = support::postgres_database(&server, &dir.path().join("target"));
    let migrate = |from: &str| {
        support::mcpcord(&model, dir.path())
            .args(["migrate-db", "--from", from, "--to", &target])
            .output()
            .unwrap()
    };
    let output = migrate(&sqlite);
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains("messages: 4 rows"), "{out}");

    let copy = SqlStore::open(&target).await.unwrap();
    assert_eq!(copy.history(key).await.unwrap(), history);
    assert_eq!(history[0].text(), "hello\u{fffd}there");
    assert_eq!(copy.usage(key).await.unwrap(), usage);
    assert_eq!(
        copy.model(key).await.unwrap().as_deref(),
        Some("test/other")
    );
    assert_eq!(copy.starter(key).await.unwrap(), Some(1234));
    assert_eq!(copy.parent(key).await.unwrap(), Some(41));
    assert_eq!(copy.instance_salt().await.unwrap(), salt);
    let kept = copy.kept_inputs().await.unwrap();
    assert_eq!(kept, vec![(key.to_owned(), waiting)]);
    copy.close().await;

    // Into a database that holds conversations already: refused, untouched.
    let again = migrate(&sqlite);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(err.contains("copies into an empty database only"), "{err}");

    // The bot goes on from the copy: new messages come after the copied ones.
    model.script([text("Second answer.")]);
    let app = App::build(&support::config(
        &model,
        dir.path(),
        &[("DATABASE_URL", &target)],
    ))
    .await
    .unwrap();
    let (result, _) = turn(&app, key, "and now?").await;
    result.unwrap();
    let after = app.store.history(key).await.unwrap();
    assert_eq!(after[..history.len()], history[..]);
    assert_eq!(after.last().unwrap().text(), "Second answer.");
    let sent = model.requests().last().unwrap()["model"].clone();
    assert_eq!(sent, "test/other");
    app.shutdown().await;
}

#[tokio::test]
async fn a_database_server_that_cannot_be_reached_is_named_without_its_password() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://mcpcord:hunter2@127.0.0.1:{port}/mcpcord");
    let error = SqlStore::open(&url).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, StoreError::Open(_)), "{error:?}");
    assert!(
        message.contains(&format!(
            "cannot connect to postgres://mcpcord:***@127.0.0.1:{port}"
        )),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
}
