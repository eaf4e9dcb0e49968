//! Open models that write their reasoning inline, as `<think>…</think>`
//! before the answer: the reasoning is kept apart and never shown or
//! stored as part of the answer.

use std::sync::Mutex;

use super::ports::TextSink;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Splits a leading `<think>…</think>` off `text`: (reasoning, answer).
/// An unclosed block is all reasoning (the reply was cut inside it).
pub fn split_think(text: &str) -> (Option<String>, &str) {
    let Some(inner) = text.trim_start().strip_prefix(OPEN) else {
        return (None, text);
    };
    match inner.split_once(CLOSE) {
        Some((thought, answer)) => (Some(thought.trim().to_owned()), answer.trim_start()),
        None => (Some(inner.trim().to_owned()), ""),
    }
}

#[derive(Debug)]
enum State {
    /// Not yet known whether the reply starts with a block.
    Start(String),
    /// Inside the block: nothing is passed on.
    Thinking(String),
    Passing,
}

/// Passes streamed text on without a leading `<think>` block.
pub(crate) struct Unthink<'a> {
    sink: &'a dyn TextSink,
    state: Mutex<State>,
}

impl<'a> Unthink<'a> {
    pub fn new(sink: &'a dyn TextSink) -> Self {
        Unthink {
            sink,
            state: Mutex::new(State::Start(String::new())),
        }
    }
}

impl TextSink for Unthink<'_> {
    fn push(&self, fragment: &str) {
        let mut state = self.state.lock().unwrap();
        let out = match &mut *state {
            State::Passing => Some(fragment.to_owned()),
            State::Start(seen) => {
                seen.push_str(fragment);
                let start = seen.trim_start();
                if let Some(rest) = start.strip_prefix(OPEN) {
                    let rest = rest.to_owned();
                    *state = State::Thinking(String::new());
                    drop(state);
                    return self.push(&rest);
                }
                if OPEN.starts_with(start) {
                    None // maybe a block, once more has come
                } else {
                    let seen = std::mem::take(seen);
                    *state = State::Passing;
                    Some(seen)
                }
            }
            State::Thinking(seen) => {
                seen.push_str(fragment);
                let answer = seen
                    .split_once(CLOSE)
                    .map(|(_, answer)| answer.trim_start().to_owned());
                if answer.is_some() {
                    *state = State::Passing;
                } else {
                    // Only a tail that could begin the closing tag is kept.
                    let mut keep = seen.len().saturating_sub(CLOSE.len() - 1);
                    while !seen.is_char_boundary(keep) {
                        keep -= 1;
                    }
                    seen.drain(..keep);
                }
                answer
            }
        };
        if let Some(text) = out.filter(|t| !t.is_empty()) {
            self.sink.push(&text);
        }
    }

    fn generation(&self, id: &str) {
        self.sink.generation(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leading_block_is_split_off() {
        assert_eq!(
            split_think("<think>\nhmm, 2+2\n</think>\n\nIt is 4."),
            (Some("hmm, 2+2".into()), "It is 4.")
        );
        assert_eq!(
            split_think("  <think>cut off"),
            (Some("cut off".into()), "")
        );
        assert_eq!(
            split_think("It is 4. <think>x</think>"),
            (None, "It is 4. <think>x</think>")
        );
        assert_eq!(split_think("plain"), (None, "plain"));
    }

    struct Collect(Mutex<String>);

    impl TextSink for Collect {
        fn push(&self, fragment: &str) {
            self.0.lock().unwrap().push_str(fragment);
        }
    }

    fn streamed(fragments: &[&str]) -> String {
        let out = Collect(Mutex::default());
        let filter = Unthink::new(&out);
        for fragment in fragments {
            filter.push(fragment);
        }
        out.0.into_inner().unwrap()
    }

    #[test]
    fn a_streamed_block_is_never_passed_on_however_it_is_cut() {
        assert_eq!(
            streamed(&["<thi", "nk>sec", "ret</th", "ink>\n", "An", "swer"]),
            "Answer"
        );
        assert_eq!(
            streamed(&["\n<think>", "secret", "</think>Answer"]),
            "Answer"
        );
        assert_eq!(streamed(&["<think>secret, never closed"]), "");
        assert_eq!(streamed(&["<b>bold</b> text"]), "<b>bold</b> text");
        assert_eq!(streamed(&["<", "3 you"]), "<3 you");
        assert_eq!(streamed(&["Hello", " <think>"]), "Hello <think>");
        let long: Vec<String> = (0..500).map(|i| format!("thought {i} é ")).collect();
        let mut fragments: Vec<&str> = vec!["<think>"];
        fragments.extend(long.iter().map(String::as_str));
        fragments.extend(["</thi", "nk>", "Done."]);
        assert_eq!(streamed(&fragments), "Done.");
    }
}
