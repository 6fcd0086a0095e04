//! The rules of versions 2 and 3, frozen: kept so that this build decides the records an older
//! build logged as that build did (see [`super::super::RULES_VERSION`]). Each 429 was a verdict:
//! - a 429 that names its limit sets the learned limit to that figure at once, and it is never
//!   probed above;
//! - a 429 without a figure, or with a per-minute figure its books were below, for a group whose
//!   books showed room, lowers the requests per minute at most once per window, to
//!   max(1, ⌈0.75 × what the books held⌉); after `relearn_after` windows that pressed the lowered
//!   limit without a 429, it climbs ×1.5 per pressed window back to the named or configured
//!   figure.
//!
//! Nothing here changes with the engine: [`super::weighing`] holds today's rules.

use super::super::calendar::Time;
use super::super::quota::Limits;
use super::{Evidence, LearnedLimit, LimitChange, LimitKind, Tuning, effective};
use serde::{Deserialize, Serialize};

/// A group's learned limits and what it needs to decide the next change (the layout the image
/// of rules 2 and 3 kept).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reacting {
    /// By [`LimitKind`] order, up to requests per day: these rules knew no tokens per day.
    pub(super) limits: [Option<LearnedLimit>; 3],
    pub last_429: Option<Evidence>,
    /// Steady time of the last lowering by a 429 without a figure: at most one per window.
    lowered_ms: Option<u64>,
    /// Steady start of the window being watched for a climb.
    watch_from_ms: u64,
    /// Windows that pressed the lowered limit without a 429, since the last 429.
    calm_windows: u32,
    /// The books reached the lowered limit in the window being watched.
    pressed: bool,
}

impl Reacting {
    pub fn limit(&self, kind: LimitKind) -> Option<LearnedLimit> {
        self.limits.get(kind as usize).copied().flatten()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.limits.iter().all(Option::is_none)
    }

    pub fn effective(&self, configured: Limits) -> Limits {
        effective(&self.limits, configured)
    }

    /// A 429 named `kind`'s figure (at least 1): the books admit it at once (or less, where
    /// the limit was lowered below it).
    pub fn named(
        &mut self,
        kind: LimitKind,
        value: u64,
        time: Time,
        evidence: Evidence,
        configured: Limits,
    ) -> Option<LimitChange> {
        let before = self.effective(configured);
        // A limit lowered below the figure (others use the project too) stays lowered: it
        // climbs back to the figure by itself.
        let kept = self.limit(kind).map_or(value, |l| l.value.min(value));
        let Some(slot) = self.limits.get_mut(kind as usize) else {
            // No record of these rules names one (their wire mapped it to no kind).
            self.heard_429(time, evidence);
            return None;
        };
        *slot = Some(LearnedLimit {
            value: kept,
            named: Some(value),
        });
        self.heard_429(time, evidence);
        self.change(kind, before, configured, "named by the provider")
    }

    /// A 429 without a figure for a request on the books, which held `held` requests in the
    /// window besides it: lowers the requests per minute to max(1, ⌈0.75 × held⌉), unless the
    /// books were over the limit (keylease overbooked: the 429 is no news) or it was lowered
    /// less than a window ago. Counting the refused request out makes each lowering land
    /// strictly below the limit the books held it to, so that repeated 429s converge.
    pub fn unnamed(
        &mut self,
        held: u64,
        time: Time,
        tuning: Tuning,
        evidence: Evidence,
        configured: Limits,
    ) -> Option<LimitChange> {
        let before = self.effective(configured);
        let kind = LimitKind::RequestsPerMinute;
        let had_room = kind.of(&before).is_none_or(|limit| held < limit);
        let lowered_lately = self
            .lowered_ms
            .is_some_and(|at| time.steady_ms < at.saturating_add(tuning.window_ms));
        self.heard_429(time, evidence);
        if !had_room || lowered_lately {
            return None;
        }
        let value = held.saturating_mul(3).div_ceil(4).max(1);
        let named = self.limit(kind).and_then(|l| l.named);
        self.limits[kind as usize] = Some(LearnedLimit { value, named });
        self.lowered_ms = Some(time.steady_ms);
        let why = match named {
            Some(figure) => format!(
                "a 429 its figure of {figure} does not explain (someone else spends the project)"
            ),
            None => "a 429 without a figure".to_string(),
        };
        self.change(
            kind,
            before,
            configured,
            &format!("lowered to 3/4 of the {held} requests on the books by {why}"),
        )
    }

    /// The books held `held` requests in the window after a grant.
    pub fn granted(&mut self, held: u64) {
        if let Some(limit) = self.limit(LimitKind::RequestsPerMinute)
            && held >= limit.value
        {
            self.pressed = true;
        }
    }

    /// Brings the climb to `time`: each window that pressed a lowered limit without a 429
    /// counts, and from the `relearn_after`th on each raises it ×1.5, up to the named figure
    /// (kept) or the configured one (forgotten).
    pub fn advance(
        &mut self,
        time: Time,
        tuning: Tuning,
        configured: Limits,
    ) -> Option<LimitChange> {
        let kind = LimitKind::RequestsPerMinute;
        let limit = self.limit(kind)?;
        let target = limit.named.or(kind.of(&configured));
        if target.is_some_and(|t| limit.value >= t) || tuning.window_ms == 0 {
            return None;
        }
        let window_ends = self.watch_from_ms.saturating_add(tuning.window_ms);
        if time.steady_ms < window_ends {
            return None;
        }
        let pressed = std::mem::take(&mut self.pressed);
        // A window that passed without anyone looking had no grant: it did not press.
        self.watch_from_ms = if time.steady_ms < window_ends.saturating_add(tuning.window_ms) {
            window_ends
        } else {
            time.steady_ms
        };
        if !pressed {
            return None;
        }
        self.calm_windows = self.calm_windows.saturating_add(1);
        if self.calm_windows < tuning.relearn_after {
            return None;
        }
        let before = self.effective(configured);
        let climbed = limit.value.saturating_mul(3).div_ceil(2);
        self.limits[kind as usize] = match target {
            Some(t) if climbed >= t && limit.named.is_none() => None,
            Some(t) => Some(LearnedLimit {
                value: climbed.min(t),
                named: limit.named,
            }),
            None => Some(LearnedLimit {
                value: climbed,
                named: None,
            }),
        };
        let reason = format!(
            "climbing after {} windows without a 429 at the limit",
            self.calm_windows
        );
        self.change(kind, before, configured, &reason)
    }

    /// When [`Reacting::advance`] may next change something, if a lowered limit waits to climb.
    pub fn next_change_ms(&self, tuning: Tuning, configured: Limits) -> Option<u64> {
        let kind = LimitKind::RequestsPerMinute;
        let limit = self.limit(kind)?;
        let target = limit.named.or(kind.of(&configured));
        let climbing = target.is_none_or(|t| limit.value < t)
            && self.pressed
            && self.calm_windows.saturating_add(1) >= tuning.relearn_after;
        climbing.then(|| self.watch_from_ms.saturating_add(tuning.window_ms))
    }

    fn heard_429(&mut self, time: Time, evidence: Evidence) {
        self.last_429 = Some(evidence);
        self.calm_windows = 0;
        self.pressed = false;
        self.watch_from_ms = time.steady_ms;
    }

    fn change(
        &self,
        kind: LimitKind,
        before: Limits,
        configured: Limits,
        reason: &str,
    ) -> Option<LimitChange> {
        let (before, after) = (kind.of(&before), kind.of(&self.effective(configured)));
        (before != after).then(|| LimitChange {
            kind,
            before,
            after,
            reason: reason.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 1_000;
    const TUNING: Tuning = Tuning {
        window_ms: WINDOW,
        relearn_after: 3,
        evidence_stands: false,
    };

    fn rpm(limit: u64) -> Limits {
        Limits {
            requests_per_minute: Some(limit),
            ..Limits::default()
        }
    }

    fn evidence(quota_id: &str) -> Evidence {
        Evidence {
            quota_id: quota_id.into(),
            at_wall_ms: 0,
            task_id: "t".into(),
        }
    }

    fn at(ms: u64) -> Time {
        Time::at(ms)
    }

    /// Presses the limit once in each of `windows` windows from `from`, advancing at each
    /// window's end; the figures the books admitted after each.
    fn press(learned: &mut Reacting, from: u64, windows: u64, configured: Limits) -> Vec<u64> {
        (0..windows)
            .map(|w| {
                learned.granted(u64::MAX);
                learned.advance(at(from + (w + 1) * WINDOW), TUNING, configured);
                learned
                    .effective(configured)
                    .requests_per_minute
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }

    #[test]
    fn a_named_figure_is_admitted_at_once_and_never_probed_above() {
        let mut learned = Reacting::default();
        let change = learned
            .named(
                LimitKind::RequestsPerMinute,
                15,
                at(0),
                evidence("q"),
                rpm(30),
            )
            .unwrap();
        assert_eq!((change.before, change.after), (Some(30), Some(15)));
        assert_eq!(learned.effective(rpm(30)).requests_per_minute, Some(15));
        assert_eq!(press(&mut learned, 0, 20, rpm(30)), vec![15; 20]);
    }

    #[test]
    fn a_named_figure_above_the_configured_one_changes_nothing_admitted() {
        let mut learned = Reacting::default();
        let change = learned.named(LimitKind::TokensPerMinute, 500, at(0), evidence("q"), {
            Limits {
                tokens_per_minute: Some(100),
                ..Limits::default()
            }
        });
        assert_eq!(change, None);
        assert_eq!(
            learned.limit(LimitKind::TokensPerMinute).unwrap().value,
            500
        );
    }

    #[test]
    fn an_unnamed_429_lowers_to_three_quarters_of_the_books_once_per_window() {
        let mut learned = Reacting::default();
        let change = learned
            .unnamed(17, at(0), TUNING, evidence(""), rpm(30))
            .unwrap();
        assert_eq!(change.after, Some(13));
        // Within the window, another 429 lowers nothing more.
        assert_eq!(
            learned.unnamed(5, at(WINDOW - 1), TUNING, evidence(""), rpm(30)),
            None
        );
        let change = learned
            .unnamed(4, at(WINDOW), TUNING, evidence(""), rpm(30))
            .unwrap();
        assert_eq!(change.after, Some(3));
        assert_eq!(
            learned.unnamed(0, at(3 * WINDOW), TUNING, evidence(""), rpm(30)),
            Some(LimitChange {
                kind: LimitKind::RequestsPerMinute,
                before: Some(3),
                after: Some(1),
                reason: "lowered to 3/4 of the 0 requests on the books by a 429 without a figure"
                    .into(),
            })
        );
    }

    #[test]
    fn an_unnamed_429_on_overbooked_books_is_no_news() {
        let mut learned = Reacting::default();
        // 30 others and the refused one: over the limit of 30.
        assert_eq!(
            learned.unnamed(30, at(0), TUNING, evidence(""), rpm(30)),
            None
        );
        assert!(learned.is_empty());
        assert!(learned.last_429.is_some());
    }

    #[test]
    fn a_lowered_limit_climbs_back_after_pressed_calm_windows_and_is_forgotten() {
        let mut learned = Reacting::default();
        learned.unnamed(16, at(0), TUNING, evidence(""), rpm(30));
        assert_eq!(learned.effective(rpm(30)).requests_per_minute, Some(12));
        // Two calm windows, then a climb in each: 12 → 18 → 27 → 30 (forgotten).
        assert_eq!(press(&mut learned, 0, 5, rpm(30)), vec![12, 12, 18, 27, 30]);
        assert!(learned.is_empty());
    }

    #[test]
    fn windows_that_do_not_press_the_limit_do_not_count_toward_a_climb() {
        let mut learned = Reacting::default();
        learned.unnamed(16, at(0), TUNING, evidence(""), rpm(30));
        for w in 1..=10 {
            learned.granted(5);
            assert_eq!(learned.advance(at(w * WINDOW), TUNING, rpm(30)), None);
        }
        // A long idle stretch counts for nothing either.
        assert_eq!(learned.advance(at(100 * WINDOW), TUNING, rpm(30)), None);
        assert_eq!(learned.effective(rpm(30)).requests_per_minute, Some(12));
    }

    #[test]
    fn a_429_starts_the_calm_count_again() {
        let mut learned = Reacting::default();
        learned.unnamed(16, at(0), TUNING, evidence(""), rpm(30));
        press(&mut learned, 0, 2, rpm(30));
        // A 429 on full books lowers nothing but restarts the count.
        learned.unnamed(12, at(2 * WINDOW + 10), TUNING, evidence(""), rpm(30));
        assert_eq!(
            press(&mut learned, 2 * WINDOW + 10, 3, rpm(30)),
            vec![12, 12, 18]
        );
    }

    #[test]
    fn a_lowered_named_limit_climbs_back_to_the_named_figure_and_keeps_it() {
        let mut learned = Reacting::default();
        learned.named(
            LimitKind::RequestsPerMinute,
            20,
            at(0),
            evidence("q"),
            rpm(30),
        );
        learned.unnamed(8, at(WINDOW), TUNING, evidence(""), rpm(30));
        assert_eq!(learned.effective(rpm(30)).requests_per_minute, Some(6));
        let climbed = press(&mut learned, WINDOW, 6, rpm(30));
        assert_eq!(climbed, vec![6, 6, 9, 14, 20, 20]);
        assert_eq!(
            learned.limit(LimitKind::RequestsPerMinute).unwrap().named,
            Some(20)
        );
    }

    #[test]
    fn without_a_configured_limit_a_lowered_one_climbs_without_end() {
        let mut learned = Reacting::default();
        learned.unnamed(4, at(0), TUNING, evidence(""), Limits::default());
        assert_eq!(
            press(&mut learned, 0, 4, Limits::default()),
            vec![3, 3, 5, 8]
        );
    }
}
