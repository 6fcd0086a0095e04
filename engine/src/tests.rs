//! The engine's rules, one behaviour per test, on a manual clock (milliseconds passed in).

use super::*;
use keylease_core::ApiKey;

/// 2026-03-09 20:00 UTC, 13:00 in Los Angeles (PDT).
const T0: u64 = 1_773_086_400_000;
const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const MODEL: &str = "gemini-2.5-flash";

fn limits(rpm: u64, rpd: u64) -> Limits {
    Limits {
        requests_per_minute: Some(rpm),
        tokens_per_minute: Some(100_000),
        requests_per_day: Some(rpd),
        tokens_per_day: None,
        auto: [false; 4],
    }
}

pub(super) fn config(rpm: u64, rpd: u64) -> EngineConfig {
    let pool = PoolConfig {
        max_leases_per_key: 1,
        models: BTreeMap::from([(MODEL.to_string(), limits(rpm, rpd))]),
        project_limits: BTreeMap::new(),
        other_models: None,
    };
    EngineConfig {
        default_ttl_ms: 30 * SECOND,
        max_ttl_ms: 10 * MINUTE,
        max_requests_per_lease: 50,
        window_ms: MINUTE,
        safety_margin_ms: SECOND,
        exclusion_ttl_ms: 10 * MINUTE,
        cooldown_base_ms: MINUTE,
        cooldown_max_ms: 15 * MINUTE,
        memory_capacity: 1_000,
        daily: DailyReset {
            zone: chrono_tz::America::Los_Angeles,
        },
        pools: BTreeMap::from([(DEFAULT_POOL.to_string(), pool)]),
        relearn_after_windows: 10,
        check_keys: false,
    }
}

/// Keys `k1..` as (id, project).
pub(super) fn key_specs(keys: &[(&str, &str)]) -> Vec<KeySpec> {
    keys.iter()
        .map(|(id, project)| KeySpec {
            id: id.to_string(),
            pool: DEFAULT_POOL.to_string(),
            project: project.to_string(),
            secret: ApiKey::new(format!("AIzaFAKE.{id}-000000000000000000000000")),
            fingerprint: format!("fp-{id}"),
            max_leases: None,
        })
        .collect()
}

fn new_engine(config: EngineConfig, keys: Vec<KeySpec>) -> Result<Engine, SetupError> {
    let setup = Setup::new(config, keys, 0);
    Engine::new(setup, Time::at(T0))
}

/// An engine deciding by the frozen rules 3, which replay an older build's records: each 429
/// was a verdict ([`learning::reacting`]).
fn engine_of_rules_3(config: EngineConfig, keys: Vec<KeySpec>) -> Engine {
    let setup = Setup {
        rules: 3,
        ..Setup::new(config, keys, 0)
    };
    Engine::new(setup, Time::at(T0)).unwrap()
}

fn engine(keys: &[(&str, &str)]) -> Engine {
    new_engine(config(10, 100), key_specs(keys)).unwrap()
}

fn ask(task: &str) -> AcquireRequest {
    AcquireRequest {
        task_id: task.to_string(),
        model: MODEL.to_string(),
        ..Default::default()
    }
}

/// `task` asking for `requests` requests.
fn ask_n(task: &str, requests: u32) -> AcquireRequest {
    AcquireRequest {
        requests,
        ..ask(task)
    }
}

fn granted(outcome: Result<Acquired, EngineError>) -> LeaseView {
    match outcome {
        Ok(Acquired::Granted(lease)) => lease,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn unavailable(outcome: Result<Acquired, EngineError>) -> Unavailable {
    match outcome {
        Ok(Acquired::Unavailable(why)) => why,
        other => panic!("expected no key, got {other:?}"),
    }
}

fn queued(outcome: Result<Acquired, EngineError>) -> WaiterId {
    match outcome {
        Ok(Acquired::Queued(id)) => id,
        other => panic!("expected to wait, got {other:?}"),
    }
}

/// A report of `kind`; a 429 names the input tokens per minute [`config`] sets, so that it
/// teaches nothing and only its cooldown counts.
fn report(kind: FailureKind) -> FailureReport {
    let violations = match kind {
        FailureKind::RateLimited => vec![violation(LimitKind::TokensPerMinute, Some(100_000))],
        _ => Vec::new(),
    };
    FailureReport {
        kind,
        retry_after_ms: None,
        detail: String::new(),
        requests_sent: None,
        violations,
    }
}

/// A 429's violation of `kind` for [`MODEL`], naming `value`.
fn violation(kind: LimitKind, value: Option<u64>) -> QuotaViolation {
    QuotaViolation {
        kind: Some(kind),
        quota_id: format!("{kind:?}-FreeTier"),
        model: MODEL.to_string(),
        value,
    }
}

/// A release's usage, both figures given.
/// A renewal of lease `lease_id` under `fencing_token`.
fn renewal(
    lease_id: &str,
    fencing_token: u64,
    ttl_ms: Option<u64>,
    additional_requests: u32,
    additional_tokens: u64,
) -> Renewal {
    Renewal {
        lease_id: lease_id.to_string(),
        fencing_token,
        ttl_ms,
        additional_requests,
        additional_tokens,
    }
}

fn used(requests_sent: u32, input_tokens: u64) -> Usage {
    Usage {
        requests_sent: Some(requests_sent),
        input_tokens: Some(input_tokens),
    }
}

fn invalid_field(outcome: Result<Acquired, EngineError>) -> &'static str {
    match outcome {
        Err(EngineError::InvalidArgument { field, .. }) => field,
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

// ---- exclusivity and affinity ----------------------------------------------------------------

#[test]
fn a_leased_key_is_not_lent_to_another_task() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let why = unavailable(e.acquire(T0, ask("b")));
    assert_eq!(why.reason, UnavailableReason::AllLeased);
    assert_eq!(why.retry_at_ms, Some(lease.expires_ms));
}

#[test]
fn max_leases_gives_each_key_that_many_slots() {
    let mut cfg = config(10, 100);
    cfg.pools.get_mut(DEFAULT_POOL).unwrap().max_leases_per_key = 2;
    let mut e = new_engine(cfg, key_specs(&[("k1", "p1")])).unwrap();
    let a = granted(e.acquire(T0, ask("a")));
    let b = granted(e.acquire(T0, ask("b")));
    assert_eq!((a.key_id.as_str(), b.key_id.as_str()), ("k1", "k1"));
    unavailable(e.acquire(T0, ask("c")));
}

#[test]
fn a_task_asking_again_gets_its_live_lease_back() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let first = granted(e.acquire(T0, ask("a")));
    let again = granted(e.acquire(T0 + SECOND, ask("a")));
    assert_eq!(first, again);
}

#[test]
fn a_task_excluding_its_leased_key_gets_another() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let first = granted(e.acquire(T0, ask("a")));
    let request = AcquireRequest {
        exclude_key_ids: vec![first.key_id.clone()],
        ..ask("a")
    };
    let second = granted(e.acquire(T0, request));
    assert_ne!(second.key_id, first.key_id);
}

#[test]
fn a_retried_client_request_id_returns_the_same_lease() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let request = AcquireRequest {
        client_request_id: Some("req-1".into()),
        ..ask("a")
    };
    let first = granted(e.acquire(T0, request.clone()));
    assert_eq!(granted(e.acquire(T0, request.clone())), first);
    let stolen = AcquireRequest {
        task_id: "b".into(),
        ..request
    };
    assert_eq!(invalid_field(e.acquire(T0, stolen)), "client_request_id");
}

#[test]
fn explicit_exclusions_of_every_key_fail_at_once() {
    let mut e = engine(&[("k1", "p1")]);
    let request = AcquireRequest {
        exclude_key_ids: vec!["k1".into()],
        wait: true,
        ..ask("a")
    };
    assert_eq!(
        unavailable(e.acquire(T0, request)).reason,
        UnavailableReason::AllExcluded
    );
}

// ---- time-bounded leases and fencing -----------------------------------------------------------

#[test]
fn an_expired_lease_returns_its_key_to_the_pool() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    e.tick(lease.expires_ms);
    let events = e.drain().events;
    assert!(
        events.iter().any(
            |ev| matches!(&ev.kind, EventKind::Expired(l) if l.lease.lease_id == lease.lease_id)
        )
    );
    let next = granted(e.acquire(lease.expires_ms, ask("b")));
    assert_eq!(next.key_id, "k1");
    assert!(next.fencing_token > lease.fencing_token);
}

#[test]
fn next_wakeup_is_the_earliest_expiry() {
    let mut e = engine(&[("k1", "p1")]);
    assert_eq!(e.next_wakeup_ms(), None);
    let lease = granted(e.acquire(T0, ask("a")));
    assert_eq!(e.next_wakeup_ms(), Some(lease.expires_ms));
}

#[test]
fn stale_fencing_token_is_refused_and_changes_nothing() {
    let mut e = engine(&[("k1", "p1")]);
    let old = granted(e.acquire(T0, ask("a")));
    e.tick(old.expires_ms);
    let current = granted(e.acquire(old.expires_ms, ask("b")));
    let now = old.expires_ms + SECOND;

    let renew = e.renew(
        now,
        renewal(&old.lease_id, old.fencing_token, None, 0, 0),
        false,
    );
    assert!(matches!(renew, Err(EngineError::StaleLease { .. })));
    let report = e.report_failure(
        now,
        &old.lease_id,
        old.fencing_token,
        report(FailureKind::RateLimited),
    );
    assert!(matches!(report, Err(EngineError::StaleLease { .. })));
    let wrong_token = e.renew(
        now,
        renewal(&current.lease_id, old.fencing_token, None, 0, 0),
        false,
    );
    assert!(matches!(wrong_token, Err(EngineError::StaleLease { .. })));

    let status = e.status(now, None, None, 10).unwrap();
    assert_eq!(status.keys[0].leases[0].lease_id, current.lease_id);
    assert!(status.groups.iter().all(|g| g.cooldown.is_none()));
}

#[test]
fn release_is_idempotent() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    assert_eq!(
        e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 10)),
        Ok(Some(Amount {
            requests: 1,
            tokens: 10
        }))
    );
    assert_eq!(
        e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 10)),
        Ok(None)
    );
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(status.groups[0].requests_per_minute.used, 1);
}

#[test]
fn an_unknown_lease_is_not_found() {
    let mut e = engine(&[("k1", "p1")]);
    for id in ["lease-99", "nonsense", ""] {
        assert_eq!(
            e.release(T0, id, 1, used(0, 0)),
            Err(EngineError::LeaseNotFound(id.to_string()))
        );
    }
}

#[test]
fn renew_extends_the_ttl_up_to_the_maximum() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let later = T0 + 10 * SECOND;
    let Ok(Renewed::Done(renewed)) = e.renew(
        later,
        renewal(
            &lease.lease_id,
            lease.fencing_token,
            Some(60 * MINUTE),
            0,
            0,
        ),
        false,
    ) else {
        panic!("renewal refused");
    };
    assert_eq!(renewed.ttl_ms, 10 * MINUTE);
    assert_eq!(renewed.expires_ms, later + 10 * MINUTE);
    assert_eq!(renewed.fencing_token, lease.fencing_token);
}

#[test]
fn renew_reserves_more_requests_while_the_quota_allows() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let lease = granted(e.acquire(T0, ask("a")));
    let Ok(Renewed::Done(renewed)) = e.renew(
        T0,
        renewal(&lease.lease_id, lease.fencing_token, None, 1, 0),
        false,
    ) else {
        panic!("renewal refused");
    };
    assert_eq!(renewed.requests_granted, 2);
    granted(e.acquire(T0, ask("b")));
    match e.renew(
        T0,
        renewal(&lease.lease_id, lease.fencing_token, None, 1, 0),
        false,
    ) {
        Ok(Renewed::QuotaUnavailable(view, why)) => {
            assert_eq!(view.requests_granted, 2);
            assert_eq!(why.reason, UnavailableReason::QuotaSpent);
        }
        other => panic!("expected a shortfall, got {other:?}"),
    }
}

// ---- quotas ------------------------------------------------------------------------------------

#[test]
fn keys_of_one_project_share_its_quota() {
    let mut e = new_engine(config(2, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let first = granted(e.acquire(T0, ask_n("a", 2)));
    assert_eq!(first.project, "p1");
    let why = unavailable(e.acquire(T0, ask("b")));
    assert_eq!(why.reason, UnavailableReason::QuotaSpent);
}

#[test]
fn sent_requests_hold_the_window_until_a_window_after_release() {
    let mut e = new_engine(config(2, 100), key_specs(&[("k1", "p1")])).unwrap();
    let lease = granted(e.acquire(T0, ask_n("a", 2)));
    let released_at = T0 + 5 * SECOND;
    e.release(
        released_at,
        &lease.lease_id,
        lease.fencing_token,
        used(2, 0),
    )
    .unwrap();
    let free_at = released_at + MINUTE + SECOND;
    let why = unavailable(e.acquire(free_at - 1, ask("b")));
    assert_eq!(
        (why.reason, why.retry_at_ms),
        (UnavailableReason::QuotaSpent, Some(free_at))
    );
    granted(e.acquire(free_at, ask("b")));
}

#[test]
fn unsent_requests_are_refunded_at_release() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1")])).unwrap();
    let lease = granted(e.acquire(T0, ask_n("a", 3)));
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
        .unwrap();
    granted(e.acquire(T0, ask_n("b", 2)));
}

#[test]
fn asking_for_more_than_any_limit_is_invalid() {
    let mut e = new_engine(config(5, 100), key_specs(&[("k1", "p1")])).unwrap();
    assert_eq!(invalid_field(e.acquire(T0, ask_n("a", 6))), "requests");
    let tokens = AcquireRequest {
        estimated_tokens: 100_001,
        ..ask("a")
    };
    assert_eq!(
        invalid_field(e.acquire(T0, tokens)),
        "estimated_input_tokens"
    );
}

#[test]
fn project_limits_replace_the_model_defaults() {
    let mut cfg = config(1, 100);
    cfg.pools
        .get_mut(DEFAULT_POOL)
        .unwrap()
        .project_limits
        .insert(("big".into(), MODEL.into()), limits(5, 100));
    let mut e = new_engine(cfg, key_specs(&[("k1", "small"), ("k2", "big")])).unwrap();
    let lease = granted(e.acquire(T0, ask_n("a", 5)));
    assert_eq!(lease.project, "big");
}

#[test]
fn the_daily_count_resets_at_midnight_pacific() {
    let mut e = new_engine(config(10, 2), key_specs(&[("k1", "p1")])).unwrap();
    let lease = granted(e.acquire(T0, ask_n("a", 2)));
    e.release(T0, &lease.lease_id, lease.fencing_token, used(2, 0))
        .unwrap();
    let hour_later = T0 + 60 * MINUTE;
    let why = unavailable(e.acquire(hour_later, ask("b")));
    // 13:00 PDT on 2026-03-09: the next midnight is 07:00 UTC on 2026-03-10.
    let midnight = T0 + 11 * 60 * MINUTE;
    assert_eq!(
        (why.reason, why.retry_at_ms),
        (UnavailableReason::QuotaSpent, Some(midnight))
    );
    granted(e.acquire(midnight, ask("b")));
}

#[test]
fn input_tokens_per_day_are_counted_from_estimates_and_corrected_by_what_was_used() {
    let mut cfg = config(100, 1_000);
    let model = cfg.pools.get_mut(DEFAULT_POOL).unwrap();
    model.models.get_mut(MODEL).unwrap().tokens_per_day = Some(10_000);
    let mut e = new_engine(cfg, key_specs(&[("k1", "p1")])).unwrap();
    let with_tokens = |task: &str, tokens: u64| AcquireRequest {
        estimated_tokens: tokens,
        ..ask(task)
    };
    // More than the day allows is refused as a request no project could serve.
    assert_eq!(
        invalid_field(e.acquire(T0, with_tokens("big", 10_001))),
        "estimated_input_tokens"
    );
    let lease = granted(e.acquire(T0, with_tokens("a", 8_000)));
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(status.groups[0].tokens_per_day.used, 8_000);
    assert_eq!(status.groups[0].tokens_per_day.limit, Some(10_000));
    // The estimate is replaced by what the call used.
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 6_000))
        .unwrap();
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(status.groups[0].tokens_per_day.used, 6_000);
    // An hour on, the minute's books are empty but the day's are not.
    let hour_later = T0 + 60 * MINUTE;
    let lease = granted(e.acquire(hour_later, with_tokens("b", 4_000)));
    e.release(
        hour_later,
        &lease.lease_id,
        lease.fencing_token,
        used(1, 4_000),
    )
    .unwrap();
    let why = unavailable(e.acquire(hour_later, with_tokens("c", 1)));
    let midnight = T0 + 11 * 60 * MINUTE;
    assert_eq!(
        (why.reason, why.retry_at_ms),
        (UnavailableReason::QuotaSpent, Some(midnight))
    );
    let lease = granted(e.acquire(midnight, with_tokens("c", 9_000)));
    assert_eq!(lease.project, "p1");
}

#[test]
fn a_tokens_per_day_429_teaches_its_figure_and_rests_until_the_reset() {
    let mut e = new_engine(config(10, 100), key_specs(&[("k1", "p1")])).unwrap();
    let report = FailureReport {
        retry_after_ms: Some(20 * SECOND),
        violations: vec![violation(LimitKind::TokensPerDay, Some(1_000_000))],
        ..report(FailureKind::RateLimited)
    };
    let events = refused_with(&mut e, T0, "a", report);
    assert_eq!(
        learned_changes(&events),
        [(LimitKind::TokensPerDay, None, Some(1_000_000))]
    );
    let why = unavailable(e.acquire(T0 + MINUTE, ask("b")));
    assert_eq!(why.reason, UnavailableReason::CoolingDown);
    let midnight = T0 + 11 * 60 * MINUTE;
    assert_eq!(why.retry_at_ms, Some(midnight));
    // Neither the requests per day nor per minute took the figure.
    let status = e.status(T0 + MINUTE, None, None, 10).unwrap();
    let group = &status.groups[0];
    assert_eq!(group.requests_per_day.limit, Some(100));
    assert_eq!(group.requests_per_minute.limit, Some(10));
    assert_eq!(group.tokens_per_day.limit, Some(1_000_000));
    assert_eq!(
        group.limits[LimitKind::TokensPerDay as usize]
            .learned
            .unwrap()
            .named,
        Some(1_000_000)
    );
    // Kept across a snapshot and a new configuration.
    let restored = Engine::restore(e.setup(), Vec::new(), e.image()).unwrap().0;
    assert_eq!(restored.image(), e.image());
    let setup = Setup::new(config(10, 100), key_specs(&[("k1", "p1")]), 0);
    let e = Engine::restore(setup, Vec::new(), e.image()).unwrap().0;
    let status = e.status(T0 + MINUTE, None, None, 10).unwrap();
    assert_eq!(status.groups[0].tokens_per_day.limit, Some(1_000_000));
}

#[test]
fn model_names_are_canonical() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(
        T0,
        AcquireRequest {
            model: format!("models/{MODEL}"),
            ..ask("a")
        },
    ));
    assert_eq!(lease.model, MODEL);
    assert_eq!(granted(e.acquire(T0, ask("a"))), lease);
}

// ---- failures by class -------------------------------------------------------------------------

#[test]
fn rate_limit_cools_the_project_down_for_the_providers_delay() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p1"), ("k3", "p2")]);
    let lease = granted(e.acquire(T0, ask("a")));
    assert_eq!(lease.project, "p1");
    let limited = FailureReport {
        retry_after_ms: Some(26 * SECOND),
        ..report(FailureKind::RateLimited)
    };
    e.report_failure(T0, &lease.lease_id, lease.fencing_token, limited)
        .unwrap();
    // Both p1 keys rest; the p2 key serves.
    assert_eq!(granted(e.acquire(T0, ask("b"))).project, "p2");
    let why = unavailable(e.acquire(T0, ask("c")));
    assert_eq!(
        (why.reason, why.retry_at_ms),
        (UnavailableReason::CoolingDown, Some(T0 + 26 * SECOND))
    );
    assert_eq!(granted(e.acquire(T0 + 26 * SECOND, ask("c"))).project, "p1");
}

#[test]
fn rate_limits_without_a_delay_back_off_exponentially_until_a_success() {
    let mut e = engine(&[("k1", "p1")]);
    let mut now = T0;
    for (round, expected) in [MINUTE, 2 * MINUTE, 4 * MINUTE].into_iter().enumerate() {
        let lease = granted(e.acquire(now, ask(&format!("limited-{round}"))));
        e.report_failure(
            now,
            &lease.lease_id,
            lease.fencing_token,
            report(FailureKind::RateLimited),
        )
        .unwrap();
        assert_eq!(
            unavailable(e.acquire(now, ask("b"))).retry_at_ms,
            Some(now + expected)
        );
        now += expected;
    }
    let lease = granted(e.acquire(now, ask("b")));
    e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0))
        .unwrap();
    let lease = granted(e.acquire(now, ask("c")));
    e.report_failure(
        now,
        &lease.lease_id,
        lease.fencing_token,
        report(FailureKind::RateLimited),
    )
    .unwrap();
    assert_eq!(
        unavailable(e.acquire(now, ask("d"))).retry_at_ms,
        Some(now + MINUTE)
    );
}

#[test]
fn a_shorter_retry_delay_never_shortens_a_cooldown() {
    let mut cfg = config(10, 100);
    cfg.pools.get_mut(DEFAULT_POOL).unwrap().max_leases_per_key = 2;
    let mut e = new_engine(cfg, key_specs(&[("k1", "p1")])).unwrap();
    let a = granted(e.acquire(T0, ask("a")));
    let b = granted(e.acquire(T0, ask("b")));
    let long = FailureReport {
        retry_after_ms: Some(50 * SECOND),
        ..report(FailureKind::RateLimited)
    };
    let short = FailureReport {
        retry_after_ms: Some(5 * SECOND),
        ..report(FailureKind::RateLimited)
    };
    e.report_failure(T0, &a.lease_id, a.fencing_token, long)
        .unwrap();
    e.report_failure(T0, &b.lease_id, b.fencing_token, short)
        .unwrap();
    assert_eq!(
        unavailable(e.acquire(T0, ask("c"))).retry_at_ms,
        Some(T0 + 50 * SECOND)
    );
}

#[test]
fn daily_quota_exhaustion_rests_the_project_until_midnight_pacific() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    e.report_failure(
        T0,
        &lease.lease_id,
        lease.fencing_token,
        report(FailureKind::DailyQuotaExhausted),
    )
    .unwrap();
    let midnight = T0 + 11 * 60 * MINUTE;
    assert_eq!(
        unavailable(e.acquire(T0, ask("b"))).retry_at_ms,
        Some(midnight)
    );
    granted(e.acquire(midnight, ask("b")));
}

#[test]
fn an_invalid_key_is_disabled_until_an_operator_enables_it() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let bad = FailureReport {
        detail: "API_KEY_INVALID".into(),
        ..report(FailureKind::InvalidKey)
    };
    e.report_failure(T0, &lease.lease_id, lease.fencing_token, bad)
        .unwrap();
    let status = e.key_status(T0, "k1").unwrap();
    assert_eq!(status.state, KeyState::Disabled);
    let disabled = status.disabled.expect("disabled");
    assert_eq!(disabled.reason, "invalid key: API_KEY_INVALID");
    assert_eq!(
        (disabled.by, disabled.problem, disabled.since_wall_ms),
        (Decider::Report, Some(KeyProblem::Invalid), Some(T0))
    );
    let why = unavailable(e.acquire(
        T0 + 60 * MINUTE,
        AcquireRequest {
            wait: true,
            ..ask("b")
        },
    ));
    assert_eq!(why.reason, UnavailableReason::AllDisabled);
    e.set_key_enabled(T0, "k1", true, "").unwrap();
    granted(e.acquire(T0, ask("b")));
}

#[test]
fn late_evidence_of_a_bad_key_still_disables_it() {
    let mut e = engine(&[("k1", "p1")]);
    let old = granted(e.acquire(T0, ask("a")));
    e.tick(old.expires_ms);
    let current = granted(e.acquire(old.expires_ms, ask("b")));
    let leaked = FailureReport {
        detail: "reported as leaked".into(),
        ..report(FailureKind::PermissionDenied)
    };
    e.report_failure(old.expires_ms, &old.lease_id, old.fencing_token, leaked)
        .unwrap();
    assert_eq!(
        e.key_status(old.expires_ms, "k1").unwrap().state,
        KeyState::Disabled
    );
    // The current holder's lease ended with the key.
    let released = e.release(
        old.expires_ms,
        &current.lease_id,
        current.fencing_token,
        used(0, 0),
    );
    assert_eq!(released, Ok(None));
}

#[test]
fn only_the_most_recently_ended_leases_are_remembered() {
    let mut cfg = config(10, 100);
    cfg.memory_capacity = 2;
    let mut e = new_engine(cfg, key_specs(&[("k1", "p1"), ("k2", "p2")])).unwrap();
    let mut ended = Vec::new();
    for task in ["a", "b", "c"] {
        let lease = granted(e.acquire(T0, ask(task)));
        e.release(T0, &lease.lease_id, lease.fencing_token, used(0, 0))
            .unwrap();
        ended.push(lease);
    }
    let leaked = || report(FailureKind::PermissionDenied);
    let oldest = &ended[0];
    let forgotten = e.report_failure(T0, &oldest.lease_id, oldest.fencing_token, leaked());
    assert!(
        matches!(&forgotten, Err(EngineError::StaleLease { reason, .. }) if reason.contains("too long ago")),
        "{forgotten:?}"
    );
    let newest = &ended[2];
    e.report_failure(T0, &newest.lease_id, newest.fencing_token, leaked())
        .unwrap();
    assert_eq!(
        e.key_status(T0, &newest.key_id).unwrap().state,
        KeyState::Disabled
    );
}

#[test]
fn bad_key_evidence_with_a_wrong_token_for_a_live_lease_is_refused() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let forged = e.report_failure(
        T0,
        &lease.lease_id,
        lease.fencing_token + 1,
        report(FailureKind::InvalidKey),
    );
    match forged {
        Err(EngineError::StaleLease { reason, .. }) => {
            assert!(reason.contains("fencing token"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.key_status(T0, "k1").unwrap().state, KeyState::Leased);
}

#[test]
fn server_errors_keep_the_key_healthy_and_usable_by_the_task() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let reported = e
        .report_failure(
            T0,
            &lease.lease_id,
            lease.fencing_token,
            report(FailureKind::ServerError),
        )
        .unwrap();
    assert_eq!(e.key_status(T0, "k1").unwrap().state, KeyState::Available);
    assert_eq!(granted(e.acquire(T0, reported.replacement)).key_id, "k1");
}

#[test]
fn a_key_related_failure_excludes_the_key_from_the_task_for_a_while() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let limited = FailureReport {
        retry_after_ms: Some(SECOND),
        ..report(FailureKind::RateLimited)
    };
    let reported = e
        .report_failure(T0, &lease.lease_id, lease.fencing_token, limited)
        .unwrap();
    let replacement = granted(e.acquire(T0, reported.replacement));
    assert_ne!(replacement.key_id, lease.key_id);
    e.release(
        T0,
        &replacement.lease_id,
        replacement.fencing_token,
        used(1, 0),
    )
    .unwrap();

    // Other tasks may use the failed key once it cooled down; this task not for ten minutes.
    let later = T0 + 2 * SECOND;
    let other = AcquireRequest {
        exclude_key_ids: vec![replacement.key_id.clone()],
        ..ask("b")
    };
    assert_eq!(granted(e.acquire(later, other)).key_id, lease.key_id);
    let excluded = AcquireRequest {
        exclude_key_ids: vec![replacement.key_id.clone()],
        ..ask("a")
    };
    assert_eq!(
        unavailable(e.acquire(later, excluded.clone())).reason,
        UnavailableReason::AllExcluded
    );
    assert_eq!(
        granted(e.acquire(T0 + 10 * MINUTE, excluded)).key_id,
        lease.key_id
    );
}

#[test]
fn rotation_after_a_quota_failure_moves_to_another_project() {
    let mut e = engine(&[("a1", "pa"), ("a2", "pa"), ("b1", "pb")]);
    let lease = granted(e.acquire(T0, ask("t")));
    assert_eq!(lease.project, "pa");
    let reported = e
        .report_failure(
            T0,
            &lease.lease_id,
            lease.fencing_token,
            report(FailureKind::DailyQuotaExhausted),
        )
        .unwrap();
    assert_eq!(granted(e.acquire(T0, reported.replacement)).project, "pb");
}

// ---- fair waiting ------------------------------------------------------------------------------

#[test]
fn waiters_are_served_first_come_first_served() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("holder")));
    let first = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w1")
        },
    ));
    let second = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w2")
        },
    ));
    e.release(
        T0 + SECOND,
        &lease.lease_id,
        lease.fencing_token,
        used(1, 0),
    )
    .unwrap();
    let grants = e.drain().waiter_grants;
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].0, grants[0].1.task_id.as_str()), (first, "w1"));
    // A newcomer does not overtake the one still waiting.
    let (w1_lease, _) = (&grants[0].1, second);
    e.release(
        T0 + 2 * SECOND,
        &w1_lease.lease_id,
        w1_lease.fencing_token,
        used(1, 0),
    )
    .unwrap();
    unavailable(e.acquire(T0 + 2 * SECOND, ask("newcomer")));
    assert_eq!(e.drain().waiter_grants[0].0, second);
}

#[test]
fn a_newcomer_does_not_overtake_a_waiter_blocked_on_quota() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let lease = granted(e.acquire(T0, ask_n("holder", 2)));
    queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            requests: 2,
            ..ask("big")
        },
    ));
    // One request would fit, but the waiter ahead needs that room first.
    unavailable(e.acquire(T0, ask("small")));
    e.release(T0, &lease.lease_id, lease.fencing_token, used(0, 0))
        .unwrap();
    assert_eq!(e.drain().waiter_grants[0].1.task_id, "big");
}

#[test]
fn a_later_waiter_may_take_a_key_the_earlier_one_excluded() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let l1 = granted(e.acquire(T0, ask("h1")));
    let l2 = granted(e.acquire(T0, ask("h2")));
    let k1_only = if l1.key_id == "k1" { &l1 } else { &l2 };
    queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            exclude_key_ids: vec!["k1".into()],
            ..ask("w1")
        },
    ));
    let w2 = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w2")
        },
    ));
    e.release(T0, &k1_only.lease_id, k1_only.fencing_token, used(1, 0))
        .unwrap();
    let grants = e.drain().waiter_grants;
    assert_eq!((grants[0].0, grants[0].1.key_id.as_str()), (w2, "k1"));
}

#[test]
fn a_cancelled_waiter_is_never_granted() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("holder")));
    let waiter = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w")
        },
    ));
    let why = e.cancel_waiter(T0, waiter).unwrap();
    assert_eq!(why.reason, UnavailableReason::AllLeased);
    assert_eq!(e.cancel_waiter(T0, waiter), None);
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
        .unwrap();
    assert!(e.drain().waiter_grants.is_empty());
    assert_eq!(e.status(T0, None, None, 10).unwrap().live_leases, 0);
}

#[test]
fn an_expiry_wakes_a_waiter() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("holder")));
    let waiter = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w")
        },
    ));
    e.tick(lease.expires_ms);
    assert_eq!(e.drain().waiter_grants[0].0, waiter);
}

#[test]
fn a_cooldown_ending_wakes_a_waiter() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("holder")));
    let limited = FailureReport {
        retry_after_ms: Some(5 * SECOND),
        ..report(FailureKind::RateLimited)
    };
    e.report_failure(T0, &lease.lease_id, lease.fencing_token, limited)
        .unwrap();
    let waiter = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w")
        },
    ));
    assert_eq!(e.next_wakeup_ms(), Some(T0 + 5 * SECOND));
    e.tick(T0 + 5 * SECOND);
    assert_eq!(e.drain().waiter_grants[0].0, waiter);
}

#[test]
fn a_waiter_is_served_when_its_exclusion_of_a_free_key_ends() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let failed = granted(e.acquire(T0, ask("w")));
    assert_eq!(failed.key_id, "k1");
    let limited = FailureReport {
        retry_after_ms: Some(SECOND),
        requests_sent: Some(0),
        ..report(FailureKind::RateLimited)
    };
    e.report_failure(T0, &failed.lease_id, failed.fencing_token, limited)
        .unwrap();
    let long = AcquireRequest {
        ttl_ms: Some(10 * MINUTE),
        ..ask("holder")
    };
    assert_eq!(granted(e.acquire(T0 + 2 * SECOND, long)).key_id, "k2");
    let waiter = queued(e.acquire(
        T0 + 2 * SECOND,
        AcquireRequest {
            wait: true,
            ..ask("w")
        },
    ));
    // k1 is free but excluded for w: the line must be looked at when that ends, not later.
    assert_eq!(e.next_wakeup_ms(), Some(T0 + 10 * MINUTE));
    e.tick(T0 + 10 * MINUTE);
    let grants = e.drain().waiter_grants;
    assert_eq!((grants[0].0, grants[0].1.key_id.as_str()), (waiter, "k1"));
}

#[test]
fn waiters_fail_at_once_when_their_last_key_is_disabled() {
    let mut e = engine(&[("k1", "p1")]);
    granted(e.acquire(T0, ask("holder")));
    let waiter = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w")
        },
    ));
    e.set_key_enabled(T0, "k1", false, "revoked").unwrap();
    let failures = e.drain().waiter_failures;
    assert_eq!(
        failures,
        vec![(
            waiter,
            Unavailable {
                reason: UnavailableReason::AllDisabled,
                retry_at_ms: None
            }
        )]
    );
}

// ---- renewals in line --------------------------------------------------------------------------

/// A renewal of `lease` asking for `more` requests that waits in line for them.
fn renew_waiting(e: &mut Engine, at: u64, lease: &LeaseView, more: u32) -> (LeaseView, WaiterId) {
    match e.renew(
        at,
        renewal(&lease.lease_id, lease.fencing_token, None, more, 0),
        true,
    ) {
        Ok(Renewed::Queued(view, id)) => (view, id),
        other => panic!("expected the renewal to wait, got {other:?}"),
    }
}

/// `task` asking for `requests` on a lease of ten minutes, avoiding key `avoid`.
fn ask_long(task: &str, requests: u32, avoid: &str) -> AcquireRequest {
    AcquireRequest {
        ttl_ms: Some(10 * MINUTE),
        exclude_key_ids: vec![avoid.to_string()],
        ..ask_n(task, requests)
    }
}

#[test]
fn a_renewal_waits_in_line_behind_those_who_came_first() {
    // p1 allows 3 a minute: the holder has 2 of them, `other` 1.
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let holder = granted(e.acquire(T0, ask_n("holder", 2)));
    let other = granted(e.acquire(T0, ask("other")));
    let first = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("first")
        },
    ));
    let (view, renewal) = renew_waiting(&mut e, T0 + SECOND, &holder, 1);
    // The lease lives on at once; what it asked for more waits.
    assert_eq!(
        (view.requests_granted, view.expires_ms),
        (2, T0 + SECOND + 30 * SECOND)
    );
    // One request comes free: the acquire that waited longer has it.
    e.release(
        T0 + 2 * SECOND,
        &other.lease_id,
        other.fencing_token,
        used(0, 0),
    )
    .unwrap();
    let notices = e.drain();
    assert_eq!(notices.waiter_grants[0].0, first);
    assert!(notices.waiter_renewals.is_empty(), "{notices:?}");
    // Then the renewal, booked on the lease it renews.
    let first_lease = &notices.waiter_grants[0].1;
    e.release(
        T0 + 3 * SECOND,
        &first_lease.lease_id,
        first_lease.fencing_token,
        used(0, 0),
    )
    .unwrap();
    let notices = e.drain();
    assert_eq!(notices.waiter_renewals.len(), 1, "{notices:?}");
    let (id, renewed) = &notices.waiter_renewals[0];
    assert_eq!((*id, renewed.requests_granted), (renewal, 3));
    assert!(notices.events.iter().any(|event| matches!(
        &event.kind,
        EventKind::Renewed(lease) if lease.lease.requests_granted == 3
    )));
    assert_eq!(e.cancel_waiter(T0 + 3 * SECOND, renewal), None);
}

#[test]
fn a_renewal_in_line_needs_no_free_key() {
    // Both keys leased: an acquire waits for a key. p1's minute is spent by a request sent
    // and released at T0 and the holder's two.
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p2")])).unwrap();
    let early = granted(e.acquire(T0, ask_long("early", 1, "k2")));
    e.release(T0, &early.lease_id, early.fencing_token, used(1, 0))
        .unwrap();
    let holder = granted(e.acquire(T0, ask_long("holder", 2, "k2")));
    assert_eq!(holder.key_id, "k1");
    granted(e.acquire(T0, ask_long("x", 1, "k1")));
    let waiting = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("w")
        },
    ));
    let (_, renewal) = renew_waiting(&mut e, T0, &holder, 1);
    assert!(e.drain().waiter_renewals.is_empty());
    // The early request leaves p1's window: the renewal has its room, though no key is free
    // for the acquire ahead of it, which waits on.
    e.tick(T0 + MINUTE + SECOND);
    let notices = e.drain();
    assert_eq!(notices.waiter_renewals.len(), 1, "{notices:?}");
    assert_eq!(notices.waiter_renewals[0].0, renewal);
    assert!(notices.waiter_grants.is_empty() && notices.waiter_failures.is_empty());
    assert!(e.cancel_waiter(T0 + MINUTE + SECOND, waiting).is_some());
}

#[test]
fn a_renewal_in_line_leaves_when_its_lease_ends_or_its_caller_does() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let holder = granted(e.acquire(T0, ask_n("holder", 2)));
    granted(e.acquire(T0, ask_long("other", 1, &holder.key_id)));
    let (_, cancelled) = renew_waiting(&mut e, T0, &holder, 1);
    let (_, ended) = renew_waiting(&mut e, T0, &holder, 1);
    // Its caller gone: told why there is nothing.
    let why = e.cancel_waiter(T0 + SECOND, cancelled).unwrap();
    assert_eq!(why.reason, UnavailableReason::QuotaSpent);
    // Its lease expired: nothing more can come to it.
    e.tick(holder.expires_ms);
    let failures = e.drain().waiter_failures;
    assert_eq!(
        failures,
        vec![(
            ended,
            Unavailable {
                reason: UnavailableReason::QuotaSpent,
                retry_at_ms: None
            }
        )]
    );
    assert!(
        e.status(holder.expires_ms, None, None, 10)
            .unwrap()
            .waiting
            .is_empty()
    );
}

#[test]
fn a_renewal_in_line_fails_when_its_key_begins_to_drain() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let holder = granted(e.acquire(T0, ask_long("holder", 2, "k2")));
    granted(e.acquire(T0, ask("other")));
    let (_, renewal) = renew_waiting(&mut e, T0, &holder, 1);
    let setup = Setup::new(config(3, 100), key_specs(&[("k2", "p1")]), 0);
    e.configure(T0 + SECOND, setup).unwrap();
    let failures = e.drain().waiter_failures;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, renewal);
    assert_eq!(failures[0].1.reason, UnavailableReason::KeyDraining);
}

#[test]
fn a_renewal_that_may_not_wait_says_why_and_queues_nothing() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let holder = granted(e.acquire(T0, ask_n("holder", 2)));
    granted(e.acquire(T0, ask("other")));
    let renewed = e.renew(
        T0,
        renewal(&holder.lease_id, holder.fencing_token, None, 1, 0),
        false,
    );
    let Ok(Renewed::QuotaUnavailable(_, why)) = renewed else {
        panic!("{renewed:?}")
    };
    assert_eq!(why.reason, UnavailableReason::QuotaSpent);
    assert!(e.status(T0, None, None, 10).unwrap().waiting.is_empty());
}

// ---- even spread -------------------------------------------------------------------------------

#[test]
fn the_least_recently_used_key_is_lent_first() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2"), ("k3", "p3")]);
    let mut order = Vec::new();
    for (i, task) in ["a", "b", "c", "d"].iter().enumerate() {
        let now = T0 + i as u64 * SECOND;
        let lease = granted(e.acquire(now, ask(task)));
        e.release(now, &lease.lease_id, lease.fencing_token, used(0, 0))
            .unwrap();
        order.push(lease.key_id);
    }
    assert_eq!(order[3], order[0]);
    let mut first_three = order[..3].to_vec();
    first_three.sort();
    assert_eq!(first_three, ["k1", "k2", "k3"]);
}

#[test]
fn the_key_with_the_most_quota_headroom_is_preferred() {
    let mut e = engine(&[("k1", "busy"), ("k2", "busy"), ("k3", "idle")]);
    let lease = granted(e.acquire(T0, ask_n("a", 5)));
    e.release(T0, &lease.lease_id, lease.fencing_token, used(5, 0))
        .unwrap();
    let busy_project = lease.project.clone();
    let next = granted(e.acquire(T0 + SECOND, ask("b")));
    if busy_project == "busy" {
        assert_eq!(next.project, "idle");
    } else {
        assert_eq!(next.project, "busy");
    }
}

// ---- bad input and time ------------------------------------------------------------------------

#[test]
fn bad_acquires_name_the_field_at_fault() {
    let mut e = engine(&[("k1", "p1")]);
    let cases = [
        (ask(""), "task_id"),
        (ask(&"x".repeat(257)), "task_id"),
        (
            AcquireRequest {
                pool: "nope".into(),
                ..ask("a")
            },
            "pool",
        ),
        (
            AcquireRequest {
                model: "gemini-9".into(),
                ..ask("a")
            },
            "model",
        ),
        (
            AcquireRequest {
                model: String::new(),
                ..ask("a")
            },
            "model",
        ),
        (
            AcquireRequest {
                ttl_ms: Some(0),
                ..ask("a")
            },
            "ttl",
        ),
        (
            AcquireRequest {
                ttl_ms: Some(11 * MINUTE),
                ..ask("a")
            },
            "ttl",
        ),
        (ask_n("a", 51), "requests"),
        (
            AcquireRequest {
                client_request_id: Some("r".repeat(300)),
                ..ask("a")
            },
            "client_request_id",
        ),
    ];
    for (request, field) in cases {
        assert_eq!(invalid_field(e.acquire(T0, request)), field);
    }
    granted(e.acquire(T0, ask("still-serving")));
}

#[test]
fn the_engine_clock_never_runs_backwards() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    // A steady reading that went back does not revive the expired lease or shorten anything.
    e.tick(lease.expires_ms);
    assert_eq!(e.tick(T0).steady_ms, lease.expires_ms);
    granted(e.acquire(T0, ask("b")));
}

// ---- numbers from clients ----------------------------------------------------------------

#[test]
fn requests_sent_above_the_grant_book_only_the_grant() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask_n("a", 2)));
    let booked = e
        .release(T0, &lease.lease_id, lease.fencing_token, used(u32::MAX, 0))
        .unwrap();
    assert_eq!(booked.map(|b| b.requests), Some(2));
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(status.groups[0].requests_per_day.used, 2);
    // The project is not locked for the day: the window frees a minute later.
    granted(e.acquire(T0 + MINUTE + SECOND, ask_n("b", 8)));
}

#[test]
fn a_report_books_at_most_the_granted_requests() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask_n("a", 3)));
    let reported = e
        .report_failure(
            T0,
            &lease.lease_id,
            lease.fencing_token,
            FailureReport {
                requests_sent: Some(u32::MAX),
                ..report(FailureKind::ServerError)
            },
        )
        .unwrap();
    assert_eq!(reported.booked.map(|b| b.requests), Some(3));
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(status.groups[0].requests_per_day.used, 3);
}

#[test]
fn unset_usage_books_every_granted_request_and_keeps_the_estimate() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(
        T0,
        AcquireRequest {
            estimated_tokens: 700,
            ..ask_n("a", 2)
        },
    ));
    let booked = e
        .release(T0, &lease.lease_id, lease.fencing_token, Usage::default())
        .unwrap();
    assert_eq!(
        booked,
        Some(Amount {
            requests: 2,
            tokens: 700
        })
    );
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(status.groups[0].requests_per_minute.used, 2);
    assert_eq!(status.groups[0].tokens_per_minute.used, 700);
}

#[test]
fn token_figures_above_the_ceiling_are_refused() {
    let mut unlimited = config(10, 100);
    let pool = unlimited.pools.get_mut(DEFAULT_POOL).unwrap();
    pool.models.get_mut(MODEL).unwrap().tokens_per_minute = None;
    let mut e = new_engine(unlimited, key_specs(&[("k1", "p1")])).unwrap();
    let too_many = AcquireRequest {
        estimated_tokens: MAX_INPUT_TOKENS + 1,
        ..ask("a")
    };
    assert_eq!(
        invalid_field(e.acquire(T0, too_many)),
        "estimated_input_tokens"
    );
    let lease = granted(e.acquire(
        T0,
        AcquireRequest {
            estimated_tokens: MAX_INPUT_TOKENS,
            ..ask("a")
        },
    ));
    // A renewal may not take the lease's tokens past the ceiling, nor wrap them round.
    for more in [1, u64::MAX] {
        let renewed = e.renew(
            T0,
            renewal(&lease.lease_id, lease.fencing_token, None, 0, more),
            false,
        );
        assert!(
            matches!(
                renewed,
                Err(EngineError::InvalidArgument {
                    field: "additional_input_tokens",
                    ..
                })
            ),
            "{renewed:?}"
        );
    }
}

#[test]
fn a_release_of_absurd_token_counts_blocks_the_window_and_never_admits() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let booked = e
        .release(T0, &lease.lease_id, lease.fencing_token, used(1, u64::MAX))
        .unwrap();
    assert_eq!(booked.map(|b| b.tokens), Some(MAX_INPUT_TOKENS));
    for tokens in [0, 1] {
        let ask = AcquireRequest {
            estimated_tokens: tokens,
            ..ask("b")
        };
        assert_eq!(
            unavailable(e.acquire(T0, ask)).reason,
            UnavailableReason::QuotaSpent
        );
    }
    // A window (and the margin) later the tokens have left the books.
    granted(e.acquire(T0 + MINUTE + SECOND, ask("b")));
}

// ---- two clocks ------------------------------------------------------------------------------

#[test]
fn a_stepped_wall_clock_moves_the_daily_reset_and_no_lease_or_window() {
    let mut e = new_engine(config(10, 3), key_specs(&[("k1", "p1")])).unwrap();
    let spent = granted(e.acquire(T0, ask_n("a", 2)));
    e.release(T0, &spent.lease_id, spent.fencing_token, used(2, 0))
        .unwrap();
    let lease = granted(e.acquire(T0 + SECOND, ask("b")));
    unavailable(e.acquire(T0 + SECOND, ask("c")));
    // NTP steps the wall clock into tomorrow while one steady second passes: the day has
    // turned (only the live lease counts against it), but the lease lives on and the window
    // still holds every request.
    let midnight = T0 + 11 * 60 * MINUTE;
    let stepped = Time::new(midnight + 60 * MINUTE, T0 + 2 * SECOND);
    let status = e.status(stepped, None, None, 10).unwrap();
    assert_eq!(status.keys[0].leases[0].lease_id, lease.lease_id);
    assert_eq!(status.groups[0].requests_per_day.used, 1);
    assert_eq!(status.groups[0].requests_per_minute.used, 3);
    assert_eq!(status.now.wall_ms, midnight + 60 * MINUTE);
    assert_eq!(e.next_wakeup_ms(), Some(lease.expires_ms));
}

#[test]
fn a_waiter_on_a_daily_rest_is_served_when_the_wall_clock_is_stepped_past_midnight() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    e.report_failure(
        T0,
        &lease.lease_id,
        lease.fencing_token,
        report(FailureKind::DailyQuotaExhausted),
    )
    .unwrap();
    let waiter = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("b")
        },
    ));
    e.drain();
    // One steady second later the wall clock reads just past midnight: nothing but the step
    // tells the engine that the day has turned.
    let midnight = T0 + 11 * 60 * MINUTE;
    e.tick(Time::new(midnight + SECOND, T0 + SECOND));
    let grants = e.drain().waiter_grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].0, waiter);
}

#[test]
fn a_daily_rest_ends_when_a_stepped_wall_clock_reaches_midnight() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    e.report_failure(
        T0,
        &lease.lease_id,
        lease.fencing_token,
        report(FailureKind::DailyQuotaExhausted),
    )
    .unwrap();
    let midnight = T0 + 11 * 60 * MINUTE;
    // The wall clock was 30 minutes slow and is stepped right: the rest ends 30 minutes sooner
    // in steady time, which is midnight on the corrected clock.
    let corrected = Time::new(T0 + 31 * MINUTE, T0 + MINUTE);
    let why = unavailable(e.acquire(corrected, ask("b")));
    assert_eq!(why.retry_at_ms, Some(midnight - 30 * MINUTE));
    granted(e.acquire(Time::new(midnight, midnight - 30 * MINUTE), ask("b")));
}

// ---- lines and pages -------------------------------------------------------------------------

#[test]
fn a_cancelled_waiter_that_held_a_group_back_lets_the_next_one_in() {
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    granted(e.acquire(T0, ask_n("holder", 2)));
    let big = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask_n("big", 2)
        },
    ));
    let small = queued(e.acquire(
        T0,
        AcquireRequest {
            wait: true,
            ..ask("small")
        },
    ));
    assert!(e.drain().waiter_grants.is_empty());
    assert!(e.cancel_waiter(T0, big).is_some());
    let grants = e.drain().waiter_grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].0, small);
    assert!(!e.has_waiters());
}

#[test]
fn a_long_line_on_spent_quota_is_looked_at_only_as_far_as_hope_goes() {
    // Cancelling any waiter of a long line costs a look at the first few, not at the line:
    // here, with every group held back by the first waiter, nobody behind it is looked at.
    let mut e = new_engine(config(1, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let lease = granted(e.acquire(T0, ask("holder")));
    let mut waiters: Vec<WaiterId> = (0..2_000)
        .map(|i| {
            queued(e.acquire(
                T0,
                AcquireRequest {
                    wait: true,
                    ..ask(&format!("w{i}"))
                },
            ))
        })
        .collect();
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
        .unwrap();
    while let Some(id) = waiters.pop() {
        assert!(e.cancel_waiter(T0, id).is_some());
        if waiters.len() == 1_000 {
            let status = e.status(T0, None, None, 10).unwrap();
            assert_eq!(status.waiting[0].2, 1_000);
        }
    }
    assert!(!e.has_waiters());
    assert!(e.drain().waiter_grants.is_empty());
    assert!(
        e.waiters_looked_at <= 2 * 2_000,
        "{} looks at waiters for 2,000 cancels",
        e.waiters_looked_at
    );
}

#[test]
fn status_pages_continue_after_the_last_key_and_refuse_foreign_cursors() {
    let e = engine(&[("k1", "p1"), ("k2", "p1"), ("k3", "p2")]);
    let first = e.status(T0, None, None, 2).unwrap();
    let ids: Vec<&str> = first.keys.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(ids, ["k1", "k2"]);
    assert_eq!(first.next_after.as_deref(), Some("k2"));
    let second = e.status(T0, None, Some("k2"), 2).unwrap();
    assert_eq!(second.keys[0].key_id, "k3");
    assert_eq!(second.next_after, None);
    for cursor in ["k9", ""] {
        let refused = e.status(T0, None, Some(cursor), 2);
        assert!(
            matches!(
                refused,
                Err(EngineError::InvalidArgument {
                    field: "page_token",
                    ..
                })
            ),
            "{refused:?}"
        );
    }
}

#[test]
fn setup_refuses_duplicate_key_ids() {
    let specs = key_specs(&[("k1", "p1"), ("k1", "p2")]);
    assert_eq!(
        new_engine(config(1, 1), specs).err(),
        Some(SetupError::DuplicateKeyId("k1".into()))
    );
}

/// Events of `notices`, by kind and key, for the tests of keys coming and going.
fn key_events(notices: &Notices) -> Vec<String> {
    notices
        .events
        .iter()
        .filter_map(|event| match &event.kind {
            EventKind::KeyAdded { key_id } => Some(format!("added {key_id}")),
            EventKind::KeyDraining { key_id, leases } => {
                Some(format!("draining {key_id} ({leases})"))
            }
            EventKind::KeyRemoved { key_id } => Some(format!("removed {key_id}")),
            _ => None,
        })
        .collect()
}

#[test]
fn a_key_removed_while_leased_drains_then_is_gone() {
    let mut engine = engine(&[("k1", "p1"), ("k2", "p2")]);
    let lease = granted(engine.acquire(T0, ask_n("a", 2)));
    assert_eq!(lease.key_id, "k1");
    let only_k2 = Setup::new(config(10, 100), key_specs(&[("k2", "p2")]), 0);
    let (reply, notices) = engine.apply(Time::at(T0 + SECOND), Command::Configure(only_k2));
    let report = reply.into_configured().unwrap();
    assert_eq!(report.draining_keys, [("k1".to_string(), 1)]);
    assert_eq!(key_events(&notices), ["draining k1 (1)"]);
    assert_eq!(
        engine.key_status(T0 + SECOND, "k1").unwrap().state,
        KeyState::Draining
    );
    // Nothing new on it: k2 is taken, then nobody gets k1.
    granted(engine.acquire(T0 + SECOND, ask("b")));
    let none = unavailable(engine.acquire(T0 + SECOND, ask("c")));
    assert_eq!(none.reason, UnavailableReason::AllLeased);
    // A renewal keeps the lease's end and adds nothing.
    let renewed = engine
        .renew(
            T0 + 2 * SECOND,
            renewal(&lease.lease_id, lease.fencing_token, Some(5 * MINUTE), 1, 0),
            false,
        )
        .unwrap();
    let Renewed::QuotaUnavailable(view, why) = renewed else {
        panic!("{renewed:?}")
    };
    assert_eq!(why.reason, UnavailableReason::KeyDraining);
    assert_eq!(
        (view.expires_ms, view.requests_granted),
        (lease.expires_ms, 2)
    );
    // Its last lease ends: the key is gone from every view, and its id is free.
    let release = Command::Release {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        usage: used(1, 0),
    };
    let (reply, notices) = engine.apply(Time::at(T0 + 3 * SECOND), release);
    assert!(reply.into_released().unwrap().is_some());
    assert_eq!(key_events(&notices), ["removed k1"]);
    assert!(matches!(
        engine.key_status(T0 + 3 * SECOND, "k1"),
        Err(EngineError::KeyNotFound(_))
    ));
    let status = engine.status(T0 + 3 * SECOND, None, None, 10).unwrap();
    assert_eq!(status.total_keys, 1);
    // Configured again, it is a key like any other.
    let both = Setup::new(config(10, 100), key_specs(&[("k1", "p1"), ("k2", "p2")]), 0);
    let (reply, notices) = engine.apply(Time::at(T0 + 4 * SECOND), Command::Configure(both));
    assert_eq!(reply.into_configured().unwrap().added_keys, ["k1"]);
    assert_eq!(key_events(&notices), ["added k1"]);
    assert_eq!(
        granted(engine.acquire(T0 + 4 * SECOND, ask("c"))).key_id,
        "k1"
    );
}

#[test]
fn a_key_removed_while_idle_is_gone_at_once_and_a_draining_key_configured_again_serves() {
    let mut engine = engine(&[("k1", "p1"), ("k2", "p2")]);
    let lease = granted(engine.acquire(T0, ask("a")));
    let none = Setup::new(config(10, 100), key_specs(&[]), 0);
    let (reply, notices) = engine.apply(Time::at(T0), Command::Configure(none));
    let report = reply.into_configured().unwrap();
    assert_eq!(report.removed_keys, ["k2"]);
    assert_eq!(key_events(&notices), ["draining k1 (1)", "removed k2"]);
    let back = Setup::new(config(10, 100), key_specs(&[("k1", "p1")]), 0);
    let (_, notices) = engine.apply(Time::at(T0 + SECOND), Command::Configure(back));
    assert_eq!(key_events(&notices), Vec::<String>::new());
    assert_eq!(
        engine.key_status(T0 + SECOND, "k1").unwrap().state,
        KeyState::Leased
    );
    let renewed = engine
        .renew(
            T0 + 2 * SECOND,
            renewal(&lease.lease_id, lease.fencing_token, None, 0, 0),
            false,
        )
        .unwrap();
    let Renewed::Done(view) = renewed else {
        panic!("{renewed:?}")
    };
    assert!(
        view.expires_ms > lease.expires_ms,
        "a configured key's lease renews"
    );
}

/// `keys` with k1's secret replaced (a new fingerprint under the same id).
fn with_k1_rotated(keys: &[(&str, &str)]) -> Vec<KeySpec> {
    let mut specs = key_specs(keys);
    specs[0].secret = ApiKey::new("AIzaFAKE.k1-rotated-00000000000000000000".to_string());
    specs[0].fingerprint = "fp-k1-rotated".into();
    specs
}

#[test]
fn a_secret_replaced_under_its_id_drains_beside_its_successor() {
    let mut e = engine(&[("k1", "p1")]);
    let old = granted(e.acquire(T0, ask_n("a", 2)));
    let rotated = Setup::new(config(10, 100), with_k1_rotated(&[("k1", "p1")]), 0);
    let (reply, notices) = e.apply(Time::at(T0 + SECOND), Command::Configure(rotated));
    let report = reply.into_configured().unwrap();
    assert_eq!(report.draining_keys, [("k1~fp-k1".to_string(), 1)]);
    assert!(report.renamed_keys.is_empty(), "{report:?}");
    assert_eq!(report.dropped_leases, 0);
    assert_eq!(key_events(&notices), ["added k1", "draining k1~fp-k1 (1)"]);
    // The new secret is lent at once; the old one serves its lease to its end.
    let new = granted(e.acquire(T0 + SECOND, ask("b")));
    assert_eq!(new.key_id, "k1");
    assert_ne!(new.api_key, old.api_key);
    let status = e.status(T0 + SECOND, None, None, 10).unwrap();
    let states: Vec<(String, KeyState)> = status
        .keys
        .iter()
        .map(|k| (k.key_id.clone(), k.state))
        .collect();
    assert_eq!(
        states,
        [
            ("k1".to_string(), KeyState::Leased),
            ("k1~fp-k1".to_string(), KeyState::Draining)
        ]
    );
    // The project's books are one: both leases count on them.
    let group = &status.groups[0];
    assert_eq!(group.requests_per_minute.used, 3);
    // The old lease still reports and releases; then its secret is gone.
    let release = Command::Release {
        lease_id: old.lease_id.clone(),
        fencing_token: old.fencing_token,
        usage: used(2, 0),
    };
    let (reply, notices) = e.apply(Time::at(T0 + 2 * SECOND), release);
    assert!(reply.into_released().unwrap().is_some());
    assert_eq!(key_events(&notices), ["removed k1~fp-k1"]);
    let status = e.status(T0 + 2 * SECOND, None, None, 10).unwrap();
    assert_eq!(status.total_keys, 1);
}

#[test]
fn a_secret_replaced_while_both_live_survives_a_snapshot() {
    let mut e = engine(&[("k1", "p1")]);
    granted(e.acquire(T0, ask("a")));
    let rotated = Setup::new(config(10, 100), with_k1_rotated(&[("k1", "p1")]), 0);
    e.apply(Time::at(T0 + SECOND), Command::Configure(rotated));
    let snapshot = crate::layout::Snapshot::of(&e, 1);
    let read = crate::layout::Snapshot::decode(&snapshot.encode()).unwrap();
    let (restored, report) = Engine::restore(read.setup, read.draining, read.image).unwrap();
    assert_eq!(restored.image(), e.image());
    assert_eq!(report.dropped_leases, 0);
}

#[test]
fn under_rules_7_a_secret_replaced_under_its_id_drops_its_leases() {
    let setup = |keys| Setup {
        rules: 7,
        ..Setup::new(config(10, 100), keys, 0)
    };
    let mut e = Engine::new(setup(key_specs(&[("k1", "p1")])), Time::at(T0)).unwrap();
    granted(e.acquire(T0, ask("a")));
    let (reply, _) = e.apply(
        Time::at(T0 + SECOND),
        Command::Configure(setup(with_k1_rotated(&[("k1", "p1")]))),
    );
    let report = reply.into_configured().unwrap();
    assert_eq!(report.dropped_leases, 1, "as rules 7 decided");
    assert!(report.draining_keys.is_empty());
}

#[test]
fn an_operator_ends_a_cooldown_and_its_backoff() {
    let mut engine = engine(&[("k1", "p1")]);
    let lease = granted(engine.acquire(T0, ask("a")));
    engine
        .report_failure(
            T0,
            &lease.lease_id,
            lease.fencing_token,
            report(FailureKind::RateLimited),
        )
        .unwrap();
    assert_eq!(
        unavailable(engine.acquire(T0, ask("b"))).reason,
        UnavailableReason::CoolingDown
    );
    let reset = Command::ResetCooldown {
        pool: DEFAULT_POOL.into(),
        project: "p1".into(),
        model: format!("models/{MODEL}"),
        forget_learned: false,
    };
    let (reply, notices) = engine.apply(Time::at(T0 + SECOND), reset);
    let group = reply.into_cooldown_reset().unwrap();
    assert!(group.cooldown.is_none());
    assert!(notices.events.iter().any(|event| matches!(
        &event.kind,
        EventKind::CooldownReset { project, .. } if project == "p1"
    )));
    granted(engine.acquire(T0 + SECOND, ask("b")));
    for (pool, project, model, field) in [
        ("other", "p1", MODEL, "pool"),
        (DEFAULT_POOL, "p9", MODEL, "project"),
        (DEFAULT_POOL, "p1", "gemini-0", "model"),
    ] {
        let reset = Command::ResetCooldown {
            pool: pool.into(),
            project: project.into(),
            model: model.into(),
            forget_learned: false,
        };
        let refused = engine
            .apply(Time::at(T0 + SECOND), reset)
            .0
            .into_cooldown_reset();
        assert!(
            matches!(&refused, Err(EngineError::InvalidArgument { field: f, .. }) if *f == field),
            "{refused:?}"
        );
    }
}

// ---- limits learned from the provider's 429s --------------------------------------------------

/// Reports a 429 of `kind` with `violations` on a lease of `task`, through `apply`; the events.
fn refused(
    e: &mut Engine,
    now: u64,
    task: &str,
    kind: FailureKind,
    violations: Vec<QuotaViolation>,
) -> Vec<EventKind> {
    let report = FailureReport {
        violations,
        ..report(kind)
    };
    refused_with(e, now, task, report)
}

/// A lease granted to `task` at `now`, and at once `report`ed failed: the events.
fn refused_with(e: &mut Engine, now: u64, task: &str, report: FailureReport) -> Vec<EventKind> {
    let lease = granted(e.acquire(now, ask(task)));
    let command = Command::ReportFailure {
        lease_id: lease.lease_id,
        fencing_token: lease.fencing_token,
        report,
    };
    let (reply, notices) = e.apply(Time::at(now), command);
    reply.into_reported().unwrap();
    notices.events.into_iter().map(|event| event.kind).collect()
}

fn learned_changes(events: &[EventKind]) -> Vec<(LimitKind, Option<u64>, Option<u64>)> {
    events
        .iter()
        .filter_map(|kind| match kind {
            EventKind::LimitLearned { change, .. } => {
                Some((change.kind, change.before, change.after))
            }
            _ => None,
        })
        .collect()
}

/// Grants and releases (one request each) as long as `project`'s group admits them at `now`.
fn admitted(e: &mut Engine, now: u64, project: &str) -> u64 {
    let mut count = 0;
    loop {
        match e.acquire(now, ask(&format!("fill-{now}-{count}"))) {
            Ok(Acquired::Granted(lease)) if lease.project == project => {
                e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0))
                    .unwrap();
                count += 1;
            }
            _ => return count,
        }
    }
}

#[test]
fn a_named_figure_is_admitted_at_once_and_announced() {
    let mut e = new_engine(config(10, 100), key_specs(&[("k1", "p1")])).unwrap();
    for i in 0..4 {
        let lease = granted(e.acquire(T0, ask(&format!("early-{i}"))));
        e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
            .unwrap();
    }
    // Four went through and the fifth is refused, naming a figure of 4: it explains the 429.
    let named = violation(LimitKind::RequestsPerMinute, Some(4));
    let events = refused(&mut e, T0, "a", FailureKind::RateLimited, vec![named]);
    assert_eq!(
        learned_changes(&events),
        [(LimitKind::RequestsPerMinute, Some(10), Some(4))]
    );
    assert_eq!(admitted(&mut e, T0 + 2 * MINUTE, "p1"), 4);
    let status = e.status(T0 + 2 * MINUTE, None, None, 10).unwrap();
    let group = &status.groups[0];
    assert_eq!(group.requests_per_minute.limit, Some(4));
    let rpm = group.limits[LimitKind::RequestsPerMinute as usize];
    assert_eq!(
        (rpm.configured, rpm.learned.unwrap().named),
        (Some(10), Some(4))
    );
    let last = group.last_429.as_ref().unwrap();
    assert_eq!((last.task_id.as_str(), last.at_wall_ms), ("a", T0));
    assert!(last.quota_id.starts_with("RequestsPerMinute"));
}

#[test]
fn a_figure_the_books_were_below_means_others_spend_the_project_under_rules_3() {
    let mut config = config(40, 10_000);
    config.relearn_after_windows = 1;
    config.cooldown_base_ms = SECOND;
    let mut keys = key_specs(&[("k1", "p1")]);
    keys[0].max_leases = Some(2);
    let mut e = engine_of_rules_3(config, keys);
    for i in 0..8 {
        let lease = granted(e.acquire(T0, ask(&format!("early-{i}"))));
        e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
            .unwrap();
    }
    let in_flight = granted(e.acquire(T0, ask("b")));
    // The provider's figure is 20, yet it refused the tenth: lowered to 3/4 of the other 9.
    let named = || vec![violation(LimitKind::RequestsPerMinute, Some(20))];
    let events = refused(&mut e, T0, "a", FailureKind::RateLimited, named());
    assert_eq!(
        learned_changes(&events),
        [
            (LimitKind::RequestsPerMinute, Some(40), Some(20)),
            (LimitKind::RequestsPerMinute, Some(20), Some(7))
        ]
    );
    // Named again within the window, the figure does not undo the lowering.
    let command = Command::ReportFailure {
        lease_id: in_flight.lease_id,
        fencing_token: in_flight.fencing_token,
        report: FailureReport {
            violations: named(),
            ..report(FailureKind::RateLimited)
        },
    };
    let (_, notices) = e.apply(Time::at(T0 + 2 * SECOND), command);
    let events: Vec<EventKind> = notices.events.into_iter().map(|e| e.kind).collect();
    assert!(learned_changes(&events).is_empty(), "{events:?}");
    // Once the others stop, pressure climbs it back to the figure, and no further.
    let mut now = T0 + 2 * MINUTE;
    let mut per_window = Vec::new();
    for _ in 0..5 {
        per_window.push(admitted(&mut e, now, "p1"));
        now += MINUTE + SECOND;
    }
    assert_eq!(per_window, [7, 11, 17, 20, 20]);
}

#[test]
fn a_figure_for_another_model_teaches_only_what_no_figure_would_under_rules_3() {
    let mut e = engine_of_rules_3(config(10, 100), key_specs(&[("k1", "p1")]));
    let other = QuotaViolation {
        model: "gemini-2.5-pro".into(),
        ..violation(LimitKind::RequestsPerMinute, Some(2))
    };
    let events = refused(&mut e, T0, "a", FailureKind::RateLimited, vec![other]);
    // Nothing else on the books: lowered to max(1, 0), not to the other model's 2.
    assert_eq!(
        learned_changes(&events),
        [(LimitKind::RequestsPerMinute, Some(10), Some(1))]
    );
    let status = e.status(T0, None, None, 10).unwrap();
    assert_eq!(
        status.groups[0].limits[0].learned.unwrap().named,
        None,
        "no figure was taken"
    );
}

#[test]
fn a_figure_of_zero_rests_the_group_until_the_daily_reset() {
    let mut e = new_engine(config(10, 100), key_specs(&[("k1", "p1")])).unwrap();
    let none = violation(LimitKind::RequestsPerMinute, Some(0));
    let events = refused(&mut e, T0, "a", FailureKind::RateLimited, vec![none]);
    assert!(learned_changes(&events).is_empty());
    let why = unavailable(e.acquire(T0 + 10 * MINUTE, ask("b")));
    assert_eq!(why.reason, UnavailableReason::CoolingDown);
    let midnight = DailyReset {
        zone: chrono_tz::America::Los_Angeles,
    }
    .next_reset_after(T0);
    assert_eq!(why.retry_at_ms, Some(midnight));
}

#[test]
fn a_per_day_429_rests_until_the_reset_whatever_its_retry_delay() {
    let mut e = new_engine(config(10, 100), key_specs(&[("k1", "p1")])).unwrap();
    let report = FailureReport {
        retry_after_ms: Some(3 * SECOND),
        violations: vec![violation(LimitKind::RequestsPerDay, Some(40))],
        // Even reported as per minute: the violation says per day.
        ..report(FailureKind::RateLimited)
    };
    let events = refused_with(&mut e, T0, "a", report);
    assert_eq!(
        learned_changes(&events),
        [(LimitKind::RequestsPerDay, Some(100), Some(40))]
    );
    let why = unavailable(e.acquire(T0 + MINUTE, ask("b")));
    assert_eq!(why.reason, UnavailableReason::CoolingDown);
    assert!(why.retry_at_ms.unwrap() > T0 + 3 * 3_600_000);
}

#[test]
fn an_unnamed_429_on_a_group_with_room_lowers_it_and_pressure_climbs_it_back_under_rules_3() {
    let mut config = config(20, 10_000);
    config.relearn_after_windows = 2;
    let mut e = engine_of_rules_3(config, key_specs(&[("k1", "p1")]));
    // Nine requests went through in this window; the tenth is refused without a figure.
    for i in 0..9 {
        let lease = granted(e.acquire(T0, ask(&format!("early-{i}"))));
        e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
            .unwrap();
    }
    let events = refused(&mut e, T0, "a", FailureKind::RateLimited, Vec::new());
    assert_eq!(
        learned_changes(&events),
        [(LimitKind::RequestsPerMinute, Some(20), Some(7))]
    );
    // Each window from the cooldown's end, the fleet takes all it may: 7, 7, then ×1.5.
    let mut now = T0 + 2 * MINUTE;
    let mut per_window = Vec::new();
    for _ in 0..5 {
        per_window.push(admitted(&mut e, now, "p1"));
        now += MINUTE + SECOND;
    }
    assert_eq!(per_window, [7, 7, 11, 17, 20]);
    let status = e.status(now, None, None, 10).unwrap();
    assert_eq!(
        status.groups[0].limits[0].learned, None,
        "back to configured"
    );
}

#[test]
fn an_operator_makes_a_group_forget_what_it_learned() {
    let mut e = new_engine(config(10, 100), key_specs(&[("k1", "p1")])).unwrap();
    let named = violation(LimitKind::TokensPerMinute, Some(500));
    refused(&mut e, T0, "a", FailureKind::RateLimited, vec![named]);
    let reset = Command::ResetCooldown {
        pool: DEFAULT_POOL.into(),
        project: "p1".into(),
        model: MODEL.into(),
        forget_learned: true,
    };
    let (reply, notices) = e.apply(Time::at(T0 + SECOND), reset);
    let group = reply.into_cooldown_reset().unwrap();
    assert_eq!(group.tokens_per_minute.limit, Some(100_000));
    assert_eq!(
        group.limits[LimitKind::TokensPerMinute as usize].learned,
        None
    );
    let events: Vec<EventKind> = notices.events.into_iter().map(|e| e.kind).collect();
    assert_eq!(
        learned_changes(&events),
        [(LimitKind::TokensPerMinute, Some(500), Some(100_000))]
    );
}

#[test]
fn learned_limits_survive_a_snapshot_and_a_new_configuration() {
    let mut e = new_engine(config(10, 100), key_specs(&[("k1", "p1")])).unwrap();
    let named = violation(LimitKind::RequestsPerDay, Some(40));
    refused(
        &mut e,
        T0,
        "a",
        FailureKind::DailyQuotaExhausted,
        vec![named],
    );
    let restored = Engine::restore(e.setup(), Vec::new(), e.image()).unwrap().0;
    assert_eq!(restored.image(), e.image());
    // Configured higher, the provider's figure still holds; configured lower, the lower.
    for (configured, admitted) in [(300, 40), (20, 20)] {
        let setup = Setup::new(config(10, configured), key_specs(&[("k1", "p1")]), 0);
        let e = Engine::restore(setup, Vec::new(), e.image()).unwrap().0;
        let status = e.status(T0, None, None, 10).unwrap();
        assert_eq!(status.groups[0].requests_per_day.limit, Some(admitted));
    }
}

/// An engine whose pool lists no model and whose keys are in projects of their own.
fn engine_of_unlisted_models(keys: &[(&str, &str)]) -> Engine {
    engine_of_unlisted_models_under(RULES_VERSION, keys)
}

/// [`engine_of_unlisted_models`], deciding by `rules`.
fn engine_of_unlisted_models_under(rules: u32, keys: &[(&str, &str)]) -> Engine {
    let mut config = config(1_000, 100_000);
    let pool = config.pools.get_mut(DEFAULT_POOL).unwrap();
    pool.models.clear();
    pool.other_models = Some(limits(1_000, 100_000));
    let setup = Setup {
        rules,
        ..Setup::new(config, key_specs(keys), 0)
    };
    Engine::new(setup, Time::at(T0)).unwrap()
}

/// Records an older build decided replay here: under its rules, a pool at its bound refused
/// a new model as it did then, and forgets one only once a setup of today's rules applies.
#[test]
fn under_the_previous_rules_a_full_pool_refuses_a_new_model_as_it_did() {
    let mut e =
        engine_of_unlisted_models_under(RULES_FORGETTING_UNLISTED_MODELS - 1, &[("k1", "p1")]);
    for i in 0..catalogue::MAX_OTHER_MODELS {
        let name = format!("model-{i}");
        let lease = granted(e.acquire(T0, of_model(&name, &name)));
        e.release(T0, &lease.lease_id, lease.fencing_token, Usage::UNUSED)
            .unwrap();
    }
    assert!(e.acquire(T0, of_model("late", "one-too-many")).is_err());
    assert_eq!(e.setup().rules, RULES_FORGETTING_UNLISTED_MODELS - 1);
    // The new build's own setup applied: it forgets.
    let today = Setup {
        rules: RULES_VERSION,
        ..e.setup()
    };
    let (reply, _) = e.apply(Time::at(T0), Command::Configure(today));
    reply.into_configured().unwrap();
    granted(e.acquire(T0, of_model("late", "one-too-many")));
}

/// The learning rules follow the setup's: records rules 4 decided replay as rules 4 decided
/// them, and today's setup brings today's rules to the same books.
#[test]
fn evidence_stands_for_the_next_step_from_the_setup_of_rules_5_on() {
    let mut e = engine_of_unlisted_models_under(RULES_EVIDENCE_STANDING - 1, &[("k1", "p1")]);
    assert!(!e.books.tuning().evidence_stands);
    let today = Setup {
        rules: RULES_VERSION,
        ..e.setup()
    };
    let (reply, _) = e.apply(Time::at(T0), Command::Configure(today));
    reply.into_configured().unwrap();
    assert!(e.books.tuning().evidence_stands);
}

fn of_model(task: &str, model: &str) -> AcquireRequest {
    AcquireRequest {
        model: model.to_string(),
        ..ask(task)
    }
}

/// The unlisted models `e`'s pool serves now.
fn unlisted_served(e: &Engine) -> Vec<String> {
    let pool = e.catalogue.pool_by_name(DEFAULT_POOL).unwrap();
    let mut names: Vec<String> = e
        .catalogue
        .pool(pool)
        .unlisted()
        .map(|m| e.catalogue.models.name(m).to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_pool_without_listed_models_serves_any_model_up_to_a_bound() {
    let mut e = engine_of_unlisted_models(&[("k1", "p1")]);
    for i in 0..catalogue::MAX_OTHER_MODELS {
        let name = format!("model-{i}");
        let lease = granted(e.acquire(T0, of_model(&name, &name)));
        e.release(T0, &lease.lease_id, lease.fencing_token, Usage::UNUSED)
            .unwrap();
    }
    assert_eq!(unlisted_served(&e).len(), catalogue::MAX_OTHER_MODELS);
    // A model seen before is still served, and survives a restore.
    let restored = Engine::restore(e.setup(), Vec::new(), e.image()).unwrap().0;
    assert_eq!(restored.image(), e.image());
    granted(e.acquire(T0, of_model("again", "model-7")));
}

/// A client inventing model names cannot lock the pool: at the bound, the unlisted model that
/// nothing holds and whose books saw a request least recently is forgotten, one with nothing on
/// its books first; a model under a live lease, resting, or with a learned limit is kept; only
/// when every one is held is a new name refused. A restored engine forgets the same one.
#[test]
fn at_the_bound_the_least_recently_used_unlisted_model_nothing_holds_is_forgotten() {
    let mut e = engine_of_unlisted_models(&[("k1", "p1"), ("k2", "p2"), ("k3", "p3")]);
    let bound = catalogue::MAX_OTHER_MODELS;
    // Each invented model used once and released, one a second, with a request on its books.
    let mut now = T0;
    for i in 0..bound {
        let name = format!("invented-{i:04}");
        let lease = granted(e.acquire(now, of_model(&name, &name)));
        e.release(now, &lease.lease_id, lease.fencing_token, used(1, 10))
            .unwrap();
        now += 10;
    }
    // invented-0000 held by a live lease; -0001 resting after a 429; -0002 learned a limit.
    let held = granted(e.acquire(now, of_model("holder", "invented-0000")));
    let resting = granted(e.acquire(now, of_model("rests", "invented-0001")));
    let limited = FailureReport {
        retry_after_ms: Some(10 * MINUTE),
        ..report(FailureKind::RateLimited)
    };
    e.report_failure(now, &resting.lease_id, resting.fencing_token, limited)
        .unwrap();
    let teaching = granted(e.acquire(now, of_model("teaches", "invented-0002")));
    let named = FailureReport {
        violations: vec![QuotaViolation {
            model: "invented-0002".into(),
            ..violation(LimitKind::RequestsPerMinute, Some(3))
        }],
        ..report(FailureKind::RateLimited)
    };
    e.report_failure(now, &teaching.lease_id, teaching.fencing_token, named)
        .unwrap();

    // A real model is served: the oldest one nothing holds, invented-0003, is forgotten.
    let restored = Engine::restore(e.setup(), Vec::new(), e.image()).unwrap().0;
    granted(e.acquire(now, of_model("real", "gemini-9-pro")));
    let served = unlisted_served(&e);
    assert_eq!(served.len(), bound);
    assert!(served.contains(&"gemini-9-pro".to_string()));
    assert!(!served.contains(&"invented-0003".to_string()));
    for kept in ["invented-0000", "invented-0001", "invented-0002"] {
        assert!(served.contains(&kept.to_string()), "{kept} was forgotten");
    }
    // Restored from the image, the engine makes the same choice.
    let mut restored = restored;
    granted(restored.acquire(now, of_model("real", "gemini-9-pro")));
    assert_eq!(unlisted_served(&restored), served);
    assert_eq!(restored.image(), e.image());

    // A model with nothing on its books goes before any that had a request.
    let idle = granted(e.acquire(now, of_model("idle", "idle-model")));
    e.release(now, &idle.lease_id, idle.fencing_token, Usage::UNUSED)
        .unwrap();
    assert!(!unlisted_served(&e).contains(&"invented-0004".to_string()));
    granted(e.acquire(now, of_model("next", "another-model")));
    let served = unlisted_served(&e);
    assert!(served.contains(&"another-model".to_string()));
    assert!(served.contains(&"invented-0005".to_string()));
    assert!(!served.contains(&"idle-model".to_string()));
    // The held lease is still there, on its model.
    assert!(
        e.leases
            .is_live(e.leases.known_token(&held.lease_id).unwrap())
    );
}

#[test]
fn a_new_model_is_refused_only_when_every_unlisted_model_is_held() {
    let keys: Vec<(String, String)> = (0..catalogue::MAX_OTHER_MODELS)
        .map(|i| (format!("k{i}"), format!("p{i}")))
        .collect();
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
    let mut e = engine_of_unlisted_models(&keys);
    for i in 0..catalogue::MAX_OTHER_MODELS {
        let name = format!("held-{i}");
        granted(e.acquire(T0, of_model(&name, &name)));
    }
    let refused = e
        .acquire(T0, of_model("late", "one-too-many"))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("list \"one-too-many\""), "{refused}");
}

mod health;
mod learning_properties;
mod performance;
mod properties;
mod provider;
mod tenants;

#[test]
fn the_plan_shows_every_project_with_a_key_used_or_not() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2"), ("k3", "p2")]);
    let lease = granted(e.acquire(T0, ask("a")));
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 10))
        .unwrap();
    let used_project = e
        .catalogue
        .key(e.catalogue.key_by_id(&lease.key_id).unwrap())
        .project;
    let used_project = e.catalogue.projects.name(used_project).to_string();
    let plan = e.plan(T0, None, &format!("models/{MODEL}")).unwrap();
    let mut shown: Vec<(String, u64, Option<u64>)> = plan
        .iter()
        .map(|g| {
            assert_eq!(g.model, MODEL);
            (
                g.project.clone(),
                g.requests_per_day.used,
                g.requests_per_minute.limit,
            )
        })
        .collect();
    shown.sort();
    let used_of = |p: &str| u64::from(p == used_project);
    assert_eq!(
        shown,
        [
            ("p1".to_string(), used_of("p1"), Some(10)),
            ("p2".to_string(), used_of("p2"), Some(10)),
        ]
    );
    // Nothing was opened by looking.
    assert_eq!(e.status(T0, None, None, 10).unwrap().groups.len(), 1);
    // A model the pool does not serve has no plan; an unknown pool is named.
    assert!(e.plan(T0, None, "other-model").unwrap().is_empty());
    assert!(matches!(
        e.plan(T0, Some("nope"), MODEL),
        Err(EngineError::InvalidArgument { field: "pool", .. })
    ));
}

#[test]
fn the_plan_of_a_model_never_asked_for_shows_the_limits_of_any_other_model() {
    let mut config = config(10, 100);
    let other = Limits {
        requests_per_minute: Some(7),
        tokens_per_minute: None,
        requests_per_day: Some(70),
        tokens_per_day: None,
        auto: [true, false, false, false],
    };
    config.pools.get_mut(DEFAULT_POOL).unwrap().other_models = Some(other);
    let e = new_engine(config, key_specs(&[("k1", "p1")])).unwrap();
    let plan = e.plan(T0, Some(DEFAULT_POOL), "gemini-new").unwrap();
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].model, "gemini-new");
    assert_eq!(plan[0].requests_per_minute.limit, Some(7));
    assert_eq!(plan[0].requests_per_day.limit, Some(70));
    assert!(plan[0].limits[0].auto);
}

#[test]
fn status_with_a_model_shows_each_group_once_planned_or_used_in_order() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2"), ("k3", "p2")]);
    let lease = granted(e.acquire(T0, ask("a")));
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 10))
        .unwrap();
    let plain = e.status(T0, None, None, 10).unwrap();
    let planned = e.status_with_plan(T0, None, Some(MODEL), None, 10).unwrap();
    let names = |view: &StatusView| -> Vec<(String, String, u64)> {
        view.groups
            .iter()
            .map(|g| (g.project.clone(), g.model.clone(), g.requests_per_day.used))
            .collect()
    };
    assert_eq!(plain.groups.len(), 1);
    let used_project = plain.groups[0].project.clone();
    let used_of = |p: &str| u64::from(p == used_project);
    assert_eq!(
        names(&planned),
        [
            ("p1".to_string(), MODEL.to_string(), used_of("p1")),
            ("p2".to_string(), MODEL.to_string(), used_of("p2")),
        ]
    );
    // Without a model it is the status; keys and counts are the status's either way.
    assert_eq!(
        names(&e.status_with_plan(T0, None, None, None, 10).unwrap()),
        names(&plain)
    );
    assert_eq!(planned.total_keys, plain.total_keys);
    assert_eq!(planned.window_ms, e.config().window_ms);
}

/// `ReportFailureAndReplace` decides what `ReportFailure` then `Acquire` of its replacement
/// decide at the same time: the same replies, events and state, whether the replacement is
/// granted, queues or finds no key; a report refused acquires nothing.
#[test]
fn a_report_with_its_replacement_is_the_two_commands_it_joins() {
    type Keys<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Keys, FailureKind, bool); 4] = [
        (
            &[("k1", "p1"), ("k2", "p2")],
            FailureKind::InvalidKey,
            false,
        ),
        (
            &[("k1", "p1"), ("k2", "p1")],
            FailureKind::RateLimited,
            true,
        ),
        (&[("k1", "p1")], FailureKind::RateLimited, true),
        (&[("k1", "p1")], FailureKind::ServerError, true),
    ];
    let mut outcomes = Vec::new();
    for (keys, kind, wait) in cases {
        let setup = |keys: &[(&str, &str)]| {
            let mut e = engine(keys);
            let held = granted(e.acquire(T0, ask("held")));
            (e, held)
        };
        let (mut split, held) = setup(keys);
        let (mut joined, _) = setup(keys);
        let at = Time::at(T0 + SECOND);
        let (reported, mut split_notices) = split.apply(
            at,
            Command::ReportFailure {
                lease_id: held.lease_id.clone(),
                fencing_token: held.fencing_token,
                report: report(kind),
            },
        );
        let reported = reported.into_reported().unwrap();
        let (acquired, more) = split.apply(
            at,
            Command::Acquire(AcquireRequest {
                wait,
                ..reported.replacement.clone()
            }),
        );
        split_notices.extend(more);
        let acquired = acquired.into_acquired();
        let (reply, joined_notices) = joined.apply(
            at,
            Command::ReportFailureAndReplace {
                lease_id: held.lease_id.clone(),
                fencing_token: held.fencing_token,
                report: report(kind),
                wait,
            },
        );
        let (joined_reported, joined_acquired) = reply.into_reported_and_replaced().unwrap();
        let case = format!("{kind:?}, wait {wait}");
        outcomes.push(match &joined_acquired {
            Ok(Acquired::Granted(_)) => "granted",
            Ok(Acquired::Queued(_)) => "queued",
            Ok(Acquired::Unavailable(_)) => "none",
            Err(_) => "refused",
        });
        assert_eq!(joined.image(), split.image(), "{case}");
        assert_eq!(
            format!(
                "{:?}",
                (&joined_reported, &joined_acquired, &joined_notices.events)
            ),
            format!("{:?}", (&reported, &acquired, &split_notices.events)),
            "{case}"
        );
        // The key as the report left it: an invalid one disabled.
        assert_eq!(
            joined_reported.key.state == KeyState::Disabled,
            kind == FailureKind::InvalidKey,
            "{case}"
        );
        // A lease never lent: refused, and nothing acquired.
        let before = joined.image();
        let (reply, notices) = joined.apply(
            at,
            Command::ReportFailureAndReplace {
                lease_id: "lease-99".into(),
                fencing_token: held.fencing_token,
                report: report(kind),
                wait,
            },
        );
        assert!(reply.into_reported_and_replaced().is_err(), "{case}");
        assert!(notices.waiter_grants.is_empty(), "{case}");
        assert_eq!(joined.image().leases, before.leases, "{case}");
    }
    // Granted elsewhere; queued behind the project's cooldown; none (its only key excluded for
    // the task); granted the same key again (a server error blames no key).
    assert_eq!(outcomes, ["granted", "queued", "none", "granted"]);
}
/// Every command's reply is moved out of `apply`, so a large variant makes them all as large
/// (a report with its replacement once nearly doubled them, costing the engine 6% of its
/// acquire and release cycles): the reply stays the size of a report's.
#[test]
fn a_reply_is_no_larger_than_a_reports() {
    assert!(
        std::mem::size_of::<Reply>() <= std::mem::size_of::<Result<Reported, EngineError>>() + 16,
        "Reply is {} bytes",
        std::mem::size_of::<Reply>()
    );
}

/// What the server's bound on new model names asks: a name the pool lists, or remembers, makes
/// the engine remember nothing new.
#[test]
fn a_pool_serves_its_listed_models_and_those_it_remembers() {
    let e = engine(&[("k1", "p1")]);
    assert!(e.serves("", MODEL));
    assert!(e.serves(DEFAULT_POOL, &format!("models/{MODEL}")));
    assert!(!e.serves("", "not-listed"));
    assert!(!e.serves("no-such-pool", MODEL));

    let mut e = engine_of_unlisted_models(&[("k1", "p1")]);
    assert!(!e.serves("", "new-model"));
    let lease = granted(e.acquire(T0, of_model("t", "new-model")));
    assert!(e.serves("", "new-model"));
    e.release(T0, &lease.lease_id, lease.fencing_token, Usage::UNUSED)
        .unwrap();
    assert!(e.serves("", "new-model"));
}
