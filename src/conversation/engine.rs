//! The agent loop: one turn of one conversation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::billing::{self, InFlight};
use super::elicitation::{Answer, Question};
use super::history::{estimate_tokens, fit_to_context, repair, valid_arguments};
use super::ports::{
    ApprovalRequest, Approver, CallContext, ChatModel, ChatRequest, Citation, Completion, Decision,
    FinishReason, LastInput, ModelError, ModelLookup, Replace, Store, StoreError, TextSink,
    ToolHost, ToolOutcome,
};
use super::prompt::{self, Clock, Place};
use super::tasks::{self, BackgroundTasks, TaskRecord, TaskStep, TaskTicket};
use super::think::{Unthink, split_think};
use super::types::{
    AudioPart, Author, Message, ReasoningEffort, Role, ToolCall, ToolSpec, TurnEvent, Usage,
};
use jiff::tz::TimeZone;

/// Conversations whose history stays cached in memory while idle. Past this,
/// the least recently used idle ones are forgotten and reloaded from the
/// store on their next turn.
const MAX_CACHED_CONVERSATIONS: usize = 64;

/// The most history text kept cached across conversations, in bytes.
const MAX_CACHED_HISTORY_BYTES: usize = 64 * 1024 * 1024;

/// Tokens kept free in the context window for the model's answer.
const ANSWER_RESERVE_TOKENS: u64 = 4_096;

/// The text of the message that carries images returned by tools.
const TOOL_IMAGES_NOTE: &str = "(Images returned by the tool calls above.)";

/// Tool calls of one reply that are run; the rest get an error result, so
/// a reply with thousands of calls cannot start thousands of tasks.
pub const MAX_CALLS_PER_REPLY: usize = 32;

/// Characters of a tool result shown in a one-line summary.
const SUMMARY_CHARS: usize = 120;

/// Appended to the system prompt when people are named in the messages.
pub const SPEAKERS_NOTE: &str = "Several people may write in this conversation: each of their messages starts with <@id> (their name) and a colon; mention someone by writing <@id>, and do not start your answers with such a prefix.";

/// What a tool call cut off by the output limit gets as its result; its
/// arguments are stored as `{}` so that no endpoint chokes on them later.
const CUT_CALL: &str = "ERROR: not run: this call was cut off at the model's output limit before its arguments were complete. Call it again with shorter arguments, or split the work into smaller calls.";

/// What a voice note is sent with.
const TRANSCRIBE: &str = "Transcribe this voice message word for word, in its own language. Answer with the transcript only, without quotes or comments.";

/// What a tool call cancelled by a stopped turn gets as its result.
pub const INTERRUPTED: &str =
    "interrupted by the user, who stopped this turn. Do not run it again unless asked.";

/// The engine's settings, from `Config`.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub default_model: String,
    /// For conversations without their own (see `/system`).
    pub system_prompt: Option<String>,
    /// `TRANSCRIPTION_MODEL`: transcribes voice notes for models that do
    /// not hear audio.
    pub transcription_model: Option<String>,
    /// Where `{date}`, `{time}` and `{weekday}` are told (`TIMEZONE`).
    pub timezone: TimeZone,
    pub clock: Clock,
    /// Tool rounds one turn may run before the user is asked to continue.
    pub max_tool_rounds: usize,
    /// Context window assumed for models the catalogue does not list.
    pub fallback_context_tokens: u64,
}

/// What a finished turn did, for logs and surfaces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnOutcome {
    pub model: String,
    pub rounds: usize,
    pub tool_calls: usize,
    pub usage: Usage,
    pub duration: Duration,
    /// False when the turn stopped at the round limit without an answer.
    pub answered: bool,
    /// The person stopped it (what was shown of the answer is kept).
    pub stopped: bool,
}

/// Why a turn failed. Store failures say exactly what was kept.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Before the message was stored (reading the history, or the write).
    #[error("{0}. Your message was not saved; send it again.")]
    InputNotStored(StoreError),
    /// The message is stored; a round of tool results could not be.
    #[error(
        "{0}. Your message was saved, but the results of its tool calls could not be, so the turn stopped. Say \"continue\" to try again (no need to send your message again)."
    )]
    ToolsNotStored(StoreError),
    /// The message is stored; the answer could not be, and was not shown.
    #[error(
        "{0}. Your message was saved, but the answer could not be, so it was not shown. Say \"continue\" to get it (no need to send your message again)."
    )]
    AnswerNotStored(StoreError),
    /// A setting (the model) could not be saved.
    #[error("{0}. The setting was not changed; try again.")]
    SettingNotStored(StoreError),
    /// Retry found no answer to replace.
    #[error("There is no answer here to retry: only the last answer of a conversation can be.")]
    NothingToRetry,
    /// Retry could not replace the answer.
    #[error("{0}. Nothing was changed; try again.")]
    NotRetried(StoreError),
}

impl TurnError {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TurnError::Model(error) => error.kind(),
            TurnError::InputNotStored(_) => "input_not_stored",
            TurnError::ToolsNotStored(_) => "tools_not_stored",
            TurnError::AnswerNotStored(_) => "answer_not_stored",
            TurnError::SettingNotStored(_) => "setting_not_stored",
            TurnError::NothingToRetry => "nothing_to_retry",
            TurnError::NotRetried(_) => "not_retried",
        }
    }
}

/// The in-memory state of a conversation. Only a turn holds `turn`; the
/// rest is read and written under the engine's map lock, never across an
/// await, so settings and commands never wait for a running turn.
#[derive(Debug, Default)]
struct Live {
    /// Held for the whole of a turn, so that turns of one conversation never
    /// overlap (tokio's mutex is fair: they run in the order they came).
    turn: Arc<tokio::sync::Mutex<()>>,
    /// The repaired history, or `None` when it must be (re)loaded (also
    /// while a turn has it).
    history: Option<Vec<Message>>,
    /// The size of `history`, for the cache bound.
    bytes: usize,
    /// The chosen model, once read from the store.
    model: Option<Option<String>>,
    /// The conversation's own system prompt, once read from the store.
    system: Option<Option<String>>,
    /// Its reasoning effort, once read from the store.
    reasoning: Option<Option<ReasoningEffort>>,
    /// The MCP servers switched off in it, once read from the store.
    off: Option<Vec<String>>,
    /// Where the history sent to the model starts (an index into
    /// `history`). It only moves when the history no longer fits, and then
    /// by a lot at once: each move costs a full prompt cache miss.
    start: usize,
    /// When a turn last used it, for forgetting the least recently used.
    used: u64,
}

/// What a turn answers.
#[derive(Debug, Clone)]
pub enum Ask {
    /// A new message.
    New(Message),
    /// The last input again, its answer replaced (Retry); with `of`, only
    /// when the last input has that position.
    Again { of: Option<u64> },
    /// An edited message: the exchange it started is replaced (when it is
    /// still the last one), then its new text is answered.
    Edited { message: Message, of: u64 },
}

/// How the input step changed the history.
enum Taken {
    /// The message was appended.
    Appended(Box<Message>),
    /// Earlier messages were replaced: the history is read again.
    Replaced,
}

/// The input of a turn: what it answers, where it is kept until stored,
/// and what stops it.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub ask: Ask,
    /// The position of the kept input this message answers (see
    /// `Store::keep_input`); it is forgotten when the message is stored.
    pub kept: Option<u64>,
    /// Cancelled when the person stops the turn: the model stream is
    /// dropped, running calls are cancelled, and what was shown is kept.
    pub stop: CancellationToken,
    /// Where it happens, for the prompt's `{channel}` and `{server}`.
    pub place: Place,
}

impl From<Message> for TurnInput {
    fn from(message: Message) -> Self {
        TurnInput {
            ask: Ask::New(message),
            kept: None,
            stop: CancellationToken::new(),
            place: Place::default(),
        }
    }
}

/// What the calls of one reply share.
struct Calls<'a> {
    conversation: &'a str,
    specs: &'a [ToolSpec],
    events: &'a UnboundedSender<TurnEvent>,
    approver: &'a dyn Approver,
    stop: &'a CancellationToken,
    /// Who started the turn.
    author: Option<&'a Author>,
    /// The calls that became tasks on their servers and are waited for.
    tasks: Mutex<Vec<TaskRecord>>,
}

/// Passes a call's progress on as events, its server's questions to the
/// turn's approver, and keeps the tasks its server makes of it.
struct CallProgress<'a> {
    engine: &'a Engine,
    turn: &'a Calls<'a>,
    call: &'a ToolCall,
}

#[async_trait::async_trait]
impl CallContext for CallProgress<'_> {
    async fn elicit(&self, question: Question) -> Answer {
        let secret = question.secret_fields();
        if !secret.is_empty() {
            tracing::warn!(server = %question.server, tool = %self.call.name, fields = ?secret, "a tool server asked for secrets in a form; declined");
            let _ = self.turn.events.send(TurnEvent::Warning(format!(
                "The tool server \"{}\" asked for {} in a form during {}. Servers may not ask for passwords or tokens this way, so it was declined; give secrets to a server through the MCP file's env or headers.",
                question.server,
                secret.join(", "),
                self.call.name
            )));
            return Answer::Decline;
        }
        if let Some(why) = self.turn.approver.not_asked() {
            let _ = self.turn.events.send(TurnEvent::Warning(format!(
                "The tool server \"{}\" asked a question during {}, which was declined: {why}.",
                question.server, self.call.name
            )));
            return Answer::Decline;
        }
        let answer = self.turn.approver.ask(&question).await;
        tracing::info!(server = %question.server, tool = %self.call.name, answer = answer.said(), "a tool server's question was answered");
        answer
    }

    fn progress(&self, progress: f64, total: Option<f64>, message: Option<String>) {
        let _ = self.turn.events.send(TurnEvent::ToolProgress {
            call_id: self.call.id.clone(),
            name: self.call.name.clone(),
            progress,
            total,
            message,
        });
    }

    async fn task(&self, ticket: &TaskTicket, step: TaskStep) {
        let conversation = self.turn.conversation;
        let store = &self.engine.store;
        match step {
            TaskStep::Started => {
                let record = tasks::record(conversation, ticket, self.turn.author);
                if let Err(error) = store.keep_task(&record).await {
                    tracing::warn!(%error, task = %ticket.task_id, "a task could not be kept; it is lost if mcpcord stops before it ends");
                }
                tracing::info!(conversation, tool = %ticket.tool, task = %ticket.task_id, "a tool call became a task");
                self.turn.tasks.lock().expect("tasks poisoned").push(record);
                self.progress(
                    0.0,
                    None,
                    Some(format!(
                        "running as a task on its server ({})",
                        ticket.task_id
                    )),
                );
            }
            TaskStep::Finished | TaskStep::Detached => {
                let record = {
                    let mut open = self.turn.tasks.lock().expect("tasks poisoned");
                    let at = open.iter().position(|r| &r.ticket == ticket);
                    at.map(|at| open.remove(at))
                };
                if step == TaskStep::Detached {
                    let record = record
                        .unwrap_or_else(|| tasks::record(conversation, ticket, self.turn.author));
                    self.engine.tasks.follow(record);
                } else if let Err(error) = store.drop_task(conversation, ticket).await {
                    tracing::warn!(%error, task = %ticket.task_id, "a finished task could not be forgotten");
                }
            }
        }
    }
}

/// How one model request ended.
enum Reply {
    /// The whole reply, and the endpoint's id of it when it gave one.
    Done(Box<Completion>, Option<String>),
    /// The person stopped the turn midway: the answer text shown so far.
    Stopped(String),
}

/// Passes the visible answer on to the turn's events and keeps it, for a
/// turn stopped midway.
struct Shown<'a> {
    events: &'a UnboundedSender<TurnEvent>,
    text: Mutex<String>,
    /// When the request was sent, and how long until its first text.
    sent: Instant,
    first: std::sync::OnceLock<Duration>,
}

impl TextSink for Shown<'_> {
    fn push(&self, fragment: &str) {
        self.first.get_or_init(|| self.sent.elapsed());
        self.text.lock().expect("shown poisoned").push_str(fragment);
        self.events.push(fragment);
    }
}

/// How one model reply continues the turn.
enum Step {
    Answer(Message, FinishReason),
    ToolCalls(Message, FinishReason),
}

/// The conversation engine shared by every surface.
pub struct Engine {
    model: Arc<dyn ChatModel>,
    tools: Arc<dyn ToolHost>,
    store: Arc<dyn Store>,
    settings: EngineSettings,
    /// The salt of the pseudonyms sent as `user`, read once from the store.
    salt: tokio::sync::OnceCell<String>,
    live: Mutex<HashMap<String, Live>>,
    /// Counts turns, for `Live::used`.
    clock: std::sync::atomic::AtomicU64,
    /// Records of replies cut midway (see `billing`), written after their
    /// turn was dropped.
    unbilled: TaskTracker,
    /// Calls that went on in the background as tasks.
    tasks: Arc<BackgroundTasks>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(
        model: Arc<dyn ChatModel>,
        tools: Arc<dyn ToolHost>,
        store: Arc<dyn Store>,
        settings: EngineSettings,
    ) -> Self {
        Engine {
            model,
            tasks: Arc::new(BackgroundTasks::new(tools.clone(), store.clone())),
            tools,
            store,
            settings,
            salt: tokio::sync::OnceCell::new(),
            live: Mutex::new(HashMap::new()),
            clock: Default::default(),
            unbilled: TaskTracker::new(),
        }
    }

    /// The calls that went on in the background as tasks.
    pub fn tasks(&self) -> &Arc<BackgroundTasks> {
        &self.tasks
    }

    /// Waits until the replies of turns dropped midway are recorded for
    /// billing (before the store is closed).
    pub async fn flush(&self) {
        self.unbilled.close();
        self.unbilled.wait().await;
        self.unbilled.reopen();
    }

    /// One model request whose reply is kept for billing when its usage
    /// does not arrive (see `billing`); `stop` drops it midway.
    async fn complete(
        &self,
        conversation: &str,
        request: ChatRequest<'_>,
        events: &UnboundedSender<TurnEvent>,
        stop: &CancellationToken,
    ) -> Result<Reply, ModelError> {
        let shown = Shown {
            events,
            text: Mutex::default(),
            sent: Instant::now(),
            first: std::sync::OnceLock::new(),
        };
        let model = request.model.to_owned();
        let visible = Unthink::new(&shown);
        let in_flight = InFlight::new(
            &visible,
            self.store.clone(),
            self.unbilled.clone(),
            conversation,
            request.model,
        );
        let result = tokio::select! {
            result = self.model.complete(request, &in_flight) => result,
            () = stop.cancelled() => {
                in_flight.finish(false).await;
                return Ok(Reply::Stopped(shown.text.into_inner().expect("shown poisoned")));
            }
        };
        crate::metrics::model_request(&model, shown.sent.elapsed(), shown.first.get().copied());
        let reported = result.as_ref().is_ok_and(|c| c.usage.reported());
        let generation = in_flight.finish(reported).await;
        result.map(|completion| Reply::Done(Box::new(completion), generation))
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Runs one turn: stores `input`, then asks the model and runs its tool
    /// calls until it answers or the round limit is hit. Events go to
    /// `events`; a failure is also sent as `TurnEvent::Error`. Every turn
    /// logs one line saying how it ended.
    #[tracing::instrument(name = "turn", skip_all, fields(conversation = %conversation))]
    pub async fn run_turn(
        &self,
        conversation: &str,
        input: impl Into<TurnInput>,
        events: &UnboundedSender<TurnEvent>,
        approver: &dyn Approver,
    ) -> Result<TurnOutcome, TurnError> {
        let turn = self.with_live(conversation, |live| live.turn.clone());
        let _turn = turn.lock().await;
        let started = Instant::now();
        let mut outcome = TurnOutcome::default();
        let input = input.into();
        let kept = input.kept;
        let result = self
            .turn(conversation, input, events, approver, &mut outcome)
            .await;
        // The person is told to send it again, so it is not kept either.
        if let (Err(TurnError::InputNotStored(_)), Some(position)) = (&result, kept)
            && let Err(error) = self.store.drop_input(conversation, position).await
        {
            tracing::warn!(conversation, %error, "could not forget an input that was not stored");
        }
        outcome.duration = started.elapsed();
        // Stopped before its message was stored: nothing of it is kept.
        if let (true, Some(position)) = (outcome.stopped, kept)
            && let Err(error) = self.store.drop_input(conversation, position).await
        {
            tracing::warn!(conversation, %error, "could not forget the input of a stopped turn");
        }
        crate::metrics::turn(
            match &result {
                Err(_) => "failed",
                Ok(()) if outcome.stopped => "stopped",
                Ok(()) if outcome.answered => "answered",
                Ok(()) => "round_limit",
            },
            outcome.duration,
        );
        match result {
            Ok(()) => {
                tracing::info!(
                    conversation,
                    model = %outcome.model,
                    outcome = if outcome.stopped {
                        "stopped"
                    } else if outcome.answered {
                        "answered"
                    } else {
                        "round_limit"
                    },
                    rounds = outcome.rounds,
                    tool_calls = outcome.tool_calls,
                    prompt_tokens = outcome.usage.prompt_tokens,
                    cached_tokens = outcome.usage.cached_tokens,
                    cache_write_tokens = outcome.usage.cache_write_tokens,
                    cached_percent = outcome.usage.cached_percent(),
                    completion_tokens = outcome.usage.completion_tokens,
                    cost = outcome.usage.cost,
                    duration_ms = outcome.duration.as_millis() as u64,
                    answered = outcome.answered,
                    "turn finished"
                );
                Ok(outcome)
            }
            Err(error) => {
                tracing::warn!(
                    conversation,
                    model = %outcome.model,
                    outcome = "failed",
                    error_kind = error.kind(),
                    rounds = outcome.rounds,
                    tool_calls = outcome.tool_calls,
                    duration_ms = outcome.duration.as_millis() as u64,
                    %error,
                    "turn failed"
                );
                let _ = events.send(TurnEvent::Error(error.to_string()));
                Err(error)
            }
        }
    }

    /// Forgets a kept input without answering it (a surface refused it).
    pub async fn forget_input(&self, conversation: &str, position: u64) -> Result<(), StoreError> {
        self.store.drop_input(conversation, position).await
    }

    /// The model `conversation` uses. Never waits for a running turn.
    pub async fn model_of(&self, conversation: &str) -> Result<String, StoreError> {
        let chosen = match self.with_live(conversation, |live| live.model.clone()) {
            Some(chosen) => chosen,
            None => {
                let chosen = self.store.model(conversation).await?;
                self.with_live(conversation, |live| {
                    live.model.get_or_insert(chosen).clone()
                })
            }
        };
        Ok(chosen.unwrap_or_else(|| self.settings.default_model.clone()))
    }

    /// Switches `conversation` to `model` after checking the catalogue.
    /// `None` goes back to the default model. A running turn keeps the
    /// model it started with.
    pub async fn set_model(
        &self,
        conversation: &str,
        model: Option<&str>,
    ) -> Result<String, TurnError> {
        if let Some(model) = model {
            self.check_model(model).await?;
        }
        self.store
            .set_model(conversation, model)
            .await
            .map_err(TurnError::SettingNotStored)?;
        self.with_live(conversation, |live| {
            live.model = Some(model.map(str::to_owned));
        });
        Ok(model.unwrap_or(&self.settings.default_model).to_owned())
    }

    /// Refuses a model the catalogue does not list, or one without tools.
    pub async fn check_model(&self, model: &str) -> Result<(), ModelError> {
        match self.model.model_info(model).await {
            ModelLookup::Known(info) if info.supports_tools == Some(false) => {
                Err(ModelError::NoToolSupport {
                    model: model.to_owned(),
                })
            }
            ModelLookup::Known(_) | ModelLookup::Unavailable => Ok(()),
            ModelLookup::Unlisted => Err(ModelError::UnknownModel {
                model: model.to_owned(),
            }),
        }
    }

    /// Removes the last exchange (the last input and its answer) from what
    /// the model sees; the rows stay, marked replaced. With `of`, only when
    /// the last input has that position. Waits for a running turn to end
    /// (a surface stops it first). `false` when nothing was undone.
    pub async fn undo(&self, conversation: &str, of: Option<u64>) -> Result<bool, StoreError> {
        let turn = self.with_live(conversation, |live| live.turn.clone());
        let _turn = turn.lock().await;
        let undone = self
            .store
            .replace(conversation, Replace::Exchange, of)
            .await?;
        self.with_live(conversation, |live| {
            live.history = None;
            live.bytes = 0;
        });
        Ok(undone)
    }

    /// The last input of `conversation` (for who may retry it).
    pub async fn last_input(&self, conversation: &str) -> Result<Option<LastInput>, StoreError> {
        self.store.last_input(conversation).await
    }

    /// Waits until the turn `conversation` is running, if any, has ended.
    pub async fn settle(&self, conversation: &str) {
        let turn = self.with_live(conversation, |live| live.turn.clone());
        drop(turn.lock().await);
    }

    /// Clears `conversation`'s history and closes its MCP sessions. It
    /// waits for a running turn to end (a surface stops it first).
    pub async fn reset(&self, conversation: &str) -> Result<(), StoreError> {
        let turn = self.with_live(conversation, |live| live.turn.clone());
        let _turn = turn.lock().await;
        self.store.reset(conversation).await?;
        self.with_live(conversation, |live| {
            live.history = Some(Vec::new());
            live.bytes = 0;
            live.start = 0;
        });
        self.tools.close_conversation(conversation).await;
        Ok(())
    }

    async fn turn(
        &self,
        conversation: &str,
        input: TurnInput,
        events: &UnboundedSender<TurnEvent>,
        approver: &dyn Approver,
        outcome: &mut TurnOutcome,
    ) -> Result<(), TurnError> {
        let model = self
            .model_of(conversation)
            .await
            .map_err(TurnError::InputNotStored)?;
        outcome.model.clone_from(&model);
        let (mut history, mut start) = self
            .take_history(conversation)
            .await
            .map_err(TurnError::InputNotStored)?;
        retire_tool_images(&mut history);
        // Until this turn ends cleanly the cache may lag behind the store
        // (an aborted turn), so it is only put back at the end.
        // Storing the message, reading the catalogue and starting tool
        // sessions overlap; the model is only asked once all three are done.
        let TurnInput {
            mut ask,
            kept,
            stop,
            place,
        } = input;
        if stop.is_cancelled() {
            self.put_history(conversation, history, start);
            outcome.stopped = true;
            return Ok(());
        }
        let prompt = match self.system_prompt_of(conversation).await {
            Ok(prompt) => prompt,
            Err(error) => {
                self.put_history(conversation, history, start);
                return Err(TurnError::InputNotStored(error));
            }
        };
        // The time goes with the new message, where it never changes.
        if prompt.as_deref().is_some_and(prompt::wants_time)
            && let Ask::New(message) | Ask::Edited { message, .. } = &mut ask
        {
            let note = prompt::time_note(self.settings.clock.now(), &self.settings.timezone);
            message.content = Some(format!(
                "{note}{}",
                message.content.take().unwrap_or_default()
            ));
        }
        // A replace may be stored even when what follows it fails.
        let rewrites = !matches!(ask, Ask::New(_));
        let off = match self.servers_off(conversation).await {
            Ok(off) => off,
            Err(error) => {
                self.put_history(conversation, history, start);
                return Err(TurnError::InputNotStored(error));
            }
        };
        let ready = async {
            tokio::join!(
                self.take(conversation, ask, kept),
                self.model.model_info(&model),
                self.tools.tools_for_turn(conversation, events, &off),
            )
        };
        // Waiting for a tool session can take long: a stop ends it. The
        // input may be stored or not, so the history is read again next
        // time (the cache is not put back).
        let (taken, lookup, tools) = tokio::select! {
            ready = ready => ready,
            () = stop.cancelled() => {
                outcome.stopped = true;
                let _ = events.send(TurnEvent::Stopped);
                return Ok(());
            }
        };
        match taken {
            Ok(Taken::Appended(message)) => history.push(*message),
            Ok(Taken::Replaced) => match self.store.history(conversation).await {
                Ok(stored) => {
                    history = repair(stored).0;
                    start = start.min(history.len().saturating_sub(1));
                }
                Err(error) => {
                    // The cache no longer matches the store: read it next time.
                    return Err(TurnError::NotRetried(error));
                }
            },
            Err(error) => {
                // After a replace the cache may no longer match the store:
                // it is read again next time.
                if !rewrites {
                    self.put_history(conversation, history, start);
                }
                return Err(error);
            }
        }
        let author = history
            .iter()
            .rev()
            .find(|m| m.position.is_some())
            .and_then(|m| m.author.clone());
        let user = match &author {
            Some(author) => self.pseudonym(author).await,
            None => None,
        };
        let turn_start = history.len();
        let info = lookup.info();
        for problem in &tools.problems {
            let _ = events.send(TurnEvent::Warning(problem.clone()));
        }
        if !tools.specs.is_empty() && info.is_some_and(|i| i.supports_tools == Some(false)) {
            self.put_history(conversation, history, start);
            return Err(ModelError::NoToolSupport { model }.into());
        }
        // The prefix of every request stays byte-identical while the
        // conversation goes on, so that providers can cache it: tools in
        // one order whatever failed, and no time or date in the prompt.
        let mut specs = tools.specs.clone();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let system = system_prompt(prompt.as_deref(), &place, &history, &tools.instructions);
        let context = info
            .and_then(|i| i.context_length)
            .unwrap_or(self.settings.fallback_context_tokens);
        let sees_images = info.is_some_and(|i| i.supports_images);
        let budget = self.history_budget(context, system.as_deref(), &specs);
        // The provider that answered with signed reasoning, for the rest
        // of the turn (its signatures are only valid there).
        let mut pin: Option<String> = None;
        // Every round's request, but for its messages and pin.
        let reasoning = match self.reasoning_of(conversation).await {
            Ok(effort) => effort,
            Err(error) => {
                tracing::warn!(conversation, %error, "the reasoning setting could not be read; the default is used");
                None
            }
        };
        let every_round = ChatRequest {
            model: &model,
            system: system.as_deref(),
            messages: &[],
            tools: &specs,
            session: Some(conversation),
            user: user.as_deref(),
            pin: None,
            reasoning,
        };

        let result = loop {
            if stop.is_cancelled() {
                outcome.stopped = true;
                let _ = events.send(TurnEvent::Stopped);
                break Ok(());
            }
            let fitted = fit_to_context(&history, start, budget);
            if fitted > start {
                let dropped = history[..fitted]
                    .iter()
                    .filter(|m| m.role() == Role::User)
                    .count();
                let _ = events.send(TurnEvent::Warning(format!(
                    "The conversation is longer than {model} can read; the {dropped} oldest exchange(s) are left out of what it sees."
                )));
            }
            start = fitted;
            let pinned = pin.clone();
            let request = ChatRequest {
                messages: &history[start..],
                pin: pinned.as_deref(),
                ..every_round
            };
            let reply = match self.complete(conversation, request, events, &stop).await {
                Ok(reply) => reply,
                Err(ModelError::NoEndpoint { .. }) if pin.is_some() => {
                    // The pinned provider is gone: once more anywhere, with
                    // this turn's reasoning left out for the rest of it (no
                    // other provider accepts its signatures).
                    tracing::info!(conversation, provider = ?pin, "pinned provider has no endpoint; trying unpinned");
                    pin = None;
                    for message in &mut history[turn_start..] {
                        message.reasoning = None;
                        message.reasoning_details = None;
                    }
                    let request = ChatRequest {
                        messages: &history[start..],
                        ..every_round
                    };
                    match self.complete(conversation, request, events, &stop).await {
                        Ok(reply) => reply,
                        Err(error) => break Err(error.into()),
                    }
                }
                Err(error) => break Err(error.into()),
            };
            let (completion, generation) = match reply {
                Reply::Done(completion, generation) => (*completion, generation),
                Reply::Stopped(shown) => {
                    outcome.stopped = true;
                    break self
                        .keep_stopped(conversation, &model, shown, &mut history, events)
                        .await;
                }
            };
            outcome.rounds += 1;
            outcome.usage.add(completion.usage);
            crate::metrics::billed(&model, &completion.usage);
            if pin.is_none()
                && completion.message.reasoning_details.is_some()
                && let Some(provider) = &completion.provider
            {
                pin = Some(provider.clone());
            }
            let usage = completion.usage;
            match step(completion, &model) {
                Ok(Step::Answer(message, finish)) => {
                    let text = message.text().to_owned();
                    if let Err(error) = self
                        .store
                        .append(conversation, std::slice::from_ref(&message))
                        .await
                    {
                        break Err(TurnError::AnswerNotStored(error));
                    }
                    history.push(message);
                    if finish == FinishReason::Length {
                        let _ = events.send(TurnEvent::Warning(
                            "The answer was cut off at the model's output limit. Ask it to continue.".into(),
                        ));
                    }
                    let reasoning = history[turn_start..]
                        .iter()
                        .any(|m| m.reasoning.as_ref().is_some_and(|r| !r.trim().is_empty()));
                    let _ = events.send(TurnEvent::Answer { text, reasoning });
                    outcome.answered = true;
                    break Ok(());
                }
                Ok(Step::ToolCalls(mut message, finish)) => {
                    rename_reused_ids(&mut message, &history);
                    // Billed before the tools run: a turn cut while they run
                    // never stores this message, and the reply cost all the same.
                    if let Some(usage) = message.usage.take() {
                        billing::keep_billed(
                            self.store.as_ref(),
                            conversation,
                            &model,
                            generation.clone(),
                            usage,
                        )
                        .await;
                    }
                    let exhausted = outcome.rounds > self.settings.max_tool_rounds;
                    let (mut results, images) = if exhausted {
                        let declined =
                            decline_all(&message.tool_calls, self.settings.max_tool_rounds);
                        (declined, Vec::new())
                    } else {
                        let calls = Calls {
                            conversation,
                            specs: &tools.specs,
                            events,
                            approver,
                            stop: &stop,
                            author: author.as_ref(),
                            tasks: Mutex::default(),
                        };
                        self.run_calls(&calls, &message.tool_calls).await
                    };
                    keep_valid_arguments(&mut message, &mut results, finish);
                    outcome.tool_calls += message.tool_calls.len();
                    let mut group = Vec::with_capacity(results.len() + 2);
                    group.push(message);
                    group.extend(results);
                    // Tool messages carry text only; a model that reads images
                    // gets them in a message of their own right after.
                    if sees_images && !images.is_empty() {
                        group.push(Message {
                            images,
                            ..Message::user(TOOL_IMAGES_NOTE)
                        });
                    }
                    if let Err(error) = self.store.append(conversation, &group).await {
                        break Err(TurnError::ToolsNotStored(error));
                    }
                    history.extend(group);
                    if exhausted {
                        let _ = events.send(TurnEvent::Warning(format!(
                            "Stopped after {} rounds of tool calls without an answer. Say \"continue\" to let it go on.",
                            self.settings.max_tool_rounds
                        )));
                        break Ok(());
                    }
                }
                Err(error) => {
                    // Not kept as a message, but billed all the same.
                    if usage.reported() {
                        billing::keep_billed(
                            self.store.as_ref(),
                            conversation,
                            &model,
                            generation,
                            usage,
                        )
                        .await;
                    }
                    break Err(error.into());
                }
            }
        };
        self.put_history(conversation, history, start);
        result
    }

    /// The input step of a turn: stores a new (or edited) message, or
    /// replaces the last answer for a retry, and forgets the kept input.
    async fn take(
        &self,
        conversation: &str,
        ask: Ask,
        kept: Option<u64>,
    ) -> Result<Taken, TurnError> {
        let (mut message, replaces) = match ask {
            Ask::New(message) => (message, None),
            Ask::Edited { message, of } => (message, Some(of)),
            Ask::Again { of } => {
                let replaced = self
                    .store
                    .replace(conversation, Replace::Answer, of)
                    .await
                    .map_err(TurnError::NotRetried)?;
                if let Some(position) = kept
                    && let Err(error) = self.store.drop_input(conversation, position).await
                {
                    tracing::warn!(conversation, %error, "could not forget a retry that was done");
                }
                return match replaced {
                    true => Ok(Taken::Replaced),
                    false => Err(TurnError::NothingToRetry),
                };
            }
        };
        // An edited message keeps its place; its kept input has its own.
        message.position = Some(replaces.or(kept).unwrap_or_else(fresh_position));
        let replaced = match replaces {
            Some(of) => self
                .store
                .replace(conversation, Replace::Exchange, Some(of))
                .await
                .map_err(TurnError::InputNotStored)?,
            None => false,
        };
        let stored = match kept {
            Some(position) => {
                self.store
                    .take_input(conversation, position, &message)
                    .await
            }
            None => {
                self.store
                    .append(conversation, std::slice::from_ref(&message))
                    .await
            }
        };
        stored.map_err(TurnError::InputNotStored)?;
        Ok(match replaced {
            true => Taken::Replaced,
            false => Taken::Appended(Box::new(message)),
        })
    }

    /// Keeps what was shown of an answer the person stopped, marked as
    /// stopped (nothing, when nothing was shown), and says it stopped.
    async fn keep_stopped(
        &self,
        conversation: &str,
        model: &str,
        shown: String,
        history: &mut Vec<Message>,
        events: &UnboundedSender<TurnEvent>,
    ) -> Result<(), TurnError> {
        let _ = events.send(TurnEvent::Stopped);
        let text = without_speaker_prefix(&shown).trim_end();
        if text.trim().is_empty() {
            return Ok(());
        }
        let message = Message {
            model: Some(model.to_owned()),
            stopped: true,
            ..Message::assistant(text)
        };
        self.store
            .append(conversation, std::slice::from_ref(&message))
            .await
            .map_err(TurnError::AnswerNotStored)?;
        history.push(message);
        Ok(())
    }

    /// The system prompt of `conversation`: its own, or the global one.
    /// Never waits for a running turn.
    pub async fn system_prompt_of(&self, conversation: &str) -> Result<Option<String>, StoreError> {
        let own = match self.with_live(conversation, |live| live.system.clone()) {
            Some(own) => own,
            None => {
                let own = self.store.system_prompt(conversation).await?;
                self.with_live(conversation, |live| live.system.get_or_insert(own).clone())
            }
        };
        Ok(own.or_else(|| self.settings.system_prompt.clone()))
    }

    /// The tool host.
    pub(super) fn tools(&self) -> &dyn ToolHost {
        self.tools.as_ref()
    }

    /// The MCP servers switched off in `conversation`.
    pub async fn servers_off(&self, conversation: &str) -> Result<Vec<String>, StoreError> {
        if let Some(off) = self.with_live(conversation, |live| live.off.clone()) {
            return Ok(off);
        }
        let off = self.store.servers_off(conversation).await?;
        Ok(self.with_live(conversation, |live| live.off.get_or_insert(off).clone()))
    }

    /// Switches servers off (and the others on) in `conversation`; the
    /// sessions of those switched off are closed. A running turn keeps
    /// the tools it started with.
    pub async fn set_servers_off(
        &self,
        conversation: &str,
        off: &[String],
    ) -> Result<(), TurnError> {
        let before = self.servers_off(conversation).await.unwrap_or_default();
        self.store
            .set_servers_off(conversation, off)
            .await
            .map_err(TurnError::SettingNotStored)?;
        self.with_live(conversation, |live| live.off = Some(off.to_vec()));
        for server in off.iter().filter(|s| !before.contains(s)) {
            self.tools.close_server(conversation, server).await;
        }
        Ok(())
    }

    /// The reasoning effort `conversation` asks for (`None`: the default).
    pub async fn reasoning_of(
        &self,
        conversation: &str,
    ) -> Result<Option<ReasoningEffort>, StoreError> {
        if let Some(effort) = self.with_live(conversation, |live| live.reasoning) {
            return Ok(effort);
        }
        let effort = self.store.reasoning(conversation).await?;
        Ok(self.with_live(conversation, |live| *live.reasoning.get_or_insert(effort)))
    }

    /// Sets (or with `None` goes back to the default) the reasoning effort.
    pub async fn set_reasoning(
        &self,
        conversation: &str,
        effort: Option<ReasoningEffort>,
    ) -> Result<(), TurnError> {
        self.store
            .set_reasoning(conversation, effort)
            .await
            .map_err(TurnError::SettingNotStored)?;
        self.with_live(conversation, |live| live.reasoning = Some(effort));
        Ok(())
    }

    /// The words of a voice note in `conversation`: heard by its own model
    /// when the catalogue says it takes audio, otherwise by
    /// `TRANSCRIPTION_MODEL`. What it costs counts in the conversation's
    /// usage.
    pub async fn transcribe(
        &self,
        conversation: &str,
        audio: AudioPart,
    ) -> Result<String, ModelError> {
        let model = self
            .model_of(conversation)
            .await
            .unwrap_or_else(|_| self.settings.default_model.clone());
        let hears = self
            .model
            .model_info(&model)
            .await
            .info()
            .is_some_and(|i| i.supports_audio);
        let transcriber = match (&self.settings.transcription_model, hears) {
            (_, true) => model,
            (Some(transcriber), false) => transcriber.clone(),
            (None, false) => return Err(ModelError::CannotHear { model }),
        };
        let message = Message {
            audio: vec![audio],
            ..Message::user(TRANSCRIBE)
        };
        let messages = [message];
        let request = ChatRequest::new(&transcriber, &messages, &[]);
        let completion = self.model.complete(request, &()).await?;
        crate::metrics::billed(&transcriber, &completion.usage);
        if completion.usage.reported() {
            billing::keep_billed(
                self.store.as_ref(),
                conversation,
                &transcriber,
                None,
                completion.usage,
            )
            .await;
        }
        let text = completion.message.text().trim().to_owned();
        if text.is_empty() {
            return Err(ModelError::Empty);
        }
        Ok(text)
    }

    /// The reasoning of the answer to the input at `position`.
    pub async fn reasoning_for(
        &self,
        conversation: &str,
        position: u64,
    ) -> Result<Vec<String>, StoreError> {
        self.store.reasoning_of(conversation, position).await
    }

    /// Whether `conversation` has a system prompt of its own.
    pub async fn has_own_prompt(&self, conversation: &str) -> Result<bool, StoreError> {
        self.system_prompt_of(conversation).await?;
        Ok(self.with_live(conversation, |live| live.system.clone().flatten().is_some()))
    }

    /// Sets (or with `None` clears) the system prompt of `conversation`.
    /// A running turn keeps the prompt it started with.
    pub async fn set_system_prompt(
        &self,
        conversation: &str,
        prompt: Option<&str>,
    ) -> Result<(), TurnError> {
        self.store
            .set_system_prompt(conversation, prompt)
            .await
            .map_err(TurnError::SettingNotStored)?;
        self.with_live(conversation, |live| {
            live.system = Some(prompt.map(str::to_owned));
        });
        Ok(())
    }

    /// Gives a new conversation the model and system prompt of `from` (a
    /// thread those of its channel), where it has none of its own.
    pub async fn inherit(&self, conversation: &str, from: &str) -> Result<(), StoreError> {
        self.store.inherit(conversation, from).await?;
        self.with_live(conversation, |live| {
            live.model = None;
            live.system = None;
        });
        Ok(())
    }

    /// A stable pseudonym of `author` for the endpoint's abuse isolation: a
    /// salted hash of their id, never the id. `None` when the store could
    /// not give the salt (the request goes without it).
    async fn pseudonym(&self, author: &Author) -> Option<String> {
        let salt = self
            .salt
            .get_or_try_init(|| self.store.instance_salt())
            .await
            .inspect_err(|error| tracing::warn!(%error, "no salt for user pseudonyms"))
            .ok()?;
        Some(pseudonym(salt, author.id))
    }

    /// Runs every call of one reply concurrently and returns one tool message
    /// per call, in the order of the calls, and the images they returned.
    async fn run_calls(&self, turn: &Calls<'_>, calls: &[ToolCall]) -> (Vec<Message>, Vec<String>) {
        let (calls, skipped) = calls.split_at(calls.len().min(MAX_CALLS_PER_REPLY));
        if !skipped.is_empty() {
            let _ = turn.events.send(TurnEvent::Warning(format!(
                "The model asked for {} tool calls at once; the first {MAX_CALLS_PER_REPLY} were run and the rest were not.",
                calls.len() + skipped.len()
            )));
        }
        for call in calls {
            let _ = turn.events.send(TurnEvent::ToolStarted {
                call_id: call.id.clone(),
                name: call.name.clone(),
                arguments: compact_arguments(&call.arguments),
            });
        }
        let runs = calls.iter().map(|call| async move {
            // A stop cancels the call (its MCP request is cancelled on the
            // server, a pending approval withdrawn).
            let outcome = tokio::select! {
                outcome = self.run_call(turn, call) => outcome,
                () = turn.stop.cancelled() => ToolOutcome::error(INTERRUPTED),
            };
            let _ = turn.events.send(TurnEvent::ToolFinished {
                call_id: call.id.clone(),
                name: call.name.clone(),
                ok: !outcome.is_error,
                summary: summarise(&outcome.content),
                full_output: outcome.full_output.clone(),
                links: outcome.links.clone(),
            });
            (
                Message::tool_result(call.id.clone(), outcome.content),
                outcome.images,
            )
        });
        let (mut messages, images): (Vec<Message>, Vec<Vec<String>>) =
            join_all(runs).await.into_iter().unzip();
        // Tasks still waited for belong to calls that were stopped (or
        // failed midway): they are cancelled too.
        let stopped: Vec<TaskRecord> =
            std::mem::take(&mut *turn.tasks.lock().expect("tasks poisoned"));
        for record in stopped {
            let ticket = &record.ticket;
            if let Err(problem) = self.tools.cancel_task(turn.conversation, ticket).await {
                tracing::warn!(task = %ticket.task_id, %problem, "a stopped call's task could not be cancelled");
            }
            if let Err(error) = self.store.drop_task(turn.conversation, ticket).await {
                tracing::warn!(%error, task = %ticket.task_id, "a cancelled task could not be forgotten");
            }
        }
        messages.extend(skipped.iter().map(|call| {
            Message::tool_result(
                call.id.clone(),
                format!("ERROR: not run: at most {MAX_CALLS_PER_REPLY} tool calls of one reply are run. Ask for fewer at once."),
            )
        }));
        (messages, images.concat())
    }

    /// One call: arguments parsed, approval asked when the tool needs it,
    /// then run. Every failure is an error outcome for the model.
    async fn run_call(&self, turn: &Calls<'_>, call: &ToolCall) -> ToolOutcome {
        let arguments = match parse_arguments(&call.arguments) {
            Ok(arguments) => arguments,
            Err(problem) => return ToolOutcome::error(problem),
        };
        let Some(spec) = turn.specs.iter().find(|s| s.name == call.name) else {
            // Also a tool of a server switched off here.
            let names: Vec<&str> = turn.specs.iter().map(|s| s.name.as_str()).collect();
            return ToolOutcome::no_such_tool(&call.name, &names);
        };
        let needs_approval = spec.needs_approval;
        if needs_approval {
            let request = ApprovalRequest {
                conversation: turn.conversation.to_owned(),
                call_id: call.id.clone(),
                tool: call.name.clone(),
                arguments: compact_arguments(&call.arguments),
            };
            let decision = turn.approver.decide(&request).await;
            crate::metrics::approval(decision == Decision::Approve);
            if let Decision::Decline(reason) = decision {
                let _ = turn.events.send(TurnEvent::Warning(format!(
                    "The call to {} was declined: {reason}",
                    call.name
                )));
                return ToolOutcome::error(format!(
                    "the user declined this tool call ({reason}). Do not retry it unless asked."
                ));
            }
        }
        let progress = CallProgress {
            engine: self,
            turn,
            call,
        };
        let started = Instant::now();
        let outcome = self
            .tools
            .call_reporting(turn.conversation, &call.name, arguments, &progress)
            .await;
        crate::metrics::tool_call(
            &spec.server,
            &call.name,
            outcome.is_error,
            started.elapsed(),
        );
        outcome
    }

    /// Tokens left for the history once the system prompt, the tools and
    /// the answer are accounted for.
    fn history_budget(&self, context: u64, system: Option<&str>, tools: &[ToolSpec]) -> usize {
        let system = system.map_or(0, |s| estimate_tokens(&Message::user(s)));
        let tools: usize = tools
            .iter()
            .map(|t| (t.name.len() + t.description.len() + t.parameters.to_string().len()) / 4)
            .sum();
        let reserve = ANSWER_RESERVE_TOKENS.min(context / 4);
        let fixed = (system + tools) as u64 + reserve;
        context.saturating_sub(fixed).max(1) as usize
    }

    /// Takes the cached history, loading and repairing it when needed, and
    /// how much of it was last left out to fit the context.
    async fn take_history(&self, conversation: &str) -> Result<(Vec<Message>, usize), StoreError> {
        let used = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cached, start) = self.with_live(conversation, |live| {
            live.used = used;
            live.bytes = 0;
            (live.history.take(), live.start)
        });
        if let Some(history) = cached {
            return Ok((history, start));
        }
        let (history, changes) = repair(self.store.history(conversation).await?);
        if changes > 0 {
            tracing::warn!(
                conversation,
                changes,
                "repaired a history left incomplete by an interrupted turn"
            );
        }
        Ok((history, 0))
    }

    /// Puts a turn's history back in the cache, then forgets the least
    /// recently used idle histories while the cache is over its bounds.
    fn put_history(&self, conversation: &str, history: Vec<Message>, start: usize) {
        let mut live = self.live.lock().expect("live map poisoned");
        let state = live.entry(conversation.to_owned()).or_default();
        state.bytes = history.iter().map(approximate_bytes).sum();
        state.history = Some(history);
        state.start = start;
        forget_least_used(&mut live);
    }

    /// Runs `f` on the state of `conversation` under the map lock.
    fn with_live<T>(&self, conversation: &str, f: impl FnOnce(&mut Live) -> T) -> T {
        let mut live = self.live.lock().expect("live map poisoned");
        let result = f(live.entry(conversation.to_owned()).or_default());
        // Settings reads of many conversations must not grow the map either.
        if live.len() > MAX_CACHED_CONVERSATIONS {
            forget_least_used(&mut live);
        }
        result
    }

    /// How many conversations have state in memory, and the bytes of their
    /// cached histories (for tests and the benchmark).
    pub fn cached(&self) -> (usize, usize) {
        let live = self.live.lock().expect("live map poisoned");
        (live.len(), live.values().map(|l| l.bytes).sum())
    }
}

/// Forgets cached histories, least recently used first, while there are
/// more than `MAX_CACHED_CONVERSATIONS` or more than
/// `MAX_CACHED_HISTORY_BYTES` of them. Conversations with a running turn
/// keep their state; idle ones without a cached history are dropped.
fn forget_least_used(live: &mut HashMap<String, Live>) {
    let idle = |state: &Live| Arc::strong_count(&state.turn) == 1;
    let mut count = live.values().filter(|l| l.history.is_some()).count();
    let mut bytes: usize = live.values().map(|l| l.bytes).sum();
    if count > MAX_CACHED_CONVERSATIONS || bytes > MAX_CACHED_HISTORY_BYTES {
        let mut order: Vec<(u64, String)> = live
            .iter()
            .filter(|(_, l)| l.history.is_some() && idle(l))
            .map(|(k, l)| (l.used, k.clone()))
            .collect();
        order.sort_unstable();
        for (_, key) in order {
            if count <= MAX_CACHED_CONVERSATIONS && bytes <= MAX_CACHED_HISTORY_BYTES {
                break;
            }
            if let Some(state) = live.get_mut(&key) {
                state.history = None;
                bytes -= state.bytes;
                state.bytes = 0;
                count -= 1;
            }
        }
    }
    if live.len() > MAX_CACHED_CONVERSATIONS {
        live.retain(|_, l| l.history.is_some() || !idle(l));
    }
}

/// What a message takes in memory, roughly: its text, images and calls.
fn approximate_bytes(message: &Message) -> usize {
    message.content.as_ref().map_or(0, String::len)
        + message.reasoning.as_ref().map_or(0, String::len)
        + message.images.iter().map(String::len).sum::<usize>()
        + message.files.iter().map(|f| f.data.len()).sum::<usize>()
        + message
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.arguments.len())
            .sum::<usize>()
}

/// A provider that numbers calls per reply (`call_0`, `call_1`…) reuses ids
/// across replies; strict providers refuse a history where two calls share
/// an id, so a reused id is replaced before anything refers to it.
fn rename_reused_ids(message: &mut Message, history: &[Message]) {
    let used: std::collections::HashSet<&str> = history
        .iter()
        .flat_map(|m| m.tool_calls.iter().map(|c| c.id.as_str()))
        .collect();
    let reused: Vec<usize> = (0..message.tool_calls.len())
        .filter(|&i| used.contains(message.tool_calls[i].id.as_str()))
        .collect();
    for i in reused {
        message.tool_calls[i].id = ToolCall::fresh_id();
    }
}

/// Images that tools returned in earlier turns are not sent again: the
/// model saw them in the turn they came, and re-sending megabytes on every
/// later request costs each time. What they were stays in the text.
fn retire_tool_images(history: &mut [Message]) {
    for message in history.iter_mut() {
        if message.role() == Role::User
            && message.text() == TOOL_IMAGES_NOTE
            && !message.images.is_empty()
        {
            let count = message.images.len();
            message.images.clear();
            message.content = Some(format!(
                "({count} image(s) returned by the tool calls above were shown in that turn and are not sent again.)"
            ));
        }
    }
}

/// The system prompt of a turn: `prompt` with its placeholders filled, a
/// sentence about the names before messages when people are named, and
/// what the tool servers say about using them.
fn system_prompt(
    prompt: Option<&str>,
    place: &Place,
    history: &[Message],
    instructions: &[(String, String)],
) -> Option<String> {
    let mut parts: Vec<String> = prompt.map(|p| prompt::fill(p, place)).into_iter().collect();
    if history.iter().any(|m| m.author.is_some()) {
        parts.push(SPEAKERS_NOTE.to_owned());
    }
    parts.extend(instructions.iter().map(|(server, text)| {
        format!("How to use the tools of {server}, as that server says:\n{text}")
    }));
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// Decides how a model reply continues the turn. Tool calls count even when
/// `finish_reason` says otherwise.
fn step(completion: Completion, model: &str) -> Result<Step, ModelError> {
    let mut message = completion.message;
    message.role = Some(Role::Assistant);
    message.model = Some(model.to_owned());
    // Unreported usage is billed after the fact (see `billing`), so it is
    // not also kept here as zero.
    message.usage = completion.usage.reported().then_some(completion.usage);
    if let Some(text) = &message.content
        && let (Some(thought), answer) = split_think(text)
    {
        message.reasoning.get_or_insert(thought);
        message.content =
            (!answer.is_empty() || message.tool_calls.is_empty()).then(|| answer.to_owned());
    }
    if !message.tool_calls.is_empty() {
        return Ok(Step::ToolCalls(message, completion.finish_reason));
    }
    if let Some(text) = &message.content {
        let answer = without_speaker_prefix(text);
        message.content = Some(with_sources(answer, &completion.citations));
    }
    // Nothing is kept of an empty reply: no provider accepts an empty
    // assistant message in a later request.
    if message.text().trim().is_empty() {
        return Err(match completion.finish_reason {
            FinishReason::Length => ModelError::NothingBeforeLimit,
            _ => ModelError::Empty,
        });
    }
    Ok(Step::Answer(message, completion.finish_reason))
}

/// An answer that starts the way user messages do (`<@id> (name): `), as
/// models copy what they see, without that start.
fn without_speaker_prefix(text: &str) -> &str {
    let strip = || {
        let rest = text.trim_start().strip_prefix("<@")?;
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let rest = rest[digits..].strip_prefix('>')?.trim_start();
        let rest = match rest.strip_prefix('(') {
            Some(named) => named.split_once(')')?.1,
            None => rest,
        };
        Some(rest.strip_prefix(':')?.trim_start())
    };
    strip().unwrap_or(text)
}

/// The answer, then the pages a web search cited, as links.
fn with_sources(answer: &str, citations: &[Citation]) -> String {
    if citations.is_empty() {
        return answer.to_owned();
    }
    let mut text = format!("{}\n\nSources:", answer.trim_end());
    for citation in citations {
        let title = citation.title.replace(['[', ']'], "");
        text.push_str(&format!("\n- [{title}](<{}>)", citation.url));
    }
    text
}

/// A position for an input that has none from its surface (the terminal):
/// shaped like a Discord id (milliseconds in the high bits), and growing.
fn fresh_position() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = (billing::unix_now().max(0) as u64 * 1000) << 22;
    let previous = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or_default();
    now.max(previous + 1)
}

/// `u_` and 16 hex digits of SHA-256 over the salt and the id.
fn pseudonym(salt: &str, id: u64) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{salt}:{id}").as_bytes());
    format!("u_{}", &hex::encode(digest)[..16])
}

/// Calls whose arguments are not a JSON object are stored with `{}`, so
/// the history sent later is valid for every endpoint; the model is told,
/// in the call's result, why it did not run (cut off by the output limit,
/// or not JSON).
fn keep_valid_arguments(message: &mut Message, results: &mut [Message], finish: FinishReason) {
    for (call, result) in message.tool_calls.iter_mut().zip(results.iter_mut()) {
        if valid_arguments(&call.arguments) {
            continue;
        }
        // Empty arguments ran as `{}`; anything else did not run.
        let ran = call.arguments.trim().is_empty();
        call.arguments = "{}".into();
        if finish == FinishReason::Length && !ran {
            result.content = Some(CUT_CALL.into());
        }
    }
}

/// Parses the model's argument text. Empty text means no arguments.
fn parse_arguments(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(
            "the arguments must be a JSON object. Call the tool again with a JSON object.".into(),
        ),
        Err(error) => Err(format!(
            "the arguments are not valid JSON ({error}). Call the tool again with a valid JSON object."
        )),
    }
}

fn decline_all(calls: &[ToolCall], rounds: usize) -> Vec<Message> {
    calls
        .iter()
        .map(|call| {
            let text = format!(
                "ERROR: not run: this turn already used its {rounds} tool rounds. Answer with what you have."
            );
            Message::tool_result(call.id.clone(), text)
        })
        .collect()
}

/// The arguments as compact one-line JSON (or as sent, when not JSON).
fn compact_arguments(text: &str) -> String {
    serde_json::from_str::<Value>(text).map_or_else(|_| text.to_owned(), |v| v.to_string())
}

/// The first line of a result, cut to `SUMMARY_CHARS` characters.
fn summarise(content: &str) -> String {
    let line = content
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if line.chars().count() > SUMMARY_CHARS {
        let cut: String = line.chars().take(SUMMARY_CHARS).collect();
        format!("{cut}…")
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_arguments_mean_an_empty_object() {
        assert_eq!(parse_arguments("  ").unwrap(), serde_json::json!({}));
        assert_eq!(
            parse_arguments(r#"{"a":1}"#).unwrap(),
            serde_json::json!({"a":1})
        );
    }

    #[test]
    fn bad_arguments_explain_themselves() {
        assert!(
            parse_arguments("{oops")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(parse_arguments("[1]").unwrap_err().contains("JSON object"));
    }

    #[test]
    fn summaries_are_one_short_line() {
        assert_eq!(summarise("\n first \nsecond"), "first");
        let long = "y".repeat(300);
        assert_eq!(summarise(&long).chars().count(), SUMMARY_CHARS + 1);
    }
}
