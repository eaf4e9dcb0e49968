//! Background tasks in Discord: `/tasks` lists a thread's, `/tasks
//! cancel:` cancels one (its starter or an admin), and a finished one is
//! posted in its thread and queued as its starter's input there.

use std::sync::Weak;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::Bot;
use super::inbound::channel_of;
use super::protocol::{MAX_CHOICE_CHARS, MAX_CHOICES, command};
use crate::conversation::tasks::result_input;
use crate::conversation::{Accepted, Inbound, TaskRecord, TaskSink, ToolOutcome};

/// The command, as registered.
pub fn definition() -> Value {
    json!({"name": "tasks", "description": "The tool calls running in the background here", "type": command::CHAT_INPUT,
        "options": [{"name": "cancel", "description": "Cancel this task", "type": command::STRING_OPTION,
                     "required": false, "autocomplete": true}]})
}

/// `/tasks`, or with `cancel`, cancels that task (its starter or an admin).
pub async fn reply(
    bot: &Bot,
    conversation: &str,
    user: u64,
    admin: bool,
    cancel: Option<&str>,
) -> anyhow::Result<String> {
    let tasks = bot.surface.engine.tasks();
    let Some(wanted) = cancel else {
        let running = tasks.running(conversation);
        if running.is_empty() {
            return Ok("No tool call runs in the background here.".into());
        }
        let lines: Vec<String> = running.iter().map(line).collect();
        return Ok(format!(
            "Running in the background here:\n{}",
            lines.join("\n")
        ));
    };
    let refused = |why: String| anyhow::anyhow!("{}", capitalised(&why));
    let record = tasks.find(conversation, wanted.trim()).map_err(refused)?;
    let starter = record.author.as_ref().map(|a| a.id);
    if !admin && starter != Some(user) {
        anyhow::bail!("Only whoever started this task (or an admin) can cancel it.");
    }
    tasks.cancel(&record).await.map_err(refused)?;
    Ok(format!(
        "🛑 Cancelled the background task `{}` of {}.",
        record.ticket.task_id,
        tool_name(&record)
    ))
}

/// The tasks of `conversation` matching `typed`, for autocomplete.
pub fn choices(bot: &Bot, conversation: &str, typed: &str) -> Vec<Value> {
    let typed = typed.to_lowercase();
    bot.surface
        .engine
        .tasks()
        .running(conversation)
        .iter()
        .filter(|r| {
            r.ticket.task_id.to_lowercase().contains(&typed)
                || r.ticket.tool.to_lowercase().contains(&typed)
        })
        .filter(|r| r.ticket.task_id.chars().count() <= MAX_CHOICE_CHARS)
        .take(MAX_CHOICES)
        .map(|r| {
            let (server, tool) = parts(r);
            let name: String = format!("{server} › {tool} ({})", r.ticket.task_id)
                .chars()
                .take(MAX_CHOICE_CHARS)
                .collect();
            json!({"name": name, "value": r.ticket.task_id})
        })
        .collect()
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), chars.as_str()),
        None => String::new(),
    }
}

/// The server and the tool's own name.
fn parts(record: &TaskRecord) -> (&str, &str) {
    let ticket = &record.ticket;
    let tool = ticket
        .tool
        .strip_prefix(&ticket.server)
        .and_then(|rest| rest.strip_prefix("__"))
        .unwrap_or(&ticket.tool);
    (&ticket.server, tool)
}

/// `server › tool`, in Markdown.
fn tool_name(record: &TaskRecord) -> String {
    let (server, tool) = parts(record);
    format!("**{server}** › `{tool}`")
}

fn line(record: &TaskRecord) -> String {
    let mut line = format!(
        "• `{}`: {}, started <t:{}:R>",
        record.ticket.task_id,
        tool_name(record),
        record.started_at
    );
    if let Some(author) = &record.author {
        line.push_str(&format!(" by <@{}>", author.id));
    }
    if let Some(message) = &record.message {
        let message: String = message.chars().take(200).collect();
        line.push_str(&format!(": {message}"));
    }
    line
}

/// Posts finished background tasks in their threads and queues their
/// results as their starters' inputs.
pub struct Delivery(pub Weak<Bot>);

#[async_trait]
impl TaskSink for Delivery {
    async fn deliver(&self, task: &TaskRecord, outcome: &ToolOutcome) -> Result<(), String> {
        let bot = self.0.upgrade().ok_or("the bot is stopping")?;
        let Some(channel) = channel_of(&task.conversation) else {
            return Err(format!(
                "{} is not a Discord conversation",
                task.conversation
            ));
        };
        let (mark, how) = if outcome.is_error {
            ("❌", "ended without a result")
        } else {
            ("📬", "finished; the answer follows")
        };
        let content = format!(
            "{mark} The background task `{}` of {} {how}.",
            task.ticket.task_id,
            tool_name(task)
        );
        let posted = bot
            .surface
            .rest
            .create_message(
                channel,
                json!({"content": content, "allowed_mentions": {"parse": []}}),
            )
            .await
            .map_err(|e| e.to_string())?;
        let (author, author_name) = task
            .author
            .as_ref()
            .map(|a| (a.id, a.name.clone()))
            .unwrap_or_default();
        let input = Inbound {
            position: posted,
            author,
            author_name,
            text: result_input(task, outcome),
            ..Default::default()
        };
        match bot.workers.accept(&task.conversation, input).await {
            Ok(Accepted::Queued | Accepted::Duplicate | Accepted::Kept) => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn takes(&self, conversation: &str) -> bool {
        let (Some(channel), Some(bot)) = (channel_of(conversation), self.0.upgrade()) else {
            return false;
        };
        // Of several processes, the one whose shard gets the thread's events.
        match bot.surface.config.shards {
            None => true,
            Some(shards) => {
                let guild = super::budgets::guild_of(&bot.surface, conversation, channel).await;
                shards.serves(guild)
            }
        }
    }
}
