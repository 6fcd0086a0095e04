//! One quota group's books: the requests and tokens of a (pool, project, model) in the provider's
//! sliding window and in the current day, and its cooldown.
//!
//! The provider counts a request when it arrives, which we only know lies between the grant and
//! the end of its lease. So a reservation occupies the window from its grant until one window
//! length (plus a safety margin) after its lease ends. Take any provider window and the request in
//! it granted last: every other request in that window was granted earlier and ended at or after
//! the window's start, so it was still on the books at that grant, and that grant fit the limit.

use super::calendar::{DailyReset, Time};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Limits of one model in one project; `None` is not limited. Laid out in a setup as rules 3
/// did, tokens per day apart (see [`super::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    into = "super::layout::LimitsLayout",
    from = "super::layout::LimitsLayout"
)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    /// Input tokens per day (Gemini keeps it for some models, such as free-tier previews).
    pub tokens_per_day: Option<u64>,
    /// Which were configured `auto`, by [`super::learning::LimitKind`] order: their figure is a
    /// ceiling until the provider names the real one.
    pub auto: [bool; 4],
}

/// Why a group is resting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CooldownReason {
    RateLimited,
    DailyQuotaExhausted,
    /// The model had no capacity for anyone: every project of the pool rests it.
    ModelCapacity,
    /// Most projects of the pool were refused at once: the provider's trouble, not their quota.
    ProviderOutage,
}

impl CooldownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate limited",
            Self::DailyQuotaExhausted => "daily quota exhausted",
            Self::ModelCapacity => "model capacity",
            Self::ProviderOutage => "provider outage",
        }
    }
}

/// A rest, until a steady time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    pub until_ms: u64,
    pub reason: CooldownReason,
}

/// Requests and tokens of ended leases, kept on the books until `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Settled {
    /// Steady time at which the entry leaves the window.
    until_ms: u64,
    /// Wall time at which the lease ended, plus the safety margin: the latest its requests
    /// could have arrived, for the day they count against.
    ended_wall_ms: u64,
    requests: u64,
    tokens: u64,
}

/// What a group could take now, for choosing among keys: the smallest fraction left of any limit.
pub type Headroom = f64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaGroup {
    /// Set again from the configuration and what was learned whenever the books are restored,
    /// so kept as figures only (as the first state format did).
    #[serde(with = "figures_only")]
    pub limits: Limits,
    /// Requests reserved by live leases.
    live_requests: u64,
    /// Tokens reserved by live leases (estimates).
    live_tokens: u64,
    /// Ended leases still on the books, oldest first (`until_ms` never decreases).
    settled: VecDeque<Settled>,
    settled_requests: u64,
    settled_tokens: u64,
    /// The local day `day_requests` counts; never goes back, so a wall clock stepped back over
    /// midnight cannot start the same day twice.
    day: i64,
    /// Wall time of the first reset after the day `day_requests` counts: the time zone is only
    /// consulted when the day turns, not on every grant.
    day_ends_ms: u64,
    /// Requests counted against the current day.
    day_requests: u64,
    /// Tokens counted against the current day: live leases' estimates, ended leases' actuals.
    day_tokens: u64,
    cooldown: Option<Cooldown>,
    /// The cooldown ends when the day turns, wherever the wall clock is stepped meanwhile.
    rest_until_day_turns: bool,
}

// Sums saturate: every figure that reaches the books is bounded (requests by the lease maximum,
// tokens by `keylease_core::MAX_INPUT_TOKENS`), so no real sum comes near `u64::MAX`, and one that
// did would block rather than wrap round to admit.
impl QuotaGroup {
    /// A group with nothing on the books, at `time`.
    pub fn new(limits: Limits, time: Time, daily: DailyReset) -> Self {
        Self {
            limits,
            live_requests: 0,
            live_tokens: 0,
            settled: VecDeque::new(),
            settled_requests: 0,
            settled_tokens: 0,
            day: daily.day_of(time.wall_ms),
            day_ends_ms: daily.next_reset_after(time.wall_ms),
            day_requests: 0,
            day_tokens: 0,
            cooldown: None,
            rest_until_day_turns: false,
        }
    }

    /// Brings the books to `time`: forgets what left the window and starts a new day.
    pub fn advance(&mut self, time: Time, daily: DailyReset) {
        if time.wall_ms >= self.day_ends_ms {
            let day = daily.day_of(time.wall_ms);
            if day > self.day {
                // Live leases and leases that ended after midnight may send (or have sent)
                // their requests in the new day: they count against it too.
                let day_start = daily.start_of_day_at(time.wall_ms);
                let (recent_requests, recent_tokens) = self
                    .settled
                    .iter()
                    .filter(|s| s.ended_wall_ms >= day_start)
                    .fold((0u64, 0u64), |(requests, tokens), s| {
                        (
                            requests.saturating_add(s.requests),
                            tokens.saturating_add(s.tokens),
                        )
                    });
                self.day = day;
                self.day_requests = self.live_requests.saturating_add(recent_requests);
                self.day_tokens = self.live_tokens.saturating_add(recent_tokens);
                if self.rest_until_day_turns {
                    self.cooldown = None;
                    self.rest_until_day_turns = false;
                }
            }
            self.day_ends_ms = daily.next_reset_after(time.wall_ms);
        }
        while let Some(front) = self.settled.front() {
            if front.until_ms > time.steady_ms {
                break;
            }
            self.settled_requests = self.settled_requests.saturating_sub(front.requests);
            self.settled_tokens = self.settled_tokens.saturating_sub(front.tokens);
            self.settled.pop_front();
        }
        match &mut self.cooldown {
            // The rest follows the calendar: where the wall clock was stepped, so is its end.
            Some(cooldown) if self.rest_until_day_turns => {
                cooldown.until_ms = time.steady_at(self.day_ends_ms);
            }
            Some(cooldown) if cooldown.until_ms <= time.steady_ms => self.cooldown = None,
            _ => {}
        }
    }

    pub fn requests_in_window(&self) -> u64 {
        self.live_requests.saturating_add(self.settled_requests)
    }

    pub fn tokens_in_window(&self) -> u64 {
        self.live_tokens.saturating_add(self.settled_tokens)
    }

    pub fn requests_today(&self) -> u64 {
        self.day_requests
    }

    pub fn tokens_today(&self) -> u64 {
        self.day_tokens
    }

    pub fn cooldown(&self) -> Option<Cooldown> {
        self.cooldown
    }

    /// Whether it rests (a cooldown, or until the day turns).
    pub fn is_resting(&self) -> bool {
        self.cooldown.is_some() || self.rest_until_day_turns
    }

    /// When its latest request leaves the window, if one is on the books; a live lease's
    /// count as there for ever.
    pub fn last_on_books_ms(&self) -> Option<u64> {
        if self.live_requests > 0 {
            return Some(u64::MAX);
        }
        self.settled.back().map(|settled| settled.until_ms)
    }

    /// Whether `requests` and `tokens` more fit every limit (cooldowns aside).
    pub fn can_afford(&self, requests: u64, tokens: u64) -> bool {
        fits(
            self.requests_in_window(),
            requests,
            self.limits.requests_per_minute,
        ) && fits(
            self.tokens_in_window(),
            tokens,
            self.limits.tokens_per_minute,
        ) && fits(self.day_requests, requests, self.limits.requests_per_day)
            && fits(self.day_tokens, tokens, self.limits.tokens_per_day)
    }

    /// The smallest fraction left of any limit, in [0, 1].
    pub fn headroom(&self) -> Headroom {
        [
            fraction_left(self.requests_in_window(), self.limits.requests_per_minute),
            fraction_left(self.tokens_in_window(), self.limits.tokens_per_minute),
            fraction_left(self.day_requests, self.limits.requests_per_day),
            fraction_left(self.day_tokens, self.limits.tokens_per_day),
        ]
        .into_iter()
        .fold(1.0, f64::min)
    }

    pub fn reserve(&mut self, requests: u64, tokens: u64) {
        self.live_requests = self.live_requests.saturating_add(requests);
        self.live_tokens = self.live_tokens.saturating_add(tokens);
        self.day_requests = self.day_requests.saturating_add(requests);
        self.day_tokens = self.day_tokens.saturating_add(tokens);
    }

    /// A lease that reserved `reserved` ended at `time` having used `used`: unsent requests are
    /// refunded and the estimate replaced by the actual count, and what was used stays on the
    /// books until one window plus the margin after `time`.
    pub fn settle(&mut self, time: Time, books: BookKeeping, reserved: Amount, used: Amount) {
        self.live_requests = self.live_requests.saturating_sub(reserved.requests);
        self.live_tokens = self.live_tokens.saturating_sub(reserved.tokens);
        self.day_requests = self
            .day_requests
            .saturating_add(used.requests)
            .saturating_sub(reserved.requests);
        self.day_tokens = self
            .day_tokens
            .saturating_add(used.tokens)
            .saturating_sub(reserved.tokens);
        if used.requests == 0 && used.tokens == 0 {
            return;
        }
        self.settled.push_back(Settled {
            until_ms: time
                .steady_ms
                .saturating_add(books.window_ms)
                .saturating_add(books.safety_margin_ms),
            ended_wall_ms: time.wall_ms.saturating_add(books.safety_margin_ms),
            requests: used.requests,
            tokens: used.tokens,
        });
        self.settled_requests = self.settled_requests.saturating_add(used.requests);
        self.settled_tokens = self.settled_tokens.saturating_add(used.tokens);
    }

    /// Rests the group until steady time `until_ms`; a shorter rest never shortens a longer one.
    pub fn cool_down(&mut self, until_ms: u64, reason: CooldownReason) -> Cooldown {
        match self.cooldown {
            Some(current) if current.until_ms >= until_ms => current,
            _ => {
                let cooldown = Cooldown { until_ms, reason };
                self.cooldown = Some(cooldown);
                self.rest_until_day_turns = false;
                cooldown
            }
        }
    }

    /// Ends any cooldown or rest now.
    pub fn end_cooldown(&mut self) {
        self.cooldown = None;
        self.rest_until_day_turns = false;
    }

    /// Rests the group until its day turns (the books must be advanced to `time`).
    pub fn rest_for_the_day(&mut self, time: Time) -> Cooldown {
        let cooldown = self.cool_down(
            time.steady_at(self.day_ends_ms),
            CooldownReason::DailyQuotaExhausted,
        );
        if cooldown.reason == CooldownReason::DailyQuotaExhausted {
            self.rest_until_day_turns = true;
        }
        cooldown
    }

    /// The earliest steady time at which `requests` and `tokens` might fit without any live
    /// lease ending: `None` when only ending leases can make room.
    pub fn affordable_at(&self, time: Time, requests: u64, tokens: u64) -> Option<u64> {
        let mut at = time.steady_ms;
        if let Some(cooldown) = self.cooldown {
            at = at.max(cooldown.until_ms);
        }
        let day_full = !fits(self.day_requests, requests, self.limits.requests_per_day)
            || !fits(self.day_tokens, tokens, self.limits.tokens_per_day);
        if day_full {
            // Tomorrow starts with the live leases' reservations only (an upper bound on the
            // wait).
            if !fits(self.live_requests, requests, self.limits.requests_per_day)
                || !fits(self.live_tokens, tokens, self.limits.tokens_per_day)
            {
                return None;
            }
            at = at.max(time.steady_at(self.day_ends_ms));
        }
        let mut window_requests = self.requests_in_window().saturating_add(requests);
        let mut window_tokens = self.tokens_in_window().saturating_add(tokens);
        let mut settled = self.settled.iter();
        while !fits(window_requests, 0, self.limits.requests_per_minute)
            || !fits(window_tokens, 0, self.limits.tokens_per_minute)
        {
            let next = settled.next()?;
            window_requests = window_requests.saturating_sub(next.requests);
            window_tokens = window_tokens.saturating_sub(next.tokens);
            at = at.max(next.until_ms);
        }
        Some(at)
    }

    /// The next steady time the books change by themselves: a cooldown ends, a settled entry
    /// leaves the window, or the day turns while something is spent.
    pub fn next_change_after(&self, time: Time) -> Option<u64> {
        let now_ms = time.steady_ms;
        let mut next: Option<u64> = None;
        let mut consider = |at: u64| {
            if at > now_ms {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        if let Some(cooldown) = self.cooldown {
            consider(cooldown.until_ms);
        }
        if let Some(front) = self.settled.front() {
            consider(front.until_ms);
        }
        if (self.limits.requests_per_day.is_some() && self.day_requests > 0)
            || (self.limits.tokens_per_day.is_some() && self.day_tokens > 0)
        {
            consider(time.steady_at(self.day_ends_ms));
        }
        next
    }

    /// Whether nothing is on the books and no cooldown runs: such a group can be forgotten.
    pub fn is_idle(&self) -> bool {
        self.live_requests == 0
            && self.live_tokens == 0
            && self.settled.is_empty()
            && self.day_requests == 0
            && self.day_tokens == 0
            && self.cooldown.is_none()
    }
}

/// [`Limits`] as their four figures.
mod figures_only {
    use super::Limits;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    type Figures = (Option<u64>, Option<u64>, Option<u64>, Option<u64>);

    pub fn serialize<S: Serializer>(limits: &Limits, serializer: S) -> Result<S::Ok, S::Error> {
        let figures: Figures = (
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.requests_per_day,
            limits.tokens_per_day,
        );
        figures.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Limits, D::Error> {
        let (requests_per_minute, tokens_per_minute, requests_per_day, tokens_per_day) =
            Figures::deserialize(deserializer)?;
        Ok(Limits {
            requests_per_minute,
            tokens_per_minute,
            requests_per_day,
            tokens_per_day,
            auto: [false; 4],
        })
    }
}

/// The books as snapshots kept them before tokens per day (state formats of rules 1 to 3):
/// three figures, no tokens counted against the day. Frozen: read by `store::v1` and `store::v3`.
pub mod before_tokens_per_day {
    use super::{Cooldown, Limits, QuotaGroup, Settled};
    use serde::Deserialize;
    use std::collections::VecDeque;

    #[derive(Debug, Clone, Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub struct QuotaGroupV3 {
        limits: (Option<u64>, Option<u64>, Option<u64>),
        live_requests: u64,
        live_tokens: u64,
        settled: VecDeque<Settled>,
        settled_requests: u64,
        settled_tokens: u64,
        day: i64,
        day_ends_ms: u64,
        day_requests: u64,
        cooldown: Option<Cooldown>,
        rest_until_day_turns: bool,
    }

    impl From<QuotaGroupV3> for QuotaGroup {
        /// Their limits are set again from the setup on restore; the day's tokens were not
        /// counted, so the day starts them at nought.
        fn from(v3: QuotaGroupV3) -> Self {
            let (requests_per_minute, tokens_per_minute, requests_per_day) = v3.limits;
            Self {
                limits: Limits {
                    requests_per_minute,
                    tokens_per_minute,
                    requests_per_day,
                    ..Limits::default()
                },
                live_requests: v3.live_requests,
                live_tokens: v3.live_tokens,
                settled: v3.settled,
                settled_requests: v3.settled_requests,
                settled_tokens: v3.settled_tokens,
                day: v3.day,
                day_ends_ms: v3.day_ends_ms,
                day_requests: v3.day_requests,
                day_tokens: 0,
                cooldown: v3.cooldown,
                rest_until_day_turns: v3.rest_until_day_turns,
            }
        }
    }

    /// The bytes an older build wrote for `books` (tests only: they write old snapshots).
    #[cfg(test)]
    impl From<QuotaGroup> for QuotaGroupV3 {
        fn from(books: QuotaGroup) -> Self {
            let l = books.limits;
            Self {
                limits: (
                    l.requests_per_minute,
                    l.tokens_per_minute,
                    l.requests_per_day,
                ),
                live_requests: books.live_requests,
                live_tokens: books.live_tokens,
                settled: books.settled,
                settled_requests: books.settled_requests,
                settled_tokens: books.settled_tokens,
                day: books.day,
                day_ends_ms: books.day_ends_ms,
                day_requests: books.day_requests,
                cooldown: books.cooldown,
                rest_until_day_turns: books.rest_until_day_turns,
            }
        }
    }
}

/// Requests and tokens, reserved or used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Amount {
    pub requests: u64,
    pub tokens: u64,
}

/// How long what was used stays on the books after a lease ends.
#[derive(Debug, Clone, Copy)]
pub struct BookKeeping {
    /// The provider's sliding window.
    pub window_ms: u64,
    /// Added to it, for clocks that disagree and requests in flight.
    pub safety_margin_ms: u64,
}

/// Whether `used` plus `more` stays within `limit`.
fn fits(used: u64, more: u64, limit: Option<u64>) -> bool {
    limit.is_none_or(|limit| used.checked_add(more).is_some_and(|sum| sum <= limit))
}

fn fraction_left(used: u64, limit: Option<u64>) -> f64 {
    match limit {
        Some(limit) if limit > 0 => 1.0 - (used.min(limit) as f64 / limit as f64),
        Some(_) => 0.0,
        None => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 60_000;
    const MARGIN: u64 = 1_000;
    const BOOKS: BookKeeping = BookKeeping {
        window_ms: WINDOW,
        safety_margin_ms: MARGIN,
    };
    /// 2026-03-08 06:00 UTC: 22:00 PST on the eve of the spring-forward day.
    const EVENING_BEFORE_DST: u64 = 1_772_949_600_000;
    const HOUR: u64 = 3_600_000;

    fn daily() -> DailyReset {
        DailyReset {
            zone: chrono_tz::America::Los_Angeles,
        }
    }

    fn at(ms: u64) -> Time {
        Time::at(ms)
    }

    fn amount(requests: u64, tokens: u64) -> Amount {
        Amount { requests, tokens }
    }

    fn group(rpm: u64, rpd: u64) -> QuotaGroup {
        let limits = Limits {
            requests_per_minute: Some(rpm),
            tokens_per_minute: Some(1_000),
            requests_per_day: Some(rpd),
            tokens_per_day: None,
            auto: [false; 4],
        };
        QuotaGroup::new(limits, at(EVENING_BEFORE_DST), daily())
    }

    #[test]
    fn reservation_blocks_until_a_window_after_the_lease_ends() {
        let mut g = group(2, 100);
        let t = EVENING_BEFORE_DST;
        g.reserve(2, 0);
        assert!(!g.can_afford(1, 0));
        g.settle(at(t + 5_000), BOOKS, amount(2, 0), amount(2, 0));
        g.advance(at(t + 5_000 + WINDOW + MARGIN - 1), daily());
        assert!(!g.can_afford(1, 0));
        g.advance(at(t + 5_000 + WINDOW + MARGIN), daily());
        assert!(g.can_afford(2, 0));
    }

    #[test]
    fn unsent_requests_are_refunded_and_estimates_replaced() {
        let mut g = group(10, 100);
        g.reserve(5, 800);
        g.settle(
            at(EVENING_BEFORE_DST),
            BOOKS,
            amount(5, 800),
            amount(1, 100),
        );
        assert_eq!(g.requests_in_window(), 1);
        assert_eq!(g.tokens_in_window(), 100);
        assert_eq!(g.requests_today(), 1);
    }

    #[test]
    fn a_lease_spanning_midnight_counts_against_both_days() {
        let mut g = group(10, 3);
        let t = EVENING_BEFORE_DST;
        g.reserve(2, 0);
        g.advance(at(daily().next_reset_after(t) + 1), daily());
        assert_eq!(g.requests_today(), 2);
        assert!(!g.can_afford(2, 0));
    }

    #[test]
    fn a_shorter_cooldown_never_shortens_a_longer_one() {
        let mut g = group(10, 100);
        g.cool_down(5_000, CooldownReason::DailyQuotaExhausted);
        let kept = g.cool_down(2_000, CooldownReason::RateLimited);
        assert_eq!(kept.until_ms, 5_000);
        assert_eq!(kept.reason, CooldownReason::DailyQuotaExhausted);
    }

    #[test]
    fn affordable_at_names_when_settled_requests_leave_the_window() {
        let mut g = group(2, 100);
        let t = EVENING_BEFORE_DST;
        g.reserve(2, 0);
        g.settle(at(t), BOOKS, amount(2, 0), amount(2, 0));
        assert_eq!(g.affordable_at(at(t), 1, 0), Some(t + WINDOW + MARGIN));
        g.reserve(2, 0);
        // Two live requests fill the window whatever settles: only a release makes room.
        assert_eq!(g.affordable_at(at(t), 1, 0), None);
    }

    #[test]
    fn sums_near_the_top_of_u64_never_wrap_into_admitting() {
        let mut g = group(10, 100);
        g.reserve(0, u64::MAX - 5);
        g.reserve(0, 10);
        assert_eq!(g.tokens_in_window(), u64::MAX);
        assert!(!g.can_afford(0, 0) && !g.can_afford(0, 1));
        assert_eq!(g.affordable_at(at(EVENING_BEFORE_DST), 0, 1), None);
        g.settle(
            at(EVENING_BEFORE_DST),
            BOOKS,
            amount(0, u64::MAX),
            amount(u64::MAX, u64::MAX),
        );
        assert!(!g.can_afford(1, 0));
    }

    #[test]
    fn a_daily_rest_follows_a_stepped_wall_clock_and_windows_do_not() {
        let mut g = group(1, 100);
        let t = EVENING_BEFORE_DST;
        let midnight = daily().next_reset_after(t);
        g.reserve(1, 0);
        g.settle(at(t), BOOKS, amount(1, 0), amount(1, 0));
        g.rest_for_the_day(at(t));
        assert_eq!(g.cooldown().unwrap().until_ms, midnight);
        // The wall clock is stepped 90 minutes ahead while the steady clock moves one second:
        // the rest ends 90 minutes sooner in steady time, the window entry is still there.
        let stepped = Time::new(t + 90 * 60_000 + 1_000, t + 1_000);
        g.advance(stepped, daily());
        assert_eq!(g.cooldown().unwrap().until_ms, midnight - 90 * 60_000);
        assert!(!g.can_afford(1, 0));
        // Past midnight on the wall clock the day turns and the rest is over, at once.
        let after = Time::new(midnight + 1, t + 2 * HOUR);
        g.advance(after, daily());
        assert_eq!(g.cooldown(), None);
        assert_eq!(g.requests_today(), 0);
    }

    #[test]
    fn a_wall_clock_stepped_back_over_midnight_does_not_start_the_day_again() {
        let mut g = group(10, 3);
        let t = EVENING_BEFORE_DST;
        let midnight = daily().next_reset_after(t);
        g.advance(at(midnight + 1_000), daily());
        g.reserve(3, 0);
        // Stepped back into yesterday evening, then forward past the same midnight once more.
        g.advance(Time::new(midnight - 30 * 60_000, midnight + 2_000), daily());
        g.advance(Time::new(midnight + 5_000, midnight + 40 * 60_000), daily());
        assert_eq!(g.requests_today(), 3);
    }
}
