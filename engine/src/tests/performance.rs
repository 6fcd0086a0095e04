//! Each key's record, and selection passing over keys whose calls fail for their own reasons.

use super::*;

/// Grants of k1 and k2 over `rounds` acquire-and-finish cycles, where k2's calls time out
/// `bad_percent` of the time (one by one, spread evenly) and k1's never do.
fn grants_with_a_failing_key(rules: u32, rounds: u64, bad_percent: u64) -> (u64, u64) {
    let setup = Setup {
        rules,
        ..Setup::new(
            config(1_000_000, 100_000_000),
            key_specs(&[("k1", "p1"), ("k2", "p1")]),
            0,
        )
    };
    let mut e = Engine::new(setup, Time::at(T0)).unwrap();
    let (mut k1, mut k2) = (0, 0);
    for n in 0..rounds {
        let now = T0 + n * SECOND;
        let lease = granted(e.acquire(now, ask(&format!("t{n}"))));
        if lease.key_id == "k1" {
            k1 += 1;
            e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0))
                .unwrap();
            continue;
        }
        k2 += 1;
        if (k2 * bad_percent) / 100 > ((k2 - 1) * bad_percent) / 100 {
            let timeout = FailureReport {
                requests_sent: Some(1),
                ..report(FailureKind::Timeout)
            };
            e.report_failure(now, &lease.lease_id, lease.fencing_token, timeout)
                .unwrap();
        } else {
            e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0))
                .unwrap();
        }
    }
    (k1, k2)
}

#[test]
fn a_key_with_30_percent_timeouts_gets_a_tenth_to_half_of_a_healthy_peers_grants() {
    let (healthy, failing) = grants_with_a_failing_key(RULES_VERSION, 2_000, 30);
    let share = failing as f64 / healthy as f64;
    eprintln!("30% timeouts: {failing} grants against a healthy peer's {healthy} ({share:.2})");
    assert!(
        (0.1..=0.5).contains(&share),
        "{failing} grants against {healthy}: {share:.2}"
    );
    // A key without failures of its own is not passed over: an even spread.
    let (a, b) = grants_with_a_failing_key(RULES_VERSION, 2_000, 0);
    assert_eq!((a, b), (1_000, 1_000));
    // Rules 7 spread evenly whatever the record.
    let (a, b) = grants_with_a_failing_key(7, 2_000, 30);
    assert_eq!((a, b), (1_000, 1_000));
}

#[test]
fn a_failing_key_alone_is_still_lent() {
    let mut e = new_engine(config(1_000_000, 100_000_000), key_specs(&[("k1", "p1")])).unwrap();
    for n in 0..50u64 {
        let now = T0 + n * SECOND;
        let lease = granted(e.acquire(now, ask(&format!("t{n}"))));
        e.report_failure(
            now,
            &lease.lease_id,
            lease.fencing_token,
            report(FailureKind::Timeout),
        )
        .unwrap();
    }
    let record = e.key_status(T0, "k1").unwrap().record;
    assert_eq!(record.recent_own_failure_percent(), Some(100));
}

#[test]
fn a_timed_release_keeps_the_calls_latency_on_its_key() {
    let mut e = engine(&[("k1", "p1")]);
    let lease = granted(e.acquire(T0, ask("a")));
    let release = Command::Timed {
        call_ms: 900,
        command: Box::new(Command::Release {
            lease_id: lease.lease_id.clone(),
            fencing_token: lease.fencing_token,
            usage: used(1, 0),
        }),
    };
    let (reply, _) = e.apply(Time::at(T0 + SECOND), release);
    assert!(reply.into_released().unwrap().is_some());
    let record = e.key_status(T0 + SECOND, "k1").unwrap().record;
    assert_eq!(record.calls, 1);
    assert_eq!(record.latency_percentile_ms(0.5), Some(1_024));
    // A timed command that ends no lease is applied as itself, timing nothing.
    let stale = Command::Timed {
        call_ms: 5,
        command: Box::new(Command::Release {
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            usage: used(1, 0),
        }),
    };
    let (reply, _) = e.apply(Time::at(T0 + 2 * SECOND), stale);
    assert_eq!(reply.into_released(), Ok(None));
    let record = e.key_status(T0, "k1").unwrap().record;
    assert_eq!(record.latency.iter().sum::<u64>(), 1);
}
