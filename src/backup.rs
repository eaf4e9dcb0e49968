//! `mcpcord backup`, `restore` and `export`: a consistent copy of the
//! database while the bot runs, putting one back while nothing uses it, and
//! one conversation as Markdown or JSON.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::conversation::{Message, Role, Store};
use crate::store::{Backend, Copied, SqlStore, copy_sqlite_to_postgres, database_file};

/// Writes a copy of the database at `url` to `to` (SQLite's `VACUUM
/// INTO`: one consistent snapshot, taken while the bot goes on writing).
pub async fn backup(url: &str, to: &Path) -> anyhow::Result<u64> {
    server_tools(url)?;
    if to.exists() {
        bail!(
            "{} exists already; give the backup a new name (it is never overwritten)",
            to.display()
        );
    }
    let store = SqlStore::open(url).await?;
    let copied = store.copy_into(to).await;
    store.close().await;
    copied.with_context(|| format!("the backup to {} failed", to.display()))?;
    // It holds OAuth tokens: only its owner reads it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600))?;
    Ok(std::fs::metadata(to).map(|m| m.len()).unwrap_or(0))
}

/// Puts the backup at `from` in place of the database at `url`, when no
/// mcpcord uses it; the database it replaces is kept beside it. Returns
/// where the old one went.
pub async fn restore(url: &str, from: &Path) -> anyhow::Result<Option<PathBuf>> {
    server_tools(url)?;
    let Some(target) = database_file(url) else {
        bail!("DATABASE_URL {url:?} is not a database file");
    };
    crate::store::check_backup(from)
        .await
        .with_context(|| format!("{} is not a usable mcpcord backup", from.display()))?;
    // Held until the swap is done.
    let _exclusive = unused(&target, "restore")?;
    let staged = sibling(&target, "restoring");
    std::fs::copy(from, &staged)
        .with_context(|| format!("cannot copy {} beside the database", from.display()))?;
    std::fs::File::open(&staged)?.sync_all()?;
    let kept = if target.exists() {
        let kept = sibling(
            &target,
            &format!(
                "before-restore-{}",
                crate::conversation::billing::unix_now()
            ),
        );
        std::fs::rename(&target, &kept)
            .with_context(|| format!("cannot move the current database to {}", kept.display()))?;
        Some(kept)
    } else {
        None
    };
    // The old database's journal would be replayed into the new one.
    for suffix in ["-wal", "-shm"] {
        let journal = PathBuf::from(format!("{}{suffix}", target.display()));
        if journal.exists() {
            if let Some(kept) = &kept {
                let _ = std::fs::rename(&journal, format!("{}{suffix}", kept.display()));
            } else {
                let _ = std::fs::remove_file(&journal);
            }
        }
    }
    std::fs::rename(&staged, &target)
        .with_context(|| format!("cannot put the backup in place at {}", target.display()))?;
    Ok(kept)
}

/// Refuses a PostgreSQL database: its own tools back it up consistently,
/// and mcpcord's would only copy what it knows of.
fn server_tools(url: &str) -> anyhow::Result<()> {
    if Backend::of(url) == Backend::Postgres {
        bail!(
            "DATABASE_URL names a PostgreSQL database: back it up with pg_dump (pg_dump --format=custom --file=mcpcord.dump \"$DATABASE_URL\") and restore it with pg_restore (pg_restore --clean --dbname=\"$DATABASE_URL\" mcpcord.dump) while the bots are stopped"
        );
    }
    Ok(())
}

/// The database file at `path` locked for this process alone (`None` when
/// there is no file yet), or why not: a bot that holds the database (even
/// a chat) keeps its shared lock, and this one cannot be taken.
fn unused(path: &Path, then: &str) -> anyhow::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(file) => match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is in use by a running mcpcord (the bot, a chat or a check): stop it first, then {then}",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).context(format!("cannot lock {}", path.display()))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context(format!("cannot open {}", path.display())),
    }
}

/// Copies the SQLite database at `from` into the empty PostgreSQL one at
/// `to` (`mcpcord migrate-db`), while no mcpcord uses `from`.
pub async fn migrate_db(from: &str, to: &str) -> anyhow::Result<Copied> {
    let Some(file) = database_file(from) else {
        bail!("--from {from:?} is not a SQLite database file");
    };
    if !file.is_file() {
        bail!("--from: {} does not exist", file.display());
    }
    // Writes after the copy would be lost: nothing may use it meanwhile.
    let held = unused(&file, "migrate")?;
    drop(held);
    Ok(copy_sqlite_to_postgres(from, to).await?)
}

/// `path` with `.{what}` after its name.
fn sibling(path: &Path, what: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}"));
    path.with_file_name(name)
}

/// How `export` writes a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Markdown,
    Json,
}

/// The stored key of what a person calls a conversation: a key as it is
/// (`discord:…`, `terminal:…`), a Discord thread or channel id, or a
/// terminal conversation's name.
pub fn conversation_key(name: &str) -> String {
    if name.contains(':') {
        name.to_owned()
    } else if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        format!("discord:{name}")
    } else {
        crate::terminal::conversation_key(name)
    }
}

/// Writes the conversation `name` (as the model sees it, tool calls and
/// results included) to `out`.
pub async fn export(
    url: &str,
    name: &str,
    format: Format,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let key = conversation_key(name);
    let store = SqlStore::open(url).await?;
    let history = store.history(&key).await;
    store.close().await;
    let history = history?;
    if history.is_empty() {
        bail!(
            "the conversation {key} has no messages (give a Discord thread id, `discord:ID`, or a terminal conversation's name)"
        );
    }
    match format {
        Format::Json => {
            let messages: Vec<Value> = history.iter().map(message_json).collect();
            serde_json::to_writer_pretty(
                &mut *out,
                &json!({"conversation": key, "messages": messages}),
            )?;
            writeln!(out)?;
        }
        Format::Markdown => write_markdown(&key, &history, out)?,
    }
    Ok(history.len())
}

fn message_json(message: &Message) -> Value {
    let mut value = json!({
        "role": role(message),
        "content": message.content,
    });
    if let Some(author) = &message.author {
        value["author"] = json!({"id": author.id.to_string(), "name": author.name});
    }
    if !message.tool_calls.is_empty() {
        value["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
            .collect();
    }
    if let Some(id) = &message.tool_call_id {
        value["tool_call_id"] = json!(id);
    }
    if let Some(model) = &message.model {
        value["model"] = json!(model);
    }
    if let Some(usage) = &message.usage {
        value["usage"] = json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "cost": usage.cost});
    }
    if !message.images.is_empty() {
        value["images"] = json!(message.images.len());
    }
    if message.stopped {
        value["stopped"] = json!(true);
    }
    value
}

fn role(message: &Message) -> &'static str {
    match message.role() {
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn write_markdown(key: &str, history: &[Message], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "# Conversation {key}\n")?;
    for message in history {
        match message.role() {
            Role::User => {
                let who = message
                    .author
                    .as_ref()
                    .map_or("You".to_owned(), |a| a.name.clone());
                writeln!(out, "**{who}:**\n")?;
                writeln!(out, "{}\n", message.text())?;
                if !message.images.is_empty() {
                    writeln!(out, "_({} image(s) attached)_\n", message.images.len())?;
                }
            }
            Role::Assistant => {
                let model = message
                    .model
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default();
                if !message.text().is_empty() {
                    writeln!(out, "**Assistant{model}:**\n")?;
                    writeln!(out, "{}\n", message.text())?;
                    if message.stopped {
                        writeln!(out, "_(stopped)_\n")?;
                    }
                }
                for call in &message.tool_calls {
                    writeln!(
                        out,
                        "🔧 `{}` {}\n",
                        call.name,
                        fenced_inline(&call.arguments)
                    )?;
                }
            }
            Role::Tool => {
                writeln!(out, "{}\n", fenced(message.text()))?;
            }
        }
    }
    Ok(())
}

/// `text` in a code block whose fence no line of it can close.
fn fenced(text: &str) -> String {
    let longest = longest_run(text, '`');
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}\n{text}\n{fence}")
}

/// `text` as inline code that its own backticks cannot end.
fn fenced_inline(text: &str) -> String {
    let ticks = "`".repeat(longest_run(text, '`') + 1);
    format!("{ticks} {text} {ticks}")
}

fn longest_run(text: &str, c: char) -> usize {
    let mut longest = 0;
    let mut run = 0;
    for ch in text.chars() {
        run = if ch == c { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_keys() {
        assert_eq!(conversation_key("1234"), "discord:1234");
        assert_eq!(conversation_key("discord:1"), "discord:1");
        assert_eq!(conversation_key("notes"), "terminal:notes");
    }

    #[test]
    fn fences_are_longer_than_what_they_hold() {
        assert_eq!(fenced("a ``` b"), "````\na ``` b\n````");
        assert_eq!(fenced("plain"), "```\nplain\n```");
        assert_eq!(fenced_inline("{\"a\":\"`\"}"), "`` {\"a\":\"`\"} ``");
    }
}
