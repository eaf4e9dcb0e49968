//! SQLite persistence (sqlx). The only place with SQL.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, QueryBuilder, Sqlite, SqliteConnection, SqlitePool};

pub use crate::conversation::UsageTotals;
use crate::conversation::{
    Author, Inbound, LastInput, Message, ReasoningEffort, Replace, Role, Store, StoreError,
    TaskRecord, TaskTicket, ToolCall, Unbilled, UnbilledUpdate, Usage,
};

/// Connections in the pool. SQLite has one writer; a few readers help.
const MAX_CONNECTIONS: u32 = 4;
/// How long a write waits for another to finish before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Forgets a kept input (taken by its turn, or dropped).
const FORGET_INPUT: &str = "DELETE FROM inbox WHERE conversation = ?1 AND position = ?2";

/// The row id, position and author of a conversation's last input still
/// in its history.
const LAST_INPUT: &str = "SELECT id, position, author_id FROM messages
     WHERE conversation = ?1 AND replaced = 0 AND position IS NOT NULL
     ORDER BY id DESC LIMIT 1";

/// Conversations remembered as having their row; past this the set starts over.
const MAX_KNOWN_CONVERSATIONS: usize = 10_000;

/// How often the database file is checked for having been deleted or replaced.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The store of conversations in one SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The database file, and its identity (device, inode) when opened.
    file: Option<(PathBuf, (u64, u64))>,
    /// Conversations known to have a row, so appends skip the upsert.
    known: Arc<Mutex<HashSet<String>>>,
    /// A shared lock on the database file while this store is open, so
    /// that `mcpcord restore` knows the database is in use.
    in_use: Option<Arc<std::fs::File>>,
}

#[derive(FromRow)]
struct MessageRow {
    role: String,
    content: Option<String>,
    images: Option<String>,
    tool_calls: Option<String>,
    tool_call_id: Option<String>,
    reasoning: Option<String>,
    reasoning_details: Option<String>,
    model: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    cost: Option<f64>,
    cached_tokens: Option<i64>,
    cache_write_tokens: Option<i64>,
    author_id: Option<i64>,
    author_name: Option<String>,
    stopped: bool,
    position: Option<i64>,
    files: Option<String>,
    file_annotations: Option<String>,
}

/// The settings a conversation's row holds, each in its own column.
#[derive(Debug, Clone, Copy)]
enum Setting {
    Model,
    SystemPrompt,
    ReasoningEffort,
    ServersOff,
}

/// The `SELECT` and the upsert of one setting's column.
macro_rules! setting_sql {
    ($column:literal) => {
        (
            concat!("SELECT ", $column, " FROM conversations WHERE key = ?1"),
            concat!(
                "INSERT INTO conversations (key, ",
                $column,
                ", created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET ",
                $column,
                " = excluded.",
                $column
            ),
        )
    };
}

impl Setting {
    /// Its `SELECT` and its upsert.
    fn sql(self) -> (&'static str, &'static str) {
        match self {
            Setting::Model => setting_sql!("model"),
            Setting::SystemPrompt => setting_sql!("system_prompt"),
            Setting::ReasoningEffort => setting_sql!("reasoning_effort"),
            Setting::ServersOff => setting_sql!("servers_off"),
        }
    }
}

/// `SELECT` of the sums `totals` reads, in this order, over billed rows `m`.
macro_rules! select_usage {
    ($rest:literal) => {
        concat!(
            "SELECT SUM(m.prompt_tokens), SUM(m.completion_tokens), SUM(m.cost), COUNT(m.prompt_tokens),
                    SUM(m.cached_tokens), SUM(m.cache_write_tokens) ",
            $rest
        )
    };
}

type UsageRow = (
    Option<i64>,
    Option<i64>,
    Option<f64>,
    i64,
    Option<i64>,
    Option<i64>,
);

impl SqliteStore {
    /// Opens (creating when missing) the database at `url` and applies the
    /// embedded migrations. WAL, foreign keys and a busy timeout are on.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
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
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| opening_failed(url, "migrate", &sqlx::Error::from(e)))?;
        let path = file_of(url);
        let store = SqliteStore {
            file: path
                .as_ref()
                .and_then(|p| identity(p).map(|id| (p.clone(), id))),
            pool,
            known: Arc::default(),
            in_use: path.as_deref().and_then(in_use).map(Arc::new),
        };
        if let Err(error) = store.verify_writable().await {
            store.close().await;
            // Only a refusal to write is about whose files these are.
            return Err(match error {
                StoreError::NotWritable(message) => {
                    StoreError::NotWritable(not_writable(path.as_deref(), &message))
                }
                other => other,
            });
        }
        Ok(store)
    }

    /// Writes in a transaction and rolls it back: a file (or folder) this
    /// user cannot write opens fine and fails only at the first write.
    async fn verify_writable(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("INSERT INTO conversations (key, model, created_at) VALUES ('mcpcord:write-check', NULL, 0) ON CONFLICT (key) DO NOTHING")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.rollback().await.map_err(db)
    }

    /// Resolves when the database file has been deleted or replaced while
    /// open; what is written after that would be lost. Never resolves for
    /// an in-memory database.
    pub async fn lost(&self) -> String {
        let Some((path, opened)) = &self.file else {
            return std::future::pending().await;
        };
        let mut ticks = tokio::time::interval(FILE_CHECK_INTERVAL);
        loop {
            ticks.tick().await;
            match identity(path) {
                Some(now) if now == *opened => {}
                Some(_) => {
                    return format!(
                        "the database file {} was replaced by another file while mcpcord was running; stopping so that nothing is written to the old one. Restart mcpcord to use the new file.",
                        path.display()
                    );
                }
                None => {
                    return format!(
                        "the database file {} was deleted while mcpcord was running; stopping so that nothing more is lost. Restore it from a backup (or let mcpcord make a new one) and start again.",
                        path.display()
                    );
                }
            }
        }
    }

    fn remember(&self, conversation: &str) {
        let mut known = self.known.lock().expect("known poisoned");
        // Forgetting only costs one upsert per conversation on its next write.
        if known.len() >= MAX_KNOWN_CONVERSATIONS {
            known.clear();
        }
        known.insert(conversation.to_owned());
    }

    /// One setting of `conversation`, as stored.
    async fn setting(
        &self,
        conversation: &str,
        setting: Setting,
    ) -> Result<Option<String>, StoreError> {
        let row: Option<(Option<String>,)> = sqlx::query_as(setting.sql().0)
            .bind(conversation)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(row.and_then(|(value,)| value))
    }

    /// Sets (with `None` clears) one setting of `conversation`.
    async fn set_setting(
        &self,
        conversation: &str,
        setting: Setting,
        value: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(setting.sql().1)
            .bind(conversation)
            .bind(value)
            .bind(now())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        self.remember(conversation);
        Ok(())
    }

    /// Writes a consistent copy of the database to `to` (`VACUUM INTO`,
    /// which readers and writers do not wait for).
    pub async fn copy_into(&self, to: &Path) -> Result<(), StoreError> {
        sqlx::query("VACUUM INTO ?1")
            .bind(to.display().to_string())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Whether the file at `path` is an intact mcpcord database this
    /// version can use.
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
                StoreError::Corrupt(
                    "it is not an mcpcord database (it has no migrations table)".into(),
                )
            })?;
        let known = sqlx::migrate!("./migrations")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        if newest.unwrap_or(0) > known {
            return Err(StoreError::Corrupt(
                "it was written by a newer mcpcord; restore it with that version".into(),
            ));
        }
        let _ = connection.close().await;
        Ok(())
    }

    /// Closes the pool, waiting for connections to finish, and lets go of
    /// the database file.
    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(file) = &self.in_use {
            let _ = file.unlock();
        }
    }

    /// Tokens and cost of one conversation's answers.
    pub async fn usage(&self, conversation: &str) -> Result<UsageTotals, StoreError> {
        let row: UsageRow =
            sqlx::query_as(select_usage!("FROM billed m WHERE m.conversation = ?1"))
                .bind(conversation)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
        Ok(totals(row))
    }

    /// Tokens and cost of every conversation whose key starts with `prefix`,
    /// since `since_unix` seconds.
    pub async fn usage_since(
        &self,
        prefix: &str,
        since_unix: i64,
    ) -> Result<UsageTotals, StoreError> {
        let pattern = format!("{}%", prefix.replace('%', "\\%").replace('_', "\\_"));
        let row: UsageRow = sqlx::query_as(select_usage!(
            "FROM billed m WHERE m.conversation LIKE ?1 ESCAPE '\\' AND m.created_at >= ?2"
        ))
        .bind(pattern)
        .bind(since_unix)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(totals(row))
    }
}

#[async_trait]
impl crate::discord::Threads for SqliteStore {
    async fn starter(&self, conversation: &str) -> Result<Option<u64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT started_by FROM discord_threads WHERE conversation = ?1")
                .bind(conversation)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.map(|(user,)| user as u64))
    }

    async fn parent(&self, conversation: &str) -> Result<Option<u64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT channel_id FROM discord_threads WHERE conversation = ?1")
                .bind(conversation)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.map(|(parent,)| parent as u64))
    }

    async fn add(
        &self,
        conversation: &str,
        guild: Option<u64>,
        parent: u64,
        started_by: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discord_threads (conversation, guild_id, channel_id, started_by, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (conversation) DO NOTHING",
        )
        .bind(conversation)
        .bind(guild.map(|g| g as i64))
        .bind(parent as i64)
        .bind(started_by as i64)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn usage(&self, conversation: &str) -> Result<UsageTotals, StoreError> {
        SqliteStore::usage(self, conversation).await
    }

    async fn guild_usage_since(
        &self,
        guild: u64,
        since_unix: i64,
    ) -> Result<UsageTotals, StoreError> {
        let row: UsageRow = sqlx::query_as(select_usage!(
            "FROM billed m JOIN discord_threads t ON t.conversation = m.conversation
             WHERE t.guild_id = ?1 AND m.created_at >= ?2"
        ))
        .bind(guild as i64)
        .bind(since_unix)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(totals(row))
    }
}

fn totals((prompt, completion, cost, responses, cached, written): UsageRow) -> UsageTotals {
    let count = |n: Option<i64>| n.unwrap_or(0).max(0) as u64;
    UsageTotals {
        prompt_tokens: count(prompt),
        completion_tokens: count(completion),
        cost: cost.unwrap_or(0.0),
        responses: responses.max(0) as u64,
        cached_tokens: count(cached),
        cache_write_tokens: count(written),
    }
}

/// The file of a `sqlite:` URL, unless it is in memory.
fn file_of(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:" && !url.contains("mode=memory"))
        .then(|| PathBuf::from(path))
}

/// The database file at `path`, locked shared (`flock`, which SQLite's own
/// locks do not touch) for as long as it is held.
fn in_use(path: &Path) -> Option<std::fs::File> {
    let file = std::fs::File::open(path).ok()?;
    file.lock_shared().ok()?;
    Some(file)
}

/// The database file at `url`, when it is a file.
pub fn database_file(url: &str) -> Option<PathBuf> {
    file_of(url)
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

/// A row of `mcp_tasks`.
#[derive(FromRow)]
struct TaskRow {
    server: String,
    task_id: String,
    conversation: String,
    tool: String,
    legacy: bool,
    poll_ms: Option<i64>,
    author: Option<i64>,
    author_name: Option<String>,
    started_at: i64,
    message: Option<String>,
}

impl TaskRow {
    fn into_record(self) -> TaskRecord {
        TaskRecord {
            conversation: self.conversation,
            ticket: TaskTicket {
                server: self.server,
                tool: self.tool,
                task_id: self.task_id,
                legacy: self.legacy,
                poll_ms: self.poll_ms.map(|ms| ms.max(0) as u64),
            },
            author: self.author.map(|id| Author {
                id: id as u64,
                name: self.author_name.unwrap_or_default(),
            }),
            started_at: self.started_at,
            message: self.message,
        }
    }
}

fn db(error: sqlx::Error) -> StoreError {
    classify(&error)
}

/// Sorts a database failure by SQLite's result code (its low byte is the
/// primary code), not by its wording.
fn classify(error: &sqlx::Error) -> StoreError {
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

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn to_json<T: serde::Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

impl MessageRow {
    fn into_message(self) -> Result<Message, StoreError> {
        let role = Role::parse(&self.role)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown role {:?}", self.role)))?;
        let parse =
            |column: &str, text: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
                text.map(|t| serde_json::from_str(&t))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("{column} column: {e}")))
            };
        let tool_calls: Vec<ToolCall> = match self.tool_calls {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("tool_calls column: {e}")))?,
            None => Vec::new(),
        };
        let images: Vec<String> = match self.images {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("images column: {e}")))?,
            None => Vec::new(),
        };
        let count = |n: Option<i64>| n.unwrap_or(0).max(0) as u64;
        let usage = self.prompt_tokens.map(|prompt| Usage {
            prompt_tokens: count(Some(prompt)),
            completion_tokens: count(self.completion_tokens),
            cost: self.cost.unwrap_or(0.0),
            cached_tokens: count(self.cached_tokens),
            cache_write_tokens: count(self.cache_write_tokens),
        });
        let author = self.author_id.map(|id| Author {
            id: id as u64,
            name: self.author_name.unwrap_or_default(),
        });
        Ok(Message {
            role: Some(role),
            content: self.content,
            images,
            tool_calls,
            tool_call_id: self.tool_call_id,
            reasoning: self.reasoning,
            reasoning_details: parse("reasoning_details", self.reasoning_details)?,
            file_annotations: parse("file_annotations", self.file_annotations)?,
            model: self.model,
            usage,
            author,
            stopped: self.stopped,
            audio: Vec::new(),
            files: match self.files {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("files column: {e}")))?,
                None => Vec::new(),
            },
            // Stand-ins from before positions were kept are negative.
            position: self.position.filter(|p| *p > 0).map(|p| p as u64),
        })
    }
}

#[async_trait]
impl crate::mcp::oauth::TokenVault for SqliteStore {
    async fn load(&self, server: &str) -> Result<Option<String>, String> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT credentials FROM oauth_credentials WHERE server = ?1")
                .bind(server)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| db(e).to_string())?;
        Ok(row.map(|(text,)| text))
    }

    async fn save(&self, server: &str, credentials: &str) -> Result<(), String> {
        sqlx::query(
            "INSERT INTO oauth_credentials (server, credentials, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (server) DO UPDATE SET credentials = excluded.credentials, updated_at = excluded.updated_at",
        )
        .bind(server)
        .bind(credentials)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| db(e).to_string())?;
        Ok(())
    }

    async fn clear(&self, server: &str) -> Result<(), String> {
        sqlx::query("DELETE FROM oauth_credentials WHERE server = ?1")
            .bind(server)
            .execute(&self.pool)
            .await
            .map_err(|e| db(e).to_string())?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn model(&self, conversation: &str) -> Result<Option<String>, StoreError> {
        self.setting(conversation, Setting::Model).await
    }

    async fn set_model(&self, conversation: &str, model: Option<&str>) -> Result<(), StoreError> {
        self.set_setting(conversation, Setting::Model, model).await
    }

    async fn system_prompt(&self, conversation: &str) -> Result<Option<String>, StoreError> {
        self.setting(conversation, Setting::SystemPrompt).await
    }

    async fn set_system_prompt(
        &self,
        conversation: &str,
        prompt: Option<&str>,
    ) -> Result<(), StoreError> {
        self.set_setting(conversation, Setting::SystemPrompt, prompt)
            .await
    }

    async fn servers_off(&self, conversation: &str) -> Result<Vec<String>, StoreError> {
        match self.setting(conversation, Setting::ServersOff).await? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("servers_off column: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    async fn set_servers_off(&self, conversation: &str, off: &[String]) -> Result<(), StoreError> {
        let off = (!off.is_empty()).then(|| to_json(&off)).flatten();
        self.set_setting(conversation, Setting::ServersOff, off.as_deref())
            .await
    }

    async fn reasoning(&self, conversation: &str) -> Result<Option<ReasoningEffort>, StoreError> {
        let effort = self.setting(conversation, Setting::ReasoningEffort).await?;
        Ok(effort.and_then(|e| ReasoningEffort::parse(&e)))
    }

    async fn set_reasoning(
        &self,
        conversation: &str,
        effort: Option<ReasoningEffort>,
    ) -> Result<(), StoreError> {
        let effort = effort.map(ReasoningEffort::as_str);
        self.set_setting(conversation, Setting::ReasoningEffort, effort)
            .await
    }

    async fn reasoning_of(
        &self,
        conversation: &str,
        position: u64,
    ) -> Result<Vec<String>, StoreError> {
        // The rows after the input, up to the next input.
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT m.reasoning FROM messages m
             JOIN (SELECT id FROM messages WHERE conversation = ?1 AND position = ?2 AND replaced = 0
                   ORDER BY id DESC LIMIT 1) input ON m.id > input.id
             WHERE m.conversation = ?1 AND m.replaced = 0 AND m.reasoning IS NOT NULL AND m.reasoning != ''
               AND m.id < COALESCE((SELECT MIN(id) FROM messages WHERE conversation = ?1
                                    AND position IS NOT NULL AND replaced = 0 AND id > input.id),
                                   9223372036854775807)
             ORDER BY m.id",
        )
        .bind(conversation)
        .bind(position as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    async fn inherit(&self, conversation: &str, from: &str) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO conversations (key, model, system_prompt, servers_off, created_at)
             SELECT ?1, model, system_prompt, servers_off, ?3 FROM conversations WHERE key = ?2
             ON CONFLICT (key) DO UPDATE SET
                model = COALESCE(conversations.model, excluded.model),
                system_prompt = COALESCE(conversations.system_prompt, excluded.system_prompt),
                servers_off = COALESCE(conversations.servers_off, excluded.servers_off)",
        )
        .bind(conversation)
        .bind(from)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        // Nothing is written when `from` has no row.
        if done.rows_affected() > 0 {
            self.remember(conversation);
        }
        Ok(())
    }

    async fn history(&self, conversation: &str) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT role, content, images, tool_calls, tool_call_id, reasoning, reasoning_details,
                    model, prompt_tokens, completion_tokens, cost, cached_tokens, cache_write_tokens,
                    author_id, author_name, stopped, position, files, file_annotations
             FROM messages WHERE conversation = ?1 AND replaced = 0 ORDER BY id",
        )
        .bind(conversation)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter().map(MessageRow::into_message).collect()
    }

    async fn append(&self, conversation: &str, messages: &[Message]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut connection = self.pool.acquire().await.map_err(db)?;
        let created = self
            .insert_messages(&mut connection, conversation, messages)
            .await;
        self.remember_after(conversation, created)
    }

    async fn reset(&self, conversation: &str) -> Result<(), StoreError> {
        // Its usage starts over with it, billed after the fact or not.
        let mut tx = self.pool.begin().await.map_err(db)?;
        for statement in [
            "DELETE FROM messages WHERE conversation = ?1",
            "DELETE FROM unbilled WHERE conversation = ?1",
        ] {
            sqlx::query(statement)
                .bind(conversation)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn last_input(&self, conversation: &str) -> Result<Option<LastInput>, StoreError> {
        let row: Option<(i64, i64, Option<i64>)> = sqlx::query_as(LAST_INPUT)
            .bind(conversation)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(row.map(|(_, position, author)| LastInput {
            position: (position > 0).then_some(position as u64),
            author: author.map(|a| a as u64),
        }))
    }

    async fn replace(
        &self,
        conversation: &str,
        what: Replace,
        of: Option<u64>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let last: Option<(i64, i64, Option<i64>)> = sqlx::query_as(LAST_INPUT)
            .bind(conversation)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some((id, position, _)) = last else {
            return Ok(false);
        };
        if of.is_some_and(|of| of as i64 != position) {
            return Ok(false);
        }
        let from = match what {
            Replace::Answer => id + 1,
            Replace::Exchange => id,
        };
        sqlx::query(
            "UPDATE messages SET replaced = 1 WHERE conversation = ?1 AND replaced = 0 AND id >= ?2",
        )
        .bind(conversation)
        .bind(from)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn keep_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let body = serde_json::to_string(input).map_err(|e| StoreError::Failed(e.to_string()))?;
        let done = sqlx::query(
            "INSERT INTO inbox (conversation, position, author, body, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (conversation, position) DO NOTHING",
        )
        .bind(conversation)
        .bind(input.position as i64)
        .bind(input.author as i64)
        .bind(body)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn kept_inputs(&self) -> Result<Vec<(String, Inbound)>, StoreError> {
        let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT conversation, position, author, body FROM inbox ORDER BY conversation, position",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(conversation, position, author, body)| {
                let input: Inbound = serde_json::from_str(&body)
                    .map_err(|e| StoreError::Corrupt(format!("inbox body: {e}")))?;
                let input = Inbound {
                    position: position as u64,
                    author: author as u64,
                    ..input
                };
                Ok((conversation, input))
            })
            .collect()
    }

    async fn take_input(
        &self,
        conversation: &str,
        position: u64,
        message: &Message,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let created = self
            .insert_messages(&mut tx, conversation, std::slice::from_ref(message))
            .await;
        let written = async {
            created?;
            sqlx::query(FORGET_INPUT)
                .bind(conversation)
                .bind(position as i64)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)
        }
        .await;
        // The conversation's row only counts as there once it is committed.
        self.remember_after(conversation, written.map(|()| true))
    }

    async fn drop_input(&self, conversation: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(FORGET_INPUT)
            .bind(conversation)
            .bind(position as i64)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn update_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let body = serde_json::to_string(input).map_err(|e| StoreError::Failed(e.to_string()))?;
        let done =
            sqlx::query("UPDATE inbox SET body = ?3 WHERE conversation = ?1 AND position = ?2")
                .bind(conversation)
                .bind(input.position as i64)
                .bind(body)
                .execute(&self.pool)
                .await
                .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn instance_salt(&self) -> Result<String, StoreError> {
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh)
            .map_err(|e| StoreError::Failed(format!("no randomness: {e}")))?;
        // The first process to get here decides; every later one reads it.
        sqlx::query(
            "INSERT INTO instance (key, value) VALUES ('salt', ?1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(hex::encode(fresh))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        let (salt,): (String,) = sqlx::query_as("SELECT value FROM instance WHERE key = 'salt'")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(salt)
    }

    async fn keep_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let ticket = &task.ticket;
        sqlx::query(
            "INSERT INTO mcp_tasks (server, task_id, conversation, tool, legacy, poll_ms, author, author_name, started_at, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (conversation, server, task_id) DO UPDATE SET tool = excluded.tool",
        )
        .bind(&ticket.server)
        .bind(&ticket.task_id)
        .bind(&task.conversation)
        .bind(&ticket.tool)
        .bind(ticket.legacy)
        .bind(ticket.poll_ms.map(|ms| ms.min(i64::MAX as u64) as i64))
        .bind(task.author.as_ref().map(|a| a.id as i64))
        .bind(task.author.as_ref().map(|a| a.name.as_str()))
        .bind(task.started_at)
        .bind(task.message.as_deref())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let rows: Vec<TaskRow> = sqlx::query_as(
            "SELECT server, task_id, conversation, tool, legacy, poll_ms, author, author_name, started_at, message
             FROM mcp_tasks ORDER BY started_at, rowid",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(TaskRow::into_record).collect())
    }

    async fn note_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE mcp_tasks SET message = ?4 WHERE conversation = ?1 AND server = ?2 AND task_id = ?3",
        )
        .bind(&task.conversation)
        .bind(&task.ticket.server)
        .bind(&task.ticket.task_id)
        .bind(task.message.as_deref())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn drop_task(&self, conversation: &str, task: &TaskTicket) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM mcp_tasks WHERE conversation = ?1 AND server = ?2 AND task_id = ?3",
        )
        .bind(conversation)
        .bind(&task.server)
        .bind(&task.task_id)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn keep_unbilled(
        &self,
        unbilled: &Unbilled,
        first_try_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO unbilled (generation_id, conversation, model, created_at, attempts, next_try_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (generation_id) DO NOTHING",
        )
        .bind(&unbilled.generation_id)
        .bind(&unbilled.conversation)
        .bind(&unbilled.model)
        .bind(now())
        .bind(i64::from(unbilled.attempts))
        .bind(first_try_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn unbilled_due(&self, now: i64) -> Result<Vec<Unbilled>, StoreError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT generation_id, conversation, model, attempts FROM unbilled
             WHERE next_try_at IS NOT NULL AND next_try_at <= ?1
             ORDER BY next_try_at, created_at LIMIT 100",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(generation_id, conversation, model, attempts)| Unbilled {
                generation_id,
                conversation,
                model,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            })
            .collect())
    }

    async fn update_unbilled(
        &self,
        generation_id: &str,
        update: &UnbilledUpdate,
    ) -> Result<(), StoreError> {
        let query = match update {
            UnbilledUpdate::Billed(usage) => sqlx::query(
                "UPDATE unbilled SET next_try_at = NULL, prompt_tokens = ?2, completion_tokens = ?3,
                        cost = ?4, cached_tokens = ?5, cache_write_tokens = ?6
                 WHERE generation_id = ?1",
            )
            .bind(generation_id)
            .bind(usage.prompt_tokens as i64)
            .bind(usage.completion_tokens as i64)
            .bind(usage.cost)
            .bind(usage.cached_tokens as i64)
            .bind(usage.cache_write_tokens as i64),
            UnbilledUpdate::RetryAt { attempts, at } => sqlx::query(
                "UPDATE unbilled SET attempts = ?2, next_try_at = ?3 WHERE generation_id = ?1",
            )
            .bind(generation_id)
            .bind(i64::from(*attempts))
            .bind(*at),
            UnbilledUpdate::GaveUp => {
                sqlx::query("UPDATE unbilled SET next_try_at = NULL WHERE generation_id = ?1")
                    .bind(generation_id)
            }
        };
        query.execute(&self.pool).await.map_err(db)?;
        Ok(())
    }
}

impl SqliteStore {
    /// Inserts `messages` in one statement (all of the rows or none),
    /// creating the conversation's row the first time. `true` when the
    /// conversation's row was written (see `remember_after`).
    async fn insert_messages(
        &self,
        connection: &mut SqliteConnection,
        conversation: &str,
        messages: &[Message],
    ) -> Result<bool, StoreError> {
        let now = now();
        let known = self
            .known
            .lock()
            .expect("known poisoned")
            .contains(conversation);
        if !known {
            sqlx::query(
                "INSERT INTO conversations (key, created_at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(conversation)
            .bind(now)
            .execute(&mut *connection)
            .await
            .map_err(db)?;
        }
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO messages (conversation, role, content, images, tool_calls, tool_call_id,
                reasoning, reasoning_details, model, prompt_tokens, completion_tokens, cost,
                cached_tokens, cache_write_tokens, author_id, author_name, stopped, position, files,
                file_annotations, created_at) ",
        );
        insert.push_values(messages, |mut row, message| {
            let usage = message.usage;
            row.push_bind(conversation)
                .push_bind(message.role().as_str())
                .push_bind(message.content.as_deref())
                .push_bind(
                    (!message.images.is_empty())
                        .then(|| to_json(&message.images))
                        .flatten(),
                )
                .push_bind(
                    (!message.tool_calls.is_empty())
                        .then(|| to_json(&message.tool_calls))
                        .flatten(),
                )
                .push_bind(message.tool_call_id.as_deref())
                .push_bind(message.reasoning.as_deref())
                .push_bind(message.reasoning_details.as_ref().and_then(to_json))
                .push_bind(message.model.as_deref())
                .push_bind(usage.map(|u| u.prompt_tokens as i64))
                .push_bind(usage.map(|u| u.completion_tokens as i64))
                .push_bind(usage.map(|u| u.cost))
                .push_bind(usage.map(|u| u.cached_tokens as i64))
                .push_bind(usage.map(|u| u.cache_write_tokens as i64))
                .push_bind(message.author.as_ref().map(|a| a.id as i64))
                .push_bind(message.author.as_ref().map(|a| a.name.as_str()))
                .push_bind(message.stopped)
                .push_bind(message.position.map(|p| p as i64))
                .push_bind(
                    (!message.files.is_empty())
                        .then(|| to_json(&message.files))
                        .flatten(),
                )
                .push_bind(message.file_annotations.as_ref().and_then(to_json))
                .push_bind(now);
        });
        insert.build().execute(&mut *connection).await.map_err(db)?;
        Ok(!known)
    }

    /// Remembers that `conversation` has its row once a write that made it
    /// has succeeded.
    fn remember_after(
        &self,
        conversation: &str,
        written: Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        if written? {
            self.remember(conversation);
        }
        Ok(())
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
