//! Edited and deleted messages. An edit of a message still waiting for its
//! turn changes what will be answered; an edit of the message being
//! answered, or of the last one answered, replaces that exchange and is
//! answered anew; an edit of an older message changes nothing, and the
//! person is told so by a notice that goes away. Deleting a message that
//! was not answered yet takes it out of the queue (or stops its turn).

use std::time::Duration;

use serde_json::json;
use serenity::all::MessageUpdateEvent;

use super::Bot;
use super::inbound::{attachment_ref, conversation_of, strip_mention};
use crate::conversation::{Accepted, Inbound, Redo};

/// How long the notice about an edit that changes nothing stays.
const NOTICE_LASTS: Duration = Duration::from_secs(20);

/// The position of the input that answers an edit of the message at
/// `of`: right after it, so that it comes before any message sent later
/// (Discord ids of one channel are further apart than one).
fn redo_position(of: u64) -> u64 {
    of + 1
}

pub async fn edited(bot: &Bot, event: &MessageUpdateEvent) {
    // Only a change of the text by a person counts (Discord also sends
    // updates when it adds link previews).
    let (Some(content), Some(author), Some(_)) =
        (&event.content, &event.author, event.edited_timestamp)
    else {
        return;
    };
    if author.bot {
        return;
    }
    let surface = &bot.surface;
    let channel = event.channel_id.get();
    let of = event.id.get();
    let conversation = conversation_of_message(bot, channel, of).await;
    let input = Inbound {
        position: of,
        author: author.id.get(),
        author_name: author.display_name().to_owned(),
        text: strip_mention(content, surface.me()),
        attachments: event
            .attachments
            .iter()
            .flatten()
            .map(attachment_ref)
            .collect(),
        redo: None,
    };
    let result = async {
        if bot.workers.amend(&conversation, &input).await? {
            tracing::info!(conversation, "a waiting message was edited");
            return Ok(true);
        }
        let redo = Inbound {
            position: redo_position(of),
            redo: Some(Redo::Edit { of }),
            ..input.clone()
        };
        // Edited again before the first edit was answered.
        if bot.workers.amend(&conversation, &redo).await? {
            return Ok(true);
        }
        // The message itself, or an earlier edit of it, is being answered.
        let running = bot.workers.running(&conversation).map(|t| t.position);
        let answering = running.filter(|&p| p == of || p == redo_position(of));
        let last = surface.engine.last_input(&conversation).await?;
        if answering.is_none() && last.and_then(|l| l.position) != Some(of) {
            return Ok(false);
        }
        // Its kept input must be gone before this one is kept in its place.
        if answering.is_some() && bot.workers.stop_turn(&conversation, answering) {
            surface.engine.settle(&conversation).await;
        }
        if bot.workers.accept(&conversation, redo).await? == Accepted::Duplicate {
            anyhow::bail!("the answer to your previous edit was still being stopped");
        }
        tracing::info!(conversation, "an edited message is answered again");
        anyhow::Ok(true)
    };
    match result.await {
        Ok(true) => {}
        Ok(false) => {
            // Only where the bot answers every message is this worth saying.
            if surface
                .threads
                .parent(&conversation)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                notice(bot, channel, of).await;
            }
        }
        Err(error) => {
            tracing::warn!(%error, conversation, "could not take an edited message");
            surface
                .say(
                    channel,
                    &format!("❌ {error}. Your edit was not taken; send the message again."),
                )
                .await;
        }
    }
}

/// Says, for a while, that editing an older message changes nothing.
async fn notice(bot: &Bot, channel: u64, of: u64) {
    let rest = bot.surface.rest.clone();
    let body = json!({
        "content": "✏️ Only your last message here is answered again when edited; this edit does not change the conversation.",
        "message_reference": {"message_id": of.to_string(), "fail_if_not_exists": false},
    });
    match rest.create_message(channel, body).await {
        Ok(id) => {
            tokio::spawn(async move {
                tokio::time::sleep(NOTICE_LASTS).await;
                let _ = rest.delete_message(channel, id).await;
            });
        }
        Err(error) => tracing::warn!(%error, channel, "could not post a notice"),
    }
}

/// The conversation of message `id` in `channel`: the channel's, except
/// for a message the bot started a thread from, which stays in the parent
/// channel and belongs to that thread (its id is the thread's).
async fn conversation_of_message(bot: &Bot, channel: u64, id: u64) -> String {
    let thread = conversation_of(id);
    let parent = bot.surface.threads.parent(&thread).await.ok().flatten();
    if parent == Some(channel) {
        thread
    } else {
        conversation_of(channel)
    }
}

pub async fn deleted(bot: &Bot, channel: u64, message: u64) {
    let conversation = conversation_of_message(bot, channel, message).await;
    match bot.workers.withdraw(&conversation, message).await {
        Ok(true) => tracing::info!(conversation, "a deleted message will not be answered"),
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%error, conversation, "could not take a deleted message out of the queue")
        }
    }
}
