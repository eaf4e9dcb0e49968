//! The domain: conversations, turns and the agent loop.
//!
//! Nothing here knows about HTTP, SQLite, MCP or Discord. The three ports
//! ([`ChatModel`], [`ToolHost`], [`Store`]) are implemented by adapters in
//! `llm`, `mcp` and `store`; surfaces (terminal, Discord) drive a [`Engine`]
//! and render the [`TurnEvent`]s it emits.

mod engine;
mod history;
mod ports;
mod types;

pub use engine::{Engine, EngineSettings, MAX_CALLS_PER_REPLY, TurnError, TurnOutcome};
pub use history::{estimate_tokens, fit_to_context, repair};
pub use ports::{
    ApprovalRequest, ApproveAll, Approver, ChatModel, ChatRequest, Completion, Decision,
    DeclineAll, FinishReason, ModelError, ModelInfo, ModelLookup, Store, StoreError, TextSink,
    ToolHost, ToolList, ToolOutcome,
};
pub use types::{Message, Role, ToolCall, ToolSpec, TurnEvent, Usage};
