//! What the bot does, as Prometheus metrics, and whether it is healthy:
//! `METRICS_ADDR` serves `/metrics` (Prometheus text format, rendered by
//! `metrics-exporter-prometheus`) and `/healthz`. The other modules record
//! through the functions here, so that every name and label is in one
//! place. Without `METRICS_ADDR` no recorder is installed and recording
//! costs nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) of the latency histograms: from a quick tool
/// call to a long turn.
const SECONDS_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// How often histograms are folded and idle data let go of.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Whether the process waits for a Discord gateway connection to be
/// healthy (the bot), and whether it has one.
static NEEDS_GATEWAY: AtomicBool = AtomicBool::new(false);
static GATEWAY_UP: AtomicBool = AtomicBool::new(false);

/// The metrics server: installs the recorder and serves `addr` until the
/// runtime ends. Fails when the address cannot be bound.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install_recorder()?;
    describe();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on METRICS_ADDR {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_EVERY);
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .with_state(handle);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    Ok(bound)
}

async fn render(
    axum::extract::State(handle): axum::extract::State<PrometheusHandle>,
) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    if NEEDS_GATEWAY.load(Ordering::Relaxed) && !GATEWAY_UP.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the Discord gateway\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

fn describe() {
    describe_counter!(
        "mcpcord_turns_total",
        "Turns that ended, by outcome (answered, round_limit, stopped, failed)."
    );
    describe_histogram!(
        "mcpcord_turn_duration_seconds",
        Unit::Seconds,
        "How long a turn took, from its input to its answer."
    );
    describe_histogram!(
        "mcpcord_model_request_duration_seconds",
        Unit::Seconds,
        "How long one model request took, streaming included, by model."
    );
    describe_histogram!(
        "mcpcord_model_first_token_seconds",
        Unit::Seconds,
        "Time from a model request to its first streamed text, by model."
    );
    describe_counter!(
        "mcpcord_tokens_total",
        "Tokens billed, by model and kind (prompt, cached, completion)."
    );
    describe_counter!(
        "mcpcord_cost_dollars_total",
        "Dollars billed (OpenRouter's usage.cost), by model."
    );
    describe_counter!(
        "mcpcord_tool_calls_total",
        "Tool calls, by server, tool and outcome (ok, error)."
    );
    describe_histogram!(
        "mcpcord_tool_call_duration_seconds",
        Unit::Seconds,
        "How long a tool call took, by server."
    );
    describe_counter!(
        "mcpcord_approvals_total",
        "Approval decisions, by decision (approved, declined)."
    );
    describe_gauge!(
        "mcpcord_live_conversations",
        "Conversations with a worker (a turn running or messages queued)."
    );
    describe_gauge!(
        "mcpcord_queued_messages",
        "Messages accepted and waiting for their turn."
    );
    describe_gauge!("mcpcord_mcp_sessions", "Live MCP sessions, by server.");
    describe_counter!(
        "mcpcord_discord_requests_total",
        "Discord REST requests sent, by route."
    );
    describe_counter!(
        "mcpcord_discord_rate_limited_total",
        "Discord REST answers that were 429s, by route."
    );
    describe_counter!(
        "mcpcord_gateway_reconnects_total",
        "Discord gateway connections made again after the first."
    );
}

/// This process is healthy only while connected to the Discord gateway.
pub fn needs_gateway() {
    NEEDS_GATEWAY.store(true, Ordering::Relaxed);
}

/// Whether a gateway connection is up.
pub fn gateway(connected: bool) {
    GATEWAY_UP.store(connected, Ordering::Relaxed);
}

pub fn gateway_reconnected() {
    counter!("mcpcord_gateway_reconnects_total").increment(1);
}

/// A turn ended (`answered`, `round_limit`, `stopped` or `failed`).
pub fn turn(outcome: &'static str, took: Duration) {
    counter!("mcpcord_turns_total", "outcome" => outcome).increment(1);
    histogram!("mcpcord_turn_duration_seconds").record(took.as_secs_f64());
}

/// One model request ended; `first_token` is when its first text came.
pub fn model_request(model: &str, took: Duration, first_token: Option<Duration>) {
    let model = model.to_owned();
    histogram!("mcpcord_model_request_duration_seconds", "model" => model.clone())
        .record(took.as_secs_f64());
    if let Some(first) = first_token {
        histogram!("mcpcord_model_first_token_seconds", "model" => model)
            .record(first.as_secs_f64());
    }
}

/// What one reply of `model` was billed.
pub fn billed(model: &str, usage: &crate::conversation::Usage) {
    let model = model.to_owned();
    let uncached = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
    for (kind, tokens) in [
        ("prompt", uncached),
        ("cached", usage.cached_tokens),
        ("completion", usage.completion_tokens),
    ] {
        counter!("mcpcord_tokens_total", "model" => model.clone(), "kind" => kind)
            .increment(tokens);
    }
    if usage.cost.is_finite() && usage.cost > 0.0 {
        gauge!("mcpcord_cost_dollars", "model" => model).increment(usage.cost);
    }
}

/// A tool call of `server` ended.
pub fn tool_call(server: &str, tool: &str, failed: bool, took: Duration) {
    let outcome = if failed { "error" } else { "ok" };
    counter!("mcpcord_tool_calls_total", "server" => server.to_owned(), "tool" => tool.to_owned(), "outcome" => outcome)
        .increment(1);
    histogram!("mcpcord_tool_call_duration_seconds", "server" => server.to_owned())
        .record(took.as_secs_f64());
}

/// A person (or the timeout) decided about a tool call.
pub fn approval(approved: bool) {
    let decision = if approved { "approved" } else { "declined" };
    counter!("mcpcord_approvals_total", "decision" => decision).increment(1);
}

/// A conversation's worker started (`1.0`) or ended (`-1.0`).
pub fn live_conversation(change: f64) {
    gauge!("mcpcord_live_conversations").increment(change);
}

/// Messages waiting for their turn: `change` more (or fewer).
pub fn queued(change: f64) {
    gauge!("mcpcord_queued_messages").increment(change);
}

/// A session of `server` started (`1.0`) or ended (`-1.0`).
pub fn mcp_session(server: &str, change: f64) {
    gauge!("mcpcord_mcp_sessions", "server" => server.to_owned()).increment(change);
}

/// A Discord REST request went out on `route` (a path with its ids and
/// tokens replaced, see [`route`]); `limited` when it was answered 429.
pub fn discord_request(route: &str, limited: bool) {
    counter!("mcpcord_discord_requests_total", "route" => route.to_owned()).increment(1);
    if limited {
        counter!("mcpcord_discord_rate_limited_total", "route" => route.to_owned()).increment(1);
    }
}

/// The route of a Discord API `path` for labels: the method and the path
/// with every segment that is not one of the API's own words replaced by
/// `{id}`, so that neither ids (unbounded) nor interaction and webhook
/// tokens (secrets) become labels.
pub fn route(method: &str, path: &str) -> String {
    use crate::discord::limiter::API_WORDS as WORDS;
    let path = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path
        .split('/')
        .map(|s| {
            if s.is_empty() || WORDS.contains(&s) {
                s
            } else {
                "{id}"
            }
        })
        .collect();
    format!("{method} {}", segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_keep_no_id_or_token() {
        assert_eq!(
            route("POST", "/channels/123456789/messages"),
            "POST /channels/{id}/messages"
        );
        assert_eq!(
            route("POST", "/interactions/99/aW50ZXJhY3Rpb246c2VjcmV0/callback"),
            "POST /interactions/{id}/{id}/callback"
        );
        assert_eq!(
            route(
                "PATCH",
                "/webhooks/7/secret-token/messages/@original?wait=true"
            ),
            "PATCH /webhooks/{id}/{id}/messages/@original"
        );
    }
}
