//! SQLite persistence (sqlx). The only place with SQL.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, QueryBuilder, Sqlite, SqlitePool};

use crate::conversation::{Message, Role, Store, StoreError, ToolCall, Usage};

/// Connections in the pool. SQLite has one writer; a few readers help.
const MAX_CONNECTIONS: u32 = 4;
/// How long a write waits for another to finish before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The store of conversations in one SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Conversations known to have a row, so appends skip the upsert.
    known: Arc<Mutex<HashSet<String>>>,
}

/// Tokens and cost summed over some messages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageTotals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    pub responses: u64,
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
}

impl SqliteStore {
    /// Opens (creating when missing) the database at `url` and applies the
    /// embedded migrations. WAL, foreign keys and a busy timeout are on.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError(format!("invalid DATABASE_URL {url:?}: {e}")))?
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
            .map_err(|e| StoreError(format!("cannot open the database {url:?}: {e}")))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError(format!("cannot migrate the database {url:?}: {e}")))?;
        Ok(SqliteStore {
            pool,
            known: Arc::default(),
        })
    }

    fn remember(&self, conversation: &str) {
        self.known
            .lock()
            .expect("known poisoned")
            .insert(conversation.to_owned());
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Tokens and cost of one conversation's answers.
    pub async fn usage(&self, conversation: &str) -> Result<UsageTotals, StoreError> {
        let row: (Option<i64>, Option<i64>, Option<f64>, i64) = sqlx::query_as(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens), SUM(cost), COUNT(prompt_tokens)
             FROM messages WHERE conversation = ?1",
        )
        .bind(conversation)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(totals(row))
    }

    /// Remembers a thread the Discord bot started.
    pub async fn add_discord_thread(
        &self,
        conversation: &str,
        guild: Option<u64>,
        channel: u64,
        started_by: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discord_threads (conversation, guild_id, channel_id, started_by, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (conversation) DO NOTHING",
        )
        .bind(conversation)
        .bind(guild.map(|g| g as i64))
        .bind(channel as i64)
        .bind(started_by as i64)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The parent channel of the thread of `conversation`, when the Discord
    /// bot started that thread.
    pub async fn discord_thread_parent(
        &self,
        conversation: &str,
    ) -> Result<Option<u64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT channel_id FROM discord_threads WHERE conversation = ?1")
                .bind(conversation)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.map(|(parent,)| parent as u64))
    }

    /// Tokens and cost of the bot's threads in one Discord server since
    /// `since_unix` seconds.
    pub async fn guild_usage_since(
        &self,
        guild: u64,
        since_unix: i64,
    ) -> Result<UsageTotals, StoreError> {
        let row: (Option<i64>, Option<i64>, Option<f64>, i64) = sqlx::query_as(
            "SELECT SUM(m.prompt_tokens), SUM(m.completion_tokens), SUM(m.cost), COUNT(m.prompt_tokens)
             FROM messages m JOIN discord_threads t ON t.conversation = m.conversation
             WHERE t.guild_id = ?1 AND m.created_at >= ?2",
        )
        .bind(guild as i64)
        .bind(since_unix)
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
        let row: (Option<i64>, Option<i64>, Option<f64>, i64) = sqlx::query_as(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens), SUM(cost), COUNT(prompt_tokens)
             FROM messages WHERE conversation LIKE ?1 ESCAPE '\\' AND created_at >= ?2",
        )
        .bind(pattern)
        .bind(since_unix)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(totals(row))
    }
}

fn totals(
    (prompt, completion, cost, responses): (Option<i64>, Option<i64>, Option<f64>, i64),
) -> UsageTotals {
    UsageTotals {
        prompt_tokens: prompt.unwrap_or(0).max(0) as u64,
        completion_tokens: completion.unwrap_or(0).max(0) as u64,
        cost: cost.unwrap_or(0.0),
        responses: responses.max(0) as u64,
    }
}

fn db(error: sqlx::Error) -> StoreError {
    StoreError(error.to_string())
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
            .ok_or_else(|| StoreError(format!("unknown role {:?} in the database", self.role)))?;
        let parse =
            |column: &str, text: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
                text.map(|t| serde_json::from_str(&t))
                    .transpose()
                    .map_err(|e| StoreError(format!("corrupt {column} column: {e}")))
            };
        let tool_calls: Vec<ToolCall> = match self.tool_calls {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError(format!("corrupt tool_calls column: {e}")))?,
            None => Vec::new(),
        };
        let images: Vec<String> = match self.images {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError(format!("corrupt images column: {e}")))?,
            None => Vec::new(),
        };
        let usage = self.prompt_tokens.map(|prompt| Usage {
            prompt_tokens: prompt.max(0) as u64,
            completion_tokens: self.completion_tokens.unwrap_or(0).max(0) as u64,
            cost: self.cost.unwrap_or(0.0),
        });
        Ok(Message {
            role: Some(role),
            content: self.content,
            images,
            tool_calls,
            tool_call_id: self.tool_call_id,
            reasoning: self.reasoning,
            reasoning_details: parse("reasoning_details", self.reasoning_details)?,
            model: self.model,
            usage,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn model(&self, conversation: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT model FROM conversations WHERE key = ?1")
                .bind(conversation)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.and_then(|(model,)| model))
    }

    async fn set_model(&self, conversation: &str, model: Option<&str>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO conversations (key, model, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET model = excluded.model",
        )
        .bind(conversation)
        .bind(model)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        self.remember(conversation);
        Ok(())
    }

    async fn history(&self, conversation: &str) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT role, content, images, tool_calls, tool_call_id, reasoning, reasoning_details,
                    model, prompt_tokens, completion_tokens, cost
             FROM messages WHERE conversation = ?1 ORDER BY id",
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
        let now = now();
        let mut connection = self.pool.acquire().await.map_err(db)?;
        if !self
            .known
            .lock()
            .expect("known poisoned")
            .contains(conversation)
        {
            sqlx::query(
                "INSERT INTO conversations (key, created_at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(conversation)
            .bind(now)
            .execute(&mut *connection)
            .await
            .map_err(db)?;
            self.remember(conversation);
        }
        // One statement, so SQLite writes all the rows or none.
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO messages (conversation, role, content, images, tool_calls, tool_call_id,
                reasoning, reasoning_details, model, prompt_tokens, completion_tokens, cost, created_at) ",
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
                .push_bind(now);
        });
        insert.build().execute(&mut *connection).await.map_err(db)?;
        Ok(())
    }

    async fn reset(&self, conversation: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM messages WHERE conversation = ?1")
            .bind(conversation)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }
}
