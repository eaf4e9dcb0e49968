//! The domain: conversations, turns and the agent loop.
//!
//! Nothing here knows about HTTP, SQLite, MCP or Discord. The three ports
//! ([`ChatModel`], [`ToolHost`], [`Store`]) are implemented by adapters in
//! `llm`, `mcp` and `store`; surfaces (terminal, Discord) drive a [`Engine`]
//! and render the [`TurnEvent`]s it emits.

mod audio;
pub mod billing;
pub mod elicitation;
mod engine;
mod history;
pub mod offers;
mod picked;
mod ports;
mod prompt;
pub mod tasks;
mod think;
mod types;
mod workers;

pub use audio::{AudioError, LONGEST_AUDIO, audio_part};
pub use elicitation::{Answer, Question, QuestionKind};
pub use engine::{
    Ask, Engine, EngineSettings, MAX_CALLS_PER_REPLY, TurnError, TurnInput, TurnOutcome,
};
pub use history::{estimate_tokens, fit_to_context, repair};
pub use ports::{
    ApprovalRequest, ApproveAll, Approver, CallContext, ChatModel, ChatRequest, Citation,
    Completion, Decision, DeclineAll, FinishReason, GenerationLookup, Hold, LastInput, ModelError,
    ModelInfo, ModelLookup, Notices, Replace, ResourceLink, Store, StoreError, TextSink,
    TimedApprover, ToolHost, ToolList, ToolOutcome, Unbilled, UnbilledUpdate,
};
pub use prompt::{Clock, Place};
pub use tasks::{BackgroundTasks, TaskPoll, TaskRecord, TaskSink, TaskStep, TaskTicket};
pub use types::{
    AttachmentRef, AudioPart, Author, FilePart, Inbound, Message, ReasoningEffort, Redo, Role,
    ToolCall, ToolSpec, TurnEvent, Usage, UsageTotals, cached_percent,
};
pub use workers::{Accepted, Arrival, Claims, RunningTurn, Stopped, TurnRunner, Workers};
