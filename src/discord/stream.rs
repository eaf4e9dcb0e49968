//! An answer streamed into one or more messages, edited at most once per
//! interval while it grows.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::render::{MAX_MESSAGE_CHARS, split_message};
use super::rest::Rest;

/// Lets an action through at most once per interval.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: None,
        }
    }

    /// Whether the action may run at `now`; if so, it counts as run.
    pub fn ready(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// What one posted message shows now.
#[derive(Debug)]
struct Shown {
    id: u64,
    text: String,
    components: Value,
}

/// An answer being streamed into one or more messages.
#[derive(Debug)]
pub struct Answer {
    channel: u64,
    pub text: String,
    /// Buttons its messages carry: Stop on each while the turn runs, Retry
    /// on the last once it is answered (`on_last`); `None` for none.
    pub controls: Option<Value>,
    pub on_last: bool,
    posted: Vec<Shown>,
    throttle: Throttle,
}

impl Answer {
    pub fn new(channel: u64, interval: Duration, controls: Option<Value>) -> Self {
        Answer {
            channel,
            text: String::new(),
            controls,
            on_last: false,
            posted: Vec::new(),
            throttle: Throttle::new(interval),
        }
    }

    /// The last message it posted.
    pub fn last_message(&self) -> Option<u64> {
        self.posted.last().map(|shown| shown.id)
    }

    /// Brings the messages up to date with `text` and `controls`; unless
    /// `now`, at most once per interval.
    pub async fn flush(&mut self, rest: &Rest, now: bool) {
        if self.text.trim().is_empty() {
            return;
        }
        if !self.throttle.ready(Instant::now()) && !now {
            return;
        }
        let parts = split_message(&self.text, MAX_MESSAGE_CHARS);
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.into_iter().enumerate() {
            let with = self
                .controls
                .as_ref()
                .filter(|_| !self.on_last || i == last);
            let components = with.cloned().unwrap_or_else(|| json!([]));
            let result = match self.posted.get_mut(i) {
                Some(shown) if shown.text == part && shown.components == components => Ok(()),
                Some(shown) => {
                    let result = rest
                        .edit_message(
                            self.channel,
                            shown.id,
                            json!({"content": part, "components": components}),
                        )
                        .await;
                    shown.text = part;
                    shown.components = components;
                    result
                }
                None => rest
                    .create_message(
                        self.channel,
                        json!({"content": part, "components": components.clone()}),
                    )
                    .await
                    .map(|id| {
                        self.posted.push(Shown {
                            id,
                            text: part,
                            components,
                        })
                    }),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "could not show the answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_through_per_interval() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut throttle = Throttle::new(Duration::from_millis(500));
        assert!(throttle.ready(at(0)), "the first edit goes at once");
        assert!(!throttle.ready(at(100)));
        assert!(!throttle.ready(at(499)));
        assert!(throttle.ready(at(500)));
        assert!(!throttle.ready(at(900)));
        assert!(throttle.ready(at(1200)));
    }

    #[test]
    fn a_clock_going_backwards_does_not_unblock_the_throttle() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut throttle = Throttle::new(Duration::from_millis(500));
        assert!(throttle.ready(start));
        assert!(!throttle.ready(start - Duration::from_secs(1)));
    }
}
