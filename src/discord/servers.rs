//! `/tools`: the servers and tools of a conversation, and a menu to switch
//! servers on and off there (admins and the thread's starter).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use serenity::all::{ComponentInteraction, ComponentInteractionDataKind};

use super::Bot;
use super::inbound::conversation_of;
use super::protocol::{component, response};
use super::render::MAX_MESSAGE_CHARS;
use super::rest::RestError;

/// The custom id of the servers menu.
pub const MENU_ID: &str = "servers";
/// Discord's limit on a menu's options.
const MAX_OPTIONS: usize = 25;

/// The listing of `/tools`: each server on or off, the tools of those on,
/// problems, and the menu.
pub async fn listing(bot: &Bot, conversation: &str) -> Value {
    let surface = &bot.surface;
    let servers = surface.tools.servers(conversation).await;
    if servers.is_empty() {
        return json!({"content": "No tools are configured.", "components": []});
    }
    let off = surface
        .engine
        .servers_off(conversation)
        .await
        .unwrap_or_default();
    // Servers switched off are not started just to be listed.
    let list = surface.tools.tools_for_turn(conversation, &(), &off).await;
    let mut by_server: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for spec in &list.specs {
        let prefix = format!("{}__", spec.server);
        let name = spec.name.strip_prefix(&prefix).unwrap_or(&spec.name);
        by_server
            .entry(spec.server.as_str())
            .or_default()
            .push(format!("`{name}`"));
    }
    let mut lines: Vec<String> = servers
        .iter()
        .map(|server| match by_server.get(server.as_str()) {
            _ if off.contains(server) => format!("⛔ **{server}**: switched off here"),
            Some(tools) => format!("✅ **{server}**: {}", tools.join(", ")),
            None => format!("✅ **{server}**: no tools"),
        })
        .collect();
    lines.extend(list.problems.iter().map(|p| format!("⚠️ {p}")));
    let mut content = lines.join("\n");
    if content.chars().count() > MAX_MESSAGE_CHARS {
        content = content
            .chars()
            .take(MAX_MESSAGE_CHARS - 1)
            .collect::<String>()
            + "…";
    }
    let options: Vec<Value> = servers
        .iter()
        .take(MAX_OPTIONS)
        .map(|s| json!({"label": s, "value": s, "default": !off.contains(s)}))
        .collect();
    let menu = json!([{"type": component::ACTION_ROW, "components": [{
        "type": component::STRING_SELECT, "custom_id": MENU_ID, "placeholder": "Servers on in this thread",
        "min_values": 0, "max_values": options.len(), "options": options
    }]}]);
    json!({"content": content, "components": menu})
}

/// A choice in the servers menu: the chosen servers are on, the rest off.
pub async fn choose(bot: &Bot, press: &ComponentInteraction) -> Result<(), RestError> {
    let surface = &bot.surface;
    let rest = &surface.rest;
    let user = press.user.id.get();
    let admin = super::presser_is_admin(surface, press);
    let conversation = conversation_of(press.channel_id.get());
    let starter = surface.threads.starter(&conversation).await.ok().flatten();
    if !admin && starter != Some(user) {
        let refused = super::ephemeral(
            "Only the person who started this thread, or an admin, can switch its servers.",
        );
        return rest.respond(press.id.get(), &press.token, refused).await;
    }
    // Closing and starting sessions can take longer than Discord waits.
    let deferred = json!({"type": response::DEFERRED_UPDATE_MESSAGE});
    rest.respond(press.id.get(), &press.token, deferred).await?;
    let on = match &press.data.kind {
        ComponentInteractionDataKind::StringSelect { values } => values.clone(),
        _ => Vec::new(),
    };
    // Only the servers the menu offered change; the rest stay as they are.
    let before = surface
        .engine
        .servers_off(&conversation)
        .await
        .unwrap_or_default();
    let off: Vec<String> = surface
        .tools
        .servers(&conversation)
        .await
        .into_iter()
        .enumerate()
        .filter(|(i, s)| {
            if *i < MAX_OPTIONS {
                !on.contains(s)
            } else {
                before.contains(s)
            }
        })
        .map(|(_, s)| s)
        .collect();
    let body = match surface.engine.set_servers_off(&conversation, &off).await {
        Ok(()) => {
            tracing::info!(conversation, user, off = ?off, "servers switched");
            listing(bot, &conversation).await
        }
        Err(error) => json!({"content": format!("❌ {error}")}),
    };
    rest.edit_original(press.application_id.get(), &press.token, body)
        .await
}
