//! MCP tool results (`CallToolResult` JSON) turned into text the model can use.

use serde_json::Value;

use crate::conversation::ToolOutcome;

/// Text for one result, capped at `max_chars` with a visible marker; the
/// whole text is kept in `full_output` when it was cut.
pub fn outcome(result: &Value, max_chars: usize) -> ToolOutcome {
    let is_error = result
        .get("isError")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let blocks = result
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut parts: Vec<String> = blocks.iter().filter_map(block_text).collect();
    let has_text = blocks
        .iter()
        .any(|b| b.get("type").and_then(Value::as_str) == Some("text"));
    if let Some(structured) = result.get("structuredContent").filter(|v| !v.is_null())
        && !has_text
    {
        parts.push(structured.to_string());
    }
    let mut text = parts.join("\n");
    if text.is_empty() {
        text = "(the tool returned no content)".to_owned();
    }
    if is_error {
        text = format!("ERROR: {text}");
    }
    let mut outcome = cap(text, is_error, max_chars);
    outcome.images = blocks.iter().filter_map(image_url).collect();
    outcome.links = blocks.iter().filter_map(resource_link).collect();
    outcome
}

/// A `resource_link` block, its server left for the caller to fill in.
fn resource_link(block: &Value) -> Option<crate::conversation::ResourceLink> {
    if block.get("type").and_then(Value::as_str) != Some("resource_link") {
        return None;
    }
    let field = |key: &str| block.get(key).and_then(Value::as_str);
    let uri = field("uri")?.to_owned();
    Some(crate::conversation::ResourceLink {
        server: String::new(),
        name: field("title").or(field("name")).unwrap_or(&uri).to_owned(),
        uri,
    })
}

/// Image types chat models accept.
const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp", "image/gif"];
/// The largest image (base64 characters) passed to the model; providers
/// refuse larger ones, so those are only described.
pub const MAX_IMAGE_CHARS: usize = 7 * 1024 * 1024;
/// The most of a cut result kept for people to read in full (Discord's
/// upload limit is 10 MB); past it the rest is dropped with a note.
pub const FULL_OUTPUT_MAX_BYTES: usize = 8 * 1024 * 1024;

/// An image block as a data URL, when it is a type models accept.
fn image_url(block: &Value) -> Option<String> {
    if block.get("type").and_then(Value::as_str) != Some("image") {
        return None;
    }
    let mime = block
        .get("mimeType")
        .and_then(Value::as_str)
        .filter(|m| IMAGE_TYPES.contains(m))?;
    let data = block
        .get("data")
        .and_then(Value::as_str)
        .filter(|d| d.len() <= MAX_IMAGE_CHARS)?;
    Some(format!("data:{mime};base64,{data}"))
}

fn cap(text: String, is_error: bool, max_chars: usize) -> ToolOutcome {
    let total = text.chars().count();
    if total <= max_chars {
        return ToolOutcome {
            content: text,
            is_error,
            full_output: None,
            images: Vec::new(),
            links: Vec::new(),
        };
    }
    let kept: String = text.chars().take(max_chars).collect();
    let mut full = text;
    if full.len() > FULL_OUTPUT_MAX_BYTES {
        let mut end = FULL_OUTPUT_MAX_BYTES;
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        full.truncate(end);
        full.push_str("\n[the rest of this output, past 8 MiB, was not kept]");
    }
    ToolOutcome {
        content: format!(
            "{kept}\n[truncated: showing the first {max_chars} of {total} characters]"
        ),
        is_error,
        full_output: Some(full),
        images: Vec::new(),
        links: Vec::new(),
    }
}

fn block_text(block: &Value) -> Option<String> {
    let field = |key: &str| block.get(key).and_then(Value::as_str);
    match field("type")? {
        "text" => field("text").map(str::to_owned),
        "image" | "audio" => {
            let kind = field("type").unwrap_or("media");
            let mime = field("mimeType").unwrap_or("unknown type");
            let bytes = field("data").map_or(0, |d| d.len() * 3 / 4);
            Some(format!(
                "[{kind} returned: {mime}, about {bytes} bytes; it cannot be shown here]"
            ))
        }
        "resource_link" => {
            let name = field("title").or(field("name")).unwrap_or("resource");
            let uri = field("uri").unwrap_or("");
            let mut line = format!("[resource link] {name} <{uri}>");
            if let Some(description) = field("description") {
                line.push_str(&format!(": {description}"));
            }
            Some(line)
        }
        "resource" => {
            let resource = block.get("resource")?;
            let uri = resource.get("uri").and_then(Value::as_str).unwrap_or("");
            match resource.get("text").and_then(Value::as_str) {
                Some(text) => Some(format!("[resource {uri}]\n{text}")),
                None => {
                    let mime = resource
                        .get("mimeType")
                        .and_then(Value::as_str)
                        .unwrap_or("binary");
                    let bytes = resource
                        .get("blob")
                        .and_then(Value::as_str)
                        .map_or(0, |b| b.len() * 3 / 4);
                    Some(format!(
                        "[resource {uri}: {mime}, about {bytes} bytes of binary data]"
                    ))
                }
            }
        }
        other => Some(format!("[{other} content]")),
    }
}

/// A filled-in prompt (`GetPromptResult` JSON) as the text of a person's
/// turn: its messages in order, the model's part marked as such, capped at
/// `max_chars`.
pub fn prompt_text(result: &Value, max_chars: usize) -> String {
    let messages = result
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let only_user = messages
        .iter()
        .all(|m| m.get("role").and_then(Value::as_str) != Some("assistant"));
    let parts: Vec<String> = messages
        .iter()
        .filter_map(|message| {
            let content = message.get("content")?;
            let text = match content {
                Value::Array(blocks) => blocks
                    .iter()
                    .filter_map(block_text)
                    .collect::<Vec<_>>()
                    .join("\n"),
                block => block_text(block)?,
            };
            let role = message
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("user");
            Some(if only_user {
                text
            } else if role == "assistant" {
                format!("Assistant: {text}")
            } else {
                format!("User: {text}")
            })
        })
        .collect();
    let text = parts.join("\n\n");
    let capped = cap(text, false, max_chars);
    capped.content
}

/// What `resources/read` returned (`ReadResourceResult` JSON).
pub fn resource_contents(result: &Value) -> Vec<crate::conversation::offers::ResourceContent> {
    use crate::conversation::offers::{ResourceBody, ResourceContent};
    use base64::Engine as _;
    let items = result
        .get("contents")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|item| {
            let field = |key: &str| item.get(key).and_then(Value::as_str);
            let body = match (field("text"), field("blob")) {
                (Some(text), _) => ResourceBody::Text(text.to_owned()),
                (None, Some(blob)) => ResourceBody::Bytes(
                    base64::engine::general_purpose::STANDARD
                        .decode(blob)
                        .ok()?,
                ),
                (None, None) => return None,
            };
            Some(ResourceContent {
                uri: field("uri").unwrap_or_default().to_owned(),
                mime: field("mimeType").map(str::to_owned),
                body,
            })
        })
        .collect()
}

/// A listed prompt of `server`, when it has a name.
pub fn prompt_info(server: &str, item: &Value) -> Option<crate::conversation::offers::PromptInfo> {
    use crate::conversation::offers::{PromptArgument, PromptInfo};
    let text = |v: &Value, key: &str| {
        v.get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    };
    let name = text(item, "name")?;
    let arguments = item
        .get("arguments")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let name = text(a, "name")?;
            Some(PromptArgument {
                title: text(a, "title").unwrap_or_else(|| name.clone()),
                description: text(a, "description"),
                required: a.get("required").and_then(Value::as_bool) == Some(true),
                name,
            })
        })
        .collect();
    Some(PromptInfo {
        server: server.to_owned(),
        title: text(item, "title").unwrap_or_else(|| name.clone()),
        description: text(item, "description"),
        name,
        arguments,
    })
}

/// A listed resource (or, with `template`, resource template) of `server`.
pub fn resource_info(
    server: &str,
    item: &Value,
    template: bool,
) -> Option<crate::conversation::offers::ResourceInfo> {
    let field = |key: &str| item.get(key).and_then(Value::as_str).map(str::to_owned);
    let uri = field(if template { "uriTemplate" } else { "uri" })?;
    Some(crate::conversation::offers::ResourceInfo {
        server: server.to_owned(),
        name: field("title")
            .or_else(|| field("name"))
            .unwrap_or_else(|| uri.clone()),
        description: field("description"),
        mime: field("mimeType"),
        uri,
        template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_content_kind_becomes_text() {
        let result = json!({"content": [
            {"type": "text", "text": "hello"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"},
            {"type": "resource_link", "uri": "file:///a", "name": "a", "description": "the a"},
            {"type": "resource", "resource": {"uri": "file:///b", "text": "bee"}},
            {"type": "resource", "resource": {"uri": "file:///c", "blob": "AAAA", "mimeType": "application/zip"}}
        ]});
        let out = outcome(&result, 10_000);
        assert!(!out.is_error);
        assert_eq!(out.images, ["data:image/png;base64,AAAA"]);
        assert_eq!(
            out.content,
            "hello\n[image returned: image/png, about 3 bytes; it cannot be shown here]\n[resource link] a <file:///a>: the a\n[resource file:///b]\nbee\n[resource file:///c: application/zip, about 3 bytes of binary data]"
        );
    }

    #[test]
    fn structured_content_and_errors() {
        let out = outcome(&json!({"content": [], "structuredContent": {"t": 1}}), 100);
        assert_eq!(out.content, r#"{"t":1}"#);
        let out = outcome(
            &json!({"content": [{"type": "text", "text": "bad input"}], "isError": true}),
            100,
        );
        assert!(out.is_error);
        assert_eq!(out.content, "ERROR: bad input");
    }

    #[test]
    fn long_results_are_capped_visibly() {
        let text = "é".repeat(50);
        let out = outcome(&json!({"content": [{"type": "text", "text": text}]}), 10);
        assert!(out.content.starts_with(&"é".repeat(10)));
        assert!(
            out.content
                .ends_with("[truncated: showing the first 10 of 50 characters]")
        );
        assert_eq!(out.full_output.as_deref(), Some(text.as_str()));
    }

    #[test]
    fn huge_images_are_described_and_huge_outputs_capped() {
        let data = "A".repeat(MAX_IMAGE_CHARS + 4);
        let out = outcome(
            &json!({"content": [{"type": "image", "data": data, "mimeType": "image/png"}]}),
            1000,
        );
        assert!(out.images.is_empty());
        assert!(out.content.starts_with("[image returned: image/png"));
        let text = "é".repeat(FULL_OUTPUT_MAX_BYTES);
        let out = outcome(&json!({"content": [{"type": "text", "text": text}]}), 10);
        let full = out.full_output.unwrap();
        assert!(full.len() < FULL_OUTPUT_MAX_BYTES + 100);
        assert!(full.ends_with("past 8 MiB, was not kept]"));
    }
}
