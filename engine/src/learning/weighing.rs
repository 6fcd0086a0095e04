//! Today's rules: a group's requests per minute are lowered only on evidence tied to the load
//! the provider refused it at, because Gemini answers 429s that are no limit at all (a bare
//! `RESOURCE_EXHAUSTED` under its own load, on preview models, at random) as often as ones that
//! are.
//!
//! - **The provider's acceptances are facts.** Every call it accepted counts in a trailing
//!   window; the most that window held (its *peak*) is a lower bound of what the project has
//!   now. A sliding-window limit refuses only at the top of the window (within an eighth of its
//!   peak, at least two requests); noise refuses at any level, and at the top it refuses no
//!   more often than anywhere else. An acceptance above the peak proves the limit higher: the
//!   evidence at the top starts again.
//! - **A limit is lowered on evidence tied to the load**: at least `REFUSALS_TO_LOWER` 429s at
//!   the top, at least half as many as the acceptances there, gathered within `relearn_after`
//!   windows and over a span (1/60 of a window) or more, lower it in one bounded step to
//!   max(peak, ⌈¾ × limit⌉): never below what the provider was seen to accept, never more than
//!   a quarter at once. The evidence then stands (rules 5 on): each further 429 at the top a
//!   span or more after the last step, the evidence still outweighing, steps again, so that a
//!   real limit at half the configured one costs seven 429s, not five a step. A burst in one
//!   instant is one event: a wave across the pool is the provider's, not the project's (see
//!   [`super::super::outage`]).
//! - **An isolated 429 is no limit, nor even a rest**: the refused request is taken off the
//!   books (the provider did not count it) and its task gets another key; from the second 429
//!   in a row without an acceptance between, the engine rests the group for the provider's
//!   retry delay, or a span doubled each time. Gemini's noise names retry delays too: resting
//!   the project for each would cost it a tenth of its time at 3% noise.
//! - **A named figure** the books reached sets the limit at once and is never probed above; one
//!   the books were below (someone else spends the project) counts only as a bare 429 does.
//! - **Climbing**: a window that pressed the lowered limit and whose 429s at the top were fewer
//!   than two or than half its acceptances there is calm; after `relearn_after` calm windows the
//!   limit climbs ×1.25 per calm window towards the named or configured figure. Within two
//!   windows a climb is a probe: two 429s at the top, half its acceptances there, undo it (a
//!   probe above a real limit is refused on every call past it), and the next waits twice as
//!   long (up to 8×), so that a real limit below the configured one costs two or three 429s a
//!   probe, rarely. Rules 4 wanted the full evidence both to undo a probe and to deny calm.
//!
//! Why these numbers: bare 429s at up to 10% of calls (Gemini's noise) leave nine acceptances
//! for each refusal at the top; a real limit refuses every call there, a limit just below the
//! configured one or someone else spending the project a third of them or more. The engine's
//! seeded harness (`tests/provider.rs` of this crate) holds both to the figures of issue 24.

use super::super::calendar::Time;
use super::super::quota::Limits;
use super::{Evidence, LearnedLimit, LimitChange, LimitKind, Tuning, change, effective};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// 429s at the top of the window that lower a limit, if they are half the acceptances there or
/// more.
pub const REFUSALS_TO_LOWER: u64 = 5;
/// 429s at the top that undo a climb within two windows of it, if they are half the
/// acceptances there or more: a probe above a real limit is refused on every call past it.
pub const REFUSALS_TO_UNDO_A_PROBE: u64 = 2;
/// A climb multiplies the limit by 5/4.
const CLIMB: (u64, u64) = (5, 4);
/// A failed probe doubles the calm windows the next climb waits for, up to this many times
/// `relearn_after`.
const MOST_CLIMB_WAIT: u32 = 8;
/// Acceptances are counted in slots of 1/`SLOTS_PER_WINDOW` of a window.
const SLOTS_PER_WINDOW: u64 = 1_000;
/// A span: 1/60 of a window (1 s of Gemini's minute), the time the engine gives a burst of
/// answers to be one event or several.
pub fn span_of(window_ms: u64) -> u64 {
    (window_ms / 60).max(1)
}

/// Acceptances in one slot of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    /// Steady start of the slot.
    at_ms: u64,
    /// Requests the provider accepted in it.
    accepted: u64,
    /// The most the trailing window held just after an acceptance in it.
    held: u64,
}

/// What one window saw, for the climb and for people.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Steady start of the window.
    pub from_ms: u64,
    /// Requests the provider accepted in it.
    pub accepted: u64,
    /// 429s in it, and of those, how many came at the top of the window.
    pub refused: u64,
    pub refused_at_top: u64,
    /// Acceptances at the top of the window (not above its peak).
    pub accepted_at_top: u64,
    /// The books reached the lowered limit in it.
    pub pressed: bool,
}

/// What a group's answers showed lately, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    pub window: Tally,
    pub previous_window: Tally,
    /// The most the provider was seen to accept in a trailing window.
    pub peak: u64,
    /// What moved the requests per minute last.
    pub moved_by: Option<String>,
}

impl Tally {
    /// Whether its 429s at the top deny it calm: evidence enough to lower a limit (rules 4),
    /// or many against its acceptances there, even too few to lower one (rules 5 on).
    fn refused_much(&self, tuning: Tuning) -> bool {
        outweighs(
            self.refused_at_top,
            self.accepted_at_top,
            tuning.evidence_stands,
        )
    }
}

/// A group's learned limits and the evidence they rest on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weighing {
    /// By [`LimitKind`] order.
    limits: [Option<LearnedLimit>; 4],
    pub last_429: Option<Evidence>,
    /// Acceptances in the trailing window, oldest first.
    slots: VecDeque<Slot>,
    /// Answers at the top of the window since the evidence last moved the limit.
    top: Top,
    /// The window being watched, and the one before it.
    tally: Tally,
    last_tally: Tally,
    /// Calm windows since the last lowering.
    calm_windows: u32,
    /// Calm windows the next climb waits for.
    climb_after: u32,
    /// Steady time of the last climb, while a lowering soon after would mark it a failed probe.
    climbed_ms: Option<u64>,
    /// What moved the requests per minute last, for people.
    moved_by: Option<String>,
}

impl Weighing {
    pub fn new(tuning: Tuning) -> Self {
        Self {
            limits: [None; 4],
            last_429: None,
            slots: VecDeque::new(),
            top: Top::default(),
            tally: Tally::default(),
            last_tally: Tally::default(),
            calm_windows: 0,
            climb_after: tuning.relearn_after,
            climbed_ms: None,
            moved_by: None,
        }
    }

    /// Whether it holds what forgetting the group would lose: a learned limit or a 429.
    pub fn holds_something(&self) -> bool {
        self.limits.iter().any(Option::is_some) || self.last_429.is_some()
    }

    /// 429s at the top so far were the provider's trouble, not the project's limit.
    pub fn discount_refusals(&mut self) {
        self.top = Top::default();
    }

    /// Takes over what an older rule learned.
    pub(super) fn carry_over(
        &mut self,
        limits: [Option<LearnedLimit>; 3],
        last_429: Option<Evidence>,
    ) {
        let [rpm, tpm, rpd] = limits;
        self.limits = [rpm, tpm, rpd, None];
        self.last_429 = last_429;
    }

    pub fn limit(&self, kind: LimitKind) -> Option<LearnedLimit> {
        self.limits[kind as usize]
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.limits.iter().all(Option::is_none)
    }

    pub fn effective(&self, configured: Limits) -> Limits {
        effective(&self.limits, configured)
    }

    /// Requests the provider accepted in the trailing window at `time`, and the most that
    /// window was seen to hold within it (its peak): one pass over at most a window of slots.
    fn held_and_peak(&self, time: Time, tuning: Tuning) -> (u64, u64) {
        let from = time.steady_ms.saturating_sub(tuning.window_ms);
        self.slots
            .iter()
            .filter(|slot| slot.at_ms > from)
            .fold((0u64, 0u64), |(held, peak), slot| {
                (held.saturating_add(slot.accepted), peak.max(slot.held))
            })
    }

    /// The provider accepted `requests` at `time`.
    pub fn accepted(&mut self, requests: u64, time: Time, tuning: Tuning) {
        if requests == 0 {
            return;
        }
        self.roll(time, tuning);
        let (held, peak) = self.held_and_peak(time, tuning);
        let held = held.saturating_add(requests);
        let high = peak.max(self.top.high);
        if held > high {
            // A new high: what refused calls at the top before was no limit.
            self.top = Top::default();
        } else if at_the_top(held, high) {
            self.top.at(time, tuning, high).accepted += requests;
            self.tally.accepted_at_top = self.tally.accepted_at_top.saturating_add(requests);
        }
        let slot_ms = (tuning.window_ms / SLOTS_PER_WINDOW).max(1);
        let at_ms = time.steady_ms - time.steady_ms % slot_ms;
        match self.slots.back_mut() {
            Some(slot) if slot.at_ms == at_ms => {
                slot.accepted = slot.accepted.saturating_add(requests);
                slot.held = slot.held.max(held);
            }
            _ => self.slots.push_back(Slot {
                at_ms,
                accepted: requests,
                held,
            }),
        }
        self.tally.accepted = self.tally.accepted.saturating_add(requests);
    }

    /// The books held `held` requests in the window after a grant.
    pub fn granted(&mut self, held: u64) {
        if let Some(limit) = self.limit(LimitKind::RequestsPerMinute)
            && held >= limit.value
        {
            self.tally.pressed = true;
        }
    }

    /// What its answers showed, as of `time`.
    pub fn answers(&self, time: Time, tuning: Tuning) -> Answers {
        let current = time.steady_ms < self.tally.from_ms.saturating_add(tuning.window_ms);
        Answers {
            window: if current {
                self.tally
            } else {
                Tally::default()
            },
            previous_window: if current {
                self.last_tally
            } else {
                Tally::default()
            },
            peak: self.held_and_peak(time, tuning).1,
            moved_by: self.moved_by.clone(),
        }
    }

    /// A 429 that named `kind`'s figure (at least 1) when the books held as much: the books
    /// admit it at once (or less, where the limit was lowered below it).
    pub fn named(
        &mut self,
        kind: LimitKind,
        value: u64,
        evidence: Evidence,
        configured: Limits,
    ) -> Option<LimitChange> {
        let before = self.effective(configured);
        let kept = self.limit(kind).map_or(value, |l| l.value.min(value));
        self.limits[kind as usize] = Some(LearnedLimit {
            value: kept,
            named: Some(value),
        });
        self.last_429 = Some(evidence);
        let reason = format!("named by the provider: {value}");
        if kind == LimitKind::RequestsPerMinute {
            self.moved_by = Some(reason.clone());
        }
        change(kind, before, self.effective(configured), &reason)
    }

    /// A 429 that says nothing of the limit, or names a figure the books were below, at `time`:
    /// evidence only at the top of the trailing window (see the module's header).
    pub fn refused(
        &mut self,
        time: Time,
        tuning: Tuning,
        evidence: Evidence,
        configured: Limits,
    ) -> Option<LimitChange> {
        self.roll(time, tuning);
        self.last_429 = Some(evidence);
        self.tally.refused = self.tally.refused.saturating_add(1);
        let (held, peak) = self.held_and_peak(time, tuning);
        let high = peak.max(self.top.high);
        if !at_the_top(held, high) {
            return None;
        }
        self.tally.refused_at_top = self.tally.refused_at_top.saturating_add(1);
        let probing = self.probing(time, tuning);
        let top = self.top.at(time, tuning, high);
        top.refused += 1;
        let top = *top;
        let span = span_of(tuning.window_ms);
        let spread = time.steady_ms - top.since_ms;
        let against_a_probe = probing && tuning.evidence_stands;
        if !outweighs(top.refused, top.accepted, against_a_probe) || spread < span {
            return None;
        }
        let kind = LimitKind::RequestsPerMinute;
        let before = self.effective(configured);
        let current = kind.of(&before).unwrap_or(u64::MAX);
        let step = current.saturating_mul(3).div_ceil(4);
        let value = peak.max(step).max(1);
        if value >= current || !tuning.evidence_stands {
            self.top = Top::default();
        } else {
            // The evidence still stands: one more 429 against it a span on steps again.
            self.top.since_ms = time.steady_ms;
        }
        if value >= current {
            return None;
        }
        if probing {
            self.climb_after = self
                .climb_after
                .saturating_mul(2)
                .min(tuning.relearn_after.saturating_mul(MOST_CLIMB_WAIT));
        }
        self.climbed_ms = None;
        self.calm_windows = 0;
        let named = self.limit(kind).and_then(|l| l.named);
        self.limits[kind as usize] = Some(LearnedLimit { value, named });
        let reason = format!(
            "lowered by {} 429s against {} acceptances over {} at the top of the window, whose \
             peak was {peak} accepted ({} accepted, {} refused in the window so far)",
            top.refused,
            top.accepted,
            show_span(spread),
            self.tally.accepted,
            self.tally.refused
        );
        self.moved_by = Some(reason.clone());
        change(kind, before, self.effective(configured), &reason)
    }

    /// Brings the windows to `time`: each window that pressed a lowered limit without the
    /// evidence that lowers one counts as calm, and from the `climb_after`th on
    /// each raises it ×1.25, up to the named figure (kept) or the configured one (forgotten).
    pub fn advance(
        &mut self,
        time: Time,
        tuning: Tuning,
        configured: Limits,
    ) -> Option<LimitChange> {
        let windows = self.roll(time, tuning);
        let kind = LimitKind::RequestsPerMinute;
        let limit = self.limit(kind)?;
        if windows == 0 {
            return None;
        }
        let last = self.last_tally;
        let calm = last.pressed && !last.refused_much(tuning);
        if !calm {
            return None;
        }
        self.calm_windows = self.calm_windows.saturating_add(1);
        let target = limit.named.or(kind.of(&configured));
        if self.calm_windows < self.climb_after || target.is_some_and(|t| limit.value >= t) {
            return None;
        }
        let before = self.effective(configured);
        let climbed = limit
            .value
            .saturating_mul(CLIMB.0)
            .div_ceil(CLIMB.1)
            .max(limit.value.saturating_add(1));
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
        self.climbed_ms = Some(time.steady_ms);
        let reason = format!(
            "climbing after {} calm windows at the limit (the last: {} accepted, {} refused)",
            self.calm_windows, last.accepted, last.refused
        );
        self.moved_by = Some(reason.clone());
        change(kind, before, self.effective(configured), &reason)
    }

    /// Whether a climb at most two windows ago has yet to prove itself.
    fn probing(&self, time: Time, tuning: Tuning) -> bool {
        self.climbed_ms
            .is_some_and(|at| time.steady_ms < at.saturating_add(2 * tuning.window_ms))
    }

    /// When [`Weighing::advance`] may next change something, if a lowered limit waits to climb.
    pub fn next_change_ms(&self, tuning: Tuning, configured: Limits) -> Option<u64> {
        let kind = LimitKind::RequestsPerMinute;
        let limit = self.limit(kind)?;
        let target = limit.named.or(kind.of(&configured));
        let climbing = target.is_none_or(|t| limit.value < t)
            && self.tally.pressed
            && self.calm_windows.saturating_add(1) >= self.climb_after;
        climbing.then(|| self.tally.from_ms.saturating_add(tuning.window_ms))
    }

    /// Closes the windows that ended by `time` (how many) and forgets acceptances that left the
    /// trailing window. A climb that held two windows was no failed probe: the wait resets.
    fn roll(&mut self, time: Time, tuning: Tuning) -> u64 {
        let from = time.steady_ms.saturating_sub(tuning.window_ms);
        while self.slots.front().is_some_and(|slot| slot.at_ms <= from) {
            self.slots.pop_front();
        }
        if tuning.window_ms == 0
            || time.steady_ms < self.tally.from_ms.saturating_add(tuning.window_ms)
        {
            return 0;
        }
        let windows = (time.steady_ms - self.tally.from_ms) / tuning.window_ms;
        self.last_tally = if windows == 1 {
            self.tally
        } else {
            // Windows that passed without anyone looking saw nothing.
            Tally::default()
        };
        self.tally = Tally {
            from_ms: self.tally.from_ms + windows * tuning.window_ms,
            ..Tally::default()
        };
        if self
            .climbed_ms
            .is_some_and(|at| time.steady_ms >= at.saturating_add(2 * tuning.window_ms))
        {
            self.climbed_ms = None;
            self.climb_after = tuning.relearn_after;
        }
        windows
    }
}

/// Answers at the top of the window, from the first of them on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Top {
    /// Steady time of the first.
    since_ms: u64,
    /// The most the window was seen to hold meanwhile: the top they are at. A window that
    /// empties and fills again is at the same top, not at a new one each time.
    high: u64,
    refused: u64,
    accepted: u64,
}

impl Top {
    /// The tally to count an answer at `time` in: started afresh `relearn_after` windows after
    /// the first, so that evidence of a sparse load adds up without going stale.
    fn at(&mut self, time: Time, tuning: Tuning, high: u64) -> &mut Self {
        let lasts = tuning
            .window_ms
            .saturating_mul(u64::from(tuning.relearn_after.max(1)));
        if self.refused + self.accepted == 0
            || time.steady_ms >= self.since_ms.saturating_add(lasts)
        {
            *self = Self {
                since_ms: time.steady_ms,
                ..Self::default()
            };
        }
        self.high = self.high.max(high);
        self
    }
}

/// Whether `refused` 429s at the top against `accepted` acceptances there are evidence of a
/// limit: at least half as many as the acceptances (a third of the answers; noise refuses a
/// tenth at most), and at least [`REFUSALS_TO_LOWER`], or [`REFUSALS_TO_UNDO_A_PROBE`] against a
/// climb that has yet to prove itself.
fn outweighs(refused: u64, accepted: u64, probing: bool) -> bool {
    let least = if probing {
        REFUSALS_TO_UNDO_A_PROBE
    } else {
        REFUSALS_TO_LOWER
    };
    refused >= least && refused.saturating_mul(2) >= accepted
}

/// Whether a window holding `held` is at its top: within an eighth of its `peak` (at least two
/// requests), where a limit would refuse and noise is as likely as anywhere. Acceptances are
/// counted when workers report them, a call's latency after the provider counted them: the
/// window keylease sees is the provider's, shifted by seconds, and its peak a request or two
/// above the provider's at small limits.
fn at_the_top(held: u64, peak: u64) -> bool {
    held.saturating_add((peak / 8).max(2)) >= peak
}

fn show_span(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 1_000;
    /// A span of this window: 16 ms.
    const SPAN: u64 = WINDOW / 60;
    const CONFIGURED: u64 = 40;
    /// Steady time of the first call.
    const START: u64 = 100_000;

    fn tuning(evidence_stands: bool) -> Tuning {
        Tuning {
            window_ms: WINDOW,
            relearn_after: 2,
            evidence_stands,
        }
    }

    fn configured() -> Limits {
        Limits {
            requests_per_minute: Some(CONFIGURED),
            ..Limits::default()
        }
    }

    fn evidence() -> Evidence {
        Evidence {
            quota_id: String::new(),
            at_wall_ms: 0,
            task_id: "t".into(),
        }
    }

    fn admitted(learned: &Weighing) -> u64 {
        learned.effective(configured()).requests_per_minute.unwrap()
    }

    /// One window from `from` of a provider whose real limit is 15: it accepts 15 one by
    /// one, the books pressing the limit, and refuses `refusals` calls at the top a span apart.
    /// Advances to the window's end; what the books admit then.
    fn window(learned: &mut Weighing, from: u64, refusals: u64, tuning: Tuning) -> u64 {
        let from = START + from;
        for _ in 0..15 {
            learned.accepted(1, Time::at(from), tuning);
        }
        // Demand fills whatever the books admit.
        learned.granted(u64::MAX);
        for n in 0..refusals {
            learned.refused(Time::at(from + n * SPAN), tuning, evidence(), configured());
        }
        learned.advance(Time::at(from + WINDOW), tuning, configured());
        admitted(learned)
    }

    /// A limit of 40 over a real one of 15: 15 accepted at once, then 429s at the top a span
    /// apart. What the books admit after each 429.
    fn lowering(tuning: Tuning) -> Vec<u64> {
        let mut learned = Weighing::new(tuning);
        for _ in 0..15 {
            learned.accepted(1, Time::at(START), tuning);
        }
        (0..10)
            .map(|n| {
                learned.refused(Time::at(START + n * SPAN), tuning, evidence(), configured());
                admitted(&learned)
            })
            .collect()
    }

    #[test]
    fn evidence_that_lowered_a_limit_stands_for_each_step_after_it_a_span_apart() {
        // The fifth 429, four spans after the first, lowers by a quarter; each one after by
        // another, down to what the provider accepted.
        assert_eq!(
            lowering(tuning(true)),
            vec![40, 40, 40, 40, 30, 23, 18, 15, 15, 15]
        );
    }

    #[test]
    fn under_rules_4_each_step_gathers_its_evidence_afresh() {
        assert_eq!(
            lowering(tuning(false)),
            vec![40, 40, 40, 40, 30, 30, 30, 30, 30, 23]
        );
    }

    /// Lowered to 15, then windows pressing it with `refusals` 429s at the top in each; what
    /// the books admit after each window.
    fn after_lowering(tuning: Tuning, refusals: &[u64]) -> Vec<u64> {
        let mut learned = Weighing::new(tuning);
        for _ in 0..15 {
            learned.accepted(1, Time::at(START), tuning);
        }
        // 429s at the top a span apart, as many as the rules want.
        for n in 0..40 {
            learned.refused(Time::at(START + n * SPAN), tuning, evidence(), configured());
        }
        assert_eq!(admitted(&learned), 15);
        refusals
            .iter()
            .zip(1..)
            .map(|(&refused, w)| window(&mut learned, w * WINDOW, refused, tuning))
            .collect()
    }

    #[test]
    fn a_climb_refused_twice_at_its_top_is_undone() {
        // Two calm windows, then a climb to 19: two 429s at the top against three acceptances
        // there put it back, and the next climb waits twice as long.
        assert_eq!(
            after_lowering(tuning(true), &[0, 0, 2, 0, 0, 0, 0]),
            vec![15, 19, 15, 15, 15, 15, 19]
        );
        // Rules 4 wanted five: two 429s a window leave the climb, and the next.
        assert_eq!(
            after_lowering(tuning(false), &[0, 0, 2, 2]),
            vec![15, 19, 24, 30]
        );
    }

    #[test]
    fn a_window_that_refused_much_at_its_top_is_no_calm_one() {
        // Two 429s against three acceptances at the top, too few to lower anything: the
        // climb waits a window more.
        assert_eq!(after_lowering(tuning(true), &[2, 0, 0]), vec![15, 15, 19]);
        assert_eq!(after_lowering(tuning(false), &[2, 0, 0]), vec![15, 19, 24]);
    }
}
