//! The lease engine: who holds which key, what each quota group has spent, who waits. Plain,
//! synchronous and deterministic: each [`Command`] comes with the current time (two readings,
//! see [`calendar`]) through [`Engine::apply`], which decides the reply, changes the state, and
//! records what happened as notices for the shell to carry out (wake a waiter, stream an event).
//! No I/O, no tokio, no protocol types. [`layout`] lays its commands and state out in bytes
//! for the stores that keep them.
#![forbid(unsafe_code)]

mod acquire;
mod books;
pub mod calendar;
mod catalogue;
pub mod command;
mod ids;
pub mod image;
pub mod layout;
pub mod learning;

mod leases;
mod memory;
mod outage;
pub mod quota;
mod release;
mod views;
mod waiting;

use books::Books;
pub use calendar::{DailyReset, Time};
use catalogue::Catalogue;
pub use command::{Command, Reconfigured, Reply};
pub use image::Image;
use keylease_core::ApiKey;
use keylease_core::{MAX_DETAIL_BYTES, MAX_ID_BYTES, MAX_INPUT_TOKENS};
pub use learning::{Evidence, LimitChange, LimitKind, QuotaViolation};
use leases::LeaseTable;
pub use leases::lease_id;
use memory::Memory;
use outage::Waves;
pub use quota::Amount;
use quota::{BookKeeping, CooldownReason, Limits};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use waiting::Lines;

/// The pool an acquire without one goes to.
pub const DEFAULT_POOL: &str = "gemini";
/// How far the wall clock must move against the steady one to count as stepped (two readings
/// taken one after the other differ by a millisecond or so).
const WALL_STEP_MS: i128 = 1_000;

/// The rules the engine enforces, validated by the configuration before it gets here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub max_requests_per_lease: u32,
    /// The provider's sliding window (60 s for Gemini; shorter for scaled-time tests).
    pub window_ms: u64,
    /// Added to how long a request stays on the books after its lease ends.
    pub safety_margin_ms: u64,
    /// How long a key-related failure keeps the key away from the task that saw it.
    pub exclusion_ttl_ms: u64,
    /// First rate-limit cooldown without a provider retry delay; doubles per repeat.
    pub cooldown_base_ms: u64,
    pub cooldown_max_ms: u64,
    /// How many tasks' exclusions, client request ids and ended leases are remembered.
    pub memory_capacity: usize,
    pub daily: DailyReset,
    pub pools: BTreeMap<String, PoolConfig>,
    /// Windows that press a limit lowered by a 429 without a figure, without another 429,
    /// before it climbs back (see [`learning`]).
    pub relearn_after_windows: u32,
}

impl EngineConfig {
    /// How long what a lease used stays on its group's books.
    fn book_keeping(&self) -> BookKeeping {
        BookKeeping {
            window_ms: self.window_ms,
            safety_margin_ms: self.safety_margin_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Live leases a key may have at once, unless the key says otherwise.
    pub max_leases_per_key: u32,
    /// Limits per canonical model name.
    pub models: BTreeMap<String, Limits>,
    /// Limits of one project for one model, replacing the model's.
    pub project_limits: BTreeMap<(String, String), Limits>,
    /// Limits of any model not listed in `models`; `None`: only those are served.
    pub other_models: Option<Limits>,
}

/// One key as configured. Recorded without its secret: the fingerprint stands for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    pub id: String,
    pub pool: String,
    pub project: String,
    #[serde(skip)]
    pub secret: ApiKey,
    /// A keyed hash of the secret (`keylease_server::secret::FingerprintKey`): the key's identity,
    /// whatever its id. Empty until the shell fingerprints it; the id stands in meanwhile.
    pub fingerprint: String,
    pub max_leases: Option<u32>,
}

impl KeySpec {
    /// What the key is known by across configurations.
    fn identity(&self) -> &str {
        if self.fingerprint.is_empty() {
            &self.id
        } else {
            &self.fingerprint
        }
    }
}

/// Everything the engine is configured with: what a `Configure` command carries and a store
/// records (without secrets) before any command decided under it. Laid out by [`layout`].
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    pub config: EngineConfig,
    pub keys: Vec<KeySpec>,
    /// Fencing tokens from here on are at least this (see `state::token_floor`).
    pub token_floor: u64,
    /// The version of the rules that decide the commands logged after this setup.
    pub rules: u32,
}

/// The version of the engine's rules: raised by any change that could decide a logged command
/// differently on replay. Recovery replays records only under the rules that decided them: from
/// version 2 on, each change is kept behind the version of the engine's setup (the setup a
/// record was decided under names it), so that this build decides an older build's records as
/// that build did, and replays them; a newer build's are refused.
/// Version 2: limits learned from the provider's 429s. Version 3: a pool at its bound of
/// unlisted models forgets the least recently used one nothing holds, where it refused.
/// Version 4: learning weighs evidence, a bare 429 rests briefly and is taken off the books,
/// model capacity and waves rest the pool (see [`learning::weighing`], [`outage`]); input tokens
/// per day are a fourth limit. Version 5: evidence that lowered a limit stands for the next
/// step, and a climb the provider refuses is undone on less (see [`learning::weighing`]).
pub const RULES_VERSION: u32 = 5;
/// The oldest rules this build still decides by: records decided under them replay.
pub const OLDEST_RULES_DECIDED: u32 = 2;
/// The rules from which a pool at its bound forgets an unlisted model.
pub(crate) const RULES_FORGETTING_UNLISTED_MODELS: u32 = 3;
/// The rules from which learning weighs evidence.
pub(crate) const RULES_WEIGHING_EVIDENCE: u32 = 4;
/// The rules from which evidence that lowered a limit stands for the next step.
pub(crate) const RULES_EVIDENCE_STANDING: u32 = 5;

impl Setup {
    /// A setup under this build's rules.
    pub fn new(config: EngineConfig, keys: Vec<KeySpec>, token_floor: u64) -> Self {
        Self {
            config,
            keys,
            token_floor,
            rules: RULES_VERSION,
        }
    }
}

/// `models/gemini-2.5-flash` and `gemini-2.5-flash` are one model.
pub fn canonical_model(model: &str) -> &str {
    let model = model.trim();
    model.strip_prefix("models/").unwrap_or(model)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("lease_id: no lease {0}")]
    LeaseNotFound(String),
    #[error("lease {lease_id}: {reason}")]
    StaleLease { lease_id: String, reason: String },
    #[error("key_id: no key {0}")]
    KeyNotFound(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("key {0} is configured twice")]
    DuplicateKeyId(String),
    #[error("key {0}: its secret is configured under another id too")]
    DuplicateSecret(String),
    #[error("key {key}: unknown pool {pool}")]
    UnknownPool { key: String, pool: String },
}

/// What a worker asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AcquireRequest {
    pub task_id: String,
    /// Empty means [`DEFAULT_POOL`].
    pub pool: String,
    pub model: String,
    pub exclude_key_ids: Vec<String>,
    pub ttl_ms: Option<u64>,
    /// Queue when no key can be lent now (the shell owns the deadline).
    pub wait: bool,
    /// 0 means 1.
    pub requests: u32,
    pub estimated_tokens: u64,
    pub client_request_id: Option<String>,
}

/// A lease as the holder sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseView {
    pub lease_id: String,
    pub key_id: String,
    pub api_key: ApiKey,
    pub fencing_token: u64,
    pub ttl_ms: u64,
    pub expires_ms: u64,
    pub pool: String,
    pub project: String,
    pub model: String,
    pub requests_granted: u32,
    pub task_id: String,
}

/// A lease as others see it: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSummary {
    pub lease_id: String,
    pub task_id: String,
    pub model: String,
    pub fencing_token: u64,
    pub requests_granted: u32,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableReason {
    AllLeased,
    CoolingDown,
    QuotaSpent,
    AllDisabled,
    AllExcluded,
    /// The lease's key is draining: it serves what was granted, nothing more.
    KeyDraining,
}

impl UnavailableReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllLeased => "every usable key is leased",
            Self::CoolingDown => "every usable key's project is cooling down for this model",
            Self::QuotaSpent => "every usable key's project has spent its quota for this model",
            Self::AllDisabled => "every key of the pool is disabled",
            Self::AllExcluded => "every enabled key is excluded for this task",
            Self::KeyDraining => {
                "the lease's key is being removed: it serves what was granted, nothing more"
            }
        }
    }
}

/// Why no key can be lent, and the earliest time one may be, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    pub reason: UnavailableReason,
    pub retry_at_ms: Option<u64>,
}

pub type WaiterId = u64;

#[derive(Debug, Clone, PartialEq)]
pub enum Acquired {
    Granted(LeaseView),
    /// Waiting in line; the grant arrives through [`Engine::drain`].
    Queued(WaiterId),
    Unavailable(Unavailable),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Renewed {
    Done(LeaseView),
    /// The TTL was extended, the extra requests not reserved.
    QuotaUnavailable(LeaseView, Unavailable),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    RateLimited,
    DailyQuotaExhausted,
    InvalidKey,
    PermissionDenied,
    ServerError,
    Timeout,
    Other,
    /// The model has no capacity for anyone (`MODEL_CAPACITY_EXHAUSTED`): the pool rests the
    /// model; no key or project is at fault.
    ModelCapacity,
}

impl FailureKind {
    pub const ALL: [Self; 8] = [
        Self::RateLimited,
        Self::DailyQuotaExhausted,
        Self::InvalidKey,
        Self::PermissionDenied,
        Self::ServerError,
        Self::Timeout,
        Self::Other,
        Self::ModelCapacity,
    ];

    /// Failures that say something about the key or its project, not about the provider.
    pub fn blames_key(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::DailyQuotaExhausted
                | Self::InvalidKey
                | Self::PermissionDenied
        )
    }

    /// The provider refused the call, and so did not count it against any quota.
    pub fn refused_by_provider(self) -> bool {
        matches!(self, Self::RateLimited | Self::ModelCapacity)
    }

    /// Evidence that the key itself is bad: acted on even when it arrives late.
    pub fn disables_key(self) -> bool {
        matches!(self, Self::InvalidKey | Self::PermissionDenied)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate limited",
            Self::DailyQuotaExhausted => "daily quota exhausted",
            Self::InvalidKey => "invalid key",
            Self::PermissionDenied => "permission denied",
            Self::ServerError => "server error",
            Self::Timeout => "timeout",
            Self::Other => "other",
            Self::ModelCapacity => "model capacity",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureReport {
    pub kind: FailureKind,
    pub retry_after_ms: Option<u64>,
    pub detail: String,
    /// `None` counts every granted request as sent.
    pub requests_sent: Option<u32>,
    /// What the provider's 429 named (see [`learning`]).
    pub violations: Vec<QuotaViolation>,
}

/// What a lease used, as its holder reports it at release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// `None`, or more than were granted: every granted request was sent.
    pub requests_sent: Option<u32>,
    /// `None`: the estimate stands. Counts as at most [`MAX_INPUT_TOKENS`].
    pub input_tokens: Option<u64>,
}

impl Usage {
    /// Nothing was sent: a grant handed back without use.
    pub const UNUSED: Self = Self {
        requests_sent: Some(0),
        input_tokens: Some(0),
    };
}

/// What a report did, and what to ask for to replace the lease.
#[derive(Debug, Clone)]
pub struct Reported {
    pub key_id: String,
    /// What the books now hold for the lease; `None` when it had already ended.
    pub booked: Option<Amount>,
    pub replacement: AcquireRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    pub lease: LeaseSummary,
    pub key_id: String,
    pub project: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Granted(LeaseEvent),
    Renewed(LeaseEvent),
    Released {
        lease: LeaseEvent,
        requests_sent: u64,
    },
    Expired(LeaseEvent),
    Failed {
        lease: LeaseEvent,
        kind: FailureKind,
        detail: String,
    },
    CooledDown {
        pool: String,
        project: String,
        model: String,
        until_ms: u64,
        reason: CooldownReason,
    },
    KeyDisabled {
        key_id: String,
        reason: String,
    },
    KeyEnabled {
        key_id: String,
    },
    /// A key came with a new configuration.
    KeyAdded {
        key_id: String,
    },
    /// A key left the configuration while leases run on it: none is granted on it any more,
    /// and it is removed when the last ends.
    KeyDraining {
        key_id: String,
        leases: usize,
    },
    /// A key is gone: it left the configuration, and its last lease has ended.
    KeyRemoved {
        key_id: String,
    },
    /// An operator ended a quota group's cooldown (and made it forget what it learned).
    CooldownReset {
        pool: String,
        project: String,
        model: String,
    },
    /// A limit the books admit changed by what the provider's 429s taught (or an operator
    /// made the group forget it).
    LimitLearned {
        pool: String,
        project: String,
        model: String,
        change: LimitChange,
    },
    /// The configuration was read again (published by the shell, which applies the parts the
    /// engine does not hold: tokens, TLS).
    Reloaded {
        changes: Vec<String>,
        needs_restart: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When it happened; steady times in `kind` convert to wall time with it.
    pub at: Time,
    pub kind: EventKind,
}

/// What the shell must carry out after a command.
#[derive(Debug, Default)]
pub struct Notices {
    pub events: Vec<Event>,
    pub waiter_grants: Vec<(WaiterId, LeaseView)>,
    pub waiter_failures: Vec<(WaiterId, Unavailable)>,
}

impl Notices {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.waiter_grants.is_empty() && self.waiter_failures.is_empty()
    }

    pub fn extend(&mut self, more: Notices) {
        self.events.extend(more.events);
        self.waiter_grants.extend(more.waiter_grants);
        self.waiter_failures.extend(more.waiter_failures);
    }
}

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
}

#[derive(Debug, Clone)]
pub struct KeyView {
    pub key_id: String,
    pub masked_key: String,
    pub pool: String,
    pub project: String,
    pub state: KeyState,
    pub disabled_reason: Option<String>,
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
    /// (pool, model, waiters).
    pub waiting: Vec<(String, String, usize)>,
    /// The last key of this page, when more follow: the next page starts after it.
    pub next_after: Option<String>,
    pub total_keys: usize,
    pub live_leases: usize,
    pub now: Time,
}

/// The engine: its parts, each keeping its own invariants, and the time it has reached.
pub struct Engine {
    config: EngineConfig,
    catalogue: Catalogue,
    leases: LeaseTable,
    books: Books,
    lines: Lines,
    memory: Memory,
    /// The latest time seen: its steady reading never runs backwards.
    time: Time,
    /// Something freed capacity since waiters were last served.
    freed: bool,
    /// How many times a waiter was considered for a key: the cost of serving lines.
    #[cfg(test)]
    waiters_looked_at: u64,
    notices: Notices,
    /// Draining keys whose last lease ended during the current command: announced as removed
    /// once it is done.
    drained: Vec<ids::KeyIdx>,
    /// The rules it decides by: its setup's (see [`RULES_VERSION`]).
    rules: u32,
    /// Recent answers of each project, to tell a wave across the pool from its quota.
    waves: Waves,
}

impl Engine {
    /// An engine with nothing leased yet, configured by `setup`: what the first `Configure`
    /// record of a log starts from.
    pub fn new(setup: Setup, now: Time) -> Result<Self, SetupError> {
        Self::with_draining(setup, Vec::new(), now).map(|(engine, _)| engine)
    }

    /// An engine configured by `setup` whose catalogue also holds the `draining` keys (no
    /// longer configured, still leased); those it could not hold are returned.
    fn with_draining(
        setup: Setup,
        draining: Vec<KeySpec>,
        now: Time,
    ) -> Result<(Self, Vec<KeySpec>), SetupError> {
        let Setup {
            config,
            keys,
            token_floor,
            rules,
        } = setup;
        let (catalogue, left_out) = Catalogue::new(&config, keys, draining)?;
        let engine = Self {
            books: Books::new(&config, &catalogue, rules),
            waves: Waves::default(),
            leases: LeaseTable::new(token_floor, config.memory_capacity),
            memory: Memory::new(config.memory_capacity),
            lines: Lines::new(),
            catalogue,
            config,
            time: now,
            freed: false,
            #[cfg(test)]
            waiters_looked_at: 0,
            notices: Notices::default(),
            drained: Vec::new(),
            rules,
        };
        Ok((engine, left_out))
    }

    /// The setup the engine runs under (with secrets; a record leaves them out): its configured
    /// keys, not the draining ones.
    pub fn setup(&self) -> Setup {
        let keys = self.catalogue.keys().iter().filter(|key| !key.draining);
        Setup {
            rules: self.rules,
            ..Setup::new(
                self.config.clone(),
                keys.map(|key| key.spec.clone()).collect(),
                0,
            )
        }
    }

    /// Keys no longer configured that still serve live leases: a snapshot keeps them beside
    /// the setup.
    pub fn draining_keys(&self) -> Vec<KeySpec> {
        self.catalogue
            .keys()
            .iter()
            .filter(|key| key.draining && !key.is_gone())
            .map(|key| key.spec.clone())
            .collect()
    }

    /// The latest time the engine has seen.
    pub fn now(&self) -> Time {
        self.time
    }

    /// The fencing token the next grant gets.
    pub fn next_fencing_token(&self) -> u64 {
        self.leases.next_token()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Everything the shell must carry out since the last call.
    fn drain(&mut self) -> Notices {
        std::mem::take(&mut self.notices)
    }

    /// Whether any acquire waits in line (a line may wait for the calendar: see
    /// [`Engine::next_wakeup_ms`]).
    pub fn has_waiters(&self) -> bool {
        self.lines.has_waiters()
    }

    /// The steady time at which the engine next needs [`Command::Tick`] without a command: a
    /// lease expires, or the books change for someone waiting. A day turning is foreseen from
    /// the wall clock as it reads now; a shell that has waiters ticks often enough to follow a
    /// stepped wall clock.
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        let expiry = self.leases.first_expiry().map(|(at, _)| at);
        match (expiry, self.lines.next_wake()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether [`Command::Tick`] at `now` would change anything: a lease expired, a line is due
    /// to be looked at again, or the wall clock was stepped. A read at `now` is only current
    /// after such a tick.
    pub fn tick_due(&self, now: Time) -> bool {
        self.next_wakeup_ms().is_some_and(|at| at <= now.steady_ms)
            || self.freed
            || (now.wall_offset_ms() - self.time.wall_offset_ms()).abs() > WALL_STEP_MS
    }

    /// The engine's time at `now`: its steady reading never runs backwards.
    fn time_at(&self, now: Time) -> Time {
        Time::new(now.wall_ms, self.time.steady_ms.max(now.steady_ms))
    }

    /// Brings the state to `now`: ends expired leases and serves waiters that can now be.
    fn tick(&mut self, now: impl Into<Time>) -> Time {
        let time = self.time_at(now.into());
        if (time.wall_offset_ms() - self.time.wall_offset_ms()).abs() > WALL_STEP_MS {
            // The lines' wake times were foreseen from the wall clock as it read then, and a
            // day may have turned: look at every line again.
            self.freed = true;
        }
        self.time = time;
        while let Some((expires_ms, token)) = self.leases.first_expiry() {
            if expires_ms > time.steady_ms {
                break;
            }
            let used = self.leases.get(token).expect("live").reserved();
            let event = self.end_lease(token, time, used);
            self.emit(time, EventKind::Expired(event));
        }
        if self.freed || self.lines.wake_due(time.steady_ms) {
            self.freed = false;
            self.serve_waiters(time);
        }
        time
    }

    /// Every waiter leaves its line, told nothing: their callers are gone. The lines are
    /// emptied before the engine is brought to `now`, so that nothing is decided for them.
    fn drop_waiters(&mut self, now: impl Into<Time>) -> usize {
        let dropped = self.lines.clear();
        self.tick(now);
        dropped
    }

    fn emit(&mut self, at: Time, kind: EventKind) {
        self.notices.events.push(Event { at, kind });
    }
}

const DAY_MS: u64 = 24 * 3_600_000;

fn validate_id(field: &'static str, id: &str, required: bool) -> Result<(), EngineError> {
    if required && id.is_empty() {
        return Err(invalid(field, "empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes is above the maximum of {MAX_ID_BYTES}", id.len()),
        ));
    }
    Ok(())
}

/// A token figure from a caller, bounded so that no sum of them can overflow.
fn validate_tokens(field: &'static str, tokens: u64) -> Result<(), EngineError> {
    if tokens > MAX_INPUT_TOKENS {
        return Err(invalid(
            field,
            format!("{tokens} is above the maximum of {MAX_INPUT_TOKENS}"),
        ));
    }
    Ok(())
}

/// Free text from a caller (a failure's detail, a disable's reason), bounded in size.
fn validate_detail(field: &'static str, text: &str) -> Result<(), EngineError> {
    if text.len() > MAX_DETAIL_BYTES {
        return Err(invalid(
            field,
            format!(
                "{} bytes is above the maximum of {MAX_DETAIL_BYTES}",
                text.len()
            ),
        ));
    }
    Ok(())
}

fn show_ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests;
