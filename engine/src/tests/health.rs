//! A key's health: keys added while keys are checked wait for their first check, checks
//! disable and enable keys on evidence, an operator's disable holds against them, and a report
//! on a lease from before an enable disables nothing.

use super::*;

fn checked_engine(keys: &[(&str, &str)]) -> Engine {
    let mut cfg = config(10, 100);
    cfg.check_keys = true;
    new_engine(cfg, key_specs(keys)).unwrap()
}

/// The key as the check left it, and what the check did.
fn checked(e: &mut Engine, at: u64, key: &str, outcome: CheckOutcome) -> (KeyView, Notices) {
    let command = Command::KeyChecked {
        identity: format!("fp-{key}"),
        outcome,
    };
    let (reply, notices) = e.apply(Time::at(at), command);
    (reply.into_key_checked().unwrap(), notices)
}

fn check(e: &mut Engine, at: u64, key: &str, outcome: CheckOutcome) -> KeyView {
    checked(e, at, key, outcome).0
}

fn refused(problem: KeyProblem) -> CheckOutcome {
    CheckOutcome::Refused {
        problem,
        detail: "PERMISSION_DENIED".into(),
    }
}

fn state(e: &Engine, key: &str) -> KeyState {
    e.key_status(T0, key).unwrap().state
}

#[test]
fn a_key_added_while_keys_are_checked_is_lent_only_once_a_check_finds_it_fine() {
    let mut e = checked_engine(&[("k1", "p1")]);
    assert_eq!(state(&e, "k1"), KeyState::Checking);
    let why = unavailable(e.acquire(T0, ask("a")));
    assert_eq!(why.reason, UnavailableReason::AwaitingCheck);
    // A waiter waits for the check rather than failing as if every key were disabled.
    let waiting = AcquireRequest {
        wait: true,
        ..ask("b")
    };
    let id = queued(e.acquire(T0, waiting));
    let (view, notices) = checked(&mut e, T0 + 10, "k1", CheckOutcome::Fine);
    assert_eq!(
        view.state,
        KeyState::Leased,
        "granted to the waiter at once"
    );
    assert_eq!(notices.waiter_grants.len(), 1);
    assert_eq!(notices.waiter_grants[0].0, id);
    assert!(notices.events.iter().any(|event| matches!(
        &event.kind,
        EventKind::KeyChecked { key_id, outcome: CheckOutcome::Fine } if key_id == "k1"
    )));
}

#[test]
fn a_key_a_check_refuses_is_never_lent_and_its_waiters_are_told() {
    let mut e = checked_engine(&[("k1", "p1")]);
    let waiting = AcquireRequest {
        wait: true,
        ..ask("a")
    };
    let id = queued(e.acquire(T0, waiting));
    let (view, notices) = checked(&mut e, T0, "k1", refused(KeyProblem::Leaked));
    assert_eq!(view.state, KeyState::Disabled);
    let disabled = view.disabled.expect("disabled");
    assert_eq!(
        (disabled.by, disabled.problem),
        (Decider::Check, Some(KeyProblem::Leaked))
    );
    assert_eq!(disabled.reason, "leaked: PERMISSION_DENIED");
    assert!(!disabled.may_heal());
    assert_eq!(
        notices.waiter_failures,
        vec![(
            id,
            Unavailable {
                reason: UnavailableReason::AllDisabled,
                retry_at_ms: None,
            }
        )]
    );
    let why = unavailable(e.acquire(T0, ask("b")));
    assert_eq!(why.reason, UnavailableReason::AllDisabled);
}

#[test]
fn a_check_without_an_answer_lends_the_key_and_says_it_is_unchecked() {
    let mut e = checked_engine(&[("k1", "p1")]);
    let detail = "connection refused".to_string();
    let view = check(&mut e, T0, "k1", CheckOutcome::NoAnswer { detail });
    assert_eq!(view.state, KeyState::Unchecked);
    assert!(view.disabled.is_none());
    let lease = granted(e.acquire(T0, ask("a")));
    assert_eq!(state(&e, "k1"), KeyState::Leased);
    e.release(T0, &lease.lease_id, lease.fencing_token, used(1, 0))
        .unwrap();
    assert_eq!(state(&e, "k1"), KeyState::Unchecked);
    // A later check that finds it fine makes it healthy.
    assert_eq!(
        check(&mut e, T0, "k1", CheckOutcome::Fine).state,
        KeyState::Available
    );
}

#[test]
fn a_check_enables_a_key_disabled_on_evidence_but_never_one_an_operator_disabled() {
    let mut e = engine(&[("k1", "p1"), ("k2", "p2")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let denied = FailureReport {
        detail: "CONSUMER_SUSPENDED".into(),
        ..report(FailureKind::PermissionDenied)
    };
    e.report_failure(T0, &lease.lease_id, lease.fencing_token, denied)
        .unwrap();
    let disabled = e.key_status(T0, &lease.key_id).unwrap().disabled.unwrap();
    assert_eq!(
        (disabled.by, disabled.problem),
        (Decider::Report, Some(KeyProblem::PermissionDenied))
    );
    assert!(disabled.may_heal(), "a permission may be granted again");
    let other = if lease.key_id == "k1" { "k2" } else { "k1" };
    e.set_key_enabled(T0, other, false, "rotating").unwrap();
    e.drain();

    let (view, notices) = checked(&mut e, T0 + 1, &lease.key_id, CheckOutcome::Fine);
    assert_eq!(view.state, KeyState::Available);
    let events = notices.events;
    assert!(
        events.iter().any(|event| matches!(
            &event.kind,
            EventKind::KeyEnabled { key_id, by: Decider::Check } if *key_id == lease.key_id
        )),
        "{events:?}"
    );
    let view = check(&mut e, T0 + 2, other, CheckOutcome::Fine);
    let disabled = view.disabled.expect("an operator's disable holds");
    assert_eq!(
        (disabled.by, disabled.reason.as_str()),
        (Decider::Operator, "rotating")
    );
    // Nor does a check's finding replace the operator's reason.
    let view = check(&mut e, T0 + 3, other, refused(KeyProblem::Suspended));
    assert_eq!(view.disabled.unwrap().by, Decider::Operator);
    e.set_key_enabled(T0 + 4, other, true, "").unwrap();
    assert_eq!(state(&e, other), KeyState::Available);
}

#[test]
fn a_check_names_the_problem_a_report_could_not() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let leaked = FailureReport {
        detail: "reported as leaked".into(),
        ..report(FailureKind::PermissionDenied)
    };
    e.report_failure(T0, &lease.lease_id, lease.fencing_token, leaked)
        .unwrap();
    let view = check(&mut e, T0, "k1", refused(KeyProblem::Leaked));
    let disabled = view.disabled.unwrap();
    assert_eq!(disabled.by, Decider::Report, "still the report's disable");
    assert_eq!(disabled.problem, Some(KeyProblem::Leaked));
    assert!(!disabled.may_heal(), "a leaked key is not looked at again");
}

#[test]
fn a_report_on_a_lease_from_before_an_enable_does_not_disable_the_key_again() {
    let mut e = engine(&[("k1", "p1")]);
    let before = granted(e.acquire(T0, ask("a")));
    e.set_key_enabled(T0, "k1", false, "").unwrap();
    e.set_key_enabled(T0 + 1, "k1", true, "").unwrap();
    let late = report(FailureKind::InvalidKey);
    e.report_failure(T0 + 2, &before.lease_id, before.fencing_token, late)
        .unwrap();
    assert_eq!(state(&e, "k1"), KeyState::Available, "old news");
    // A lease granted after the enable still brings news of the key.
    let after = granted(e.acquire(T0 + 3, ask("b")));
    e.report_failure(
        T0 + 4,
        &after.lease_id,
        after.fencing_token,
        report(FailureKind::InvalidKey),
    )
    .unwrap();
    assert_eq!(state(&e, "k1"), KeyState::Disabled);
}

#[test]
fn under_rules_7_a_late_report_still_disables_a_key_enabled_since() {
    let setup = Setup {
        rules: 7,
        ..Setup::new(config(10, 100), key_specs(&[("k1", "p1")]), 0)
    };
    let mut e = Engine::new(setup, Time::at(T0)).unwrap();
    let before = granted(e.acquire(T0, ask("a")));
    e.set_key_enabled(T0, "k1", false, "").unwrap();
    e.set_key_enabled(T0 + 1, "k1", true, "").unwrap();
    let late = report(FailureKind::InvalidKey);
    e.report_failure(T0 + 2, &before.lease_id, before.fencing_token, late)
        .unwrap();
    assert_eq!(state(&e, "k1"), KeyState::Disabled, "as rules 7 decided");
}

#[test]
fn a_check_of_a_secret_no_longer_configured_changes_nothing() {
    let mut e = checked_engine(&[("k1", "p1")]);
    let stale = Command::KeyChecked {
        identity: "fp-of-the-old-secret".into(),
        outcome: refused(KeyProblem::Invalid),
    };
    let reply = e.apply(Time::at(T0), stale).0.into_key_checked();
    assert!(
        matches!(reply, Err(EngineError::KeyNotFound(_))),
        "{reply:?}"
    );
    assert_eq!(state(&e, "k1"), KeyState::Checking);
    // Nor is a detail past the bound taken.
    let long = Command::KeyChecked {
        identity: "fp-k1".into(),
        outcome: CheckOutcome::NoAnswer {
            detail: "x".repeat(MAX_DETAIL_BYTES + 1),
        },
    };
    let reply = e.apply(Time::at(T0), long).0.into_key_checked();
    assert!(
        matches!(reply, Err(EngineError::InvalidArgument { .. })),
        "{reply:?}"
    );
}

#[test]
fn keys_wait_for_a_check_only_while_keys_are_checked() {
    let mut e = checked_engine(&[("k1", "p1")]);
    // Keys already configured do not wait when checks begin; only those added do.
    let mut plain = engine(&[("k1", "p1")]);
    let mut setup = plain.setup();
    setup.config.check_keys = true;
    setup.keys = key_specs(&[("k1", "p1"), ("k2", "p2")]);
    plain.configure(T0, setup).unwrap();
    assert_eq!(state(&plain, "k1"), KeyState::Available);
    assert_eq!(state(&plain, "k2"), KeyState::Checking);
    // Checks turned off: nothing will check the key, so it is lent.
    let mut setup = e.setup();
    setup.config.check_keys = false;
    e.configure(T0, setup).unwrap();
    assert_eq!(state(&e, "k1"), KeyState::Available);
    granted(e.acquire(T0, ask("a")));
}

#[test]
fn a_keys_health_survives_a_snapshot() {
    let mut e = checked_engine(&[("k1", "p1"), ("k2", "p2"), ("k3", "p3")]);
    check(&mut e, T0, "k1", refused(KeyProblem::ServiceDisabled));
    check(
        &mut e,
        T0,
        "k2",
        CheckOutcome::NoAnswer {
            detail: "503".into(),
        },
    );
    let snapshot = crate::layout::Snapshot::of(&e, 1);
    let read = crate::layout::Snapshot::decode(&snapshot.encode()).unwrap();
    assert!(read.setup.config.check_keys);
    let (restored, _) = Engine::restore(read.setup, read.draining, read.image).unwrap();
    assert_eq!(restored.image(), e.image());
    assert_eq!(state(&restored, "k1"), KeyState::Disabled);
    assert_eq!(state(&restored, "k2"), KeyState::Unchecked);
    assert_eq!(state(&restored, "k3"), KeyState::Checking);
}
