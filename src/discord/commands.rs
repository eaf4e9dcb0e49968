//! Slash commands (/reset, /stop, /retry, /undo, /model, /system,
//! /reasoning, /tools, /usage, /reload; /prompt and /resource are in `picks`,
//! /tasks in `tasks`)
//! and /model's autocomplete. None of them waits for a running turn
//! (/reset and /undo stop it, then wait for it to end).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use serenity::all::{CommandDataOptionValue, CommandInteraction};

use super::access::Place;
use super::inbound::{channel_of, conversation_of};
use super::protocol::{MAX_CHOICE_CHARS, MAX_CHOICES, THREAD_CHANNEL_TYPES, command, response};
use super::render::MAX_MESSAGE_CHARS;
use super::rest::RestError;
use super::{Bot, budgets, controls, picks, servers, tasks};
use crate::conversation::{ReasoningEffort, UsageTotals};

/// The commands, as registered with Discord.
pub fn definitions() -> Value {
    json!([
        {"name": "reset", "description": "Start this conversation over", "type": command::CHAT_INPUT},
        {"name": "stop", "description": "Stop the answer being written here", "type": command::CHAT_INPUT},
        {"name": "retry", "description": "Answer the last message again", "type": command::CHAT_INPUT},
        {"name": "undo", "description": "Take the last message and its answer out of this conversation", "type": command::CHAT_INPUT},
        {"name": "model", "description": "Show or change this conversation's model", "type": command::CHAT_INPUT,
         "options": [{"name": "model", "description": "A model that supports tools", "type": command::STRING_OPTION,
                      "required": false, "autocomplete": true}]},
        {"name": "system", "description": "Show, set or clear the system prompt here (in a channel: for new threads)", "type": command::CHAT_INPUT,
         "options": [
            {"name": "prompt", "description": "The new prompt; {date}, {time}, {weekday}, {channel} and {server} are filled in", "type": command::STRING_OPTION,
             "required": false, "max_length": MAX_PROMPT_CHARS},
            {"name": "clear", "description": "Go back to the default prompt", "type": command::BOOLEAN_OPTION, "required": false}
         ]},
        {"name": "reasoning", "description": "Show or set how hard this conversation's model thinks", "type": command::CHAT_INPUT,
         "options": [{"name": "effort", "description": "default goes back to REASONING_EFFORT", "type": command::STRING_OPTION,
                      "required": false, "choices": effort_choices()}]},
        {"name": "tools", "description": "The tools available here, and which servers are on", "type": command::CHAT_INPUT},
        {"name": "usage", "description": "Tokens and cost so far, and what is left of the budgets", "type": command::CHAT_INPUT},
        {"name": "budget", "description": "Show or set this server's spending caps in dollars (admins)", "type": command::CHAT_INPUT,
         "options": [
            {"name": "monthly", "description": "Dollars the whole server may spend a month", "type": command::NUMBER_OPTION, "required": false, "min_value": 0},
            {"name": "daily", "description": "Dollars each person may spend a day", "type": command::NUMBER_OPTION, "required": false, "min_value": 0},
            {"name": "reset", "description": "Go back to the bot's defaults", "type": command::BOOLEAN_OPTION, "required": false}
         ]},
        {"name": "reload", "description": "Read the MCP servers file again (admins)", "type": command::CHAT_INPUT},
        picks::definitions()[0],
        picks::definitions()[1],
        tasks::definition()
    ])
}

/// Answers a command: deferred at once (Discord wants an answer within
/// three seconds), then the reply.
pub async fn run(bot: &Bot, command: &CommandInteraction) -> Result<(), RestError> {
    let rest = &bot.surface.rest;
    if matches!(command.data.name.as_str(), "stop" | "retry") {
        return at_once(bot, command).await;
    }
    if command.data.name == "prompt" {
        return picks::prompt(bot, command).await;
    }
    let deferred = json!({"type": response::DEFERRED_MESSAGE});
    rest.respond(command.id.get(), &command.token, deferred)
        .await?;
    let failed = |error: anyhow::Error| json!({"content": truncate(&format!("❌ {error}"))});
    let body = if command.data.name == "tools" {
        match caller(bot, command).await {
            Ok(caller) => servers::listing(bot, &caller.conversation).await,
            Err(error) => failed(error),
        }
    } else {
        match reply(bot, command).await {
            Ok(content) => json!({"content": truncate(&content)}),
            Err(error) => failed(error),
        }
    };
    rest.edit_original(command.application_id.get(), &command.token, body)
        .await
}

/// Who used a command, and where.
pub(super) struct Caller {
    pub conversation: String,
    user: u64,
    guild: Option<u64>,
    admin: bool,
    /// Used in a server's channel (not a thread): `/model` and `/system`
    /// set the defaults of threads started there later.
    pub channel_defaults: bool,
}

/// `/stop` and `/retry`: answered at once, and only to the caller unless
/// they did something.
async fn at_once(bot: &Bot, command: &CommandInteraction) -> Result<(), RestError> {
    let (content, public) = match caller(bot, command).await {
        Ok(caller) if command.data.name == "retry" => {
            let asker = controls::Asker {
                user: caller.user,
                name: command.user.display_name(),
                admin: caller.admin,
            };
            let position = command.id.get();
            match controls::retry(bot, &caller.conversation, None, asker, position).await {
                Ok(outcome) => outcome.reply(caller.user),
                Err(error) => (format!("❌ {error}"), false),
            }
        }
        Ok(caller) => controls::stop(bot, &caller.conversation, None, caller.user, caller.admin)
            .reply(caller.user),
        Err(error) => (format!("❌ {error}"), false),
    };
    let body = super::interaction_answer(&content, public);
    bot.surface
        .rest
        .respond(command.id.get(), &command.token, body)
        .await
}

/// The caller, once they may use the bot here.
pub(super) async fn caller(bot: &Bot, command: &CommandInteraction) -> anyhow::Result<Caller> {
    let surface = &bot.surface;
    let channel = command.channel_id.get();
    let conversation = conversation_of(channel);
    let user = command.user.id.get();
    let roles = super::role_ids(command.member.as_ref().map(|m| m.roles.as_slice()));
    let permissions = command.member.as_ref().and_then(|m| m.permissions);
    let guild = command.guild_id.map(|g| g.get());
    let admin = surface.access.is_admin(user, &roles, permissions);
    // In a thread the channel lists apply to its parent, as for messages.
    let parent = match command.channel.as_ref().and_then(|c| c.parent_id) {
        Some(parent) => Some(parent.get()),
        None => surface.threads.parent(&conversation).await?,
    };
    let place = Place {
        guild,
        channel,
        parent,
        user,
        roles: &roles,
    };
    if !surface.access.allows(&place) && !admin {
        anyhow::bail!("You are not allowed to use this bot here.");
    }
    let thread = command
        .channel
        .as_ref()
        .is_some_and(|c| THREAD_CHANNEL_TYPES.contains(&u64::from(u8::from(c.kind))));
    Ok(Caller {
        conversation,
        user,
        guild,
        admin,
        channel_defaults: guild.is_some() && !thread,
    })
}

async fn reply(bot: &Bot, command: &CommandInteraction) -> anyhow::Result<String> {
    let surface = &bot.surface;
    let Caller {
        conversation,
        guild,
        admin,
        user,
        channel_defaults,
    } = caller(bot, command).await?;
    let here = Scope { channel_defaults };
    match command.data.name.as_str() {
        "undo" => {
            let asker = controls::Asker {
                user,
                name: command.user.display_name(),
                admin,
            };
            controls::undo(bot, &conversation, asker).await
        }
        "reset" => {
            let stopped = bot.workers.stop_turn(&conversation, None);
            surface.engine.reset(&conversation).await?;
            if let Some(channel) = channel_of(&conversation) {
                surface
                    .answer_rows
                    .clear(&surface.rest, channel, None)
                    .await;
            }
            let mut text = "🧹 This conversation starts over: its history is cleared and its tool sessions are closed.".to_owned();
            if stopped {
                text.push_str(" The answer that was being written was stopped.");
            }
            Ok(text)
        }
        "model" => {
            let wanted = command.data.options.iter().find_map(|o| match &o.value {
                CommandDataOptionValue::String(s) if o.name == "model" => Some(s.clone()),
                _ => None,
            });
            match wanted {
                None => Ok(format!(
                    "{} `{}`.",
                    here.says("use"),
                    surface.engine.model_of(&conversation).await?
                )),
                Some(_) if !admin => {
                    anyhow::bail!(
                        "Only admins (or people with Manage Threads) can change the model."
                    )
                }
                Some(model) => {
                    let model = surface
                        .engine
                        .set_model(&conversation, Some(&model))
                        .await?;
                    Ok(format!("{} `{model}` from now on.", here.says("use")))
                }
            }
        }
        "system" => system(bot, command, &conversation, admin, here).await,
        "resource" => picks::resource(bot, command).await,
        "reload" => {
            if !admin {
                anyhow::bail!(
                    "Only admins (or people with Manage Threads) can reload the MCP file."
                );
            }
            Ok(match surface.mcp_file.reload() {
                Ok(reloaded) => reloaded.to_string(),
                Err(error) => format!(
                    "The MCP file was not reloaded; the servers in use stay as they were.\n{error}"
                ),
            })
        }
        "reasoning" => {
            let wanted = command.data.options.iter().find_map(|o| match &o.value {
                CommandDataOptionValue::String(s) if o.name == "effort" => Some(s.clone()),
                _ => None,
            });
            let engine = &surface.engine;
            let Some(wanted) = wanted else {
                return Ok(match engine.reasoning_of(&conversation).await? {
                    Some(effort) => format!(
                        "This conversation's reasoning effort is `{}`.",
                        effort.as_str()
                    ),
                    None => "This conversation uses the default reasoning effort.".to_owned(),
                });
            };
            if !admin {
                anyhow::bail!(
                    "Only admins (or people with Manage Threads) can change the reasoning effort."
                );
            }
            let effort = match wanted.as_str() {
                "default" => None,
                other => Some(ReasoningEffort::parse(other).ok_or_else(|| {
                    anyhow::anyhow!("{other:?} is not one of minimal, low, medium, high, default.")
                })?),
            };
            engine.set_reasoning(&conversation, effort).await?;
            Ok(match effort {
                Some(effort) => format!(
                    "This conversation's reasoning effort is now `{}` (for models that reason).",
                    effort.as_str()
                ),
                None => {
                    "This conversation uses the default reasoning effort from now on.".to_owned()
                }
            })
        }
        "usage" => {
            let here = surface.threads.usage(&conversation).await?;
            let mut text = format!("This thread: {}", usage_summary(&here));
            if let Some(guild) = guild {
                let server = surface
                    .threads
                    .guild_usage_since(guild, start_of_today())
                    .await?;
                text.push_str(&format!(
                    "\nThis server today (UTC): {}",
                    usage_summary(&server)
                ));
            }
            let spender = budgets::Spender { guild, user };
            for line in budgets::left(surface, spender).await? {
                text.push('\n');
                text.push_str(&line);
            }
            Ok(text)
        }
        "budget" => {
            let number = |name: &str| {
                command.data.options.iter().find_map(|o| match o.value {
                    CommandDataOptionValue::Number(n) if o.name == name => Some(n),
                    _ => None,
                })
            };
            let change = budgets::Change {
                monthly: number("monthly"),
                daily: number("daily"),
                reset: command.data.options.iter().any(|o| {
                    o.name == "reset" && matches!(o.value, CommandDataOptionValue::Boolean(true))
                }),
            };
            budgets::command(surface, guild, user, admin, change).await
        }
        "tasks" => {
            let cancel = command.data.options.iter().find_map(|o| match &o.value {
                CommandDataOptionValue::String(s) if o.name == "cancel" => Some(s.as_str()),
                _ => None,
            });
            tasks::reply(bot, &conversation, user, admin, cancel).await
        }
        other => anyhow::bail!("Unknown command /{other}."),
    }
}

/// What `/model` and `/system` apply to: the conversation, or (in a
/// server's channel) the threads started there later.
#[derive(Debug, Clone, Copy)]
struct Scope {
    channel_defaults: bool,
}

impl Scope {
    /// The subject and `verb`, agreeing.
    fn says(self, verb: &str) -> String {
        if self.channel_defaults {
            format!("New threads in this channel {verb}")
        } else {
            format!("This conversation {verb}s")
        }
    }
}

/// The choices of `/reasoning effort`.
fn effort_choices() -> Value {
    ["minimal", "low", "medium", "high", "default"]
        .map(|c| json!({"name": c, "value": c}))
        .into()
}

/// The longest prompt `/system` takes (Discord's limit on an option).
const MAX_PROMPT_CHARS: usize = 6000;

/// `/system`: shows the prompt in use here, or (admins) sets or clears it.
async fn system(
    bot: &Bot,
    command: &CommandInteraction,
    conversation: &str,
    admin: bool,
    here: Scope,
) -> anyhow::Result<String> {
    let engine = &bot.surface.engine;
    let mut prompt = None;
    let mut clear = false;
    for option in &command.data.options {
        match (&option.value, option.name.as_str()) {
            (CommandDataOptionValue::String(text), "prompt") => {
                prompt = Some(text.trim().to_owned())
            }
            (CommandDataOptionValue::Boolean(yes), "clear") => clear = *yes,
            _ => {}
        }
    }
    if (prompt.is_some() || clear) && !admin {
        anyhow::bail!("Only admins (or people with Manage Threads) can change the system prompt.");
    }
    match (prompt, clear) {
        (Some(_), true) => anyhow::bail!("Give a prompt or clear it, not both."),
        (Some(prompt), false) if prompt.is_empty() => {
            anyhow::bail!("The prompt is empty; use clear to go back to the default.")
        }
        (Some(prompt), false) => {
            engine
                .set_system_prompt(conversation, Some(&prompt))
                .await?;
            Ok(format!(
                "{} this system prompt from now on:\n{}",
                here.says("follow"),
                quoted(&prompt)
            ))
        }
        (None, true) => {
            engine.set_system_prompt(conversation, None).await?;
            Ok(format!(
                "{} the default system prompt from now on.",
                here.says("follow")
            ))
        }
        (None, false) => {
            let own = engine.has_own_prompt(conversation).await?;
            Ok(match engine.system_prompt_of(conversation).await? {
                Some(prompt) if own => format!("The system prompt here:\n{}", quoted(&prompt)),
                Some(prompt) => format!(
                    "The default system prompt is used here:\n{}",
                    quoted(&prompt)
                ),
                None => "No system prompt is used here.".to_owned(),
            })
        }
    }
}

/// Text shown as a quote block.
fn quoted(text: &str) -> String {
    text.lines()
        .map(|l| format!("> {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Models that support tools, matching what was typed, from the cached
/// catalogue (autocomplete has no deferred answer).
pub async fn autocomplete(bot: &Bot, command: &CommandInteraction) -> Result<(), RestError> {
    if command.data.name != "model" {
        let choices = if command.data.name == "tasks" {
            let typed = command
                .data
                .autocomplete()
                .map(|o| o.value)
                .unwrap_or_default();
            match caller(bot, command).await {
                Ok(caller) => tasks::choices(bot, &caller.conversation, typed),
                Err(_) => Vec::new(),
            }
        } else {
            picks::autocomplete(bot, command).await
        };
        let body = json!({"type": response::AUTOCOMPLETE, "data": {"choices": choices}});
        return bot
            .surface
            .rest
            .respond(command.id.get(), &command.token, body)
            .await;
    }
    let typed = command
        .data
        .autocomplete()
        .map(|o| o.value.to_lowercase())
        .unwrap_or_default();
    let models = bot.surface.model.models().await;
    let choices: Vec<Value> = choices(
        models
            .iter()
            .filter(|m| m.supports_tools != Some(false))
            .map(|m| m.id.as_str()),
        &typed,
    )
    .into_iter()
    .map(|id| json!({"name": id, "value": id}))
    .collect();
    let body = json!({"type": response::AUTOCOMPLETE, "data": {"choices": choices}});
    bot.surface
        .rest
        .respond(command.id.get(), &command.token, body)
        .await
}

/// The ids containing `typed`, sorted, as many as Discord shows.
fn choices<'a>(ids: impl Iterator<Item = &'a str>, typed: &str) -> Vec<&'a str> {
    let mut found: Vec<&str> = ids
        .filter(|id| id.chars().count() <= MAX_CHOICE_CHARS && id.to_lowercase().contains(typed))
        .collect();
    found.sort_unstable();
    found.truncate(MAX_CHOICES);
    found
}

/// Responses, tokens (with the share read from the provider's prompt
/// cache) and cost, in one sentence.
fn usage_summary(usage: &UsageTotals) -> String {
    let mut cache = format!("{}% read from cache", usage.cached_percent());
    if usage.cache_write_tokens > 0 {
        cache.push_str(&format!(", {} written to it", usage.cache_write_tokens));
    }
    format!(
        "{} responses, {} prompt tokens ({cache}) + {} completion tokens, ${:.4}.",
        usage.responses, usage.prompt_tokens, usage.completion_tokens, usage.cost
    )
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    format!("{cut}…")
}

fn start_of_today() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now - now % 86_400
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_match_anywhere_sorted_and_capped() {
        let ids: Vec<String> = (0..40).map(|i| format!("vendor/model-{i:02}")).collect();
        let long = format!("x/{}", "m".repeat(120));
        let all = ids
            .iter()
            .map(String::as_str)
            .chain([long.as_str(), "other/Thing"]);
        let found = choices(all.clone(), "model-1");
        assert_eq!(found.len(), 10);
        assert_eq!(found[0], "vendor/model-10");
        assert_eq!(choices(all.clone(), "").len(), MAX_CHOICES);
        assert_eq!(choices(all.clone(), "thing"), ["other/Thing"]);
        assert!(
            choices(all, "mmmm").is_empty(),
            "ids too long to offer are left out"
        );
    }

    #[test]
    fn usage_names_the_cached_share_and_cost() {
        let usage = UsageTotals {
            prompt_tokens: 2000,
            completion_tokens: 50,
            cost: 0.01234,
            responses: 3,
            cached_tokens: 1500,
            cache_write_tokens: 400,
        };
        assert_eq!(
            usage_summary(&usage),
            "3 responses, 2000 prompt tokens (75% read from cache, 400 written to it) + 50 completion tokens, $0.0123."
        );
        let cold = UsageTotals {
            cache_write_tokens: 0,
            cached_tokens: 0,
            ..usage
        };
        assert!(usage_summary(&cold).contains("(0% read from cache)"));
    }

    #[test]
    fn long_replies_are_cut_under_the_limit() {
        assert_eq!(truncate("short"), "short");
        let cut = truncate(&"x".repeat(3000));
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS);
        assert!(cut.ends_with('…'));
    }
}
