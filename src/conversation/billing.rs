//! Replies whose usage never arrived. A stream cut before its last chunk
//! (stopped, timed out, shut down, failed midway) was still billed by the
//! endpoint; its generation id is kept, and the endpoint is asked later
//! what it cost, so that `/usage` counts it.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::task::TaskTracker;

use super::ports::{
    ChatModel, GenerationLookup, Store, StoreError, TextSink, Unbilled, UnbilledUpdate,
};
use super::types::{ToolCall, Usage};

/// OpenRouter records a generation a moment after it ends.
pub const FIRST_LOOKUP_AFTER_SECS: i64 = 3;
/// Lookups of one reply before it is given up (about 20 minutes in all).
pub const MAX_LOOKUPS: u32 = 8;
const FIRST_RETRY_SECS: i64 = 5;
const MAX_RETRY_SECS: i64 = 1800;

/// Seconds from lookup `attempts` to the next: 10, 20, 40 … up to 30
/// minutes.
pub fn retry_delay(attempts: u32) -> i64 {
    (FIRST_RETRY_SECS << attempts.min(16)).min(MAX_RETRY_SECS)
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Looks up every unbilled reply due at `now` (Unix seconds). Returns how
/// many were billed.
pub async fn bill_due(
    model: &dyn ChatModel,
    store: &dyn Store,
    now: i64,
) -> Result<usize, StoreError> {
    let mut billed = 0;
    for unbilled in store.unbilled_due(now).await? {
        let id = &unbilled.generation_id;
        let attempts = unbilled.attempts + 1;
        let update = match model.generation(id).await {
            GenerationLookup::Billed(usage) => {
                billed += 1;
                tracing::info!(
                    conversation = unbilled.conversation,
                    generation = id,
                    cost = usage.cost,
                    "cut reply billed"
                );
                crate::metrics::billed(&unbilled.model, &usage);
                UnbilledUpdate::Billed(usage)
            }
            GenerationLookup::Unsupported => UnbilledUpdate::GaveUp,
            GenerationLookup::NotYet | GenerationLookup::Failed(_) if attempts >= MAX_LOOKUPS => {
                tracing::warn!(
                    conversation = unbilled.conversation,
                    generation = id,
                    "the cost of a cut reply could not be learned; /usage leaves it out"
                );
                UnbilledUpdate::GaveUp
            }
            lookup => {
                if let GenerationLookup::Failed(why) = lookup {
                    tracing::debug!(
                        generation = id,
                        why,
                        "generation lookup failed; trying later"
                    );
                }
                UnbilledUpdate::RetryAt {
                    attempts,
                    at: now + retry_delay(attempts),
                }
            }
        };
        store.update_unbilled(id, &update).await?;
    }
    Ok(billed)
}

/// The sink of one model request: passes text on, and keeps the reply's
/// generation id when its usage does not arrive, also when the request is
/// dropped midway (the record is then written by a task of `tracker`).
pub(crate) struct InFlight<'a> {
    sink: &'a dyn TextSink,
    store: Arc<dyn Store>,
    tracker: TaskTracker,
    conversation: &'a str,
    model: &'a str,
    id: Mutex<Option<String>>,
}

impl<'a> InFlight<'a> {
    pub fn new(
        sink: &'a dyn TextSink,
        store: Arc<dyn Store>,
        tracker: TaskTracker,
        conversation: &'a str,
        model: &'a str,
    ) -> Self {
        InFlight {
            sink,
            store,
            tracker,
            conversation,
            model,
            id: Mutex::new(None),
        }
    }

    /// After the request (done, failed or stopped): one whose usage was
    /// not `reported` is kept. Returns the reply's id, when it had one.
    pub async fn finish(self, reported: bool) -> Option<String> {
        let id = self.id.lock().unwrap().take();
        if let Some(id) = id.clone().filter(|_| !reported) {
            keep(self.store.as_ref(), self.unbilled(id)).await;
        }
        id
    }

    fn unbilled(&self, generation_id: String) -> Unbilled {
        Unbilled {
            generation_id,
            conversation: self.conversation.to_owned(),
            model: self.model.to_owned(),
            attempts: 0,
        }
    }
}

/// Records the usage of a reply that is not kept as a message (an empty
/// one), so that `/usage` still counts it.
pub async fn keep_billed(
    store: &dyn Store,
    conversation: &str,
    model: &str,
    generation: Option<String>,
    usage: Usage,
) {
    let unbilled = Unbilled {
        generation_id: generation.unwrap_or_else(|| format!("unkept-{}", ToolCall::fresh_id())),
        conversation: conversation.to_owned(),
        model: model.to_owned(),
        attempts: 0,
    };
    let id = &unbilled.generation_id;
    let kept = store.keep_unbilled(&unbilled, unix_now()).await;
    if let Err(error) = match kept {
        Ok(()) => {
            store
                .update_unbilled(id, &UnbilledUpdate::Billed(usage))
                .await
        }
        Err(error) => Err(error),
    } {
        tracing::warn!(%error, conversation, "the usage of an empty reply could not be kept; /usage will leave it out");
    }
}

async fn keep(store: &dyn Store, unbilled: Unbilled) {
    let first_try = unix_now() + FIRST_LOOKUP_AFTER_SECS;
    if let Err(error) = store.keep_unbilled(&unbilled, first_try).await {
        tracing::warn!(%error, conversation = unbilled.conversation, "a cut reply's id could not be kept; /usage will leave it out");
    }
}

impl TextSink for InFlight<'_> {
    fn push(&self, fragment: &str) {
        self.sink.push(fragment);
    }

    fn generation(&self, id: &str) {
        *self.id.lock().unwrap() = Some(id.to_owned());
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Dropped before `finish`: the turn was stopped or cut midway.
        let Some(id) = self.id.get_mut().unwrap().take() else {
            return;
        };
        let unbilled = self.unbilled(id);
        let store = self.store.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker
                .spawn(async move { keep(store.as_ref(), unbilled).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_back_off_to_a_bound() {
        let delays: Vec<i64> = (1..=MAX_LOOKUPS).map(retry_delay).collect();
        assert_eq!(delays[..4], [10, 20, 40, 80]);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(retry_delay(40), MAX_RETRY_SECS);
        let total: i64 = FIRST_LOOKUP_AFTER_SECS + (1..MAX_LOOKUPS).map(retry_delay).sum::<i64>();
        assert!(total < 3600, "given up within the hour: {total} s");
    }
}
