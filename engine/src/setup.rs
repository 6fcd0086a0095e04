//! What configures an engine: its [`Setup`] (the configuration, the keys, the fencing floor
//! and the rules version that decides its records), and the rules versions themselves.

use super::*;

/// The pool an acquire without one goes to.
pub const DEFAULT_POOL: &str = "gemini";

/// The pool a request names: `pool`, or [`DEFAULT_POOL`] when it names none.
pub fn pool_or_default(pool: &str) -> &str {
    if pool.is_empty() { DEFAULT_POOL } else { pool }
}

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
    /// Keys are checked with the provider (rules 8 on): a key added waits for its first check
    /// before it is lent. Laid out after the rest of a setup (see [`layout`]).
    #[serde(skip)]
    pub check_keys: bool,
}

impl EngineConfig {
    /// How long what a lease used stays on its group's books.
    pub(crate) fn book_keeping(&self) -> BookKeeping {
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
    pub(crate) fn identity(&self) -> &str {
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
/// Version 6: a failure report with its replacement's acquire is one command
/// ([`Command::ReportFailureAndReplace`]), which older builds cannot read; it decides what the
/// two commands it joins decide, so nothing older is decided differently. Version 7: a renewal
/// may wait in its lease's line for the requests it asks for more
/// ([`Command::RenewWaiting`]), and snapshots keep such waiters; older builds can read
/// neither, and nothing older is decided differently. Version 8: a key's health is kept (see
/// [`health`]): who disabled it, checks with the provider ([`Command::KeyChecked`]), keys added
/// waiting for their first check, and a report on a lease granted before the key was last
/// enabled disabling nothing; snapshots keep it, in a layout older builds cannot read.
/// Version 9: waiters are placed by class and by their tenants' shares ([`Command::ForCaller`],
/// see [`crate::tenants`]); one tenant of one class is still served first come, first served.
/// Snapshots keep the places, in a layout older builds cannot read.
pub const RULES_VERSION: u32 = 9;
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
pub enum SetupError {
    #[error("key {0} is configured twice")]
    DuplicateKeyId(String),
    #[error("key {0}: its secret is configured under another id too")]
    DuplicateSecret(String),
    #[error("key {key}: unknown pool {pool}")]
    UnknownPool { key: String, pool: String },
}
