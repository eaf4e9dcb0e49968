//! The OpenAI-compatible wire format: requests, replies, stream chunks and
//! error bodies, translated to and from the domain types.

use serde_json::{Map, Value, json};

use crate::conversation::{
    ChatRequest, Completion, FinishReason, Message, ModelError, Role, TextSink, ToolCall, Usage,
};

/// The request body for `POST /chat/completions`.
pub fn request_body(request: &ChatRequest<'_>, stream: bool) -> Value {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = request.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.extend(request.messages.iter().map(message_json));
    let mut body = json!({
        "model": request.model,
        "messages": messages,
        "stream": stream,
    });
    if !request.tools.is_empty() {
        let strict_schemas = request.model.starts_with("google/");
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                let mut parameters = tool.parameters.clone();
                if strict_schemas {
                    strip_for_gemini(&mut parameters);
                }
                json!({"type": "function", "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": parameters,
                }})
            })
            .collect();
        body["tools"] = Value::Array(tools);
    }
    body
}

fn message_json(message: &Message) -> Value {
    match message.role() {
        Role::User if message.images.is_empty() => {
            json!({"role": "user", "content": message.text()})
        }
        Role::User => {
            let mut parts = vec![json!({"type": "text", "text": message.text()})];
            parts.extend(
                message
                    .images
                    .iter()
                    .map(|url| json!({"type": "image_url", "image_url": {"url": url}})),
            );
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
            if let Some(reasoning) = &message.reasoning {
                out.insert("reasoning".into(), Value::String(reasoning.clone()));
            }
            if let Some(details) = &message.reasoning_details {
                out.insert("reasoning_details".into(), details.clone());
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
        ..Default::default()
    };
    if finish == Some("error") {
        return Err(ModelError::Provider {
            status: None,
            message: "the provider stopped with an error".into(),
        });
    }
    Ok(Completion {
        message,
        finish_reason: map_finish(finish),
        usage,
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
    Usage {
        prompt_tokens: usage
            .get("prompt_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        completion_tokens: usage
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cost: usage.get("cost").and_then(Value::as_f64).unwrap_or(0.0),
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
            ..Default::default()
        };
        Ok(Completion {
            message,
            finish_reason: map_finish(self.finish.as_deref()),
            usage: self.usage,
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
    match code {
        Some(401) => ModelError::InvalidKey,
        Some(402) => ModelError::CreditsExhausted,
        Some(403) => ModelError::Forbidden { message: detailed },
        Some(404) if lower.contains("tool use") || lower.contains("tool_choice") => {
            ModelError::NoToolSupport {
                model: "you chose".into(),
            }
        }
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
    fn assistant_messages_round_trip_reasoning_details() {
        let details = json!([{"type":"reasoning.encrypted","data":"abc","index":0}]);
        let message = Message {
            role: Some(Role::Assistant),
            reasoning_details: Some(details.clone()),
            ..Default::default()
        };
        let json = message_json(&message);
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
}
