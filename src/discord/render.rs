//! How turns look in Discord: messages split under the length limit, code
//! blocks kept whole across cuts, one-line tool notices.

/// Discord's limit on message content, in characters.
pub const MAX_MESSAGE_CHARS: usize = 2000;
/// Characters of tool arguments shown in a notice.
const NOTICE_ARGUMENT_CHARS: usize = 120;

/// Splits `text` into messages of at most `limit` characters: at paragraph
/// breaks when possible, then at line breaks, then at spaces, never inside a
/// word unless a word is longer than a message. A code block open at a cut
/// is closed and reopened, with its language, in the next message.
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text.trim_end().to_owned();
    // The fence line (```lang) open at the start of `rest`, if any.
    let mut reopen: Option<String> = None;
    while !rest.is_empty() {
        let prefix = reopen
            .as_ref()
            .map(|f| format!("{f}\n"))
            .unwrap_or_default();
        let body = format!("{prefix}{rest}");
        if body.chars().count() <= limit {
            parts.push(body);
            break;
        }
        // Room for a closing fence, should the cut fall inside a block.
        let budget = limit - 4;
        let cut = cut_point(&body, budget);
        let (head, tail) = split_at_char(&body, cut);
        let mut head = head.trim_end().to_owned();
        let open = open_fence(&head);
        if open.is_some() {
            head.push_str("\n```");
        }
        parts.push(head);
        reopen = open;
        rest = tail.trim_start_matches(['\n', ' ']).to_owned();
        if rest.is_empty() {
            break;
        }
    }
    parts
}

/// Where to cut `text` so that the head has at most `budget` characters.
fn cut_point(text: &str, budget: usize) -> usize {
    let head: String = text.chars().take(budget).collect();
    let min = budget / 3;
    for separator in ["\n\n", "\n", " "] {
        if let Some(at) = head.rfind(separator) {
            let chars = head[..at].chars().count();
            if chars >= min {
                return chars;
            }
        }
    }
    budget
}

fn split_at_char(text: &str, chars: usize) -> (&str, &str) {
    let at = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    text.split_at(at)
}

/// The opening fence line (with its language) left open at the end of
/// `text`, if the number of fences in it is odd.
fn open_fence(text: &str) -> Option<String> {
    let mut open: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(after) = trimmed.strip_prefix("```") {
            open = match open {
                Some(_) => None,
                None => Some(format!("```{}", after.trim())),
            };
        }
    }
    open
}

/// The notice posted when a tool call starts.
pub fn notice_started(name: &str, arguments: &str) -> String {
    format!("🔧 `{}` {}", display_name(name), short_arguments(arguments))
}

/// How far a call is: a share of its total, or the count when there is
/// no total; nothing when it reported no amount.
pub fn progress_amount(progress: f64, total: Option<f64>) -> Option<String> {
    match total {
        Some(total) if total > 0.0 => Some(format!(
            "{:.0}%",
            (progress / total * 100.0).clamp(0.0, 100.0)
        )),
        _ if progress > 0.0 => Some(format!("{progress}")),
        _ => None,
    }
}

/// The notice while the server reports progress: `⏳ server › tool — 40%
/// (message)`, or the count when the server gives no total.
pub fn notice_progress(
    name: &str,
    arguments: &str,
    progress: f64,
    total: Option<f64>,
    message: Option<&str>,
) -> String {
    let message = message
        .map(|m| m.replace('`', "'"))
        .filter(|m| !m.trim().is_empty())
        .map(|m| m.chars().take(NOTICE_ARGUMENT_CHARS).collect::<String>());
    // A task's status comes with no amount at all.
    let said = match (progress_amount(progress, total), message) {
        (Some(amount), Some(message)) => format!("{amount} ({message})"),
        (Some(amount), None) => amount,
        (None, Some(message)) => message,
        (None, None) => "working".to_owned(),
    };
    format!(
        "⏳ `{}` {} — {said}",
        display_name(name),
        short_arguments(arguments)
    )
}

/// The notice once the call finished.
pub fn notice_finished(name: &str, arguments: &str, ok: bool, summary: &str) -> String {
    let mark = if ok { "✅" } else { "❌" };
    let summary = summary.replace('`', "'");
    let summary = if summary.is_empty() {
        String::new()
    } else {
        format!(" — {summary}")
    };
    format!(
        "{mark} `{}` {}{summary}",
        display_name(name),
        short_arguments(arguments)
    )
}

/// `server__tool` shown as `server › tool`.
fn display_name(name: &str) -> String {
    match name.split_once("__") {
        Some((server, tool)) => format!("{server} › {tool}"),
        None => name.to_owned(),
    }
}

fn short_arguments(arguments: &str) -> String {
    let arguments = arguments.replace('`', "'");
    if arguments == "{}" || arguments.is_empty() {
        return String::new();
    }
    let shown: String = arguments.chars().take(NOTICE_ARGUMENT_CHARS).collect();
    let ellipsis = if arguments.chars().count() > NOTICE_ARGUMENT_CHARS {
        "…"
    } else {
        ""
    };
    format!("`{shown}{ellipsis}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_a_share_or_a_count_and_the_message() {
        assert_eq!(
            notice_progress(
                "fs__copy",
                r#"{"to":"b"}"#,
                2.0,
                Some(5.0),
                Some("copying `a`")
            ),
            format!(
                "⏳ `fs › copy` {} — 40% (copying 'a')",
                short_arguments(r#"{"to":"b"}"#)
            )
        );
        assert_eq!(
            notice_progress("fs__copy", "{}", 7.0, None, None),
            format!("⏳ `fs › copy` {} — 7", short_arguments("{}"))
        );
        assert!(notice_progress("t", "", 9.0, Some(3.0), None).ends_with("— 100%"));
        // A task's status: no amount, only what its server says.
        assert!(
            notice_progress("t", "", 0.0, None, Some("Analyzing content..."))
                .ends_with("— Analyzing content...")
        );
    }

    #[test]
    fn short_text_is_one_message() {
        assert_eq!(split_message("hello", 2000), ["hello"]);
    }

    #[test]
    fn cuts_at_paragraphs_then_lines_and_never_inside_words() {
        let text = format!("{}\n\n{}", "a ".repeat(30).trim(), "b ".repeat(30).trim());
        let parts = split_message(&text, 70);
        assert_eq!(parts.len(), 2);
        assert!(parts[0].chars().all(|c| c == 'a' || c == ' '));
        let words = "word ".repeat(100);
        for part in split_message(&words, 64) {
            assert!(part.chars().count() <= 64);
            assert!(part.split(' ').all(|w| w == "word"), "{part:?}");
        }
    }

    #[test]
    fn a_code_block_cut_in_two_is_closed_and_reopened_with_its_language() {
        let code: String = (0..40).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Here:\n```rust\n{code}```\nDone.");
        let parts = split_message(&text, 200);
        assert!(parts.len() > 2);
        for part in &parts {
            assert!(part.chars().count() <= 200, "{}", part.chars().count());
            assert_eq!(
                part.matches("```").count() % 2,
                0,
                "unbalanced fences in {part:?}"
            );
        }
        assert!(parts[1].starts_with("```rust\n"), "{:?}", parts[1]);
        assert!(parts.last().unwrap().ends_with("Done."));
        let joined: String = parts.join("\n");
        assert!(joined.contains("let x39 = 39;"));
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let text = "é".repeat(3000);
        let parts = split_message(&text, 2000);
        assert!(parts.iter().all(|p| p.chars().count() <= 2000));
        assert_eq!(parts.iter().map(|p| p.chars().count()).sum::<usize>(), 3000);
    }

    #[test]
    fn notices_are_one_line() {
        assert_eq!(
            notice_started("fs__read_file", r#"{"path":"/a"}"#),
            "🔧 `fs › read_file` `{\"path\":\"/a\"}`"
        );
        assert_eq!(
            notice_finished("fs__list", "{}", false, "ERROR: no"),
            "❌ `fs › list`  — ERROR: no"
        );
        let long = format!("{{\"x\":\"{}\"}}", "y".repeat(500));
        assert!(notice_started("t", &long).ends_with("…`"));
    }
}
