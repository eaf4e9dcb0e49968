//! Spending caps in dollars, from the `usage.cost` the endpoint bills:
//! each person's turns per UTC day (`BUDGET_USER_DAILY`) and each server's
//! per UTC month (`BUDGET_GUILD_MONTHLY`), which a server's admins can
//! change there with `/budget`. What was spent is summed from the database
//! at each turn's start, so processes sharing one database share the caps.
//! A turn that would start over a cap is refused, saying which cap, when it
//! resets and who can raise it; a running turn is never cut.

use jiff::{Timestamp, ToSpan, tz::TimeZone};

use super::Surface;
use crate::conversation::StoreError;

/// The caps a server's admins set; `None` keeps the bot's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuildBudget {
    pub monthly: Option<f64>,
    pub daily: Option<f64>,
}

/// The caps that apply in one place, and where each comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Caps {
    daily: Option<f64>,
    monthly: Option<f64>,
}

/// Where a turn runs, for its caps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spender {
    pub guild: Option<u64>,
    pub user: u64,
}

/// The UTC day and month `now` is in: their starts and the next ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Periods {
    day: i64,
    next_day: i64,
    month: i64,
    next_month: i64,
}

impl Periods {
    fn at(now: Timestamp) -> Periods {
        let seconds = now.as_second();
        let day = seconds - seconds.rem_euclid(86_400);
        let date = now.to_zoned(TimeZone::UTC).date().first_of_month();
        let start = |d: jiff::civil::Date| {
            d.to_zoned(TimeZone::UTC)
                .map_or(day, |z| z.timestamp().as_second())
        };
        let next = date.checked_add(1.month()).unwrap_or(date);
        Periods {
            day,
            next_day: day + 86_400,
            month: start(date),
            next_month: start(next),
        }
    }
}

/// The server `conversation` (in `channel`) belongs to: the bot's thread
/// table knows its own threads; other channels are asked once and kept.
pub(super) async fn guild_of(surface: &Surface, conversation: &str, channel: u64) -> Option<u64> {
    if let Ok(Some(guild)) = surface.threads.guild_of(conversation).await {
        return Some(guild);
    }
    let id = surface
        .name(format!("guild-of:{channel}"), async {
            let read = surface.rest.channel(channel).await.ok()?;
            // Direct messages have none; kept as such.
            Some(
                super::inbound::snowflake(&read["guild_id"])
                    .map_or(String::new(), |g| g.to_string()),
            )
        })
        .await;
    id.parse().ok()
}

/// The caps of `guild` (or of direct messages).
async fn caps(surface: &Surface, guild: Option<u64>) -> Result<Caps, StoreError> {
    let set = match guild {
        Some(guild) => surface.threads.guild_budget(guild).await?,
        None => GuildBudget::default(),
    };
    Ok(Caps {
        daily: set.daily.or(surface.config.budget_user_daily),
        monthly: guild.and(set.monthly.or(surface.config.budget_guild_monthly)),
    })
}

/// Whether the bot has any cap at all (else nothing is read).
fn any_caps(surface: &Surface) -> bool {
    surface.config.budget_user_daily.is_some() || surface.config.budget_guild_monthly.is_some()
}

/// What the turns of `guild` spent this month.
async fn guild_spent(surface: &Surface, guild: u64, periods: &Periods) -> Result<f64, StoreError> {
    Ok(surface
        .threads
        .guild_usage_since(guild, periods.month)
        .await?
        .cost)
}

/// What the turns of `user` spent today.
async fn user_spent(surface: &Surface, user: u64, periods: &Periods) -> Result<f64, StoreError> {
    surface.threads.user_spent_since(user, periods.day).await
}

/// Why a turn of `spender` may not start now, when a cap is spent.
pub(super) async fn refusal(
    surface: &Surface,
    spender: Spender,
) -> Result<Option<String>, StoreError> {
    if !any_caps(surface) && spender.guild.is_none() {
        return Ok(None);
    }
    let caps = caps(surface, spender.guild).await?;
    if caps.daily.is_none() && caps.monthly.is_none() {
        return Ok(None);
    }
    let now = Timestamp::now();
    let periods = Periods::at(now);
    let raise = match spender.guild {
        Some(_) => "an admin of this server can raise it with /budget",
        None => "the bot's owner can raise it (BUDGET_USER_DAILY)",
    };
    if let (Some(cap), Some(guild)) = (caps.monthly, spender.guild) {
        let spent = guild_spent(surface, guild, &periods).await?;
        if spent >= cap {
            return Ok(Some(format!(
                "⛔ This server's monthly budget of {} is spent ({} this month), so this message is not answered. It resets on {} UTC ({}); {raise}.",
                money(cap),
                money(spent),
                when(periods.next_month),
                until(now, periods.next_month),
            )));
        }
    }
    if let Some(cap) = caps.daily {
        let spent = user_spent(surface, spender.user, &periods).await?;
        if spent >= cap {
            return Ok(Some(format!(
                "⛔ <@{}>, your daily budget of {} is spent ({} today), so this message is not answered. It resets at 00:00 UTC ({}); {raise}.",
                spender.user,
                money(cap),
                money(spent),
                until(now, periods.next_day),
            )));
        }
    }
    Ok(None)
}

/// What is left of each cap for `spender`, one line each (`/usage`).
pub(super) async fn left(surface: &Surface, spender: Spender) -> Result<Vec<String>, StoreError> {
    let caps = caps(surface, spender.guild).await?;
    let now = Timestamp::now();
    let periods = Periods::at(now);
    let mut lines = Vec::new();
    if let Some(cap) = caps.daily {
        let spent = user_spent(surface, spender.user, &periods).await?;
        lines.push(format!(
            "Your budget today: {} of {} left (resets at 00:00 UTC, {}).",
            money((cap - spent).max(0.0)),
            money(cap),
            until(now, periods.next_day)
        ));
    }
    if let (Some(cap), Some(guild)) = (caps.monthly, spender.guild) {
        let spent = guild_spent(surface, guild, &periods).await?;
        lines.push(format!(
            "This server's budget this month: {} of {} left (resets on {} UTC).",
            money((cap - spent).max(0.0)),
            money(cap),
            when(periods.next_month)
        ));
    }
    Ok(lines)
}

/// A change `/budget` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Change {
    pub monthly: Option<f64>,
    pub daily: Option<f64>,
    /// Back to the bot's defaults.
    pub reset: bool,
}

/// `/budget` in `guild`: shows the caps, or (for admins) changes them.
pub(super) async fn command(
    surface: &Surface,
    guild: Option<u64>,
    user: u64,
    admin: bool,
    change: Change,
) -> anyhow::Result<String> {
    let Some(guild) = guild else {
        anyhow::bail!("Budgets are set per server: use /budget in one of its channels.");
    };
    if change != Change::default() {
        if !admin {
            anyhow::bail!("Only admins (or people with Manage Threads) can change the budgets.");
        }
        for amount in [change.monthly, change.daily].into_iter().flatten() {
            if !amount.is_finite() || amount < 0.0 {
                anyhow::bail!("A budget is an amount in dollars, 0 or more.");
            }
        }
        let mut set = if change.reset {
            GuildBudget::default()
        } else {
            surface.threads.guild_budget(guild).await?
        };
        set.monthly = change.monthly.or(set.monthly);
        set.daily = change.daily.or(set.daily);
        surface.threads.set_guild_budget(guild, &set).await?;
    }
    let caps = caps(surface, Some(guild)).await?;
    let describe = |cap: Option<f64>| cap.map_or("none".to_owned(), money);
    let mut text = format!(
        "This server's budgets: {} a month for the server, {} a day for each person.",
        describe(caps.monthly),
        describe(caps.daily)
    );
    for line in left(
        surface,
        Spender {
            guild: Some(guild),
            user,
        },
    )
    .await?
    {
        text.push('\n');
        text.push_str(&line);
    }
    Ok(text)
}

/// Dollars in cents when that is exact (`$2.50`), else to a hundredth of
/// a cent (`$4.9970`): a sum of small costs is never rounded up to a cap.
fn money(dollars: f64) -> String {
    let cents = dollars * 100.0;
    if (cents - cents.round()).abs() < 1e-6 {
        format!("${dollars:.2}")
    } else {
        format!("${dollars:.4}")
    }
}

/// `at` (Unix seconds) as `2027-01-01 00:00`.
fn when(at: i64) -> String {
    Timestamp::from_second(at)
        .map(|t| {
            t.to_zoned(TimeZone::UTC)
                .strftime("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_default()
}

/// How long from `now` until `at`, as `in 3 h 12 min`.
fn until(now: Timestamp, at: i64) -> String {
    let minutes = ((at - now.as_second()).max(0) + 59) / 60;
    match (minutes / (24 * 60), minutes / 60 % 24, minutes % 60) {
        (0, 0, m) => format!("in {m} min"),
        (0, h, m) => format!("in {h} h {m} min"),
        (d, h, _) => format!("in {d} d {h} h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        let now: Timestamp = "2026-12-31T22:30:00Z".parse().unwrap();
        let periods = Periods::at(now);
        assert_eq!(when(periods.day), "2026-12-31 00:00");
        assert_eq!(when(periods.next_day), "2027-01-01 00:00");
        assert_eq!(when(periods.month), "2026-12-01 00:00");
        assert_eq!(when(periods.next_month), "2027-01-01 00:00");
        assert_eq!(until(now, periods.next_day), "in 1 h 30 min");
        let february: Timestamp = "2028-02-10T00:00:00Z".parse().unwrap();
        assert_eq!(when(Periods::at(february).next_month), "2028-03-01 00:00");
        assert_eq!(
            until(february, Periods::at(february).next_month),
            "in 20 d 0 h"
        );
        assert_eq!(money(2.5), "$2.50");
        assert_eq!(money(0.0012), "$0.0012");
        assert_eq!(money(5.0 - 0.003), "$4.9970");
    }
}
