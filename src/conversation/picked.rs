//! What people pick from the tool servers, through the engine: prompts
//! filled in as the text of their turn, and resources read as context. The
//! servers switched off in a conversation offer nothing there.

use super::engine::Engine;
use super::offers::{PromptInfo, ResourceBody, ResourceContent, ResourceInfo, split_key};
use super::ports::StoreError;

/// Why a prompt or resource could not be used: a sentence.
pub type Refusal = String;

impl Engine {
    /// The prompts offered in `conversation`.
    pub async fn prompts(&self, conversation: &str) -> Result<Vec<PromptInfo>, StoreError> {
        let off = self.servers_off(conversation).await?;
        Ok(self.tools().prompts(conversation, &off).await)
    }

    /// The resources and templates offered in `conversation`.
    pub async fn resources(&self, conversation: &str) -> Result<Vec<ResourceInfo>, StoreError> {
        let off = self.servers_off(conversation).await?;
        Ok(self.tools().resources(conversation, &off).await)
    }

    /// The prompt `key` (`server__name`) of `conversation`, when offered.
    pub async fn prompt(&self, conversation: &str, key: &str) -> Result<PromptInfo, Refusal> {
        let prompts = self
            .prompts(conversation)
            .await
            .map_err(|e| e.to_string())?;
        let servers: Vec<String> = prompts.iter().map(|p| p.server.clone()).collect();
        let found = split_key(key, &servers).and_then(|(server, name)| {
            prompts
                .iter()
                .find(|p| p.server == server && p.name == name)
        });
        found.cloned().ok_or_else(|| {
            let known: Vec<String> = prompts.iter().map(PromptInfo::key).collect();
            if known.is_empty() {
                format!("there is no prompt {key}: no tool server here offers prompts (or those that do are not available now)")
            } else {
                format!("there is no prompt {key}; there are: {}", known.join(", "))
            }
        })
    }

    /// The prompt `key` filled in with `arguments`: the text of the
    /// person's turn, marked with the prompt's name.
    pub async fn fill_prompt(
        &self,
        conversation: &str,
        key: &str,
        arguments: &[(String, String)],
    ) -> Result<String, Refusal> {
        let prompt = self.prompt(conversation, key).await?;
        if let Some((unknown, _)) = arguments
            .iter()
            .find(|(name, _)| !prompt.arguments.iter().any(|a| &a.name == name))
        {
            let known: Vec<&str> = prompt.arguments.iter().map(|a| a.name.as_str()).collect();
            return Err(if known.is_empty() {
                format!("the prompt {key} takes no arguments, not {unknown}")
            } else {
                format!(
                    "the prompt {key} has no argument {unknown}; it takes {}",
                    known.join(", ")
                )
            });
        }
        let missing: Vec<&str> = prompt
            .arguments
            .iter()
            .filter(|a| a.required && !arguments.iter().any(|(n, v)| n == &a.name && !v.is_empty()))
            .map(|a| a.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!("the prompt {key} needs {}", missing.join(", ")));
        }
        let given = arguments
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let text = self
            .tools()
            .get_prompt(conversation, &prompt.server, &prompt.name, given, &())
            .await?;
        Ok(format!(
            "[Prompt \"{}\" of {}]\n{text}",
            prompt.title, prompt.server
        ))
    }

    /// Suggestions for `argument` of the prompt `name` of `server`.
    pub async fn complete_argument(
        &self,
        conversation: &str,
        server: &str,
        name: &str,
        argument: &str,
        value: &str,
    ) -> Vec<String> {
        self.tools()
            .complete_argument(conversation, server, name, argument, value)
            .await
    }

    /// The server of `conversation` that offers `uri`: one that lists it,
    /// else one whose template it fits.
    pub async fn resource_server(&self, conversation: &str, uri: &str) -> Result<String, Refusal> {
        let resources = self
            .resources(conversation)
            .await
            .map_err(|e| e.to_string())?;
        resources
            .iter()
            .find(|r| !r.template && r.uri == uri)
            .or_else(|| {
                resources
                    .iter()
                    .find(|r| r.template && fits_template(&r.uri, uri))
            })
            .map(|r| r.server.clone())
            .ok_or_else(|| format!("no tool server here offers the resource {uri} (or the one that does is not available now)"))
    }

    /// Reads `uri` from the server that offers it in `conversation`.
    pub async fn read_resource(
        &self,
        conversation: &str,
        uri: &str,
    ) -> Result<(String, Vec<ResourceContent>), Refusal> {
        let server = self.resource_server(conversation, uri).await?;
        let contents = self
            .tools()
            .read_resource(conversation, &server, uri)
            .await?;
        Ok((server, contents))
    }

    /// A resource read as the text of a person's turn: its text contents,
    /// capped like a tool result; binary parts are described.
    pub fn resource_context(
        &self,
        server: &str,
        uri: &str,
        contents: &[ResourceContent],
    ) -> String {
        let max = self.tools().result_max_chars();
        let mut text = format!("[Resource {uri} of {server}, chosen by the user]");
        for part in contents {
            match &part.body {
                ResourceBody::Text(body) => {
                    text.push('\n');
                    text.push_str(body);
                }
                ResourceBody::Bytes(bytes) => text.push_str(&format!(
                    "\n[{}: {}, {} bytes of binary data]",
                    part.uri,
                    part.mime.as_deref().unwrap_or("unknown type"),
                    bytes.len()
                )),
            }
        }
        match text.char_indices().nth(max) {
            Some((cut, _)) => format!(
                "{}\n[cut: the resource is longer than {max} characters (TOOL_RESULT_MAX_CHARS)]",
                &text[..cut]
            ),
            None => text,
        }
    }
}

/// Whether `uri` fits the URI template `template` (`demo://x/{id}`): its
/// fixed parts in order, each `{…}` standing for at least one character.
pub fn fits_template(template: &str, uri: &str) -> bool {
    let mut fixed: Vec<&str> = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        fixed.push(&rest[..open]);
        match rest[open..].find('}') {
            Some(close) => rest = &rest[open + close + 1..],
            None => return false,
        }
    }
    fixed.push(rest);
    let Some(mut left) = uri.strip_prefix(fixed[0]) else {
        return false;
    };
    let last = fixed.len() - 1;
    for (i, part) in fixed.iter().enumerate().skip(1) {
        if i == last {
            return left.len() > part.len() && left.ends_with(part);
        }
        match left.get(1..).and_then(|l| l.find(part)) {
            Some(at) => left = &left[at + 1 + part.len()..],
            None => return false,
        }
    }
    left.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_fit_templates_by_their_fixed_parts() {
        let t = "demo://resource/dynamic/text/{resourceId}";
        assert!(fits_template(t, "demo://resource/dynamic/text/3"));
        assert!(!fits_template(t, "demo://resource/dynamic/text/"));
        assert!(!fits_template(t, "demo://resource/static/x"));
        let two = "repo://{owner}/{name}/readme";
        assert!(fits_template(two, "repo://ada/engine/readme"));
        assert!(!fits_template(two, "repo://ada/readme"));
        assert!(fits_template("plain://x", "plain://x"));
        assert!(!fits_template("plain://x", "plain://xy"));
    }
}
