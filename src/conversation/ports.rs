//! The traits the domain owns; adapters implement them.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::elicitation::{Answer, Question};
use super::offers::{PromptInfo, ResourceContent, ResourceInfo};
use super::tasks::{TaskPoll, TaskRecord, TaskStep, TaskTicket};
use super::types::{Inbound, Message, ReasoningEffort, ToolSpec, Usage};

/// One request to the model.
#[derive(Debug, Clone, Copy)]
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub messages: &'a [Message],
    pub tools: &'a [ToolSpec],
    /// The conversation, so that the endpoint can keep its requests on
    /// the provider that holds its prompt cache.
    pub session: Option<&'a str>,
    /// A stable pseudonym of the person who asked (never their real id).
    pub user: Option<&'a str>,
    /// The provider that answered this turn's first round, when its
    /// reasoning must be continued there (signed reasoning).
    pub pin: Option<&'a str>,
    /// The conversation's reasoning effort, over the configured one.
    pub reasoning: Option<ReasoningEffort>,
}

impl<'a> ChatRequest<'a> {
    /// A request with no session, person or pinned provider.
    pub fn new(model: &'a str, messages: &'a [Message], tools: &'a [ToolSpec]) -> Self {
        ChatRequest {
            model,
            system: None,
            messages,
            tools,
            session: None,
            user: None,
            pin: None,
            reasoning: None,
        }
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    ToolCalls,
    /// The answer hit the output token limit and is cut off.
    Length,
    ContentFilter,
    Other,
}

/// The model's reply to one request: an assistant message and its usage.
#[derive(Debug, Clone)]
pub struct Completion {
    pub message: Message,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// The provider that served it, when the endpoint says.
    pub provider: Option<String>,
    /// Pages a server-side web search cited, in order.
    pub citations: Vec<Citation>,
}

/// A page the answer cites.
#[derive(Debug, Clone, PartialEq)]
pub struct Citation {
    pub url: String,
    pub title: String,
}

/// What the catalogue knows about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    /// `None` when the catalogue does not say.
    pub context_length: Option<u64>,
    /// `None` when the catalogue does not say (servers that list models
    /// without their parameters): tools are offered and the endpoint judges.
    pub supports_tools: Option<bool>,
    pub supports_images: bool,
    /// Whether it hears audio (`input_audio` parts).
    pub supports_audio: bool,
    /// Whether `reasoning` may be sent to it.
    pub supports_reasoning: bool,
}

/// The answer of the model catalogue about one model.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLookup {
    Known(ModelInfo),
    /// The catalogue was read and does not list the model.
    Unlisted,
    /// No catalogue could be read (an endpoint without `GET /models`, or a
    /// failure); nothing is known either way.
    Unavailable,
}

impl ModelLookup {
    pub fn info(&self) -> Option<&ModelInfo> {
        match self {
            ModelLookup::Known(info) => Some(info),
            _ => None,
        }
    }
}

/// Model failures a caller branches on. Each `Display` is a sentence for the
/// person using the bot: what happened and what to do.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error(
        "The OpenRouter account is out of credits (HTTP 402). Add credits at openrouter.ai, or pick a free model."
    )]
    CreditsExhausted,
    #[error("The OpenRouter API key was rejected (HTTP 401). Check OPENROUTER_API_KEY.")]
    InvalidKey,
    #[error(
        "The model {model} cannot use tools (no provider supports tool calls for it). Pick another model."
    )]
    NoToolSupport { model: String },
    #[error("The model {model} does not exist. Pick another model.")]
    UnknownModel { model: String },
    #[error(
        "{model} cannot hear audio and no TRANSCRIPTION_MODEL is set, so voice notes cannot be understood here. Type your message, or ask the bot's owner to set TRANSCRIPTION_MODEL to a model that takes audio."
    )]
    CannotHear { model: String },
    #[error(
        "No provider can serve this request right now ({message}). Try again in a moment, or pick another model."
    )]
    NoEndpoint { message: String },
    #[error(
        "The conversation is too long for this model's context window. Start over with a reset, or pick a model with a larger context."
    )]
    ContextTooLong,
    #[error("The model is rate limited right now (HTTP 429). Try again in a minute.")]
    RateLimited { retry_after: Option<Duration> },
    #[error(
        "The model did not answer in time. Try again; if it keeps happening, pick another model."
    )]
    Timeout,
    #[error("The request was refused (HTTP 403): {message}")]
    Forbidden { message: String },
    #[error("The model provider failed: {message}. Try again in a moment.")]
    Provider {
        status: Option<u16>,
        message: String,
    },
    #[error(
        "The model service could not be reached: {message}. Check OPENROUTER_BASE_URL and the network."
    )]
    Connection { message: String },
    #[error("The request was rejected (HTTP {status}): {message}")]
    BadRequest { status: u16, message: String },
    #[error("The model returned no answer. Try again.")]
    Empty,
    #[error(
        "The model reached its output limit before it wrote anything (it may have been thinking, or starting a tool call). Ask for something shorter, or pick a model with a larger output limit."
    )]
    NothingBeforeLimit,
    #[error(
        "The answer was cut off: the model's stream ended before the answer was complete, so it was not kept. Send your message again."
    )]
    Cut,
    #[error(
        "The model endpoint sent something that is not an answer: {message}. Check OPENROUTER_BASE_URL (it must be an OpenAI-compatible API such as https://openrouter.ai/api/v1)."
    )]
    Unreadable { message: String },
    #[error(
        "The model's answer was larger than {limit_bytes} bytes (MODEL_MAX_RESPONSE_BYTES) and was dropped. Ask for a shorter answer."
    )]
    TooLarge { limit_bytes: usize },
}

impl ModelError {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::CreditsExhausted => "credits_exhausted",
            ModelError::InvalidKey => "invalid_key",
            ModelError::NoToolSupport { .. } => "no_tool_support",
            ModelError::UnknownModel { .. } => "unknown_model",
            ModelError::CannotHear { .. } => "cannot_hear",
            ModelError::NoEndpoint { .. } => "no_endpoint",
            ModelError::ContextTooLong => "context_too_long",
            ModelError::RateLimited { .. } => "rate_limited",
            ModelError::Timeout => "timeout",
            ModelError::Forbidden { .. } => "forbidden",
            ModelError::Provider { .. } => "provider",
            ModelError::Connection { .. } => "connection",
            ModelError::BadRequest { .. } => "bad_request",
            ModelError::Empty => "empty",
            ModelError::NothingBeforeLimit => "nothing_before_limit",
            ModelError::Cut => "cut",
            ModelError::Unreadable { .. } => "unreadable",
            ModelError::TooLarge { .. } => "too_large",
        }
    }

    /// What went wrong, in a few words, for a log line about a retry.
    pub fn brief(&self) -> String {
        match self {
            ModelError::RateLimited { .. } => "rate limited (HTTP 429)".into(),
            ModelError::Timeout => "timed out".into(),
            ModelError::Provider {
                status: Some(status),
                message,
            } => format!("HTTP {status}: {message}"),
            ModelError::Provider { message, .. } | ModelError::Connection { message } => {
                message.clone()
            }
            ModelError::BadRequest { status, message } => format!("HTTP {status}: {message}"),
            other => other.to_string(),
        }
    }
}

/// Where streamed answer text goes while a reply is being written.
pub trait TextSink: Send + Sync {
    fn push(&self, fragment: &str);

    /// The endpoint's id of the reply being written, as soon as it is
    /// known, so that a reply whose usage never arrives can be billed
    /// later (see [`ChatModel::generation`]).
    fn generation(&self, _id: &str) {}
}

/// Discards the text (for callers that only want the whole reply).
impl TextSink for () {
    fn push(&self, _fragment: &str) {}
}

impl TextSink for tokio::sync::mpsc::UnboundedSender<super::TurnEvent> {
    fn push(&self, fragment: &str) {
        let _ = self.send(super::TurnEvent::Text(fragment.to_owned()));
    }
}

/// The language model (OpenRouter or any OpenAI-compatible endpoint).
#[async_trait]
pub trait ChatModel: Send + Sync {
    /// Sends one request. Text fragments are passed to `text` as they
    /// stream; the whole reply is returned at the end.
    async fn complete(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError>;

    /// What the catalogue says about `model`.
    async fn model_info(&self, model: &str) -> ModelLookup;

    /// Every model the catalogue lists (empty when none could be read).
    /// Whether the endpoint reads documents (PDFs) sent as `file` parts.
    fn reads_documents(&self) -> bool {
        false
    }
    async fn models(&self) -> Vec<ModelInfo> {
        Vec::new()
    }

    /// What the endpoint billed for the reply `id` (see
    /// [`TextSink::generation`]).
    async fn generation(&self, _id: &str) -> GenerationLookup {
        GenerationLookup::Unsupported
    }
}

/// What an endpoint says of one earlier reply's usage.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationLookup {
    Billed(Usage),
    /// Not recorded yet (OpenRouter answers 404 for a while).
    NotYet,
    /// The lookup failed; trying again later may work.
    Failed(String),
    /// The endpoint cannot say.
    Unsupported,
}

/// A reply whose usage never arrived (its stream was cut, stopped or
/// failed), kept until the endpoint says what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Unbilled {
    pub generation_id: String,
    pub conversation: String,
    pub model: String,
    /// Lookups made so far.
    pub attempts: u32,
}

/// What became of a lookup of an [`Unbilled`] reply.
#[derive(Debug, Clone, PartialEq)]
pub enum UnbilledUpdate {
    /// The usage is known; it counts from now on.
    Billed(Usage),
    /// Look again at `at` (Unix seconds).
    RetryAt { attempts: u32, at: i64 },
    /// No more lookups; the reply stays uncounted.
    GaveUp,
}

/// The tools of one conversation, and the problems met collecting them.
#[derive(Debug, Clone, Default)]
pub struct ToolList {
    pub specs: Vec<ToolSpec>,
    /// One sentence per server that could not be used this turn.
    pub problems: Vec<String>,
    /// What servers say about using them (server, text), in a fixed order.
    pub instructions: Vec<(String, String)>,
    /// Keeps the sessions behind `specs` for this turn while held: the host
    /// does not close them for others until it is dropped.
    pub hold: Hold,
}

/// Something a port keeps alive for as long as a caller holds it.
#[derive(Clone, Default)]
pub struct Hold(Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl Hold {
    pub fn new(held: impl std::any::Any + Send + Sync) -> Self {
        Hold(Some(std::sync::Arc::new(held)))
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hold(..)"
        } else {
            "Hold(none)"
        })
    }
}

/// Where a port tells the person something while a turn waits on it.
pub trait Notices: Send + Sync {
    fn notice(&self, text: String);
}

/// Nobody to tell (commands, checks).
impl Notices for () {
    fn notice(&self, _text: String) {}
}

impl Notices for tokio::sync::mpsc::UnboundedSender<super::TurnEvent> {
    fn notice(&self, text: String) {
        let _ = self.send(super::TurnEvent::Warning(text));
    }
}

/// The result of one tool call, already shaped for the model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolOutcome {
    /// What the model sees (capped, with a visible truncation marker).
    pub content: String,
    pub is_error: bool,
    /// The whole output, when `content` had to be truncated.
    pub full_output: Option<String>,
    /// Images the tool returned, as data URLs.
    pub images: Vec<String>,
    /// Resources it pointed to (`resource_link`), for people to read.
    pub links: Vec<ResourceLink>,
}

/// A resource a tool result points to: the server whose tool returned it
/// (which can read it), its URI and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceLink {
    pub server: String,
    pub uri: String,
    pub name: String,
}

impl ToolOutcome {
    /// The result of a call to a tool that is not offered.
    pub fn no_such_tool(name: &str, known: &[&str]) -> Self {
        ToolOutcome::error(format!(
            "there is no tool named {name:?}. Available tools: {}.",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ))
    }

    pub fn error(message: impl Into<String>) -> Self {
        ToolOutcome {
            content: format!("ERROR: {}", message.into()),
            is_error: true,
            full_output: None,
            images: Vec::new(),
            links: Vec::new(),
        }
    }
}

/// The MCP side: tools per conversation and calls to them.
#[async_trait]
pub trait ToolHost: Send + Sync {
    /// The tools `conversation` may use, starting sessions as needed.
    async fn tools(&self, conversation: &str) -> ToolList;
    /// The same for a turn, without the servers in `off` (switched off in
    /// this conversation; they are not started). A host that has to wait
    /// (for a free session) says so through `notices`.
    async fn tools_for_turn(
        &self,
        conversation: &str,
        notices: &dyn Notices,
        off: &[String],
    ) -> ToolList {
        let _ = notices;
        let mut list = self.tools(conversation).await;
        list.specs.retain(|s| !off.contains(&s.server));
        list
    }
    /// The prompts the servers on in `conversation` offer (not those in
    /// `off`).
    async fn prompts(&self, conversation: &str, off: &[String]) -> Vec<PromptInfo> {
        let _ = (conversation, off);
        Vec::new()
    }
    /// The prompt `name` of `server`, filled in with `arguments`: the text
    /// of a person's turn. The error is a sentence.
    async fn get_prompt(
        &self,
        conversation: &str,
        server: &str,
        name: &str,
        arguments: serde_json::Map<String, Value>,
        context: &dyn CallContext,
    ) -> Result<String, String> {
        let _ = (conversation, arguments, context);
        Err(format!(
            "the tool server \"{server}\" offers no prompt \"{name}\""
        ))
    }
    /// Values the server suggests for `argument` of its prompt `prompt`,
    /// typed so far as `value` (MCP completion); none when it offers none.
    async fn complete_argument(
        &self,
        conversation: &str,
        server: &str,
        prompt: &str,
        argument: &str,
        value: &str,
    ) -> Vec<String> {
        let _ = (conversation, server, prompt, argument, value);
        Vec::new()
    }
    /// The resources and resource templates the servers on offer.
    async fn resources(&self, conversation: &str, off: &[String]) -> Vec<ResourceInfo> {
        let _ = (conversation, off);
        Vec::new()
    }
    /// Reads `uri` from `server`'s session in `conversation`.
    async fn read_resource(
        &self,
        conversation: &str,
        server: &str,
        uri: &str,
    ) -> Result<Vec<ResourceContent>, String> {
        let _ = (conversation, uri);
        Err(format!("the tool server \"{server}\" offers no resources"))
    }
    /// The most characters of one result (or resource) the model sees.
    fn result_max_chars(&self) -> usize {
        20_000
    }
    /// The names of the servers `conversation` could use.
    async fn servers(&self, conversation: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .tools(conversation)
            .await
            .specs
            .into_iter()
            .map(|s| s.server)
            .collect();
        names.dedup();
        names
    }
    /// Closes `conversation`'s session of `server` (switched off there).
    async fn close_server(&self, conversation: &str, server: &str) {
        let _ = (conversation, server);
    }
    /// Runs one call. Every failure (unknown tool, timeout, crash, error
    /// result) comes back as an error outcome, never as a panic or `Err`.
    async fn call(&self, conversation: &str, name: &str, arguments: Value) -> ToolOutcome;
    /// The same, telling `progress` what the server reports as it goes.
    async fn call_reporting(
        &self,
        conversation: &str,
        name: &str,
        arguments: Value,
        progress: &dyn CallContext,
    ) -> ToolOutcome {
        let _ = progress;
        self.call(conversation, name, arguments).await
    }
    /// Closes the sessions that belong to `conversation`.
    async fn close_conversation(&self, conversation: &str);
    /// Asks the server of a call that became a task how it is going.
    async fn poll_task(&self, conversation: &str, task: &TaskTicket) -> TaskPoll {
        let _ = conversation;
        TaskPoll::Done(ToolOutcome::error(format!(
            "the tool server \"{}\" runs no tasks",
            task.server
        )))
    }
    /// Asks the server to stop the task. The error is a sentence.
    async fn cancel_task(&self, conversation: &str, task: &TaskTicket) -> Result<(), String> {
        let _ = conversation;
        Err(format!("the tool server \"{}\" runs no tasks", task.server))
    }
}

/// What a running call reaches besides its result: where its progress
/// goes (MCP `notifications/progress`), and who answers its server's
/// questions (MCP elicitation).
#[async_trait]
pub trait CallContext: Send + Sync {
    /// `progress` of `total` (when known), with the server's message.
    fn progress(&self, progress: f64, total: Option<f64>, message: Option<String>);

    /// Asks the person; where nobody can be asked, the question is
    /// declined.
    async fn elicit(&self, question: Question) -> Answer {
        let _ = question;
        Answer::Decline
    }

    /// The call became a task on its server (MCP tasks), which finished
    /// or went on in the background.
    async fn task(&self, ticket: &TaskTicket, step: TaskStep) {
        let _ = (ticket, step);
    }
}

impl CallContext for () {
    fn progress(&self, _progress: f64, _total: Option<f64>, _message: Option<String>) {}
}

/// Why the store failed. Each `Display` is a sentence; callers add what
/// became of the person's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or brought up to date.
    #[error("the database could not be opened: {0}")]
    Open(String),
    /// This process may not write the database; the sentence says whose
    /// files are in the way and how to fix it.
    #[error("{0}")]
    NotWritable(String),
    /// Another writer held the database for longer than the wait allows.
    #[error("the database was busy (another writer held it too long): {0}")]
    Busy(String),
    /// The database server could not be reached (or is restarting).
    #[error("the database server could not be reached: {0}")]
    Unreachable(String),
    /// The disk is full.
    #[error("the disk holding the database is full: {0}")]
    Full(String),
    /// Something stored cannot be read back.
    #[error("the database holds a record that cannot be read: {0}")]
    Corrupt(String),
    /// Any other failure of the database.
    #[error("database error: {0}")]
    Failed(String),
}

impl StoreError {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Open(_) => "open",
            StoreError::NotWritable(_) => "not_writable",
            StoreError::Busy(_) => "busy",
            StoreError::Unreachable(_) => "unreachable",
            StoreError::Full(_) => "full",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Failed(_) => "failed",
        }
    }

    /// Whether trying the same thing again soon may work.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Busy(_) | StoreError::Unreachable(_))
    }
}

/// The last input of a conversation: a person's message and its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastInput {
    /// Its position (`None` for messages stored before positions were).
    pub position: Option<u64>,
    pub author: Option<u64>,
}

/// What of an exchange is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// What answered the input (Retry): the input stays.
    Answer,
    /// The input and its answer (an edit, `/undo`).
    Exchange,
}

/// Persistence of conversations and their messages.
#[async_trait]
pub trait Store: Send + Sync {
    /// The model chosen for `conversation`, if any.
    async fn model(&self, conversation: &str) -> Result<Option<String>, StoreError>;
    async fn set_model(&self, conversation: &str, model: Option<&str>) -> Result<(), StoreError>;
    /// The system prompt set for `conversation`, if any.
    async fn system_prompt(&self, conversation: &str) -> Result<Option<String>, StoreError>;
    async fn set_system_prompt(
        &self,
        conversation: &str,
        prompt: Option<&str>,
    ) -> Result<(), StoreError>;
    /// The MCP servers switched off in `conversation`.
    async fn servers_off(&self, conversation: &str) -> Result<Vec<String>, StoreError>;
    async fn set_servers_off(&self, conversation: &str, off: &[String]) -> Result<(), StoreError>;
    /// The reasoning effort set for `conversation`, if any.
    async fn reasoning(&self, conversation: &str) -> Result<Option<ReasoningEffort>, StoreError>;
    async fn set_reasoning(
        &self,
        conversation: &str,
        effort: Option<ReasoningEffort>,
    ) -> Result<(), StoreError>;
    /// The reasoning of the answer to the input at `position` (each round's,
    /// in order), while that answer is not replaced.
    async fn reasoning_of(
        &self,
        conversation: &str,
        position: u64,
    ) -> Result<Vec<String>, StoreError>;
    /// Gives `conversation` the model and system prompt of `from` where it
    /// has none of its own (a new thread, from its channel).
    async fn inherit(&self, conversation: &str, from: &str) -> Result<(), StoreError>;
    /// The history, oldest first, exactly as stored (see `history::repair`).
    async fn history(&self, conversation: &str) -> Result<Vec<Message>, StoreError>;
    /// Appends `messages` in one transaction: all of them or none.
    async fn append(&self, conversation: &str, messages: &[Message]) -> Result<(), StoreError>;
    /// Deletes the history of `conversation` (its model choice and its
    /// kept inputs stay).
    async fn reset(&self, conversation: &str) -> Result<(), StoreError>;
    /// The last input of `conversation` that is not replaced.
    async fn last_input(&self, conversation: &str) -> Result<Option<LastInput>, StoreError>;
    /// Marks `what` of the last input's exchange as replaced: kept, but no
    /// longer part of the history. With `of`, only when the last input has
    /// that position. `false` when nothing matched.
    async fn replace(
        &self,
        conversation: &str,
        what: Replace,
        of: Option<u64>,
    ) -> Result<bool, StoreError>;

    /// Keeps `input` until a turn takes it. `false` when an input at that
    /// position is already kept (the same message delivered twice).
    async fn keep_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError>;
    /// Every kept input, by conversation and then position.
    async fn kept_inputs(&self) -> Result<Vec<(String, Inbound)>, StoreError>;
    /// Appends `message` as the turn's input and forgets the kept input at
    /// `position`, in one transaction: the input is always in one place.
    async fn take_input(
        &self,
        conversation: &str,
        position: u64,
        message: &Message,
    ) -> Result<(), StoreError>;
    /// Forgets a kept input without answering it.
    async fn drop_input(&self, conversation: &str, position: u64) -> Result<(), StoreError>;
    /// Replaces a kept input (its message was edited before its turn).
    /// `false` when none is kept at its position any more.
    async fn update_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError>;

    /// Claims `conversation` for the process `owner` until `until` (Unix
    /// seconds): `false` while another owner's claim has not expired by
    /// `now`. Claiming again renews. Stores that serve one process always
    /// grant it.
    async fn claim(
        &self,
        conversation: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let _ = (conversation, owner, now, until);
        Ok(true)
    }
    /// Renews every claim of `owner` until `until`.
    async fn renew_claims(&self, owner: &str, until: i64) -> Result<(), StoreError> {
        let _ = (owner, until);
        Ok(())
    }
    /// Lets go of `owner`'s claim on `conversation` (all of them: `None`).
    async fn release(&self, conversation: Option<&str>, owner: &str) -> Result<(), StoreError> {
        let _ = (conversation, owner);
        Ok(())
    }
    /// Kept inputs received by `received_before` of conversations whose
    /// claim expired by `now` unreleased (their process died), by
    /// conversation and then position. (Inputs of conversations nobody
    /// claims are answered by `Workers::resume` at the next start.)
    async fn unclaimed_inputs(
        &self,
        now: i64,
        received_before: i64,
    ) -> Result<Vec<(String, Inbound)>, StoreError> {
        let _ = (now, received_before);
        Ok(Vec::new())
    }

    /// A random value made once per database and kept in it, for
    /// pseudonyms that are stable but cannot be traced back to an id.
    async fn instance_salt(&self) -> Result<String, StoreError>;

    /// Keeps a tool call its server runs as a task (see `tasks`).
    async fn keep_task(&self, task: &TaskRecord) -> Result<(), StoreError>;
    /// Every kept task, oldest first.
    async fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;
    /// Keeps what the server last said about a task (its `message`).
    async fn note_task(&self, task: &TaskRecord) -> Result<(), StoreError>;
    /// Forgets a task of `conversation` (delivered, finished in its turn,
    /// or cancelled).
    async fn drop_task(&self, conversation: &str, task: &TaskTicket) -> Result<(), StoreError>;

    /// Keeps a reply whose usage never arrived, to be looked up from
    /// `first_try_at` (Unix seconds). The same id twice is kept once.
    async fn keep_unbilled(&self, unbilled: &Unbilled, first_try_at: i64)
    -> Result<(), StoreError>;
    /// The unbilled replies due for a lookup at `now`, oldest first.
    async fn unbilled_due(&self, now: i64) -> Result<Vec<Unbilled>, StoreError>;
    async fn update_unbilled(
        &self,
        generation_id: &str,
        update: &UnbilledUpdate,
    ) -> Result<(), StoreError>;
}

/// A tool call waiting for a person's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRequest {
    pub conversation: String,
    pub call_id: String,
    pub tool: String,
    /// Compact JSON text of the arguments.
    pub arguments: String,
}

/// What the person decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Approve,
    /// Declined; the sentence says why (shown to the model and the user).
    Decline(String),
}

/// Asks a person whether a tool call may run. Each surface has its own
/// (buttons in Discord, a prompt in the terminal).
#[async_trait]
pub trait Approver: Send + Sync {
    async fn decide(&self, request: &ApprovalRequest) -> Decision;

    /// The question about `request` went unanswered for `after` and counts
    /// as declined (see [`TimedApprover`]); a surface may say so where it
    /// asked.
    async fn expired(&self, request: &ApprovalRequest, after: Duration) {
        let _ = (request, after);
    }

    /// Asks what a tool server wants to know. A surface that cannot ask
    /// declines, and says why with [`Approver::not_asked`].
    async fn ask(&self, question: &Question) -> Answer {
        let _ = question;
        Answer::Decline
    }

    /// `question` went unanswered for `after` and counts as cancelled.
    async fn ask_expired(&self, question: &Question, after: Duration) {
        let _ = (question, after);
    }

    /// Why questions are declined without asking, when they are.
    fn not_asked(&self) -> Option<&str> {
        Some("this surface cannot ask questions")
    }
}

/// Asks `inner`, and counts no answer within `timeout` as a decline.
#[derive(Debug, Clone)]
pub struct TimedApprover<A> {
    pub inner: A,
    pub timeout: Duration,
}

#[async_trait]
impl<A: Approver> Approver for TimedApprover<A> {
    async fn decide(&self, request: &ApprovalRequest) -> Decision {
        if let Ok(decision) = tokio::time::timeout(self.timeout, self.inner.decide(request)).await {
            return decision;
        }
        self.inner.expired(request, self.timeout).await;
        Decision::Decline(format!(
            "nobody approved it within {} seconds",
            self.timeout.as_secs()
        ))
    }

    async fn ask(&self, question: &Question) -> Answer {
        if let Ok(answer) = tokio::time::timeout(self.timeout, self.inner.ask(question)).await {
            return answer;
        }
        self.inner.ask_expired(question, self.timeout).await;
        Answer::Cancel
    }

    fn not_asked(&self) -> Option<&str> {
        self.inner.not_asked()
    }
}

/// Approves every call (`mcpcord chat --yes`, and tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApproveAll;

#[async_trait]
impl Approver for ApproveAll {
    async fn decide(&self, _request: &ApprovalRequest) -> Decision {
        Decision::Approve
    }
}

/// Declines every call that needs approval, with a fixed reason.
#[derive(Debug, Clone)]
pub struct DeclineAll(pub String);

#[async_trait]
impl Approver for DeclineAll {
    async fn decide(&self, _request: &ApprovalRequest) -> Decision {
        Decision::Decline(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_log_lines_do_not_claim_the_retries_ran_out() {
        let errors = [
            ModelError::RateLimited { retry_after: None },
            ModelError::Timeout,
            ModelError::Provider {
                status: Some(503),
                message: "overloaded".into(),
            },
        ];
        let briefs: Vec<String> = errors.iter().map(ModelError::brief).collect();
        assert_eq!(
            briefs,
            [
                "rate limited (HTTP 429)",
                "timed out",
                "HTTP 503: overloaded"
            ]
        );
    }
}
