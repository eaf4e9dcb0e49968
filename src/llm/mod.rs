//! The OpenRouter client: any OpenAI-compatible chat completions endpoint.
//!
//! Streams replies (SSE), retries 408/429/5xx and connection failures with
//! backoff and jitter (honouring `Retry-After`), and caches the model
//! catalogue from `GET /models`.

mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::config::{Config, ModelApi, Secret};
use crate::conversation::{
    ChatModel, ChatRequest, Completion, GenerationLookup, ModelError, ModelInfo, ModelLookup,
    TextSink,
};

pub use wire::{
    BRIDGE_BLOCKS, Dialect, MAX_BREAKPOINTS, StreamAccumulator, error_from_body, parse_completion,
    parse_generation, request_body, speaker_prefix,
};

/// First retry delay; later ones grow exponentially (with jitter).
const RETRY_MIN_DELAY: Duration = Duration::from_millis(500);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(20);
/// Total time all retries of one request may wait.
const RETRY_TOTAL_DELAY: Duration = Duration::from_secs(90);
/// A `Retry-After` longer than this is not waited for.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a failed catalogue fetch is remembered before trying again.
const CATALOGUE_RETRY: Duration = Duration::from_secs(300);
/// A cost lookup of a cut reply: small, and never worth a long wait.
const GENERATION_LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// The model catalogue, keyed by model id.
#[derive(Debug, Default)]
pub struct Catalogue {
    pub models: HashMap<String, ModelInfo>,
}

impl Catalogue {
    /// Parses a `GET /models` body.
    pub fn parse(body: &Value) -> Self {
        let models = body
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let id = m.get("id")?.as_str()?.to_owned();
                let has = |list: &str, item: &str| {
                    m.pointer(list)
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(item)))
                };
                // Servers other than OpenRouter list models without their
                // parameters or window: that is "not known", not "none".
                let listed = m.get("supported_parameters").is_some_and(Value::is_array);
                let info = ModelInfo {
                    context_length: m
                        .get("context_length")
                        .and_then(Value::as_u64)
                        .or_else(|| {
                            m.pointer("/top_provider/context_length")
                                .and_then(Value::as_u64)
                        })
                        .or_else(|| m.pointer("/meta/n_ctx_train").and_then(Value::as_u64))
                        .filter(|&n| n > 0),
                    supports_tools: listed.then(|| has("/supported_parameters", "tools")),
                    supports_images: has("/architecture/input_modalities", "image"),
                    supports_audio: has("/architecture/input_modalities", "audio"),
                    supports_reasoning: has("/supported_parameters", "reasoning"),
                    id: id.clone(),
                };
                Some((id, info))
            })
            .collect();
        Catalogue { models }
    }

    /// Looks `model` up, also without a variant suffix (`:free`, `:nitro`…).
    pub fn get(&self, model: &str) -> Option<&ModelInfo> {
        self.models.get(model).or_else(|| {
            model
                .split_once(':')
                .and_then(|(base, _)| self.models.get(base))
        })
    }
}

#[derive(Debug, Default)]
enum CatalogueState {
    #[default]
    NotFetched,
    Ready(Arc<Catalogue>),
    Failed(Instant),
}

/// The OpenRouter (OpenAI-compatible) chat model.
#[derive(Debug)]
pub struct OpenRouter {
    http: reqwest::Client,
    base_url: String,
    api_key: Secret,
    dialect: Dialect,
    timeout: Duration,
    max_retries: usize,
    /// `MODEL_MAX_RESPONSE_BYTES`.
    max_response_bytes: usize,
    catalogue: Mutex<CatalogueState>,
}

/// One failed attempt, before it is known whether to retry.
#[derive(Debug)]
struct Attempt {
    error: ModelError,
    retry_after: Option<Duration>,
    retryable: bool,
}

impl OpenRouter {
    pub fn new(config: &Config) -> Result<Self, ModelError> {
        let mut headers = HeaderMap::new();
        // Attribution is OpenRouter's; other endpoints get none of it.
        if config.model_api == ModelApi::OpenRouter {
            headers.insert("X-OpenRouter-Title", HeaderValue::from_static("mcpcord"));
            headers.insert("X-Title", HeaderValue::from_static("mcpcord"));
            headers.insert(
                "X-OpenRouter-Categories",
                HeaderValue::from_static("general-chat,personal-agent"),
            );
            if let Some(url) = &config.app_url {
                let value = HeaderValue::from_str(url).map_err(|e| ModelError::Connection {
                    message: format!("OPENROUTER_APP_URL cannot be sent as a header: {e}"),
                })?;
                headers.insert("HTTP-Referer", value);
            }
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("mcpcord/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ModelError::Connection {
                message: e.to_string(),
            })?;
        Ok(OpenRouter {
            http,
            base_url: config.base_url.clone(),
            api_key: config.api_key.clone(),
            dialect: Dialect {
                api: config.model_api,
                stream: config.stream,
                reasoning: config.reasoning_effort,
                provider: config.provider.clone(),
                web_search: config.web_search,
            },
            timeout: config.limits.model_timeout,
            max_retries: config.limits.model_max_retries,
            max_response_bytes: config.limits.model_max_response_bytes,
            catalogue: Mutex::new(CatalogueState::NotFetched),
        })
    }

    /// The catalogue, fetched once and cached; `None` when it cannot be read.
    pub async fn catalogue(&self) -> Option<Arc<Catalogue>> {
        let mut state = self.catalogue.lock().await;
        match &*state {
            CatalogueState::Ready(catalogue) => return Some(catalogue.clone()),
            CatalogueState::Failed(at) if at.elapsed() < CATALOGUE_RETRY => return None,
            _ => {}
        }
        match self.fetch_catalogue().await {
            Ok(catalogue) => {
                let catalogue = Arc::new(catalogue);
                tracing::info!(models = catalogue.models.len(), "model catalogue loaded");
                *state = CatalogueState::Ready(catalogue.clone());
                Some(catalogue)
            }
            Err(error) => {
                tracing::warn!(%error, "model catalogue unavailable; using defaults for context length and tools");
                *state = CatalogueState::Failed(Instant::now());
                None
            }
        }
    }

    /// Checks that the endpoint accepts the key: OpenRouter's `GET /key`,
    /// or `GET /models` on endpoints that have no `/key`.
    pub async fn verify_key(&self) -> Result<(), ModelError> {
        for path in ["key", "models"] {
            let response = self.get(path).await?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            if status.as_u16() == 404 && path == "key" {
                continue;
            }
            let body: Value = response.json().await.unwrap_or(Value::Null);
            return Err(error_from_body(
                Some(status.as_u16()),
                body.get("error").unwrap_or(&body),
            ));
        }
        Ok(())
    }

    /// `GET {base}/{path}` with the key.
    async fn get(&self, path: &str) -> Result<reqwest::Response, ModelError> {
        self.http
            .get(format!("{}/{path}", self.base_url))
            .bearer_auth(self.api_key.expose())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(connection_error)
    }

    async fn fetch_catalogue(&self) -> Result<Catalogue, ModelError> {
        let response = self.get("models").await?;
        let status = response.status();
        let body = read_json(response, self.max_response_bytes, "a model list").await?;
        if !status.is_success() {
            return Err(error_from_body(
                Some(status.as_u16()),
                body.get("error").unwrap_or(&body),
            ));
        }
        Ok(Catalogue::parse(&body))
    }

    /// Sends the request, retrying what is worth retrying, until a 2xx
    /// response arrives.
    async fn send(&self, body: &Value) -> Result<reqwest::Response, ModelError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_max_times(self.max_retries)
            .with_total_delay(Some(RETRY_TOTAL_DELAY))
            .with_jitter();
        let attempt = || async {
            let response = self
                .http
                .post(format!("{}/chat/completions", self.base_url))
                .bearer_auth(self.api_key.expose())
                .json(body)
                .send()
                .await
                .map_err(|e| Attempt {
                    retryable: !e.is_builder(),
                    error: connection_error(e),
                    retry_after: None,
                })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retry_after = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| serde_json::json!({"message": text}));
            let mut error =
                error_from_body(Some(status.as_u16()), body.get("error").unwrap_or(&body));
            if let ModelError::RateLimited { retry_after: slot } = &mut error {
                *slot = retry_after;
            }
            // A 402 is retried only when it is the in-flight budget and says
            // when to come back; no endpoint for the routing is not retried.
            let retryable = match (&error, status.as_u16()) {
                (ModelError::NoEndpoint { .. }, _) => false,
                (ModelError::RateLimited { .. }, 402) => retry_after.is_some(),
                (_, code) => matches!(code, 408 | 429 | 500..=599),
            };
            Err(Attempt {
                error,
                retry_after,
                retryable,
            })
        };
        attempt
            .retry(backoff)
            .when(|a: &Attempt| a.retryable)
            .adjust(|a: &Attempt, delay| match (a.retry_after, delay) {
                (_, None) => None,
                (Some(wait), Some(_)) if wait > RETRY_AFTER_MAX => None,
                (Some(wait), Some(_)) => Some(wait),
                (None, delay) => delay,
            })
            .notify(|a: &Attempt, delay| {
                tracing::warn!(error = %a.error.brief(), ?delay, "model request failed; trying again");
            })
            .await
            .map_err(|a| a.error)
    }

    async fn complete_inner(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        let info = self
            .catalogue()
            .await
            .and_then(|c| c.get(request.model).cloned());
        let body = request_body(&request, &self.dialect, info.as_ref());
        let response = self.send(&body).await?;
        // OpenRouter's id of the reply, to learn its cost should the
        // usage never arrive (the header, else the chunks' `id`).
        let openrouter = self.dialect.api == ModelApi::OpenRouter;
        let mut told = false;
        if openrouter
            && let Some(id) = response
                .headers()
                .get("x-generation-id")
                .and_then(|v| v.to_str().ok())
        {
            text.generation(id);
            told = true;
        }
        let limit = self.max_response_bytes;
        if !self.dialect.stream {
            let body = read_json(response, limit, "a reply").await?;
            let completion = parse_completion(&body)?;
            if let Some(content) = completion.message.content.as_deref() {
                text.push(content);
            }
            return Ok(completion);
        }
        let mut events = bounded_stream(response, limit).eventsource();
        let mut accumulator = StreamAccumulator::default();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| match e {
                eventsource_stream::EventStreamError::Transport(error) => error,
                other => ModelError::Connection {
                    message: format!("the answer stream broke off: {other}"),
                },
            })?;
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                accumulator.done();
                break;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| ModelError::Provider {
                status: None,
                message: format!("unreadable stream chunk ({e})"),
            })?;
            if openrouter
                && !told
                && let Some(id) = chunk.get("id").and_then(Value::as_str)
            {
                text.generation(id);
                told = true;
            }
            accumulator.apply(&chunk, text)?;
        }
        accumulator.finish()
    }
}

/// The body of `response` as JSON, refused once it passes `limit` bytes;
/// a body that is not JSON is named as `what` with its first characters.
async fn read_json(
    response: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Value, ModelError> {
    let mut body = Vec::new();
    let mut stream = bounded_stream(response, limit);
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk?);
    }
    serde_json::from_slice(&body).map_err(|e| ModelError::Unreadable {
        message: format!(
            "{what} that is not JSON ({e}), starting {:?}",
            preview(&body)
        ),
    })
}

/// The body of `response` as a stream that fails once it passes `limit`
/// bytes, so that no reply can grow memory without bound.
fn bounded_stream(
    response: reqwest::Response,
    limit: usize,
) -> impl futures::Stream<Item = Result<bytes::Bytes, ModelError>> {
    let mut seen = 0usize;
    response.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(|e| ModelError::Connection {
            message: format!(
                "the answer stream broke off: {}",
                connection_error(e).brief()
            ),
        })?;
        seen += chunk.len();
        if seen > limit {
            return Err(ModelError::TooLarge { limit_bytes: limit });
        }
        Ok(chunk)
    })
}

/// The start of a body, for an error message.
fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned()
}

fn connection_error(error: reqwest::Error) -> ModelError {
    if error.is_timeout() {
        return ModelError::Timeout;
    }
    // The source chain says what actually failed (refused, DNS, TLS...).
    // The URL is left out: a local endpoint may carry a key in it.
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    ModelError::Connection { message }
}

/// `Retry-After` in seconds (integer or decimal).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        // `1e20` would overflow a Duration; the peer's number is not trusted.
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

#[async_trait]
impl ChatModel for OpenRouter {
    async fn complete(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        let model = request.model;
        match tokio::time::timeout(self.timeout, self.complete_inner(request, text)).await {
            Ok(Err(ModelError::NoToolSupport { .. })) => Err(ModelError::NoToolSupport {
                model: model.to_owned(),
            }),
            Ok(result) => result,
            Err(_) => Err(ModelError::Timeout),
        }
    }

    async fn model_info(&self, model: &str) -> ModelLookup {
        match self.catalogue().await {
            None => ModelLookup::Unavailable,
            Some(catalogue) => catalogue
                .get(model)
                .cloned()
                .map_or(ModelLookup::Unlisted, ModelLookup::Known),
        }
    }

    async fn generation(&self, id: &str) -> GenerationLookup {
        if self.dialect.api != ModelApi::OpenRouter {
            return GenerationLookup::Unsupported;
        }
        let mut url = match reqwest::Url::parse(&format!("{}/generation", self.base_url)) {
            Ok(url) => url,
            Err(error) => return GenerationLookup::Failed(error.to_string()),
        };
        url.query_pairs_mut().append_pair("id", id);
        let response = self
            .http
            .get(url)
            .bearer_auth(self.api_key.expose())
            .timeout(self.timeout.min(GENERATION_LOOKUP_TIMEOUT))
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => return GenerationLookup::Failed(connection_error(error).brief()),
        };
        match response.status().as_u16() {
            404 => GenerationLookup::NotYet,
            200 => match read_json(response, self.max_response_bytes, "a generation record")
                .await
                .map(|body| parse_generation(&body))
            {
                Ok(Some(usage)) => GenerationLookup::Billed(usage),
                Ok(None) => GenerationLookup::Failed("a generation record without usage".into()),
                Err(error) => GenerationLookup::Failed(error.brief()),
            },
            status => GenerationLookup::Failed(format!("HTTP {status}")),
        }
    }

    fn reads_documents(&self) -> bool {
        self.dialect.api == ModelApi::OpenRouter
    }

    async fn models(&self) -> Vec<ModelInfo> {
        self.catalogue()
            .await
            .map(|c| c.models.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn catalogue_reads_context_tools_and_images() {
        let catalogue = Catalogue::parse(&json!({"data":[
            {"id":"a/tools","context_length":1000,"supported_parameters":["tools","temperature"],
             "architecture":{"input_modalities":["text","image"]}},
            {"id":"b/plain","top_provider":{"context_length":50},"supported_parameters":["temperature"]},
            {"id":"local.gguf","object":"model","owned_by":"llamacpp"}
        ]}));
        // A server that lists a model without its parameters or window.
        let local = catalogue.get("local.gguf").unwrap();
        assert_eq!((local.supports_tools, local.context_length), (None, None));
        let a = catalogue.get("a/tools:free").unwrap();
        assert!(a.supports_tools == Some(true) && a.supports_images);
        assert_eq!(a.context_length, Some(1000));
        let b = catalogue.get("b/plain").unwrap();
        assert_eq!(b.supports_tools, Some(false));
        assert_eq!(b.context_length, Some(50));
        assert!(catalogue.get("c/none").is_none());
    }

    #[test]
    fn retry_after_accepts_decimals() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1500)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
        for hostile in ["1e20", "NaN", "-5", "inf"] {
            headers.insert(RETRY_AFTER, HeaderValue::from_static(hostile));
            assert_eq!(retry_after(&headers), None, "{hostile}");
        }
    }
}
