//! The learning rules against a provider model, whatever the arrival pattern: a project whose
//! real limit is below the configured one stops drawing 429s within about a window of the
//! first, with or without the figure in the 429; and 429s from someone else using the project,
//! however they fall, leave no lasting mark once they stop.

use super::*;
use proptest::prelude::*;
use std::collections::VecDeque;

const KEYS: [(&str, &str); 2] = [("k1", "p1"), ("k2", "p1")];
/// The arrival of a request sent on a lease: so long after its grant.
const MAX_SEND_DELAY: u64 = 3 * SECOND;

fn learning_engine(configured: u64) -> Engine {
    let mut cfg = config(configured, 1_000_000);
    cfg.cooldown_base_ms = 5 * SECOND;
    cfg.relearn_after_windows = 10;
    let mut keys = key_specs(&KEYS);
    keys[0].max_leases = Some(3);
    new_engine(cfg, keys).unwrap()
}

/// The provider: a sliding window of the requests it accepted.
struct Provider {
    limit: u64,
    accepted: VecDeque<u64>,
}

impl Provider {
    /// Whether a request arriving at `at` is accepted; else how long until it would be.
    fn arrive(&mut self, at: u64) -> Result<(), u64> {
        while self.accepted.front().is_some_and(|&t| t + MINUTE <= at) {
            self.accepted.pop_front();
        }
        if (self.accepted.len() as u64) < self.limit {
            self.accepted.push_back(at);
            Ok(())
        } else {
            Err(self.accepted[0] + MINUTE - at)
        }
    }
}

/// Runs `steps` of (wait, send delay, retry delay given) and counts the provider's 429s.
fn run_fleet(
    configured: u64,
    real: u64,
    named: bool,
    steps: &[(u64, u64, bool)],
) -> Result<(u64, u64), TestCaseError> {
    let mut e = learning_engine(configured);
    let mut provider = Provider {
        limit: real,
        accepted: VecDeque::new(),
    };
    // (arrival, lease id, token)
    let mut in_flight: Vec<(u64, String, u64)> = Vec::new();
    let mut now = T0;
    let mut refusals: u64 = 0;
    let mut first_refusal_at = None;
    for (index, &(wait, delay, with_retry)) in steps.iter().enumerate() {
        now += wait;
        in_flight.sort_by_key(|f| f.0);
        while in_flight.first().is_some_and(|f| f.0 <= now) {
            let (arrival, lease_id, token) = in_flight.remove(0);
            let command = match provider.arrive(arrival) {
                Ok(()) => Command::Release {
                    lease_id,
                    fencing_token: token,
                    usage: used(1, 0),
                },
                Err(retry) => {
                    refusals += 1;
                    first_refusal_at.get_or_insert(arrival);
                    let violations = if named {
                        vec![violation(LimitKind::RequestsPerMinute, Some(real))]
                    } else {
                        Vec::new()
                    };
                    Command::ReportFailure {
                        lease_id,
                        fencing_token: token,
                        report: FailureReport {
                            retry_after_ms: with_retry.then_some(retry),
                            violations,
                            ..report(FailureKind::RateLimited)
                        },
                    }
                }
            };
            e.apply(Time::at(arrival.max(now)), command);
        }
        let task = format!("t{index}");
        if let Acquired::Granted(lease) = e
            .apply(Time::at(now), Command::Acquire(ask(&task)))
            .0
            .into_acquired()
            .unwrap()
        {
            in_flight.push((now + delay, lease.lease_id, lease.fencing_token));
        }
    }
    let after_first = refusals.saturating_sub(1);
    let status = e.status(now, None, None, 10).unwrap();
    let admitted = status.groups[0].requests_per_minute.limit.unwrap();
    Ok((after_first, admitted))
}

fn steps() -> impl Strategy<Value = Vec<(u64, u64, bool)>> {
    proptest::collection::vec((0..8 * SECOND, 0..MAX_SEND_DELAY, any::<bool>()), 1..400)
}

/// The climb needs `relearn_after` windows: the runs stay shorter, so that no probe upward
/// (which draws 429s by design) falls in them.
fn within_nine_windows(mut steps: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut total = 0;
    steps.retain(|s| {
        total += s.0;
        total < 9 * MINUTE
    });
    steps
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_real_limit_below_the_configured_one_draws_at_most_a_window_of_429s_after_the_first(
        real in 1..12u64,
        extra in 1..12u64,
        named in any::<bool>(),
        steps in steps(),
    ) {
        let configured = real + extra;
        let steps = within_nine_windows(steps);
        let (after_first, admitted) = run_fleet(configured, real, named, &steps)?;
        if named {
            // The figure is taken at once: only requests already on their way can be refused.
            prop_assert!(after_first <= 4, "{after_first} 429s after a named figure");
        } else {
            // Bare 429s are weighed (issue 24), not taken as verdicts: where "at most a window
            // of 429s after the first" held for the reacting rule, arbitrary arrivals may now
            // draw more before the evidence is enough (REFUSALS_TO_LOWER at the top of the
            // window, outnumbering its acceptances). What replaces it: past two windows' worth
            // of 429s, the limit has come down, unless a ¾ step cannot go lower (3 or less)
            // or the real limit is within a third of the configured one: it then refuses less
            // than a third of the calls at the top, which noise could too, so until refusals
            // bunch at the top it costs up to twice what it is above the real one each window
            // (9 here; a refused call leaves the books and its place is offered again), and a
            // window's worth. The steady state is held to issue 24's figures by
            // `tests/provider.rs` (case B: 48 and 57 of 60).
            let steppable = configured.saturating_mul(3).div_ceil(4) < configured;
            let within_a_third = real.saturating_mul(3) > configured.saturating_mul(2);
            let excess_each_window = 2 * 9 * (configured - real) + configured;
            prop_assert!(
                after_first <= 2 * configured
                    || !steppable
                    || admitted < configured
                    || (within_a_third && after_first <= excess_each_window),
                "{after_first} 429s after the first (configured {configured}, real {real}), still admitting {admitted}"
            );
        }
    }

    #[test]
    fn outside_429s_leave_no_mark_once_they_stop(
        configured in 2..40u64,
        outside in proptest::collection::vec((0..MINUTE, 0..3u64), 1..20),
    ) {
        let mut e = learning_engine(configured);
        let mut now = T0;
        // Someone else spends the project now and then: our calls meet 429s without figures.
        for (index, (wait, before)) in outside.iter().enumerate() {
            now += wait;
            for i in 0..*before {
                if let Ok(Acquired::Granted(lease)) = e.acquire(now, ask(&format!("ok-{index}-{i}"))) {
                    e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0)).unwrap();
                }
            }
            if let Ok(Acquired::Granted(lease)) = e.acquire(now, ask(&format!("refused-{index}"))) {
                let command = Command::ReportFailure {
                    lease_id: lease.lease_id,
                    fencing_token: lease.fencing_token,
                    report: FailureReport { violations: Vec::new(), ..report(FailureKind::RateLimited) },
                };
                e.apply(Time::at(now), command);
            }
        }
        // They stop; our fleet presses the limit window after window, and is never refused.
        for window in 0..40 {
            now += MINUTE + 2 * SECOND;
            let mut i = 0;
            while let Ok(Acquired::Granted(lease)) = e.acquire(now, ask(&format!("w{window}-{i}"))) {
                e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0)).unwrap();
                i += 1;
                prop_assert!(i <= configured, "more than the configured limit in a window");
            }
        }
        let status = e.status(now, None, None, 10).unwrap();
        let group = &status.groups[0];
        prop_assert_eq!(group.limits[LimitKind::RequestsPerMinute as usize].learned, None);
        prop_assert_eq!(group.requests_per_minute.limit, Some(configured));
    }
}
