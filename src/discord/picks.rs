//! `/prompt` and `/resource`: what the tool servers offer, picked by
//! people. A prompt with arguments opens a modal for them (unless they are
//! given as `key=value` words); its messages become the person's turn in
//! the thread. A resource is attached to the thread as a file, or added to
//! the conversation as the person's turn. Both autocomplete from the
//! servers on in the thread.

use std::time::Duration;

use serde_json::{Value, json};
use serenity::all::{CommandInteraction, ModalInteraction};

use super::commands::caller;
use super::inbound::conversation_of;
use super::protocol::{MAX_CHOICE_CHARS, MAX_CHOICES, command, response};
use super::rest::{Attachment, RestError};
use super::{Bot, ephemeral};
use crate::conversation::offers::{PromptInfo, ResourceBody, parse_arguments};
use crate::conversation::{Accepted, Inbound};

/// Custom ids of a prompt's modal: `prompt:KEY`.
pub const MODAL_PREFIX: &str = "prompt:";
/// Inputs one modal holds.
const MODAL_INPUTS: usize = 5;
/// How long deciding between a modal and an answer may take: Discord
/// wants the first answer to an interaction within three seconds.
const DECIDE_WITHIN: Duration = Duration::from_millis(2500);
/// A modal, as an interaction response.
const MODAL: u8 = 9;

/// The command definitions.
pub fn definitions() -> [Value; 2] {
    [
        json!({"name": "prompt", "description": "Use a prompt a tool server offers; its text becomes your message", "type": command::CHAT_INPUT,
        "options": [
            {"name": "name", "description": "The prompt", "type": command::STRING_OPTION, "required": true, "autocomplete": true},
            {"name": "arguments", "description": "key=value words (a modal asks for them otherwise)", "type": command::STRING_OPTION,
             "required": false, "autocomplete": true}
        ]}),
        json!({"name": "resource", "description": "Read a resource a tool server offers", "type": command::CHAT_INPUT,
        "options": [
            {"name": "uri", "description": "The resource (fill in a template's {…})", "type": command::STRING_OPTION, "required": true, "autocomplete": true},
            {"name": "to", "description": "Attach it here as a file, or add it to the conversation", "type": command::STRING_OPTION,
             "required": false, "choices": [{"name": "the conversation", "value": "conversation"}, {"name": "a file in the thread", "value": "file"}]},
            {"name": "question", "description": "What to ask about it (when added to the conversation)", "type": command::STRING_OPTION, "required": false}
        ]}),
    ]
}

/// A string option of `command`.
fn option<'a>(command: &'a CommandInteraction, name: &str) -> Option<&'a str> {
    command
        .data
        .options
        .iter()
        .find(|o| o.name == name)
        .and_then(|o| o.value.as_str())
}

fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars.saturating_sub(1)) {
        Some((at, _)) if text.chars().count() > chars => format!("{}…", &text[..at]),
        _ => text.to_owned(),
    }
}

/// Queues `text` as `user`'s turn at `position` (the interaction's id).
async fn queue(
    bot: &Bot,
    conversation: &str,
    position: u64,
    user: &serenity::all::User,
    text: String,
) -> anyhow::Result<()> {
    let input = Inbound {
        position,
        author: user.id.get(),
        author_name: user.display_name().to_owned(),
        text,
        ..Default::default()
    };
    match bot.workers.accept(conversation, input).await? {
        Accepted::Queued | Accepted::Duplicate => Ok(()),
        Accepted::Kept => anyhow::bail!(
            "The bot is restarting; this is kept and will be answered when it is back."
        ),
    }
}

/// Lists the prompts and resources of `conversation` in a task of its own:
/// a caller that stops waiting (Discord's three seconds) does not stop the
/// servers starting, so the next try finds them ready.
fn warm(bot: &Bot, conversation: &str) -> tokio::task::JoinHandle<()> {
    let engine = bot.surface.engine.clone();
    let conversation = conversation.to_owned();
    tokio::spawn(async move {
        let _ = engine.prompts(&conversation).await;
        let _ = engine.resources(&conversation).await;
    })
}

/// `/prompt`: a modal for its arguments, or (given as words, or none
/// needed) its text queued as the caller's turn.
pub async fn prompt(bot: &Bot, command: &CommandInteraction) -> Result<(), RestError> {
    let rest = &bot.surface.rest;
    let key = option(command, "name").unwrap_or_default().to_owned();
    let words = option(command, "arguments").map(str::to_owned);
    let conversation = conversation_of(command.channel_id.get());
    let found = match caller(bot, command).await {
        Ok(caller) if caller.channel_defaults => {
            Err("Use /prompt in a thread of the bot (mention it to start one).".to_owned())
        }
        Ok(_) => {
            let warm = warm(bot, &conversation);
            let looked_up = async {
                let _ = warm.await;
                bot.surface.engine.prompt(&conversation, &key).await
            };
            match tokio::time::timeout(DECIDE_WITHIN, looked_up).await {
                Ok(found) => found.map_err(|e| format!("❌ {}.", capitalised(&e))),
                Err(_) => Err("❌ The tool servers took too long to list their prompts; try again in a moment.".into()),
            }
        }
        Err(error) => Err(format!("❌ {error}")),
    };
    let prompt = match found {
        Ok(prompt) => prompt,
        Err(refusal) => {
            let refusal = cut(&refusal, 1900);
            return rest
                .respond(command.id.get(), &command.token, ephemeral(&refusal))
                .await;
        }
    };
    let fits_modal = prompt.arguments.len() <= MODAL_INPUTS
        && format!("{MODAL_PREFIX}{}", prompt.key()).len() <= 100
        && prompt.arguments.iter().all(|a| a.name.len() <= 100);
    if words.is_none() && !prompt.arguments.is_empty() && !fits_modal {
        let names: Vec<&str> = prompt.arguments.iter().map(|a| a.name.as_str()).collect();
        let said = format!(
            "❌ This prompt's arguments do not fit a form; give them in `arguments:` as key=value words ({}).",
            cut(&names.join(", "), 1500)
        );
        return rest
            .respond(command.id.get(), &command.token, ephemeral(&said))
            .await;
    }
    if words.is_none() && !prompt.arguments.is_empty() {
        let body = modal(&prompt);
        return rest.respond(command.id.get(), &command.token, body).await;
    }
    let deferred = json!({"type": response::DEFERRED_MESSAGE});
    rest.respond(command.id.get(), &command.token, deferred)
        .await?;
    let arguments = match parse_arguments(words.as_deref().unwrap_or_default()) {
        Ok(arguments) => arguments,
        Err(problem) => {
            let body = json!({"content": format!("❌ The arguments: {problem}.")});
            return rest
                .edit_original(command.application_id.get(), &command.token, body)
                .await;
        }
    };
    let said = use_prompt(
        bot,
        &conversation,
        command.id.get(),
        &command.user,
        &prompt,
        &arguments,
    )
    .await;
    let body = json!({"content": said, "allowed_mentions": {"parse": []}});
    rest.edit_original(command.application_id.get(), &command.token, body)
        .await
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Fills `prompt` in and queues it; the sentence to answer with.
async fn use_prompt(
    bot: &Bot,
    conversation: &str,
    position: u64,
    user: &serenity::all::User,
    prompt: &PromptInfo,
    arguments: &[(String, String)],
) -> String {
    let engine = &bot.surface.engine;
    let text = match engine
        .fill_prompt(conversation, &prompt.key(), arguments)
        .await
    {
        Ok(text) => text,
        Err(problem) => return format!("❌ {}.", capitalised(&problem)),
    };
    if let Err(error) = queue(bot, conversation, position, user, text).await {
        return format!("❌ {error}");
    }
    let given: Vec<String> = arguments
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", cut(v, 60)))
        .collect();
    let mut said = format!(
        "📝 <@{}> used the prompt **{}** of {}",
        user.id.get(),
        prompt.title.replace('*', ""),
        prompt.server
    );
    if !given.is_empty() {
        said.push_str(&format!(": {}", given.join(", ")));
    }
    said
}

/// The modal asking for a prompt's arguments (required ones first; the
/// first five).
fn modal(prompt: &PromptInfo) -> Value {
    let mut arguments: Vec<_> = prompt
        .arguments
        .iter()
        .filter(|a| a.name.len() <= 100)
        .collect();
    arguments.sort_by_key(|a| !a.required);
    let rows: Vec<Value> = arguments
        .into_iter()
        .take(MODAL_INPUTS)
        .map(|a| {
            let placeholder = a.description.as_deref().unwrap_or(&a.title);
            json!({"type": 1, "components": [{"type": 4, "custom_id": cut(&a.name, 100),
                "label": cut(&a.title, 45), "style": 1, "required": a.required,
                "placeholder": cut(placeholder, 100)}]})
        })
        .collect();
    json!({"type": MODAL, "data": {"custom_id": cut(&format!("{MODAL_PREFIX}{}", prompt.key()), 100),
        "title": cut(&prompt.title, 45), "components": rows}})
}

/// A filled-in prompt modal: the prompt is used with what was typed.
pub async fn submit(bot: &Bot, modal: &ModalInteraction) -> Result<(), RestError> {
    let rest = &bot.surface.rest;
    let deferred = json!({"type": response::DEFERRED_MESSAGE});
    rest.respond(modal.id.get(), &modal.token, deferred).await?;
    let key = modal.data.custom_id.trim_start_matches(MODAL_PREFIX);
    let conversation = conversation_of(modal.channel_id.get());
    let arguments: Vec<(String, String)> = super::modal_inputs(modal)
        .into_iter()
        .map(|(name, value)| (name, value.trim().to_owned()))
        .collect();
    let said = match bot.surface.engine.prompt(&conversation, key).await {
        Ok(prompt) => {
            use_prompt(
                bot,
                &conversation,
                modal.id.get(),
                &modal.user,
                &prompt,
                &arguments,
            )
            .await
        }
        Err(problem) => format!("❌ {}.", capitalised(&problem)),
    };
    let body = json!({"content": said, "allowed_mentions": {"parse": []}});
    rest.edit_original(modal.application_id.get(), &modal.token, body)
        .await
}

/// `/resource`, answered after deferring: the resource attached here, or
/// queued as the caller's turn.
pub async fn resource(bot: &Bot, command: &CommandInteraction) -> anyhow::Result<String> {
    let caller = caller(bot, command).await?;
    if caller.channel_defaults {
        anyhow::bail!("Use /resource in a thread of the bot (mention it to start one).");
    }
    let uri = option(command, "uri").unwrap_or_default().trim();
    let engine = &bot.surface.engine;
    let conversation = &caller.conversation;
    let (server, contents) = engine
        .read_resource(conversation, uri)
        .await
        .map_err(|problem| anyhow::anyhow!("{}.", capitalised(&problem)))?;
    let user = command.user.id.get();
    if option(command, "to") == Some("file") {
        let channel = command.channel_id.get();
        return Ok(attach(bot, channel, &server, user, &contents, uri).await);
    }
    let mut text = engine.resource_context(&server, uri, &contents);
    if let Some(question) = option(command, "question").filter(|q| !q.trim().is_empty()) {
        text.push_str("\n\n");
        text.push_str(question.trim());
    }
    queue(bot, conversation, command.id.get(), &command.user, text).await?;
    Ok(format!(
        "📖 <@{user}> added `{}` of {server} to the conversation.",
        cut(uri, 300).replace('`', "'")
    ))
}

/// Posts each part of a resource `server` read as a file in `channel`,
/// for `user`; how many were posted.
async fn attach(
    bot: &Bot,
    channel: u64,
    server: &str,
    user: u64,
    contents: &[crate::conversation::offers::ResourceContent],
    uri: &str,
) -> String {
    let mut posted = 0;
    let mut left_out = Vec::new();
    for (n, part) in contents.iter().enumerate() {
        let bytes = match &part.body {
            ResourceBody::Text(text) => text.clone().into_bytes(),
            ResourceBody::Bytes(bytes) => bytes.clone(),
        };
        if n >= MAX_PARTS {
            left_out.push(format!(
                "{} more part(s) (at most {MAX_PARTS} are attached)",
                contents.len() - n
            ));
            break;
        }
        if bytes.len() > MAX_FILE_BYTES {
            left_out.push(format!(
                "`{}` ({} MiB; Discord takes files up to {} MiB)",
                cut(&part.uri, 200).replace('`', "'"),
                bytes.len().div_ceil(1024 * 1024),
                MAX_FILE_BYTES / (1024 * 1024)
            ));
            continue;
        }
        let file = Attachment {
            name: file_name(&part.uri, part.mime.as_deref()),
            bytes,
        };
        let body = json!({"content": format!("📎 `{}` of {server}, for <@{user}>", part.uri.replace('`', "'"))});
        match bot
            .surface
            .rest
            .create_message_with_file(channel, body, &file)
            .await
        {
            Ok(_) => posted += 1,
            Err(error) => left_out.push(format!("a part that could not be posted ({error})")),
        }
    }
    let mut said = format!(
        "📎 Attached {posted} part(s) of `{}`.",
        cut(uri, 300).replace('`', "'")
    );
    if !left_out.is_empty() {
        said.push_str(&format!(" Left out: {}.", left_out.join("; ")));
    }
    cut(&said, 1900)
}

/// Parts of one resource attached, and the largest file.
const MAX_PARTS: usize = 5;
const MAX_FILE_BYTES: usize = 8 * 1024 * 1024;

/// A file name for a resource: the last part of its URI, with an
/// extension from its type when it has none.
fn file_name(uri: &str, mime: Option<&str>) -> String {
    let last = uri
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("resource");
    let clean: String = last
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    if clean.contains('.') {
        return clean;
    }
    let extension = match mime.unwrap_or_default() {
        "text/markdown" => "md",
        "application/json" => "json",
        m if m.starts_with("text/") => "txt",
        _ => "bin",
    };
    format!("{clean}.{extension}")
}

/// Autocomplete of `/prompt name`, `/prompt arguments` and `/resource uri`.
pub async fn autocomplete(bot: &Bot, command: &CommandInteraction) -> Vec<Value> {
    let Some(focused) = command.data.autocomplete() else {
        return Vec::new();
    };
    // Only for those who may use the bot here, and only in its threads.
    match caller(bot, command).await {
        Ok(caller) if !caller.channel_defaults => {}
        _ => return Vec::new(),
    }
    let typed = focused.value.to_owned();
    let conversation = conversation_of(command.channel_id.get());
    let engine = &bot.surface.engine;
    let warm = warm(bot, &conversation);
    let choice =
        |name: String, value: String| json!({"name": cut(&name, MAX_CHOICE_CHARS), "value": value});
    let listed = async {
        let _ = warm.await;
        match (command.data.name.as_str(), focused.name) {
            ("prompt", "name") => {
                let lower = typed.to_lowercase();
                engine
                    .prompts(&conversation)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| p.key().chars().count() <= MAX_CHOICE_CHARS)
                    .filter(|p| {
                        p.key().to_lowercase().contains(&lower)
                            || p.title.to_lowercase().contains(&lower)
                    })
                    .map(|p| choice(format!("{} ({})", p.title, p.server), p.key()))
                    .collect()
            }
            ("prompt", "arguments") => {
                let key = option(command, "name").unwrap_or_default();
                argument_choices(bot, &conversation, key, &typed).await
            }
            ("resource", "uri") => {
                let lower = typed.to_lowercase();
                engine
                    .resources(&conversation)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r.uri.chars().count() <= MAX_CHOICE_CHARS)
                    .filter(|r| {
                        r.uri.to_lowercase().contains(&lower)
                            || r.name.to_lowercase().contains(&lower)
                    })
                    .map(|r| {
                        let what = if r.template {
                            "template"
                        } else {
                            r.server.as_str()
                        };
                        choice(format!("{} — {} ({what})", r.name, r.uri), r.uri)
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    };
    let mut choices: Vec<Value> = tokio::time::timeout(DECIDE_WITHIN, listed)
        .await
        .unwrap_or_default();
    choices.truncate(MAX_CHOICES);
    choices
}

/// Completions of the last `key=value` word typed for the prompt `key`:
/// the server's suggestions for its value, or the arguments not given yet.
async fn argument_choices(bot: &Bot, conversation: &str, key: &str, typed: &str) -> Vec<Value> {
    let engine = &bot.surface.engine;
    let Ok(prompt) = engine.prompt(conversation, key).await else {
        return Vec::new();
    };
    let (done, last) = match typed.rfind(' ') {
        Some(at) => (&typed[..=at], &typed[at + 1..]),
        None => ("", typed),
    };
    let with = |word: String| {
        let whole = format!("{done}{word}");
        json!({"name": cut(&whole, MAX_CHOICE_CHARS), "value": cut(&whole, MAX_CHOICE_CHARS)})
    };
    match last.split_once('=') {
        Some((name, value)) => {
            let values = engine
                .complete_argument(conversation, &prompt.server, &prompt.name, name, value)
                .await;
            values
                .into_iter()
                .map(|v| {
                    with(if v.contains(' ') {
                        format!("{name}=\"{v}\"")
                    } else {
                        format!("{name}={v}")
                    })
                })
                .collect()
        }
        None => prompt
            .arguments
            .iter()
            .filter(|a| a.name.starts_with(last) && !done.contains(&format!("{}=", a.name)))
            .map(|a| with(format!("{}=", a.name)))
            .collect(),
    }
}

/// Custom ids of Read buttons: `read:KEY`.
pub const READ_PREFIX: &str = "read:";
/// Read buttons under one tool notice.
const READ_BUTTONS: usize = 5;
/// Read buttons remembered; past this the oldest no longer work.
const LINKS_KEPT: usize = 10_000;

/// Read buttons' resources by key, and their keys oldest first.
type KeptLinks = (
    std::collections::HashMap<u64, (String, crate::conversation::ResourceLink)>,
    std::collections::VecDeque<u64>,
);

/// The resources behind Read buttons, by key: in which conversation,
/// from which server.
#[derive(Debug, Default)]
pub struct Links {
    next: std::sync::atomic::AtomicU64,
    kept: std::sync::Mutex<KeptLinks>,
}

impl Links {
    /// A row of Read buttons for the first few `links` of a tool result in
    /// `conversation`; none when there are none.
    pub fn rows(
        &self,
        conversation: &str,
        links: &[crate::conversation::ResourceLink],
    ) -> Vec<Value> {
        if links.is_empty() {
            return Vec::new();
        }
        let mut kept = self.kept.lock().expect("links poisoned");
        let buttons: Vec<Value> = links
            .iter()
            .take(READ_BUTTONS)
            .map(|link| {
                let key = super::button_key(
                    self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                );
                kept.0.insert(key, (conversation.to_owned(), link.clone()));
                kept.1.push_back(key);
                json!({"type": super::protocol::component::BUTTON, "style": super::protocol::button::SECONDARY,
                       "label": cut(&format!("Read {}", link.name), 80), "custom_id": format!("{READ_PREFIX}{key}")})
            })
            .collect();
        while kept.1.len() > LINKS_KEPT {
            if let Some(oldest) = kept.1.pop_front() {
                kept.0.remove(&oldest);
            }
        }
        vec![json!({"type": super::protocol::component::ACTION_ROW, "components": buttons})]
    }

    fn get(&self, key: &str) -> Option<(String, crate::conversation::ResourceLink)> {
        let key: u64 = key.parse().ok()?;
        self.kept
            .lock()
            .expect("links poisoned")
            .0
            .get(&key)
            .cloned()
    }
}

/// A press of Read: the resource is read from the session of the server
/// whose tool returned it, in that conversation, and attached to the thread.
pub async fn press_read(
    bot: &Bot,
    press: &serenity::all::ComponentInteraction,
) -> Result<(), RestError> {
    let rest = &bot.surface.rest;
    let key = press.data.custom_id.trim_start_matches(READ_PREFIX);
    let here = conversation_of(press.channel_id.get());
    let found = bot.surface.links.get(key).filter(|(c, _)| *c == here);
    let Some((conversation, link)) = found else {
        let body = ephemeral(
            "This button no longer works (the bot restarted since); use /resource instead.",
        );
        return rest.respond(press.id.get(), &press.token, body).await;
    };
    let deferred = json!({"type": response::DEFERRED_MESSAGE, "data": {"flags": super::protocol::flags::EPHEMERAL}});
    rest.respond(press.id.get(), &press.token, deferred).await?;
    let read = bot
        .surface
        .tools
        .read_resource(&conversation, &link.server, &link.uri)
        .await;
    let said = match read {
        Err(problem) => format!("❌ {}.", capitalised(&problem)),
        Ok(contents) => {
            let channel = press.channel_id.get();
            let user = press.user.id.get();
            attach(bot, channel, &link.server, user, &contents, &link.uri).await
        }
    };
    rest.edit_original(
        press.application_id.get(),
        &press.token,
        json!({"content": said}),
    )
    .await
}
