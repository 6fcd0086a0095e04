//! What the provider's answers teach about a quota group's real limits. Beside each configured
//! limit the group may hold a learned one, and its books admit the lower of the two. Today's
//! rules weigh evidence ([`weighing`]); the rules older builds logged their records under react
//! to each 429 ([`reacting`], frozen), and a group learns by the rules of the engine's setup.
//!
//! Per-day limits are only ever learned from a named figure, never probed upward.

pub mod reacting;
pub mod weighing;

use super::calendar::Time;
use super::quota::Limits;
use serde::{Deserialize, Serialize};

pub use reacting::Reacting;
pub use weighing::Weighing;

/// One of a group's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    RequestsPerDay,
    /// Input tokens per day (rules 4 on).
    TokensPerDay,
}

impl LimitKind {
    pub const ALL: [Self; 4] = [
        Self::RequestsPerMinute,
        Self::TokensPerMinute,
        Self::RequestsPerDay,
        Self::TokensPerDay,
    ];

    /// The name configuration, metrics and status use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::RequestsPerDay => "requests_per_day",
            Self::TokensPerDay => "tokens_per_day",
        }
    }

    pub fn of(self, limits: &Limits) -> Option<u64> {
        match self {
            Self::RequestsPerMinute => limits.requests_per_minute,
            Self::TokensPerMinute => limits.tokens_per_minute,
            Self::RequestsPerDay => limits.requests_per_day,
            Self::TokensPerDay => limits.tokens_per_day,
        }
    }

    fn set(self, limits: &mut Limits, value: Option<u64>) {
        match self {
            Self::RequestsPerMinute => limits.requests_per_minute = value,
            Self::TokensPerMinute => limits.tokens_per_minute = value,
            Self::RequestsPerDay => limits.requests_per_day = value,
            Self::TokensPerDay => limits.tokens_per_day = value,
        }
    }
}

/// What a 429 named, as the reporting client read it from the provider's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaViolation {
    /// Which limit; `None` when the answer named one keylease does not know.
    pub kind: Option<LimitKind>,
    /// The provider's name for it (Gemini's `quotaId`), for people.
    pub quota_id: String,
    /// The model it names; empty when it names none.
    pub model: String,
    /// The limit's figure, when the provider gave it.
    pub value: Option<u64>,
}

/// One learned limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedLimit {
    /// What the books admit at most (with the configured figure, the lower).
    pub value: u64,
    /// The provider's own figure, when it named one: never probed above.
    pub named: Option<u64>,
}

/// The 429 a group last learned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The provider's name of the limit; empty when the 429 named none.
    pub quota_id: String,
    /// Wall time of the report.
    pub at_wall_ms: u64,
    /// The task that reported it.
    pub task_id: String,
}

/// What a change did, for the event that announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitChange {
    pub kind: LimitKind,
    /// What the books admitted before, and admit now (`None`: no limit).
    pub before: Option<u64>,
    pub after: Option<u64>,
    /// What moved it: the rule and the evidence, for people.
    pub reason: String,
}

/// How learning is tuned.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub window_ms: u64,
    /// Pressed calm windows before a lowered limit first climbs.
    pub relearn_after: u32,
    /// Rules 5 on: evidence that lowered a limit still stands for the next step, a climb is
    /// undone on less, and a window that refused much at its top is no calm one (see
    /// [`weighing`]). Rules 4 started the evidence afresh after each step.
    pub evidence_stands: bool,
}

/// The limits the books admit: per kind, the lower of configured and learned (`learned` by
/// kind; kinds past its end learned nothing).
fn effective(learned: &[Option<LearnedLimit>], configured: Limits) -> Limits {
    let mut limits = configured;
    for kind in LimitKind::ALL {
        if let Some(&Some(learned)) = learned.get(kind as usize) {
            let value = kind
                .of(&configured)
                .map_or(learned.value, |c| c.min(learned.value));
            kind.set(&mut limits, Some(value));
        }
    }
    limits
}

/// A change of one kind between two readings of the effective limits, if any.
fn change(kind: LimitKind, before: Limits, after: Limits, reason: &str) -> Option<LimitChange> {
    let (before, after) = (kind.of(&before), kind.of(&after));
    (before != after).then(|| LimitChange {
        kind,
        before,
        after,
        reason: reason.to_string(),
    })
}

/// What a group learned, by the rules it learns under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Learned {
    /// Rules 2 and 3: each 429 a verdict.
    Reacting(Reacting),
    /// Rules 4 on: evidence weighed.
    Weighing(Weighing),
}

impl Learned {
    /// Nothing learned yet, by the rules the engine decides under.
    pub fn new(weighs: bool, tuning: Tuning) -> Self {
        if weighs {
            Self::Weighing(Weighing::new(tuning))
        } else {
            Self::Reacting(Reacting::default())
        }
    }

    /// The same knowledge under today's rules: the limits and the last 429 carry over, the
    /// state of a decision in progress starts afresh.
    pub fn weighing(self, tuning: Tuning) -> Self {
        match self {
            Self::Reacting(old) => {
                let mut new = Weighing::new(tuning);
                new.carry_over(old.limits, old.last_429);
                Self::Weighing(new)
            }
            weighing => weighing,
        }
    }

    pub fn limit(&self, kind: LimitKind) -> Option<LearnedLimit> {
        match self {
            Self::Reacting(l) => l.limit(kind),
            Self::Weighing(l) => l.limit(kind),
        }
    }

    pub fn last_429(&self) -> Option<&Evidence> {
        match self {
            Self::Reacting(l) => l.last_429.as_ref(),
            Self::Weighing(l) => l.last_429.as_ref(),
        }
    }

    /// What its answers showed as of `time`, where they are weighed.
    pub fn answers(&self, time: Time, tuning: Tuning) -> Option<weighing::Answers> {
        match self {
            Self::Reacting(_) => None,
            Self::Weighing(l) => Some(l.answers(time, tuning)),
        }
    }

    pub fn effective(&self, configured: Limits) -> Limits {
        match self {
            Self::Reacting(l) => l.effective(configured),
            Self::Weighing(l) => l.effective(configured),
        }
    }

    pub fn named(
        &mut self,
        kind: LimitKind,
        value: u64,
        time: Time,
        evidence: Evidence,
        configured: Limits,
    ) -> Option<LimitChange> {
        match self {
            Self::Reacting(l) => l.named(kind, value, time, evidence, configured),
            Self::Weighing(l) => l.named(kind, value, evidence, configured),
        }
    }

    /// The books held `held` requests in the window after a grant.
    pub fn granted(&mut self, held: u64) {
        match self {
            Self::Reacting(l) => l.granted(held),
            Self::Weighing(l) => l.granted(held),
        }
    }

    /// Whether it holds what forgetting the group would lose: a learned limit or a 429.
    pub fn holds_something(&self) -> bool {
        match self {
            Self::Reacting(_) => true,
            Self::Weighing(l) => l.holds_something(),
        }
    }

    pub fn advance(
        &mut self,
        time: Time,
        tuning: Tuning,
        configured: Limits,
    ) -> Option<LimitChange> {
        match self {
            Self::Reacting(l) => l.advance(time, tuning, configured),
            Self::Weighing(l) => l.advance(time, tuning, configured),
        }
    }

    pub fn next_change_ms(&self, tuning: Tuning, configured: Limits) -> Option<u64> {
        match self {
            Self::Reacting(l) => l.next_change_ms(tuning, configured),
            Self::Weighing(l) => l.next_change_ms(tuning, configured),
        }
    }
}
