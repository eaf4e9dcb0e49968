//! One pace for every REST call of the bot, from Discord's own numbers:
//! each route's bucket (`X-RateLimit-Bucket`, `-Remaining`,
//! `-Reset-After`, per channel, server or webhook) and the global limit of
//! 50 requests a second. A request waits for its bucket and the global
//! window instead of going out into a 429; one that may be dropped (a
//! typing indicator) is dropped instead when it would have to wait, or when
//! the global window is nearly used up. A 429 still stops its bucket (or,
//! when global, every request) for the time it names.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::HeaderMap;
use tokio::time::Instant;

/// The words of the API's paths; every other segment is an id or a token.
pub const API_WORDS: &[&str] = &[
    "applications",
    "channels",
    "commands",
    "guilds",
    "interactions",
    "callback",
    "messages",
    "threads",
    "typing",
    "webhooks",
    "@original",
    "@me",
    "users",
    "members",
    "reactions",
];

/// Discord's global limit: requests a second, interactions aside (large
/// bots can have Discord raise theirs: `DISCORD_GLOBAL_LIMIT`).
pub const GLOBAL_PER_SECOND: u32 = 50;
/// The span the global limit counts over: a second, and a little more for
/// requests that reach Discord later than they were sent.
const GLOBAL_WINDOW: Duration = Duration::from_millis(1_050);
/// Buckets and routes remembered; past this they start over (they are
/// learnt again from the next answers).
const MAX_REMEMBERED: usize = 20_000;

/// Where one request goes, for its limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteKey {
    /// The method and path with every id but the major one (a channel,
    /// server or webhook) replaced; requests with the same key share a
    /// bucket.
    route: String,
    /// The major id, which Discord keeps buckets per.
    major: String,
    /// Interaction answers are not counted in the global limit.
    global: bool,
}

impl RouteKey {
    pub fn new(method: &str, path: &str) -> RouteKey {
        let path = path.split('?').next().unwrap_or_default();
        let segments: Vec<&str> = path.split('/').collect();
        let mut major = String::new();
        let mut route = Vec::with_capacity(segments.len());
        for (i, segment) in segments.iter().enumerate() {
            let previous = i.checked_sub(1).map(|p| segments[p]);
            if segment.is_empty() || API_WORDS.contains(segment) {
                route.push(*segment);
            } else if major.is_empty()
                && matches!(previous, Some("channels" | "guilds" | "webhooks"))
            {
                major = (*segment).to_owned();
                // A webhook's bucket is its id and token together (each
                // interaction's follow-ups have their own).
                if previous == Some("webhooks")
                    && let Some(token) = segments.get(i + 1)
                {
                    major = format!("{major}/{token}");
                }
                route.push("{major}");
            } else {
                route.push("{id}");
            }
        }
        RouteKey {
            route: format!("{method} {}", route.join("/")),
            major,
            global: !path.starts_with("/interactions/") && !path.starts_with("/webhooks/"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    remaining: u32,
    reset_at: Instant,
    /// Requests a window allows, and how long one lasts: a bucket past its
    /// reset starts a new window of its own, until an answer says more.
    limit: u32,
    window: Duration,
}

#[derive(Debug)]
struct State {
    /// When the last global requests went, oldest first (at most the
    /// limit): a request may go once the oldest is a window old, whatever
    /// second Discord counts in.
    sent: std::collections::VecDeque<Instant>,
    /// No request goes out before this (a global 429).
    paused_until: Option<Instant>,
    /// Route → the bucket Discord named for it.
    buckets_of: HashMap<String, String>,
    /// (bucket, major) → what is left of it.
    buckets: HashMap<(String, String), Bucket>,
}

/// The limits every REST call of one bot goes through.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    /// Global requests allowed a second.
    global: usize,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(GLOBAL_PER_SECOND)
    }
}

impl Limiter {
    /// A limiter for a bot allowed `per_second` global requests.
    pub fn new(per_second: u32) -> Self {
        Limiter {
            global: per_second.max(1) as usize,
            state: Mutex::new(State {
                sent: std::collections::VecDeque::new(),
                paused_until: None,
                buckets_of: HashMap::new(),
                buckets: HashMap::new(),
            }),
        }
    }
}

impl State {
    /// The bucket `key` is known to be in.
    fn bucket(&self, key: &RouteKey) -> (String, String) {
        let bucket = self
            .buckets_of
            .get(&key.route)
            .cloned()
            .unwrap_or_else(|| key.route.clone());
        (bucket, key.major.clone())
    }

    /// How long `key` must wait at `now` (zero: it may go), with `global`
    /// requests allowed a second.
    fn wait(&mut self, key: &RouteKey, now: Instant, global: usize) -> Duration {
        let mut wait = Duration::ZERO;
        // A global 429 holds what the global limit counts.
        if let Some(until) = self.paused_until.filter(|_| key.global) {
            if until > now {
                wait = until - now;
            } else {
                self.paused_until = None;
            }
        }
        while self
            .sent
            .front()
            .is_some_and(|at| now.duration_since(*at) >= GLOBAL_WINDOW)
        {
            self.sent.pop_front();
        }
        if key.global
            && self.sent.len() >= global
            && let Some(oldest) = self.sent.front()
        {
            wait = wait.max(*oldest + GLOBAL_WINDOW - now);
        }
        let id = self.bucket(key);
        if let Some(bucket) = self.buckets.get_mut(&id)
            && bucket.reset_at <= now
        {
            bucket.remaining = bucket.limit;
            bucket.reset_at = now + bucket.window;
        }
        if let Some(bucket) = self.buckets.get(&id)
            && bucket.remaining == 0
            && bucket.reset_at > now
        {
            wait = wait.max(bucket.reset_at - now);
        }
        wait
    }

    /// Counts a request of `key` as sent at `now`.
    fn take(&mut self, key: &RouteKey, now: Instant) {
        if key.global {
            self.sent.push_back(now);
        }
        let id = self.bucket(key);
        if let Some(bucket) = self.buckets.get_mut(&id) {
            bucket.remaining = bucket.remaining.saturating_sub(1);
        }
    }
}

impl Limiter {
    /// Waits until a request of `key` may go, and counts it. When
    /// `droppable`, returns `false` at once instead of waiting (or when the
    /// global window is nearly used up): the request is not sent.
    pub async fn acquire(&self, key: &RouteKey, droppable: bool) -> bool {
        loop {
            let wait = {
                let mut state = self.state.lock().expect("limiter poisoned");
                let now = Instant::now();
                let wait = state.wait(key, now, self.global);
                // Past four fifths of the global window, droppable ones go.
                if droppable && (wait > Duration::ZERO || state.sent.len() * 5 >= self.global * 4) {
                    return false;
                }
                if wait.is_zero() {
                    state.take(key, now);
                    return true;
                }
                wait
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Learns from an answer to a request of `key`: its bucket and what is
    /// left of it, and on a 429 how long it (or everything) must wait.
    pub fn learn(
        &self,
        key: &RouteKey,
        status: u16,
        headers: &HeaderMap,
        retry_after: Option<Duration>,
        global: bool,
    ) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let number = |name: &str| header(name).and_then(|v| v.trim().parse::<f64>().ok());
        let now = Instant::now();
        let mut state = self.state.lock().expect("limiter poisoned");
        if state.buckets.len() > MAX_REMEMBERED || state.buckets_of.len() > MAX_REMEMBERED {
            state.buckets.clear();
            state.buckets_of.clear();
        }
        if let Some(bucket) = header("x-ratelimit-bucket") {
            state
                .buckets_of
                .insert(key.route.clone(), bucket.to_owned());
        }
        let id = state.bucket(key);
        if status == 429 {
            let wait = retry_after
                .or_else(|| number("retry-after").map(seconds))
                .unwrap_or(Duration::from_secs(1));
            if global
                || header("x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            {
                state.paused_until = Some(now + wait);
            } else {
                let known = state.buckets.get(&id).copied();
                state.buckets.insert(
                    id,
                    Bucket {
                        remaining: 0,
                        reset_at: now + wait,
                        limit: known.map_or(1, |b| b.limit),
                        window: known.map_or(wait, |b| b.window),
                    },
                );
            }
            return;
        }
        let (Some(remaining), Some(reset_after)) = (
            number("x-ratelimit-remaining"),
            number("x-ratelimit-reset-after"),
        ) else {
            return;
        };
        let remaining = remaining.clamp(0.0, f64::from(u32::MAX)) as u32;
        let fresh = Bucket {
            remaining,
            reset_at: now + seconds(reset_after),
            limit: number("x-ratelimit-limit")
                .map_or(remaining + 1, |l| l.clamp(1.0, f64::from(u32::MAX)) as u32),
            window: seconds(reset_after),
        };
        let bucket = match state.buckets.get(&id) {
            // Answers of the same window may come back out of order: the
            // lower count (ours counts what is still in flight) holds.
            Some(known) if known.reset_at + Duration::from_millis(250) >= fresh.reset_at => {
                Bucket {
                    remaining: known.remaining.min(fresh.remaining),
                    reset_at: known.reset_at.max(fresh.reset_at),
                    limit: fresh.limit,
                    window: known.window.max(fresh.window),
                }
            }
            _ => fresh,
        };
        state.buckets.insert(id, bucket);
    }
}

/// Seconds as sent by a peer, made a valid wait of at most an hour.
fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(if value.is_finite() {
        value.clamp(0.0, 3600.0)
    } else {
        1.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn routes_keep_their_major_id_only() {
        let key = RouteKey::new("PATCH", "/channels/123/messages/456");
        assert_eq!(key.route, "PATCH /channels/{major}/messages/{id}");
        assert_eq!(key.major, "123");
        assert!(key.global);
        let key = RouteKey::new("POST", "/interactions/9/aW50ZXJhY3Rpb24/callback");
        assert_eq!(key.route, "POST /interactions/{id}/{id}/callback");
        assert!(!key.global);
        let key = RouteKey::new("PATCH", "/webhooks/7/tok3n/messages/@original");
        assert_eq!(key.route, "PATCH /webhooks/{major}/{id}/messages/@original");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_bucket_waits_for_its_reset_and_drops_what_may_be_dropped() {
        let limiter = Limiter::default();
        let key = RouteKey::new("POST", "/channels/1/messages");
        let other = RouteKey::new("POST", "/channels/2/messages");
        assert!(limiter.acquire(&key, false).await);
        limiter.learn(
            &key,
            200,
            &headers(&[
                ("x-ratelimit-bucket", "abc"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset-after", "2.5"),
            ]),
            None,
            false,
        );
        // Another channel has its own bucket.
        assert!(limiter.acquire(&other, true).await);
        assert!(!limiter.acquire(&key, true).await);
        let started = Instant::now();
        assert!(limiter.acquire(&key, false).await);
        assert_eq!(started.elapsed(), Duration::from_millis(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_bucket_lets_its_limit_through_and_no_more() {
        let limiter = Limiter::default();
        let key = RouteKey::new("POST", "/channels/1/messages");
        assert!(limiter.acquire(&key, false).await);
        let spent = headers(&[
            ("x-ratelimit-bucket", "abc"),
            ("x-ratelimit-limit", "2"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset-after", "5"),
        ]);
        limiter.learn(&key, 200, &spent, None, false);
        let started = Instant::now();
        // The window resets: two go (no answer came back to say more)...
        assert!(limiter.acquire(&key, false).await);
        assert!(limiter.acquire(&key, false).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // ...and the third waits for the next window.
        assert!(limiter.acquire(&key, false).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_limit_paces_requests_and_a_global_429_stops_all() {
        let limiter = Limiter::default();
        let started = Instant::now();
        for channel in 0..(GLOBAL_PER_SECOND + 1) {
            let key = RouteKey::new("POST", &format!("/channels/{channel}/messages"));
            assert!(limiter.acquire(&key, false).await);
        }
        assert_eq!(started.elapsed(), GLOBAL_WINDOW);
        // Interaction answers are not held by it.
        let answer = RouteKey::new("POST", "/interactions/1/t/callback");
        let key = RouteKey::new("POST", "/channels/1/messages");
        limiter.learn(
            &key,
            429,
            &headers(&[("x-ratelimit-global", "true")]),
            Some(Duration::from_secs(3)),
            false,
        );
        let paused = Instant::now();
        // A typing indicator is dropped rather than wait.
        let typing = RouteKey::new("POST", "/channels/9/typing");
        assert!(!limiter.acquire(&typing, true).await);
        assert!(limiter.acquire(&key, false).await);
        assert_eq!(paused.elapsed(), Duration::from_secs(3));
        assert!(limiter.acquire(&answer, false).await);
    }
}
