//! The edge between the protocol and the engine: conversions of `keylease.v1` messages to domain
//! types (validating what the wire can get wrong, such as negative durations) and back, and the
//! one mapping of domain errors to gRPC status codes.

use crate::config::tenants::TenantError;
use crate::shell::AcquireFailure;
use crate::store::journal::StoreFailed;
use keylease::gemini::{QuotaLimit, quota_limit};
use keylease::{ERROR_DOMAIN, RETRY_AFTER_METADATA, pb};
use keylease_engine::learning::LearnedLimit;
use keylease_engine::learning::weighing::Tally;
use keylease_engine::tenants::Priority;
use keylease_engine::{
    AcquireRequest, CheckOutcome, Decider, EngineError, EventKind, FailureKind, GroupView,
    KeyCheck, KeyProblem, KeyRecord, KeyState, KeyView, LeaseEvent, LeaseSummary, LeaseView,
    LimitKind, LimitView, QuotaViolation, Time, Unavailable, UnavailableReason, Usage, UsageView,
};
use std::time::Duration;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Starts every page token; what follows is the hex of the key the page starts after.
const PAGE_TOKEN_PREFIX: &str = "p1.";

/// An engine's refusal as a status: the one mapping of its errors to gRPC codes.
pub fn engine_status(error: EngineError) -> Status {
    let code = match &error {
        EngineError::InvalidArgument { .. } => Code::InvalidArgument,
        EngineError::LeaseNotFound(_) | EngineError::KeyNotFound(_) => Code::NotFound,
        EngineError::StaleLease { .. } => Code::FailedPrecondition,
    };
    Status::new(code, error.to_string())
}

/// An acquire that got no lease, as a status; `now_ms` turns the engine's instants into delays.
pub fn acquire_failure_status(failure: AcquireFailure, now_ms: u64) -> Status {
    match failure {
        AcquireFailure::Invalid(error) => engine_status(error),
        AcquireFailure::Unavailable(unavailable) => unavailable_status(unavailable, now_ms),
        AcquireFailure::ShuttingDown => Status::unavailable("the server is shutting down"),
        AcquireFailure::Store(failure) => failure.into(),
    }
}

/// Nothing more can be acknowledged: the server is stopping (a restart recovers what was).
impl From<StoreFailed> for Status {
    fn from(failure: StoreFailed) -> Self {
        Status::unavailable(format!("{failure}; this server is stopping"))
    }
}

/// `RESOURCE_EXHAUSTED` with why and when to retry: `google.rpc.RetryInfo` and `ErrorInfo` in
/// the details, and `retry-after-ms` in the metadata.
pub fn unavailable_status(unavailable: Unavailable, now_ms: u64) -> Status {
    let retry_after = retry_after(unavailable, now_ms);
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason_code(unavailable.reason),
        ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    let mut metadata = MetadataMap::new();
    metadata.insert(
        keylease::UNAVAILABLE_REASON_METADATA,
        MetadataValue::from_static(reason_to_pb(unavailable.reason).as_str_name()),
    );
    let mut message = format!("no key available: {}", unavailable.reason.as_str());
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
        if let Ok(value) = delay.as_millis().to_string().parse() {
            metadata.insert(RETRY_AFTER_METADATA, value);
        }
        message.push_str(&format!(
            "; retry after {}",
            humantime::format_duration(delay)
        ));
    }
    Status::with_error_details_and_metadata(Code::ResourceExhausted, message, details, metadata)
}

fn retry_after(unavailable: Unavailable, now_ms: u64) -> Option<Duration> {
    let at = unavailable.retry_at_ms?;
    Some(Duration::from_millis(at.saturating_sub(now_ms)))
}

fn reason_code(reason: UnavailableReason) -> &'static str {
    match reason {
        UnavailableReason::AllLeased => "ALL_LEASED",
        UnavailableReason::CoolingDown => "COOLING_DOWN",
        UnavailableReason::QuotaSpent => "QUOTA_SPENT",
        UnavailableReason::AllDisabled => "ALL_DISABLED",
        UnavailableReason::AllExcluded => "ALL_EXCLUDED",
        UnavailableReason::KeyDraining => "KEY_DRAINING",
        UnavailableReason::AwaitingCheck => "AWAITING_CHECK",
    }
}

fn reason_to_pb(reason: UnavailableReason) -> pb::UnavailableReason {
    match reason {
        UnavailableReason::AllLeased => pb::UnavailableReason::AllLeased,
        UnavailableReason::CoolingDown => pb::UnavailableReason::CoolingDown,
        UnavailableReason::QuotaSpent => pb::UnavailableReason::QuotaSpent,
        UnavailableReason::AllDisabled => pb::UnavailableReason::AllDisabled,
        UnavailableReason::AllExcluded => pb::UnavailableReason::AllExcluded,
        UnavailableReason::KeyDraining => pb::UnavailableReason::KeyDraining,
        UnavailableReason::AwaitingCheck => pb::UnavailableReason::AwaitingCheck,
    }
}

pub fn unavailable_to_pb(unavailable: Unavailable, now_ms: u64) -> pb::Unavailable {
    pb::Unavailable {
        reason: reason_to_pb(unavailable.reason) as i32,
        retry_after: retry_after(unavailable, now_ms).map(duration_to_pb),
    }
}

/// An optional wire duration in milliseconds; negative or malformed ones are refused by name.
pub fn duration_ms(
    field: &'static str,
    duration: Option<prost_types::Duration>,
) -> Result<Option<u64>, Status> {
    let Some(duration) = duration else {
        return Ok(None);
    };
    let invalid = |reason: &str| Status::invalid_argument(format!("{field}: {reason}"));
    if duration.seconds < 0 || duration.nanos < 0 {
        return Err(invalid("must not be negative"));
    }
    if duration.nanos >= 1_000_000_000 {
        return Err(invalid("nanos must be below one second"));
    }
    let millis = (duration.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(duration.nanos as u64 / 1_000_000))
        .ok_or_else(|| invalid("too long"))?;
    Ok(Some(millis))
}

/// How long to wait: unset or zero fails fast; more than `max` is refused.
pub fn wait_of(
    field: &'static str,
    duration: Option<prost_types::Duration>,
    max: Duration,
) -> Result<Duration, Status> {
    let wait = Duration::from_millis(duration_ms(field, duration)?.unwrap_or(0));
    if wait > max {
        return Err(Status::invalid_argument(format!(
            "{field}: {} is above the maximum {}",
            humantime::format_duration(wait),
            humantime::format_duration(max)
        )));
    }
    Ok(wait)
}

pub fn duration_to_pb(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

fn ms_to_pb(ms: u64) -> prost_types::Duration {
    duration_to_pb(Duration::from_millis(ms))
}

/// A wall-clock time in milliseconds, for display.
pub fn timestamp(wall_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (wall_ms / 1000) as i64,
        nanos: ((wall_ms % 1000) * 1_000_000) as i32,
    }
}

/// An engine instant (steady time) for display, as the wall clock read it or will read it.
pub fn steady_timestamp(steady_ms: u64, now: Time) -> prost_types::Timestamp {
    timestamp(now.wall_at(steady_ms))
}

/// What a release reports it used.
pub fn usage(request: &pb::ReleaseRequest) -> Usage {
    Usage {
        requests_sent: request.requests_sent,
        input_tokens: request.input_tokens,
    }
}

/// The token of the page after key `key_id`: opaque to clients.
pub fn page_token(key_id: &str) -> String {
    let hex: String = key_id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{PAGE_TOKEN_PREFIX}{hex}")
}

/// The key a page token names the page after; refused, without echoing it, unless this server
/// made it. The engine then checks that the key is in the listing.
pub fn page_after(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let refused = || Status::invalid_argument("page_token: not a next_page_token this server gave");
    let hex = token.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(refused)?;
    if hex.is_empty() || hex.len() % 2 != 0 || !hex.is_ascii() {
        return Err(refused());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| refused())?;
    String::from_utf8(bytes).map(Some).map_err(|_| refused())
}

pub fn acquire_request(request: pb::AcquireKeyRequest) -> Result<AcquireRequest, Status> {
    let excluded = &request.exclude_key_ids;
    if excluded.len() > keylease::MAX_EXCLUDED_KEYS {
        return Err(Status::invalid_argument(format!(
            "exclude_key_ids: {} ids, above the maximum of {}",
            excluded.len(),
            keylease::MAX_EXCLUDED_KEYS
        )));
    }
    if let Some(long) = excluded
        .iter()
        .find(|id| id.len() > keylease::MAX_NAME_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "exclude_key_ids: an id of {} bytes, above the maximum of {}",
            long.len(),
            keylease::MAX_NAME_BYTES
        )));
    }
    Ok(AcquireRequest {
        task_id: request.task_id,
        pool: request.pool,
        model: request.model,
        exclude_key_ids: request.exclude_key_ids,
        ttl_ms: duration_ms("ttl", request.ttl)?,
        wait: false,
        requests: request.requests,
        estimated_tokens: request.estimated_input_tokens,
        client_request_id: Some(request.client_request_id).filter(|id| !id.is_empty()),
    })
}

/// The engine's kind of a report: its `kind`, made finer by its `class` where the engine acts on
/// the difference (an unknown class, from a newer client, leaves `kind` as it is).
pub fn failure_kind(kind: i32, class: i32) -> Result<FailureKind, Status> {
    let kind = failure_kind_alone(kind)?;
    Ok(match pb::FailureClass::try_from(class) {
        Ok(pb::FailureClass::ModelCapacity) => FailureKind::ModelCapacity,
        _ => kind,
    })
}

fn failure_kind_alone(kind: i32) -> Result<FailureKind, Status> {
    match pb::FailureKind::try_from(kind) {
        Ok(pb::FailureKind::RateLimited) => Ok(FailureKind::RateLimited),
        Ok(pb::FailureKind::DailyQuotaExhausted) => Ok(FailureKind::DailyQuotaExhausted),
        Ok(pb::FailureKind::InvalidKey) => Ok(FailureKind::InvalidKey),
        Ok(pb::FailureKind::PermissionDenied) => Ok(FailureKind::PermissionDenied),
        Ok(pb::FailureKind::ServerError) => Ok(FailureKind::ServerError),
        Ok(pb::FailureKind::Timeout) => Ok(FailureKind::Timeout),
        Ok(pb::FailureKind::Other) => Ok(FailureKind::Other),
        Ok(pb::FailureKind::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "kind: {kind} is not a failure kind (RATE_LIMITED, ...)"
        ))),
    }
}

fn failure_kind_to_pb(kind: FailureKind) -> pb::FailureKind {
    match kind {
        FailureKind::RateLimited => pb::FailureKind::RateLimited,
        FailureKind::DailyQuotaExhausted => pb::FailureKind::DailyQuotaExhausted,
        FailureKind::InvalidKey => pb::FailureKind::InvalidKey,
        FailureKind::PermissionDenied => pb::FailureKind::PermissionDenied,
        FailureKind::ServerError => pb::FailureKind::ServerError,
        FailureKind::Timeout => pb::FailureKind::Timeout,
        FailureKind::Other => pb::FailureKind::Other,
        FailureKind::ModelCapacity => pb::FailureKind::ServerError,
    }
}

/// A class as a call asks for it: `None` when unspecified.
pub fn priority_of(field: &str, value: i32) -> Result<Option<Priority>, Status> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Unspecified) => Ok(None),
        Ok(pb::Priority::Interactive) => Ok(Some(Priority::Interactive)),
        Ok(pb::Priority::Normal) => Ok(Some(Priority::Normal)),
        Ok(pb::Priority::Batch) => Ok(Some(Priority::Batch)),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: {value} is not a class (interactive, normal or batch)"
        ))),
    }
}

pub fn priority_to_pb(priority: Priority) -> pb::Priority {
    match priority {
        Priority::Interactive => pb::Priority::Interactive,
        Priority::Normal => pb::Priority::Normal,
        Priority::Batch => pb::Priority::Batch,
    }
}

/// A call's tenant refused.
pub fn tenant_status(error: TenantError) -> Status {
    match error {
        TenantError::MayNotName(_) => Status::permission_denied(error.to_string()),
        TenantError::NoTenants | TenantError::Unknown(_) => {
            Status::invalid_argument(error.to_string())
        }
    }
}

/// The lease as its holder gets it: the only place a secret is revealed. `priority`: the
/// class it was waited for in, where tenants are configured.
pub fn lease_to_pb(lease: LeaseView, now: Time, priority: Option<Priority>) -> pb::Lease {
    pb::Lease {
        lease_id: lease.lease_id,
        key_id: lease.key_id,
        api_key: lease.api_key.reveal().to_string(),
        fencing_token: lease.fencing_token,
        ttl: Some(ms_to_pb(lease.ttl_ms)),
        expires_at: Some(steady_timestamp(lease.expires_ms, now)),
        project: lease.project,
        model: lease.model,
        pool: lease.pool,
        requests_granted: lease.requests_granted,
        task_id: lease.task_id,
        priority: priority.map_or(pb::Priority::Unspecified, priority_to_pb) as i32,
    }
}

fn summary_to_pb(lease: LeaseSummary, now: Time) -> pb::LeaseSummary {
    pb::LeaseSummary {
        lease_id: lease.lease_id,
        task_id: lease.task_id,
        model: lease.model,
        fencing_token: lease.fencing_token,
        requests_granted: lease.requests_granted,
        expires_at: Some(steady_timestamp(lease.expires_ms, now)),
    }
}

pub fn key_to_pb(key: KeyView, now: Time) -> pb::KeyStatus {
    let state = match key.state {
        KeyState::Available => pb::KeyState::Available,
        KeyState::Leased => pb::KeyState::Leased,
        KeyState::CoolingDown => pb::KeyState::CoolingDown,
        KeyState::Disabled => pb::KeyState::Disabled,
        KeyState::Draining => pb::KeyState::Draining,
        KeyState::Unchecked => pb::KeyState::Unchecked,
        KeyState::Checking => pb::KeyState::Checking,
    };
    let disabled = key.disabled.as_ref();
    pb::KeyStatus {
        key_id: key.key_id,
        masked_key: key.masked_key,
        pool: key.pool,
        project: key.project,
        state: state as i32,
        disabled_reason: disabled.map(|d| d.reason.clone()).unwrap_or_default(),
        disabled_by: disabled.map_or(pb::Decider::Unspecified, |d| decider_to_pb(d.by)) as i32,
        disabled_since: disabled.and_then(|d| d.since_wall_ms).map(timestamp),
        problem: disabled
            .and_then(|d| d.problem)
            .map_or(pb::KeyProblem::Unspecified, problem_to_pb) as i32,
        last_check: key.last_check.as_ref().map(check_to_pb),
        performance: Some(performance_to_pb(&key.record)),
        max_leases: key.max_leases,
        leases: key
            .leases
            .into_iter()
            .map(|lease| summary_to_pb(lease, now))
            .collect(),
        cooling_until: key
            .cooling_until_ms
            .map(|until| steady_timestamp(until, now)),
    }
}

pub fn decider_to_pb(decider: Decider) -> pb::Decider {
    match decider {
        Decider::Operator => pb::Decider::Operator,
        Decider::Report => pb::Decider::Report,
        Decider::Check => pb::Decider::Check,
    }
}

pub fn problem_to_pb(problem: KeyProblem) -> pb::KeyProblem {
    match problem {
        KeyProblem::Invalid => pb::KeyProblem::Invalid,
        KeyProblem::Leaked => pb::KeyProblem::Leaked,
        KeyProblem::Suspended => pb::KeyProblem::Suspended,
        KeyProblem::ServiceDisabled => pb::KeyProblem::ServiceDisabled,
        KeyProblem::PermissionDenied => pb::KeyProblem::PermissionDenied,
    }
}

fn performance_to_pb(record: &KeyRecord) -> pb::KeyPerformance {
    let latency = |p: f64| {
        record
            .latency_percentile_ms(p)
            .map(|ms| duration_to_pb(Duration::from_millis(ms)))
    };
    pb::KeyPerformance {
        calls: record.calls,
        failures: FailureKind::ALL
            .iter()
            .zip(record.failures)
            .filter(|(_, count)| *count > 0)
            .map(|(&kind, count)| pb::FailureCount {
                kind: failure_kind_to_pb(kind) as i32,
                count,
            })
            .collect(),
        latency_p50: latency(0.5),
        latency_p90: latency(0.9),
        latency_p99: latency(0.99),
        recent_own_failure_percent: record.recent_own_failure_percent(),
    }
}

pub fn check_to_pb(check: &KeyCheck) -> pb::KeyCheck {
    let outcome = match check.outcome {
        CheckOutcome::Fine => pb::CheckOutcome::Fine,
        CheckOutcome::Refused { .. } => pb::CheckOutcome::Refused,
        CheckOutcome::NoAnswer { .. } => pb::CheckOutcome::NoAnswer,
    };
    pb::KeyCheck {
        at: Some(timestamp(check.at_wall_ms)),
        outcome: outcome as i32,
        problem: check
            .outcome
            .problem()
            .map_or(pb::KeyProblem::Unspecified, problem_to_pb) as i32,
        detail: check.outcome.detail().to_string(),
    }
}

/// A report's quota violations, each with the limit its provider id names.
pub fn violations(violations: Vec<pb::QuotaViolation>) -> Vec<QuotaViolation> {
    violations
        .into_iter()
        .map(|v| QuotaViolation {
            kind: quota_limit(&v.quota_id).map(|limit| match limit {
                QuotaLimit::RequestsPerMinute => LimitKind::RequestsPerMinute,
                QuotaLimit::InputTokensPerMinute => LimitKind::TokensPerMinute,
                QuotaLimit::RequestsPerDay => LimitKind::RequestsPerDay,
                QuotaLimit::InputTokensPerDay => LimitKind::TokensPerDay,
            }),
            quota_id: v.quota_id,
            model: v.model,
            value: v.quota_value,
        })
        .collect()
}

fn limit_to_pb(limit: LimitView) -> pb::LimitStatus {
    pb::LimitStatus {
        configured: limit.configured.unwrap_or(0),
        auto: limit.auto,
        learned: limit.learned.map(|l| l.value),
        learned_reason: limit.learned.map(learned_reason).unwrap_or_default(),
        named: limit.learned.and_then(|l| l.named),
    }
}

/// Why a learned limit is what it is, for people.
pub fn learned_reason(learned: LearnedLimit) -> String {
    match learned.named {
        Some(named) if named == learned.value => "the provider's figure, named in a 429".into(),
        Some(named) => format!(
            "lowered below the provider's figure of {named}: a 429 came while keylease's books held less (someone else spends the project); climbs back to it after windows at the limit without a 429"
        ),
        None => "lowered by a 429 without a figure; climbs back to the configured limit after windows at the limit without a 429".into(),
    }
}

pub fn group_to_pb(group: GroupView, now: Time) -> pb::QuotaGroupStatus {
    let [
        requests_per_minute,
        tokens_per_minute,
        requests_per_day,
        tokens_per_day,
    ] = group.limits;
    let mut requests_per_minute = limit_to_pb(requests_per_minute);
    let moved_by = group.answers.as_ref().and_then(|a| a.moved_by.clone());
    if let Some(moved_by) = moved_by
        && requests_per_minute.learned.is_some()
    {
        requests_per_minute.learned_reason = moved_by;
    }
    let window = |tally: Tally| pb::WindowAnswers {
        accepted: tally.accepted,
        refused: tally.refused,
        accepted_at_top: tally.accepted_at_top,
        refused_at_top: tally.refused_at_top,
    };
    pb::QuotaGroupStatus {
        evidence: group.answers.map(|answers| pb::AnswerEvidence {
            window: Some(window(answers.window)),
            previous_window: Some(window(answers.previous_window)),
            peak_accepted: answers.peak,
            moved_by: answers.moved_by.clone().unwrap_or_default(),
        }),
        requests_per_minute_limit: Some(requests_per_minute),
        tokens_per_minute_limit: Some(limit_to_pb(tokens_per_minute)),
        requests_per_day_limit: Some(limit_to_pb(requests_per_day)),
        tokens_per_day_limit: Some(limit_to_pb(tokens_per_day)),
        last_429: group.last_429.map(|e| pb::QuotaRefusal {
            quota_id: e.quota_id,
            at: Some(timestamp(e.at_wall_ms)),
            task_id: e.task_id,
        }),
        pool: group.pool,
        project: group.project,
        model: group.model,
        requests_per_minute: Some(usage_to_pb(group.requests_per_minute)),
        tokens_per_minute: Some(usage_to_pb(group.tokens_per_minute)),
        requests_per_day: Some(usage_to_pb(group.requests_per_day)),
        tokens_per_day: Some(usage_to_pb(group.tokens_per_day)),
        cooling_until: group.cooldown.map(|c| steady_timestamp(c.until_ms, now)),
        cooling_reason: group
            .cooldown
            .map(|c| c.reason.as_str().to_string())
            .unwrap_or_default(),
    }
}

pub fn usage_to_pb(usage: UsageView) -> pb::Usage {
    pb::Usage {
        used: usage.used,
        limit: usage.limit.unwrap_or(0),
    }
}

fn lease_event_to_pb(event: LeaseEvent, requests_sent: u64, at: Time) -> pb::LeaseEvent {
    pb::LeaseEvent {
        lease: Some(summary_to_pb(event.lease, at)),
        key_id: event.key_id,
        project: event.project,
        requests_sent: requests_sent as u32,
    }
}

/// An event for `WatchEvents`, with the name of the caller that made it happen.
pub fn event_to_pb(event: keylease_engine::Event, by: Option<&str>) -> pb::Event {
    use pb::event::Kind;
    let at = event.at;
    let kind = match event.kind {
        EventKind::Granted(lease) => Kind::Granted(lease_event_to_pb(lease, 0, at)),
        EventKind::Renewed(lease) => Kind::Renewed(lease_event_to_pb(lease, 0, at)),
        EventKind::Released {
            lease,
            requests_sent,
        } => Kind::Released(lease_event_to_pb(lease, requests_sent, at)),
        EventKind::Expired(lease) => Kind::Expired(lease_event_to_pb(lease, 0, at)),
        EventKind::Failed {
            lease,
            kind,
            detail,
        } => Kind::Failed(pb::FailureEvent {
            lease: Some(summary_to_pb(lease.lease, at)),
            key_id: lease.key_id,
            kind: failure_kind_to_pb(kind) as i32,
            detail,
        }),
        EventKind::CooledDown {
            pool,
            project,
            model,
            until_ms,
            reason,
        } => Kind::CooledDown(pb::CooldownEvent {
            pool,
            project,
            model,
            until: Some(steady_timestamp(until_ms, at)),
            reason: reason.as_str().to_string(),
        }),
        EventKind::KeyDisabled { key_id, reason, by } => Kind::Disabled(pb::KeyEvent {
            key_id,
            reason,
            by: decider_to_pb(by) as i32,
            check: None,
        }),
        EventKind::KeyEnabled { key_id, by } => Kind::Enabled(pb::KeyEvent {
            key_id,
            reason: match by {
                Decider::Check => "a check found it fine".to_string(),
                _ => String::new(),
            },
            by: decider_to_pb(by) as i32,
            check: None,
        }),
        EventKind::KeyChecked { key_id, outcome } => Kind::Checked(pb::KeyEvent {
            key_id,
            reason: String::new(),
            by: pb::Decider::Check as i32,
            check: Some(check_to_pb(&KeyCheck {
                at_wall_ms: at.wall_ms,
                outcome,
            })),
        }),
        EventKind::KeyAdded { key_id } => Kind::Added(pb::KeyEvent {
            key_id,
            reason: String::new(),
            ..Default::default()
        }),
        EventKind::KeyDraining { key_id, leases } => Kind::Draining(pb::KeyEvent {
            key_id,
            reason: format!(
                "removed from the configuration; {leases} live lease(s) run to their end"
            ),
            ..Default::default()
        }),
        EventKind::KeyRemoved { key_id } => Kind::Removed(pb::KeyEvent {
            key_id,
            reason: String::new(),
            ..Default::default()
        }),
        EventKind::CooldownReset {
            pool,
            project,
            model,
        } => Kind::CooldownReset(pb::CooldownEvent {
            pool,
            project,
            model,
            until: None,
            reason: "reset by an operator".into(),
        }),
        EventKind::Reloaded {
            changes,
            needs_restart,
        } => Kind::Reloaded(pb::ReloadResponse {
            changes,
            needs_restart,
        }),
        EventKind::LimitLearned {
            pool,
            project,
            model,
            change,
        } => Kind::LimitLearned(pb::LimitEvent {
            pool,
            project,
            model,
            limit: change.kind.as_str().to_string(),
            before: change.before,
            after: change.after,
            reason: change.reason,
        }),
    };
    pb::Event {
        at: Some(timestamp(at.wall_ms)),
        kind: Some(kind),
        caller: by.unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_quota_id_names_its_own_limit() {
        let violation = |quota_id: &str| pb::QuotaViolation {
            quota_id: quota_id.into(),
            model: "gemini-2.5-pro".into(),
            quota_value: Some(1_000_000),
        };
        let kinds: Vec<Option<LimitKind>> = violations(vec![
            violation("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
            violation("GenerateContentInputTokensPerModelPerMinute-FreeTier"),
            violation("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
            // Input tokens per day: its own limit, not requests per day.
            violation("GenerateContentInputTokensPerModelPerDay-FreeTier"),
            violation("SomethingElse"),
        ])
        .into_iter()
        .map(|v| v.kind)
        .collect();
        assert_eq!(
            kinds,
            [
                Some(LimitKind::RequestsPerMinute),
                Some(LimitKind::TokensPerMinute),
                Some(LimitKind::RequestsPerDay),
                Some(LimitKind::TokensPerDay),
                None
            ]
        );
    }
}
