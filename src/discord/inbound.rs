//! Messages coming in: which conversation a message belongs to (starting a
//! thread for a mention), what it says without the mention, and its files,
//! fetched when its turn starts.

use serde_json::Value;
use serenity::all::{Message as DiscordMessage, MessageType};

use super::Surface;
use super::access::Place;
use super::protocol::{MAX_THREAD_NAME, THREAD_CHANNEL_TYPES};
use super::rest::Rest;
use crate::conversation::{
    AttachmentRef, AudioError, Author, Engine, FilePart, Inbound, Message, audio_part,
};

/// Text attachments are read up to this size.
pub const MAX_TEXT_ATTACHMENT_BYTES: usize = 100_000;

/// Where a message starts a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The channel (or thread) the turn is shown in.
    pub channel: u64,
    pub conversation: String,
}

/// The conversation of a channel, thread or DM.
pub fn conversation_of(channel: u64) -> String {
    format!("discord:{channel}")
}

/// The channel of a conversation, when it is a Discord one.
pub fn channel_of(conversation: &str) -> Option<u64> {
    conversation.strip_prefix("discord:")?.parse().ok()
}

/// Why a message could not be routed; shown only to someone who mentioned
/// the bot (or wrote in its thread).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(String);

/// Decides whether `msg` starts a turn, and where. Messages in the bot's
/// threads and DMs need no mention; elsewhere a mention (or any message in
/// an `AUTO_THREAD_CHANNELS` channel) starts a thread (or, in someone
/// else's thread, a turn there). A failure matters only for
/// a message meant for the bot: for the rest it is logged, never answered.
pub async fn route(surface: &Surface, msg: &DiscordMessage) -> Result<Option<Target>, RouteError> {
    // Joins, pins, boosts and the like are Discord's own notes, never meant
    // for the bot (in an auto-thread channel they would open threads).
    if !matches!(msg.kind, MessageType::Regular | MessageType::InlineReply) {
        return Ok(None);
    }
    let me = surface.me();
    let channel = msg.channel_id.get();
    let roles = super::role_ids(msg.member.as_deref().map(|m| m.roles.as_slice()));
    // In an auto-thread channel every message is meant for the bot.
    let mentioned = msg.mentions.iter().any(|u| u.id.get() == me)
        || surface.config.auto_thread_channels.contains(&channel);
    let mut place = Place {
        guild: msg.guild_id.map(|g| g.get()),
        channel,
        parent: None,
        user: msg.author.id.get(),
        roles: &roles,
    };
    let here = Target {
        channel,
        conversation: conversation_of(channel),
    };
    if place.guild.is_none() {
        return Ok(surface.access.allows(&place).then_some(here));
    }
    match surface.threads.parent(&here.conversation).await {
        Ok(Some(parent)) => {
            place.parent = Some(parent);
            return Ok(surface.access.allows(&place).then_some(here));
        }
        Ok(None) => {}
        Err(error) if mentioned => {
            return Err(RouteError(format!(
                "{error}. Your message was not saved; send it again."
            )));
        }
        Err(error) => {
            // Could be a message in the bot's thread; nobody is answered
            // in channels where the bot may not have been meant.
            tracing::warn!(%error, channel, "could not tell whether a channel is one of the bot's threads; the message is ignored");
            return Ok(None);
        }
    }
    if !mentioned {
        return Ok(None);
    }
    let failed = |error: &dyn std::fmt::Display| RouteError(format!("{error}"));
    let info = surface
        .rest
        .channel(channel)
        .await
        .map_err(|e| failed(&e))?;
    let is_thread = info["type"]
        .as_u64()
        .is_some_and(|t| THREAD_CHANNEL_TYPES.contains(&t));
    place.parent = if is_thread {
        snowflake(&info["parent_id"])
    } else {
        None
    };
    if !surface.access.allows(&place) {
        return Ok(None);
    }
    if is_thread {
        return Ok(Some(here));
    }
    let name = thread_name(&strip_mention(&msg.content, me));
    let thread = surface
        .rest
        .start_thread(channel, msg.id.get(), &name)
        .await
        .map_err(|e| failed(&e))?;
    let conversation = conversation_of(thread);
    surface
        .threads
        .add(&conversation, place.guild, channel, place.user)
        .await
        .map_err(|e| {
            failed(&format!(
                "{e}. The thread was started, but I could not remember it: mention me in it to go on"
            ))
        })?;
    // A new thread starts with its channel's model and prompt (/model and
    // /system in the channel).
    if let Err(error) = surface
        .engine
        .inherit(&conversation, &conversation_of(channel))
        .await
    {
        tracing::warn!(%error, conversation, "the thread could not take its channel's settings");
    }
    Ok(Some(Target {
        channel: thread,
        conversation,
    }))
}

/// The message as it is kept: its text without the mention, and its files
/// to fetch later.
pub fn inbound(msg: &DiscordMessage, me: u64) -> Inbound {
    Inbound {
        position: msg.id.get(),
        author: msg.author.id.get(),
        author_name: msg
            .member
            .as_ref()
            .and_then(|m| m.nick.clone())
            .unwrap_or_else(|| msg.author.display_name().to_owned()),
        text: strip_mention(&msg.content, me),
        attachments: msg.attachments.iter().map(attachment_ref).collect(),
        redo: None,
    }
}

/// A Discord attachment, to fetch when its turn starts.
pub fn attachment_ref(attachment: &serenity::all::Attachment) -> AttachmentRef {
    AttachmentRef {
        name: attachment.filename.clone(),
        url: attachment.url.clone(),
        content_type: attachment.content_type.clone(),
    }
}

/// What to do with one attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Passed to the model as an image.
    Image,
    /// Downloaded and put into the text.
    Text,
    /// A PDF, passed as a file for the endpoint's parser.
    Document,
    /// A voice note or other audio: transcribed, and kept as its words.
    Audio,
    /// An image for a model that cannot see: left out, with a notice.
    Unseen,
    /// Neither text nor image: left out, with a notice.
    Unreadable,
}

pub fn handling(attachment: &AttachmentRef, model_reads_images: bool) -> Handling {
    let kind = attachment.content_type.as_deref().unwrap_or_default();
    if kind.starts_with("image/") {
        if model_reads_images {
            Handling::Image
        } else {
            Handling::Unseen
        }
    } else if kind.starts_with("text/") || kind.contains("json") || is_text_name(&attachment.name) {
        Handling::Text
    } else if kind == "application/pdf" || attachment.name.to_lowercase().ends_with(".pdf") {
        Handling::Document
    } else if kind.starts_with("audio/") || audio_format(attachment).is_some() {
        Handling::Audio
    } else {
        Handling::Unreadable
    }
}

/// The message as the model sees it, and notices about files left out.
/// Files are downloaded here, when the turn starts; images are kept as
/// their bytes, never as Discord's link.
pub async fn prepare(
    rest: &Rest,
    input: &Inbound,
    model_reads_images: bool,
    caps: &Caps,
    hearing: (&Engine, &str),
) -> Prepared {
    let mut text = input.text.clone();
    let mut images = Vec::new();
    let mut files = Vec::new();
    let mut notices = Vec::new();
    let mut transcripts = Vec::new();
    for attachment in &input.attachments {
        let name = &attachment.name;
        match handling(attachment, model_reads_images) {
            Handling::Audio if transcripts.len() >= caps.audio_per_message => notices.push(format!(
                "Only {} voice notes of one message are transcribed (AUDIO_PER_MESSAGE), so {name} was left out.",
                caps.audio_per_message
            )),
            Handling::Audio => match rest.download(&attachment.url, caps.audio_max_bytes).await {
                Some((_, true)) => notices.push(format!(
                    "{name} is larger than {} (AUDIO_MAX_BYTES), so it was left out.",
                    size(caps.audio_max_bytes)
                )),
                Some((bytes, false)) => {
                    let format = audio_format(attachment).unwrap_or("ogg");
                    let ready = tokio::task::spawn_blocking(move || audio_part(format, &bytes))
                        .await
                        .unwrap_or_else(|e| Err(AudioError::Undecodable(e.to_string())));
                    let audio = match ready {
                        Ok(audio) => audio,
                        Err(error) => {
                            notices.push(format!("{name} could not be transcribed: {error}."));
                            continue;
                        }
                    };
                    let (engine, conversation) = hearing;
                    match engine.transcribe(conversation, audio).await {
                        Ok(words) => {
                            if !text.trim().is_empty() {
                                text.push_str("\n\n");
                            }
                            text.push_str(&words);
                            transcripts.push(words);
                        }
                        Err(error) => notices.push(format!("{name} could not be transcribed: {error}")),
                    }
                }
                None => notices.push(format!("I could not download {name}.")),
            },
            Handling::Document if !caps.reads_documents => notices.push(format!(
                "PDFs are read through OpenRouter only, and this bot's endpoint is another one (MODEL_API=openai), so {name} was left out. Paste the text you need instead."
            )),
            Handling::Document if files.len() >= caps.documents_per_message => notices.push(format!(
                "Only {} documents of one message are kept (DOCUMENTS_PER_MESSAGE), so {name} was left out.",
                caps.documents_per_message
            )),
            Handling::Document => match rest.download(&attachment.url, caps.document_max_bytes).await {
                Some((_, true)) => notices.push(format!(
                    "{name} is larger than {} (DOCUMENT_MAX_BYTES), so it was left out.",
                    size(caps.document_max_bytes)
                )),
                Some((bytes, false)) => files.push(FilePart {
                    name: name.clone(),
                    data: data_url("application/pdf", &bytes),
                }),
                None => notices.push(format!("I could not download {name}.")),
            },
            Handling::Image if images.len() >= caps.images_per_message => notices.push(format!(
                "Only {} images of one message are kept, so {name} was left out.",
                caps.images_per_message
            )),
            Handling::Image => match rest.download(&attachment.url, caps.image_max_bytes).await {
                Some((_, true)) => notices.push(format!(
                    "{name} is larger than {} (IMAGE_MAX_BYTES), so it was left out.",
                    size(caps.image_max_bytes)
                )),
                Some((bytes, false)) => images.push(data_url(image_type(attachment), &bytes)),
                None => notices.push(format!("I could not download {name}.")),
            },
            Handling::Text => match download(rest, &attachment.url).await {
                Some(body) => text.push_str(&format!("\n\n[attached file {name}]\n{body}")),
                None => notices.push(format!("I could not read {name}.")),
            },
            Handling::Unseen => notices.push(format!(
                "This model cannot see images, so {name} was left out."
            )),
            Handling::Unreadable => notices.push(format!(
                "I can only read text files, images and PDFs, so {name} was left out."
            )),
        }
    }
    let message = Message {
        images,
        files,
        author: Some(Author {
            id: input.author,
            name: input.author_name.clone(),
        }),
        ..Message::user(text)
    };
    Prepared {
        message,
        notices,
        transcripts,
    }
}

/// An input made ready for its turn.
#[derive(Debug, Default)]
pub struct Prepared {
    pub message: Message,
    /// Files left out, and why.
    pub notices: Vec<String>,
    /// The words of its voice notes (shown in the thread).
    pub transcripts: Vec<String>,
}

/// The audio format of an attachment, by type or name, as OpenRouter
/// names formats.
fn audio_format(attachment: &AttachmentRef) -> Option<&'static str> {
    let kind = attachment.content_type.as_deref().unwrap_or_default();
    let by_type = match kind.split(';').next().unwrap_or_default().trim() {
        "audio/ogg" | "audio/opus" => Some("ogg"),
        "audio/mpeg" | "audio/mp3" => Some("mp3"),
        "audio/wav" | "audio/x-wav" | "audio/wave" => Some("wav"),
        "audio/mp4" | "audio/x-m4a" | "audio/m4a" => Some("m4a"),
        "audio/flac" | "audio/x-flac" => Some("flac"),
        "audio/aac" => Some("aac"),
        "audio/aiff" | "audio/x-aiff" => Some("aiff"),
        _ => None,
    };
    let name = attachment.name.to_lowercase();
    let extension = name.rsplit_once('.').map(|(_, e)| e);
    by_type.or(match extension {
        Some("ogg" | "oga" | "opus") => Some("ogg"),
        Some("mp3") => Some("mp3"),
        Some("wav") => Some("wav"),
        Some("m4a") => Some("m4a"),
        Some("flac") => Some("flac"),
        Some("aac") => Some("aac"),
        _ => None,
    })
}

/// What files of one message are taken: the bounds on images
/// (`IMAGE_MAX_BYTES`, `IMAGES_PER_MESSAGE`) and documents
/// (`DOCUMENT_MAX_BYTES`, `DOCUMENTS_PER_MESSAGE`), and whether the
/// endpoint reads documents at all.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub image_max_bytes: usize,
    pub images_per_message: usize,
    pub reads_documents: bool,
    pub document_max_bytes: usize,
    pub documents_per_message: usize,
    pub audio_max_bytes: usize,
    pub audio_per_message: usize,
}

/// The type of an image attachment (`handling` only takes `image/…`).
fn image_type(attachment: &AttachmentRef) -> &str {
    attachment
        .content_type
        .as_deref()
        .and_then(|t| t.split(';').next())
        .unwrap_or("image/png")
        .trim()
}

/// The bytes as a `data:` URL: they are kept in the database, since
/// Discord's signed attachment links expire.
fn data_url(kind: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "data:{kind};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Bytes in the largest fitting unit.
fn size(bytes: usize) -> String {
    if bytes >= 1024 * 1024 && bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

async fn download(rest: &Rest, url: &str) -> Option<String> {
    let (bytes, longer) = rest.download(url, MAX_TEXT_ATTACHMENT_BYTES).await?;
    let mut body = String::from_utf8_lossy(&bytes).into_owned();
    if longer {
        body.push_str(&format!(
            "\n[cut: the file is longer; the first {} bytes are shown]",
            bytes.len()
        ));
    }
    Some(body)
}

pub fn snowflake(value: &Value) -> Option<u64> {
    value.as_str().and_then(|s| s.parse().ok())
}

/// The text without `<@me>` / `<@!me>` mentions.
pub fn strip_mention(content: &str, me: u64) -> String {
    content
        .replace(&format!("<@{me}>"), "")
        .replace(&format!("<@!{me}>"), "")
        .trim()
        .to_owned()
}

/// A thread's name: the first line of the message, shortened.
pub fn thread_name(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let name: String = line.chars().take(MAX_THREAD_NAME).collect();
    if name.is_empty() {
        "Conversation".to_owned()
    } else {
        name
    }
}

fn is_text_name(name: &str) -> bool {
    const TEXT: &[&str] = &[
        "txt", "md", "csv", "json", "yaml", "yml", "toml", "log", "rs", "py", "js", "ts", "html",
        "css", "sh", "xml",
    ];
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| TEXT.contains(&ext.to_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_stripped_in_both_forms_and_others_kept() {
        assert_eq!(strip_mention("<@42> hello <@!42>", 42), "hello");
        assert_eq!(strip_mention("<@7> hi <@42>", 42), "<@7> hi");
        assert_eq!(strip_mention("  plain  ", 42), "plain");
    }

    #[test]
    fn thread_names_use_the_first_line_and_are_capped() {
        assert_eq!(thread_name("\n\n  first line \nsecond"), "first line");
        assert_eq!(thread_name("   "), "Conversation");
        let long = "é".repeat(200);
        assert_eq!(thread_name(&long).chars().count(), MAX_THREAD_NAME);
    }

    #[test]
    fn conversations_and_channels_map_both_ways() {
        assert_eq!(channel_of(&conversation_of(123)), Some(123));
        assert_eq!(channel_of("terminal:default"), None);
        assert_eq!(channel_of("discord:abc"), None);
    }

    #[test]
    fn attachments_are_read_seen_or_left_out() {
        let file = |name: &str, kind: Option<&str>| AttachmentRef {
            name: name.into(),
            url: String::new(),
            content_type: kind.map(str::to_owned),
        };
        let png = file("a.png", Some("image/png"));
        assert_eq!(handling(&png, true), Handling::Image);
        assert_eq!(handling(&png, false), Handling::Unseen);
        assert_eq!(
            handling(&file("a.bin", Some("text/plain")), false),
            Handling::Text
        );
        assert_eq!(
            handling(&file("a.x", Some("application/json")), false),
            Handling::Text
        );
        assert_eq!(handling(&file("notes.MD", None), false), Handling::Text);
        assert_eq!(
            handling(&file("a.zip", Some("application/zip")), true),
            Handling::Unreadable
        );
    }
}
