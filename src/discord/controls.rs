//! The buttons on a turn's messages: Stop while it runs (and `/stop`),
//! Retry on its answer (and `/retry`), and `/undo`: who may use them, and
//! what they are told.

use std::collections::HashMap;

use serde_json::{Value, json};
use serenity::all::ComponentInteraction;

use super::Bot;
use super::inbound::{channel_of, conversation_of};
use super::protocol::{button, component, response};
use super::render::MAX_MESSAGE_CHARS;
use super::rest::{Attachment, Rest, RestError};
use crate::conversation::{Inbound, Redo};

/// The custom id of a Stop button starts with this, then the position of
/// the input whose turn it stops.
pub const STOP_PREFIX: &str = "stop:";

/// The custom id of a Retry button starts with this, then the position of
/// the input whose answer it replaces.
pub const RETRY_PREFIX: &str = "retry:";

/// The row with the Stop button of the turn answering `position`.
pub fn stop_row(position: u64) -> Value {
    button_row("Stop", "⏹️", &format!("{STOP_PREFIX}{position}"))
}

/// The custom id of a Reasoning button starts with this, then the
/// position of the input whose answer's reasoning it shows.
pub const REASONING_PREFIX: &str = "reasoning:";

/// The row under the answer to `position`: Retry, and Reasoning when the
/// model's reasoning for it is kept.
pub fn answer_row(position: u64, reasoning: bool) -> Value {
    let mut buttons = vec![button("Retry", "🔁", &format!("{RETRY_PREFIX}{position}"))];
    if reasoning {
        buttons.push(button(
            "Reasoning",
            "💭",
            &format!("{REASONING_PREFIX}{position}"),
        ));
    }
    json!([{"type": component::ACTION_ROW, "components": buttons}])
}

/// The answer of each thread that carries Retry, so that its buttons come
/// off when they stop applying: a newer answer keeps Retry for itself (the
/// older one keeps Reasoning), and an answer that was replaced (Retry,
/// an edit) or undone loses both, since they would act on its successor.
/// Kept in memory: after a restart, an older answer's Retry is refused
/// when pressed.
#[derive(Debug, Default)]
pub struct AnswerRows(std::sync::Mutex<HashMap<u64, Carrier>>);

#[derive(Debug, Clone, Copy)]
struct Carrier {
    message: u64,
    position: u64,
    reasoning: bool,
}

impl AnswerRows {
    /// Notes that `message` in `channel` now carries the row of the answer
    /// to `position`, and trims the row of the answer that carried it.
    pub async fn carried(
        &self,
        rest: &Rest,
        channel: u64,
        message: u64,
        position: u64,
        reasoning: bool,
    ) {
        let carrier = Carrier {
            message,
            position,
            reasoning,
        };
        let before = self.lock().insert(channel, carrier);
        if let Some(before) = before.filter(|b| b.message != message) {
            let kept = before.reasoning && before.position != position;
            let components = match kept {
                true => reasoning_row(before.position),
                false => json!([]),
            };
            trim(rest, channel, before.message, components).await;
        }
    }

    /// Takes the row off the answer that carries it in `channel` (its
    /// exchange was undone or the conversation reset): only the answer to
    /// `position`, when given.
    pub async fn clear(&self, rest: &Rest, channel: u64, position: Option<u64>) {
        let before = {
            let mut rows = self.lock();
            match rows.get(&channel) {
                Some(row) if position.is_none_or(|p| p == row.position) => rows.remove(&channel),
                _ => None,
            }
        };
        if let Some(before) = before {
            trim(rest, channel, before.message, json!([])).await;
        }
    }

    /// Forgets the row of `channel` (its buttons were taken off already).
    pub fn forget(&self, channel: u64) {
        self.lock().remove(&channel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Carrier>> {
        self.0.lock().expect("answer rows poisoned")
    }
}

async fn trim(rest: &Rest, channel: u64, message: u64, components: Value) {
    let body = json!({"components": components});
    if let Err(error) = rest.edit_message(channel, message, body).await {
        tracing::warn!(%error, channel, "could not take the buttons off an older answer");
    }
}

/// The row with only the Reasoning button of the answer to `position`.
fn reasoning_row(position: u64) -> Value {
    button_row("Reasoning", "💭", &format!("{REASONING_PREFIX}{position}"))
}

fn button_row(label: &str, emoji: &str, custom_id: &str) -> Value {
    json!([{"type": component::ACTION_ROW, "components": [button(label, emoji, custom_id)]}])
}

fn button(label: &str, emoji: &str, custom_id: &str) -> Value {
    json!({"type": component::BUTTON, "style": button::SECONDARY, "label": label, "emoji": {"name": emoji},
           "custom_id": custom_id})
}

/// Shows the reasoning of an answer to the presser only: in the reply, or
/// attached as a file when it is longer than a message.
pub async fn press_reasoning(bot: &Bot, press: &ComponentInteraction) -> Result<(), RestError> {
    let surface = &bot.surface;
    let conversation = conversation_of(press.channel_id.get());
    let position = press
        .data
        .custom_id
        .strip_prefix(REASONING_PREFIX)
        .and_then(|p| p.parse().ok());
    let found = match position {
        Some(position) => surface.engine.reasoning_for(&conversation, position).await,
        None => Ok(Vec::new()),
    };
    let reasoning = match found {
        Ok(parts) => parts.join("\n\n"),
        Err(error) => format!("❌ {error}"),
    };
    let (id, token) = (press.id.get(), press.token.as_str());
    if reasoning.trim().is_empty() {
        let gone = "This answer's reasoning is no longer kept (the answer was replaced or the conversation reset).";
        return surface
            .rest
            .respond(id, token, super::ephemeral(gone))
            .await;
    }
    let content = format!("💭 **Reasoning**\n{reasoning}");
    if content.chars().count() <= MAX_MESSAGE_CHARS {
        return surface
            .rest
            .respond(id, token, super::ephemeral(&content))
            .await;
    }
    let file = Attachment {
        name: "reasoning.txt".into(),
        bytes: reasoning.into_bytes(),
    };
    let long = super::ephemeral("💭 The reasoning is long; here it is as a file.");
    surface.rest.respond_with_file(id, token, long, &file).await
}

/// What a request to stop a turn did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    Stopped,
    /// Someone else's turn, and the presser is no admin: who may stop it.
    NotYours(u64),
    /// Nothing runs (or a later turn than the button's).
    NothingRunning,
}

impl StopOutcome {
    /// The reply to whoever asked, and whether everyone sees it.
    pub fn reply(&self, user: u64) -> (String, bool) {
        match self {
            StopOutcome::Stopped => (format!("⏹️ <@{user}> stopped this answer."), true),
            StopOutcome::NotYours(author) => (
                format!("Only <@{author}>, who asked, or an admin can stop this answer."),
                false,
            ),
            StopOutcome::NothingRunning => ("Nothing is being answered here now.".into(), false),
        }
    }
}

/// Stops the running turn of `conversation` for `user`, if they may: the
/// person who sent its input, or an admin. With `position`, only the turn
/// answering that input (an old button stops nothing).
pub fn stop(
    bot: &Bot,
    conversation: &str,
    position: Option<u64>,
    user: u64,
    admin: bool,
) -> StopOutcome {
    let Some(turn) = bot.workers.running(conversation) else {
        return StopOutcome::NothingRunning;
    };
    if position.is_some_and(|p| p != turn.position) {
        return StopOutcome::NothingRunning;
    }
    if turn.author != user && !admin {
        return StopOutcome::NotYours(turn.author);
    }
    if bot.workers.stop_turn(conversation, Some(turn.position)) {
        tracing::info!(conversation, user, "turn stopped by a person");
        StopOutcome::Stopped
    } else {
        StopOutcome::NothingRunning
    }
}

/// Handles a press of Stop.
pub async fn press(bot: &Bot, press: &ComponentInteraction) -> Result<(), RestError> {
    let position = press
        .data
        .custom_id
        .strip_prefix(STOP_PREFIX)
        .and_then(|p| p.parse().ok());
    let surface = &bot.surface;
    let user = press.user.id.get();
    let admin = super::presser_is_admin(surface, press);
    let conversation = conversation_of(press.channel_id.get());
    let outcome = match position {
        Some(position) => stop(bot, &conversation, Some(position), user, admin),
        None => StopOutcome::NothingRunning,
    };
    let (content, public) = outcome.reply(user);
    surface
        .rest
        .respond(
            press.id.get(),
            &press.token,
            super::interaction_answer(&content, public),
        )
        .await
}

/// What asking for another answer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    Queued,
    /// Someone else's message, and the presser is no admin.
    NotYours(u64),
    /// The button is on an earlier answer, or there is none.
    NotLast,
    /// A turn is running: it is stopped or waited for first.
    Busy,
}

impl RetryOutcome {
    /// The reply to whoever asked, and whether everyone sees it.
    pub fn reply(&self, user: u64) -> (String, bool) {
        match self {
            RetryOutcome::Queued => (format!("🔁 <@{user}> asked for another answer."), true),
            RetryOutcome::NotYours(author) => (
                format!("Only <@{author}>, who asked, or an admin can retry this answer."),
                false,
            ),
            RetryOutcome::NotLast => (
                "Only the last answer of this conversation can be retried.".into(),
                false,
            ),
            RetryOutcome::Busy => (
                "An answer is being written here: wait for it, or stop it first.".into(),
                false,
            ),
        }
    }
}

/// Who is asking, for Retry and /undo.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub user: u64,
    pub name: &'a str,
    pub admin: bool,
}

/// Queues another answer to the last input of `conversation` (only when
/// it is `of`, if given) as the input at `position`: its answer is
/// replaced and the same message is answered again.
pub async fn retry(
    bot: &Bot,
    conversation: &str,
    of: Option<u64>,
    asker: Asker<'_>,
    position: u64,
) -> anyhow::Result<RetryOutcome> {
    if bot.workers.running(conversation).is_some() {
        return Ok(RetryOutcome::Busy);
    }
    let last = bot.surface.engine.last_input(conversation).await?;
    let Some(last_position) = last.and_then(|l| l.position) else {
        return Ok(RetryOutcome::NotLast);
    };
    if of.is_some_and(|of| of != last_position) {
        return Ok(RetryOutcome::NotLast);
    }
    if let Some(author) = last.and_then(|l| l.author)
        && author != asker.user
        && !asker.admin
    {
        return Ok(RetryOutcome::NotYours(author));
    }
    let input = Inbound {
        position,
        author: asker.user,
        author_name: asker.name.to_owned(),
        redo: Some(Redo::Retry { of: last_position }),
        ..Default::default()
    };
    bot.workers.accept(conversation, input).await?;
    Ok(RetryOutcome::Queued)
}

/// Handles a press of Retry: the button leaves the replaced answer.
pub async fn press_retry(bot: &Bot, press: &ComponentInteraction) -> Result<(), RestError> {
    let of = press
        .data
        .custom_id
        .strip_prefix(RETRY_PREFIX)
        .and_then(|p| p.parse().ok());
    let surface = &bot.surface;
    let user = press.user.id.get();
    let asker = Asker {
        user,
        name: press.user.display_name(),
        admin: super::presser_is_admin(surface, press),
    };
    let conversation = conversation_of(press.channel_id.get());
    let outcome = match of {
        Some(of) => retry(bot, &conversation, Some(of), asker, press.id.get()).await,
        None => Ok(RetryOutcome::NotLast),
    };
    let body = match outcome {
        Ok(RetryOutcome::Queued) => {
            surface.answer_rows.forget(press.channel_id.get());
            json!({"type": response::UPDATE_MESSAGE, "data": {"components": []}})
        }
        Ok(refused) => {
            let (content, _) = refused.reply(user);
            super::ephemeral(&content)
        }
        Err(error) => super::ephemeral(&format!("❌ {error}")),
    };
    surface
        .rest
        .respond(press.id.get(), &press.token, body)
        .await
}

/// Takes the last exchange out of `conversation` for `asker` (stopping its
/// turn first when it runs): their own, or anyone's for an admin.
pub async fn undo(bot: &Bot, conversation: &str, asker: Asker<'_>) -> anyhow::Result<String> {
    let engine = &bot.surface.engine;
    // What is checked is what is undone: the running turn's input, or the
    // last one answered.
    let (of, author) = match bot.workers.running(conversation) {
        Some(turn) => (Some(turn.position), Some(turn.author)),
        None => match engine.last_input(conversation).await? {
            Some(last) => (last.position, last.author),
            None => (None, None),
        },
    };
    let Some(of) = of else {
        return Ok("There is nothing to undo here.".into());
    };
    if let Some(author) = author
        && author != asker.user
        && !asker.admin
    {
        anyhow::bail!("Only <@{author}>, who wrote the last message, or an admin can undo it.");
    }
    let stopped = bot.workers.stop_turn(conversation, Some(of));
    let undone = engine.undo(conversation, Some(of)).await?;
    if undone && let Some(channel) = channel_of(conversation) {
        bot.surface
            .answer_rows
            .clear(&bot.surface.rest, channel, Some(of))
            .await;
    }
    Ok(match undone {
        true if stopped => "↩️ The answer being written was stopped, and the last message and its answer were taken out of this conversation (the model no longer sees them).".into(),
        true => "↩️ The last message and its answer were taken out of this conversation (the model no longer sees them).".into(),
        false if stopped => "↩️ The answer being written was stopped before its message reached the conversation, so nothing else was taken out.".into(),
        false => "There is nothing to undo here.".into(),
    })
}
