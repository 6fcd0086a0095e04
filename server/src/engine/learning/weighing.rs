//! Today's rules: a group's requests per minute are lowered only on evidence tied to the load
//! the provider refused it at, because Gemini answers 429s that are no limit at all (a bare
//! `RESOURCE_EXHAUSTED` under its own load, on preview models, at random) as often as ones that
//! are.
//!
//! - **The provider's acceptances are facts.** Every call it accepted counts in a trailing
//!   window; the most that window held (its *peak*) is a lower bound of what the project has
//!   now. A sliding-window limit refuses only once the window holds it; noise refuses at any
//!   level. So a 429 is evidence of a limit only when it came while the window held its peak,
//!   and only until a call is accepted at that level (which proves the limit higher).
//! - **A limit is lowered on repeated evidence over time**: `REFUSALS_TO_LOWER` such 429s
//!   within a window, at least a span (1/60 of a window) apart from first to last, lower it in
//!   one bounded step to max(peak, ⌈¾ × limit⌉): never below what the provider was seen to
//!   accept, never more than a quarter at once. A burst in one instant is one event: a wave
//!   across the pool is the provider's, not the project's (see [`super::super::outage`]).
//! - **An isolated 429 is a rest, not a limit**: the engine rests the group for the provider's
//!   retry delay, or a span doubled while 429s repeat without an acceptance between them; the
//!   refused request is taken off the books (the provider did not count it).
//! - **A named figure** the books reached sets the limit at once and is never probed above; one
//!   the books were below (someone else spends the project) counts only as a bare 429 does.
//! - **Climbing**: a window that pressed the lowered limit with fewer than `REFUSALS_TO_LOWER`
//!   429s at the peak is calm; after `relearn_after` calm windows the limit climbs ×1.25 per
//!   calm window towards the named or configured figure. A climb lowered again within two
//!   windows was a probe above the real limit: the next waits twice as long (up to 8×), so that
//!   a real limit below the configured one costs a few 429s per probe, rarely.
//!
//! Why these numbers: with bare 429s at any rate up to 10%, three at the peak before an
//! acceptance there come about once in a thousand peak visits, and even then the step stops at
//! the peak; a real limit refuses every call at the peak, so three come at once and the limit
//! reaches the peak in a few steps. The engine's seeded harness (`engine/tests/provider.rs`)
//! holds both to the figures of issue 24.

use super::super::calendar::Time;
use super::super::quota::Limits;
use super::{Evidence, LearnedLimit, LimitChange, LimitKind, Tuning, change, effective};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// 429s at the peak, within a window and a span apart, that lower a limit.
pub const REFUSALS_TO_LOWER: usize = 5;
/// A climb multiplies the limit by 5/4.
const CLIMB: (u64, u64) = (5, 4);
/// A failed probe doubles the calm windows the next climb waits for, up to this many times
/// `relearn_after`.
const MOST_CLIMB_WAIT: u32 = 8;
/// Acceptances are counted in slots of 1/`SLOTS_PER_WINDOW` of a window.
const SLOTS_PER_WINDOW: u64 = 1_000;
/// A span: 1/`SPANS_PER_WINDOW` of a window (1 s of Gemini's minute).
pub const SPANS_PER_WINDOW: u64 = 60;

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
    /// 429s in it, and of those, how many came at the peak.
    pub refused: u64,
    pub refused_at_peak: u64,
    /// The books reached the lowered limit in it.
    pub pressed: bool,
}

/// A group's learned limits and the evidence they rest on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weighing {
    /// By [`LimitKind`] order.
    limits: [Option<LearnedLimit>; 3],
    pub last_429: Option<Evidence>,
    /// Acceptances in the trailing window, oldest first.
    slots: VecDeque<Slot>,
    /// Steady times of the 429s that came at the peak, since an acceptance there.
    at_peak: Vec<u64>,
    /// The window being watched, and the one before it.
    pub tally: Tally,
    pub last_tally: Tally,
    /// Calm windows since the last lowering.
    calm_windows: u32,
    /// Calm windows the next climb waits for.
    climb_after: u32,
    /// Steady time of the last climb, while a lowering soon after would mark it a failed probe.
    climbed_ms: Option<u64>,
    /// What moved the requests per minute last, for people.
    pub moved_by: Option<String>,
}

impl Weighing {
    pub fn new(tuning: Tuning) -> Self {
        Self {
            limits: [None; 3],
            last_429: None,
            slots: VecDeque::new(),
            at_peak: Vec::new(),
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

    /// 429s at the peak so far were the provider's trouble, not the project's limit.
    pub fn discount_refusals(&mut self) {
        self.at_peak.clear();
    }

    /// Takes over what an older rule learned.
    pub(super) fn carry_over(
        &mut self,
        limits: [Option<LearnedLimit>; 3],
        last_429: Option<Evidence>,
    ) {
        self.limits = limits;
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

    /// Requests the provider accepted in the trailing window at `time`.
    pub fn held(&self, time: Time, tuning: Tuning) -> u64 {
        let from = time.steady_ms.saturating_sub(tuning.window_ms);
        self.slots
            .iter()
            .filter(|slot| slot.at_ms > from)
            .fold(0u64, |sum, slot| sum.saturating_add(slot.accepted))
    }

    /// The most the trailing window was seen to hold, within the trailing window.
    pub fn peak(&self, time: Time, tuning: Tuning) -> u64 {
        let from = time.steady_ms.saturating_sub(tuning.window_ms);
        self.slots
            .iter()
            .filter(|slot| slot.at_ms > from)
            .map(|slot| slot.held)
            .max()
            .unwrap_or(0)
    }

    /// The provider accepted `requests` at `time`.
    pub fn accepted(&mut self, requests: u64, time: Time, tuning: Tuning) {
        if requests == 0 {
            return;
        }
        self.roll(time, tuning);
        let peak = self.peak(time, tuning);
        let held = self.held(time, tuning).saturating_add(requests);
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
        if held > peak {
            // Accepted where it was refused before: what refused it was no limit.
            self.at_peak.clear();
        }
    }

    /// The books held `held` requests in the window after a grant.
    pub fn granted(&mut self, held: u64) {
        if let Some(limit) = self.limit(LimitKind::RequestsPerMinute)
            && held >= limit.value
        {
            self.tally.pressed = true;
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
    /// evidence only if the trailing window held its peak (see the module's header).
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
        let (held, peak) = (self.held(time, tuning), self.peak(time, tuning));
        if held < peak {
            return None;
        }
        self.tally.refused_at_peak = self.tally.refused_at_peak.saturating_add(1);
        let window_start = time.steady_ms.saturating_sub(tuning.window_ms);
        self.at_peak.retain(|&at| at > window_start);
        self.at_peak.push(time.steady_ms);
        let span = (tuning.window_ms / SPANS_PER_WINDOW).max(1);
        let spread = time.steady_ms - self.at_peak[0];
        if self.at_peak.len() < REFUSALS_TO_LOWER || spread < span {
            return None;
        }
        let kind = LimitKind::RequestsPerMinute;
        let before = self.effective(configured);
        let current = kind.of(&before).unwrap_or(u64::MAX);
        let step = current.saturating_mul(3).div_ceil(4);
        let value = peak.max(step).max(1);
        let refusals = self.at_peak.len();
        self.at_peak.clear();
        if value >= current {
            return None;
        }
        if self
            .climbed_ms
            .is_some_and(|at| time.steady_ms < at.saturating_add(2 * tuning.window_ms))
        {
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
            "lowered by {refusals} 429s over {} while the window held its peak of {peak} accepted \
             ({} accepted, {} refused in the window so far)",
            show_span(spread),
            self.tally.accepted,
            self.tally.refused
        );
        self.moved_by = Some(reason.clone());
        change(kind, before, self.effective(configured), &reason)
    }

    /// Brings the windows to `time`: each window that pressed a lowered limit with fewer than
    /// [`REFUSALS_TO_LOWER`] 429s at the peak counts as calm, and from the `climb_after`th on
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
        let calm = last.pressed && (last.refused_at_peak as usize) < REFUSALS_TO_LOWER;
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

fn show_span(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}
