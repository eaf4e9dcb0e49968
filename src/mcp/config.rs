//! The MCP servers file: Claude Desktop's `mcpServers` layout plus mcpcord's
//! own keys per server. Errors name the file, the server, the key and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::Secret;

/// What a stdio server inherits from mcpcord's environment besides the
/// default set (`HOME`, `LOGNAME`, `PATH`, `SHELL`, `TERM`, `USER`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InheritEnv {
    /// Only the default set.
    #[default]
    Default,
    /// Everything except mcpcord's own secrets (`"inheritEnv": true`).
    All,
    /// The default set and these names (`"inheritEnv": ["LANG", ...]`).
    Names(Vec<String>),
}

/// How a server is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Stdio {
        command: String,
        args: Vec<String>,
        /// Values are secrets: they reach the child, never a log.
        env: BTreeMap<String, Secret>,
        cwd: Option<PathBuf>,
        inherit_env: InheritEnv,
    },
    Http {
        url: String,
        headers: BTreeMap<String, Secret>,
        /// Set for `"auth": "oauth"`: the MCP authorization flow.
        oauth: Option<OAuth>,
    },
}

/// How mcpcord identifies itself to a server's authorization server.
/// Without a client id it uses the client metadata document at
/// `client_metadata_url` when the authorization server takes those, or
/// registers itself (dynamic client registration) where it can.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OAuth {
    /// A client registered beforehand (`clientId`).
    pub client_id: Option<String>,
    /// Its secret, for confidential clients (`clientSecret`).
    pub client_secret: Option<Secret>,
    /// An HTTPS URL of mcpcord's client metadata document
    /// (`clientMetadataUrl`).
    pub client_metadata_url: Option<String>,
    /// Scopes to ask for (`scopes`); by default those the server names.
    pub scopes: Vec<String>,
}

/// Who shares a session with a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One session per conversation (stateful servers).
    Conversation,
    /// One session for everyone (stateless servers).
    Shared,
}

/// When a tool call needs a person's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// Never ask.
    Auto,
    /// Always ask.
    Ask,
    /// Ask unless the tool's annotations mark it read-only.
    Annotations,
}

/// One configured MCP server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    pub name: String,
    pub transport: Transport,
    pub scope: Scope,
    pub allowed_tools: Option<Vec<String>>,
    pub blocked_tools: Vec<String>,
    pub timeout: Option<Duration>,
    pub approval: Approval,
}

impl ServerSpec {
    /// Whether the allow and block lists let `tool` through.
    pub fn permits(&self, tool: &str) -> bool {
        let allowed = self
            .allowed_tools
            .as_ref()
            .is_none_or(|list| list.iter().any(|t| t == tool));
        allowed && !self.blocked_tools.iter().any(|t| t == tool)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum McpConfigError {
    #[error("MCP config {path}: cannot read the file: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("MCP config {path}: not valid JSON: {reason}")]
    Syntax { path: String, reason: String },
    #[error("MCP config {path}: {reason}")]
    Layout { path: String, reason: String },
    #[error("MCP config {path}: server \"{server}\", key \"{key}\": {reason}")]
    Server {
        path: String,
        server: String,
        key: String,
        reason: String,
    },
}

/// Reads the servers file. A missing file is an error only when it was
/// named explicitly; otherwise there are simply no tools.
pub fn load(
    path: &Path,
    explicit: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ServerSpec>, McpConfigError> {
    let shown = path.display().to_string();
    if path.is_dir() {
        return Err(McpConfigError::Unreadable {
            path: shown,
            reason: "it is a directory, not a file. Docker makes a directory when the file it should mount does not exist: remove the directory, create the file (see mcp.example.json), and start again".into(),
        });
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            tracing::info!(path = %shown, "no MCP config file; running without tools");
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(McpConfigError::Unreadable {
                path: shown,
                reason: e.to_string(),
            });
        }
    };
    parse(&text, &shown, env)
}

/// Parses the text of a servers file named `path` (for messages).
pub fn parse(
    text: &str,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ServerSpec>, McpConfigError> {
    let syntax = |e: serde_json::Error| McpConfigError::Syntax {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let root: Value = serde_json::from_str(text).map_err(syntax)?;
    let layout = |reason: &str| McpConfigError::Layout {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let servers = root
        .as_object()
        .ok_or_else(|| layout("the file must hold a JSON object"))?
        .get("mcpServers")
        .ok_or_else(|| layout("the \"mcpServers\" key is missing"))?
        .as_object()
        .ok_or_else(|| layout("\"mcpServers\" must be an object of servers by name"))?;
    // serde_json keeps the last of two equal keys; read the names again in
    // order to catch a server defined twice.
    let names: ServerNames = serde_json::from_str(text).map_err(syntax)?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = names
        .servers
        .0
        .iter()
        .find(|name| !seen.insert(name.as_str()))
    {
        return Err(layout(&format!(
            "the server \"{twice}\" is defined twice in \"mcpServers\"; give each server its own name"
        )));
    }
    let mut specs = Vec::new();
    for (name, entry) in servers {
        let reader = Entry {
            path,
            server: name,
            env,
        };
        if let Some(spec) = reader.server(entry)? {
            specs.push(spec);
        }
    }
    Ok(specs)
}

/// The names under `mcpServers`, in order and with repeats.
#[derive(serde::Deserialize)]
struct ServerNames {
    #[serde(rename = "mcpServers", default)]
    servers: Keys,
}

/// The keys of one object, in order and with repeats.
#[derive(Default)]
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(Keys(keys))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Keys mcpcord understands in a server entry.
const KNOWN_KEYS: &[&str] = &[
    "command",
    "args",
    "env",
    "cwd",
    "url",
    "headers",
    "type",
    "transport",
    "disabled",
    "scope",
    "allowedTools",
    "blockedTools",
    "timeoutSecs",
    "approval",
    "inheritEnv",
    "auth",
    "clientId",
    "clientSecret",
    "clientMetadataUrl",
    "scopes",
];

/// Reads one server entry, with what error messages need.
struct Entry<'a> {
    path: &'a str,
    server: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Entry<'_> {
    fn error(&self, key: &str, reason: impl Into<String>) -> McpConfigError {
        McpConfigError::Server {
            path: self.path.to_owned(),
            server: self.server.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn server(&self, entry: &Value) -> Result<Option<ServerSpec>, McpConfigError> {
        let map = entry
            .as_object()
            .ok_or_else(|| self.error("", "a server entry must be an object"))?;
        if self.server.is_empty() {
            return Err(self.error("", "server names cannot be empty"));
        }
        for key in map.keys().filter(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            tracing::warn!(
                path = self.path,
                server = self.server,
                key,
                "unknown key in MCP config ignored"
            );
        }
        match map.get("disabled") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => return Ok(None),
            Some(_) => {
                return Err(self.error("disabled", "must be true or false, without quotes"));
            }
        }
        let transport =
            match (map.get("command"), map.get("url")) {
                (Some(_), Some(_)) => {
                    return Err(self.error(
                        "url",
                        "give either \"command\" (stdio) or \"url\" (HTTP), not both",
                    ));
                }
                (None, None) => return Err(self.error(
                    "command",
                    "missing: give \"command\" for a stdio server or \"url\" for an HTTP server",
                )),
                (Some(_), None) => Transport::Stdio {
                    command: self.string(map, "command")?.unwrap_or_default(),
                    args: self.strings(map, "args")?.unwrap_or_default(),
                    env: self.secrets(map, "env")?,
                    cwd: self.string(map, "cwd")?.map(PathBuf::from),
                    inherit_env: self.inherit_env(map)?,
                },
                (None, Some(_)) => {
                    let url = self.string(map, "url")?.unwrap_or_default();
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(
                            self.error("url", format!("{url:?} is not an http:// or https:// URL"))
                        );
                    }
                    Transport::Http {
                        url,
                        headers: self.secrets(map, "headers")?,
                        oauth: self.oauth(map)?,
                    }
                }
            };
        if matches!(transport, Transport::Stdio { .. }) {
            for key in [
                "auth",
                "clientId",
                "clientSecret",
                "clientMetadataUrl",
                "scopes",
            ] {
                if map.contains_key(key) {
                    return Err(self.error(
                        key,
                        "is for HTTP servers; a stdio server gets its credentials through \"env\"",
                    ));
                }
            }
        }
        if let Transport::Stdio { command, .. } = &transport
            && command.trim().is_empty()
        {
            return Err(self.error("command", "cannot be empty"));
        }
        for key in ["type", "transport"] {
            if let Some(kind) = self.string(map, key)? {
                if kind == "sse" {
                    return Err(self.error(
                        key,
                        "\"sse\" is the HTTP+SSE transport, which MCP deprecated and mcpcord does not speak; servers that have it almost always offer Streamable HTTP too (often at /mcp instead of /sse): point \"url\" there and write \"type\": \"http\"",
                    ));
                }
                let fits = match &transport {
                    Transport::Stdio { .. } => kind == "stdio",
                    Transport::Http { .. } => {
                        ["http", "streamable-http", "streamableHttp"].contains(&kind.as_str())
                    }
                };
                if !fits {
                    return Err(self.error(key, format!("{kind:?} does not match the entry (only stdio and Streamable HTTP servers are supported)")));
                }
            }
        }
        let scope = match self.string(map, "scope")?.as_deref() {
            None | Some("conversation") => Scope::Conversation,
            Some("shared") => Scope::Shared,
            Some(other) => {
                return Err(self.error(
                    "scope",
                    format!("{other:?} is not \"conversation\" or \"shared\""),
                ));
            }
        };
        let approval = match self.string(map, "approval")?.as_deref() {
            None | Some("annotations") => Approval::Annotations,
            Some("auto") => Approval::Auto,
            Some("ask") => Approval::Ask,
            Some(other) => {
                return Err(self.error(
                    "approval",
                    format!("{other:?} is not \"auto\", \"ask\" or \"annotations\""),
                ));
            }
        };
        let timeout = match map.get("timeoutSecs") {
            None => None,
            Some(value) => match value.as_u64().filter(|s| *s > 0) {
                Some(secs) => Some(Duration::from_secs(secs)),
                None => {
                    return Err(self.error(
                        "timeoutSecs",
                        "must be a whole number of seconds, at least 1",
                    ));
                }
            },
        };
        Ok(Some(ServerSpec {
            name: self.server.to_owned(),
            transport,
            scope,
            allowed_tools: self.strings(map, "allowedTools")?,
            blocked_tools: self.strings(map, "blockedTools")?.unwrap_or_default(),
            timeout,
            approval,
        }))
    }

    /// `"auth": "oauth"` and the keys that go with it.
    fn oauth(&self, map: &Map<String, Value>) -> Result<Option<OAuth>, McpConfigError> {
        let extras = ["clientId", "clientSecret", "clientMetadataUrl", "scopes"];
        match self.string(map, "auth")?.as_deref() {
            None | Some("none") => {
                if let Some(key) = extras.iter().find(|k| map.contains_key(**k)) {
                    return Err(self.error(key, "needs \"auth\": \"oauth\""));
                }
                return Ok(None);
            }
            Some("oauth") => {}
            Some(other) => {
                return Err(self.error("auth", format!("{other:?} is not \"oauth\" (or \"none\"); for a fixed token, use \"headers\": {{\"Authorization\": \"Bearer ${{TOKEN}}\"}}")));
            }
        }
        let client_id = self
            .string(map, "clientId")?
            .filter(|id| !id.trim().is_empty());
        let client_secret = self.string(map, "clientSecret")?.map(Secret::new);
        if client_secret.is_some() && client_id.is_none() {
            return Err(self.error(
                "clientSecret",
                "needs \"clientId\", the client it belongs to",
            ));
        }
        let client_metadata_url = self.string(map, "clientMetadataUrl")?;
        if let Some(url) = &client_metadata_url
            && !url.starts_with("https://")
        {
            return Err(self.error("clientMetadataUrl", format!("{url:?} must be an https:// URL (authorization servers fetch the document there)")));
        }
        Ok(Some(OAuth {
            client_id,
            client_secret,
            client_metadata_url,
            scopes: self.strings(map, "scopes")?.unwrap_or_default(),
        }))
    }

    fn inherit_env(&self, map: &Map<String, Value>) -> Result<InheritEnv, McpConfigError> {
        let key = "inheritEnv";
        match map.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(InheritEnv::Default),
            Some(Value::Bool(true)) => Ok(InheritEnv::All),
            Some(Value::Array(_)) => {
                let names = self.strings(map, key)?.unwrap_or_default();
                if let Some(own) = names
                    .iter()
                    .find(|n| super::stdio::OWN_SECRETS.contains(&n.as_str()))
                {
                    return Err(self.error(
                        key,
                        format!("{own} is one of mcpcord's own secrets and is never inherited; if this server really needs it, pass it on purpose with \"env\": {{\"{own}\": \"${{{own}}}\"}}"),
                    ));
                }
                Ok(InheritEnv::Names(names))
            }
            Some(_) => Err(self.error(key, "must be true, false, or a list of variable names")),
        }
    }

    fn string(
        &self,
        map: &Map<String, Value>,
        key: &str,
    ) -> Result<Option<String>, McpConfigError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => self.expand(key, s).map(Some),
            Some(_) => Err(self.error(key, "must be a string")),
        }
    }

    fn strings(
        &self,
        map: &Map<String, Value>,
        key: &str,
    ) -> Result<Option<Vec<String>>, McpConfigError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => self.expand(key, s),
                    _ => Err(self.error(key, "must be a list of strings")),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(self.error(key, "must be a list of strings")),
        }
    }

    fn secrets(
        &self,
        map: &Map<String, Value>,
        key: &str,
    ) -> Result<BTreeMap<String, Secret>, McpConfigError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(pairs)) => pairs
                .iter()
                .map(|(name, value)| match value {
                    Value::String(s) => Ok((
                        name.clone(),
                        Secret::new(self.expand(&format!("{key}.{name}"), s)?),
                    )),
                    Value::Number(n) => Ok((name.clone(), Secret::new(n.to_string()))),
                    Value::Bool(b) => Ok((name.clone(), Secret::new(b.to_string()))),
                    _ => Err(self.error(&format!("{key}.{name}"), "must be a string")),
                })
                .collect(),
            Some(_) => Err(self.error(key, "must be an object of names to strings")),
        }
    }

    /// Replaces each `${VAR}` with the variable's value, and each
    /// `${VAR:-default}` with it or, when it is unset or empty, `default`.
    fn expand(&self, key: &str, text: &str) -> Result<String, McpConfigError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| self.error(key, "an unclosed \"${\" (write ${NAME})"))?;
            let (name, default) = match after[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&after[..end], None),
            };
            let set = (self.env)(name).filter(|v| default.is_none() || !v.is_empty());
            let value = match (set, default) {
                (Some(value), _) => value,
                (None, Some(default)) => default.to_owned(),
                (None, None) => {
                    return Err(self.error(
                        key,
                        format!("the environment variable {name} is not set (used as ${{{name}}}; write ${{{name}:-default}} to give a default)"),
                    ));
                }
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn parse_ok(text: &str) -> Vec<ServerSpec> {
        parse(text, "mcp.json", &env).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, "mcp.json", &env).unwrap_err().to_string()
    }

    #[test]
    fn reads_claude_desktop_entries_and_own_keys() {
        let specs = parse_ok(
            r#"{"mcpServers": {
                "fs": {"command": "npx", "args": ["-y", "server", "/tmp"], "env": {"KEY": "${TOKEN}"}},
                "web": {"url": "https://example.test/mcp", "headers": {"Authorization": "Bearer ${TOKEN}"},
                        "scope": "shared", "allowedTools": ["a"], "blockedTools": ["b"], "timeoutSecs": 5, "approval": "ask"},
                "off": {"command": "x", "disabled": true}
            }}"#,
        );
        assert_eq!(specs.len(), 2);
        let fs = &specs[0];
        assert_eq!(fs.scope, Scope::Conversation);
        assert_eq!(fs.approval, Approval::Annotations);
        let Transport::Stdio { env, args, .. } = &fs.transport else {
            panic!("stdio expected")
        };
        assert_eq!(env["KEY"].expose(), "s3cret");
        assert_eq!(args, &["-y", "server", "/tmp"]);
        let web = &specs[1];
        let Transport::Http { headers, .. } = &web.transport else {
            panic!("http expected")
        };
        assert_eq!(headers["Authorization"].expose(), "Bearer s3cret");
        assert_eq!(
            (web.scope, web.approval, web.timeout),
            (Scope::Shared, Approval::Ask, Some(Duration::from_secs(5)))
        );
        assert!(web.permits("a") && !web.permits("b") && !web.permits("c"));
        assert!(!format!("{specs:?}").contains("s3cret"));
    }

    #[test]
    fn errors_name_file_server_key_and_reason() {
        assert_eq!(
            parse_err(r#"{"mcpServers": {"fs": {"command": "x", "scope": "global"}}}"#),
            "MCP config mcp.json: server \"fs\", key \"scope\": \"global\" is not \"conversation\" or \"shared\""
        );
        assert!(
            parse_err(r#"{"mcpServers": {"fs": {"args": []}}}"#)
                .contains("key \"command\": missing")
        );
        assert!(
            parse_err(r#"{"mcpServers": {"fs": {"command": "x", "env": {"A": "${NOPE}"}}}}"#)
                .contains("key \"env.A\": the environment variable NOPE is not set")
        );
        assert!(
            parse_err(r#"{"mcpServers": {"fs": {"command": "x", "timeoutSecs": "5"}}}"#)
                .contains("timeoutSecs")
        );
        assert!(parse_err(r#"{"mcpServers": {"w": {"url": "ftp://x"}}}"#).contains("key \"url\""));
        assert!(parse_err(r#"{"servers": {}}"#).contains("\"mcpServers\" key is missing"));
        assert!(parse_err("{").starts_with("MCP config mcp.json: not valid JSON"));
    }

    #[test]
    fn variables_can_have_defaults() {
        let specs = parse_ok(
            r#"{"mcpServers": {"fs": {"command": "x", "args": ["${TOKEN:-none}", "${NOPE:-/data}", "${NOPE:-}", "${EMPTY:-filled}"]}}}"#,
        );
        let Transport::Stdio { args, .. } = &specs[0].transport else {
            panic!("stdio expected")
        };
        assert_eq!(args, &["s3cret", "/data", "", "filled"]);
    }

    #[test]
    fn sse_entries_are_refused_with_what_to_use() {
        let error = parse_err(
            r#"{"mcpServers": {"old": {"type": "sse", "url": "http://127.0.0.1:1/sse"}}}"#,
        );
        assert!(
            error.starts_with("MCP config mcp.json: server \"old\", key \"type\": \"sse\" is the HTTP+SSE transport"),
            "{error}"
        );
        assert!(error.contains("\"type\": \"http\""), "{error}");
    }

    #[test]
    fn a_missing_default_file_means_no_tools() {
        let path = Path::new("/nonexistent/mcp.json");
        assert_eq!(load(path, false, &env).unwrap(), Vec::new());
        assert!(matches!(
            load(path, true, &env),
            Err(McpConfigError::Unreadable { .. })
        ));
    }

    #[test]
    fn mistakes_that_used_to_pass_silently_are_named() {
        assert_eq!(
            parse_err(r#"{"mcpServers": {"a": {"command": "x"}, "a": {"command": "y"}}}"#),
            "MCP config mcp.json: the server \"a\" is defined twice in \"mcpServers\"; give each server its own name"
        );
        assert_eq!(
            parse_err(r#"{"mcpServers": {"a": {"command": "x", "disabled": "true"}}}"#),
            "MCP config mcp.json: server \"a\", key \"disabled\": must be true or false, without quotes"
        );
        assert!(
            parse_err(
                r#"{"mcpServers": {"a": {"command": "x", "inheritEnv": ["DISCORD_TOKEN"]}}}"#
            )
            .contains("DISCORD_TOKEN is one of mcpcord's own secrets")
        );
        assert!(
            parse_err(r#"{"mcpServers": {"a": {"command": "x", "inheritEnv": "yes"}}}"#)
                .contains("key \"inheritEnv\": must be true, false, or a list")
        );
        let dir = tempfile::tempdir().unwrap();
        let error = load(dir.path(), true, &env).unwrap_err().to_string();
        assert!(error.contains("it is a directory, not a file"), "{error}");
    }

    #[test]
    fn inherit_env_reads_true_and_lists() {
        let specs = parse_ok(
            r#"{"mcpServers": {"all": {"command": "x", "inheritEnv": true},
                "some": {"command": "x", "inheritEnv": ["LANG"]}, "none": {"command": "x"}}}"#,
        );
        let inherit: Vec<InheritEnv> = specs
            .iter()
            .map(|s| match &s.transport {
                Transport::Stdio { inherit_env, .. } => inherit_env.clone(),
                Transport::Http { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(
            inherit,
            [
                InheritEnv::All,
                InheritEnv::Default,
                InheritEnv::Names(vec!["LANG".into()])
            ]
        );
    }
}
