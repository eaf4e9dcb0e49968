//! Who may talk to the bot where, and who counts as an admin.

use serenity::all::Permissions;

use crate::config::DiscordConfig;

/// Where a message or command comes from, and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    /// `None` in a DM.
    pub guild: Option<u64>,
    pub channel: u64,
    /// The parent channel when `channel` is a thread.
    pub parent: Option<u64>,
    pub user: u64,
    pub roles: &'a [u64],
}

/// The allow-lists and admin lists of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub guilds: Vec<u64>,
    pub channels: Vec<u64>,
    pub roles: Vec<u64>,
    pub users: Vec<u64>,
    pub dms: bool,
    pub admin_users: Vec<u64>,
    pub admin_roles: Vec<u64>,
}

impl Access {
    pub fn new(config: &DiscordConfig) -> Self {
        Access {
            guilds: config.allowed_guilds.clone(),
            channels: config.allowed_channels.clone(),
            roles: config.allowed_roles.clone(),
            users: config.allowed_users.clone(),
            dms: config.allow_dms,
            admin_users: config.admin_users.clone(),
            admin_roles: config.admin_roles.clone(),
        }
    }

    /// Whether the allow-lists let `place` talk to the bot (an empty list
    /// allows everyone). A thread follows its parent channel.
    pub fn allows(&self, place: &Place<'_>) -> bool {
        let listed = |list: &[u64], id: u64| list.is_empty() || list.contains(&id);
        let Some(guild) = place.guild else {
            return self.dms && listed(&self.users, place.user);
        };
        listed(&self.guilds, guild)
            && (self.channels.is_empty()
                || self.channels.contains(&place.channel)
                || place.parent.is_some_and(|p| self.channels.contains(&p)))
            && listed(&self.users, place.user)
            && (self.roles.is_empty() || place.roles.iter().any(|r| self.roles.contains(r)))
    }

    /// Admins are the listed users and roles; when none are listed, people
    /// who may manage threads (or administer the server).
    pub fn is_admin(&self, user: u64, roles: &[u64], permissions: Option<Permissions>) -> bool {
        if self.admin_users.contains(&user) || roles.iter().any(|r| self.admin_roles.contains(r)) {
            return true;
        }
        let nobody_named = self.admin_users.is_empty() && self.admin_roles.is_empty();
        nobody_named && permissions.is_some_and(|p| p.manage_threads() || p.administrator())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUILD: u64 = 1;
    const CHANNEL: u64 = 10;
    const THREAD: u64 = 11;
    const OTHER: u64 = 20;
    const USER: u64 = 100;
    const ROLE: u64 = 7;

    fn place(guild: Option<u64>, channel: u64, parent: Option<u64>, roles: &[u64]) -> Place<'_> {
        Place {
            guild,
            channel,
            parent,
            user: USER,
            roles,
        }
    }

    #[test]
    fn channel_lists_cover_their_threads_and_nothing_else() {
        let access = Access {
            channels: vec![CHANNEL],
            ..Default::default()
        };
        let cases = [
            (place(Some(GUILD), CHANNEL, None, &[]), true),
            (place(Some(GUILD), THREAD, Some(CHANNEL), &[]), true),
            (place(Some(GUILD), THREAD, None, &[]), false),
            (place(Some(GUILD), OTHER, None, &[]), false),
            (place(Some(GUILD), THREAD, Some(OTHER), &[]), false),
        ];
        for (place, allowed) in cases {
            assert_eq!(access.allows(&place), allowed, "{place:?}");
        }
    }

    #[test]
    fn every_list_must_agree() {
        let access = Access {
            guilds: vec![GUILD],
            users: vec![USER],
            roles: vec![ROLE],
            ..Default::default()
        };
        assert!(access.allows(&place(Some(GUILD), CHANNEL, None, &[ROLE])));
        assert!(!access.allows(&place(Some(GUILD), CHANNEL, None, &[])));
        assert!(!access.allows(&place(Some(2), CHANNEL, None, &[ROLE])));
        let stranger = Place {
            user: 101,
            ..place(Some(GUILD), CHANNEL, None, &[ROLE])
        };
        assert!(!access.allows(&stranger));
    }

    #[test]
    fn dms_need_to_be_turned_on_and_follow_the_user_list() {
        let off = Access::default();
        assert!(!off.allows(&place(None, CHANNEL, None, &[])));
        let on = Access {
            dms: true,
            users: vec![USER],
            // Guild and channel lists do not apply to DMs.
            guilds: vec![GUILD],
            channels: vec![OTHER],
            ..Default::default()
        };
        assert!(on.allows(&place(None, CHANNEL, None, &[])));
        let stranger = Place {
            user: 101,
            ..place(None, CHANNEL, None, &[])
        };
        assert!(!on.allows(&stranger));
    }

    #[test]
    fn admins_are_named_or_else_thread_managers() {
        let manage = Some(Permissions::MANAGE_THREADS);
        let nobody = Access::default();
        assert!(nobody.is_admin(USER, &[], manage));
        assert!(nobody.is_admin(USER, &[], Some(Permissions::ADMINISTRATOR)));
        assert!(!nobody.is_admin(USER, &[], Some(Permissions::SEND_MESSAGES)));
        assert!(!nobody.is_admin(USER, &[], None));
        let named = Access {
            admin_roles: vec![ROLE],
            ..Default::default()
        };
        assert!(named.is_admin(USER, &[ROLE], None));
        // Once admins are named, thread managers are not admins by default.
        assert!(!named.is_admin(USER, &[], manage));
    }
}
