//! What only PostgreSQL has: its connection settings, its migrations (which
//! sqlx applies under an advisory lock, so that processes starting together
//! migrate once) and its error codes (SQLSTATE).

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::conversation::StoreError;

/// Connections each process keeps at most. Turns hold one only for a
/// statement or a short transaction.
const MAX_CONNECTIONS: u32 = 8;
/// How long a statement waits for a free connection (or for the server to
/// answer a new one) before it counts as unreachable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The embedded PostgreSQL migrations.
pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connects to the database at `url` and brings it up to date.
pub(super) async fn open(url: &str) -> Result<PgPool, StoreError> {
    let shown = super::redacted(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Open(format!("invalid DATABASE_URL {shown}: {e}")))?
        .application_name("mcpcord");
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| StoreError::Open(format!("cannot connect to {shown}: {e}")))?;
    if let Err(e) = MIGRATOR.run(&pool).await {
        pool.close().await;
        return Err(match classify(&sqlx::Error::from(e)) {
            StoreError::NotWritable(message) => StoreError::NotWritable(not_writable(&message)),
            other => StoreError::Open(format!("cannot migrate {shown}: {other}")),
        });
    }
    Ok(pool)
}

/// Why the database cannot be written, and what to do.
pub(super) fn not_writable(error: &str) -> String {
    format!(
        "the database user cannot write mcpcord's tables ({error}); give the user of DATABASE_URL its own database (CREATE DATABASE mcpcord OWNER that_user), or grant it the rights on it"
    )
}

/// A refusal to write, with what to do (other failures as they are).
pub(super) fn explain(error: StoreError) -> StoreError {
    match error {
        StoreError::NotWritable(message) => StoreError::NotWritable(not_writable(&message)),
        other => other,
    }
}

/// Sorts a database failure by its SQLSTATE, not by its wording.
pub(super) fn classify(error: &sqlx::Error) -> StoreError {
    let message = error.to_string();
    let state = match error {
        sqlx::Error::Database(e) => e.code().map(|c| c.into_owned()),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            return StoreError::Unreachable(message);
        }
        _ => None,
    };
    let Some(state) = state else {
        return StoreError::Failed(message);
    };
    match state.as_str() {
        // Serialization failure, deadlock, a lock not available.
        "40001" | "40P01" | "55P03" => StoreError::Busy(message),
        // Shutting down, starting, or out of connections.
        "57P01" | "57P02" | "57P03" | "53300" => StoreError::Unreachable(message),
        "53100" => StoreError::Full(message),
        // Insufficient privilege, a read-only transaction (a standby).
        "42501" | "25006" => StoreError::NotWritable(message),
        state if state.starts_with("08") => StoreError::Unreachable(message),
        _ => StoreError::Failed(message),
    }
}
