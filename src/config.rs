//! The environment, read once into a typed struct. Every error names the
//! variable and the problem.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How long "Allow in this thread" lasts unless `APPROVAL_REMEMBER_SECS` says.
pub const DEFAULT_APPROVAL_REMEMBER: Duration = Duration::from_secs(3600);

/// The OpenRouter API, unless `OPENROUTER_BASE_URL` says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://openrouter.ai/api/v1";
/// An inexpensive current model that supports tool calls.
pub const DEFAULT_MODEL: &str = "openai/gpt-4.1-mini";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://mcpcord.db";
pub const DEFAULT_MCP_CONFIG: &str = "mcp.json";

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Shorter values are not redacted: they would blank out ordinary words.
const MIN_REDACTED_LEN: usize = 6;

/// Replaces known secret values in text meant for a log.
#[derive(Clone, Default)]
pub struct Redactor {
    values: std::sync::Arc<Vec<String>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} values)", self.values.len())
    }
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut values: Vec<String> = secrets
            .into_iter()
            .map(str::trim)
            .filter(|s| s.len() >= MIN_REDACTED_LEN)
            .map(str::to_owned)
            .collect();
        // Longest first, so a secret that contains another is caught whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Redactor {
            values: std::sync::Arc::new(values),
        }
    }

    /// `text` with every known secret value replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in self.values.iter() {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// Named bounds, each with a variable and a default.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `MAX_TOOL_ROUNDS`: tool rounds one turn may run.
    pub max_tool_rounds: usize,
    /// `TOOL_TIMEOUT_SECS`: how long one tool call may take (per server: `timeoutSecs`).
    pub tool_timeout: Duration,
    /// `TOOL_MAX_SECS`: how long a call that keeps reporting progress may run in all (each
    /// report gives it the tool timeout again, up to this).
    pub tool_max: Duration,
    /// `TOOL_RESULT_MAX_CHARS`: characters of one tool result sent to the model.
    pub tool_result_max_chars: usize,
    /// `MCP_MAX_SESSIONS_PER_SERVER`: live per-conversation sessions of one server.
    pub max_sessions_per_server: usize,
    /// `MCP_IDLE_TIMEOUT_SECS`: an unused per-conversation session is closed after this.
    pub session_idle_timeout: Duration,
    /// `MODEL_TIMEOUT_SECS`: how long one model request may take, stream included.
    pub model_timeout: Duration,
    /// `MODEL_MAX_RETRIES`: retries of a model request on 408/429/5xx and connection errors.
    pub model_max_retries: usize,
    /// `FALLBACK_CONTEXT_TOKENS`: context window assumed for models the catalogue does not list.
    pub fallback_context_tokens: u64,
    /// `MODEL_MAX_RESPONSE_BYTES`: the largest reply (streamed or not) read from the model endpoint.
    pub model_max_response_bytes: usize,
    /// `MCP_START_TIMEOUT_SECS`: how long an MCP server may take to start and answer `initialize`.
    pub mcp_start_timeout: Duration,
    /// `MCP_LIST_TIMEOUT_SECS`: how long listing one server's tools may take, all pages together.
    pub mcp_list_timeout: Duration,
    /// `MCP_MAX_TOOLS_PER_SERVER`: tools taken from one server; the rest are left out.
    pub mcp_max_tools_per_server: usize,
    /// `MCP_MAX_MESSAGE_BYTES`: the largest message (a tool result, a tool list page) read from an MCP server.
    pub mcp_max_message_bytes: usize,
    /// `MCP_RETRY_MAX_SECS`: the longest wait before a server that failed to start is tried again.
    pub mcp_retry_max: Duration,
    /// `MCP_SESSION_WAIT_SECS`: how long a turn waits for a free session when all of a server's are in use.
    pub mcp_session_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tool_rounds: 10,
            tool_timeout: Duration::from_secs(60),
            tool_max: Duration::from_secs(600),
            tool_result_max_chars: 20_000,
            max_sessions_per_server: 32,
            session_idle_timeout: Duration::from_secs(900),
            model_timeout: Duration::from_secs(300),
            model_max_retries: 4,
            fallback_context_tokens: 32_000,
            model_max_response_bytes: 16 * 1024 * 1024,
            mcp_start_timeout: Duration::from_secs(60),
            mcp_list_timeout: Duration::from_secs(30),
            mcp_max_tools_per_server: 128,
            mcp_max_message_bytes: 32 * 1024 * 1024,
            mcp_retry_max: Duration::from_secs(300),
            mcp_session_wait: Duration::from_secs(120),
        }
    }
}

/// Everything mcpcord reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: Secret,
    pub base_url: String,
    pub default_model: String,
    pub system_prompt: Option<String>,
    /// `TRANSCRIPTION_MODEL`: an audio-capable model that transcribes
    /// voice notes for models that do not hear audio.
    pub transcription_model: Option<String>,
    /// `TIMEZONE`: where the prompt's `{date}`, `{time}` and `{weekday}`
    /// are told (an IANA name; UTC by default).
    pub timezone: jiff::tz::TimeZone,
    /// `METRICS_ADDR`: where `/metrics` and `/healthz` are served (off
    /// when unset).
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub database_url: String,
    pub mcp_config: PathBuf,
    /// False when `MCP_CONFIG` was not set and the default path is used.
    pub mcp_config_explicit: bool,
    /// `STREAM_RESPONSES`: stream answers as they are written.
    pub stream: bool,
    /// `MODEL_API`: which dialect the endpoint speaks.
    pub model_api: ModelApi,
    /// `OPENROUTER_APP_URL`: sent as `HTTP-Referer` for OpenRouter's app
    /// attribution; `None` when set empty.
    pub app_url: Option<String>,
    /// `OPENROUTER_PROVIDER`: OpenRouter's `provider` preferences, a JSON object.
    pub provider: Option<serde_json::Value>,
    /// `REASONING_EFFORT`: unset leaves it to the model.
    pub reasoning_effort: Option<ReasoningEffort>,
    /// `WEB_SEARCH`: OpenRouter's web search beside the MCP tools.
    pub web_search: Option<WebSearch>,
    pub limits: Limits,
}

/// The project's address, for OpenRouter's app attribution.
pub const PROJECT_URL: &str = env!("CARGO_PKG_REPOSITORY");

/// The dialect of the chat completions endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelApi {
    /// OpenRouter: attribution, sessions, users, caching markers, provider
    /// preferences, plugins and server tools.
    OpenRouter,
    /// Plain OpenAI fields only (llama.cpp's server, vLLM, Ollama...).
    OpenAi,
}

pub use crate::conversation::ReasoningEffort;

/// OpenRouter's web search server tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSearch {
    /// `WEB_SEARCH_MAX_RESULTS`: results per search.
    pub max_results: u32,
    /// `WEB_SEARCH_MAX_USES`: searches per request.
    pub max_uses: u32,
}

/// The host of an http(s) URL, without credentials or port.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host.split(':').next().unwrap_or("")
}

/// `OPENROUTER_PROVIDER`: a JSON object, checked at start so that a typo
/// is named here rather than refused by every request.
fn provider(value: Option<String>) -> Result<Option<serde_json::Value>, ConfigError> {
    let Some(text) = value else {
        return Ok(None);
    };
    let invalid = |problem: String| ConfigError::Invalid {
        name: "OPENROUTER_PROVIDER",
        problem,
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(Some(value)),
        Ok(_) => Err(invalid(format!(
            "{text:?} is not a JSON object; write e.g. {{\"data_collection\":\"deny\",\"zdr\":true}}"
        ))),
        Err(e) => Err(invalid(format!("{text:?} is not valid JSON ({e})"))),
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("Missing {0}: set it in the environment or in .env (see .env.example)")]
    Missing(&'static str),
    #[error("Invalid {name}: {problem}")]
    Invalid { name: &'static str, problem: String },
}

impl Config {
    /// Reads the process environment (after `.env` has been loaded).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup`, so tests need no globals.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = non_empty(&lookup);
        let defaults = Limits::default();
        let api_key =
            get("OPENROUTER_API_KEY").ok_or(ConfigError::Missing("OPENROUTER_API_KEY"))?;
        token_text("OPENROUTER_API_KEY", &api_key)?;
        let base_url = http_url(&get, "OPENROUTER_BASE_URL", DEFAULT_BASE_URL)?;
        let limits = Limits {
            max_tool_rounds: number(&get, "MAX_TOOL_ROUNDS", defaults.max_tool_rounds)?,
            tool_timeout: seconds(&get, "TOOL_TIMEOUT_SECS", defaults.tool_timeout)?,
            tool_max: seconds(&get, "TOOL_MAX_SECS", defaults.tool_max)?,
            tool_result_max_chars: number(
                &get,
                "TOOL_RESULT_MAX_CHARS",
                defaults.tool_result_max_chars,
            )?,
            max_sessions_per_server: number(
                &get,
                "MCP_MAX_SESSIONS_PER_SERVER",
                defaults.max_sessions_per_server,
            )?,
            session_idle_timeout: seconds(
                &get,
                "MCP_IDLE_TIMEOUT_SECS",
                defaults.session_idle_timeout,
            )?,
            model_timeout: seconds(&get, "MODEL_TIMEOUT_SECS", defaults.model_timeout)?,
            model_max_retries: bounded(&get, "MODEL_MAX_RETRIES", defaults.model_max_retries, 0)?,
            fallback_context_tokens: number(
                &get,
                "FALLBACK_CONTEXT_TOKENS",
                defaults.fallback_context_tokens,
            )?,
            model_max_response_bytes: number(
                &get,
                "MODEL_MAX_RESPONSE_BYTES",
                defaults.model_max_response_bytes,
            )?,
            mcp_start_timeout: seconds(&get, "MCP_START_TIMEOUT_SECS", defaults.mcp_start_timeout)?,
            mcp_list_timeout: seconds(&get, "MCP_LIST_TIMEOUT_SECS", defaults.mcp_list_timeout)?,
            mcp_max_tools_per_server: number(
                &get,
                "MCP_MAX_TOOLS_PER_SERVER",
                defaults.mcp_max_tools_per_server,
            )?,
            mcp_max_message_bytes: number(
                &get,
                "MCP_MAX_MESSAGE_BYTES",
                defaults.mcp_max_message_bytes,
            )?,
            mcp_retry_max: seconds(&get, "MCP_RETRY_MAX_SECS", defaults.mcp_retry_max)?,
            mcp_session_wait: seconds(&get, "MCP_SESSION_WAIT_SECS", defaults.mcp_session_wait)?,
        };
        let model_api = match get("MODEL_API").map(|v| v.to_ascii_lowercase()) {
            None if host_of(&base_url) == "openrouter.ai" => ModelApi::OpenRouter,
            None => ModelApi::OpenAi,
            Some(v) if v == "openrouter" => ModelApi::OpenRouter,
            Some(v) if v == "openai" => ModelApi::OpenAi,
            Some(v) => {
                return Err(ConfigError::Invalid {
                    name: "MODEL_API",
                    problem: format!("{v:?} is neither openrouter nor openai"),
                });
            }
        };
        // Set but empty turns attribution off; unset means the project's URL.
        let app_url = match lookup("OPENROUTER_APP_URL").map(|v| v.trim().to_owned()) {
            None => Some(PROJECT_URL.to_owned()),
            Some(v) if v.is_empty() => None,
            Some(_) => Some(http_url(&get, "OPENROUTER_APP_URL", PROJECT_URL)?),
        };
        let web_search = boolean(&get, "WEB_SEARCH", false)?
            .then(|| {
                Ok::<_, ConfigError>(WebSearch {
                    max_results: number(&get, "WEB_SEARCH_MAX_RESULTS", 5)?,
                    max_uses: number(&get, "WEB_SEARCH_MAX_USES", 3)?,
                })
            })
            .transpose()?;
        Ok(Config {
            api_key: Secret::new(api_key),
            base_url,
            default_model: get("DEFAULT_MODEL").unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
            system_prompt: get("SYSTEM_PROMPT"),
            timezone: timezone(get("TIMEZONE"))?,
            metrics_addr: get("METRICS_ADDR")
                .map(|addr| {
                    addr.parse().map_err(|_| ConfigError::Invalid {
                        name: "METRICS_ADDR",
                        problem: format!(
                            "{addr:?} is not an address and port such as 127.0.0.1:9464 (or 0.0.0.0:9464 in a container)"
                        ),
                    })
                })
                .transpose()?,
            transcription_model: get("TRANSCRIPTION_MODEL"),
            database_url: database_url(get("DATABASE_URL"))?,
            mcp_config_explicit: get("MCP_CONFIG").is_some(),
            mcp_config: PathBuf::from(
                get("MCP_CONFIG").unwrap_or_else(|| DEFAULT_MCP_CONFIG.to_owned()),
            ),
            stream: boolean(&get, "STREAM_RESPONSES", true)?,
            model_api,
            app_url,
            provider: provider(get("OPENROUTER_PROVIDER"))?,
            reasoning_effort: get("REASONING_EFFORT")
                .map(|v| {
                    ReasoningEffort::parse(&v).ok_or_else(|| ConfigError::Invalid {
                        name: "REASONING_EFFORT",
                        problem: format!("{v:?} is not one of minimal, low, medium, high"),
                    })
                })
                .transpose()?,
            web_search,
            limits,
        })
    }
}

/// A key or token is one word: a line break or space inside it is a
/// copy-and-paste mistake, named here rather than as a failed request.
fn token_text(name: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::Invalid {
            name,
            problem: "it contains a line break, a space or another invisible character; copy it again as one line".into(),
        });
    }
    Ok(())
}

/// An IANA time zone name such as `Europe/Paris`.
fn timezone(value: Option<String>) -> Result<jiff::tz::TimeZone, ConfigError> {
    let Some(name) = value else {
        return Ok(jiff::tz::TimeZone::UTC);
    };
    jiff::tz::TimeZone::get(name.trim()).map_err(|_| ConfigError::Invalid {
        name: "TIMEZONE",
        problem: format!("{name:?} is not a time zone name such as Europe/Paris or UTC"),
    })
}

/// A `sqlite:` URL, or a `postgres://` one with a database name.
pub fn database_url(value: Option<String>) -> Result<String, ConfigError> {
    let name = "DATABASE_URL";
    let Some(url) = value else {
        return Ok(DEFAULT_DATABASE_URL.to_owned());
    };
    if crate::store::Backend::of(&url) == crate::store::Backend::Postgres {
        let shown = crate::store::redacted(&url);
        return match reqwest::Url::parse(&url) {
            Ok(parsed)
                if parsed.host_str().is_some_and(|h| !h.is_empty()) || url.contains("host=") =>
            {
                Ok(url)
            }
            Ok(_) => Err(ConfigError::Invalid {
                name,
                problem: format!(
                    "{shown} names no server; write postgres://USER:PASSWORD@HOST:5432/DATABASE"
                ),
            }),
            Err(e) => Err(ConfigError::Invalid {
                name,
                problem: format!(
                    "{shown} is not a PostgreSQL URL ({e}); write postgres://USER:PASSWORD@HOST:5432/DATABASE"
                ),
            }),
        };
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"));
    match path {
        Some(path) if !path.is_empty() && !path.starts_with('?') => Ok(url),
        _ => Err(ConfigError::Invalid {
            name,
            problem: format!(
                "{url:?} is not a SQLite URL; write sqlite://mcpcord.db (a file here) or sqlite:///data/mcpcord.db (an absolute path)"
            ),
        }),
    }
}

/// The variable through `lookup`, trimmed; empty counts as unset.
fn non_empty(lookup: impl Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> {
    move |name| {
        lookup(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }
}

/// An http(s) URL without a trailing slash.
fn http_url(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: &str,
) -> Result<String, ConfigError> {
    let url = get(name).unwrap_or_else(|| default.to_owned());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::Invalid {
            name,
            problem: format!("{url:?} is not an http:// or https:// URL"),
        });
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A positive whole number.
fn number<T: FromStr + PartialOrd + From<u8>>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    bounded(get, name, default, 1)
}

fn bounded<T: FromStr + PartialOrd + From<u8>>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
    min: u8,
) -> Result<T, ConfigError> {
    let Some(raw) = get(name) else {
        return Ok(default);
    };
    match raw.parse::<T>() {
        Ok(value) if value >= T::from(min) => Ok(value),
        _ => Err(ConfigError::Invalid {
            name,
            problem: format!("{raw:?} is not a whole number of at least {min}"),
        }),
    }
}

fn seconds(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    number(get, name, default.as_secs()).map(Duration::from_secs)
}

fn boolean(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(name).map(|v| v.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => Ok(true),
        Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => Ok(false),
        Some(v) => Err(ConfigError::Invalid {
            name,
            problem: format!("{v:?} is not true or false"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| env.get(name).cloned())
    }

    #[test]
    fn the_key_is_required() {
        assert_eq!(
            config(&[]).unwrap_err(),
            ConfigError::Missing("OPENROUTER_API_KEY")
        );
        assert_eq!(
            config(&[("OPENROUTER_API_KEY", "  ")]).unwrap_err(),
            ConfigError::Missing("OPENROUTER_API_KEY")
        );
    }

    #[test]
    fn defaults_apply() {
        let c = config(&[("OPENROUTER_API_KEY", "sk-or-v1-x")]).unwrap();
        assert_eq!(c.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.default_model, DEFAULT_MODEL);
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert!(!c.mcp_config_explicit);
        assert!(c.stream);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn the_time_zone_is_named_and_checked() {
        let key = ("OPENROUTER_API_KEY", "sk-or-v1-x");
        assert_eq!(config(&[key]).unwrap().timezone, jiff::tz::TimeZone::UTC);
        let paris = config(&[key, ("TIMEZONE", "Europe/Paris")]).unwrap();
        assert_eq!(paris.timezone.iana_name(), Some("Europe/Paris"));
        let error = config(&[key, ("TIMEZONE", "Mars/Olympus")]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("Invalid TIMEZONE: \"Mars/Olympus\" is not a time zone"),
            "{error}"
        );
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let err = config(&[("OPENROUTER_API_KEY", "k"), ("MAX_TOOL_ROUNDS", "lots")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid MAX_TOOL_ROUNDS: \"lots\" is not a whole number of at least 1"
        );
        let err = config(&[("OPENROUTER_API_KEY", "k"), ("TOOL_TIMEOUT_SECS", "0")]).unwrap_err();
        assert!(err.to_string().starts_with("Invalid TOOL_TIMEOUT_SECS"));
        let err =
            config(&[("OPENROUTER_API_KEY", "k"), ("STREAM_RESPONSES", "maybe")]).unwrap_err();
        assert!(err.to_string().starts_with("Invalid STREAM_RESPONSES"));
    }

    #[test]
    fn secrets_do_not_print() {
        let c = config(&[("OPENROUTER_API_KEY", "sk-or-v1-secret")]).unwrap();
        assert!(!format!("{c:?}").contains("sk-or-v1-secret"));
        assert_eq!(c.api_key.expose(), "sk-or-v1-secret");
    }

    #[test]
    fn keys_and_database_urls_are_checked_with_their_names() {
        let err = config(&[("OPENROUTER_API_KEY", "sk-or-v1-abc\ndef")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Invalid OPENROUTER_API_KEY: it contains a line break")
        );
        let with = |url: &str| config(&[("OPENROUTER_API_KEY", "k"), ("DATABASE_URL", url)]);
        assert!(
            with("::::")
                .unwrap_err()
                .to_string()
                .starts_with("Invalid DATABASE_URL: \"::::\" is not a SQLite URL")
        );
        assert_eq!(
            with("postgres://u:p@h/db").unwrap().database_url,
            "postgres://u:p@h/db"
        );
        let error = with("postgres://u:secret@[::1/db").unwrap_err().to_string();
        assert!(
            error.contains("is not a PostgreSQL URL") && !error.contains("secret"),
            "{error}"
        );
        assert!(with("sqlite:").is_err());
        assert_eq!(
            with("sqlite:///data/x.db").unwrap().database_url,
            "sqlite:///data/x.db"
        );
        assert_eq!(
            with("sqlite:x.db?mode=rwc").unwrap().database_url,
            "sqlite:x.db?mode=rwc"
        );
    }

    #[test]
    fn base_url_is_checked_and_trimmed() {
        let c = config(&[
            ("OPENROUTER_API_KEY", "k"),
            ("OPENROUTER_BASE_URL", "http://127.0.0.1:9/v1/"),
        ])
        .unwrap();
        assert_eq!(c.base_url, "http://127.0.0.1:9/v1");
        assert!(
            config(&[
                ("OPENROUTER_API_KEY", "k"),
                ("OPENROUTER_BASE_URL", "localhost")
            ])
            .is_err()
        );
    }
}

/// What the Discord bot reads from its environment (`mcpcord run`).
#[derive(Debug, Clone)]
pub struct DiscordConfig {
    pub token: Secret,
    /// `DISCORD_API_BASE_URL`: the HTTP API host (`https://discord.com` by default).
    pub api_base: String,
    pub allowed_guilds: Vec<u64>,
    pub allowed_channels: Vec<u64>,
    pub allowed_roles: Vec<u64>,
    pub allowed_users: Vec<u64>,
    pub allow_dms: bool,
    pub admin_users: Vec<u64>,
    pub admin_roles: Vec<u64>,
    /// `STREAM_EDIT_INTERVAL_MS`: at most one edit of a streamed answer per interval.
    pub stream_interval: Duration,
    /// `APPROVAL_TIMEOUT_SECS`: an unanswered approval counts as Deny after this.
    pub approval_timeout: Duration,
    /// `APPROVAL_REMEMBER_SECS`: how long "Allow in this thread" lasts.
    pub approval_remember: Duration,
    /// `SHUTDOWN_GRACE_SECS`: how long running turns may finish at shutdown.
    pub shutdown_grace: Duration,
    /// `HEALTH_FILE`: where the bot records its gateway connection for `mcpcord health`.
    pub health_file: Option<PathBuf>,
    /// `IMAGE_MAX_BYTES`: the largest image attachment kept; larger ones are left out.
    pub image_max_bytes: usize,
    /// `IMAGES_PER_MESSAGE`: images of one message that are kept; the rest are left out.
    pub images_per_message: usize,
    /// `DOCUMENT_MAX_BYTES`: a larger PDF is left out, with a notice.
    pub document_max_bytes: usize,
    /// `DOCUMENTS_PER_MESSAGE`: PDFs of one message that are kept.
    pub documents_per_message: usize,
    /// `AUDIO_MAX_BYTES`: a larger voice note is left out, with a notice.
    pub audio_max_bytes: usize,
    /// `AUDIO_PER_MESSAGE`: voice notes of one message that are transcribed.
    pub audio_per_message: usize,
    /// `AUTO_THREAD_CHANNELS`: channels where every new message opens a
    /// thread and is answered there, without a mention.
    pub auto_thread_channels: Vec<u64>,
    /// `SHARDS`: the Discord shards this process runs (unset: as many as
    /// Discord recommends, all here).
    pub shards: Option<Shards>,
    /// `DISCORD_GLOBAL_LIMIT`: REST requests a second Discord allows this
    /// bot (50 unless Discord raised it).
    pub global_limit: u32,
    /// `LEASE_SECS`: how long this process's claim on a conversation lasts
    /// without being renewed; another process takes a dead one's over after it.
    pub lease: Duration,
    /// `BUDGET_USER_DAILY`: dollars each person's turns may spend in a UTC day.
    pub budget_user_daily: Option<f64>,
    /// `BUDGET_GUILD_MONTHLY`: dollars the turns of one server may spend in a UTC month.
    pub budget_guild_monthly: Option<f64>,
}

impl DiscordConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = non_empty(&lookup);
        let token = get("DISCORD_TOKEN").ok_or(ConfigError::Missing("DISCORD_TOKEN"))?;
        token_text("DISCORD_TOKEN", &token)?;
        let api_base = http_url(&get, "DISCORD_API_BASE_URL", "https://discord.com")?;
        Ok(DiscordConfig {
            token: Secret::new(token),
            api_base,
            allowed_guilds: ids(&get, "ALLOWED_GUILDS")?,
            allowed_channels: ids(&get, "ALLOWED_CHANNELS")?,
            allowed_roles: ids(&get, "ALLOWED_ROLES")?,
            allowed_users: ids(&get, "ALLOWED_USERS")?,
            allow_dms: boolean(&get, "ALLOW_DMS", false)?,
            admin_users: ids(&get, "ADMIN_USERS")?,
            admin_roles: ids(&get, "ADMIN_ROLES")?,
            stream_interval: Duration::from_millis(number(
                &get,
                "STREAM_EDIT_INTERVAL_MS",
                1000u64,
            )?),
            approval_timeout: seconds(&get, "APPROVAL_TIMEOUT_SECS", Duration::from_secs(300))?,
            approval_remember: seconds(&get, "APPROVAL_REMEMBER_SECS", DEFAULT_APPROVAL_REMEMBER)?,
            shutdown_grace: seconds(&get, "SHUTDOWN_GRACE_SECS", Duration::from_secs(30))?,
            health_file: get("HEALTH_FILE").map(PathBuf::from),
            image_max_bytes: number(&get, "IMAGE_MAX_BYTES", 5 * 1024 * 1024)?,
            images_per_message: number(&get, "IMAGES_PER_MESSAGE", 4)?,
            document_max_bytes: number(&get, "DOCUMENT_MAX_BYTES", 10 * 1024 * 1024)?,
            documents_per_message: number(&get, "DOCUMENTS_PER_MESSAGE", 2)?,
            audio_max_bytes: number(&get, "AUDIO_MAX_BYTES", 25 * 1024 * 1024)?,
            audio_per_message: number(&get, "AUDIO_PER_MESSAGE", 1)?,
            auto_thread_channels: ids(&get, "AUTO_THREAD_CHANNELS")?,
            shards: get("SHARDS").map(|s| Shards::parse(&s)).transpose()?,
            lease: seconds(&get, "LEASE_SECS", Duration::from_secs(30))?,
            global_limit: number(
                &get,
                "DISCORD_GLOBAL_LIMIT",
                crate::discord::limiter::GLOBAL_PER_SECOND,
            )?,
            budget_user_daily: dollars(&get, "BUDGET_USER_DAILY")?,
            budget_guild_monthly: dollars(&get, "BUDGET_GUILD_MONTHLY")?,
        })
    }
}

/// A range of Discord shards: `first` to `last` (inclusive) of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shards {
    pub first: u32,
    pub last: u32,
    pub total: u32,
}

impl Shards {
    /// `0-3/8` (shards 0 to 3 of 8) or `2/8` (shard 2 of 8).
    pub fn parse(text: &str) -> Result<Shards, ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            name: "SHARDS",
            problem,
        };
        let form = || {
            invalid(format!(
                "{text:?} is not a shard range such as 0-3/8 (shards 0 to 3 of 8) or 2/8"
            ))
        };
        let (range, total) = text.trim().split_once('/').ok_or_else(form)?;
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| form());
        let shards = Shards {
            first: number(first)?,
            last: number(last)?,
            total: number(total)?,
        };
        if shards.total == 0 || shards.first > shards.last || shards.last >= shards.total {
            return Err(invalid(format!(
                "{text:?}: shards are numbered from 0 to one less than their total, first to last"
            )));
        }
        Ok(shards)
    }

    /// Whether the events of `guild` come to these shards (Discord's rule:
    /// `(guild_id >> 22) % total`; direct messages come to shard 0).
    pub fn serves(&self, guild: Option<u64>) -> bool {
        let shard = guild.map_or(0, |g| (g >> 22) % u64::from(self.total));
        (u64::from(self.first)..=u64::from(self.last)).contains(&shard)
    }
}

impl std::fmt::Display for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}/{}", self.first, self.last, self.total)
    }
}

/// An amount in dollars, such as `2.50` (unset: none).
fn dollars(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<f64>, ConfigError> {
    let Some(raw) = get(name) else {
        return Ok(None);
    };
    match raw.trim_start_matches('$').parse::<f64>() {
        Ok(amount) if amount.is_finite() && amount >= 0.0 => Ok(Some(amount)),
        _ => Err(ConfigError::Invalid {
            name,
            problem: format!("{raw:?} is not an amount in dollars such as 2.50"),
        }),
    }
}

/// A comma-separated list of Discord ids (snowflakes).
fn ids(get: &impl Fn(&str) -> Option<String>, name: &'static str) -> Result<Vec<u64>, ConfigError> {
    let Some(raw) = get(name) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u64>().map_err(|_| ConfigError::Invalid {
                name,
                problem: format!(
                    "{s:?} is not a Discord id (a number; enable Developer Mode and use Copy ID)"
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod discord_tests {
    use super::*;

    #[test]
    fn discord_settings_parse_with_named_errors() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            DiscordConfig::from_lookup(env(&[])).unwrap_err(),
            ConfigError::Missing("DISCORD_TOKEN")
        );
        let c =
            DiscordConfig::from_lookup(env(&[("DISCORD_TOKEN", "t"), ("ALLOWED_GUILDS", "1, 2")]))
                .unwrap();
        assert_eq!(c.allowed_guilds, [1, 2]);
        assert!(!c.allow_dms);
        assert_eq!(c.stream_interval, Duration::from_secs(1));
        let err = DiscordConfig::from_lookup(env(&[("DISCORD_TOKEN", "t"), ("ADMIN_USERS", "me")]))
            .unwrap_err();
        assert!(err.to_string().starts_with("Invalid ADMIN_USERS"));
        let c = DiscordConfig::from_lookup(env(&[
            ("DISCORD_TOKEN", "t"),
            ("AUTO_THREAD_CHANNELS", "10,20"),
        ]))
        .unwrap();
        assert_eq!(c.auto_thread_channels, [10, 20]);
        let err = DiscordConfig::from_lookup(env(&[
            ("DISCORD_TOKEN", "t"),
            ("AUTO_THREAD_CHANNELS", "#general"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().starts_with("Invalid AUTO_THREAD_CHANNELS"),
            "{err}"
        );
    }

    #[test]
    fn shard_ranges_are_checked() {
        assert_eq!(
            Shards::parse("0-3/8").unwrap(),
            Shards {
                first: 0,
                last: 3,
                total: 8
            }
        );
        assert_eq!(
            Shards::parse("5/8").unwrap(),
            Shards {
                first: 5,
                last: 5,
                total: 8
            }
        );
        let half = Shards::parse("1/2").unwrap();
        assert!(half.serves(Some(1 << 22)) && !half.serves(Some(2 << 22)));
        assert!(!half.serves(None));
        for bad in ["3-1/8", "0-8/8", "x/2", "1", "0/0"] {
            let err = Shards::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("Invalid SHARDS: "), "{err}");
        }
    }

    #[test]
    fn budgets_are_dollars() {
        let env = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            }
        };
        let c = DiscordConfig::from_lookup(env(&[
            ("DISCORD_TOKEN", "t"),
            ("BUDGET_USER_DAILY", "$2.50"),
            ("BUDGET_GUILD_MONTHLY", "40"),
        ]))
        .unwrap();
        assert_eq!(c.budget_user_daily, Some(2.5));
        assert_eq!(c.budget_guild_monthly, Some(40.0));
        let c = DiscordConfig::from_lookup(env(&[("DISCORD_TOKEN", "t")])).unwrap();
        assert_eq!((c.budget_user_daily, c.budget_guild_monthly), (None, None));
        for bad in ["-1", "five", "NaN"] {
            let err = DiscordConfig::from_lookup(env(&[
                ("DISCORD_TOKEN", "t"),
                ("BUDGET_USER_DAILY", bad),
            ]))
            .unwrap_err();
            assert!(
                err.to_string().starts_with("Invalid BUDGET_USER_DAILY: ")
                    && err.to_string().contains("is not an amount in dollars"),
                "{err}"
            );
        }
    }
}
