use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// One tool call requested by the model. `arguments` is the JSON text exactly
/// as the model produced it, so the history sent back is byte-identical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// An id no provider sent: the process start time and a counter, so it
    /// is unique across the conversation and across restarts.
    pub fn fresh_id() -> String {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static START: OnceLock<u128> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let start = START.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        });
        format!("call_mc{start:x}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Tokens and cost of one model response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    /// Prompt tokens read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache.
    #[serde(default)]
    pub cache_write_tokens: u64,
}

impl Usage {
    /// Whether the endpoint said anything of it (a reply cut before its
    /// last chunk reports nothing).
    pub fn reported(&self) -> bool {
        self.prompt_tokens > 0 || self.completion_tokens > 0 || self.cost > 0.0
    }

    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost += other.cost;
        self.cached_tokens += other.cached_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
    }

    /// The share of prompt tokens read from the cache, in percent.
    pub fn cached_percent(&self) -> u64 {
        cached_percent(self.cached_tokens, self.prompt_tokens)
    }
}

/// `cached` as a whole percentage of `prompt` (0 when there is no prompt).
pub fn cached_percent(cached: u64, prompt: u64) -> u64 {
    (cached.min(prompt) * 100).checked_div(prompt).unwrap_or(0)
}

/// Tokens and cost summed over some messages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageTotals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    pub responses: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
}

impl UsageTotals {
    /// The share of prompt tokens read from the cache, in percent.
    pub fn cached_percent(&self) -> u64 {
        cached_percent(self.cached_tokens, self.prompt_tokens)
    }
}

/// How hard a reasoning model thinks (OpenRouter's `reasoning.effort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningEffort {
    Minimal,
    Low,
    Medium,
    High,
}

impl ReasoningEffort {
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value.trim().to_ascii_lowercase().as_str() {
            "minimal" => ReasoningEffort::Minimal,
            "low" => ReasoningEffort::Low,
            "medium" => ReasoningEffort::Medium,
            "high" => ReasoningEffort::High,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Minimal => "minimal",
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// A document attached to a message: its name and its bytes as a `data:`
/// URL (`data:application/pdf;base64,…`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FilePart {
    pub name: String,
    pub data: String,
}

/// Audio sent to a model that hears: its format (`ogg`, `mp3`, `wav`…)
/// and its bytes in base64.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AudioPart {
    pub format: String,
    pub data: String,
}

/// The person who wrote a user message, as the surface knows them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Author {
    /// The surface's id (a Discord user id).
    pub id: u64,
    /// The name shown for them where the message was written.
    pub name: String,
}

/// One message of a conversation, as stored and as sent to the model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub role: Option<Role>,
    /// Text content; `None` for an assistant message that only calls tools.
    pub content: Option<String>,
    /// Images attached to a user message, as `data:` URLs (the bytes are
    /// kept, so nothing depends on a link that expires).
    pub images: Vec<String>,
    /// Documents (PDFs) attached to a user message, with their bytes.
    pub files: Vec<FilePart>,
    /// Audio to transcribe. Only in a transcription request: a voice note
    /// is kept as its transcript, never as audio.
    pub audio: Vec<AudioPart>,
    /// Who wrote a user message, when the surface has several people.
    pub author: Option<Author>,
    pub tool_calls: Vec<ToolCall>,
    /// For `Role::Tool`: the call this message answers.
    pub tool_call_id: Option<String>,
    /// Provider reasoning, sent back unchanged.
    pub reasoning: Option<String>,
    pub reasoning_details: Option<Value>,
    /// The documents OpenRouter parsed for an assistant message (its
    /// `file` annotations), sent back with it so they are not parsed again.
    pub file_annotations: Option<Value>,
    /// Which model wrote an assistant message, and what it cost.
    pub model: Option<String>,
    pub usage: Option<Usage>,
    /// An answer the person stopped midway: its text is what was shown.
    pub stopped: bool,
    /// For a person's message (the input of a turn): its place in the
    /// conversation (see `Inbound::position`).
    pub position: Option<u64>,
}

impl Message {
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Some(Role::User),
            content: Some(text.into()),
            ..Default::default()
        }
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Message {
            role: Some(Role::Assistant),
            content: Some(text.into()),
            ..Default::default()
        }
    }

    pub fn tool_result(call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Message {
            role: Some(Role::Tool),
            content: Some(text.into()),
            tool_call_id: Some(call_id.into()),
            ..Default::default()
        }
    }

    pub fn role(&self) -> Role {
        self.role.unwrap_or(Role::User)
    }

    pub fn text(&self) -> &str {
        self.content.as_deref().unwrap_or("")
    }
}

/// A tool offered to the model: the exposed name (`server__tool`), a
/// description and a JSON Schema already normalised for strict providers.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: Value,
    /// Whether a person must approve each call (never sent to the model).
    pub needs_approval: bool,
    /// The configured server that offers it (for listings; never sent).
    pub server: String,
}

/// A message accepted from a person and kept in the store until its turn
/// takes it, so that it survives a restart, a crash or a failed turn.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Inbound {
    /// Its place in the conversation: inputs are answered in this order. A
    /// Discord message id, which grows with the time the message was sent.
    #[serde(skip)]
    pub position: u64,
    /// Who sent it, as the surface numbers people (a Discord user id).
    #[serde(skip)]
    pub author: u64,
    /// Their name where they wrote it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub author_name: String,
    pub text: String,
    /// Files to fetch when the turn starts (not before: a slow download
    /// must not hold up the messages after it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentRef>,
    /// Set when this input redoes an earlier one rather than adding to
    /// the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redo: Option<Redo>,
}

/// An input that redoes the exchange of the input at position `of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redo {
    /// Retry: its answer again (the input has no text of its own).
    Retry { of: u64 },
    /// The message was edited: this input carries its new text.
    Edit { of: u64 },
}

/// A file attached to an inbound message, not yet fetched.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AttachmentRef {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// What a turn reports while it runs. Surfaces render these.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnEvent {
    /// A fragment of the model's answer, as it streams.
    Text(String),
    /// The model asked for a tool; `arguments` is compact JSON text.
    ToolStarted {
        call_id: String,
        name: String,
        arguments: String,
    },
    /// A running call's server reported progress.
    ToolProgress {
        call_id: String,
        name: String,
        progress: f64,
        total: Option<f64>,
        message: Option<String>,
    },
    /// A tool call finished. `summary` is one line; `full_output` is set when
    /// the model only saw a truncated result.
    ToolFinished {
        call_id: String,
        name: String,
        ok: bool,
        summary: String,
        full_output: Option<String>,
        /// Resources the result points to, for people to read.
        links: Vec<super::ports::ResourceLink>,
    },
    /// The final answer of the turn; `reasoning` when the model's
    /// reasoning for it is kept (see `Store::reasoning_of`).
    Answer { text: String, reasoning: bool },
    /// The person stopped the turn; what was shown of the answer is kept.
    Stopped,
    /// Something the user should know that did not stop the turn.
    Warning(String),
    /// The turn could not finish; the sentence says why and what to do.
    Error(String),
}
