//! The engine's state as operators see it: keys, quota groups and their limits, counts.

use super::*;

/// How much state the engine holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub live_leases: usize,
    pub disabled_keys: usize,
    pub quota_groups: usize,
    pub cooling_groups: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Available,
    Leased,
    CoolingDown,
    Disabled,
    /// No longer configured: its live leases run to their end, then it is gone.
    Draining,
    /// Lent, though its last check with the provider got no answer that says anything of it.
    Unchecked,
    /// Added while keys are checked: not lent before its first check answers.
    Checking,
}

#[derive(Debug, Clone)]
pub struct KeyView {
    pub key_id: String,
    pub masked_key: String,
    pub pool: String,
    pub project: String,
    pub state: KeyState,
    pub disabled: Option<Disabled>,
    pub last_check: Option<KeyCheck>,
    pub record: KeyRecord,
    pub max_leases: u32,
    pub leases: Vec<LeaseSummary>,
    pub cooling_until_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageView {
    pub used: u64,
    pub limit: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct GroupView {
    pub pool: String,
    pub project: String,
    pub model: String,
    /// `limit` is what the books admit: the lower of configured and learned.
    pub requests_per_minute: UsageView,
    pub tokens_per_minute: UsageView,
    pub requests_per_day: UsageView,
    pub tokens_per_day: UsageView,
    pub cooldown: Option<quota::Cooldown>,
    /// Per limit kind, in [`LimitKind`] order.
    pub limits: [LimitView; 4],
    /// The 429 the group last learned from.
    pub last_429: Option<Evidence>,
    /// What the provider's answers showed lately, where they are weighed.
    pub answers: Option<Box<learning::weighing::Answers>>,
}

/// One limit of a group: as configured, and as learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitView {
    pub configured: Option<u64>,
    /// Configured `auto`: the figure is a ceiling.
    pub auto: bool,
    pub learned: Option<learning::LearnedLimit>,
}

#[derive(Debug, Clone)]
pub struct StatusView {
    pub keys: Vec<KeyView>,
    pub groups: Vec<GroupView>,
    /// (pool, model, waiters): acquires and renewals in line.
    pub waiting: Vec<(String, String, usize)>,
    /// The same by tenant and class, where waiters were made for a tenant (rules 9 on, with
    /// tenants configured): by pool, model, class, then tenant.
    pub tenants_waiting: Vec<TenantWaiting>,
    /// The last key of this page, when more follow: the next page starts after it.
    pub next_after: Option<String>,
    pub total_keys: usize,
    pub live_leases: usize,
    pub now: Time,
    /// The quota window the per-minute figures count over.
    pub window_ms: u64,
}

/// How many waiters of one tenant and class stand in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantWaiting {
    pub pool: String,
    pub model: String,
    pub tenant: String,
    pub priority: crate::tenants::Priority,
    pub waiters: usize,
}
