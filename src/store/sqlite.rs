//! What only SQLite has: its connection settings, the database file (its
//! identity and the shared lock that tells `mcpcord restore` it is in
//! use), online copies and their checks, and its result codes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::conversation::StoreError;

/// Connections in the pool. SQLite has one writer; a few readers help.
const MAX_CONNECTIONS: u32 = 4;
/// How long a write waits for another to finish before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the database file is checked for having been deleted or replaced.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The embedded SQLite migrations.
pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The database file a store has open.
#[derive(Debug)]
pub(super) struct DatabaseFile {
    path: PathBuf,
    /// (device, inode) when opened.
    opened: (u64, u64),
    /// A shared lock on the file while the store is open, so that
    /// `mcpcord restore` knows the database is in use.
    in_use: Option<std::fs::File>,
}

impl DatabaseFile {
    /// Releases the shared lock.
    pub(super) fn release(&self) {
        if let Some(file) = &self.in_use {
            let _ = file.unlock();
        }
    }

    /// Resolves when the file has been deleted or replaced; what is
    /// written after that would be lost.
    pub(super) async fn lost(&self) -> String {
        let mut ticks = tokio::time::interval(FILE_CHECK_INTERVAL);
        loop {
            ticks.tick().await;
            match identity(&self.path) {
                Some(now) if now == self.opened => {}
                Some(_) => {
                    return format!(
                        "the database file {} was replaced by another file while mcpcord was running; stopping so that nothing is written to the old one. Restart mcpcord to use the new file.",
                        self.path.display()
                    );
                }
                None => {
                    return format!(
                        "the database file {} was deleted while mcpcord was running; stopping so that nothing more is lost. Restore it from a backup (or let mcpcord make a new one) and start again.",
                        self.path.display()
                    );
                }
            }
        }
    }
}

/// Opens (creating when missing) the database at `url` and applies the
/// migrations. WAL, foreign keys and a busy timeout are on.
pub(super) async fn open(url: &str) -> Result<(SqlitePool, Option<DatabaseFile>), StoreError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Open(format!("invalid DATABASE_URL {url:?}: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    let pool = SqlitePoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        // A local file: no connection goes stale, so skip the ping before each use.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(|e| opening_failed(url, "open", &e))?;
    if let Err(e) = MIGRATOR.run(&pool).await {
        pool.close().await;
        return Err(opening_failed(url, "migrate", &sqlx::Error::from(e)));
    }
    let file = file_of(url).and_then(|path| {
        let opened = identity(&path)?;
        let in_use = lock_shared(&path);
        Some(DatabaseFile {
            path,
            opened,
            in_use,
        })
    });
    Ok((pool, file))
}

/// Writes a consistent copy of the database to `to` (`VACUUM INTO`,
/// which readers and writers do not wait for).
pub(super) async fn copy_into(pool: &SqlitePool, to: &Path) -> Result<(), StoreError> {
    sqlx::query("VACUUM INTO $1")
        .bind(to.display().to_string())
        .execute(pool)
        .await
        .map_err(|e| classify(&e))?;
    Ok(())
}

/// Whether the file at `path` is an intact mcpcord database this version
/// can use.
pub async fn check_backup(path: &Path) -> Result<(), StoreError> {
    use sqlx::{ConnectOptions, Connection};
    if !path.is_file() {
        return Err(StoreError::Open(format!(
            "{} is not a file",
            path.display()
        )));
    }
    let mut connection = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .map_err(|e| StoreError::Open(e.to_string()))?;
    let (verdict,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut connection)
        .await
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if verdict != "ok" {
        return Err(StoreError::Corrupt(format!(
            "its integrity check says: {verdict}"
        )));
    }
    let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&mut connection)
        .await
        .map_err(|_| {
            StoreError::Corrupt("it is not an mcpcord database (it has no migrations table)".into())
        })?;
    let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    if newest.unwrap_or(0) > known {
        return Err(StoreError::Corrupt(
            "it was written by a newer mcpcord; restore it with that version".into(),
        ));
    }
    let _ = connection.close().await;
    Ok(())
}

/// The file of a `sqlite:` URL, unless it is in memory.
pub fn file_of(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:" && !url.contains("mode=memory"))
        .then(|| PathBuf::from(path))
}

/// The database file at `path`, locked shared (`flock`, which SQLite's own
/// locks do not touch) for as long as it is held.
fn lock_shared(path: &Path) -> Option<std::fs::File> {
    let file = std::fs::File::open(path).ok()?;
    file.lock_shared().ok()?;
    Some(file)
}

/// (device, inode) of `path`, when it exists.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// An error opening the database; a permission problem says whose files
/// are in the way.
fn opening_failed(url: &str, step: &str, error: &sqlx::Error) -> StoreError {
    match classify(error) {
        StoreError::NotWritable(message) => {
            StoreError::NotWritable(not_writable(file_of(url).as_deref(), &message))
        }
        _ => StoreError::Open(format!("cannot {step} the database {url:?}: {error}")),
    }
}

/// A refusal to write, with whose files are in the way (other failures as
/// they are).
pub(super) fn explain(url: &str, error: StoreError) -> StoreError {
    match error {
        StoreError::NotWritable(message) => {
            StoreError::NotWritable(not_writable(file_of(url).as_deref(), &message))
        }
        other => other,
    }
}

/// Why the database cannot be written, with whose it is and how to fix it.
fn not_writable(path: Option<&Path>, error: &str) -> String {
    let Some(path) = path else {
        return format!("the database cannot be written: {error}");
    };
    let me = current_uid().map_or("this user".to_owned(), |uid| format!("uid {uid}"));
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let owner = |p: &Path| std::fs::metadata(p).map_or("?".to_owned(), |m| m.uid().to_string());
    format!(
        "the database {} cannot be written by {me} ({error}); the file belongs to uid {} and its folder {} to uid {}. Give the file and its folder to the user mcpcord runs as; in Docker (uid 10001): docker compose run --rm --user root mcpcord chown -R 10001:10001 /data",
        path.display(),
        owner(path),
        folder.display(),
        owner(folder)
    )
}

/// The real uid of this process, from /proc.
fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sorts a database failure by SQLite's result code (its low byte is the
/// primary code), not by its wording.
pub(super) fn classify(error: &sqlx::Error) -> StoreError {
    const PERM: i64 = 3;
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    const READONLY: i64 = 8;
    const FULL: i64 = 13;
    const CANTOPEN: i64 = 14;
    let message = error.to_string();
    let code = match error {
        sqlx::Error::Database(e) => e.code().and_then(|c| c.parse::<i64>().ok()),
        sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(PERM),
        _ => None,
    };
    match code.map(|c| c & 0xff) {
        Some(BUSY | LOCKED) => StoreError::Busy(message),
        Some(PERM | READONLY | CANTOPEN) => StoreError::NotWritable(message),
        Some(FULL) => StoreError::Full(message),
        _ => StoreError::Failed(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;
    use sqlx::sqlite::SqliteConnection;

    async fn connect(path: &Path, read_only: bool) -> SqliteConnection {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .read_only(read_only)
            .busy_timeout(Duration::ZERO);
        SqliteConnection::connect_with(&options).await.unwrap()
    }

    #[tokio::test]
    async fn failures_are_sorted_by_sqlite_code_not_by_wording() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut writer = connect(&path, false).await;
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&mut writer)
            .await
            .unwrap();

        let mut reader = connect(&path, true).await;
        let error = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut reader)
            .await
            .unwrap_err();
        assert!(
            matches!(classify(&error), StoreError::NotWritable(_)),
            "{error}"
        );

        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut writer)
            .await
            .unwrap();
        let mut other = connect(&path, false).await;
        let error = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut other)
            .await
            .unwrap_err();
        let classified = classify(&error);
        assert!(matches!(classified, StoreError::Busy(_)), "{error}");
        assert!(classified.is_transient());

        let error = sqlx::query("SELECT nope FROM t")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert_eq!(classify(&error).kind(), "failed");
    }
}
