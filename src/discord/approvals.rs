//! Approval questions: Approve / Deny buttons under a tool's notice, who may
//! press them, and what a press or a timeout decides.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use serenity::all::ComponentInteraction;
use tokio::sync::{mpsc, oneshot};

use super::Surface;
use super::protocol::{button, component, response};
use super::render::notice_started;
use super::rest::RestError;
use crate::config::DEFAULT_APPROVAL_REMEMBER;
use crate::conversation::{Answer, ApprovalRequest, Approver, Decision, Question};

/// A message the turn's renderer posts for someone else, in its place
/// among the turn's other messages; the id of the posted message comes back.
#[derive(Debug)]
pub struct Post {
    pub body: Value,
    pub posted: oneshot::Sender<Result<u64, RestError>>,
}

/// A question waiting for a button press.
#[derive(Debug)]
struct Pending {
    /// Who may answer (besides admins).
    asker: u64,
    /// What "Allow in this thread" remembers: the conversation and tool.
    scope: (String, String),
    answer: oneshot::Sender<Decision>,
}

/// Why a press decides nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotYours,
    Gone,
}

/// The questions waiting for an answer, by button key, and the tools
/// allowed in a conversation for a while.
#[derive(Debug)]
pub struct Approvals {
    pending: Mutex<HashMap<String, Pending>>,
    next: AtomicU64,
    allowed: Mutex<HashMap<(String, String), Instant>>,
    remember: Duration,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals::new(DEFAULT_APPROVAL_REMEMBER)
    }
}

/// Past this many, expired allowances are forgotten.
const MAX_ALLOWED: usize = 10_000;

/// Removes its question when dropped: answered, timed out, or the turn cut.
struct Open<'a> {
    approvals: &'a Approvals,
    key: String,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.approvals.lock().remove(&self.key);
    }
}

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().expect("approvals poisoned")
    }

    pub fn new(remember: Duration) -> Self {
        Approvals {
            pending: Mutex::default(),
            next: AtomicU64::new(0),
            allowed: Mutex::default(),
            remember,
        }
    }

    /// Whether `tool` is allowed without asking in `conversation` now.
    fn allowed(&self, conversation: &str, tool: &str) -> bool {
        let allowed = self.allowed.lock().expect("allowed poisoned");
        let key = (conversation.to_owned(), tool.to_owned());
        allowed
            .get(&key)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn allow(&self, scope: (String, String)) {
        let mut allowed = self.allowed.lock().expect("allowed poisoned");
        let now = Instant::now();
        if allowed.len() >= MAX_ALLOWED {
            allowed.retain(|_, until| *until > now);
        }
        allowed.insert(scope, now + self.remember);
    }

    fn open(&self, asker: u64, scope: (String, String)) -> (Open<'_>, oneshot::Receiver<Decision>) {
        let key = super::button_key(self.next.fetch_add(1, Ordering::Relaxed)).to_string();
        let (answer, decided) = oneshot::channel();
        self.lock().insert(
            key.clone(),
            Pending {
                asker,
                scope,
                answer,
            },
        );
        (
            Open {
                approvals: self,
                key,
            },
            decided,
        )
    }

    /// Decides the question `key` if `user` may: its asker, or an admin.
    /// With `remember`, the tool is allowed in its conversation for a while.
    pub fn decide(
        &self,
        key: &str,
        user: u64,
        admin: bool,
        decision: Decision,
        remember: bool,
    ) -> Result<(), Refused> {
        let mut pending = self.lock();
        match pending.get(key) {
            Some(p) if p.asker == user || admin => {}
            Some(_) => return Err(Refused::NotYours),
            None => return Err(Refused::Gone),
        }
        let question = pending.remove(key).ok_or(Refused::Gone)?;
        question.answer.send(decision).map_err(|_| Refused::Gone)?;
        if remember {
            self.allow(question.scope);
        }
        Ok(())
    }

    /// Questions waiting now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }
}

/// Asks in the thread with Approve / Deny buttons, through the turn's
/// renderer so that the question comes after the tool's notice. It waits
/// as long as it takes; the turn wraps it in a [`TimedApprover`]
/// (`APPROVAL_TIMEOUT_SECS`), and an expired question is marked as such.
///
/// [`TimedApprover`]: crate::conversation::TimedApprover
pub struct Buttons {
    pub surface: Arc<Surface>,
    pub channel: u64,
    pub asker: u64,
    pub posts: mpsc::UnboundedSender<Post>,
    /// Per call: the question's message and its text, for marking it expired.
    pub asked: Mutex<HashMap<String, (u64, String)>>,
}

impl Buttons {
    async fn post(&self, body: Value) -> Result<u64, String> {
        let (posted, reply) = oneshot::channel();
        self.posts
            .send(Post { body, posted })
            .map_err(|_| "the turn is over".to_owned())?;
        match reply.await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("the turn is over".to_owned()),
        }
    }
}

#[async_trait]
impl Approver for Buttons {
    async fn decide(&self, request: &ApprovalRequest) -> Decision {
        let approvals = &self.surface.approvals;
        if approvals.allowed(&request.conversation, &request.tool) {
            return Decision::Approve;
        }
        // Dropped with this future (answered, or timed out): the buttons
        // then decide nothing.
        let scope = (request.conversation.clone(), request.tool.clone());
        let (open, decided) = approvals.open(self.asker, scope);
        let content = format!(
            "🔐 May I run {}?",
            notice_started(&request.tool, &request.arguments).trim_start_matches("🔧 ")
        );
        let key = &open.key;
        let body = json!({"content": content, "components": [{"type": component::ACTION_ROW, "components": [
            {"type": component::BUTTON, "style": button::SUCCESS, "label": "Approve", "custom_id": format!("approve:{key}")},
            {"type": component::BUTTON, "style": button::PRIMARY, "label": "Allow in this thread", "custom_id": format!("allow:{key}")},
            {"type": component::BUTTON, "style": button::DANGER, "label": "Deny", "custom_id": format!("deny:{key}")}
        ]}]});
        let message = match self.post(body).await {
            Ok(id) => id,
            Err(error) => {
                return Decision::Decline(format!(
                    "the approval question could not be posted ({error})"
                ));
            }
        };
        self.lock_asked()
            .insert(request.call_id.clone(), (message, content));
        let decision = decided
            .await
            .unwrap_or_else(|_| Decision::Decline("the question was withdrawn".to_owned()));
        self.lock_asked().remove(&request.call_id);
        decision
    }

    async fn expired(&self, request: &ApprovalRequest, after: Duration) {
        self.mark_expired(&request.call_id, after, "denied").await;
    }

    async fn ask(&self, question: &Question) -> Answer {
        let (open, body, answered) = self.surface.questions.open(self.asker, question.clone());
        let message = match self.post(body).await {
            Ok(id) => id,
            Err(error) => {
                tracing::warn!(%error, server = %question.server, "could not post a server's question; declined");
                return Answer::Decline;
            }
        };
        let asked = asked_key(question);
        let heading = super::questions::heading(question);
        self.lock_asked().insert(asked.clone(), (message, heading));
        // Dropped unanswered (the turn was cut): cancelled.
        let answer = answered.await.unwrap_or(Answer::Cancel);
        self.lock_asked().remove(&asked);
        drop(open);
        answer
    }

    async fn ask_expired(&self, question: &Question, after: Duration) {
        self.mark_expired(&asked_key(question), after, "cancelled")
            .await;
    }

    fn not_asked(&self) -> Option<&str> {
        None
    }
}

/// Where an open question of a server is noted in [`Buttons::asked`].
fn asked_key(question: &Question) -> String {
    format!(
        "question:{}:{}:{}",
        question.server, question.tool, question.message
    )
}

impl Buttons {
    /// Marks the question noted under `asked` as unanswered for `after`,
    /// and what that counts as.
    async fn mark_expired(&self, asked: &str, after: Duration, counts_as: &str) {
        let Some((message, content)) = self.lock_asked().remove(asked) else {
            return;
        };
        let note = format!(
            "{content}\n⌛ No answer within {} seconds: {counts_as}.",
            after.as_secs()
        );
        let edit = json!({"content": note, "components": []});
        if let Err(error) = self
            .surface
            .rest
            .edit_message(self.channel, message, edit)
            .await
        {
            tracing::warn!(%error, "could not mark an approval question as expired");
        }
    }
}

impl Buttons {
    /// Marks the questions still open when the turn ended (it was stopped
    /// while they waited) as withdrawn, without their buttons.
    pub async fn withdraw_open(&self) {
        let open: Vec<(u64, String)> = self.lock_asked().drain().map(|(_, q)| q).collect();
        for (message, content) in open {
            let edit = json!({"content": format!("{content}\n⏹️ Withdrawn: the turn was stopped."), "components": []});
            if let Err(error) = self
                .surface
                .rest
                .edit_message(self.channel, message, edit)
                .await
            {
                tracing::warn!(%error, "could not withdraw an approval question");
            }
        }
    }

    fn lock_asked(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, String)>> {
        self.asked.lock().expect("asked poisoned")
    }
}

/// Handles a press of Approve or Deny.
pub async fn press(surface: &Surface, press: &ComponentInteraction) -> Result<(), RestError> {
    let Some((verdict, key)) = press.data.custom_id.split_once(':') else {
        return Ok(());
    };
    let user = press.user.id.get();
    let admin = super::presser_is_admin(surface, press);
    let approved = verdict == "approve" || verdict == "allow";
    let remember = verdict == "allow";
    let decision = if approved {
        Decision::Approve
    } else {
        Decision::Decline(format!("<@{user}> denied it"))
    };
    let body = match surface
        .approvals
        .decide(key, user, admin, decision, remember)
    {
        Ok(()) => {
            let outcome = if remember {
                let minutes = surface.approvals.remember.as_secs().div_ceil(60);
                format!("✅ Allowed in this thread for {minutes} minutes by <@{user}>")
            } else if approved {
                format!("✅ Approved by <@{user}>")
            } else {
                format!("🚫 Denied by <@{user}>")
            };
            let content = format!("{}\n{outcome}", press.message.content);
            json!({"type": response::UPDATE_MESSAGE, "data": {"content": content, "components": [], "allowed_mentions": {"parse": []}}})
        }
        Err(refused) => {
            let content = match refused {
                Refused::NotYours => {
                    "Only the person who started this turn, or an admin, can decide."
                }
                Refused::Gone => "This question was already answered or has expired.",
            };
            super::ephemeral(content)
        }
    };
    surface
        .rest
        .respond(press.id.get(), &press.token, body)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_asker_or_an_admin_decides_and_only_once() {
        let approvals = Approvals::default();
        let (open, mut decided) = approvals.open(7, ("c".into(), "t".into()));
        let key = open.key.clone();
        assert_eq!(
            approvals.decide(&key, 8, false, Decision::Approve, false),
            Err(Refused::NotYours)
        );
        assert!(decided.try_recv().is_err(), "nothing decided yet");
        assert_eq!(
            approvals.decide(&key, 8, true, Decision::Approve, false),
            Ok(())
        );
        assert_eq!(decided.try_recv(), Ok(Decision::Approve));
        assert_eq!(
            approvals.decide(&key, 7, false, Decision::Approve, false),
            Err(Refused::Gone)
        );
        drop(open);
        assert_eq!(approvals.waiting(), 0);
    }

    #[test]
    fn allow_in_this_thread_lasts_for_its_tool_and_conversation_only() {
        let approvals = Approvals::new(Duration::from_secs(3600));
        let (open, _decided) = approvals.open(7, ("c".into(), "fs__write".into()));
        let key = open.key.clone();
        assert!(!approvals.allowed("c", "fs__write"));
        assert_eq!(
            approvals.decide(&key, 7, false, Decision::Approve, true),
            Ok(())
        );
        assert!(approvals.allowed("c", "fs__write"));
        assert!(!approvals.allowed("c", "fs__delete"), "another tool");
        assert!(!approvals.allowed("d", "fs__write"), "another thread");
        let brief = Approvals::new(Duration::ZERO);
        let (open, _decided) = brief.open(7, ("c".into(), "t".into()));
        let key = open.key.clone();
        assert_eq!(
            brief.decide(&key, 7, false, Decision::Approve, true),
            Ok(())
        );
        assert!(!brief.allowed("c", "t"), "expired at once");
    }

    #[test]
    fn a_question_is_forgotten_when_its_turn_is_dropped() {
        let approvals = Approvals::default();
        let (open, _decided) = approvals.open(7, ("c".into(), "t".into()));
        let key = open.key.clone();
        assert_eq!(approvals.waiting(), 1);
        drop(open);
        assert_eq!(approvals.waiting(), 0);
        assert_eq!(
            approvals.decide(&key, 7, false, Decision::Approve, false),
            Err(Refused::Gone)
        );
    }
}
