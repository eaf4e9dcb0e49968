//! The OpenAI-compatible wire format: requests, replies, stream chunks and
//! error bodies, translated to and from the domain types.

use serde_json::{Map, Value, json};

use crate::config::{ModelApi, ReasoningEffort, WebSearch};
use crate::conversation::{
    Author, ChatRequest, Citation, Completion, FinishReason, Message, ModelError, ModelInfo, Role,
    TextSink, ToolCall, Usage,
};

/// How requests are written for one endpoint.
#[derive(Debug, Clone)]
pub struct Dialect {
    pub api: ModelApi,
    pub stream: bool,
    /// `REASONING_EFFORT`, sent to models that list `reasoning`.
    pub reasoning: Option<ReasoningEffort>,
    /// `OPENROUTER_PROVIDER`.
    pub provider: Option<Value>,
    pub web_search: Option<WebSearch>,
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect {
            api: ModelApi::OpenRouter,
            stream: true,
            reasoning: None,
            provider: None,
            web_search: None,
        }
    }
}

/// Where a model family wants prompt caching markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caching {
    /// Cached automatically, or not at all: nothing to mark.
    Automatic,
    /// Explicit breakpoints, at most [`MAX_BREAKPOINTS`] (Anthropic, Qwen).
    Breakpoints,
    /// Only the last marker counts (Gemini).
    LastOnly,
}

/// Anthropic refuses a request with more.
pub const MAX_BREAKPOINTS: usize = 4;

/// Anthropic looks back at most 20 blocks from a breakpoint for an earlier
/// cache entry; a bridge is placed when more than this many were added.
pub const BRIDGE_BLOCKS: usize = 15;

/// Which caching markers a model family needs.
fn caching(model: &str) -> Caching {
    let model = model.to_ascii_lowercase();
    if model.starts_with("anthropic/")
        || model.starts_with("qwen/")
        || model.starts_with("alibaba/")
    {
        Caching::Breakpoints
    } else if model.starts_with("google/gemini") {
        Caching::LastOnly
    } else {
        Caching::Automatic
    }
}

/// The request body for `POST /chat/completions`. `info` is what the
/// catalogue says of the model, when it was read.
pub fn request_body(
    request: &ChatRequest<'_>,
    dialect: &Dialect,
    info: Option<&ModelInfo>,
) -> Value {
    let openrouter = dialect.api == ModelApi::OpenRouter;
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = request.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.extend(
        request
            .messages
            .iter()
            .map(|m| message_json(m, openrouter.then_some(request.model))),
    );
    let mut tools: Vec<Value> = Vec::new();
    if openrouter && let Some(search) = dialect.web_search {
        tools.push(json!({"type": "openrouter:web_search", "parameters": {
            "max_results": search.max_results,
            "max_uses": search.max_uses,
        }}));
    }
    let strict_schemas = request.model.starts_with("google/");
    tools.extend(request.tools.iter().map(|tool| {
        let mut parameters = tool.parameters.clone();
        if strict_schemas {
            strip_for_gemini(&mut parameters);
        }
        json!({"type": "function", "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": parameters,
        }})
    }));
    if openrouter {
        mark_cache_breakpoints(
            caching(request.model),
            &mut messages,
            &mut tools,
            request.system.is_some(),
        );
    }
    let mut body = json!({
        "model": request.model,
        "messages": messages,
        "stream": dialect.stream,
    });
    if !tools.is_empty() {
        body["tools"] = Value::Array(tools);
    }
    if let Some(effort) = request.reasoning.or(dialect.reasoning)
        && info.is_some_and(|i| i.supports_reasoning)
    {
        body["reasoning"] = json!({"effort": effort.as_str()});
    }
    if !openrouter {
        if dialect.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        return body;
    }
    if let Some(session) = request.session {
        body["session_id"] = Value::String(session.chars().take(256).collect());
    }
    if let Some(user) = request.user {
        body["user"] = Value::String(user.to_owned());
    }
    // mcpcord fits the context itself; middle-out could separate tool calls
    // from their results.
    body["plugins"] = json!([{"id": "context-compression", "enabled": false}]);
    // Documents are read by OpenRouter's parser, with its free engine
    // (`pdf-text`, its older name, is redirected to it).
    if request.messages.iter().any(|m| !m.files.is_empty()) {
        body["plugins"]
            .as_array_mut()
            .expect("an array")
            .push(json!({"id": "file-parser", "pdf": {"engine": "cloudflare-ai"}}));
    }
    let mut provider = dialect.provider.clone().unwrap_or_else(|| json!({}));
    if let Some(pin) = request.pin {
        provider["order"] = json!([pin]);
        provider["allow_fallbacks"] = Value::Bool(false);
    }
    if provider.as_object().is_some_and(|p| !p.is_empty()) {
        body["provider"] = provider;
    }
    body
}

/// The content blocks a message counts as for the cache lookback.
fn blocks(message: &Value) -> usize {
    let content = match &message["content"] {
        Value::Array(parts) => parts.len(),
        Value::String(text) if !text.is_empty() => 1,
        _ => 0,
    };
    content + message["tool_calls"].as_array().map_or(0, Vec::len)
}

/// Whether a marker may sit on `message`: it has content to carry it (an
/// assistant message that only calls tools has none).
fn markable(message: &Value) -> bool {
    match &message["content"] {
        Value::String(text) => !text.is_empty(),
        Value::Array(parts) => parts.iter().any(|p| p["type"] == "text"),
        _ => false,
    }
}

/// Puts `cache_control` on the last text part of `message`, turning string
/// content into parts (a marker can only sit on a part; never on the
/// message itself, which makes OpenRouter hang on tool messages).
fn mark(message: &mut Value) {
    let marker = json!({"type": "ephemeral"});
    if let Value::String(text) = &message["content"] {
        message["content"] = json!([{"type": "text", "text": text, "cache_control": marker}]);
        return;
    }
    if let Some(part) = message["content"]
        .as_array_mut()
        .and_then(|parts| parts.iter_mut().rev().find(|p| p["type"] == "text"))
    {
        part["cache_control"] = marker;
    }
}

/// Places the prompt caching markers so that each request reads what the
/// one before it wrote:
/// 1. the end of the stable prefix (the system prompt, or the last tool);
/// 2. the newest message of the previous request (the one before the
///    model's latest reply), which that request wrote;
/// 3. the newest message, the new write;
/// 4. a bridge when more than [`BRIDGE_BLOCKS`] blocks lie between 2 and 3.
///
/// Gemini reads only the last marker, so it gets 3 alone.
fn mark_cache_breakpoints(
    caching: Caching,
    messages: &mut [Value],
    tools: &mut [Value],
    has_system: bool,
) {
    let Some(newest) = messages.len().checked_sub(1) else {
        return;
    };
    let nearest_markable =
        |from: usize, floor: usize| (floor..=from).rev().find(|&i| markable(&messages[i]));
    match caching {
        Caching::Automatic => return,
        Caching::LastOnly => {
            if let Some(i) = nearest_markable(newest, 0) {
                mark(&mut messages[i]);
            }
            return;
        }
        Caching::Breakpoints => {}
    }
    let mut marks: Vec<usize> = Vec::with_capacity(MAX_BREAKPOINTS);
    let first = usize::from(has_system);
    if has_system {
        marks.push(0);
    } else if let Some(last) = tools.last_mut() {
        last["cache_control"] = json!({"type": "ephemeral"});
    }
    let previous = messages
        .iter()
        .rposition(|m| m["role"] == "assistant")
        .and_then(|reply| reply.checked_sub(1))
        .filter(|&i| i >= first)
        .and_then(|i| nearest_markable(i, first));
    let tail = nearest_markable(newest, first);
    if let Some(previous) = previous.filter(|&p| Some(p) != tail) {
        marks.push(previous);
    }
    if let (Some(tail), from) = (tail, previous.unwrap_or(first)) {
        let mut added = 0;
        let mut bridge = None;
        for (i, message) in messages.iter().enumerate().take(tail).skip(from + 1) {
            added += blocks(message);
            // The furthest place within reach of the lookback, or else the
            // first place a marker can sit (one reply with many calls).
            if markable(message) && (added <= BRIDGE_BLOCKS || bridge.is_none()) {
                bridge = Some(i);
            }
        }
        added += blocks(&messages[tail]);
        if added > BRIDGE_BLOCKS
            && let Some(bridge) = bridge
            && marks.len() + 2 <= MAX_BREAKPOINTS
        {
            marks.push(bridge);
        }
        if !marks.contains(&tail) {
            marks.push(tail);
        }
    }
    for i in marks {
        mark(&mut messages[i]);
    }
}

/// A user message as the model sees it: who wrote it comes first, as text
/// every provider keeps.
fn user_text(message: &Message) -> String {
    match &message.author {
        Some(author) => format!("{}{}", speaker_prefix(author), message.text()),
        None => message.text().to_owned(),
    }
}

/// `<@id> (Name): `, with a name that cannot break out of its brackets.
pub fn speaker_prefix(author: &Author) -> String {
    let name: String = author
        .name
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '(' | ')' | '<' | '>'))
        .take(64)
        .collect();
    format!("<@{}> ({}): ", author.id, name.trim())
}

/// `reasoning_model`: the model of the request, when reasoning may be
/// replayed at all (OpenRouter's fields; plain endpoints get none).
fn message_json(message: &Message, reasoning_model: Option<&str>) -> Value {
    match message.role() {
        Role::User
            if message.images.is_empty()
                && message.files.is_empty()
                && message.audio.is_empty() =>
        {
            json!({"role": "user", "content": user_text(message)})
        }
        Role::User => {
            let mut parts = vec![json!({"type": "text", "text": user_text(message)})];
            parts.extend(
                message
                    .images
                    .iter()
                    .map(|url| json!({"type": "image_url", "image_url": {"url": url}})),
            );
            parts.extend(message.audio.iter().map(|audio| {
                json!({"type": "input_audio", "input_audio": {"data": audio.data, "format": audio.format}})
            }));
            parts.extend(message.files.iter().map(|file| {
                json!({"type": "file", "file": {"filename": file.name, "file_data": file.data}})
            }));
            json!({"role": "user", "content": parts})
        }
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": message.tool_call_id.as_deref().unwrap_or_default(),
            "content": message.text(),
        }),
        Role::Assistant => {
            let mut out = Map::new();
            out.insert("role".into(), "assistant".into());
            out.insert(
                "content".into(),
                message.content.clone().map_or(Value::Null, Value::String),
            );
            if !message.tool_calls.is_empty() {
                let calls: Vec<Value> = message
                    .tool_calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
                out.insert("tool_calls".into(), Value::Array(calls));
            }
            // Reasoning is signed by the model that wrote it; another model
            // refuses it ("Invalid signature in thinking block"), so after a
            // switch only the answer text is sent.
            if let Some(model) = reasoning_model
                && message.model.as_deref().is_none_or(|m| m == model)
            {
                if let Some(reasoning) = &message.reasoning {
                    out.insert("reasoning".into(), Value::String(reasoning.clone()));
                }
                if let Some(details) = &message.reasoning_details {
                    out.insert("reasoning_details".into(), details.clone());
                }
            }
            // OpenRouter reads documents it parsed before from these.
            if let (Some(_), Some(annotations)) = (reasoning_model, &message.file_annotations) {
                out.insert("annotations".into(), annotations.clone());
            }
            Value::Object(out)
        }
    }
}

/// Gemini accepts only a subset of JSON Schema: no `additionalProperties`,
/// and `format` only as `enum` or `date-time` on strings.
fn strip_for_gemini(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.remove("additionalProperties");
            if map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| f != "date-time" && f != "enum")
            {
                map.remove("format");
            }
            map.values_mut().for_each(strip_for_gemini);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_for_gemini),
        _ => {}
    }
}

/// The usage in OpenRouter's record of a generation
/// (`GET /generation?id=`): the provider's own token counts where given.
pub fn parse_generation(body: &Value) -> Option<Usage> {
    let data = body.get("data")?;
    let count = |native: &str, normalised: &str| {
        data.get(native)
            .and_then(Value::as_u64)
            .or_else(|| data.get(normalised).and_then(Value::as_u64))
    };
    let prompt = count("native_tokens_prompt", "tokens_prompt")?;
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: count("native_tokens_completion", "tokens_completion").unwrap_or(0),
        cost: data
            .get("total_cost")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        cached_tokens: data
            .get("native_tokens_cached")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(prompt),
        cache_write_tokens: 0,
    })
}

/// Reads a non-streamed reply.
pub fn parse_completion(body: &Value) -> Result<Completion, ModelError> {
    if let Some(error) = body.get("error") {
        return Err(error_from_body(None, error));
    }
    let usage = parse_usage(body.get("usage"));
    let Some(choice) = body
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    else {
        return Err(ModelError::Empty);
    };
    if let Some(error) = choice.get("error") {
        return Err(error_from_body(None, error));
    }
    let finish = finish_reason(choice.get("finish_reason"));
    let raw = choice.get("message").cloned().unwrap_or(Value::Null);
    let tool_calls = raw
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .map(|c| ToolCall {
                    id: str_field(c, "id").unwrap_or_default(),
                    name: c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    arguments: c
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    let message = Message {
        role: Some(Role::Assistant),
        content: str_field(&raw, "content"),
        tool_calls: unique_ids(tool_calls),
        reasoning: str_field(&raw, "reasoning"),
        reasoning_details: raw
            .get("reasoning_details")
            .filter(|v| !v.is_null())
            .cloned(),
        file_annotations: files_parsed(raw.get("annotations")),
        ..Default::default()
    };
    if finish == Some("error") {
        return Err(ModelError::Provider {
            status: None,
            message: "the provider stopped with an error".into(),
        });
    }
    let mut citations = Vec::new();
    merge_citations(&mut citations, raw.get("annotations"));
    Ok(Completion {
        message,
        finish_reason: map_finish(finish),
        usage,
        provider: str_field(body, "provider"),
        citations,
    })
}

fn str_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn finish_reason(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str)
}

fn map_finish(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("stop") | None => FinishReason::Stop,
        Some("tool_calls") => FinishReason::ToolCalls,
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some(_) => FinishReason::Other,
    }
}

fn parse_usage(usage: Option<&Value>) -> Usage {
    let Some(usage) = usage else {
        return Usage::default();
    };
    let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        prompt_tokens: count("/prompt_tokens"),
        completion_tokens: count("/completion_tokens"),
        cost: usage.get("cost").and_then(Value::as_f64).unwrap_or(0.0),
        cached_tokens: count("/prompt_tokens_details/cached_tokens"),
        cache_write_tokens: count("/prompt_tokens_details/cache_write_tokens"),
    }
}

/// The `file` annotations (documents OpenRouter parsed) of a reply;
/// `None` when there are none.
fn files_parsed(annotations: Option<&Value>) -> Option<Value> {
    let mut kept = Vec::new();
    merge_files(&mut kept, annotations);
    (!kept.is_empty()).then_some(Value::Array(kept))
}

/// Adds the `file` annotations among `annotations` to `kept`, once each.
fn merge_files(kept: &mut Vec<Value>, annotations: Option<&Value>) {
    for annotation in annotations.and_then(Value::as_array).into_iter().flatten() {
        if annotation.get("type").and_then(Value::as_str) == Some("file")
            && !kept.contains(annotation)
        {
            kept.push(annotation.clone());
        }
    }
}

/// The links of `url_citation` annotations (web search), once each.
fn merge_citations(citations: &mut Vec<Citation>, annotations: Option<&Value>) {
    for annotation in annotations.and_then(Value::as_array).into_iter().flatten() {
        let Some(cited) = annotation.get("url_citation") else {
            continue;
        };
        let Some(url) = cited.get("url").and_then(Value::as_str) else {
            continue;
        };
        if citations.iter().any(|c| c.url == url) {
            continue;
        }
        citations.push(Citation {
            url: url.to_owned(),
            title: cited
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or(url)
                .to_owned(),
        });
    }
}

/// A tool call being assembled from stream fragments.
#[derive(Debug, Default)]
struct PartialCall {
    index: Option<u64>,
    id: String,
    name: String,
    arguments: String,
}

/// Merges the chunks of a streamed reply.
#[derive(Debug, Default)]
pub struct StreamAccumulator {
    content: String,
    reasoning: String,
    reasoning_details: Vec<Value>,
    calls: Vec<PartialCall>,
    finish: Option<String>,
    usage: Usage,
    provider: Option<String>,
    citations: Vec<Citation>,
    /// `file` annotations (documents OpenRouter parsed).
    files: Vec<Value>,
    saw_choice: bool,
    /// Whether `data: [DONE]` arrived.
    done: bool,
}

impl StreamAccumulator {
    /// Records the end-of-stream marker.
    pub fn done(&mut self) {
        self.done = true;
    }

    /// Applies one `data:` chunk. Text fragments go to `on_text`.
    pub fn apply(&mut self, chunk: &Value, sink: &dyn TextSink) -> Result<(), ModelError> {
        if let Some(error) = chunk.get("error") {
            return Err(error_from_body(None, error));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = parse_usage(Some(usage));
        }
        if let Some(provider) = chunk.get("provider").and_then(Value::as_str) {
            self.provider = Some(provider.to_owned());
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(());
        };
        self.saw_choice = true;
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            if reason == "error" {
                return Err(ModelError::Provider {
                    status: None,
                    message: "the provider stopped with an error mid-answer".into(),
                });
            }
            self.finish = Some(reason.to_owned());
        }
        let Some(delta) = choice.get("delta") else {
            return Ok(());
        };
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            self.content.push_str(text);
            sink.push(text);
        }
        if let Some(text) = delta.get("reasoning").and_then(Value::as_str) {
            self.reasoning.push_str(text);
        }
        merge_citations(&mut self.citations, delta.get("annotations"));
        merge_files(&mut self.files, delta.get("annotations"));
        if let Some(details) = delta.get("reasoning_details").and_then(Value::as_array) {
            details
                .iter()
                .for_each(|d| merge_detail(&mut self.reasoning_details, d));
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            calls.iter().for_each(|fragment| self.merge_call(fragment));
        }
        Ok(())
    }

    /// A fragment continues the call with its index (the last one, when
    /// a backend reuses an index) unless it carries a different id; one
    /// with neither index nor id continues the last call. Two calls that
    /// share an id are kept apart; [`unique_ids`] renames them later.
    fn merge_call(&mut self, fragment: &Value) {
        let index = fragment.get("index").and_then(Value::as_u64);
        let id = fragment
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let position = match (index, id) {
            (Some(_), Some(id)) => self
                .calls
                .iter()
                .rposition(|c| c.index == index)
                .filter(|&p| self.calls[p].id.is_empty() || self.calls[p].id == id),
            (Some(_), None) => self.calls.iter().rposition(|c| c.index == index),
            (None, Some(id)) => self
                .calls
                .len()
                .checked_sub(1)
                .filter(|&p| self.calls[p].id == id),
            (None, None) => self.calls.len().checked_sub(1),
        };
        let position = position.unwrap_or_else(|| {
            self.calls.push(PartialCall {
                index,
                ..Default::default()
            });
            self.calls.len() - 1
        });
        let call = &mut self.calls[position];
        if let Some(id) = id {
            call.id = id.to_owned();
        }
        if let Some(name) = fragment.pointer("/function/name").and_then(Value::as_str)
            && call.name.is_empty()
        {
            call.name = name.to_owned();
        }
        if let Some(arguments) = fragment
            .pointer("/function/arguments")
            .and_then(Value::as_str)
        {
            call.arguments.push_str(arguments);
        }
    }

    /// The reply, once the stream has ended.
    pub fn finish(self) -> Result<Completion, ModelError> {
        if !self.saw_choice {
            return Err(ModelError::Empty);
        }
        if !self.done && self.finish.is_none() {
            return Err(ModelError::Cut);
        }
        let tool_calls = self
            .calls
            .into_iter()
            .filter(|c| !c.name.is_empty())
            .map(|c| ToolCall {
                id: c.id,
                name: c.name,
                arguments: c.arguments,
            })
            .collect();
        let tool_calls = unique_ids(tool_calls);
        let message = Message {
            role: Some(Role::Assistant),
            content: (!self.content.is_empty()).then_some(self.content),
            tool_calls,
            reasoning: (!self.reasoning.is_empty()).then_some(self.reasoning),
            reasoning_details: (!self.reasoning_details.is_empty())
                .then_some(Value::Array(self.reasoning_details)),
            file_annotations: (!self.files.is_empty()).then_some(Value::Array(self.files)),
            ..Default::default()
        };
        Ok(Completion {
            message,
            finish_reason: map_finish(self.finish.as_deref()),
            usage: self.usage,
            provider: self.provider,
            citations: self.citations,
        })
    }
}

/// Calls without an id, or with one an earlier call of the reply already
/// has, get a fresh id: every call is kept, and the history stays valid for
/// providers that insist on unique ids.
fn unique_ids(mut calls: Vec<ToolCall>) -> Vec<ToolCall> {
    let mut seen = std::collections::HashSet::new();
    for call in &mut calls {
        if call.id.is_empty() || !seen.insert(call.id.clone()) {
            call.id = ToolCall::fresh_id();
            seen.insert(call.id.clone());
        }
    }
    calls
}

/// Streamed reasoning details arrive in pieces that share an `index`:
/// their string fields are concatenated, other fields taken once.
fn merge_detail(details: &mut Vec<Value>, piece: &Value) {
    let index = piece.get("index");
    let existing = index.and_then(|i| details.iter_mut().find(|d| d.get("index") == Some(i)));
    match (existing, piece.as_object()) {
        (Some(Value::Object(target)), Some(fields)) => {
            for (key, value) in fields {
                match (target.get_mut(key), value) {
                    (Some(Value::String(old)), Value::String(more))
                        if key != "index" && key != "type" && key != "format" && key != "id" =>
                    {
                        old.push_str(more)
                    }
                    (None, _) => {
                        target.insert(key.clone(), value.clone());
                    }
                    _ => {}
                }
            }
        }
        _ => details.push(piece.clone()),
    }
}

/// Turns an error body (`{"code", "message", "metadata"}`) and, when known,
/// the HTTP status into a typed error.
pub fn error_from_body(status: Option<u16>, error: &Value) -> ModelError {
    let code = status.or_else(|| match error.get("code") {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    });
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no details given")
        .to_owned();
    let raw = error.pointer("/metadata/raw").and_then(Value::as_str);
    let error_type = error
        .pointer("/metadata/error_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let lower = message.to_lowercase();
    let detailed = match raw {
        Some(raw) => format!("{message} ({raw})"),
        None => message.clone(),
    };
    if error_type == "context_length_exceeded"
        || lower.contains("context length")
        || lower.contains("context window")
    {
        return ModelError::ContextTooLong;
    }
    // OpenRouter, llama.cpp, vLLM and Ollama each say it their own way.
    let no_tools = [
        "support tool use",
        "tool_choice",
        "does not support tools",
        "tool choice requires",
        "tools param requires",
        "--jinja",
    ];
    if matches!(code, Some(400 | 404 | 500)) && no_tools.iter().any(|s| lower.contains(s)) {
        return ModelError::NoToolSupport {
            model: "you chose".into(),
        };
    }
    let no_endpoint = [
        "no endpoints found",
        "no available model provider",
        "routing requirements",
    ];
    if matches!(code, Some(404 | 503)) && no_endpoint.iter().any(|s| lower.contains(s)) {
        return ModelError::NoEndpoint { message: detailed };
    }
    let in_flight = error
        .pointer("/metadata/limit_source")
        .and_then(Value::as_str)
        == Some("openrouter_in_flight_budget")
        || error.pointer("/metadata/reason").and_then(Value::as_str)
            == Some("in_flight_budget_exhausted");
    match code {
        Some(401) => ModelError::InvalidKey,
        // Too many requests at once for the account's budget: it passes.
        Some(402) if in_flight => ModelError::RateLimited { retry_after: None },
        Some(402) => ModelError::CreditsExhausted,
        Some(403) => ModelError::Forbidden { message: detailed },
        Some(408) => ModelError::Timeout,
        Some(413) => ModelError::ContextTooLong,
        Some(429) => ModelError::RateLimited { retry_after: None },
        Some(status) if status >= 500 => ModelError::Provider {
            status: Some(status),
            message: detailed,
        },
        Some(status) => ModelError::BadRequest {
            status,
            message: detailed,
        },
        None => ModelError::Provider {
            status: None,
            message: detailed,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_all(chunks: &[Value]) -> (Completion, String) {
        struct Collect(std::sync::Mutex<String>);
        impl TextSink for Collect {
            fn push(&self, fragment: &str) {
                self.0.lock().unwrap().push_str(fragment);
            }
        }
        let mut acc = StreamAccumulator::default();
        let text = Collect(Default::default());
        for chunk in chunks {
            acc.apply(chunk, &text).unwrap();
        }
        acc.done();
        (acc.finish().unwrap(), text.0.into_inner().unwrap())
    }

    #[test]
    fn tool_call_fragments_merge_by_index_and_id() {
        let (completion, _) = apply_all(&[
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"fs__read","arguments":""}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"fs__list","arguments":"{\"p"}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":1}"}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"\":2}"}}]}}]}),
            // A backend that reuses index 0 for a third call with a new id.
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"t__x","arguments":"{}"}}]}, "finish_reason":"tool_calls"}]}),
            json!({"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"cost":0.25}}),
        ]);
        let calls = &completion.message.tool_calls;
        assert_eq!(calls.len(), 3);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].arguments.as_str()),
            ("a", "{\"x\":1}")
        );
        assert_eq!(
            (calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("fs__list", "{\"p\":2}")
        );
        assert_eq!(calls[2].id, "c");
        assert_eq!(completion.finish_reason, FinishReason::ToolCalls);
        assert_eq!(completion.usage.cost, 0.25);
    }

    #[test]
    fn fragments_without_index_continue_the_last_call() {
        let (completion, _) = apply_all(&[
            json!({"choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"n","arguments":"{\"a\""}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"function":{"arguments":":1}"}}]}}]}),
        ]);
        assert_eq!(completion.message.tool_calls[0].arguments, "{\"a\":1}");
    }

    #[test]
    fn text_streams_and_reasoning_details_merge() {
        let (completion, text) = apply_all(&[
            json!({"choices":[{"delta":{"content":"Hel","reasoning_details":[{"type":"reasoning.text","index":0,"text":"th"}]}}]}),
            json!({"choices":[{"delta":{"content":"lo","reasoning_details":[{"type":"reasoning.text","index":0,"text":"ink","signature":"sig"}]}, "finish_reason":"stop"}]}),
        ]);
        assert_eq!(text, "Hello");
        assert_eq!(completion.message.content.as_deref(), Some("Hello"));
        assert_eq!(
            completion.message.reasoning_details,
            Some(json!([{"type":"reasoning.text","index":0,"text":"think","signature":"sig"}]))
        );
    }

    #[test]
    fn a_mid_stream_error_is_an_error() {
        let mut acc = StreamAccumulator::default();
        let chunk = json!({"error":{"code":"server_error","message":"boom"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]});
        assert!(matches!(
            acc.apply(&chunk, &()),
            Err(ModelError::Provider { .. })
        ));
    }

    #[test]
    fn error_bodies_become_plain_errors() {
        assert_eq!(
            error_from_body(Some(402), &json!({"message":"x"})),
            ModelError::CreditsExhausted
        );
        assert_eq!(
            error_from_body(Some(401), &json!({"message":"x"})),
            ModelError::InvalidKey
        );
        assert!(matches!(
            error_from_body(
                Some(404),
                &json!({"message":"No endpoints found that support tool use."})
            ),
            ModelError::NoToolSupport { .. }
        ));
        assert_eq!(
            error_from_body(
                Some(400),
                &json!({"message":"x","metadata":{"error_type":"context_length_exceeded"}})
            ),
            ModelError::ContextTooLong
        );
    }

    #[test]
    fn non_streamed_reply_with_null_content_and_calls() {
        let body = json!({"choices":[{"finish_reason":"tool_calls","message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"x","type":"function","function":{"name":"a__b","arguments":"{}"}}]}}],
            "usage":{"prompt_tokens":3,"completion_tokens":4,"cost":0.5}});
        let completion = parse_completion(&body).unwrap();
        assert_eq!(completion.message.content, None);
        assert_eq!(completion.message.tool_calls[0].name, "a__b");
        assert_eq!(
            parse_completion(&json!({"choices":[]})).unwrap_err(),
            ModelError::Empty
        );
    }

    #[test]
    fn a_generation_record_gives_the_provider_counts_and_cost() {
        let record = json!({"data": {"id": "gen-1", "total_cost": 0.0042, "tokens_prompt": 900,
            "tokens_completion": 40, "native_tokens_prompt": 1000, "native_tokens_completion": 50,
            "native_tokens_cached": 800, "cancelled": true}});
        let usage = parse_generation(&record).unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens
            ),
            (1000, 50, 800)
        );
        assert!((usage.cost - 0.0042).abs() < 1e-12);
        let normalised =
            json!({"data": {"tokens_prompt": 9, "tokens_completion": 2, "total_cost": 0}});
        assert_eq!(parse_generation(&normalised).unwrap().prompt_tokens, 9);
        assert_eq!(parse_generation(&json!({"data": {"id": "gen-2"}})), None);
        assert_eq!(parse_generation(&json!({"error": {"code": 404}})), None);
    }

    #[test]
    fn assistant_messages_round_trip_reasoning_details() {
        let details = json!([{"type":"reasoning.encrypted","data":"abc","index":0}]);
        let message = Message {
            role: Some(Role::Assistant),
            reasoning_details: Some(details.clone()),
            ..Default::default()
        };
        let json = message_json(&message, Some("any/model"));
        assert_eq!(json["reasoning_details"], details);
        assert_eq!(json["content"], Value::Null);
    }

    #[test]
    fn duplicate_and_missing_ids_are_replaced_and_every_call_kept() {
        let (completion, _) = apply_all(&[
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"id":"x","function":{"name":"a","arguments":"{}"}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":1,"id":"x","function":{"name":"b","arguments":"{}"}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":2,"function":{"name":"c","arguments":"{}"}}]}, "finish_reason":"tool_calls"}]}),
        ]);
        let calls = &completion.message.tool_calls;
        let names: Vec<&str> = calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(calls[0].id, "x");
        let ids: std::collections::HashSet<&str> = calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert!(calls.iter().all(|c| !c.id.is_empty()));

        let body = json!({"choices":[{"finish_reason":"tool_calls","message":{"role":"assistant","tool_calls":[
            {"id":"y","type":"function","function":{"name":"a","arguments":"{}"}},
            {"id":"y","type":"function","function":{"name":"b","arguments":"{}"}},
            {"type":"function","function":{"name":"c","arguments":"{}"}}]}}]});
        let calls = parse_completion(&body).unwrap().message.tool_calls;
        let ids: std::collections::HashSet<&str> = calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!((calls.len(), ids.len()), (3, 3));
    }

    #[test]
    fn a_stream_without_done_or_finish_reason_is_cut() {
        let mut acc = StreamAccumulator::default();
        acc.apply(
            &json!({"choices":[{"delta":{"content":"Half an ans"}}]}),
            &(),
        )
        .unwrap();
        assert_eq!(acc.finish().unwrap_err(), ModelError::Cut);
        // A finish reason without [DONE] is a complete answer.
        let mut acc = StreamAccumulator::default();
        acc.apply(
            &json!({"choices":[{"delta":{"content":"Done."},"finish_reason":"stop"}]}),
            &(),
        )
        .unwrap();
        assert_eq!(
            acc.finish().unwrap().message.content.as_deref(),
            Some("Done.")
        );
    }

    fn spec(name: &str) -> crate::conversation::ToolSpec {
        crate::conversation::ToolSpec {
            name: name.into(),
            description: "d".into(),
            parameters: json!({"type":"object","properties":{}}),
            needs_approval: false,
            server: "s".into(),
        }
    }

    /// The indices of the messages that carry a marker, and the count of
    /// all markers in the body.
    fn markers(body: &Value) -> (Vec<usize>, usize) {
        let text = body.to_string();
        let count = text.matches("cache_control").count();
        let marked = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, m)| m.to_string().contains("cache_control"))
            .map(|(i, _)| i)
            .collect();
        (marked, count)
    }

    fn tool_round(history: &mut Vec<Message>, calls: usize, round: usize) {
        let ids: Vec<String> = (0..calls).map(|i| format!("c{round}_{i}")).collect();
        history.push(Message {
            role: Some(Role::Assistant),
            tool_calls: ids
                .iter()
                .map(|id| ToolCall {
                    id: id.clone(),
                    name: "t".into(),
                    arguments: "{}".into(),
                })
                .collect(),
            ..Default::default()
        });
        history.extend(ids.iter().map(|id| Message::tool_result(id, "result")));
    }

    #[test]
    fn anthropic_markers_sit_on_the_prefix_the_previous_tail_and_the_newest() {
        let tools = [spec("a"), spec("b")];
        let mut history = vec![Message::user("hi"), Message::assistant("hello")];
        history.push(Message::user("list files"));
        tool_round(&mut history, 2, 0);
        let mut request = ChatRequest::new("anthropic/claude-sonnet-4.5", &history, &tools);
        request.system = Some("be brief");
        let body = request_body(&request, &Dialect::default(), None);
        // system, the user message before the latest reply, the newest.
        assert_eq!(markers(&body), (vec![0, 3, 6], 3));
        let messages = body["messages"].as_array().unwrap();
        // On a part of a tool message, never on the message itself.
        assert!(messages[6].get("cache_control").is_none());
        assert_eq!(
            messages[6]["content"][0]["cache_control"]["type"],
            "ephemeral"
        );
        assert_eq!(messages[6]["content"][0]["text"], "result");
        // The assistant message that only calls tools carries none.
        assert_eq!(messages[4]["content"], Value::Null);

        // Without a system prompt the prefix marker goes on the last tool.
        let request = ChatRequest::new("anthropic/claude-sonnet-4.5", &history, &tools);
        let body = request_body(&request, &Dialect::default(), None);
        assert_eq!(markers(&body), (vec![2, 5], 3));
        assert!(body["tools"][1].get("cache_control").is_some());
    }

    #[test]
    fn a_wide_tool_round_gets_a_bridge_and_never_a_fifth_marker() {
        let tools = [spec("a")];
        for calls in 1..=32 {
            let mut history = vec![Message::user("go")];
            tool_round(&mut history, calls, 0);
            let mut request = ChatRequest::new("anthropic/claude-opus-4", &history, &tools);
            request.system = Some("s");
            let body = request_body(&request, &Dialect::default(), None);
            let (marked, count) = markers(&body);
            assert!(count <= MAX_BREAKPOINTS, "{calls} calls: {count} markers");
            // Blocks after the previous tail: one per call, one per result.
            let bridged = 2 * calls > BRIDGE_BLOCKS;
            assert_eq!(marked.len(), 3 + usize::from(bridged), "{calls} calls");
        }
    }

    #[test]
    fn gemini_gets_one_marker_and_others_none() {
        let history = vec![
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
        ];
        let mut request = ChatRequest::new("google/gemini-2.5-pro", &history, &[]);
        request.system = Some("s");
        let body = request_body(&request, &Dialect::default(), None);
        assert_eq!(markers(&body), (vec![3], 1));
        for model in ["openai/gpt-4.1", "deepseek/deepseek-chat"] {
            let request = ChatRequest { model, ..request };
            assert_eq!(
                markers(&request_body(&request, &Dialect::default(), None)).1,
                0
            );
        }
        let openai = Dialect {
            api: ModelApi::OpenAi,
            ..Dialect::default()
        };
        let request = ChatRequest {
            model: "anthropic/claude-sonnet-4.5",
            ..request
        };
        assert_eq!(markers(&request_body(&request, &openai, None)).1, 0);
    }

    #[test]
    fn openrouter_fields_go_only_to_openrouter() {
        let history = vec![Message::user("a")];
        let mut request = ChatRequest::new("m/x", &history, &[]);
        request.session = Some("discord:1");
        request.user = Some("u_0123456789abcdef");
        let dialect = Dialect {
            provider: Some(json!({"zdr": true})),
            web_search: Some(WebSearch {
                max_results: 2,
                max_uses: 1,
            }),
            reasoning: Some(ReasoningEffort::High),
            ..Dialect::default()
        };
        let info = ModelInfo {
            id: "m/x".into(),
            context_length: None,
            supports_tools: Some(true),
            supports_images: false,
            supports_audio: false,
            supports_reasoning: true,
        };
        let body = request_body(&request, &dialect, Some(&info));
        assert_eq!(body["session_id"], "discord:1");
        assert_eq!(body["user"], "u_0123456789abcdef");
        assert_eq!(body["plugins"][0]["id"], "context-compression");
        assert_eq!(body["plugins"][0]["enabled"], false);
        assert_eq!(body["provider"], json!({"zdr": true}));
        assert_eq!(body["tools"][0]["type"], "openrouter:web_search");
        assert_eq!(body["tools"][0]["parameters"]["max_results"], 2);
        assert_eq!(body["reasoning"]["effort"], "high");
        assert!(body.get("stream_options").is_none());

        request.pin = Some("google-vertex");
        let body = request_body(&request, &dialect, Some(&info));
        assert_eq!(
            body["provider"],
            json!({"zdr": true, "order": ["google-vertex"], "allow_fallbacks": false})
        );

        let plain = Dialect {
            api: ModelApi::OpenAi,
            ..dialect.clone()
        };
        let body = request_body(&request, &plain, Some(&info));
        for field in ["session_id", "user", "plugins", "provider", "tools"] {
            assert!(
                body.get(field).is_none(),
                "{field} sent to a plain endpoint"
            );
        }
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        // No reasoning for a model that does not list it.
        let info = ModelInfo {
            supports_reasoning: false,
            ..info
        };
        assert!(
            request_body(&request, &dialect, Some(&info))
                .get("reasoning")
                .is_none()
        );
    }

    #[test]
    fn reasoning_goes_back_only_to_the_model_that_wrote_it() {
        let reply = Message {
            role: Some(Role::Assistant),
            content: Some("answer".into()),
            reasoning: Some("thought".into()),
            reasoning_details: Some(json!([{"type":"reasoning.text","signature":"s"}])),
            model: Some("anthropic/claude-sonnet-4.5".into()),
            ..Default::default()
        };
        let same = message_json(&reply, Some("anthropic/claude-sonnet-4.5"));
        assert!(same.get("reasoning_details").is_some());
        let other = message_json(&reply, Some("google/gemini-2.5-pro"));
        assert!(other.get("reasoning_details").is_none() && other.get("reasoning").is_none());
        assert_eq!(other["content"], "answer");
        let plain = message_json(&reply, None);
        assert!(plain.get("reasoning_details").is_none() && plain.get("reasoning").is_none());
    }

    #[test]
    fn user_messages_name_their_author() {
        let message = Message {
            author: Some(Author {
                id: 42,
                name: "Ada (admin)\n".into(),
            }),
            ..Message::user("hello")
        };
        assert_eq!(
            message_json(&message, Some("m"))["content"],
            "<@42> (Ada admin): hello"
        );
        assert_eq!(
            message_json(&Message::user("hi"), Some("m"))["content"],
            "hi"
        );
    }

    #[test]
    fn usage_reads_cache_tokens_citations_and_provider() {
        let (completion, _) = apply_all(&[
            json!({"provider":"Anthropic","choices":[{"delta":{"content":"See","annotations":[
                {"type":"url_citation","url_citation":{"url":"https://a.example/x","title":"A"}}]}}]}),
            json!({"choices":[{"delta":{"content":" this","annotations":[
                {"type":"url_citation","url_citation":{"url":"https://a.example/x","title":"A"}}]},"finish_reason":"stop"}]}),
            json!({"choices":[],"usage":{"prompt_tokens":2000,"completion_tokens":5,"cost":0.01,
                "prompt_tokens_details":{"cached_tokens":1800,"cache_write_tokens":150}}}),
        ]);
        assert_eq!(completion.usage.cached_tokens, 1800);
        assert_eq!(completion.usage.cache_write_tokens, 150);
        assert_eq!(completion.usage.cached_percent(), 90);
        assert_eq!(completion.provider.as_deref(), Some("Anthropic"));
        assert_eq!(completion.citations.len(), 1);
    }

    #[test]
    fn errors_of_other_endpoints_and_budgets_are_told_apart() {
        for (status, message) in [
            (500, "tools param requires --jinja flag"),
            (
                400,
                "registry.ollama.ai/library/gemma:2b does not support tools",
            ),
            (
                400,
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
            ),
        ] {
            assert!(
                matches!(
                    error_from_body(Some(status), &json!({"message": message})),
                    ModelError::NoToolSupport { .. }
                ),
                "{message}"
            );
        }
        let in_flight =
            json!({"message":"x","metadata":{"limit_source":"openrouter_in_flight_budget"}});
        assert!(matches!(
            error_from_body(Some(402), &in_flight),
            ModelError::RateLimited { .. }
        ));
        assert!(matches!(
            error_from_body(
                Some(404),
                &json!({"message":"No endpoints found matching your data policy"})
            ),
            ModelError::NoEndpoint { .. }
        ));
    }
}
