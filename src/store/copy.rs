//! `mcpcord migrate-db`: copies an installation's SQLite database into an
//! empty PostgreSQL one, table by table in one transaction, with the ids
//! kept (messages are ordered by them) and each value converted to the
//! type of its PostgreSQL column.

use sqlx::postgres::PgArguments;
use sqlx::{Arguments, Row, SqliteConnection};

use super::{Backend, SqlStore, redacted};
use crate::conversation::StoreError;

/// The tables, parents first.
const TABLES: [&str; 9] = [
    "conversations",
    "messages",
    "discord_threads",
    "inbox",
    "instance",
    "unbilled",
    "mcp_tasks",
    "oauth_credentials",
    "guild_budgets",
];

/// Rows inserted per statement (PostgreSQL takes at most 65,535 parameters).
const ROWS_PER_INSERT: usize = 500;

/// How many rows of each table were copied.
pub type Copied = Vec<(&'static str, u64)>;

/// Copies the SQLite database at `from` into the PostgreSQL database at
/// `to`, which must hold no conversations yet. Both are brought up to date
/// first. Nothing is written to `to` unless all of it is copied.
pub async fn copy_sqlite_to_postgres(from: &str, to: &str) -> Result<Copied, StoreError> {
    if Backend::of(from) != Backend::Sqlite || Backend::of(to) != Backend::Postgres {
        return Err(StoreError::Open(
            "migrate-db copies a SQLite database (--from sqlite://…) into a PostgreSQL one (--to postgres://…)".into(),
        ));
    }
    let source = SqlStore::open(from).await?;
    let target = SqlStore::open(to).await;
    let copied = match &target {
        Ok(target) => copy(&source, target, to).await,
        Err(error) => Err(error.clone()),
    };
    source.close().await;
    if let Ok(target) = &target {
        target.close().await;
    }
    copied
}

async fn copy(source: &SqlStore, target: &SqlStore, to: &str) -> Result<Copied, StoreError> {
    let (super::Pools::Sqlite(from), super::Pools::Postgres(into)) = (&source.pool, &target.pool)
    else {
        unreachable!("the backends were checked");
    };
    let mut reader = from.acquire().await.map_err(|e| source.db(e))?;
    let mut tx = into.begin().await.map_err(|e| target.db(e))?;
    let (present,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM conversations")
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| target.db(e))?;
    if present > 0 {
        return Err(StoreError::Failed(format!(
            "{} already holds {present} conversations; migrate-db copies into an empty database only (make a new one, or drop its tables)",
            redacted(to)
        )));
    }
    let mut copied = Vec::new();
    for table in TABLES {
        let columns = target_columns(&mut tx, table)
            .await
            .map_err(|e| target.db(e))?;
        let names = columns
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut count = 0;
        let mut after = i64::MIN;
        loop {
            let (last, chunk) = read(&mut reader, table, &names, &columns, after)
                .await
                .map_err(|e| source.db(e))?;
            let Some(last) = last else { break };
            after = last;
            count += chunk.len() as u64;
            let mut arguments = PgArguments::default();
            let mut groups = Vec::with_capacity(chunk.len());
            let mut n = 0;
            for row in &chunk {
                let mut group = Vec::with_capacity(row.len());
                for value in row {
                    value.bind(&mut arguments).map_err(StoreError::Failed)?;
                    n += 1;
                    group.push(format!("${n}"));
                }
                groups.push(format!("({})", group.join(", ")));
            }
            let statement = format!(
                "INSERT INTO {table} ({names}) OVERRIDING SYSTEM VALUE VALUES {}",
                groups.join(", ")
            );
            sqlx::query_with(sqlx::AssertSqlSafe(statement), arguments)
                .execute(&mut *tx)
                .await
                .map_err(|e| target.db(e))?;
        }
        copied.push((table, count));
    }
    // New messages are numbered after the copied ones.
    sqlx::query(
        "SELECT setval(pg_get_serial_sequence('messages', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM messages",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| target.db(e))?;
    tx.commit().await.map_err(|e| target.db(e))?;
    Ok(copied)
}

/// One value on its way to a PostgreSQL column.
#[derive(Debug)]
enum Value {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Flag(Option<bool>),
}

impl Value {
    fn bind(&self, arguments: &mut PgArguments) -> Result<(), String> {
        let bound = match self {
            Value::Int(v) => arguments.add(*v),
            Value::Real(v) => arguments.add(*v),
            Value::Text(v) => arguments.add(v.clone()),
            Value::Flag(v) => arguments.add(*v),
        };
        bound.map_err(|e| e.to_string())
    }
}

/// The columns of `table` in PostgreSQL that take a value (not those it
/// makes itself), with their types.
async fn target_columns(
    tx: &mut sqlx::PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1 AND is_identity = 'NO'
            OR table_schema = current_schema() AND table_name = $1 AND identity_generation = 'BY DEFAULT'
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(tx)
    .await
}

/// The next rows of `table` in SQLite after the row id `after` (at most
/// [`ROWS_PER_INSERT`]), as the values of `columns` (named `names`), with
/// the last row's id; `None` when no row is left.
async fn read(
    reader: &mut SqliteConnection,
    table: &str,
    names: &str,
    columns: &[(String, String)],
    after: i64,
) -> Result<(Option<i64>, Vec<Vec<Value>>), sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT rowid, {names} FROM {table} WHERE rowid > $1 ORDER BY rowid LIMIT {ROWS_PER_INSERT}"
    )))
    .bind(after)
    .fetch_all(reader)
    .await?;
    let last = match rows.last() {
        Some(row) => Some(row.try_get::<i64, _>(0)?),
        None => None,
    };
    let values = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .enumerate()
                .map(|(i, (_, kind))| {
                    let i = i + 1;
                    Ok(match kind.as_str() {
                        "bigint" | "integer" | "smallint" => Value::Int(row.try_get(i)?),
                        "double precision" | "real" => Value::Real(row.try_get(i)?),
                        "boolean" => Value::Flag(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0)),
                        // PostgreSQL's text cannot hold NUL characters.
                        _ => Value::Text(
                            row.try_get::<Option<String>, _>(i)?
                                .map(|t| super::without_nul(&t)),
                        ),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        })
        .collect::<Result<_, _>>()?;
    Ok((last, values))
}
