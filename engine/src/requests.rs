//! What callers ask of the engine and what they get back: acquires and leases, why none was
//! lent, failure reports and the usage a release books.

use super::*;

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
    /// Every key that could serve waits for its first check with the provider.
    AwaitingCheck,
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
            Self::AwaitingCheck => "every usable key waits for its first check with the provider",
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

/// A lease's renewal, as its holder asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Renewal {
    pub lease_id: String,
    pub fencing_token: u64,
    /// The lease's TTL from now on; `None` keeps it.
    pub ttl_ms: Option<u64>,
    pub additional_requests: u32,
    pub additional_tokens: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Renewed {
    Done(LeaseView),
    /// The TTL was extended, the extra requests not reserved.
    QuotaUnavailable(LeaseView, Unavailable),
    /// The TTL was extended; the extra requests wait in line, their outcome arriving through
    /// [`Engine::drain`] as a waiter's does.
    Queued(LeaseView, WaiterId),
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
    /// The key as the report left it (disabled, cooling, excluded from the task).
    pub key: Box<KeyView>,
    /// What the books now hold for the lease; `None` when it had already ended.
    pub booked: Option<Amount>,
    pub replacement: AcquireRequest,
}
