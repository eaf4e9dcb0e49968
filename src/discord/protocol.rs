//! Discord's protocol numbers, by name.

/// Interaction response types.
pub mod response {
    /// A message in answer to the interaction.
    pub const MESSAGE: u8 = 4;
    /// "Thinking…": the answer comes later, by editing the original.
    pub const DEFERRED_MESSAGE: u8 = 5;
    /// "Working…" on a pressed component: the message is edited later.
    pub const DEFERRED_UPDATE_MESSAGE: u8 = 6;
    /// Edits the message the pressed component belongs to.
    pub const UPDATE_MESSAGE: u8 = 7;
    /// Autocomplete choices.
    pub const AUTOCOMPLETE: u8 = 8;
}

/// Message component types.
pub mod component {
    pub const ACTION_ROW: u8 = 1;
    pub const BUTTON: u8 = 2;
    pub const STRING_SELECT: u8 = 3;
}

/// Button styles.
pub mod button {
    /// Grey.
    pub const SECONDARY: u8 = 2;
    /// Blurple.
    pub const PRIMARY: u8 = 1;
    /// Green.
    pub const SUCCESS: u8 = 3;
    /// Red.
    pub const DANGER: u8 = 4;
}

/// Message flags.
pub mod flags {
    /// Only the person who used the interaction sees the message.
    pub const EPHEMERAL: u64 = 1 << 6;
}

/// Application command types and option types.
pub mod command {
    /// A slash command.
    pub const CHAT_INPUT: u8 = 1;
    /// A string option.
    pub const STRING_OPTION: u8 = 3;
    /// A boolean option.
    pub const BOOLEAN_OPTION: u8 = 5;
    /// A number option (a double).
    pub const NUMBER_OPTION: u8 = 10;
}

/// The channel type of a direct message.
pub const DM_CHANNEL_TYPE: u64 = 1;
/// Channel types that are threads (announcement, public, private).
pub const THREAD_CHANNEL_TYPES: std::ops::RangeInclusive<u64> = 10..=12;

/// Autocomplete offers at most this many choices.
pub const MAX_CHOICES: usize = 25;
/// An autocomplete choice's value is at most this many characters.
pub const MAX_CHOICE_CHARS: usize = 100;
/// Thread names are at most 100 characters; ours are shorter.
pub const MAX_THREAD_NAME: usize = 90;
/// A typing indicator lasts ten seconds.
pub const TYPING_LASTS_SECS: u64 = 10;
