//! One quota group's books: the requests and tokens of a (pool, project, model) in the provider's
//! sliding window and in the current day, and its cooldown.
//!
//! The provider counts a request when it arrives, which we only know lies between the grant and
//! the end of its lease. So a reservation occupies the window from its grant until one window
//! length (plus a safety margin) after its lease ends. Take any provider window and the request in
//! it granted last: every other request in that window was granted earlier and ended at or after
//! the window's start, so it was still on the books at that grant, and that grant fit the limit.

use chrono::{Datelike, NaiveTime, TimeZone};
use chrono_tz::Tz;
use std::collections::VecDeque;

/// Limits of one model in one project; `None` is not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
}

/// Why a group is resting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CooldownReason {
    RateLimited,
    DailyQuotaExhausted,
}

impl CooldownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate limited",
            Self::DailyQuotaExhausted => "daily quota exhausted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    pub until_ms: u64,
    pub reason: CooldownReason,
}

/// Requests and tokens of ended leases, kept on the books until `until_ms`.
#[derive(Debug, Clone, Copy)]
struct Settled {
    until_ms: u64,
    /// When the lease ended plus the safety margin: the latest its requests could have arrived.
    ended_ms: u64,
    requests: u64,
    tokens: u64,
}

/// How the day is cut: the daily counts reset at midnight in this zone.
#[derive(Debug, Clone, Copy)]
pub struct DailyReset {
    pub zone: Tz,
}

impl DailyReset {
    /// The local calendar day of `at_ms`, as a day number.
    pub fn day_of(&self, at_ms: u64) -> i64 {
        let local = self.zone.timestamp_millis_opt(at_ms as i64).unwrap();
        i64::from(local.date_naive().num_days_from_ce())
    }

    /// The first local midnight after `at_ms`, in milliseconds.
    pub fn next_reset_after(&self, at_ms: u64) -> u64 {
        self.start_of_day(self.day_of(at_ms) + 1)
    }

    /// The last local midnight at or before `at_ms`, in milliseconds.
    fn last_reset_at_or_before(&self, at_ms: u64) -> u64 {
        self.start_of_day(self.day_of(at_ms))
    }

    fn start_of_day(&self, day: i64) -> u64 {
        let date = chrono::NaiveDate::from_num_days_from_ce_opt(day as i32).expect("day in range");
        let midnight = date.and_time(NaiveTime::MIN);
        // Midnight exists in every zone we know of; fall back to UTC midnight should a zone skip it.
        match self.zone.from_local_datetime(&midnight).earliest() {
            Some(local) => local.timestamp_millis() as u64,
            None => midnight.and_utc().timestamp_millis() as u64,
        }
    }
}

/// What a group could take now, for choosing among keys: the smallest fraction left of any limit.
pub type Headroom = f64;

#[derive(Debug, Clone)]
pub struct QuotaGroup {
    pub limits: Limits,
    /// Requests reserved by live leases.
    live_requests: u64,
    /// Tokens reserved by live leases (estimates).
    live_tokens: u64,
    /// Ended leases still on the books, oldest first (`until_ms` never decreases).
    settled: VecDeque<Settled>,
    settled_requests: u64,
    settled_tokens: u64,
    /// The first midnight after the day `day_requests` counts: the time zone is only consulted
    /// when the day turns, not on every grant.
    day_ends_ms: u64,
    /// Requests counted against the current day.
    day_requests: u64,
    pub cooldown: Option<Cooldown>,
}

impl QuotaGroup {
    /// A group with nothing on the books, at `now_ms`.
    pub fn new(limits: Limits, now_ms: u64, daily: DailyReset) -> Self {
        Self {
            limits,
            live_requests: 0,
            live_tokens: 0,
            settled: VecDeque::new(),
            settled_requests: 0,
            settled_tokens: 0,
            day_ends_ms: daily.next_reset_after(now_ms),
            day_requests: 0,
            cooldown: None,
        }
    }

    /// Brings the books to `now_ms`: forgets what left the window and starts a new day.
    pub fn advance(&mut self, now_ms: u64, daily: DailyReset) {
        if now_ms >= self.day_ends_ms {
            // Live leases and leases that ended after midnight may send (or have sent) their
            // requests in the new day: they count against it too.
            let day_start = daily.last_reset_at_or_before(now_ms);
            let recent: u64 = self
                .settled
                .iter()
                .filter(|s| s.ended_ms >= day_start)
                .map(|s| s.requests)
                .sum();
            self.day_ends_ms = daily.next_reset_after(now_ms);
            self.day_requests = self.live_requests + recent;
        }
        while let Some(front) = self.settled.front() {
            if front.until_ms > now_ms {
                break;
            }
            self.settled_requests -= front.requests;
            self.settled_tokens -= front.tokens;
            self.settled.pop_front();
        }
        if self.cooldown.is_some_and(|c| c.until_ms <= now_ms) {
            self.cooldown = None;
        }
    }

    pub fn requests_in_window(&self) -> u64 {
        self.live_requests + self.settled_requests
    }

    pub fn tokens_in_window(&self) -> u64 {
        self.live_tokens + self.settled_tokens
    }

    pub fn requests_today(&self) -> u64 {
        self.day_requests
    }

    /// Whether `requests` and `tokens` more fit every limit (cooldowns aside).
    pub fn can_afford(&self, requests: u64, tokens: u64) -> bool {
        fits(
            self.requests_in_window() + requests,
            self.limits.requests_per_minute,
        ) && fits(
            self.tokens_in_window() + tokens,
            self.limits.tokens_per_minute,
        ) && fits(self.day_requests + requests, self.limits.requests_per_day)
    }

    /// The smallest fraction left of any limit, in [0, 1].
    pub fn headroom(&self) -> Headroom {
        [
            fraction_left(self.requests_in_window(), self.limits.requests_per_minute),
            fraction_left(self.tokens_in_window(), self.limits.tokens_per_minute),
            fraction_left(self.day_requests, self.limits.requests_per_day),
        ]
        .into_iter()
        .fold(1.0, f64::min)
    }

    pub fn reserve(&mut self, requests: u64, tokens: u64) {
        self.live_requests += requests;
        self.live_tokens += tokens;
        self.day_requests += requests;
    }

    /// A lease that reserved `reserved_*` ended at `now_ms` having sent `sent_requests` and used
    /// `used_tokens`: unsent requests are refunded and the estimate replaced by the actual count,
    /// and what was used stays on the books until one window after `now_ms` plus `margin_ms`.
    #[allow(clippy::too_many_arguments)]
    pub fn settle(
        &mut self,
        now_ms: u64,
        window_ms: u64,
        margin_ms: u64,
        reserved_requests: u64,
        reserved_tokens: u64,
        sent_requests: u64,
        used_tokens: u64,
    ) {
        self.live_requests -= reserved_requests;
        self.live_tokens -= reserved_tokens;
        self.day_requests = (self.day_requests + sent_requests).saturating_sub(reserved_requests);
        if sent_requests == 0 && used_tokens == 0 {
            return;
        }
        self.settled.push_back(Settled {
            until_ms: now_ms + window_ms + margin_ms,
            ended_ms: now_ms + margin_ms,
            requests: sent_requests,
            tokens: used_tokens,
        });
        self.settled_requests += sent_requests;
        self.settled_tokens += used_tokens;
    }

    /// Rests the group until `until_ms`; a shorter rest never shortens a longer one.
    pub fn cool_down(&mut self, until_ms: u64, reason: CooldownReason) -> Cooldown {
        match self.cooldown {
            Some(current) if current.until_ms >= until_ms => current,
            _ => {
                let cooldown = Cooldown { until_ms, reason };
                self.cooldown = Some(cooldown);
                cooldown
            }
        }
    }

    /// The earliest time after `now_ms` at which `requests` and `tokens` might fit without any
    /// live lease ending: `None` when only ending leases can make room.
    pub fn affordable_at(
        &self,
        now_ms: u64,
        requests: u64,
        tokens: u64,
        daily: DailyReset,
    ) -> Option<u64> {
        let mut at = now_ms;
        if let Some(cooldown) = self.cooldown {
            at = at.max(cooldown.until_ms);
        }
        if !fits(self.day_requests + requests, self.limits.requests_per_day) {
            // Tomorrow starts with the live leases' requests only (an upper bound on the wait).
            if !fits(self.live_requests + requests, self.limits.requests_per_day) {
                return None;
            }
            at = at.max(daily.next_reset_after(now_ms));
        }
        let mut window_requests = self.requests_in_window() + requests;
        let mut window_tokens = self.tokens_in_window() + tokens;
        let mut settled = self.settled.iter();
        while !fits(window_requests, self.limits.requests_per_minute)
            || !fits(window_tokens, self.limits.tokens_per_minute)
        {
            let next = settled.next()?;
            window_requests -= next.requests;
            window_tokens -= next.tokens;
            at = at.max(next.until_ms);
        }
        Some(at)
    }

    /// The next time the books change by themselves: a cooldown ends, a settled entry leaves the
    /// window, or the day turns while something is spent.
    pub fn next_change_after(&self, now_ms: u64) -> Option<u64> {
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
        if self.limits.requests_per_day.is_some() && self.day_requests > 0 {
            consider(self.day_ends_ms);
        }
        next
    }

    /// Whether nothing is on the books and no cooldown runs: such a group can be forgotten.
    pub fn is_idle(&self) -> bool {
        self.live_requests == 0
            && self.live_tokens == 0
            && self.settled.is_empty()
            && self.day_requests == 0
            && self.cooldown.is_none()
    }
}

fn fits(amount: u64, limit: Option<u64>) -> bool {
    limit.is_none_or(|limit| amount <= limit)
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
    /// 2026-03-08 06:00 UTC: 22:00 PST on the eve of the spring-forward day.
    const EVENING_BEFORE_DST: u64 = 1_772_949_600_000;

    fn daily() -> DailyReset {
        DailyReset {
            zone: chrono_tz::America::Los_Angeles,
        }
    }

    fn group(rpm: u64, rpd: u64) -> QuotaGroup {
        let limits = Limits {
            requests_per_minute: Some(rpm),
            tokens_per_minute: Some(1_000),
            requests_per_day: Some(rpd),
        };
        QuotaGroup::new(limits, EVENING_BEFORE_DST, daily())
    }

    #[test]
    fn daily_reset_is_midnight_pacific_across_dst() {
        let reset = daily().next_reset_after(EVENING_BEFORE_DST);
        // Midnight PST (UTC-8) on 2026-03-08 is 08:00 UTC.
        assert_eq!(reset, EVENING_BEFORE_DST + 2 * 3_600_000);
        // The next one comes after a 23-hour day, at midnight PDT (UTC-7).
        assert_eq!(daily().next_reset_after(reset), reset + 23 * 3_600_000);
    }

    #[test]
    fn reservation_blocks_until_a_window_after_the_lease_ends() {
        let mut g = group(2, 100);
        let t = EVENING_BEFORE_DST;
        g.reserve(2, 0);
        assert!(!g.can_afford(1, 0));
        g.settle(t + 5_000, WINDOW, MARGIN, 2, 0, 2, 0);
        g.advance(t + 5_000 + WINDOW + MARGIN - 1, daily());
        assert!(!g.can_afford(1, 0));
        g.advance(t + 5_000 + WINDOW + MARGIN, daily());
        assert!(g.can_afford(2, 0));
    }

    #[test]
    fn unsent_requests_are_refunded_and_estimates_replaced() {
        let mut g = group(10, 100);
        g.reserve(5, 800);
        g.settle(EVENING_BEFORE_DST, WINDOW, MARGIN, 5, 800, 1, 100);
        assert_eq!(g.requests_in_window(), 1);
        assert_eq!(g.tokens_in_window(), 100);
        assert_eq!(g.requests_today(), 1);
    }

    #[test]
    fn a_lease_spanning_midnight_counts_against_both_days() {
        let mut g = group(10, 3);
        let t = EVENING_BEFORE_DST;
        g.reserve(2, 0);
        g.advance(daily().next_reset_after(t) + 1, daily());
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
        g.settle(t, WINDOW, MARGIN, 2, 0, 2, 0);
        assert_eq!(g.affordable_at(t, 1, 0, daily()), Some(t + WINDOW + MARGIN));
        g.reserve(2, 0);
        // Two live requests fill the window whatever settles: only a release makes room.
        assert_eq!(g.affordable_at(t, 1, 0, daily()), None);
    }
}
