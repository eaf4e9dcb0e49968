//! What tool servers offer people besides tools: prompts (ready-made
//! messages, picked by name) and resources (things to read, picked by URI).

/// A prompt a server offers.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptInfo {
    pub server: String,
    pub name: String,
    /// What people see: the server's title, else the name.
    pub title: String,
    pub description: Option<String>,
    pub arguments: Vec<PromptArgument>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptArgument {
    pub name: String,
    pub title: String,
    pub description: Option<String>,
    pub required: bool,
}

impl PromptInfo {
    /// How a prompt is named across servers: `server__name`.
    pub fn key(&self) -> String {
        format!("{}__{}", self.server, self.name)
    }
}

/// A resource, or a resource template (a URI with `{placeholders}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceInfo {
    pub server: String,
    /// The URI, or the template's URI template.
    pub uri: String,
    pub name: String,
    pub description: Option<String>,
    pub mime: Option<String>,
    pub template: bool,
}

/// One part of what reading a resource returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceContent {
    pub uri: String,
    pub mime: Option<String>,
    /// Text contents, or the bytes of binary ones.
    pub body: ResourceBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResourceBody {
    Text(String),
    Bytes(Vec<u8>),
}

/// Splits `server__name` (as [`PromptInfo::key`] writes it) at the first
/// `__` after a server that exists in `servers`.
pub fn split_key<'a>(key: &'a str, servers: &[String]) -> Option<(&'a str, &'a str)> {
    servers.iter().find_map(|server| {
        let name = key.strip_prefix(server.as_str())?.strip_prefix("__")?;
        (!name.is_empty())
            .then(|| key.split_at(server.len()))
            .map(|(s, _)| (s, name))
    })
}

/// `key=value` words as arguments; a value may be quoted ("two words").
pub fn parse_arguments(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("\"{rest}\" is not key=value"))?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("\"{key}\" is not an argument name"));
        }
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted
                    .find('"')
                    .ok_or_else(|| format!("the value of {key} has no closing quote"))?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(char::is_whitespace).unwrap_or((after, "")),
        };
        out.push((key.to_owned(), value.to_owned()));
        rest = next.trim_start();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_key_value_words_or_quoted() {
        assert_eq!(
            parse_arguments(r#"city=Paris note="two words" n=3"#),
            Ok(vec![
                ("city".into(), "Paris".into()),
                ("note".into(), "two words".into()),
                ("n".into(), "3".into())
            ])
        );
        assert!(parse_arguments("city").is_err());
        assert!(parse_arguments(r#"a="open"#).is_err());
        assert_eq!(parse_arguments("  "), Ok(vec![]));
    }

    #[test]
    fn keys_split_at_a_known_server() {
        let servers = vec!["fs".to_owned(), "my__srv".to_owned()];
        assert_eq!(
            split_key("fs__summarise", &servers),
            Some(("fs", "summarise"))
        );
        assert_eq!(split_key("my__srv__p", &servers), Some(("my__srv", "p")));
        assert_eq!(split_key("other__p", &servers), None);
        assert_eq!(split_key("fs__", &servers), None);
    }
}
