//! The Stop button on a running turn's messages, and `/stop`: who may stop
//! a turn, and what they are told.

use serde_json::{Value, json};
use serenity::all::ComponentInteraction;

use super::Bot;
use super::inbound::conversation_of;
use super::protocol::{button, component, flags, response};
use super::rest::RestError;

/// The custom id of a Stop button starts with this, then the position of
/// the input whose turn it stops.
pub const STOP_PREFIX: &str = "stop:";

/// The row with the Stop button of the turn answering `position`.
pub fn stop_row(position: u64) -> Value {
    json!([{"type": component::ACTION_ROW, "components": [
        {"type": component::BUTTON, "style": button::SECONDARY, "label": "Stop", "emoji": {"name": "⏹️"},
         "custom_id": format!("{STOP_PREFIX}{position}")}
    ]}])
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
    let roles = super::role_ids(press.member.as_ref().map(|m| m.roles.as_slice()));
    let permissions = press.member.as_ref().and_then(|m| m.permissions);
    let admin = surface.access.is_admin(user, &roles, permissions);
    let conversation = conversation_of(press.channel_id.get());
    let outcome = match position {
        Some(position) => stop(bot, &conversation, Some(position), user, admin),
        None => StopOutcome::NothingRunning,
    };
    let (content, public) = outcome.reply(user);
    let mut data = json!({"content": content, "allowed_mentions": {"parse": []}});
    if !public {
        data["flags"] = flags::EPHEMERAL.into();
    }
    surface
        .rest
        .respond(
            press.id.get(),
            &press.token,
            json!({"type": response::MESSAGE, "data": data}),
        )
        .await
}
