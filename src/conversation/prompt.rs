//! The system prompt of a turn: the conversation's own (or the global
//! one), with its placeholders filled. `{channel}` and `{server}` are
//! filled in the prompt, which stays the same from turn to turn; `{date}`,
//! `{time}` and `{weekday}` would change it (and lose the provider's prompt
//! cache), so the prompt points to a note with the current date and time
//! that starts each new message instead.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Where a turn happens, for `{channel}` and `{server}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    pub channel: String,
    pub server: String,
}

/// What time it is (a fixed clock in tests).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Timestamp + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(Timestamp::now))
    }

    pub fn fixed(at: Timestamp) -> Self {
        Clock(Arc::new(move || at))
    }

    pub fn now(&self) -> Timestamp {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Placeholders that change with time, and what the prompt says instead.
const TIMELY: [(&str, &str); 3] = [
    (
        "{date}",
        "the date in the [brackets] that start the newest message",
    ),
    (
        "{time}",
        "the time in the [brackets] that start the newest message",
    ),
    (
        "{weekday}",
        "the weekday in the [brackets] that start the newest message",
    ),
];

/// Whether `prompt` asks for the date or time.
pub fn wants_time(prompt: &str) -> bool {
    TIMELY
        .iter()
        .any(|(placeholder, _)| prompt.contains(placeholder))
}

/// `prompt` with its placeholders filled (see the module's text).
pub fn fill(prompt: &str, place: &Place) -> String {
    let mut filled = prompt
        .replace("{channel}", &place.channel)
        .replace("{server}", &place.server);
    for (placeholder, instead) in TIMELY {
        filled = filled.replace(placeholder, instead);
    }
    filled
}

/// The note that starts a new message when the prompt wants the time:
/// `[Thursday 2026-12-03 13:05 CET]`.
pub fn time_note(now: Timestamp, zone: &TimeZone) -> String {
    let local = now.to_zoned(zone.clone());
    format!("[{}] ", local.strftime("%A %Y-%m-%d %H:%M %Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_is_filled_and_time_points_to_the_note() {
        let place = Place {
            channel: "#general".into(),
            server: "Makers".into(),
        };
        let prompt = "You help in {channel} on {server}. Today is {date}.";
        assert!(wants_time(prompt));
        assert!(!wants_time("You help in {channel}."));
        assert_eq!(
            fill(prompt, &place),
            "You help in #general on Makers. Today is the date in the [brackets] that start the newest message."
        );
    }

    #[test]
    fn the_note_is_in_the_configured_zone() {
        let at: Timestamp = "2026-12-03T23:30:00Z".parse().unwrap();
        assert_eq!(
            time_note(at, &TimeZone::UTC),
            "[Thursday 2026-12-03 23:30 UTC] "
        );
        let paris = TimeZone::get("Europe/Paris").unwrap();
        assert_eq!(time_note(at, &paris), "[Friday 2026-12-04 00:30 CET] ");
    }
}
