//! Servers' questions (MCP elicitation) in a thread. A form is a message
//! with a select menu per choice, Yes / No buttons per yes-or-no field,
//! and a **Fill in** button that opens modals of up to five text inputs
//! (chained when there are more); **Send**, **Decline** and **Cancel**
//! answer it. A page to open is shown whole, its site in bold, with a link
//! button and **Done**; the bot never fetches it. Only the turn's starter or
//! an admin may answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};
use serenity::all::{ComponentInteraction, ComponentInteractionDataKind, ModalInteraction};
use tokio::sync::oneshot;

use super::protocol::{button, component, response};
use super::rest::RestError;
use super::{Surface, ephemeral};
use crate::conversation::elicitation::{Field, FieldKind, complete};
use crate::conversation::{Answer, Question, QuestionKind};

/// Custom ids of a question's components: `ask:KEY:ACTION[:FIELD]`.
pub const PREFIX: &str = "ask:";
/// Custom ids of its modals: `askform:KEY:PAGE`.
pub const MODAL_PREFIX: &str = "askform:";
/// Select menus and Yes / No rows a message shows; further choices and
/// yes-or-no fields are typed in the modal instead. One row is left for
/// the buttons.
const PICKED_ROWS: usize = 4;
/// Text inputs one modal holds.
const MODAL_INPUTS: usize = 5;
/// Discord's limits on labels and such.
const MAX_LABEL: usize = 45;
const MAX_OPTION: usize = 100;
const MAX_PLACEHOLDER: usize = 100;
/// A link button's URL is at most this long.
const MAX_LINK_URL: usize = 512;
/// A component style that opens a URL.
const LINK: u8 = 5;
/// A modal, as an interaction response.
const MODAL: u8 = 9;
/// A text input component.
const TEXT_INPUT: u8 = 4;
/// No link previews.
const SUPPRESS_EMBEDS: u64 = 1 << 2;

/// A question waiting for its answer.
struct Pending {
    asker: u64,
    question: Question,
    values: Map<String, Value>,
    /// The modal page the Fill in button opens next.
    page: usize,
    answer: Option<oneshot::Sender<Answer>>,
}

/// The questions waiting in every thread, by key.
#[derive(Default)]
pub struct Questions {
    pending: Mutex<HashMap<String, Pending>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Questions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Questions({} waiting)", self.lock().len())
    }
}

/// Forgets its question when dropped: answered, timed out, or the turn cut.
pub struct Open<'a> {
    questions: &'a Questions,
    pub key: String,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.questions.lock().remove(&self.key);
    }
}

/// Why an answer is not taken.
enum Refused {
    NotYours,
    Gone,
}

impl Refused {
    fn said(&self) -> &'static str {
        match self {
            Refused::NotYours => {
                "Only the person who started this turn, or an admin, can answer this question."
            }
            Refused::Gone => "This question was already answered or has expired.",
        }
    }
}

impl Questions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().expect("questions poisoned")
    }

    /// Keeps `question` until it is answered; the message to post, and
    /// where the answer comes.
    pub fn open(
        &self,
        asker: u64,
        question: Question,
    ) -> (Open<'_>, Value, oneshot::Receiver<Answer>) {
        let key = super::button_key(self.next.fetch_add(1, Ordering::Relaxed)).to_string();
        let (answer, answered) = oneshot::channel();
        let mut pending = Pending {
            asker,
            question,
            values: Map::new(),
            page: 0,
            answer: Some(answer),
        };
        if let QuestionKind::Form(fields) = &pending.question.kind {
            for field in fields {
                if let Some(default) = &field.default {
                    pending.values.insert(field.name.clone(), default.clone());
                }
            }
        }
        let body = render(&key, &pending);
        self.lock().insert(key.clone(), pending);
        (
            Open {
                questions: self,
                key,
            },
            body,
            answered,
        )
    }

    /// Runs `act` on the question `key` if `user` may answer it.
    fn with<T>(
        &self,
        key: &str,
        user: u64,
        admin: bool,
        act: impl FnOnce(&str, &mut Pending) -> T,
    ) -> Result<T, Refused> {
        let mut pending = self.lock();
        let question = pending.get_mut(key).ok_or(Refused::Gone)?;
        if question.asker != user && !admin {
            return Err(Refused::NotYours);
        }
        Ok(act(key, question))
    }
}

/// The first line of a question: who asks, for what.
pub fn heading(question: &Question) -> String {
    let mut text = format!(
        "🔌 **{}** asks, for `{}`:",
        question.server.replace('*', ""),
        question.tool.replace('`', "'")
    );
    for line in cut(&question.message, MAX_SHOWN_MESSAGE).lines() {
        text.push_str(&format!("\n> {line}"));
    }
    text
}

/// Characters of the server's message shown, and of a whole question:
/// a message holds at most 2,000.
const MAX_SHOWN_MESSAGE: usize = 800;
const MAX_CONTENT: usize = 1800;

/// The fields shown as components, and those typed in the modal.
fn layout(fields: &[Field]) -> (Vec<usize>, Vec<usize>) {
    let mut picked = Vec::new();
    let mut typed = Vec::new();
    for (i, field) in fields.iter().enumerate() {
        let pickable = matches!(field.kind, FieldKind::Choice { .. } | FieldKind::Boolean);
        if pickable && picked.len() < PICKED_ROWS {
            picked.push(i);
        } else {
            typed.push(i);
        }
    }
    (picked, typed)
}

fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars.saturating_sub(1)) {
        Some((at, _)) if text.chars().count() > chars => format!("{}…", &text[..at]),
        _ => text.to_owned(),
    }
}

/// A value as people read it: a choice's label, Yes or No.
fn shown(field: &Field, value: &Value) -> String {
    let label = |v: &Value| match &field.kind {
        FieldKind::Choice { options, .. } => options
            .iter()
            .find(|o| v.as_str() == Some(&o.value))
            .map_or_else(|| v.to_string(), |o| o.label.clone()),
        _ => match v {
            Value::String(s) => s.clone(),
            Value::Bool(true) => "Yes".into(),
            Value::Bool(false) => "No".into(),
            other => other.to_string(),
        },
    };
    match value {
        Value::Array(items) => items.iter().map(label).collect::<Vec<_>>().join(", "),
        one => label(one),
    }
}

/// A value as typed into a text input.
fn typed_text(field: &Field, value: &Value) -> String {
    match (&field.kind, value) {
        (FieldKind::Choice { .. } | FieldKind::Boolean, _) => shown(field, value),
        (_, Value::String(s)) => s.clone(),
        (_, other) => other.to_string(),
    }
}

fn render(key: &str, pending: &Pending) -> Value {
    let question = &pending.question;
    match &question.kind {
        QuestionKind::Url(url) => render_url(key, question, url),
        QuestionKind::Form(fields) => render_form(key, pending, fields),
    }
}

fn render_url(key: &str, question: &Question, url: &str) -> Value {
    let site = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let mut content = format!(
        "{}\nIt asks you to open this page (the bot does not open it):\n`{}`\nThe site is **{site}**.",
        heading(question),
        url.replace('`', "%60")
    );
    if site.split('.').any(|label| label.starts_with("xn--")) {
        content.push_str(" ⚠️ Its name is written in another alphabet; check it letter by letter.");
    }
    content.push_str(
        " Open it only if you trust it, and press **Done** when you have finished there.",
    );
    let mut buttons = Vec::new();
    if url.len() <= MAX_LINK_URL {
        buttons.push(json!({"type": component::BUTTON, "style": LINK, "label": cut(&format!("Open {site}"), 80), "url": url}));
    }
    buttons.extend([
        json!({"type": component::BUTTON, "style": button::SUCCESS, "label": "Done", "custom_id": format!("{PREFIX}{key}:done")}),
        json!({"type": component::BUTTON, "style": button::SECONDARY, "label": "Decline", "custom_id": format!("{PREFIX}{key}:decline")}),
        json!({"type": component::BUTTON, "style": button::DANGER, "label": "Cancel", "custom_id": format!("{PREFIX}{key}:cancel")}),
    ]);
    json!({"content": content, "flags": SUPPRESS_EMBEDS, "allowed_mentions": {"parse": []},
           "components": [{"type": component::ACTION_ROW, "components": buttons}]})
}

fn render_form(key: &str, pending: &Pending, fields: &[Field]) -> Value {
    let mut content = heading(&pending.question);
    for (i, field) in fields.iter().enumerate() {
        // What was typed stays private: the thread sees only that it was.
        let value = match (pending.values.get(&field.name), &field.kind) {
            (None, _) => "_not set_".to_owned(),
            (Some(_), FieldKind::Text { .. } | FieldKind::Number { .. }) => {
                "✓ filled in".to_owned()
            }
            (Some(v), _) => cut(&shown(field, v), 100),
        };
        let required = if field.required { " (required)" } else { "" };
        let line = format!("\n• **{}**{required}: {value}", cut(&field.title, 80));
        if content.chars().count() + line.chars().count() > MAX_CONTENT {
            content.push_str(&format!("\n• …and {} more", fields.len() - i));
            break;
        }
        content.push_str(&line);
    }
    content.push_str(&format!(
        "\nFill it in, then press **Send**. Only <@{}> or an admin can answer.",
        pending.asker
    ));
    let (picked, typed) = layout(fields);
    let mut rows: Vec<Value> = picked
        .iter()
        .map(|&i| {
            let field = &fields[i];
            let value = pending.values.get(&field.name);
            let inner = match &field.kind {
                FieldKind::Choice { options, many } => {
                    let chosen = |v: &str| match value {
                        Some(Value::Array(items)) => items.iter().any(|x| x.as_str() == Some(v)),
                        Some(one) => one.as_str() == Some(v),
                        None => false,
                    };
                    // Values are the options' places: a server's own may be
                    // too long, empty or repeated for Discord.
                    let options: Vec<Value> = options
                        .iter()
                        .enumerate()
                        .map(|(n, o)| {
                            let label = if o.label.trim().is_empty() { "(empty)" } else { &o.label };
                            json!({"label": cut(label, MAX_OPTION), "value": n.to_string(), "default": chosen(&o.value)})
                        })
                        .collect();
                    vec![json!({"type": component::STRING_SELECT, "custom_id": format!("{PREFIX}{key}:pick:{i}"),
                        "placeholder": cut(&field.title, MAX_PLACEHOLDER), "min_values": 0,
                        "max_values": if *many { options.len() } else { 1 }, "options": options})]
                }
                _ => ["yes", "no"]
                    .iter()
                    .map(|word| {
                        let on = value.and_then(Value::as_bool) == Some(*word == "yes");
                        let label = if *word == "yes" { format!("{}: Yes", field.title) } else { "No".to_owned() };
                        json!({"type": component::BUTTON, "style": if on { button::PRIMARY } else { button::SECONDARY },
                               "label": cut(&label, 80), "custom_id": format!("{PREFIX}{key}:{word}:{i}")})
                    })
                    .collect(),
            };
            json!({"type": component::ACTION_ROW, "components": inner})
        })
        .collect();
    let mut buttons = Vec::new();
    let pages = typed.len().div_ceil(MODAL_INPUTS);
    if pages > 0 {
        let label = if pages == 1 {
            "Fill in…".to_owned()
        } else {
            format!("Fill in {}/{pages}…", pending.page % pages + 1)
        };
        buttons.push(json!({"type": component::BUTTON, "style": button::PRIMARY, "label": label, "custom_id": format!("{PREFIX}{key}:fill")}));
    }
    buttons.extend([
        json!({"type": component::BUTTON, "style": button::SUCCESS, "label": "Send", "custom_id": format!("{PREFIX}{key}:send")}),
        json!({"type": component::BUTTON, "style": button::SECONDARY, "label": "Decline", "custom_id": format!("{PREFIX}{key}:decline")}),
        json!({"type": component::BUTTON, "style": button::DANGER, "label": "Cancel", "custom_id": format!("{PREFIX}{key}:cancel")}),
    ]);
    rows.push(json!({"type": component::ACTION_ROW, "components": buttons}));
    json!({"content": content, "allowed_mentions": {"parse": []}, "components": rows})
}

/// The modal of `page` of a form's typed fields.
fn modal(key: &str, pending: &Pending, fields: &[Field], page: usize) -> Value {
    let (_, typed) = layout(fields);
    let rows: Vec<Value> = typed
        .iter()
        .skip(page * MODAL_INPUTS)
        .take(MODAL_INPUTS)
        .map(|&i| {
            let field = &fields[i];
            let mut input = json!({"type": TEXT_INPUT, "custom_id": i.to_string(),
                "label": cut(&field.title, MAX_LABEL),
                "style": 1, "required": field.required && !pending.values.contains_key(&field.name),
                "placeholder": cut(field.description.as_deref().unwrap_or(&field.hint()), MAX_PLACEHOLDER)});
            let mut longest = 4000;
            if let FieldKind::Text { min_chars, max_chars, .. } = &field.kind {
                if max_chars.is_none_or(|max| max > 100) {
                    input["style"] = 2.into();
                }
                longest = max_chars.unwrap_or(4000).clamp(1, 4000);
                if let Some(min) = min_chars {
                    input["min_length"] = (*min).min(longest).into();
                }
                input["max_length"] = longest.into();
            }
            // A value Discord would refuse to show is left out.
            if let Some(value) = pending.values.get(&field.name) {
                let text = typed_text(field, value);
                if text.chars().count() as u64 <= longest {
                    input["value"] = text.into();
                }
            }
            json!({"type": component::ACTION_ROW, "components": [input]})
        })
        .collect();
    json!({"type": MODAL, "data": {"custom_id": format!("{MODAL_PREFIX}{key}:{page}"),
        "title": cut(&format!("{} asks", pending.question.server), MAX_LABEL), "components": rows}})
}

/// The message once answered: who asks, and what became of it.
fn answered(pending: &Pending, outcome: &str) -> Value {
    json!({"type": response::UPDATE_MESSAGE, "data": {
        "content": format!("{}\n{outcome}", heading(&pending.question)),
        "components": [], "allowed_mentions": {"parse": []}}})
}

fn update(key: &str, pending: &Pending) -> Value {
    json!({"type": response::UPDATE_MESSAGE, "data": render(key, pending)})
}

/// Gives the answer and forgets the question.
fn finish(pending: &mut Pending, answer: Answer) {
    if let Some(sender) = pending.answer.take() {
        let _ = sender.send(answer);
    }
}

/// Handles a press or a choice on a question's message.
pub async fn press(surface: &Surface, press: &ComponentInteraction) -> Result<(), RestError> {
    let user = press.user.id.get();
    let admin = super::is_admin(surface, user, press.member.as_ref());
    let rest = press.data.custom_id.trim_start_matches(PREFIX);
    let mut parts = rest.split(':');
    let (key, action) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let field: Option<usize> = parts.next().and_then(|i| i.parse().ok());
    let chosen = match &press.data.kind {
        ComponentInteractionDataKind::StringSelect { values } => values.clone(),
        _ => Vec::new(),
    };
    let body = surface
        .questions
        .with(key, user, admin, |key, pending| {
            let fields = match &pending.question.kind {
                QuestionKind::Form(fields) => fields.clone(),
                QuestionKind::Url(_) => Vec::new(),
            };
            let target = field.and_then(|i| fields.get(i));
            match (action, target) {
                ("pick", Some(field)) => {
                    let (options, many) = match &field.kind {
                        FieldKind::Choice { options, many } => (options.as_slice(), *many),
                        _ => (&[][..], false),
                    };
                    let chosen: Vec<Value> = chosen
                        .iter()
                        .filter_map(|n| options.get(n.parse::<usize>().ok()?))
                        .map(|o| Value::String(o.value.clone()))
                        .collect();
                    let value = match (many, chosen.first()) {
                        (true, _) => Some(Value::Array(chosen.clone())),
                        (false, Some(one)) => Some(one.clone()),
                        (false, None) => None,
                    };
                    match value {
                        Some(value) => pending.values.insert(field.name.clone(), value),
                        None => pending.values.remove(&field.name),
                    };
                    update(key, pending)
                }
                (word @ ("yes" | "no"), Some(field)) => {
                    pending
                        .values
                        .insert(field.name.clone(), Value::Bool(word == "yes"));
                    update(key, pending)
                }
                ("fill", _) => {
                    let pages = layout(&fields).1.len().div_ceil(MODAL_INPUTS).max(1);
                    modal(key, pending, &fields, pending.page % pages)
                }
                ("send", _) => match complete(&fields, &pending.values) {
                    Err(missing) => ephemeral(&format!("❌ Not sent: {missing}.")),
                    Ok(()) => {
                        let values = std::mem::take(&mut pending.values);
                        finish(pending, Answer::Accept(values));
                        answered(pending, &format!("✅ Answered by <@{user}>."))
                    }
                },
                ("done", _) => {
                    finish(pending, Answer::Accept(Map::new()));
                    answered(pending, &format!("✅ <@{user}> is done there."))
                }
                ("decline", _) => {
                    finish(pending, Answer::Decline);
                    answered(pending, &format!("🚫 Declined by <@{user}>."))
                }
                ("cancel", _) => {
                    finish(pending, Answer::Cancel);
                    answered(pending, &format!("⏹️ Cancelled by <@{user}>."))
                }
                _ => ephemeral("This control is not known."),
            }
        })
        .unwrap_or_else(|refused| ephemeral(refused.said()));
    surface
        .rest
        .respond(press.id.get(), &press.token, body)
        .await
}

/// Handles a filled-in modal: what fits is kept, what does not is named.
pub async fn submit(surface: &Surface, modal: &ModalInteraction) -> Result<(), RestError> {
    let user = modal.user.id.get();
    let admin = super::is_admin(surface, user, modal.member.as_ref());
    let rest = modal.data.custom_id.trim_start_matches(MODAL_PREFIX);
    let (key, page) = rest.split_once(':').unwrap_or((rest, "0"));
    let page: usize = page.parse().unwrap_or(0);
    let typed: Vec<(usize, String)> = super::modal_inputs(modal)
        .into_iter()
        .filter_map(|(id, value)| Some((id.parse().ok()?, value)))
        .collect();
    let outcome = surface.questions.with(key, user, admin, |key, pending| {
        let QuestionKind::Form(fields) = pending.question.kind.clone() else {
            return (update(key, pending), None);
        };
        let mut problems = Vec::new();
        for (i, text) in &typed {
            let Some(field) = fields.get(*i) else {
                continue;
            };
            match field.read(text) {
                Ok(Some(value)) => {
                    pending.values.insert(field.name.clone(), value);
                }
                Ok(None) => {
                    pending.values.remove(&field.name);
                }
                Err(problem) => problems.push(problem),
            }
        }
        let pages = layout(&fields).1.len().div_ceil(MODAL_INPUTS).max(1);
        if problems.is_empty() {
            pending.page = (page + 1) % pages;
            (update(key, pending), None)
        } else {
            let note = cut(
                &format!(
                    "❌ {}. The rest was kept; press **Fill in** to correct it.",
                    problems.join("; ")
                ),
                1900,
            );
            (ephemeral(&note), Some(render(key, pending)))
        }
    });
    let (body, edit) = match outcome {
        Ok(found) => found,
        Err(refused) => (ephemeral(refused.said()), None),
    };
    surface
        .rest
        .respond(modal.id.get(), &modal.token, body)
        .await?;
    // What did fit is shown on the question too.
    if let (Some(edit), Some(message)) = (edit, modal.message.as_ref()) {
        surface
            .rest
            .edit_message(modal.channel_id.get(), message.id.get(), edit)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::elicitation::Choice;

    fn field(name: &str, kind: FieldKind) -> Field {
        Field {
            name: name.into(),
            title: name.into(),
            description: None,
            required: false,
            kind,
            default: None,
        }
    }

    #[test]
    fn a_form_uses_at_most_five_rows_and_chains_modals_of_five_inputs() {
        let choice = || FieldKind::Choice {
            options: vec![Choice {
                value: "a".into(),
                label: "A".into(),
            }],
            many: false,
        };
        let text = || FieldKind::Text {
            min_chars: None,
            max_chars: Some(20),
            format: None,
        };
        let mut fields: Vec<Field> = (0..3).map(|i| field(&format!("c{i}"), choice())).collect();
        fields.extend((0..3).map(|i| field(&format!("b{i}"), FieldKind::Boolean)));
        fields.extend((0..6).map(|i| field(&format!("t{i}"), text())));
        let questions = Questions::default();
        let question = Question {
            server: "s".into(),
            tool: "t".into(),
            message: "m".into(),
            kind: QuestionKind::Form(fields.clone()),
        };
        let (open, body, _answered) = questions.open(1, question);
        let rows = body["components"].as_array().unwrap();
        assert_eq!(rows.len(), 5);
        let buttons = rows[4]["components"].as_array().unwrap();
        let labels: Vec<&str> = buttons
            .iter()
            .map(|b| b["label"].as_str().unwrap())
            .collect();
        // 2 booleans and 6 texts are typed: 8 inputs, 2 modals.
        assert_eq!(labels, ["Fill in 1/2…", "Send", "Decline", "Cancel"]);
        let pending = questions.lock();
        let pending = pending.get(&open.key).unwrap();
        let first = modal(&open.key, pending, &fields, 0);
        let second = modal(&open.key, pending, &fields, 1);
        assert_eq!(first["data"]["components"].as_array().unwrap().len(), 5);
        assert_eq!(second["data"]["components"].as_array().unwrap().len(), 3);
        assert_eq!(
            second["data"]["custom_id"],
            format!("askform:{}:1", open.key)
        );
    }
}
