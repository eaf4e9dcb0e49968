//! Test support: a loopback OpenAI-compatible server that scripts replies and
//! rejects invalid histories the way real providers do, plus paths to the
//! real MCP servers installed by `.ci/install-test-servers`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};

pub mod board;
pub mod discord;
pub mod memory;

use mcpcord::app::App;
use mcpcord::config::Config;
use mcpcord::conversation::{ApproveAll, Message, TurnError, TurnEvent, TurnOutcome};

/// One scripted answer of the fake model.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A plain answer.
    Text(String),
    /// Tool calls: (id, name, arguments as sent).
    Calls(Vec<(String, String, String)>),
    /// An HTTP error with a JSON error body; optional `Retry-After`.
    Status(u16, String, Option<String>),
    /// 200, some text, then an error chunk mid-stream.
    MidStreamError,
    /// Never answers (the client must give up or be aborted).
    Hang,
    /// A 200 with this body and content type, as it is.
    Raw(&'static str, String),
    /// A stream that sends this text (and OpenRouter's `X-Generation-Id`
    /// header) and then nothing, never ending.
    Stall(String),
    /// A streamed reply with more fields: `{"chunk": {...}}` goes into every
    /// chunk (`provider`, `id`), `{"delta": {...}}` into every chunk's delta
    /// (`reasoning_details`, `annotations`).
    With(Box<Reply>, Value),
}

impl Reply {
    /// This reply with `extra` fields (see [`Reply::With`]).
    pub fn with(self, extra: Value) -> Reply {
        Reply::With(Box::new(self), extra)
    }
}

pub fn text(s: &str) -> Reply {
    Reply::Text(s.to_owned())
}

pub fn call(id: &str, name: &str, arguments: &str) -> Reply {
    Reply::Calls(vec![(id.to_owned(), name.to_owned(), arguments.to_owned())])
}

/// Which server the fake plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Api {
    /// OpenRouter: its catalogue fields, its extra request fields, prompt
    /// caching markers, usage in every stream.
    #[default]
    OpenRouter,
    /// A plain OpenAI-compatible server (as llama.cpp's `llama-server`
    /// behaves): a bare model list, usage only when asked for with
    /// `stream_options`, and OpenRouter's own fields refused.
    OpenAi,
}

#[derive(Default)]
struct Fake {
    api: Api,
    script: VecDeque<Reply>,
    requests: Vec<Value>,
    /// The `HTTP-Referer` and `X-Title` headers of each chat request.
    attribution: Vec<(Option<String>, Option<String>)>,
    rejected: Vec<String>,
    /// Where a request of a session did not start with the one before it.
    prefix_breaks: Vec<String>,
    /// The last request of each `session_id`, normalised.
    sessions: std::collections::HashMap<String, Value>,
    models: Value,
    /// Answers of `GET /generation?id=` per id, in order; 404 when none
    /// is left.
    generations: std::collections::HashMap<String, VecDeque<Value>>,
    /// The ids asked for there.
    looked_up: Vec<String>,
    /// How long each chat request waits before it is answered.
    latency: std::time::Duration,
    /// What is answered once the script is used up (else a 500).
    fallback: Option<Reply>,
    /// Whether requests are kept for `requests()` (a load test keeps none).
    forget_requests: bool,
    /// Chat requests received.
    served: usize,
}

/// The fake OpenRouter. Dropping it does not stop the server; each test
/// gets its own on a fresh port.
#[derive(Clone)]
pub struct FakeModel {
    pub base_url: String,
    pub api: Api,
    state: Arc<Mutex<Fake>>,
}

impl FakeModel {
    pub async fn start() -> FakeModel {
        FakeModel::start_as(Api::OpenRouter).await
    }

    pub async fn start_as(api: Api) -> FakeModel {
        let catalogue = match api {
            Api::OpenRouter => json!({"data": [
                {"id": "test/tools", "context_length": 100000, "supported_parameters": ["tools"],
                 "architecture": {"input_modalities": ["text", "image"]}},
                {"id": "test/small", "context_length": 3000, "supported_parameters": ["tools"]},
                {"id": "test/ears", "context_length": 100000, "supported_parameters": ["tools"],
                 "architecture": {"input_modalities": ["text", "audio"]}},
                {"id": "test/no-tools", "context_length": 100000, "supported_parameters": ["temperature"]},
                {"id": "anthropic/claude-test", "context_length": 200000,
                 "supported_parameters": ["tools", "reasoning"]},
                {"id": "google/gemini-test", "context_length": 1000000,
                 "supported_parameters": ["tools", "reasoning"]}
            ]}),
            Api::OpenAi => json!({"object": "list", "data": [
                {"id": "test/tools", "object": "model", "owned_by": "llamacpp"}
            ]}),
        };
        let state = Arc::new(Mutex::new(Fake {
            api,
            models: catalogue,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/v1/key", get(key))
            .route("/v1/generation", get(generation))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeModel {
            base_url: format!("http://{address}/v1"),
            api,
            state,
        }
    }

    /// `MODEL_API` for a client of this fake.
    pub fn model_api(&self) -> &'static str {
        match self.api {
            Api::OpenRouter => "openrouter",
            Api::OpenAi => "openai",
        }
    }

    /// Where a request of a session did not begin with the previous
    /// request of that session (each is a full prompt cache miss).
    pub fn prefix_breaks(&self) -> Vec<String> {
        self.state.lock().unwrap().prefix_breaks.clone()
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// Each chat request waits `latency` before it is answered.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// Answers `reply` whenever the script is used up; keeps no requests.
    pub fn always(&self, reply: Reply) {
        let mut fake = self.state.lock().unwrap();
        fake.fallback = Some(reply);
        fake.forget_requests = true;
    }

    /// How many chat requests came.
    pub fn served(&self) -> usize {
        self.state.lock().unwrap().served
    }

    /// Every chat request received, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The `HTTP-Referer` and `X-Title` headers of each chat request.
    pub fn attribution(&self) -> Vec<(Option<String>, Option<String>)> {
        self.state.lock().unwrap().attribution.clone()
    }

    /// Why requests were rejected as invalid histories.
    pub fn rejected(&self) -> Vec<String> {
        self.state.lock().unwrap().rejected.clone()
    }

    /// Waits (up to 20 s) until `count` chat requests have arrived.
    pub async fn wait_for_requests(&self, count: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.requests().len() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "request {count} never came"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// What `GET /generation?id={id}` answers next: each record once, in
    /// order, then 404 (a 404 itself is scripted as `Value::Null`).
    pub fn generation(&self, id: &str, records: impl IntoIterator<Item = Value>) {
        self.state
            .lock()
            .unwrap()
            .generations
            .entry(id.to_owned())
            .or_default()
            .extend(records);
    }

    /// The generation ids looked up, in order.
    pub fn looked_up(&self) -> Vec<String> {
        self.state.lock().unwrap().looked_up.clone()
    }

    pub fn remaining(&self) -> usize {
        self.state.lock().unwrap().script.len()
    }
}

/// The key the fake accepts.
pub const KEY: &str = "sk-or-v1-test-secret";

fn authorised(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {KEY}"))
}

async fn key(headers: axum::http::HeaderMap) -> Response {
    if !authorised(&headers) {
        return error(401, "No auth credentials found");
    }
    axum::Json(json!({"data": {"label": "test", "limit": null, "usage": 0}})).into_response()
}

async fn generation(
    State(state): State<Arc<Mutex<Fake>>>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if !authorised(&headers) {
        return error(401, "No auth credentials found");
    }
    let id = query.get("id").cloned().unwrap_or_default();
    let mut fake = state.lock().unwrap();
    fake.looked_up.push(id.clone());
    match fake.generations.get_mut(&id).and_then(VecDeque::pop_front) {
        Some(Value::Null) | None => error(404, &format!("Generation {id} not found")),
        Some(record) => axum::Json(json!({"data": record})).into_response(),
    }
}

async fn models(State(state): State<Arc<Mutex<Fake>>>) -> Response {
    let models = state.lock().unwrap().models.clone();
    axum::Json(models).into_response()
}

fn error(status: u16, message: &str) -> Response {
    let body = json!({"error": {"code": status, "message": message}});
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

async fn completions(
    State(state): State<Arc<Mutex<Fake>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    if !authorised(&headers) {
        return error(401, "No auth credentials found");
    }
    let request: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => return error(400, &format!("invalid JSON body: {e}")),
    };
    let reply = {
        let mut fake = state.lock().unwrap();
        fake.served += 1;
        if !fake.forget_requests {
            fake.requests.push(request.clone());
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        fake.attribution
            .push((header("http-referer"), header("x-title")));
        // llama-server parses every stored call's arguments first.
        if let Err(problem) = arguments_are_json(&request) {
            fake.rejected.push(problem.clone());
            return error(500, &problem);
        }
        let checked = validate(&request).and_then(|()| match fake.api {
            Api::OpenRouter => validate_markers(&request),
            Api::OpenAi => validate_plain(&request),
        });
        if let Err(problem) = checked {
            fake.rejected.push(problem.clone());
            return error(400, &problem);
        }
        if let Some(session) = request["session_id"].as_str() {
            let now = normalised(&request);
            if let Some(before) = fake.sessions.get(session)
                && let Some(why) = prefix_break(before, &now)
            {
                fake.prefix_breaks.push(format!("{session}: {why}"));
            }
            fake.sessions.insert(session.to_owned(), now);
        }
        let reply = fake.script.pop_front().or_else(|| fake.fallback.clone());
        (reply, fake.api, fake.served, fake.latency)
    };
    let (reply, api, number, latency) = (reply.0, reply.1, reply.2, reply.3);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let stream = request["stream"].as_bool().unwrap_or(false);
    // A plain server sends usage in a stream only when asked to.
    let usage = api == Api::OpenRouter || request["stream_options"]["include_usage"] == true;
    let usage_chunks = || usage.then(usage_chunk);
    let (reply, extra) = match reply {
        Some(Reply::With(inner, extra)) => (Some(*inner), Some(extra)),
        other => (other, None),
    };
    // OpenRouter names each reply in every chunk.
    let id = format!("gen-{number}");
    let mut extra = extra.unwrap_or_else(|| json!({}));
    if api == Api::OpenRouter && extra["chunk"].get("id").is_none() {
        if !extra["chunk"].is_object() {
            extra["chunk"] = json!({});
        }
        extra["chunk"]["id"] = Value::String(id.clone());
    }
    let extra = Some(extra);
    match reply {
        None => error(500, "the fake model has no more scripted replies"),
        Some(Reply::Hang) => std::future::pending().await,
        Some(Reply::Raw(content_type, body)) => Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap(),
        Some(Reply::Status(code, message, retry_after)) => {
            let mut response = error(code, &message);
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, seconds.parse().unwrap());
            }
            response
        }
        Some(Reply::MidStreamError) => sse(vec![
            json!({"choices": [{"index": 0, "delta": {"content": "Partial "}}]}),
            json!({"error": {"code": "server_error", "message": "Provider disconnected"},
                   "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}),
        ], extra.as_ref()),
        Some(Reply::With(..)) => unreachable!("unwrapped above"),
        Some(Reply::Stall(text)) => {
            let first = json!({"id": id, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}]});
            let first: Result<String, std::convert::Infallible> =
                Ok(format!(": OPENROUTER PROCESSING\n\ndata: {first}\n\n"));
            let body = futures::stream::iter([first]).chain(futures::stream::pending());
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header("x-generation-id", format!("{id}-header"))
                .body(Body::from_stream(body))
                .unwrap()
        }
        Some(Reply::Text(text)) if stream => {
            let (a, b) = text.split_at(text.len() / 2);
            sse(vec![
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": a}}]}),
                json!({"choices": [{"index": 0, "delta": {"content": b}, "finish_reason": "stop"}]}),
            ].into_iter().chain(usage_chunks()).collect(), extra.as_ref())
        }
        Some(Reply::Text(text)) => axum::Json(json!({
            "id": "gen-1", "object": "chat.completion", "model": request["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "cost": 0.001}
        }))
        .into_response(),
        Some(Reply::Calls(calls)) if stream => {
            let mut chunks = Vec::new();
            for (index, (id, name, _)) in calls.iter().enumerate() {
                chunks.push(json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}}]}));
            }
            for (index, (_, _, arguments)) in calls.iter().enumerate() {
                let cut = arguments.char_indices().nth(arguments.chars().count() / 2).map_or(0, |(i, _)| i);
                for part in [&arguments[..cut], &arguments[cut..]] {
                    chunks.push(json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                        {"index": index, "function": {"arguments": part}}]}}]}));
                }
            }
            chunks.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
            chunks.extend(usage_chunks());
            sse(chunks, extra.as_ref())
        }
        Some(Reply::Calls(calls)) => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
                .collect();
            axum::Json(json!({
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": null, "tool_calls": tool_calls}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "cost": 0.001}
            }))
            .into_response()
        }
    }
}

/// A streamed reply of these chunks as they are, with `[DONE]` at the end
/// or not.
pub fn sse_reply(chunks: &[Value], done: bool) -> Reply {
    let mut body: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    if done {
        body.push_str("data: [DONE]\n\n");
    }
    Reply::Raw("text/event-stream", body)
}

/// `from`'s fields written over `into`'s (objects only).
fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (key, value) in from {
            into.insert(key.clone(), value.clone());
        }
    }
}

fn usage_chunk() -> Value {
    json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 20, "cost": 0.001,
        "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30}}})
}

/// An SSE body as OpenRouter sends it: a keep-alive comment first, then
/// `data:` chunks, then `[DONE]`. `extra` (see [`Reply::With`]) goes into
/// every chunk.
fn sse(chunks: Vec<Value>, extra: Option<&Value>) -> Response {
    let mut body = String::from(": OPENROUTER PROCESSING\n\n");
    let mut delta_extra = extra.map(|e| &e["delta"]);
    for mut chunk in chunks {
        if let Some(extra) = extra {
            merge(&mut chunk, &extra["chunk"]);
        }
        if let Some(delta) = chunk.pointer_mut("/choices/0/delta")
            && let Some(fields) = delta_extra.take()
        {
            merge(delta, fields);
        }
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(body))
        .unwrap()
}

/// The checks real providers make on a history.
fn validate(request: &Value) -> Result<(), String> {
    let messages = request["messages"]
        .as_array()
        .ok_or("messages must be an array")?;
    if messages.is_empty() {
        return Err("messages must not be empty".into());
    }
    let has_tools = request["tools"].as_array().is_some_and(|t| !t.is_empty());
    let mut open: Vec<String> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"]
            .as_str()
            .ok_or(format!("messages[{i}] has no role"))?;
        if role == "tool" {
            let id = message["tool_call_id"]
                .as_str()
                .ok_or(format!("messages[{i}]: tool message without tool_call_id"))?;
            let Some(position) = open.iter().position(|o| o == id) else {
                return Err(format!(
                    "messages[{i}]: tool message answers unknown tool_call_id {id}"
                ));
            };
            open.remove(position);
            let text_parts = message["content"].as_array().is_some_and(|parts| {
                parts
                    .iter()
                    .all(|p| p["type"] == "text" && p["text"].is_string())
            });
            if !message["content"].is_string() && !text_parts {
                return Err(format!(
                    "messages[{i}]: tool content must be a string or text parts"
                ));
            }
            continue;
        }
        if !open.is_empty() {
            return Err(format!(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. Missing: {open:?} before messages[{i}]"
            ));
        }
        if !["system", "user", "assistant"].contains(&role) {
            return Err(format!("messages[{i}]: unknown role {role}"));
        }
        if let Some(calls) = message["tool_calls"].as_array() {
            if !has_tools {
                return Err("tool_calls in the history but no tools in the request".into());
            }
            for call in calls {
                if !call["function"]["arguments"].is_string() {
                    return Err(format!(
                        "messages[{i}]: tool call arguments must be a string"
                    ));
                }
                let id = call["id"].as_str().unwrap_or_default().to_owned();
                if id.is_empty() || !ids.insert(id.clone()) {
                    return Err(format!(
                        "messages[{i}]: tool_use ids must be unique: {id:?}"
                    ));
                }
                open.push(id);
            }
        } else if role == "assistant" && content_text(message).is_empty() {
            return Err(format!(
                "messages[{i}]: assistant message with neither content nor tool_calls"
            ));
        }
    }
    if !open.is_empty() {
        return Err(format!("tool calls without results at the end: {open:?}"));
    }
    for tool in request["tools"].as_array().into_iter().flatten() {
        if tool["type"] != "function" {
            // OpenRouter's server tools (`openrouter:web_search`).
            if tool["type"]
                .as_str()
                .is_none_or(|t| !t.starts_with("openrouter:"))
            {
                return Err(format!("unknown tool type {}", tool["type"]));
            }
            continue;
        }
        let name = tool["function"]["name"].as_str().unwrap_or_default();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(format!(
                "Invalid 'tools[].function.name': {name:?} does not match pattern"
            ));
        }
        if tool["function"]["parameters"]["properties"]
            .as_object()
            .is_none()
        {
            return Err(format!(
                "Invalid schema for function '{name}': object schema missing properties"
            ));
        }
    }
    Ok(())
}

/// All text of a message's content, string or parts.
fn content_text(message: &Value) -> String {
    match &message["content"] {
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        other => other.as_str().unwrap_or_default().to_owned(),
    }
}

/// llama-server: "Failed to parse tool call arguments as JSON" (HTTP 500)
/// for any stored call whose arguments are not JSON.
fn arguments_are_json(request: &Value) -> Result<(), String> {
    let calls = request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["tool_calls"].as_array().into_iter().flatten());
    for call in calls {
        let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
        if serde_json::from_str::<Value>(arguments).is_err() {
            return Err(format!(
                "Failed to parse tool call arguments as JSON: {arguments:?}"
            ));
        }
    }
    Ok(())
}

/// Where `cache_control` sits in a request: (path, value's parent).
fn markers(value: &Value, path: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let here = format!("{path}/{key}");
                if key == "cache_control" {
                    found.push(here.clone());
                }
                markers(inner, &here, found);
            }
        }
        Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                markers(inner, &format!("{path}/{i}"), found);
            }
        }
        _ => {}
    }
}

/// OpenRouter's (and Anthropic's) rules for prompt caching markers.
fn validate_markers(request: &Value) -> Result<(), String> {
    let mut found = Vec::new();
    markers(request, "", &mut found);
    if found.len() > 4 {
        return Err(format!(
            "A maximum of 4 blocks with cache_control may be provided. Found {}.",
            found.len()
        ));
    }
    for (i, message) in request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if message.get("cache_control").is_some() {
            // OpenRouter never answers such a request; say why instead.
            return Err(format!(
                "messages[{i}]: cache_control at the top level of a {} message (OpenRouter hangs on this); it belongs on a content part",
                message["role"]
            ));
        }
        if message["content"].is_null() && message.to_string().contains("cache_control") {
            return Err(format!(
                "messages[{i}]: cache_control on an assistant message whose content is null"
            ));
        }
    }
    Ok(())
}

/// A plain OpenAI-compatible server: none of OpenRouter's fields, and a
/// stream that asks for usage.
fn validate_plain(request: &Value) -> Result<(), String> {
    for field in ["session_id", "plugins", "provider", "transforms", "models"] {
        if request.get(field).is_some() {
            return Err(format!("Unrecognized request argument supplied: {field}"));
        }
    }
    for (i, message) in request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for field in ["reasoning", "reasoning_details"] {
            if message.get(field).is_some() {
                return Err(format!(
                    "Unrecognized argument supplied: messages[{i}].{field}"
                ));
            }
        }
    }
    let mut found = Vec::new();
    markers(request, "", &mut found);
    if let Some(first) = found.first() {
        return Err(format!("Unrecognized request argument supplied: {first}"));
    }
    if request["stream"] == true && request["stream_options"]["include_usage"] != true {
        return Err("a stream without stream_options.include_usage sends no usage".into());
    }
    Ok(())
}

/// A request as the provider's cache sees it: markers removed, a single
/// text part read as a string.
fn normalised(request: &Value) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("cache_control");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut request = request.clone();
    strip(&mut request);
    for message in request["messages"].as_array_mut().into_iter().flatten() {
        if let Some([part]) = message["content"].as_array().map(Vec::as_slice)
            && part["type"] == "text"
        {
            message["content"] = part["text"].clone();
        }
    }
    request
}

/// Why `now` does not begin with `before` (the same tools, in the same
/// order, then `before`'s messages), if it does not.
fn prefix_break(before: &Value, now: &Value) -> Option<String> {
    if before["model"] != now["model"] {
        return None; // another model has its own cache
    }
    let tools = |r: &Value| r["tools"].as_array().cloned().unwrap_or_default();
    let (old, new) = (tools(before), tools(now));
    let kept: Vec<&Value> = old.iter().filter(|t| new.contains(t)).collect();
    let still: Vec<&Value> = new.iter().filter(|t| old.contains(t)).collect();
    if kept != still {
        return Some("the tools changed order".into());
    }
    if old != new {
        return Some("the tools changed".into());
    }
    let messages = |r: &Value| r["messages"].as_array().cloned().unwrap_or_default();
    let (old, new) = (messages(before), messages(now));
    match old.iter().zip(&new).position(|(a, b)| a != b) {
        Some(i) => Some(format!("messages[{i}] changed")),
        None if new.len() < old.len() => Some("fewer messages than before".into()),
        None => None,
    }
}

/// What a person wrote in a message the model was sent: its text (or
/// first text part) without the `<@id> (name): ` that names them.
pub fn said(message: &Value) -> String {
    let text = match &message["content"] {
        Value::Array(parts) => parts[0]["text"].as_str().unwrap_or_default(),
        other => other.as_str().unwrap_or_default(),
    };
    match text
        .strip_prefix("<@")
        .and_then(|rest| rest.split_once("): "))
    {
        Some((_, rest)) => rest.to_owned(),
        None => text.to_owned(),
    }
}

/// What people wrote, in the order of a chat request's user messages.
pub fn user_said(request: &Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(said)
        .collect()
}

/// The contents of the tool messages in a chat request, in order.
pub fn tool_results(request: &Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "tool")
        .map(content_text)
        .collect()
}

/// Where `.ci/install-test-servers` put the real MCP servers.
pub fn servers_dir() -> PathBuf {
    std::env::var_os("MCPCORD_TEST_SERVERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-servers"))
}

/// Whether the real MCP servers are installed. Without them a test skips,
/// saying so; under CI (`CI` set) that is a failure instead.
pub fn servers_installed() -> bool {
    let dir = servers_dir();
    let installed = dir.join("node/node_modules").is_dir() && dir.join("py/bin").is_dir();
    if !installed {
        let why = format!(
            "the real MCP test servers are not in {}: run .ci/install-test-servers",
            dir.display()
        );
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
    }
    installed
}

/// Returns from the test (skipping it) when the real MCP servers are not
/// installed.
macro_rules! needs_servers {
    () => {
        if !$crate::support::servers_installed() {
            return;
        }
    };
}
pub(crate) use needs_servers;

pub fn node_server(package: &str) -> String {
    servers_dir()
        .join("node/node_modules/@modelcontextprotocol")
        .join(package)
        .join("dist/index.js")
        .display()
        .to_string()
}

pub fn time_server() -> String {
    servers_dir()
        .join("py/bin/mcp-server-time")
        .display()
        .to_string()
}

/// The SQLite database file in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("mcpcord.db").display())
}

/// The database of the tests in `dir`: the SQLite file there, or, when
/// `MCPCORD_TEST_POSTGRES` names a PostgreSQL server (`.ci/with-postgres`),
/// a database of its own on that server (made on first use, the same for
/// every call with `dir`).
pub fn database_url(dir: &Path) -> String {
    match std::env::var("MCPCORD_TEST_POSTGRES") {
        Ok(server) if !server.is_empty() => postgres_database(&server, dir),
        _ => sqlite_url(dir),
    }
}

/// Whether the tests run on PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("MCPCORD_TEST_POSTGRES").is_ok_and(|s| !s.is_empty())
}

/// A database named after `dir` on the PostgreSQL `server`, made when it
/// is not there yet.
pub fn postgres_database(server: &str, dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    let name = format!("t_{:016x}", hasher.finish());
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("MCPCORD_TEST_POSTGRES {server:?} has no database name"),
    };
    let server = server.to_owned();
    // Config-making is synchronous; the database is made on a runtime of its own.
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                use sqlx::Connection;
                let mut admin = sqlx::PgConnection::connect(&server).await.unwrap();
                let made = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await;
                match made {
                    Ok(_) => {}
                    // 42P04: it exists (made by an earlier call for `dir`).
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                    Err(e) => panic!("cannot make the test database {name}: {e}"),
                }
                let _ = admin.close().await;
            })
    })
    .join()
    .unwrap();
    url
}

/// Runs one statement on the database at `url`, behind the store's back.
pub async fn execute(url: &str, statement: &'static str) {
    use sqlx::Connection;
    if url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
        let _ = connection.close().await;
    } else {
        let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
        let _ = connection.close().await;
    }
}

/// `GET path` on `addr`: the status line and the body.
pub async fn http_get(addr: &str, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of the sample `series` (name and labels as rendered).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A configuration pointing at `model`, a database and an MCP file in `dir`.
pub fn config(model: &FakeModel, dir: &Path, extra: &[(&str, &str)]) -> Config {
    let mut pairs = vec![
        ("DEFAULT_MODEL", "test/tools"),
        ("MODEL_MAX_RETRIES", "3"),
        ("MODEL_API", model.model_api()),
    ];
    pairs.extend_from_slice(extra);
    config_for(&model.base_url, dir, &pairs)
}

/// A configuration pointing at the endpoint `base_url`, a database and an
/// MCP file in `dir`, and `extra` settings.
pub fn config_for(base_url: &str, dir: &Path, extra: &[(&str, &str)]) -> Config {
    let db = database_url(dir);
    let mcp = dir.join("mcp.json").display().to_string();
    let mut pairs: Vec<(String, String)> = vec![
        ("OPENROUTER_API_KEY".into(), KEY.into()),
        ("OPENROUTER_BASE_URL".into(), base_url.into()),
        ("DATABASE_URL".into(), db),
        ("MCP_CONFIG".into(), mcp),
    ];
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_lookup(|name| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    })
    .unwrap()
}

/// Writes an `mcpServers` file into `dir`.
pub fn write_mcp(dir: &Path, servers: Value) {
    std::fs::write(
        dir.join("mcp.json"),
        json!({"mcpServers": servers}).to_string(),
    )
    .unwrap();
}

/// The filesystem server, serving `root`.
pub fn filesystem(root: &Path) -> Value {
    json!({"command": "node", "args": [node_server("server-filesystem"), root.display().to_string()]})
}

pub fn everything() -> Value {
    json!({"command": "node", "args": [node_server("server-everything")]})
}

/// The mcpcord binary, run in `dir` with a clean environment that points
/// at `model`; standard streams piped.
pub fn mcpcord(model: &FakeModel, dir: &Path) -> std::process::Command {
    let mut cmd = mcpcord_for(&model.base_url, dir);
    cmd.env("MODEL_API", model.model_api())
        .env("DEFAULT_MODEL", "test/tools");
    cmd
}

/// The mcpcord binary, run in `dir` with a clean environment that points
/// at the endpoint `base_url`; standard streams piped.
pub fn mcpcord_for(base_url: &str, dir: &Path) -> std::process::Command {
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mcpcord"));
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OPENROUTER_API_KEY", KEY)
        .env("OPENROUTER_BASE_URL", base_url)
        .env("DATABASE_URL", database_url(dir))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs one turn of `key` and collects its events.
pub async fn turn(
    app: &App,
    key: &str,
    message: &str,
) -> (Result<TurnOutcome, TurnError>, Vec<TurnEvent>) {
    turn_with(app, key, Message::user(message)).await
}

/// Runs one turn of `key` on `message` and collects its events.
pub async fn turn_with(
    app: &App,
    key: &str,
    message: Message,
) -> (Result<TurnOutcome, TurnError>, Vec<TurnEvent>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let result = app.engine.run_turn(key, message, &tx, &ApproveAll).await;
    drop(tx);
    let mut events = Vec::new();
    while let Some(event) = rx.recv().await {
        events.push(event);
    }
    (result, events)
}

/// Starts a turn in its own task, so a test can abort it.
pub fn spawn_turn(
    app: &std::sync::Arc<App>,
    key: &'static str,
    message: &'static str,
) -> (
    tokio::task::JoinHandle<Result<TurnOutcome, TurnError>>,
    tokio::sync::mpsc::UnboundedReceiver<TurnEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = app.clone();
    let running = tokio::spawn(async move {
        app.engine
            .run_turn(key, Message::user(message), &tx, &ApproveAll)
            .await
    });
    (running, rx)
}

pub async fn wait_for_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<TurnEvent>,
    wanted: impl Fn(&TurnEvent) -> bool,
) {
    while let Some(event) = rx.recv().await {
        if wanted(&event) {
            return;
        }
    }
    panic!("the turn ended without the expected event");
}

/// `cmd` run through `wrapper` (`setpriv …`, `prlimit …`): the same
/// program, arguments, directory and environment.
pub fn wrapped(wrapper: &[&str], cmd: &std::process::Command) -> std::process::Command {
    use std::process::Stdio;
    let mut outer = std::process::Command::new(wrapper[0]);
    outer
        .args(&wrapper[1..])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_clear()
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = cmd.get_current_dir() {
        outer.current_dir(dir);
    }
    outer
}

/// The Python interpreter itself, not a shim script that adds variables.
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let output = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    })
}

/// The MCP server entry of `tests/peers/hostile_mcp.py` in `mode`.
pub fn hostile(mode: &str, arg: Option<&str>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/hostile_mcp.py");
    let mut args = vec![script.display().to_string(), mode.to_owned()];
    args.extend(arg.map(str::to_owned));
    json!({"command": python(), "args": args})
}

/// Waits (up to 20 s) until a line of the file at `path` satisfies
/// `wanted`, for what a server process writes as it goes; returns it.
pub async fn wait_for_line(path: &Path, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| wanted(l)) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting in {}: {text}",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Serves `router` on a loopback port until `stop`; its base URL.
pub async fn serve_router(router: Router, stop: &tokio_util::sync::CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let stop = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .unwrap();
    });
    base
}

/// An rmcp server of `handler`s at `/mcp` (Streamable HTTP), stopped with
/// `stop`.
pub fn mcp_router<H: rmcp::ServerHandler + Clone + Send + Sync + 'static>(
    handler: H,
    stop: &tokio_util::sync::CancellationToken,
) -> Router {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_cancellation_token(stop.child_token()),
    );
    Router::new().nest_service("/mcp", service)
}
