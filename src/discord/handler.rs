//! serenity's event handler: a thin layer that hands each event to its part.

use std::sync::Arc;

use async_trait::async_trait;
use serenity::all::{
    ChannelId, Context, EventHandler, GuildId, Interaction, Message as DiscordMessage, MessageId,
    MessageUpdateEvent, Ready, ResumedEvent,
};

use super::inbound::{self, conversation_of};
use super::{Bot, approvals, commands, controls, edits, health, picks, questions, servers};
use crate::conversation::Accepted;

/// serenity's handler: it gets `&self`, and the parts need an owned `Arc`.
pub struct Handler(pub Arc<Bot>);

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        let bot = &self.0;
        let shard = ready.shard.map_or(0, |s| s.id.0);
        if !bot
            .surface
            .shards_ready
            .lock()
            .expect("shards poisoned")
            .insert(shard)
        {
            crate::metrics::gateway_reconnected();
        }
        bot.surface.set_me(ready.user.id.get());
        crate::metrics::gateway(true);
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "connected to Discord");
        if let Some(path) = &bot.surface.config.health_file {
            let _writing = bot.surface.health.lock().await;
            if let Err(error) = health::write(path, true) {
                tracing::warn!(%error, "could not write the health file");
            }
        }
        // Registered once, by the process that runs shard 0.
        if ready.shard.is_some_and(|shard| shard.id.0 != 0) {
            return;
        }
        let rest = &bot.surface.rest;
        if let Err(error) = rest
            .set_commands(bot.surface.application_id, commands::definitions())
            .await
        {
            tracing::error!(%error, "could not register slash commands");
        }
    }

    async fn resume(&self, _ctx: Context, _resumed: ResumedEvent) {
        tracing::info!("gateway session resumed");
        crate::metrics::gateway_reconnected();
        crate::metrics::gateway(true);
    }

    async fn message(&self, _ctx: Context, msg: DiscordMessage) {
        let bot = &self.0;
        if msg.author.bot {
            return;
        }
        let channel = msg.channel_id.get();
        // Before any await: a later message of this channel waits for this
        // one, however the two handlers are scheduled.
        let _arrival = bot
            .workers
            .arriving(&conversation_of(channel), msg.id.get());
        let target = match inbound::route(&bot.surface, &msg).await {
            Ok(Some(target)) => target,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, channel, "could not take a message");
                bot.surface.say(channel, &format!("❌ {error}")).await;
                return;
            }
        };
        let input = inbound::inbound(&msg, bot.surface.me());
        match bot.workers.accept(&target.conversation, input).await {
            Ok(Accepted::Queued | Accepted::Duplicate) => {}
            Ok(Accepted::Kept) => {
                bot.surface
                    .say(
                        target.channel,
                        "⏸️ The bot is restarting; your message is kept and will be answered when it is back.",
                    )
                    .await;
            }
            Err(error) => {
                tracing::warn!(%error, conversation = %target.conversation, "could not keep a message");
                let content = format!("❌ {error}. Your message was not saved; send it again.");
                bot.surface.say(target.channel, &content).await;
            }
        }
    }

    async fn message_update(
        &self,
        _ctx: Context,
        _old: Option<DiscordMessage>,
        _new: Option<DiscordMessage>,
        event: MessageUpdateEvent,
    ) {
        edits::edited(&self.0, &event).await;
    }

    async fn message_delete(
        &self,
        _ctx: Context,
        channel: ChannelId,
        message: MessageId,
        _guild: Option<GuildId>,
    ) {
        edits::deleted(&self.0, channel.get(), message.get()).await;
    }

    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let bot = &self.0;
        let result = match &interaction {
            Interaction::Command(command) => commands::run(bot, command).await,
            Interaction::Autocomplete(command) => commands::autocomplete(bot, command).await,
            Interaction::Component(press)
                if press.data.custom_id.starts_with(controls::STOP_PREFIX) =>
            {
                controls::press(bot, press).await
            }
            Interaction::Component(press)
                if press.data.custom_id.starts_with(controls::RETRY_PREFIX) =>
            {
                controls::press_retry(bot, press).await
            }
            Interaction::Component(press) if press.data.custom_id == servers::MENU_ID => {
                servers::choose(bot, press).await
            }
            Interaction::Component(press)
                if press.data.custom_id.starts_with(controls::REASONING_PREFIX) =>
            {
                controls::press_reasoning(bot, press).await
            }
            Interaction::Component(press)
                if press.data.custom_id.starts_with(questions::PREFIX) =>
            {
                questions::press(&bot.surface, press).await
            }
            Interaction::Modal(modal)
                if modal.data.custom_id.starts_with(questions::MODAL_PREFIX) =>
            {
                questions::submit(&bot.surface, modal).await
            }
            Interaction::Modal(modal) if modal.data.custom_id.starts_with(picks::MODAL_PREFIX) => {
                picks::submit(bot, modal).await
            }
            Interaction::Component(press)
                if press.data.custom_id.starts_with(picks::READ_PREFIX) =>
            {
                picks::press_read(bot, press).await
            }
            Interaction::Component(press) => approvals::press(&bot.surface, press).await,
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "could not answer an interaction");
        }
    }
}
