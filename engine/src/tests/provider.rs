//! The learning rules against a provider that answers as Gemini does: a sliding-window limit
//! `T` the provider keeps, a configured limit `C` keylease was told, and bare 429s at rate `r`
//! that are no limit at all (they spend nothing). Saturating demand for 60 windows of Gemini's
//! minute, 20 seeds, and the **worst** seed is the score (issue 24's cases A to E). Production
//! tuning throughout: one window of 60 s, a safety margin of 2 s, `relearn_after` 10.

use super::*;
use crate::catalogue::GroupKey;
use std::collections::VecDeque;

const WINDOWS: u64 = 60;
const SEEDS: u64 = 20;
/// Demand looks for keys once a tick.
const TICK: u64 = SECOND;

/// A seeded generator (splitmix64): the same seed, the same run.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `percent`/100.
    fn percent(&mut self, percent: u64) -> bool {
        self.next() % 10_000 < percent * 100
    }
}

/// What the provider answered a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accepted,
    /// Its window held the true limit.
    LimitRefused,
    /// A 429 that is no limit.
    NoiseRefused,
}

/// One project's provider: a sliding window of accepted calls, and noise.
struct Provider {
    limit: u64,
    noise_percent: u64,
    accepted: VecDeque<u64>,
    /// Until when every call is refused (an outage).
    down_until: u64,
}

impl Provider {
    fn new(limit: u64, noise_percent: u64) -> Self {
        Self {
            limit,
            noise_percent,
            accepted: VecDeque::new(),
            down_until: 0,
        }
    }

    fn call(&mut self, at: u64, dice: &mut Dice) -> Answer {
        while self.accepted.front().is_some_and(|&t| t + MINUTE <= at) {
            self.accepted.pop_front();
        }
        if at < self.down_until || dice.percent(self.noise_percent) {
            Answer::NoiseRefused
        } else if self.accepted.len() as u64 >= self.limit {
            Answer::LimitRefused
        } else {
            self.accepted.push_back(at);
            Answer::Accepted
        }
    }
}

/// Production tuning, `projects` projects with one key each (many leases a key), `configured`
/// requests per minute.
fn fleet(projects: usize, configured: u64) -> Engine {
    let mut cfg = config(configured, 100_000_000);
    cfg.safety_margin_ms = 2 * SECOND;
    cfg.pools.get_mut(DEFAULT_POOL).unwrap().max_leases_per_key = 100_000;
    if let Some(limits) = cfg
        .pools
        .get_mut(DEFAULT_POOL)
        .unwrap()
        .models
        .get_mut(MODEL)
    {
        limits.tokens_per_minute = None;
    }
    let keys: Vec<(String, String)> = (1..=projects)
        .map(|p| (format!("k{p}"), format!("p{p}")))
        .collect();
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
    new_engine(cfg, key_specs(&keys)).unwrap()
}

fn group_of(e: &Engine, project: &str) -> GroupKey {
    GroupKey {
        pool: e.catalogue.pool_by_name(DEFAULT_POOL).unwrap(),
        project: e.catalogue.projects.get(project).unwrap(),
        model: e.catalogue.models.get(MODEL).unwrap(),
    }
}

/// The requests per minute the books admit (as last brought to a time).
fn effective(e: &Engine, project: &str) -> u64 {
    let group = group_of(e, project);
    let configured = e.books.configured(group);
    e.books
        .learned(group)
        .map_or(configured, |learned| learned.effective(configured))
        .requests_per_minute
        .unwrap()
}

/// Whether the group rests for a wave across the pool (as last brought to a time).
fn resting_for_a_wave(e: &Engine, project: &str, now: u64) -> bool {
    let group = group_of(e, project);
    e.books.iter().any(|(key, books)| {
        key == group
            && books
                .cooldown()
                .is_some_and(|c| c.reason == CooldownReason::ProviderOutage && c.until_ms > now)
    })
}

/// What a run saw, per window.
#[derive(Debug, Default)]
struct Run {
    accepted: Vec<u64>,
    limit_refused: Vec<u64>,
    /// The lowest the books admitted, over the run.
    lowest_limit: u64,
    /// When a pool-wide rest for a wave first held, if ever.
    outage_rest_at: Option<u64>,
    /// Accepted calls after an outage ended.
    accepted_after_outage: u64,
}

impl Run {
    fn mean(per_window: &[u64], from: u64) -> f64 {
        let windows = &per_window[(from - 1) as usize..];
        windows.iter().sum::<u64>() as f64 / windows.len() as f64
    }
}

/// Saturating demand on every project for `windows` windows: each tick asks for keys until
/// none is lent, and each call is answered (and reported) at once. `outage`: a span of steady
/// time (from the start) when every project refuses every call.
fn run(
    projects: &[(u64, u64)],
    configured: u64,
    seed: u64,
    windows: u64,
    outage: Option<(u64, u64)>,
) -> Run {
    let mut e = fleet(projects.len(), configured);
    let mut dice = Dice(seed);
    let mut providers: Vec<Provider> = projects
        .iter()
        .map(|&(limit, noise)| Provider::new(limit, noise))
        .collect();
    let mut run = Run {
        accepted: vec![0; windows as usize],
        limit_refused: vec![0; windows as usize],
        lowest_limit: u64::MAX,
        ..Run::default()
    };
    let mut task = 0u64;
    let mut now = T0;
    let end = T0 + windows * MINUTE;
    while now < end {
        let window = ((now - T0) / MINUTE) as usize;
        if let Some((from, to)) = outage {
            for provider in &mut providers {
                provider.down_until = if now - T0 >= from && now - T0 < to {
                    T0 + to
                } else {
                    0
                };
            }
        }
        loop {
            task += 1;
            let Ok(Acquired::Granted(lease)) = e.acquire(now, ask(&format!("t{task}"))) else {
                break;
            };
            let project: usize = lease.project[1..].parse::<usize>().unwrap() - 1;
            let answer = providers[project].call(now, &mut dice);
            let command = match answer {
                Answer::Accepted => {
                    run.accepted[window] += 1;
                    if outage.is_some_and(|(_, to)| now - T0 >= to) {
                        run.accepted_after_outage += 1;
                    }
                    Command::Release {
                        lease_id: lease.lease_id,
                        fencing_token: lease.fencing_token,
                        usage: used(1, 0),
                    }
                }
                answer => {
                    if answer == Answer::LimitRefused {
                        run.limit_refused[window] += 1;
                    }
                    Command::ReportFailure {
                        lease_id: lease.lease_id,
                        fencing_token: lease.fencing_token,
                        report: FailureReport {
                            violations: Vec::new(),
                            requests_sent: Some(1),
                            ..report(FailureKind::RateLimited)
                        },
                    }
                }
            };
            e.apply(Time::at(now), command);
        }
        for p in 1..=projects.len() {
            let project = format!("p{p}");
            run.lowest_limit = run.lowest_limit.min(effective(&e, &project));
            if resting_for_a_wave(&e, &project, now) && run.outage_rest_at.is_none() {
                run.outage_rest_at = Some(now - T0);
            }
        }
        now += TICK;
    }
    run
}

#[test]
fn case_a_bare_429s_alone_cost_only_themselves_and_never_lower_a_limit_below_three_quarters() {
    for configured in [2, 10, 60, 1000] {
        for noise in [0, 1, 3, 10] {
            let (mut worst_share, mut lowest) = (f64::MAX, u64::MAX);
            for seed in 0..SEEDS {
                let run = run(&[(configured, noise)], configured, seed, WINDOWS, None);
                let share = Run::mean(&run.accepted, 3) / configured as f64;
                worst_share = worst_share.min(share);
                lowest = lowest.min(run.lowest_limit);
            }
            let floor = 1.0 - noise as f64 / 100.0 - 0.05;
            assert!(
                worst_share >= floor,
                "C = T = {configured}, {noise}% bare 429s: the worst seed got {worst_share:.3} of C a window, below {floor:.2}"
            );
            assert!(
                lowest as f64 >= 0.75 * configured as f64,
                "C = T = {configured}, {noise}% bare 429s: the limit went down to {lowest}"
            );
        }
    }
}

#[test]
fn case_b_a_real_limit_below_the_configured_one_is_found_from_bare_429s() {
    let configured = 60;
    for real in [15, 30, 48, 57] {
        for noise in [0, 3] {
            let (mut worst_share, mut worst_refused) = (f64::MAX, 0.0f64);
            for seed in 0..SEEDS {
                let run = run(&[(real, noise)], configured, seed, WINDOWS, None);
                worst_share = worst_share.min(Run::mean(&run.accepted, 10) / real as f64);
                worst_refused = worst_refused.max(Run::mean(&run.limit_refused, 10));
            }
            let allowed = if real * 10 >= configured * 9 {
                0.05
            } else {
                0.02
            } * real as f64;
            assert!(
                worst_refused <= allowed,
                "T = {real}, {noise}% bare 429s: {worst_refused:.2} limit 429s a window, above {allowed:.2}"
            );
            let floor = 0.9 * (1.0 - noise as f64 / 100.0);
            assert!(
                worst_share >= floor,
                "T = {real}, {noise}% bare 429s: the worst seed got {worst_share:.3} of T a window, below {floor:.3}"
            );
        }
    }
}

#[test]
fn case_c_one_bare_429_on_an_idle_project_changes_no_limit_and_rests_nothing_a_second_rests_its_retry_delay()
 {
    let configured = 60;
    let mut e = fleet(1, configured);
    let mut now = T0;
    // A fifth of the limit, spread over five windows.
    for i in 0..60 {
        let lease = granted(e.acquire(now, ask(&format!("idle-{i}"))));
        e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0))
            .unwrap();
        now += 5 * SECOND;
    }
    let lease = granted(e.acquire(now, ask("refused")));
    let retry_delay = 7 * SECOND;
    let command = Command::ReportFailure {
        lease_id: lease.lease_id,
        fencing_token: lease.fencing_token,
        report: FailureReport {
            violations: Vec::new(),
            requests_sent: Some(1),
            retry_after_ms: Some(retry_delay),
            ..report(FailureKind::RateLimited)
        },
    };
    e.apply(Time::at(now), command);
    assert_eq!(effective(&e, "p1"), configured, "no limit changed");
    // Alone, it rests nothing: the next call goes; refused too, the project rests.
    let next = granted(e.acquire(now + 1, ask("next")));
    let command = Command::ReportFailure {
        lease_id: next.lease_id,
        fencing_token: next.fencing_token,
        report: FailureReport {
            violations: Vec::new(),
            requests_sent: Some(1),
            retry_after_ms: Some(retry_delay),
            ..report(FailureKind::RateLimited)
        },
    };
    e.apply(Time::at(now + 1), command);
    let refused_at = now + 1;
    assert!(matches!(
        e.acquire(now + 2, ask("during")),
        Ok(Acquired::Unavailable(_))
    ));
    assert_eq!(effective(&e, "p1"), configured, "no limit changed");
    // Within one window plus the retry delay, the full configured limit is lent again.
    now = refused_at + retry_delay + MINUTE;
    for i in 0..configured {
        granted(e.acquire(now, ask(&format!("full-{i}"))));
    }
    assert_eq!(effective(&e, "p1"), configured);
}

#[test]
fn case_e_noise_on_a_busy_pool_is_no_wave_but_two_seconds_of_refusals_are() {
    let pool = [(1000, 3); 5];
    for seed in 0..SEEDS {
        let run = run(&pool, 1000, seed, WINDOWS, None);
        assert_eq!(
            run.outage_rest_at, None,
            "seed {seed}: 3% of bare 429s made a wave"
        );
    }
    // Saturating demand calls in bursts, one a window and margin apart: the outage covers one.
    let burst = 10 * (MINUTE + 2 * SECOND);
    let (from, to) = (burst - 500, burst + 2 * SECOND - 500);
    for seed in 0..SEEDS {
        let run = run(&pool, 1000, seed, 12, Some((from, to)));
        let at = run.outage_rest_at.expect("the outage rested the pool");
        assert!(
            at >= from && at <= from + 2 * SECOND,
            "seed {seed}: the pool rested at {at} ms, for an outage from {from} ms"
        );
        assert!(
            run.lowest_limit >= 750,
            "seed {seed}: the outage lowered a project to {}",
            run.lowest_limit
        );
        assert!(
            run.accepted_after_outage > 0,
            "seed {seed}: the rest never lifted"
        );
    }
}
