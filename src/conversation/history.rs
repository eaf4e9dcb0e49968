//! The history invariants: repair after a crash, and fitting to a context window.

use std::collections::HashSet;

use super::types::{Message, Role};

/// What a tool message says when its call never finished (a crash or an
/// abort between the call and its result).
const INTERRUPTED: &str =
    "ERROR: this tool call was interrupted before it finished; its result is unknown.";

/// Rough token cost of one image part, for context fitting.
const IMAGE_TOKENS: usize = 800;

/// Makes a stored history valid to send: every assistant tool call is
/// answered by exactly one tool message before the next user or assistant
/// message, and no tool message answers a call that is not open.
/// Returns the repaired history and how many messages were added or dropped.
pub fn repair(messages: Vec<Message>) -> (Vec<Message>, usize) {
    let mut out = Vec::with_capacity(messages.len());
    let mut open: Vec<String> = Vec::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut changes = 0;

    for message in messages {
        if message.role() == Role::Tool {
            let id = message.tool_call_id.clone().unwrap_or_default();
            if open.contains(&id) && answered.insert(id) {
                out.push(message);
            } else {
                changes += 1;
            }
            continue;
        }
        changes += close_open_calls(&mut out, &mut open, &mut answered);
        if message.role() == Role::Assistant && !message.tool_calls.is_empty() {
            open = message.tool_calls.iter().map(|c| c.id.clone()).collect();
            answered.clear();
        }
        out.push(message);
    }
    changes += close_open_calls(&mut out, &mut open, &mut answered);
    (out, changes)
}

fn close_open_calls(
    out: &mut Vec<Message>,
    open: &mut Vec<String>,
    answered: &mut HashSet<String>,
) -> usize {
    let mut added = 0;
    for id in open.drain(..) {
        if !answered.contains(&id) {
            out.push(Message::tool_result(id, INTERRUPTED));
            added += 1;
        }
    }
    answered.clear();
    added
}

/// A cheap estimate of the tokens a message costs (about four characters a
/// token, plus a little per message). Good enough to stay inside a window.
pub fn estimate_tokens(message: &Message) -> usize {
    let chars = message.content.as_ref().map_or(0, String::len)
        + message.reasoning.as_ref().map_or(0, String::len)
        + message
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.len() + c.id.len())
            .sum::<usize>();
    chars / 4 + 4 + message.images.len() * IMAGE_TOKENS
}

/// Finds where the history must start so that it fits in `budget` tokens,
/// dropping the oldest whole exchanges (an exchange starts at a user
/// message, so a tool call is never separated from its results). The last
/// exchange is always kept. Returns the start index and how many exchanges
/// were dropped.
pub fn fit_to_context(messages: &[Message], budget: usize) -> (usize, usize) {
    let mut total: usize = messages.iter().map(estimate_tokens).sum();
    let starts: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role() == Role::User)
        .map(|(i, _)| i)
        .collect();
    let mut start = 0;
    let mut dropped = 0;
    for &next in starts.iter().skip_while(|&&s| s == 0) {
        if total <= budget {
            break;
        }
        total -= messages[start..next]
            .iter()
            .map(estimate_tokens)
            .sum::<usize>();
        start = next;
        dropped += 1;
    }
    (start, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::ToolCall;

    fn calls(ids: &[&str]) -> Message {
        Message {
            role: Some(Role::Assistant),
            tool_calls: ids
                .iter()
                .map(|id| ToolCall {
                    id: id.to_string(),
                    name: "t".into(),
                    arguments: "{}".into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn repair_answers_dangling_calls_before_the_next_message() {
        let history = vec![
            Message::user("hi"),
            calls(&["a", "b"]),
            Message::tool_result("a", "ok"),
            Message::user("again"),
        ];
        let (fixed, changes) = repair(history);
        assert_eq!(changes, 1);
        let roles: Vec<_> = fixed.iter().map(Message::role).collect();
        assert_eq!(
            roles,
            [
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Tool,
                Role::User
            ]
        );
        assert_eq!(fixed[3].tool_call_id.as_deref(), Some("b"));
        assert!(fixed[3].text().starts_with("ERROR"));
    }

    #[test]
    fn repair_drops_orphan_and_duplicate_tool_messages() {
        let history = vec![
            Message::user("hi"),
            Message::tool_result("x", "orphan"),
            calls(&["a"]),
            Message::tool_result("a", "ok"),
            Message::tool_result("a", "twice"),
        ];
        let (fixed, changes) = repair(history);
        assert_eq!(changes, 2);
        assert_eq!(fixed.len(), 3);
        assert_eq!(fixed[2].text(), "ok");
    }

    #[test]
    fn repair_closes_calls_at_the_end() {
        let (fixed, changes) = repair(vec![Message::user("hi"), calls(&["a"])]);
        assert_eq!(changes, 1);
        assert_eq!(fixed.last().unwrap().tool_call_id.as_deref(), Some("a"));
    }

    #[test]
    fn a_valid_history_is_left_alone() {
        let history = vec![
            Message::user("hi"),
            calls(&["a"]),
            Message::tool_result("a", "ok"),
            Message::assistant("done"),
        ];
        let (fixed, changes) = repair(history.clone());
        assert_eq!(changes, 0);
        assert_eq!(fixed, history);
    }

    #[test]
    fn fitting_drops_whole_exchanges_and_keeps_the_last() {
        let big = "x".repeat(4000);
        let history = vec![
            Message::user(&big),
            calls(&["a"]),
            Message::tool_result("a", &big),
            Message::assistant("done"),
            Message::user(&big),
            Message::assistant("ok"),
            Message::user("last"),
        ];
        let (start, dropped) = fit_to_context(&history, 1200);
        assert_eq!((start, dropped), (4, 1));
        let (start, dropped) = fit_to_context(&history, 10);
        assert_eq!((start, dropped), (6, 2));
        assert_eq!(fit_to_context(&history, 1_000_000), (0, 0));
    }
}
