//! The lease engine: who holds which key, what each quota group has spent, who waits. Plain,
//! synchronous and deterministic: each [`Command`] comes with the current time (two readings,
//! see [`calendar`]) through [`Engine::apply`], which decides the reply, changes the state, and
//! records what happened as notices for the shell to carry out (wake a waiter, stream an event).
//! No I/O, no tokio, no protocol types.

pub mod calendar;
pub mod command;
pub mod image;
pub mod quota;

use crate::secret::ApiKey;
pub use calendar::{DailyReset, Time};
pub use command::{Command, Reconfigured, Reply};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
pub use image::Image;
use keylease::{MAX_DETAIL_BYTES, MAX_ID_BYTES, MAX_INPUT_TOKENS};
use lru::LruCache;
pub use quota::Amount;
use quota::{BookKeeping, CooldownReason, Limits, QuotaGroup};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;

/// The pool an acquire without one goes to.
pub const DEFAULT_POOL: &str = "gemini";
/// How many grantable keys, least recently used first, are compared for quota headroom.
const SPREAD_CANDIDATES: usize = 4;
const LEASE_ID_PREFIX: &str = "lease-";
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
}

/// One key as configured. Recorded without its secret: the fingerprint stands for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    pub id: String,
    pub pool: String,
    pub project: String,
    #[serde(skip)]
    pub secret: ApiKey,
    /// A keyed hash of the secret ([`crate::secret::Fingerprinter`]): the key's identity,
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
/// records (without secrets) before any command decided under it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub config: EngineConfig,
    pub keys: Vec<KeySpec>,
    /// Fencing tokens from here on are at least this (see [`token_floor`]).
    pub token_floor: u64,
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
}

impl UnavailableReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllLeased => "every usable key is leased",
            Self::CoolingDown => "every usable key's project is cooling down for this model",
            Self::QuotaSpent => "every usable key's project has spent its quota for this model",
            Self::AllDisabled => "every key of the pool is disabled",
            Self::AllExcluded => "every enabled key is excluded for this task",
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
}

impl FailureKind {
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
    pub requests_per_minute: UsageView,
    pub tokens_per_minute: UsageView,
    pub requests_per_day: UsageView,
    pub cooldown: Option<quota::Cooldown>,
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

type PoolIdx = u32;
type ProjectIdx = u32;
type ModelIdx = u32;
type KeyIdx = usize;
type Token = u64;

/// A (pool, project, model): the unit the provider's limits apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    pool: PoolIdx,
    project: ProjectIdx,
    model: ModelIdx,
}

#[derive(Debug)]
struct Key {
    spec: KeySpec,
    pool: PoolIdx,
    project: ProjectIdx,
    max_leases: u32,
    disabled: Option<String>,
    /// Fencing tokens of its live leases.
    live: Vec<Token>,
    /// Orders the pool's free keys: least recently granted first.
    last_granted_ms: u64,
}

impl Key {
    fn has_free_slot(&self) -> bool {
        self.disabled.is_none() && (self.live.len() as u32) < self.max_leases
    }
}

#[derive(Debug)]
struct Pool {
    name: String,
    config: PoolConfig,
    keys: Vec<KeyIdx>,
    enabled_keys: usize,
    /// Enabled keys with a free slot, least recently granted first.
    free: BTreeSet<(u64, KeyIdx)>,
    /// Per model: the largest limit of any project (`None`: some project has no limit), so
    /// that an ask no project could ever serve is refused at once.
    largest_limits: HashMap<ModelIdx, Limits>,
}

#[derive(Debug, Clone)]
struct Lease {
    key: KeyIdx,
    task_id: String,
    model: ModelIdx,
    requests: u64,
    tokens: u64,
    ttl_ms: u64,
    expires_ms: u64,
}

impl Lease {
    /// What the lease holds on its group's books.
    fn reserved(&self) -> Amount {
        Amount {
            requests: self.requests,
            tokens: self.tokens,
        }
    }

    /// What its holder says it used, as the books take it: requests at most those granted,
    /// tokens at most [`MAX_INPUT_TOKENS`]; what is not said, as reserved.
    fn used(&self, usage: Usage) -> Amount {
        Amount {
            requests: usage
                .requests_sent
                .map_or(self.requests, |sent| u64::from(sent).min(self.requests)),
            tokens: usage
                .input_tokens
                .map_or(self.tokens, |tokens| tokens.min(MAX_INPUT_TOKENS)),
        }
    }
}

#[derive(Debug, Clone)]
struct Waiter {
    task_id: String,
    excluded: HashSet<KeyIdx>,
    requests: u64,
    tokens: u64,
    ttl_ms: u64,
    client_request_id: Option<String>,
    /// When the task's exclusions that were running as it joined the line end.
    exclusion_ends: Vec<u64>,
}

/// The line for one (pool, model).
#[derive(Debug, Default)]
struct WaitQueue {
    /// In line order: waiter ids only grow, so the first is the one waiting longest. A map, so
    /// that a waiter leaves from anywhere in the line in O(log n).
    waiters: BTreeMap<WaiterId, Waiter>,
    /// Groups an earlier waiter could not have at the last pass (spent or cooling): later
    /// arrivals keep off them.
    blocked: HashSet<GroupKey>,
    /// (end, waiter) of the waiters' exclusions: the line is looked at again when one ends.
    exclusion_ends: BTreeSet<(u64, WaiterId)>,
    /// When the books next change by themselves, so the line is looked at again.
    wake_at_ms: Option<u64>,
}

impl WaitQueue {
    fn push(&mut self, id: WaiterId, waiter: Waiter) {
        for &end in &waiter.exclusion_ends {
            self.exclusion_ends.insert((end, id));
        }
        self.waiters.insert(id, waiter);
    }

    fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        for &end in &waiter.exclusion_ends {
            self.exclusion_ends.remove(&(end, id));
        }
        Some(waiter)
    }
}

/// Keys a task failed on, with when each exclusion ends.
type TaskExclusions = Vec<(KeyIdx, u64)>;

enum Selection {
    Key(KeyIdx),
    /// No key; these groups were usable but could not serve the ask now (spent or cooling).
    None {
        unaffordable: Vec<GroupKey>,
    },
}

/// Every quota group's books, with the limits each is opened with.
#[derive(Debug)]
struct Books {
    groups: HashMap<GroupKey, QuotaGroup>,
    /// A model's limits in a pool.
    model_limits: HashMap<(PoolIdx, ModelIdx), Limits>,
    /// A project's own limits for a model, replacing the model's.
    project_limits: HashMap<GroupKey, Limits>,
    daily: DailyReset,
}

impl Books {
    /// The limits a group is held to: its project's own, or else its model's.
    fn limits_of(&self, key: GroupKey) -> Limits {
        self.project_limits
            .get(&key)
            .or_else(|| self.model_limits.get(&(key.pool, key.model)))
            .copied()
            .unwrap_or_default()
    }

    /// The group's books brought to `now` (opened on first use).
    fn group(&mut self, key: GroupKey, now: Time) -> &mut QuotaGroup {
        let limits = self.limits_of(key);
        let group = self
            .groups
            .entry(key)
            .or_insert_with(|| QuotaGroup::new(limits, now, self.daily));
        group.advance(now, self.daily);
        group
    }
}

/// Names of projects or models, interned: small indexes inside the engine, names at its edges.
#[derive(Debug, Default)]
struct Names {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Names {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&idx) = self.index.get(name) {
            return idx;
        }
        let idx = self.names.len() as u32;
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), idx);
        idx
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    fn name(&self, idx: u32) -> &str {
        &self.names[idx as usize]
    }
}

pub struct Engine {
    config: EngineConfig,
    keys: Vec<Key>,
    key_by_id: HashMap<String, KeyIdx>,
    pools: Vec<Pool>,
    pool_by_name: HashMap<String, PoolIdx>,
    projects: Names,
    models: Names,
    books: Books,
    /// Consecutive rate-limit cooldowns without a provider delay, per (pool, project).
    backoff: HashMap<(PoolIdx, ProjectIdx), u32>,
    leases: HashMap<Token, Lease>,
    expiries: BTreeSet<(u64, Token)>,
    /// Live leases of each task.
    task_leases: HashMap<String, Vec<Token>>,
    // What the engine remembers about tasks, requests and ended leases is bounded, the least
    // recently touched forgotten first, so that no client can grow the server without limit.
    exclusions: LruCache<String, TaskExclusions>,
    request_ids: LruCache<String, Token>,
    /// Leases that ended, as they last were: to act on late evidence of a bad key.
    ended: LruCache<Token, Lease>,
    queues: BTreeMap<(PoolIdx, ModelIdx), WaitQueue>,
    /// The line each waiter stands in.
    waiter_lines: HashMap<WaiterId, (PoolIdx, ModelIdx)>,
    next_token: Token,
    next_waiter: WaiterId,
    /// The latest time seen: its steady reading never runs backwards.
    time: Time,
    /// Something freed capacity since waiters were last served.
    freed: bool,
    /// How many times a waiter was considered for a key: the cost of serving lines.
    #[cfg(test)]
    waiters_looked_at: u64,
    notices: Notices,
}

impl Engine {
    /// An engine with nothing leased yet, configured by `setup`: what the first `Configure`
    /// record of a log starts from.
    pub fn new(setup: Setup, now: Time) -> Result<Self, SetupError> {
        let Setup {
            config,
            keys,
            token_floor,
        } = setup;
        let daily = config.daily;
        let memory_capacity =
            NonZeroUsize::new(config.memory_capacity).unwrap_or(NonZeroUsize::MIN);
        let mut engine = Self {
            exclusions: LruCache::new(memory_capacity),
            request_ids: LruCache::new(memory_capacity),
            ended: LruCache::new(memory_capacity),
            config,
            keys: Vec::new(),
            key_by_id: HashMap::new(),
            pools: Vec::new(),
            pool_by_name: HashMap::new(),
            projects: Names::default(),
            models: Names::default(),
            books: Books {
                groups: HashMap::new(),
                model_limits: HashMap::new(),
                project_limits: HashMap::new(),
                daily,
            },
            backoff: HashMap::new(),
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            task_leases: HashMap::new(),
            queues: BTreeMap::new(),
            waiter_lines: HashMap::new(),
            next_token: token_floor.max(1),
            next_waiter: 1,
            time: now,
            freed: false,
            #[cfg(test)]
            waiters_looked_at: 0,
            notices: Notices::default(),
        };
        for (name, pool_config) in engine.config.pools.clone() {
            let pool = engine.pools.len() as PoolIdx;
            let mut largest_limits = HashMap::new();
            for (model, limits) in &pool_config.models {
                let model = engine.models.intern(model);
                engine.books.model_limits.insert((pool, model), *limits);
                largest_limits.insert(model, *limits);
            }
            for ((project, model), limits) in &pool_config.project_limits {
                let group = GroupKey {
                    pool,
                    project: engine.projects.intern(project),
                    model: engine.models.intern(model),
                };
                engine.books.project_limits.insert(group, *limits);
                let largest = largest_limits.entry(group.model).or_insert(*limits);
                *largest = larger_limits(*largest, *limits);
            }
            engine.pool_by_name.insert(name.clone(), pool);
            engine.pools.push(Pool {
                name,
                config: pool_config,
                keys: Vec::new(),
                enabled_keys: 0,
                free: BTreeSet::new(),
                largest_limits,
            });
        }
        let mut identities = HashSet::new();
        for spec in keys {
            if engine.key_by_id.contains_key(&spec.id) {
                return Err(SetupError::DuplicateKeyId(spec.id));
            }
            if !identities.insert(spec.identity().to_string()) {
                return Err(SetupError::DuplicateSecret(spec.id));
            }
            let Some(&pool) = engine.pool_by_name.get(&spec.pool) else {
                return Err(SetupError::UnknownPool {
                    key: spec.id,
                    pool: spec.pool,
                });
            };
            let project = engine.projects.intern(&spec.project);
            let idx = engine.keys.len();
            let pool_entry = &mut engine.pools[pool as usize];
            let max_leases = spec
                .max_leases
                .unwrap_or(pool_entry.config.max_leases_per_key);
            pool_entry.keys.push(idx);
            pool_entry.enabled_keys += 1;
            pool_entry.free.insert((0, idx));
            engine.key_by_id.insert(spec.id.clone(), idx);
            engine.keys.push(Key {
                spec,
                pool,
                project,
                max_leases,
                disabled: None,
                live: Vec::new(),
                last_granted_ms: 0,
            });
        }
        Ok(engine)
    }

    /// Every waiter leaves its line, told nothing: their callers are gone.
    fn drop_waiters(&mut self, now: impl Into<Time>) -> usize {
        self.tick(now);
        let dropped = self.waiter_lines.len();
        self.queues.clear();
        self.waiter_lines.clear();
        dropped
    }

    /// The setup the engine runs under (with secrets; a record leaves them out).
    pub fn setup(&self) -> Setup {
        Setup {
            config: self.config.clone(),
            keys: self.keys.iter().map(|key| key.spec.clone()).collect(),
            token_floor: 0,
        }
    }

    /// The latest time the engine has seen.
    pub fn now(&self) -> Time {
        self.time
    }

    /// How much state there is, at `now`: for the start-up log.
    pub fn counts(&self, now: Time) -> Counts {
        let now = self.time_at(now);
        Counts {
            live_leases: self.leases.len(),
            disabled_keys: self.keys.iter().filter(|k| k.disabled.is_some()).count(),
            quota_groups: self.books.groups.len(),
            cooling_groups: self
                .books
                .groups
                .values()
                .filter(|g| g.cooldown().is_some_and(|c| c.until_ms > now.steady_ms))
                .count(),
        }
    }

    /// The fencing token the next grant gets.
    pub fn next_fencing_token(&self) -> u64 {
        self.next_token
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
        !self.waiter_lines.is_empty()
    }

    /// The steady time at which the engine next needs [`Engine::tick`] without a command: a
    /// lease expires, or the books change for someone waiting. A day turning is foreseen from
    /// the wall clock as it reads now; a shell that has waiters ticks often enough to follow a
    /// stepped wall clock.
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        let expiry = self.expiries.first().map(|&(at, _)| at);
        let queues = self.queues.values().filter_map(|q| q.wake_at_ms).min();
        match (expiry, queues) {
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
        while let Some(&(expires_ms, token)) = self.expiries.first() {
            if expires_ms > time.steady_ms {
                break;
            }
            let used = self.leases[&token].reserved();
            let event = self.end_lease(token, time, used);
            self.emit(time, EventKind::Expired(event));
        }
        let wake_due = self
            .queues
            .values()
            .any(|q| q.wake_at_ms.is_some_and(|at| at <= time.steady_ms));
        if self.freed || wake_due {
            self.freed = false;
            self.serve_waiters(time);
        }
        time
    }

    // ---- acquire -------------------------------------------------------------------------

    fn acquire(
        &mut self,
        now: impl Into<Time>,
        request: AcquireRequest,
    ) -> Result<Acquired, EngineError> {
        let time = self.tick(now);
        let now = time.steady_ms;
        let ask = self.validate_acquire(&request)?;

        if let Some(id) = &request.client_request_id
            && let Some(&token) = self.request_ids.peek(id)
        {
            return match self.leases.get(&token) {
                Some(lease) if lease.task_id == request.task_id => {
                    Ok(Acquired::Granted(self.view(token)))
                }
                Some(_) => Err(invalid("client_request_id", "already used by another task")),
                None => Err(EngineError::StaleLease {
                    lease_id: lease_id(token),
                    reason: "the lease granted for this client_request_id has ended".into(),
                }),
            };
        }

        if let Some(token) =
            self.held_lease(&request.task_id, ask.pool, ask.model, &ask.excluded, now)
        {
            return Ok(Acquired::Granted(self.view(token)));
        }

        let queue_key = (ask.pool, ask.model);
        let blocked = self
            .queues
            .get(&queue_key)
            .map(|q| q.blocked.clone())
            .unwrap_or_default();
        let selection = self.select(
            time,
            ask.pool,
            ask.model,
            &request.task_id,
            &ask.excluded,
            &blocked,
            ask.requests,
            ask.tokens,
        );
        match selection {
            Selection::Key(key) => {
                let token = self.grant(
                    time,
                    key,
                    &request.task_id,
                    ask.model,
                    ask.requests,
                    ask.tokens,
                    ask.ttl_ms,
                    request.client_request_id,
                    None,
                );
                Ok(Acquired::Granted(self.view(token)))
            }
            Selection::None { unaffordable } => {
                let unavailable = self.unavailable(
                    time,
                    ask.pool,
                    ask.model,
                    &request.task_id,
                    &ask.excluded,
                    ask.requests,
                    ask.tokens,
                );
                let hopeless = matches!(
                    unavailable.reason,
                    UnavailableReason::AllDisabled | UnavailableReason::AllExcluded
                );
                if !request.wait || hopeless {
                    return Ok(Acquired::Unavailable(unavailable));
                }
                let id = self.next_waiter;
                self.next_waiter += 1;
                let exclusion_ends = self
                    .exclusions
                    .peek(request.task_id.as_str())
                    .map(|list| {
                        list.iter()
                            .map(|&(_, until)| until)
                            .filter(|&until| until > now)
                            .collect()
                    })
                    .unwrap_or_default();
                let mut queue = self.queues.remove(&queue_key).unwrap_or_default();
                queue.blocked.extend(unaffordable);
                queue.push(
                    id,
                    Waiter {
                        task_id: request.task_id,
                        excluded: ask.excluded,
                        requests: ask.requests,
                        tokens: ask.tokens,
                        ttl_ms: ask.ttl_ms,
                        client_request_id: request.client_request_id,
                        exclusion_ends,
                    },
                );
                queue.wake_at_ms = self.queue_wake_at(time, ask.pool, &queue);
                self.queues.insert(queue_key, queue);
                self.waiter_lines.insert(id, queue_key);
                Ok(Acquired::Queued(id))
            }
        }
    }

    /// Takes a waiter out of line (deadline, disconnect). `None` when it is no longer waiting
    /// (it was granted or failed, and that is in the notices); otherwise why it got nothing.
    fn cancel_waiter(&mut self, now: impl Into<Time>, id: WaiterId) -> Option<Unavailable> {
        let time = self.tick(now);
        let queue_key = self.waiter_lines.remove(&id)?;
        let (pool, model) = queue_key;
        let queue = self
            .queues
            .get_mut(&queue_key)
            .expect("a waiter's line exists");
        let waiter = queue.remove(id).expect("a waiter is in its line");
        // A waiter leaving can unblock those behind it only where the line holds groups back.
        if queue.waiters.is_empty() {
            self.queues.remove(&queue_key);
        } else if !queue.blocked.is_empty() {
            self.freed = true;
        }
        let unavailable = self.unavailable(
            time,
            pool,
            model,
            &waiter.task_id,
            &waiter.excluded,
            waiter.requests,
            waiter.tokens,
        );
        self.tick(time);
        Some(unavailable)
    }

    fn validate_acquire(&self, request: &AcquireRequest) -> Result<Ask, EngineError> {
        validate_id("task_id", &request.task_id, true)?;
        if let Some(id) = &request.client_request_id {
            validate_id("client_request_id", id, false)?;
        }
        let pool_name = if request.pool.is_empty() {
            DEFAULT_POOL
        } else {
            request.pool.as_str()
        };
        let &pool = self
            .pool_by_name
            .get(pool_name)
            .ok_or_else(|| invalid("pool", format!("unknown pool {pool_name:?}")))?;
        let model = self.model_of(pool, &request.model)?;
        let ttl_ms =
            self.validate_ttl(request.ttl_ms.unwrap_or(self.config.default_ttl_ms), false)?;
        validate_tokens("estimated_input_tokens", request.estimated_tokens)?;
        let requests = u64::from(request.requests.max(1));
        if requests > u64::from(self.config.max_requests_per_lease) {
            return Err(invalid(
                "requests",
                format!(
                    "{requests} is above the maximum of {} per lease",
                    self.config.max_requests_per_lease
                ),
            ));
        }
        self.check_servable(pool, model, requests, request.estimated_tokens)?;
        let excluded = request
            .exclude_key_ids
            .iter()
            .filter_map(|id| self.key_by_id.get(id).copied())
            .collect();
        Ok(Ask {
            pool,
            model,
            ttl_ms,
            requests,
            tokens: request.estimated_tokens,
            excluded,
        })
    }

    fn model_of(&self, pool: PoolIdx, model: &str) -> Result<ModelIdx, EngineError> {
        let name = canonical_model(model);
        if name.is_empty() {
            return Err(invalid("model", "empty"));
        }
        let pool = &self.pools[pool as usize];
        self.models
            .get(name)
            .filter(|m| pool.largest_limits.contains_key(m))
            .ok_or_else(|| {
                let known: Vec<&str> = pool.config.models.keys().map(String::as_str).collect();
                invalid(
                    "model",
                    format!(
                        "unknown model {name:?} in pool {:?} (known: {})",
                        pool.name,
                        known.join(", ")
                    ),
                )
            })
    }

    /// A TTL of zero or above the maximum is refused, or capped when `cap` (renewals).
    fn validate_ttl(&self, ttl_ms: u64, cap: bool) -> Result<u64, EngineError> {
        if ttl_ms == 0 {
            return Err(invalid("ttl", "must be above zero"));
        }
        if ttl_ms > self.config.max_ttl_ms {
            if cap {
                return Ok(self.config.max_ttl_ms);
            }
            return Err(invalid(
                "ttl",
                format!(
                    "{} is above the maximum {}",
                    show_ms(ttl_ms),
                    show_ms(self.config.max_ttl_ms)
                ),
            ));
        }
        Ok(ttl_ms)
    }

    /// Refuses an ask that no project of the pool could ever afford.
    fn check_servable(
        &self,
        pool: PoolIdx,
        model: ModelIdx,
        requests: u64,
        tokens: u64,
    ) -> Result<(), EngineError> {
        let largest = self.pools[pool as usize].largest_limits[&model];
        let name = self.models.name(model);
        for (field, amount, limit, what) in [
            (
                "requests",
                requests,
                largest.requests_per_minute,
                "requests per minute",
            ),
            (
                "requests",
                requests,
                largest.requests_per_day,
                "requests per day",
            ),
            (
                "estimated_input_tokens",
                tokens,
                largest.tokens_per_minute,
                "tokens per minute",
            ),
        ] {
            if let Some(limit) = limit
                && amount > limit
            {
                return Err(invalid(
                    field,
                    format!("{amount} exceeds the limit of {limit} {what} of {name}"),
                ));
            }
        }
        Ok(())
    }

    /// The task's live lease for this pool and model, unless its key is now excluded.
    fn held_lease(
        &self,
        task: &str,
        pool: PoolIdx,
        model: ModelIdx,
        excluded: &HashSet<KeyIdx>,
        now: u64,
    ) -> Option<Token> {
        let tokens = self.task_leases.get(task)?;
        tokens.iter().copied().find(|token| {
            let lease = &self.leases[token];
            lease.model == model
                && self.keys[lease.key].pool == pool
                && !excluded.contains(&lease.key)
                && !self.task_excludes(task, lease.key, now)
        })
    }

    fn task_excludes(&self, task: &str, key: KeyIdx, now: u64) -> bool {
        self.exclusions
            .peek(task)
            .is_some_and(|list| list.iter().any(|&(k, until)| k == key && until > now))
    }

    /// Picks a key for an ask: among the first grantable keys, least recently used first, the
    /// one whose group has the most headroom.
    #[allow(clippy::too_many_arguments)]
    fn select(
        &mut self,
        time: Time,
        pool: PoolIdx,
        model: ModelIdx,
        task: &str,
        excluded: &HashSet<KeyIdx>,
        blocked: &HashSet<GroupKey>,
        requests: u64,
        tokens: u64,
    ) -> Selection {
        let now = time.steady_ms;
        let task_exclusions: Vec<KeyIdx> = self
            .exclusions
            .peek(task)
            .map(|list| {
                list.iter()
                    .filter(|&&(_, until)| until > now)
                    .map(|&(k, _)| k)
                    .collect()
            })
            .unwrap_or_default();
        let mut unaffordable = Vec::new();
        let mut best: Option<(KeyIdx, f64)> = None;
        let mut candidates = 0;
        let pool_entry = &self.pools[pool as usize];
        for &(_, key) in &pool_entry.free {
            if excluded.contains(&key) || task_exclusions.contains(&key) {
                continue;
            }
            let group_key = GroupKey {
                pool,
                project: self.keys[key].project,
                model,
            };
            if blocked.contains(&group_key) || unaffordable.contains(&group_key) {
                continue;
            }
            let group = self.books.group(group_key, time);
            if group.cooldown().is_some() || !group.can_afford(requests, tokens) {
                unaffordable.push(group_key);
                continue;
            }
            let headroom = group.headroom();
            if best.is_none_or(|(_, h)| headroom > h) {
                best = Some((key, headroom));
            }
            candidates += 1;
            if candidates == SPREAD_CANDIDATES {
                break;
            }
        }
        match best {
            Some((key, _)) => Selection::Key(key),
            None => Selection::None { unaffordable },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        time: Time,
        key: KeyIdx,
        task: &str,
        model: ModelIdx,
        requests: u64,
        tokens: u64,
        ttl_ms: u64,
        client_request_id: Option<String>,
        waiter: Option<WaiterId>,
    ) -> Token {
        let now = time.steady_ms;
        let token = self.next_token;
        self.next_token += 1;
        let pool = self.keys[key].pool;
        let group_key = GroupKey {
            pool,
            project: self.keys[key].project,
            model,
        };
        self.books
            .groups
            .get_mut(&group_key)
            .expect("select looked the group up")
            .reserve(requests, tokens);
        self.set_free(key, false);
        let entry = &mut self.keys[key];
        entry.live.push(token);
        entry.last_granted_ms = now;
        self.set_free(key, true);
        let expires_ms = now + ttl_ms;
        self.leases.insert(
            token,
            Lease {
                key,
                task_id: task.to_string(),
                model,
                requests,
                tokens,
                ttl_ms,
                expires_ms,
            },
        );
        self.expiries.insert((expires_ms, token));
        self.task_leases
            .entry(task.to_string())
            .or_default()
            .push(token);
        if let Some(id) = client_request_id {
            self.request_ids.put(id, token);
        }
        let event = self.lease_event(token);
        self.emit(time, EventKind::Granted(event));
        if let Some(waiter) = waiter {
            let view = self.view(token);
            self.notices.waiter_grants.push((waiter, view));
        }
        token
    }

    /// Keeps `key`'s place in its pool's free set in step with its state: call with `false`
    /// before changing what orders or qualifies it, and with `true` after.
    fn set_free(&mut self, key: KeyIdx, after_change: bool) {
        let entry = &self.keys[key];
        let slot = (entry.last_granted_ms, key);
        let free = &mut self.pools[entry.pool as usize].free;
        if after_change && entry.has_free_slot() {
            free.insert(slot);
        } else {
            free.remove(&slot);
        }
    }

    /// Serves every line in order, first come first served: a waiter is passed over only for
    /// keys it cannot use (excluded) or groups an earlier waiter could not have. A pass over a
    /// line stops as soon as no one further back could get anything, so that a long line
    /// waiting on spent quota costs little to look at.
    fn serve_waiters(&mut self, time: Time) {
        let keys: Vec<(PoolIdx, ModelIdx)> = self.queues.keys().copied().collect();
        for queue_key in keys {
            let mut queue = std::mem::take(self.queues.get_mut(&queue_key).expect("listed"));
            let (pool, model) = queue_key;
            let mut blocked = HashSet::new();
            let mut next = queue.waiters.first_key_value().map(|(&id, _)| id);
            while let Some(id) = next {
                next = queue
                    .waiters
                    .range(id + 1..)
                    .next()
                    .map(|(&later, _)| later);
                if self.pools[pool as usize].enabled_keys == 0 {
                    queue.remove(id);
                    self.waiter_lines.remove(&id);
                    let failure = Unavailable {
                        reason: UnavailableReason::AllDisabled,
                        retry_at_ms: None,
                    };
                    self.notices.waiter_failures.push((id, failure));
                    continue;
                }
                if !self.any_key_beyond(pool, model, &blocked) {
                    break;
                }
                #[cfg(test)]
                {
                    self.waiters_looked_at += 1;
                }
                let waiter = &queue.waiters[&id];
                match self.select(
                    time,
                    pool,
                    model,
                    &waiter.task_id,
                    &waiter.excluded,
                    &blocked,
                    waiter.requests,
                    waiter.tokens,
                ) {
                    Selection::Key(key) => {
                        let waiter = queue.remove(id).expect("in line");
                        self.waiter_lines.remove(&id);
                        self.grant(
                            time,
                            key,
                            &waiter.task_id,
                            model,
                            waiter.requests,
                            waiter.tokens,
                            waiter.ttl_ms,
                            waiter.client_request_id,
                            Some(id),
                        );
                    }
                    Selection::None { unaffordable } => blocked.extend(unaffordable),
                }
            }
            queue.blocked = blocked;
            queue.wake_at_ms = self.queue_wake_at(time, pool, &queue);
            if queue.waiters.is_empty() {
                self.queues.remove(&queue_key);
            } else {
                self.queues.insert(queue_key, queue);
            }
        }
    }

    /// Whether the pool has a free key outside the `blocked` groups for this model.
    fn any_key_beyond(&self, pool: PoolIdx, model: ModelIdx, blocked: &HashSet<GroupKey>) -> bool {
        self.pools[pool as usize].free.iter().any(|&(_, key)| {
            !blocked.contains(&GroupKey {
                pool,
                project: self.keys[key].project,
                model,
            })
        })
    }

    /// When a line must be looked at again though nothing was freed: a group of its pool
    /// changes by itself, or a waiter's exclusion of a key ends.
    fn queue_wake_at(&self, time: Time, pool: PoolIdx, queue: &WaitQueue) -> Option<u64> {
        if queue.waiters.is_empty() {
            return None;
        }
        let groups = self
            .books
            .groups
            .iter()
            .filter(|(k, _)| k.pool == pool)
            .filter_map(|(_, g)| g.next_change_after(time));
        let exclusion = queue
            .exclusion_ends
            .range((time.steady_ms + 1, 0)..)
            .next()
            .map(|&(end, _)| end);
        groups.chain(exclusion).min()
    }

    /// Why an ask gets no key now, and when it might.
    #[allow(clippy::too_many_arguments)]
    fn unavailable(
        &mut self,
        time: Time,
        pool: PoolIdx,
        model: ModelIdx,
        task: &str,
        excluded: &HashSet<KeyIdx>,
        requests: u64,
        tokens: u64,
    ) -> Unavailable {
        let now = time.steady_ms;
        // Only ending leases can make room in a group whose live leases fill it: until the
        // first of the project's leases ends, nothing changes.
        let mut project_expiry: HashMap<ProjectIdx, u64> = HashMap::new();
        for &key in &self.pools[pool as usize].keys {
            for token in &self.keys[key].live {
                let at = project_expiry
                    .entry(self.keys[key].project)
                    .or_insert(u64::MAX);
                *at = (*at).min(self.leases[token].expires_ms);
            }
        }
        let mut usable = 0;
        let mut any_enabled = false;
        let mut earliest: Option<(u64, UnavailableReason)> = None;
        let mut first_reason = None;
        for position in 0..self.pools[pool as usize].keys.len() {
            let key = self.pools[pool as usize].keys[position];
            if self.keys[key].disabled.is_some() {
                continue;
            }
            any_enabled = true;
            if excluded.contains(&key) || self.task_excludes(task, key, now) {
                continue;
            }
            usable += 1;
            let entry = &self.keys[key];
            let slot_free_at = if entry.has_free_slot() {
                Some(now)
            } else {
                entry.live.iter().map(|t| self.leases[t].expires_ms).min()
            };
            let project = entry.project;
            let group_key = GroupKey {
                pool,
                project,
                model,
            };
            let group = self.books.group(group_key, time);
            let reason = if group.cooldown().is_some() {
                UnavailableReason::CoolingDown
            } else if !group.can_afford(requests, tokens) {
                UnavailableReason::QuotaSpent
            } else {
                UnavailableReason::AllLeased
            };
            first_reason.get_or_insert(reason);
            let quota_at = group
                .affordable_at(time, requests, tokens)
                .or_else(|| project_expiry.get(&project).copied());
            let ready = slot_free_at
                .zip(quota_at)
                .map(|(slot, quota)| slot.max(quota));
            if let Some(ready) = ready
                && earliest.is_none_or(|(at, _)| ready < at)
            {
                earliest = Some((ready, reason));
            }
        }
        if !any_enabled {
            return Unavailable {
                reason: UnavailableReason::AllDisabled,
                retry_at_ms: None,
            };
        }
        if usable == 0 {
            let retry_at_ms = self.exclusions.peek(task).and_then(|list| {
                list.iter()
                    .filter(|&&(k, until)| !excluded.contains(&k) && until > now)
                    .map(|&(_, until)| until)
                    .min()
            });
            return Unavailable {
                reason: UnavailableReason::AllExcluded,
                retry_at_ms,
            };
        }
        match earliest {
            Some((at, reason)) => Unavailable {
                reason,
                retry_at_ms: Some(at.max(now)),
            },
            None => Unavailable {
                reason: first_reason.expect("a usable key gave a reason"),
                retry_at_ms: None,
            },
        }
    }

    // ---- renew, release, report --------------------------------------------------------

    /// The live lease `lease_id` if `fencing_token` is its own.
    fn live_lease(&self, lease_id: &str, fencing_token: u64) -> Result<Token, EngineError> {
        let token = self.known_token(lease_id)?;
        if !self.leases.contains_key(&token) {
            return Err(EngineError::StaleLease {
                lease_id: lease_id.to_string(),
                reason: "it has ended".into(),
            });
        }
        if token != fencing_token {
            return Err(EngineError::StaleLease {
                lease_id: lease_id.to_string(),
                reason: format!("fencing token {fencing_token} is not the lease's"),
            });
        }
        Ok(token)
    }

    /// The token a lease id names, if such a lease was ever granted.
    fn known_token(&self, lease_id: &str) -> Result<Token, EngineError> {
        lease_id
            .strip_prefix(LEASE_ID_PREFIX)
            .and_then(|t| t.parse::<Token>().ok())
            .filter(|&t| t > 0 && t < self.next_token)
            .ok_or_else(|| EngineError::LeaseNotFound(lease_id.to_string()))
    }

    fn renew(
        &mut self,
        now: impl Into<Time>,
        lease_id: &str,
        fencing_token: u64,
        ttl_ms: Option<u64>,
        additional_requests: u32,
        additional_tokens: u64,
    ) -> Result<Renewed, EngineError> {
        let time = self.tick(now);
        let now = time.steady_ms;
        let token = self.live_lease(lease_id, fencing_token)?;
        let lease = &self.leases[&token];
        let ttl_ms = self.validate_ttl(ttl_ms.unwrap_or(lease.ttl_ms), true)?;
        validate_tokens("additional_input_tokens", additional_tokens)?;
        let total_tokens = lease.tokens.saturating_add(additional_tokens);
        if total_tokens > MAX_INPUT_TOKENS {
            return Err(invalid(
                "additional_input_tokens",
                format!(
                    "the lease's {total_tokens} input tokens in all are above the maximum of {MAX_INPUT_TOKENS}"
                ),
            ));
        }
        let total = lease.requests + u64::from(additional_requests);
        if total > u64::from(self.config.max_requests_per_lease) {
            return Err(invalid(
                "additional_requests",
                format!(
                    "{total} in all is above the maximum of {} per lease",
                    self.config.max_requests_per_lease
                ),
            ));
        }
        let key = lease.key;
        let model = lease.model;
        let pool = self.keys[key].pool;
        self.check_servable(pool, model, total, total_tokens)?;

        let old_expiry = (lease.expires_ms, token);
        self.expiries.remove(&old_expiry);
        let lease = self.leases.get_mut(&token).expect("live");
        lease.ttl_ms = ttl_ms;
        lease.expires_ms = now + ttl_ms;
        self.expiries.insert((now + ttl_ms, token));

        let mut shortfall = None;
        if additional_requests > 0 || additional_tokens > 0 {
            let group_key = GroupKey {
                pool,
                project: self.keys[key].project,
                model,
            };
            let group = self.books.group(group_key, time);
            let (requests, tokens) = (u64::from(additional_requests), additional_tokens);
            if group.cooldown().is_none() && group.can_afford(requests, tokens) {
                group.reserve(requests, tokens);
                let lease = self.leases.get_mut(&token).expect("live");
                lease.requests += requests;
                lease.tokens += tokens;
            } else {
                let reason = if group.cooldown().is_some() {
                    UnavailableReason::CoolingDown
                } else {
                    UnavailableReason::QuotaSpent
                };
                let retry_at_ms = group.affordable_at(time, requests, tokens);
                shortfall = Some(Unavailable {
                    reason,
                    retry_at_ms,
                });
            }
        }
        let event = self.lease_event(token);
        self.emit(time, EventKind::Renewed(event));
        let view = self.view(token);
        Ok(match shortfall {
            None => Renewed::Done(view),
            Some(unavailable) => Renewed::QuotaUnavailable(view, unavailable),
        })
    }

    /// Ends a lease with what it used, and says what the books now hold for it: requests sent
    /// are at most those granted, tokens at most [`MAX_INPUT_TOKENS`]. `Ok(None)` when it had
    /// already ended.
    fn release(
        &mut self,
        now: impl Into<Time>,
        lease_id: &str,
        fencing_token: u64,
        usage: Usage,
    ) -> Result<Option<Amount>, EngineError> {
        let time = self.tick(now);
        let token = self.known_token(lease_id)?;
        if !self.leases.contains_key(&token) {
            return Ok(None);
        }
        let token = self.live_lease(lease_id, fencing_token)?;
        let lease = &self.leases[&token];
        let key = lease.key;
        let used = lease.used(usage);
        let event = self.end_lease(token, time, used);
        if used.requests > 0 {
            // A call went through: the project's rate-limit backoff starts over.
            self.backoff
                .remove(&(self.keys[key].pool, self.keys[key].project));
        }
        self.emit(
            time,
            EventKind::Released {
                lease: event,
                requests_sent: used.requests,
            },
        );
        self.tick(time);
        Ok(Some(used))
    }

    /// Records a failed call: ends the lease, acts on the failure's class, and says what to ask
    /// for to replace it. Late reports are refused, except evidence that the key is bad.
    fn report_failure(
        &mut self,
        now: impl Into<Time>,
        lease_id: &str,
        fencing_token: u64,
        report: FailureReport,
    ) -> Result<Reported, EngineError> {
        let time = self.tick(now);
        let now = time.steady_ms;
        validate_detail("detail", &report.detail)?;
        if let Some(retry_after_ms) = report.retry_after_ms
            && retry_after_ms > DAY_MS
        {
            return Err(invalid(
                "retry_after",
                format!("{} is longer than a day", show_ms(retry_after_ms)),
            ));
        }
        let (ended, event, booked) = match self.live_lease(lease_id, fencing_token) {
            Ok(token) => {
                let lease = self.leases[&token].clone();
                let used = lease.used(Usage {
                    requests_sent: report.requests_sent,
                    input_tokens: None,
                });
                let event = self.end_lease(token, time, used);
                (lease, event, Some(used))
            }
            // A lease that ended may still bring news of its key; a live one with another
            // token is simply refused.
            Err(EngineError::StaleLease { .. })
                if report.kind.disables_key()
                    && !self.leases.contains_key(&self.known_token(lease_id)?) =>
            {
                let token = self.known_token(lease_id)?;
                let Some(ended) = self.ended.peek(&token).cloned() else {
                    return Err(EngineError::StaleLease {
                        lease_id: lease_id.to_string(),
                        reason: "it ended too long ago to act on".into(),
                    });
                };
                let event = self.event_of(token, &ended);
                (ended, event, None)
            }
            Err(error) => return Err(error),
        };
        let key = ended.key;
        self.emit(
            time,
            EventKind::Failed {
                lease: event,
                kind: report.kind,
                detail: report.detail.clone(),
            },
        );
        if report.kind.blames_key() {
            let until = now + self.config.exclusion_ttl_ms;
            let list = self
                .exclusions
                .get_or_insert_mut(ended.task_id.clone(), Vec::new);
            list.retain(|&(k, u)| k != key && u > now);
            list.push((key, until));
        }
        let pool = self.keys[key].pool;
        let project = self.keys[key].project;
        match report.kind {
            FailureKind::RateLimited => {
                let backoff = self.backoff.entry((pool, project)).or_insert(0);
                let delay = report.retry_after_ms.unwrap_or_else(|| {
                    let doubled = self
                        .config
                        .cooldown_base_ms
                        .saturating_mul(1u64 << (*backoff).min(32));
                    doubled.min(self.config.cooldown_max_ms)
                });
                *backoff = backoff.saturating_add(1);
                let group_key = GroupKey {
                    pool,
                    project,
                    model: ended.model,
                };
                let group = self.books.group(group_key, time);
                let cooldown =
                    group.cool_down(now.saturating_add(delay), CooldownReason::RateLimited);
                self.cooled_down(time, group_key, cooldown);
            }
            FailureKind::DailyQuotaExhausted => {
                let group_key = GroupKey {
                    pool,
                    project,
                    model: ended.model,
                };
                let cooldown = self.books.group(group_key, time).rest_for_the_day(time);
                self.cooled_down(time, group_key, cooldown);
            }
            FailureKind::InvalidKey | FailureKind::PermissionDenied => {
                let reason = if report.detail.is_empty() {
                    report.kind.as_str().to_string()
                } else {
                    format!("{}: {}", report.kind.as_str(), report.detail)
                };
                self.disable(time, key, reason);
            }
            FailureKind::ServerError | FailureKind::Timeout | FailureKind::Other => {}
        }
        self.tick(time);
        Ok(Reported {
            key_id: self.keys[key].spec.id.clone(),
            booked,
            replacement: AcquireRequest {
                task_id: ended.task_id,
                pool: self.pools[pool as usize].name.clone(),
                model: self.models.name(ended.model).to_string(),
                exclude_key_ids: Vec::new(),
                ttl_ms: Some(ended.ttl_ms),
                wait: false,
                requests: ended.requests as u32,
                estimated_tokens: ended.tokens,
                client_request_id: None,
            },
        })
    }

    fn cooled_down(&mut self, time: Time, group_key: GroupKey, cooldown: quota::Cooldown) {
        self.emit(
            time,
            EventKind::CooledDown {
                pool: self.pools[group_key.pool as usize].name.clone(),
                project: self.projects.name(group_key.project).to_string(),
                model: self.models.name(group_key.model).to_string(),
                until_ms: cooldown.until_ms,
                reason: cooldown.reason,
            },
        );
    }

    // ---- operators -----------------------------------------------------------------------

    /// Disables a key (its leases end, counted as fully used) or enables it again.
    fn set_key_enabled(
        &mut self,
        now: impl Into<Time>,
        key_id: &str,
        enabled: bool,
        reason: &str,
    ) -> Result<KeyView, EngineError> {
        let time = self.tick(now);
        validate_detail("reason", reason)?;
        let &key = self
            .key_by_id
            .get(key_id)
            .ok_or_else(|| EngineError::KeyNotFound(key_id.to_string()))?;
        if enabled {
            if self.keys[key].disabled.is_some() {
                self.set_free(key, false);
                self.keys[key].disabled = None;
                self.set_free(key, true);
                self.pools[self.keys[key].pool as usize].enabled_keys += 1;
                self.freed = true;
                self.emit(
                    time,
                    EventKind::KeyEnabled {
                        key_id: key_id.to_string(),
                    },
                );
            }
        } else {
            let reason = if reason.is_empty() {
                "disabled by an operator"
            } else {
                reason
            };
            self.disable(time, key, reason.to_string());
        }
        self.tick(time);
        Ok(self.key_view(key, time.steady_ms))
    }

    fn disable(&mut self, time: Time, key: KeyIdx, reason: String) {
        if self.keys[key].disabled.is_some() {
            return;
        }
        for token in self.keys[key].live.clone() {
            let used = self.leases[&token].reserved();
            let event = self.end_lease(token, time, used);
            self.emit(
                time,
                EventKind::Released {
                    lease: event,
                    requests_sent: used.requests,
                },
            );
        }
        self.set_free(key, false);
        self.keys[key].disabled = Some(reason.clone());
        self.pools[self.keys[key].pool as usize].enabled_keys -= 1;
        // Waiters that only this key could serve must now fail rather than wait.
        self.freed = true;
        self.emit(
            time,
            EventKind::KeyDisabled {
                key_id: self.keys[key].spec.id.clone(),
                reason,
            },
        );
    }

    /// Ends a live lease: frees its slot and settles its quota with what it `used`.
    fn end_lease(&mut self, token: Token, time: Time, used: Amount) -> LeaseEvent {
        let event = self.lease_event(token);
        let lease = self.leases.remove(&token).expect("live lease");
        self.expiries.remove(&(lease.expires_ms, token));
        self.set_free(lease.key, false);
        self.keys[lease.key].live.retain(|&t| t != token);
        self.set_free(lease.key, true);
        if let Some(tokens) = self.task_leases.get_mut(&lease.task_id) {
            tokens.retain(|&t| t != token);
            if tokens.is_empty() {
                self.task_leases.remove(&lease.task_id);
            }
        }
        let key = &self.keys[lease.key];
        let group_key = GroupKey {
            pool: key.pool,
            project: key.project,
            model: lease.model,
        };
        let keeping = self.config.book_keeping();
        self.books
            .group(group_key, time)
            .settle(time, keeping, lease.reserved(), used);
        self.ended.put(token, lease);
        self.freed = true;
        event
    }

    fn emit(&mut self, at: Time, kind: EventKind) {
        self.notices.events.push(Event { at, kind });
    }

    // ---- views ---------------------------------------------------------------------------

    fn summary(&self, token: Token) -> LeaseSummary {
        self.summary_of(token, &self.leases[&token])
    }

    /// A live or ended lease, as others see it.
    fn summary_of(&self, token: Token, lease: &Lease) -> LeaseSummary {
        LeaseSummary {
            lease_id: lease_id(token),
            task_id: lease.task_id.clone(),
            model: self.models.name(lease.model).to_string(),
            fencing_token: token,
            requests_granted: lease.requests as u32,
            expires_ms: lease.expires_ms,
        }
    }

    fn lease_event(&self, token: Token) -> LeaseEvent {
        self.event_of(token, &self.leases[&token])
    }

    fn event_of(&self, token: Token, lease: &Lease) -> LeaseEvent {
        let key = &self.keys[lease.key];
        LeaseEvent {
            lease: self.summary_of(token, lease),
            key_id: key.spec.id.clone(),
            project: self.projects.name(key.project).to_string(),
        }
    }

    fn view(&self, token: Token) -> LeaseView {
        let lease = &self.leases[&token];
        let key = &self.keys[lease.key];
        LeaseView {
            lease_id: lease_id(token),
            key_id: key.spec.id.clone(),
            api_key: key.spec.secret.clone(),
            fencing_token: token,
            ttl_ms: lease.ttl_ms,
            expires_ms: lease.expires_ms,
            pool: self.pools[key.pool as usize].name.clone(),
            project: self.projects.name(key.project).to_string(),
            model: self.models.name(lease.model).to_string(),
            requests_granted: lease.requests as u32,
            task_id: lease.task_id.clone(),
        }
    }

    pub fn key_status(&self, now: impl Into<Time>, key_id: &str) -> Result<KeyView, EngineError> {
        let time = self.time_at(now.into());
        let &key = self
            .key_by_id
            .get(key_id)
            .ok_or_else(|| EngineError::KeyNotFound(key_id.to_string()))?;
        Ok(self.key_view(key, time.steady_ms))
    }

    fn key_view(&self, key: KeyIdx, now: u64) -> KeyView {
        let cooling_until_ms = self
            .books
            .groups
            .iter()
            .filter(|(g, _)| g.pool == self.keys[key].pool && g.project == self.keys[key].project)
            .filter_map(|(_, group)| group.cooldown().map(|c| c.until_ms))
            .filter(|&until| until > now)
            .max();
        self.key_view_with(key, cooling_until_ms)
    }

    fn key_view_with(&self, key: KeyIdx, cooling_until_ms: Option<u64>) -> KeyView {
        let entry = &self.keys[key];
        let state = if entry.disabled.is_some() {
            KeyState::Disabled
        } else if !entry.live.is_empty() {
            KeyState::Leased
        } else if cooling_until_ms.is_some() {
            KeyState::CoolingDown
        } else {
            KeyState::Available
        };
        KeyView {
            key_id: entry.spec.id.clone(),
            masked_key: entry.spec.secret.masked(),
            pool: self.pools[entry.pool as usize].name.clone(),
            project: self.projects.name(entry.project).to_string(),
            state,
            disabled_reason: entry.disabled.clone(),
            max_leases: entry.max_leases,
            leases: entry.live.iter().map(|&t| self.summary(t)).collect(),
            cooling_until_ms,
        }
    }

    /// Keys (a page of them, starting after key `after`), quota groups and lines, for
    /// operators.
    pub fn status(
        &self,
        now: impl Into<Time>,
        pool: Option<&str>,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<StatusView, EngineError> {
        let time = self.time_at(now.into());
        let pool = match pool {
            None => None,
            Some(name) => Some(
                *self
                    .pool_by_name
                    .get(name)
                    .ok_or_else(|| invalid("pool", format!("unknown pool {name:?}")))?,
            ),
        };
        // The books as they read at `time`, without changing them; idle groups are not shown.
        let books: Vec<(GroupKey, QuotaGroup)> = self
            .books
            .groups
            .iter()
            .filter(|(g, _)| pool.is_none_or(|p| g.pool == p))
            .map(|(&g, group)| {
                let mut group = group.clone();
                group.advance(time, self.config.daily);
                (g, group)
            })
            .filter(|(_, group)| !group.is_idle())
            .collect();
        let mut cooling: HashMap<(PoolIdx, ProjectIdx), u64> = HashMap::new();
        for (group_key, group) in &books {
            if let Some(cooldown) = group.cooldown() {
                let until = cooling
                    .entry((group_key.pool, group_key.project))
                    .or_insert(0);
                *until = (*until).max(cooldown.until_ms);
            }
        }
        let selected: Vec<KeyIdx> = (0..self.keys.len())
            .filter(|&k| pool.is_none_or(|p| self.keys[k].pool == p))
            .collect();
        let start = match after {
            None => 0,
            Some(key_id) => self
                .key_by_id
                .get(key_id)
                .and_then(|key| selected.binary_search(key).ok())
                .map(|position| position + 1)
                .ok_or_else(|| {
                    invalid(
                        "page_token",
                        "names no key of this listing (was the pool changed?)",
                    )
                })?,
        };
        let page: Vec<KeyIdx> = selected
            .iter()
            .skip(start)
            .take(page_size)
            .copied()
            .collect();
        let next_after = page
            .last()
            .filter(|_| start.saturating_add(page.len()) < selected.len())
            .map(|&k| self.keys[k].spec.id.clone());
        let keys = page
            .iter()
            .map(|&k| {
                let entry = &self.keys[k];
                self.key_view_with(k, cooling.get(&(entry.pool, entry.project)).copied())
            })
            .collect();
        let mut groups: Vec<GroupView> = books
            .iter()
            .map(|(g, group)| GroupView {
                pool: self.pools[g.pool as usize].name.clone(),
                project: self.projects.name(g.project).to_string(),
                model: self.models.name(g.model).to_string(),
                requests_per_minute: UsageView {
                    used: group.requests_in_window(),
                    limit: group.limits.requests_per_minute,
                },
                tokens_per_minute: UsageView {
                    used: group.tokens_in_window(),
                    limit: group.limits.tokens_per_minute,
                },
                requests_per_day: UsageView {
                    used: group.requests_today(),
                    limit: group.limits.requests_per_day,
                },
                cooldown: group.cooldown(),
            })
            .collect();
        groups
            .sort_by(|a, b| (&a.pool, &a.project, &a.model).cmp(&(&b.pool, &b.project, &b.model)));
        let waiting = self
            .queues
            .iter()
            .filter(|((p, _), _)| pool.is_none_or(|pool| *p == pool))
            .map(|(&(p, m), q)| {
                (
                    self.pools[p as usize].name.clone(),
                    self.models.name(m).to_string(),
                    q.waiters.len(),
                )
            })
            .collect();
        Ok(StatusView {
            keys,
            groups,
            waiting,
            next_after,
            total_keys: selected.len(),
            live_leases: self.leases.len(),
            now: time,
        })
    }
}

/// A validated acquire.
struct Ask {
    pool: PoolIdx,
    model: ModelIdx,
    ttl_ms: u64,
    requests: u64,
    tokens: u64,
    excluded: HashSet<KeyIdx>,
}

const DAY_MS: u64 = 24 * 3_600_000;

pub fn lease_id(token: Token) -> String {
    format!("{LEASE_ID_PREFIX}{token}")
}

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

fn larger_limits(a: Limits, b: Limits) -> Limits {
    let larger = |x: Option<u64>, y: Option<u64>| x.zip(y).map(|(x, y)| x.max(y));
    Limits {
        requests_per_minute: larger(a.requests_per_minute, b.requests_per_minute),
        tokens_per_minute: larger(a.tokens_per_minute, b.tokens_per_minute),
        requests_per_day: larger(a.requests_per_day, b.requests_per_day),
    }
}

#[cfg(test)]
mod tests;
