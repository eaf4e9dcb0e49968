//! A turn in a thread: the input's files fetched, a typing indicator, then
//! the engine's events shown in the order they happened (notices, approval
//! questions, the streamed answer, warnings and errors).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::approvals::{Buttons, Post};
use super::budgets::{self, Spender};
use super::inbound::{self, channel_of};
use super::protocol::TYPING_LASTS_SECS;
use super::render::{
    MAX_MESSAGE_CHARS, notice_finished, notice_progress, notice_started, split_message,
};
use super::rest::Attachment;
use super::stream::{Answer, Throttle};
use super::{Surface, controls};
use crate::conversation::{
    Ask, Inbound, Place, Redo, Stopped, TimedApprover, TurnEvent, TurnInput, TurnRunner,
};

/// Ends an answer the person stopped (Discord's small grey text).
const STOPPED_MARK: &str = "\n-# ⏹️ stopped";

/// The typing indicator is renewed a little before it runs out.
const TYPING_EVERY: Duration = Duration::from_secs(TYPING_LASTS_SECS - 2);

/// Runs turns for the workers and shows them in Discord.
pub struct Turns(pub Arc<Surface>);

#[async_trait]
impl TurnRunner for Turns {
    async fn run(
        &self,
        conversation: &str,
        input: Inbound,
        resumed: bool,
        stop: CancellationToken,
    ) {
        let surface = &self.0;
        let Some(channel) = channel_of(conversation) else {
            tracing::warn!(
                conversation,
                "not a Discord conversation; its input is left kept"
            );
            return;
        };
        let spender = Spender {
            guild: budgets::guild_of(surface, conversation, channel).await,
            user: input.author,
        };
        match budgets::refusal(surface, spender).await {
            Ok(None) => {}
            Ok(Some(refusal)) => {
                tracing::info!(
                    conversation,
                    user = input.author,
                    "over a budget; not answered"
                );
                surface.say(channel, &refusal).await;
                if let Err(error) = surface
                    .engine
                    .forget_input(conversation, input.position)
                    .await
                {
                    tracing::warn!(conversation, %error, "could not forget a refused message");
                }
                return;
            }
            // The turn itself will tell whether the database works.
            Err(error) => tracing::warn!(conversation, %error, "could not check the budgets"),
        }
        // Stops the indicator however the turn ends (answered, cut, panic).
        let _typing = typing(surface, channel).drop_guard();
        let (events, received) = mpsc::unbounded_channel();
        let (posts, questions) = mpsc::unbounded_channel();
        if resumed {
            let _ = events.send(TurnEvent::Warning(
                "Answering a message sent before the bot restarted.".into(),
            ));
        }
        let run = async {
            // Never waits for another turn: reads the setting and the catalogue.
            let model = surface
                .engine
                .model_of(conversation)
                .await
                .unwrap_or_default();
            let reads_images = surface
                .model
                .model_info(&model)
                .await
                .info()
                .is_some_and(|m| m.supports_images);
            let caps = inbound::Caps {
                image_max_bytes: surface.config.image_max_bytes,
                images_per_message: surface.config.images_per_message,
                reads_documents: surface.model.reads_documents(),
                document_max_bytes: surface.config.document_max_bytes,
                documents_per_message: surface.config.documents_per_message,
                audio_max_bytes: surface.config.audio_max_bytes,
                audio_per_message: surface.config.audio_per_message,
            };
            // A stop while files are fetched still goes through the engine,
            // which then forgets the input.
            let hearing = (surface.engine.as_ref(), conversation);
            let inbound::Prepared {
                message,
                notices,
                transcripts,
            } = tokio::select! {
                prepared = inbound::prepare(&surface.rest, &input, reads_images, &caps, hearing) => prepared,
                () = stop.cancelled() => Default::default(),
            };
            // What a voice note said, before the answer to it.
            for words in transcripts {
                let quote: String = words.lines().map(|l| format!("> {l}\n")).collect();
                let said = format!("🎙️ <@{}> said:\n{}", input.author, quote.trim_end());
                for part in split_message(&said, MAX_MESSAGE_CHARS) {
                    surface.say(channel, &part).await;
                }
            }
            for notice in notices {
                let _ = events.send(TurnEvent::Warning(notice));
            }
            let approver = TimedApprover {
                inner: Buttons {
                    surface: surface.clone(),
                    channel,
                    asker: input.author,
                    posts,
                    asked: Mutex::default(),
                },
                timeout: surface.config.approval_timeout,
            };
            let ask = match input.redo {
                None => Ask::New(message),
                Some(Redo::Retry { of }) => Ask::Again { of: Some(of) },
                Some(Redo::Edit { of }) => Ask::Edited { message, of },
            };
            // Names are only read when the prompt asks for them.
            let prompt = surface.engine.system_prompt_of(conversation).await;
            let place = match prompt {
                Ok(Some(prompt)) if prompt.contains("{channel}") || prompt.contains("{server}") => {
                    surface.place(channel).await
                }
                _ => Place::default(),
            };
            let turn = TurnInput {
                ask,
                kept: Some(input.position),
                stop,
                place,
            };
            // A failure is an error event too, and is logged by the engine.
            let _ = surface
                .engine
                .run_turn(conversation, turn, &events, &approver)
                .await;
            approver.inner.withdraw_open().await;
            drop(events);
        };
        let ((), ()) = tokio::join!(run, render(surface, channel, received, questions, &input));
    }

    async fn crashed(&self, conversation: &str, _input: &Inbound) {
        if let Some(channel) = channel_of(conversation) {
            self.0.say(
                channel,
                "❌ Something went wrong on my side while answering this (it is in the bot's log). Send your message again; the conversation goes on.",
            )
            .await;
        }
    }

    async fn stopped(&self, conversation: &str, stopped: Stopped) {
        let Some(channel) = channel_of(conversation) else {
            return;
        };
        let mut lines = Vec::new();
        if stopped.cut {
            lines.push(
                "⚠️ The bot is restarting, so this answer was cut short. Say \"continue\" once it is back.".to_owned(),
            );
        }
        if stopped.waiting > 0 {
            lines.push(format!(
                "⏸️ The bot is restarting. {} message(s) waiting here are kept and will be answered when it is back.",
                stopped.waiting
            ));
        }
        if !lines.is_empty() {
            self.0.say(channel, &lines.join("\n")).await;
        }
    }
}

/// Keeps the typing indicator on until the returned token is cancelled.
fn typing(surface: &Surface, channel: u64) -> CancellationToken {
    let stop = CancellationToken::new();
    let rest = surface.rest.clone();
    let done = stop.clone();
    tokio::spawn(async move {
        loop {
            let _ = rest.typing(channel).await;
            tokio::select! {
                () = done.cancelled() => break,
                () = tokio::time::sleep(TYPING_EVERY) => {}
            }
        }
    });
    stop
}

/// Shows a turn's events, and posts approval questions in their place: an
/// event sent before a question is always shown before it.
async fn render(
    surface: &Surface,
    channel: u64,
    mut events: mpsc::UnboundedReceiver<TurnEvent>,
    mut questions: mpsc::UnboundedReceiver<Post>,
    input: &Inbound,
) {
    // Stop names the running input; Retry the message that was answered.
    let answered = match input.redo {
        Some(Redo::Retry { of } | Redo::Edit { of }) => of,
        None => input.position,
    };
    let rest = &surface.rest;
    let interval = surface.config.stream_interval;
    // The Stop button, on the turn's messages while it runs.
    let mut controls = Some(controls::stop_row(input.position));
    let mut answer = Answer::new(channel, interval, controls.clone());
    // Per call: its notice and the arguments it showed.
    let mut notices: HashMap<String, (u64, String)> = HashMap::new();
    let mut progress_throttles: HashMap<String, Throttle> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    loop {
        let event = tokio::select! {
            biased;
            event = events.recv() => event,
            Some(question) = questions.recv() => {
                answer.flush(rest, true).await;
                let _ = question.posted.send(rest.create_message(channel, question.body).await);
                continue;
            }
            _ = tick.tick() => {
                answer.flush(rest, false).await;
                continue;
            }
        };
        let Some(event) = event else {
            break;
        };
        let posted = match event {
            TurnEvent::Text(fragment) => {
                answer.text.push_str(&fragment);
                Ok(())
            }
            TurnEvent::ToolStarted {
                call_id,
                name,
                arguments,
            } => {
                answer.flush(rest, true).await;
                answer = Answer::new(channel, interval, controls.clone());
                let content = notice_started(&name, &arguments);
                let components = controls.clone().unwrap_or_else(|| json!([]));
                rest.create_message(
                    channel,
                    json!({"content": content, "components": components}),
                )
                .await
                .map(|id| {
                    notices.insert(call_id, (id, arguments));
                })
            }
            TurnEvent::ToolProgress {
                call_id,
                name,
                progress,
                total,
                message,
            } => {
                // At most one edit per interval and notice.
                let due = progress_throttles
                    .entry(call_id.clone())
                    .or_insert_with(|| Throttle::new(interval))
                    .ready(std::time::Instant::now());
                match notices.get(&call_id) {
                    Some((id, arguments)) if due => {
                        let content =
                            notice_progress(&name, arguments, progress, total, message.as_deref());
                        let components = controls.clone().unwrap_or_else(|| json!([]));
                        rest.edit_message(
                            channel,
                            *id,
                            json!({"content": content, "components": components}),
                        )
                        .await
                    }
                    _ => Ok(()),
                }
            }
            TurnEvent::ToolFinished {
                call_id,
                name,
                ok,
                summary,
                full_output,
                links,
            } => {
                let notice = notices.remove(&call_id);
                let arguments = notice.as_ref().map(|(_, a)| a.as_str()).unwrap_or_default();
                let content = notice_finished(&name, arguments, ok, &summary);
                let conversation = super::inbound::conversation_of(channel);
                let rows = surface.links.rows(&conversation, &links);
                let body = json!({"content": content, "components": rows});
                let mut result = match notice {
                    Some((id, _)) => rest.edit_message(channel, id, body).await,
                    None => rest.create_message(channel, body).await.map(drop),
                };
                if let (Some(full), Ok(())) = (full_output, &result) {
                    let file = Attachment {
                        name: format!("{}-output.txt", name.replace("__", "-")),
                        bytes: full.into_bytes(),
                    };
                    let body =
                        json!({"content": "The model saw a shortened result; here is all of it."});
                    result = rest
                        .create_message_with_file(channel, body, &file)
                        .await
                        .map(drop);
                }
                result
            }
            TurnEvent::Answer { text, reasoning } => {
                controls = None;
                answer.text = text;
                answer.controls = Some(controls::answer_row(answered, reasoning));
                answer.on_last = true;
                answer.flush(rest, true).await;
                if let Some(message) = answer.last_message() {
                    surface
                        .answer_rows
                        .carried(rest, channel, message, answered, reasoning)
                        .await;
                }
                answer = Answer::new(channel, interval, None);
                Ok(())
            }
            TurnEvent::Stopped => {
                // What was shown stays, without the button, marked.
                controls = None;
                answer.controls = None;
                if !answer.text.trim().is_empty() {
                    answer.text.push_str(STOPPED_MARK);
                }
                answer.flush(rest, true).await;
                answer = Answer::new(channel, interval, None);
                Ok(())
            }
            TurnEvent::Warning(warning) => rest
                .create_message(channel, json!({"content": format!("⚠️ {warning}")}))
                .await
                .map(drop),
            TurnEvent::Error(error) => rest
                .create_message(channel, json!({"content": format!("❌ {error}")}))
                .await
                .map(drop),
        };
        if let Err(error) = posted {
            tracing::warn!(%error, channel, "could not show a turn event");
        }
    }
    answer.controls = None;
    answer.flush(rest, true).await;
    // Notices of calls that never finished (a failed turn) lose the button.
    for (id, _) in notices.into_values() {
        let _ = rest
            .edit_message(channel, id, json!({"components": []}))
            .await;
    }
}
