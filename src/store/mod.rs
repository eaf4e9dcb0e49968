//! Persistence (sqlx): SQLite by default, PostgreSQL for several processes
//! sharing one database. The only place with SQL. Each statement is one
//! text for both (`$N` parameters, `TRUE`/`FALSE`, casts where PostgreSQL
//! widens a type); what only one of them has lives in its module.

mod copy;
mod postgres;
mod sqlite;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::{FromRow, PgPool, QueryBuilder, SqlitePool};

pub use crate::conversation::UsageTotals;
use crate::conversation::{
    Author, Inbound, LastInput, Message, ReasoningEffort, Replace, Role, Store, StoreError,
    TaskRecord, TaskTicket, ToolCall, Unbilled, UnbilledUpdate, Usage,
};
pub use copy::{Copied, copy_sqlite_to_postgres};
pub use sqlite::{FILE_CHECK_INTERVAL, check_backup};

/// Forgets a kept input (taken by its turn, or dropped).
const FORGET_INPUT: &str = "DELETE FROM inbox WHERE conversation = $1 AND position = $2";

/// The row id, position and author of a conversation's last input still
/// in its history.
const LAST_INPUT: &str = "SELECT id, position, author_id FROM messages
     WHERE conversation = $1 AND replaced = FALSE AND position IS NOT NULL
     ORDER BY id DESC LIMIT 1";

/// Conversations remembered as having their row; past this the set starts over.
const MAX_KNOWN_CONVERSATIONS: usize = 10_000;

/// Which database a store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a `DATABASE_URL` names.
    pub fn of(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

#[derive(Debug, Clone)]
enum Pools {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the store's pool, whichever backend
/// it is; the body is the same text for both.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pools::Sqlite($pool) => $body,
            Pools::Postgres($pool) => $body,
        }
    };
}

/// The store of conversations in one database.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: Pools,
    /// The SQLite file, when it is one.
    file: Option<Arc<sqlite::DatabaseFile>>,
    /// Conversations known to have a row, so appends skip the upsert.
    known: Arc<Mutex<HashSet<String>>>,
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
            concat!("SELECT ", $column, " FROM conversations WHERE key = $1"),
            concat!(
                "INSERT INTO conversations (key, ",
                $column,
                ", created_at) VALUES ($1, $2, $3)
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

/// `SELECT` of the sums `totals` reads, in this order, over billed rows `m`
/// (PostgreSQL sums BIGINTs as NUMERIC, hence the casts back).
macro_rules! select_usage {
    ($rest:literal) => {
        concat!(
            "SELECT CAST(SUM(m.prompt_tokens) AS BIGINT), CAST(SUM(m.completion_tokens) AS BIGINT),
                    SUM(m.cost), COUNT(m.prompt_tokens), CAST(SUM(m.cached_tokens) AS BIGINT),
                    CAST(SUM(m.cache_write_tokens) AS BIGINT) ",
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

impl SqlStore {
    /// Opens the database at `url` (a `sqlite:` file, created when
    /// missing, or a `postgres://` server) and applies the embedded
    /// migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let (pool, file) = match Backend::of(url) {
            Backend::Sqlite => {
                let (pool, file) = sqlite::open(url).await?;
                (Pools::Sqlite(pool), file.map(Arc::new))
            }
            Backend::Postgres => (Pools::Postgres(postgres::open(url).await?), None),
        };
        let store = SqlStore {
            pool,
            file,
            known: Arc::default(),
        };
        if let Err(error) = store.verify_writable().await {
            store.close().await;
            return Err(match store.backend() {
                Backend::Sqlite => sqlite::explain(url, error),
                Backend::Postgres => postgres::explain(error),
            });
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pools::Sqlite(_) => Backend::Sqlite,
            Pools::Postgres(_) => Backend::Postgres,
        }
    }

    /// Sorts a failure of this store's database.
    fn db(&self, error: sqlx::Error) -> StoreError {
        match self.pool {
            Pools::Sqlite(_) => sqlite::classify(&error),
            Pools::Postgres(_) => postgres::classify(&error),
        }
    }

    /// Writes in a transaction and rolls it back: a file (or folder) this
    /// user cannot write opens fine and fails only at the first write.
    async fn verify_writable(&self) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(|e| self.db(e))?;
            sqlx::query("INSERT INTO conversations (key, model, created_at) VALUES ('mcpcord:write-check', NULL, 0) ON CONFLICT (key) DO NOTHING")
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
            tx.rollback().await.map_err(|e| self.db(e))
        })
    }

    /// Resolves when the database file has been deleted or replaced while
    /// open; what is written after that would be lost. Never resolves for
    /// an in-memory database or a database server.
    pub async fn lost(&self) -> String {
        match &self.file {
            Some(file) => file.lost().await,
            None => std::future::pending().await,
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

    fn is_known(&self, conversation: &str) -> bool {
        self.known
            .lock()
            .expect("known poisoned")
            .contains(conversation)
    }

    /// One setting of `conversation`, as stored.
    async fn setting(
        &self,
        conversation: &str,
        setting: Setting,
    ) -> Result<Option<String>, StoreError> {
        let row: Option<(Option<String>,)> = on_pool!(self, pool => {
            sqlx::query_as(setting.sql().0)
                .bind(conversation)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
        Ok(row.and_then(|(value,)| value))
    }

    /// Sets (with `None` clears) one setting of `conversation`.
    async fn set_setting(
        &self,
        conversation: &str,
        setting: Setting,
        value: Option<&str>,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(setting.sql().1)
                .bind(conversation)
                .bind(value)
                .bind(now())
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        self.remember(conversation);
        Ok(())
    }

    /// Writes a consistent copy of a SQLite database to `to` (`VACUUM
    /// INTO`, which readers and writers do not wait for).
    pub async fn copy_into(&self, to: &Path) -> Result<(), StoreError> {
        match &self.pool {
            Pools::Sqlite(pool) => sqlite::copy_into(pool, to).await,
            Pools::Postgres(_) => Err(StoreError::Failed(
                "a PostgreSQL database is backed up with its own tools: pg_dump (and pg_restore)"
                    .into(),
            )),
        }
    }

    /// Closes the pool, waiting for connections to finish, and lets go of
    /// the database file.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
        if let Some(file) = &self.file {
            file.release();
        }
    }

    /// Tokens and cost of one conversation's answers.
    pub async fn usage(&self, conversation: &str) -> Result<UsageTotals, StoreError> {
        let row: UsageRow = on_pool!(self, pool => {
            sqlx::query_as(select_usage!("FROM billed m WHERE m.conversation = $1"))
                .bind(conversation)
                .fetch_one(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
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
        let row: UsageRow = on_pool!(self, pool => {
            sqlx::query_as(select_usage!(
                "FROM billed m WHERE m.conversation LIKE $1 ESCAPE '\\' AND m.created_at >= $2"
            ))
            .bind(&pattern)
            .bind(since_unix)
            .fetch_one(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
        Ok(totals(row))
    }
}

/// The database file at `url`, when it is a SQLite file.
pub fn database_file(url: &str) -> Option<PathBuf> {
    match Backend::of(url) {
        Backend::Sqlite => sqlite::file_of(url),
        Backend::Postgres => None,
    }
}

/// `url` with its password (if any) masked, to be shown or logged.
pub fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        // Unparsed, it may hold anything: show only its scheme.
        Err(_) => format!(
            "{}…",
            url.split_once("://").map_or("", |(scheme, _)| scheme)
        ),
    }
}

#[async_trait]
impl crate::discord::Threads for SqlStore {
    async fn starter(&self, conversation: &str) -> Result<Option<u64>, StoreError> {
        let row: Option<(i64,)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT started_by FROM discord_threads WHERE conversation = $1")
                .bind(conversation)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
        Ok(row.map(|(user,)| user as u64))
    }

    async fn parent(&self, conversation: &str) -> Result<Option<u64>, StoreError> {
        let row: Option<(i64,)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT channel_id FROM discord_threads WHERE conversation = $1")
                .bind(conversation)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
        Ok(row.map(|(parent,)| parent as u64))
    }

    async fn add(
        &self,
        conversation: &str,
        guild: Option<u64>,
        parent: u64,
        started_by: u64,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO discord_threads (conversation, guild_id, channel_id, started_by, created_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (conversation) DO NOTHING",
            )
            .bind(conversation)
            .bind(guild.map(|g| g as i64))
            .bind(parent as i64)
            .bind(started_by as i64)
            .bind(now())
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    async fn usage(&self, conversation: &str) -> Result<UsageTotals, StoreError> {
        SqlStore::usage(self, conversation).await
    }

    async fn guild_of(&self, conversation: &str) -> Result<Option<u64>, StoreError> {
        let row: Option<(Option<i64>,)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT guild_id FROM discord_threads WHERE conversation = $1")
                .bind(conversation)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
        Ok(row.and_then(|(guild,)| guild).map(|g| g as u64))
    }

    async fn user_spent_since(&self, user: u64, since_unix: i64) -> Result<f64, StoreError> {
        // A reply is billed to whoever wrote the last input before it; a
        // reply billed after the fact, to the last input before it was kept.
        let (spent,): (Option<f64>,) = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT SUM(cost) FROM (
                    SELECT m.cost FROM messages m
                     WHERE m.cost IS NOT NULL AND m.created_at >= $2
                       AND (SELECT i.author_id FROM messages i
                             WHERE i.conversation = m.conversation AND i.position IS NOT NULL
                               AND i.id < m.id
                             ORDER BY i.id DESC LIMIT 1) = $1
                    UNION ALL
                    SELECT u.cost FROM unbilled u
                     WHERE u.cost IS NOT NULL AND u.created_at >= $2
                       AND (SELECT i.author_id FROM messages i
                             WHERE i.conversation = u.conversation AND i.position IS NOT NULL
                               AND i.created_at <= u.created_at
                             ORDER BY i.id DESC LIMIT 1) = $1
                 ) spent",
            )
            .bind(user as i64)
            .bind(since_unix)
            .fetch_one(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
        Ok(spent.unwrap_or(0.0))
    }

    async fn guild_budget(
        &self,
        guild: u64,
    ) -> Result<crate::discord::budgets::GuildBudget, StoreError> {
        let row: Option<(Option<f64>, Option<f64>)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT monthly, daily FROM guild_budgets WHERE guild_id = $1")
                .bind(guild as i64)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
        let (monthly, daily) = row.unwrap_or_default();
        Ok(crate::discord::budgets::GuildBudget { monthly, daily })
    }

    async fn set_guild_budget(
        &self,
        guild: u64,
        budget: &crate::discord::budgets::GuildBudget,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO guild_budgets (guild_id, monthly, daily, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (guild_id) DO UPDATE SET monthly = excluded.monthly,
                    daily = excluded.daily, updated_at = excluded.updated_at",
            )
            .bind(guild as i64)
            .bind(budget.monthly)
            .bind(budget.daily)
            .bind(now())
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))
    }

    async fn guild_usage_since(
        &self,
        guild: u64,
        since_unix: i64,
    ) -> Result<UsageTotals, StoreError> {
        let row: UsageRow = on_pool!(self, pool => {
            sqlx::query_as(select_usage!(
                "FROM billed m JOIN discord_threads t ON t.conversation = m.conversation
                 WHERE t.guild_id = $1 AND m.created_at >= $2"
            ))
            .bind(guild as i64)
            .bind(since_unix)
            .fetch_one(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
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
impl crate::mcp::oauth::TokenVault for SqlStore {
    async fn load(&self, server: &str) -> Result<Option<String>, String> {
        let row: Option<(String,)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT credentials FROM oauth_credentials WHERE server = $1")
                .bind(server)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e).to_string())?;
        Ok(row.map(|(text,)| text))
    }

    async fn save(&self, server: &str, credentials: &str) -> Result<(), String> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO oauth_credentials (server, credentials, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (server) DO UPDATE SET credentials = excluded.credentials, updated_at = excluded.updated_at",
            )
            .bind(server)
            .bind(credentials)
            .bind(now())
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e).to_string())?;
        Ok(())
    }

    async fn clear(&self, server: &str) -> Result<(), String> {
        on_pool!(self, pool => {
            sqlx::query("DELETE FROM oauth_credentials WHERE server = $1")
                .bind(server)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(|e| self.db(e).to_string())?;
        Ok(())
    }
}

/// Kept inputs as read from `inbox`.
fn inbox_rows(rows: Vec<(String, i64, i64, String)>) -> Result<Vec<(String, Inbound)>, StoreError> {
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

/// Inserts `$messages` of `$conversation` in one statement through
/// `$connection` (all of the rows or none), creating the conversation's
/// row first when `$create`. Text loses its NUL characters, which
/// PostgreSQL's text cannot hold, on every backend alike.
macro_rules! insert_messages {
    ($store:expr, $connection:expr, $conversation:expr, $messages:expr, $create:expr) => {{
        let now = now();
        if $create {
            sqlx::query(
                "INSERT INTO conversations (key, created_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            )
            .bind($conversation)
            .bind(now)
            .execute(&mut *$connection)
            .await
            .map_err(|e| $store.db(e))?;
        }
        let mut insert = QueryBuilder::new(
            "INSERT INTO messages (conversation, role, content, images, tool_calls, tool_call_id,
                reasoning, reasoning_details, model, prompt_tokens, completion_tokens, cost,
                cached_tokens, cache_write_tokens, author_id, author_name, stopped, position, files,
                file_annotations, created_at) ",
        );
        insert.push_values($messages, |mut row, message| {
            let usage = message.usage;
            row.push_bind($conversation)
                .push_bind(message.role().as_str())
                .push_bind(message.content.as_deref().map(without_nul))
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
                .push_bind(message.tool_call_id.as_deref().map(without_nul))
                .push_bind(message.reasoning.as_deref().map(without_nul))
                .push_bind(message.reasoning_details.as_ref().and_then(to_json))
                .push_bind(message.model.as_deref().map(without_nul))
                .push_bind(usage.map(|u| u.prompt_tokens as i64))
                .push_bind(usage.map(|u| u.completion_tokens as i64))
                .push_bind(usage.map(|u| u.cost))
                .push_bind(usage.map(|u| u.cached_tokens as i64))
                .push_bind(usage.map(|u| u.cache_write_tokens as i64))
                .push_bind(message.author.as_ref().map(|a| a.id as i64))
                .push_bind(message.author.as_ref().map(|a| without_nul(&a.name)))
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
        insert
            .build()
            .execute(&mut *$connection)
            .await
            .map_err(|e| $store.db(e))?;
    }};
}
/// `text` without NUL characters (each becomes U+FFFD).
fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

#[async_trait]
impl Store for SqlStore {
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
        let rows: Vec<(String,)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT m.reasoning FROM messages m
                 JOIN (SELECT id FROM messages WHERE conversation = $1 AND position = $2 AND replaced = FALSE
                       ORDER BY id DESC LIMIT 1) input ON m.id > input.id
                 WHERE m.conversation = $1 AND m.replaced = FALSE AND m.reasoning IS NOT NULL AND m.reasoning != ''
                   AND m.id < COALESCE((SELECT MIN(id) FROM messages WHERE conversation = $1
                                        AND position IS NOT NULL AND replaced = FALSE AND id > input.id),
                                       9223372036854775807)
                 ORDER BY m.id",
            )
            .bind(conversation)
            .bind(position as i64)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    async fn inherit(&self, conversation: &str, from: &str) -> Result<(), StoreError> {
        let done = on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO conversations (key, model, system_prompt, servers_off, created_at)
                 SELECT $1, model, system_prompt, servers_off, $3 FROM conversations WHERE key = $2
                 ON CONFLICT (key) DO UPDATE SET
                    model = COALESCE(conversations.model, excluded.model),
                    system_prompt = COALESCE(conversations.system_prompt, excluded.system_prompt),
                    servers_off = COALESCE(conversations.servers_off, excluded.servers_off)",
            )
            .bind(conversation)
            .bind(from)
            .bind(now())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| self.db(e))?;
        // Nothing is written when `from` has no row.
        if done > 0 {
            self.remember(conversation);
        }
        Ok(())
    }

    async fn history(&self, conversation: &str) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<MessageRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT role, content, images, tool_calls, tool_call_id, reasoning, reasoning_details,
                        model, prompt_tokens, completion_tokens, cost, cached_tokens, cache_write_tokens,
                        author_id, author_name, stopped, position, files, file_annotations
                 FROM messages WHERE conversation = $1 AND replaced = FALSE ORDER BY id",
            )
            .bind(conversation)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
        rows.into_iter().map(MessageRow::into_message).collect()
    }

    async fn append(&self, conversation: &str, messages: &[Message]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let created = !self.is_known(conversation);
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(|e| self.db(e))?;
            insert_messages!(self, &mut *tx, conversation, messages, created);
            tx.commit().await.map_err(|e| self.db(e))?;
        });
        // The conversation's row only counts as there once it is committed.
        if created {
            self.remember(conversation);
        }
        Ok(())
    }

    async fn reset(&self, conversation: &str) -> Result<(), StoreError> {
        // Its usage starts over with it, billed after the fact or not.
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(|e| self.db(e))?;
            for statement in [
                "DELETE FROM messages WHERE conversation = $1",
                "DELETE FROM unbilled WHERE conversation = $1",
            ] {
                sqlx::query(statement)
                    .bind(conversation)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.db(e))?;
            }
            tx.commit().await.map_err(|e| self.db(e))
        })
    }

    async fn last_input(&self, conversation: &str) -> Result<Option<LastInput>, StoreError> {
        let row: Option<(i64, i64, Option<i64>)> = on_pool!(self, pool => {
            sqlx::query_as(LAST_INPUT)
                .bind(conversation)
                .fetch_optional(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
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
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(|e| self.db(e))?;
            let last: Option<(i64, i64, Option<i64>)> = sqlx::query_as(LAST_INPUT)
                .bind(conversation)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
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
                "UPDATE messages SET replaced = TRUE
                 WHERE conversation = $1 AND replaced = FALSE AND id >= $2",
            )
            .bind(conversation)
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
            tx.commit().await.map_err(|e| self.db(e))?;
            Ok(true)
        })
    }

    async fn keep_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let body = serde_json::to_string(input).map_err(|e| StoreError::Failed(e.to_string()))?;
        let done = on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO inbox (conversation, position, author, body, received_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (conversation, position) DO NOTHING",
            )
            .bind(conversation)
            .bind(input.position as i64)
            .bind(input.author as i64)
            .bind(&body)
            .bind(now())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| self.db(e))?;
        Ok(done == 1)
    }

    async fn kept_inputs(&self) -> Result<Vec<(String, Inbound)>, StoreError> {
        let rows: Vec<(String, i64, i64, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT conversation, position, author, body FROM inbox ORDER BY conversation, position",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
        inbox_rows(rows)
    }

    async fn claim(
        &self,
        conversation: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let claimed = on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO leases (conversation, owner, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (conversation) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE leases.owner = excluded.owner OR leases.expires_at < $4",
            )
            .bind(conversation)
            .bind(owner)
            .bind(until)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| self.db(e))?;
        Ok(claimed == 1)
    }

    async fn renew_claims(&self, owner: &str, until: i64) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE leases SET expires_at = $2 WHERE owner = $1")
                .bind(owner)
                .bind(until)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(|e| self.db(e))
    }

    async fn release(&self, conversation: Option<&str>, owner: &str) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "DELETE FROM leases WHERE owner = $1 AND ($2 IS NULL OR conversation = $2)",
            )
            .bind(owner)
            .bind(conversation)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))
    }

    async fn unclaimed_inputs(
        &self,
        now: i64,
        received_before: i64,
    ) -> Result<Vec<(String, Inbound)>, StoreError> {
        let rows: Vec<(String, i64, i64, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT i.conversation, i.position, i.author, i.body FROM inbox i
                 JOIN leases l ON l.conversation = i.conversation AND l.expires_at < $1
                 WHERE i.received_at <= $2
                 ORDER BY i.conversation, i.position LIMIT 1000",
            )
            .bind(now)
            .bind(received_before)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
        inbox_rows(rows)
    }

    async fn take_input(
        &self,
        conversation: &str,
        position: u64,
        message: &Message,
    ) -> Result<(), StoreError> {
        let created = !self.is_known(conversation);
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(|e| self.db(e))?;
            insert_messages!(self, &mut *tx, conversation, std::slice::from_ref(message), created);
            sqlx::query(FORGET_INPUT)
                .bind(conversation)
                .bind(position as i64)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
            tx.commit().await.map_err(|e| self.db(e))?;
        });
        // The conversation's row only counts as there once it is committed.
        if created {
            self.remember(conversation);
        }
        Ok(())
    }

    async fn drop_input(&self, conversation: &str, position: u64) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(FORGET_INPUT)
                .bind(conversation)
                .bind(position as i64)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    async fn update_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let body = serde_json::to_string(input).map_err(|e| StoreError::Failed(e.to_string()))?;
        let done = on_pool!(self, pool => {
            sqlx::query("UPDATE inbox SET body = $3 WHERE conversation = $1 AND position = $2")
                .bind(conversation)
                .bind(input.position as i64)
                .bind(&body)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| self.db(e))?;
        Ok(done == 1)
    }

    async fn instance_salt(&self) -> Result<String, StoreError> {
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh)
            .map_err(|e| StoreError::Failed(format!("no randomness: {e}")))?;
        let fresh = hex::encode(fresh);
        // The first process to get here decides; every later one reads it.
        let (salt,): (String,) = on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO instance (key, value) VALUES ('salt', $1) ON CONFLICT (key) DO NOTHING",
            )
            .bind(&fresh)
            .execute(pool)
            .await
            .map_err(|e| self.db(e))?;
            sqlx::query_as("SELECT value FROM instance WHERE key = 'salt'")
                .fetch_one(pool)
                .await
        })
        .map_err(|e| self.db(e))?;
        Ok(salt)
    }

    async fn keep_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let ticket = &task.ticket;
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO mcp_tasks (server, task_id, conversation, tool, legacy, poll_ms, author, author_name, started_at, message)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
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
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    async fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        macro_rules! kept_tasks {
            ($order:literal) => {
                concat!(
                    "SELECT server, task_id, conversation, tool, legacy, poll_ms, author, author_name, started_at, message
                     FROM mcp_tasks ORDER BY started_at, ",
                    $order
                )
            };
        }
        // In the order they were kept: SQLite's rowid, PostgreSQL's identity.
        let rows: Vec<TaskRow> = match &self.pool {
            Pools::Sqlite(pool) => sqlx::query_as(kept_tasks!("rowid")).fetch_all(pool).await,
            Pools::Postgres(pool) => sqlx::query_as(kept_tasks!("kept")).fetch_all(pool).await,
        }
        .map_err(|e| self.db(e))?;
        Ok(rows.into_iter().map(TaskRow::into_record).collect())
    }

    async fn note_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE mcp_tasks SET message = $4 WHERE conversation = $1 AND server = $2 AND task_id = $3",
            )
            .bind(&task.conversation)
            .bind(&task.ticket.server)
            .bind(&task.ticket.task_id)
            .bind(task.message.as_deref())
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    async fn drop_task(&self, conversation: &str, task: &TaskTicket) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "DELETE FROM mcp_tasks WHERE conversation = $1 AND server = $2 AND task_id = $3",
            )
            .bind(conversation)
            .bind(&task.server)
            .bind(&task.task_id)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    async fn keep_unbilled(
        &self,
        unbilled: &Unbilled,
        first_try_at: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO unbilled (generation_id, conversation, model, created_at, attempts, next_try_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (generation_id) DO NOTHING",
            )
            .bind(&unbilled.generation_id)
            .bind(&unbilled.conversation)
            .bind(&unbilled.model)
            .bind(now())
            .bind(i64::from(unbilled.attempts))
            .bind(first_try_at)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    async fn unbilled_due(&self, now: i64) -> Result<Vec<Unbilled>, StoreError> {
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT generation_id, conversation, model, attempts FROM unbilled
                 WHERE next_try_at IS NOT NULL AND next_try_at <= $1
                 ORDER BY next_try_at, created_at LIMIT 100",
            )
            .bind(now)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| self.db(e))?;
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
        on_pool!(self, pool => {
            let query = match update {
                UnbilledUpdate::Billed(usage) => sqlx::query(
                    "UPDATE unbilled SET next_try_at = NULL, prompt_tokens = $2, completion_tokens = $3,
                            cost = $4, cached_tokens = $5, cache_write_tokens = $6
                     WHERE generation_id = $1",
                )
                .bind(generation_id)
                .bind(usage.prompt_tokens as i64)
                .bind(usage.completion_tokens as i64)
                .bind(usage.cost)
                .bind(usage.cached_tokens as i64)
                .bind(usage.cache_write_tokens as i64),
                UnbilledUpdate::RetryAt { attempts, at } => sqlx::query(
                    "UPDATE unbilled SET attempts = $2, next_try_at = $3 WHERE generation_id = $1",
                )
                .bind(generation_id)
                .bind(i64::from(*attempts))
                .bind(*at),
                UnbilledUpdate::GaveUp => {
                    sqlx::query("UPDATE unbilled SET next_try_at = NULL WHERE generation_id = $1")
                        .bind(generation_id)
                }
            };
            query.execute(pool).await.map(|_| ())
        })
        .map_err(|e| self.db(e))?;
        Ok(())
    }
}
