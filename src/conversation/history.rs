//! The history invariants: repair after a crash, and fitting to a context window.

use std::collections::HashSet;

use super::types::{Message, Role};

/// What a tool message says when its call never finished (a crash or an
/// abort between the call and its result).
const INTERRUPTED: &str =
    "ERROR: this tool call was interrupted before it finished; its result is unknown.";

/// Rough token cost of one image part, for context fitting.
const IMAGE_TOKENS: usize = 800;

/// Bytes of a PDF per token of the text it holds, roughly (text PDFs run
/// from about 10 to 30; a scan holds less text for its size).
const DOCUMENT_BYTES_PER_TOKEN: usize = 16;

/// Makes a stored history valid to send: every assistant tool call is
/// answered by exactly one tool message before the next user or assistant
/// message, and no tool message answers a call that is not open.
/// Returns the repaired history and how many messages were added or dropped.
pub fn repair(messages: Vec<Message>) -> (Vec<Message>, usize) {
    let mut out = Vec::with_capacity(messages.len());
    let mut open: Vec<String> = Vec::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut changes = 0;

    for mut message in messages {
        // Arguments cut off mid-way (stored by an older version) make some
        // endpoints refuse every later request of the conversation.
        for call in &mut message.tool_calls {
            if !valid_arguments(&call.arguments) {
                call.arguments = "{}".into();
                changes += 1;
            }
        }
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
/// token, plus a little per message; a document by its size, as its text
/// is not known here). Good enough to stay inside a window.
pub fn estimate_tokens(message: &Message) -> usize {
    let chars = message.content.as_ref().map_or(0, String::len)
        + message.reasoning.as_ref().map_or(0, String::len)
        + message
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.len() + c.id.len())
            .sum::<usize>()
        + message
            .file_annotations
            .as_ref()
            .map_or(0, |a| a.to_string().len());
    // A data: URL's base64 is four characters for three bytes.
    let document_bytes: usize = message.files.iter().map(|f| f.data.len() / 4 * 3).sum();
    chars / 4
        + 4
        + message.images.len() * IMAGE_TOKENS
        + document_bytes.div_ceil(DOCUMENT_BYTES_PER_TOKEN)
}

/// Whether a tool call's argument text is a JSON object, as every
/// endpoint expects it in a history.
pub fn valid_arguments(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object())
}

/// Where the history sent to the model starts, given where it started last
/// time (`start`) and the tokens it may take (`budget`). While it fits the
/// start stays put (so the provider's prompt cache keeps matching); once it
/// does not, the oldest whole exchanges are dropped until it takes at most
/// two thirds of the budget, so the start moves seldom. An exchange starts
/// at a user message, so a tool call is never separated from its results,
/// and the last exchange is always kept.
pub fn fit_to_context(messages: &[Message], start: usize, budget: usize) -> usize {
    let total: usize = messages.iter().map(estimate_tokens).sum();
    if total <= budget {
        return 0;
    }
    let start = start.min(messages.len());
    let mut kept: usize = messages[start..].iter().map(estimate_tokens).sum();
    if kept <= budget {
        return start;
    }
    let target = budget / 3 * 2;
    let starts: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|&(i, m)| i > start && m.role() == Role::User)
        .map(|(i, _)| i)
        .collect();
    let mut at = start;
    for next in starts {
        if kept <= target {
            break;
        }
        kept -= messages[at..next]
            .iter()
            .map(estimate_tokens)
            .sum::<usize>();
        at = next;
    }
    at
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
    fn documents_count_by_their_size() {
        use crate::conversation::FilePart;
        use base64::Engine as _;
        let pdf = vec![b'x'; 16_000];
        let message = Message {
            files: vec![FilePart {
                name: "report.pdf".into(),
                data: format!(
                    "data:application/pdf;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(&pdf)
                ),
            }],
            ..Message::user("read")
        };
        let plain = estimate_tokens(&Message::user("read"));
        let with = estimate_tokens(&message);
        assert!(
            with - plain >= 1_000 && with - plain < 1_100,
            "{plain} {with}"
        );
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
        // 3,017 tokens in all; 1,800 fit after dropping the first exchange.
        assert_eq!(fit_to_context(&history, 0, 1800), 4);
        // Nothing fits: only the last exchange is kept.
        assert_eq!(fit_to_context(&history, 0, 10), 6);
        assert_eq!(fit_to_context(&history, 0, 1_000_000), 0);
        assert_eq!(fit_to_context(&history, 4, 1_000_000), 0);
    }

    #[test]
    fn fitting_moves_the_start_seldom_and_far() {
        let exchange = |n: usize| {
            vec![
                Message::user(format!("{n} {}", "x".repeat(396))),
                Message::assistant("y".repeat(396)),
            ]
        };
        // Each exchange is about 200 tokens; the budget holds 10.
        let budget = 2_100;
        let mut history: Vec<Message> = (0..10).flat_map(exchange).collect();
        let mut start = fit_to_context(&history, 0, budget);
        assert_eq!(start, 0);
        let mut moves = Vec::new();
        for n in 10..40 {
            history.extend(exchange(n));
            let next = fit_to_context(&history, start, budget);
            assert!(next >= start);
            if next != start {
                moves.push(n);
                let kept: usize = history[next..].iter().map(estimate_tokens).sum();
                assert!(kept <= budget / 3 * 2, "dropped to {kept} tokens");
            }
            start = next;
            assert_eq!(history[start].role(), Role::User);
        }
        // Dropping to two thirds leaves room for 3 more exchanges before
        // the next move: 30 new exchanges move the start at most 30 / 3
        // times, not 30.
        assert!(!moves.is_empty() && moves.len() <= 10, "moved at {moves:?}");
    }

    #[test]
    fn repair_replaces_arguments_that_are_not_json() {
        let mut cut = calls(&["a"]);
        cut.tool_calls[0].arguments = "{\"path\": \"/tmp/no".into();
        let (fixed, changes) = repair(vec![
            Message::user("hi"),
            cut,
            Message::tool_result("a", "ERROR"),
        ]);
        assert_eq!(changes, 1);
        assert_eq!(fixed[1].tool_calls[0].arguments, "{}");
    }
}
