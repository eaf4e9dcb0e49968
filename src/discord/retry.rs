//! How the REST client waits and retries: Discord's rate limits (whatever
//! numbers the peer sends), backoff on 5xx and connection failures, and
//! failure messages that leave the URL (and its tokens) out.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use super::limiter::{Limiter, RouteKey};
use super::rest::RestError;

/// Attempts of one request when Discord keeps answering 429 or 5xx.
pub const MAX_ATTEMPTS: usize = 6;
/// A rate limit longer than this is an error rather than a wait.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A request that got no answer. reqwest's message names the URL, and
/// interaction tokens sit in URL paths, so the URL is left out.
pub fn unreachable_for(what: &str, error: reqwest::Error) -> RestError {
    RestError::Connection {
        what: what.into(),
        message: error.without_url().to_string(),
    }
}

/// How long a 429 asks to wait: the body's `retry_after`, else the
/// `Retry-After` header, else a second. Whatever the peer sends (`1e20`,
/// `NaN`, a negative number), the result is a valid wait of at most an hour.
pub fn rate_limit_wait(body: Option<f64>, header: Option<&str>) -> Duration {
    let header = header.and_then(|v| v.trim().parse::<f64>().ok());
    let seconds = body
        .filter(|s| s.is_finite())
        .or(header.filter(|s| s.is_finite()))
        .unwrap_or(1.0);
    Duration::from_secs_f64(seconds.clamp(0.0, 3600.0))
}

pub fn backoff(attempt: usize) -> Duration {
    Duration::from_millis(250 * (1 << attempt.min(5)))
}

/// One request's place in the limits: the limiter all calls share, its
/// route there and in metrics, and whether it may be dropped rather than
/// wait (a typing indicator).
#[derive(Debug, Clone, Copy)]
pub struct Paced<'a> {
    pub limiter: &'a Limiter,
    pub key: &'a RouteKey,
    pub route: &'a str,
    pub droppable: bool,
}

/// Sends what `build` makes until it succeeds, at the pace `paced` keeps,
/// waiting out 429s and retrying 5xx and connection failures a bounded
/// number of times. A droppable request that would have to wait is not
/// sent (`Value::Null`).
pub async fn retrying(
    what: &str,
    paced: Paced<'_>,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<Value, RestError> {
    let route = paced.route;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= MAX_ATTEMPTS;
        if !paced.limiter.acquire(paced.key, paced.droppable).await {
            return Ok(Value::Null);
        }
        let sent = build().send().await;
        crate::metrics::discord_request(
            route,
            sent.as_ref()
                .is_ok_and(|r| r.status() == StatusCode::TOO_MANY_REQUESTS),
        );
        let response = match sent {
            Ok(response) => response,
            Err(e) if !last => {
                let error = unreachable_for(what, e);
                tracing::warn!(%error, "Discord request failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            Err(e) => return Err(unreachable_for(what, e)),
        };
        let status = response.status();
        let header_wait = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let limited = status == StatusCode::TOO_MANY_REQUESTS;
        paced.limiter.learn(
            paced.key,
            status.as_u16(),
            &headers,
            limited.then(|| rate_limit_wait(body["retry_after"].as_f64(), header_wait.as_deref())),
            body["global"] == true,
        );
        if status.is_success() {
            return Ok(body);
        }
        if limited && paced.droppable {
            return Ok(Value::Null);
        }
        if limited && !last {
            let wait = rate_limit_wait(body["retry_after"].as_f64(), header_wait.as_deref());
            if wait <= MAX_RETRY_AFTER {
                tracing::info!(what, ?wait, "Discord rate limit; waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
        }
        if status.is_server_error() && !last {
            tokio::time::sleep(backoff(attempt)).await;
            continue;
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(RestError::Unauthorized);
        }
        return Err(RestError::Refused {
            what: what.into(),
            status: status.as_u16(),
            message: body["message"].as_str().unwrap_or(text.as_str()).to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_request_does_not_name_its_url() {
        crate::app::install_crypto();
        let url = "http://127.0.0.1:1/api/v10/interactions/1/interaction-secret/callback";
        let error = reqwest::Client::new().post(url).send().await.unwrap_err();
        assert!(error.to_string().contains("interaction-secret"), "{error}");
        let error = unreachable_for("answering an interaction", error).to_string();
        assert!(!error.contains("interaction-secret"), "{error}");
        assert!(error.contains("answering an interaction"), "{error}");
    }

    #[test]
    fn rate_limit_waits_survive_hostile_numbers() {
        assert_eq!(
            rate_limit_wait(Some(0.25), Some("9")),
            Duration::from_millis(250)
        );
        assert_eq!(rate_limit_wait(None, Some("2")), Duration::from_secs(2));
        assert_eq!(rate_limit_wait(None, Some("NaN")), Duration::from_secs(1));
        assert_eq!(
            rate_limit_wait(Some(f64::NAN), None),
            Duration::from_secs(1)
        );
        assert_eq!(
            rate_limit_wait(None, Some("1e20")),
            Duration::from_secs(3600)
        );
        assert_eq!(rate_limit_wait(Some(-3.0), None), Duration::ZERO);
    }
}
