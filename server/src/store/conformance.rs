//! The store conformance suite: what a restart must keep, played through the shell ([`State`])
//! on a store dropped mid-run, as a crash leaves it, and opened again; one test per guarantee and
//! per trap of recovery. Every store runs it unchanged: `conformance_tests!(reopen)`. Time passes
//! between runs (a restart's clock starts where the old one stopped, plus the downtime), not on
//! tokio's paused clock, which would jump to the next timer while a test waits for the disk.

use crate::clock::Clock;
use crate::config::{self, Overrides, Settings};
use crate::secret::FingerprintKey;
use crate::shell::{AcquireFailure, State};
use crate::store::Store;
use keylease_engine::{
    AcquireRequest, Command, FailureKind, FailureReport, KeyState, LeaseView, LimitKind,
    QuotaViolation, Renewal, Reply, UnavailableReason, Usage,
};
use std::sync::Arc;
use std::time::Duration;

/// Opens the store under test again, as a restarted server would.
pub type Reopen = Box<dyn Fn() -> (Box<dyn Store>, FingerprintKey)>;

/// Limits and TTLs of the suite: three requests a minute and five a day per project.
const POOL: &str = r#"
[key_sources]
environment = false
[leases]
default_ttl = "1h"
max_ttl = "2h"
max_wait = "2h"
[quota]
safety_margin = "0s"
[pools.gemini.models.m]
requests_per_minute = 3
requests_per_day = 5
"#;

/// (id, project, secret)
type KeyLine = (&'static str, &'static str, &'static str);
const K1: KeyLine = ("k1", "p1", "AIzaFAKE.conformance-key-one-00000000");
const K2: KeyLine = ("k2", "p2", "AIzaFAKE.conformance-key-two-00000000");
const K3: KeyLine = ("k3", "p3", "AIzaFAKE.conformance-key-three-000000");
/// A second key of p1: two leases share its quota.
const K4: KeyLine = ("k4", "p1", "AIzaFAKE.conformance-key-four-0000000");

/// The suite's configuration with these keys.
fn with_keys(keys: &[KeyLine]) -> String {
    let mut config = POOL.to_string();
    for (id, project, secret) in keys {
        config.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"{project}\"\nsecret = \"{secret}\"\n"
        ));
    }
    config
}

/// 2026-03-09 20:00 UTC, 13:00 in Los Angeles.
const START_MS: u64 = 1_773_086_400_000;

/// Runs of a server on one store, one after the other.
pub struct Runs {
    reopen: Reopen,
    /// The wall time the next run's clock starts at.
    next_start_ms: u64,
    /// The configuration of the last run.
    config: String,
    scratch: std::path::PathBuf,
}

impl Runs {
    pub fn new(reopen: Reopen) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch = std::env::temp_dir().join(format!(
            "keylease-conformance-config-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&scratch).unwrap();
        Self {
            reopen,
            next_start_ms: START_MS,
            config: String::new(),
            scratch,
        }
    }

    /// Starts a server on the store with this configuration.
    pub fn start(&mut self, config: &str) -> Arc<State> {
        self.config = config.to_string();
        let path = self.scratch.join("keylease.toml");
        std::fs::write(&path, config).unwrap();
        let settings: Settings =
            config::load(Some(&path), &Default::default(), &Overrides::default()).unwrap();
        let (store, key) = (self.reopen)();
        let clock = Clock::starting_at(self.next_start_ms);
        State::open_on(&settings, clock, Some(store), key, u64::MAX)
            .unwrap()
            .0
    }

    /// The server dies at once; the next starts `downtime` later.
    pub fn crash(&mut self, state: Arc<State>, downtime: Duration) {
        self.next_start_ms = state.clock().now().wall_ms + downtime.as_millis() as u64;
        let state = Arc::try_unwrap(state)
            .unwrap_or_else(|_| panic!("a test still holds the state it crashes"));
        drop(state);
    }
}

impl Runs {
    /// The server dies, and starts again `downtime` later with the same configuration.
    pub fn restart(&mut self, state: Arc<State>, downtime: Duration) -> Arc<State> {
        self.crash(state, downtime);
        let config = self.config.clone();
        self.start(&config)
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn ask(task: &str) -> AcquireRequest {
    AcquireRequest {
        task_id: task.into(),
        model: "m".into(),
        ..Default::default()
    }
}

async fn acquire(state: &State, task: &str) -> Result<LeaseView, AcquireFailure> {
    state.acquire(None, ask(task), Duration::ZERO, None).await
}

async fn granted(state: &State, task: &str) -> LeaseView {
    acquire(state, task)
        .await
        .unwrap_or_else(|failure| panic!("{task} got no lease: {failure:?}"))
}

fn refused_for(outcome: Result<LeaseView, AcquireFailure>) -> UnavailableReason {
    match outcome {
        Err(AcquireFailure::Unavailable(unavailable)) => unavailable.reason,
        other => panic!("expected no key, got {other:?}"),
    }
}

async fn release(state: &State, lease: &LeaseView, requests_sent: u32) -> Reply {
    state
        .run(
            None,
            Command::Release {
                lease_id: lease.lease_id.clone(),
                fencing_token: lease.fencing_token,
                usage: Usage {
                    requests_sent: Some(requests_sent),
                    input_tokens: Some(0),
                },
            },
        )
        .await
        .unwrap()
}

/// A failure; a 429 names a figure of input tokens per minute no request of the suite comes
/// near, so that it teaches nothing and only its cooldown counts.
async fn report(state: &State, lease: &LeaseView, kind: FailureKind, retry_after: Duration) {
    let violations = match kind {
        FailureKind::RateLimited => vec![QuotaViolation {
            kind: Some(LimitKind::TokensPerMinute),
            quota_id: "GenerateContentInputTokensPerModelPerMinute-FreeTier".into(),
            model: "m".into(),
            value: Some(1_000_000),
        }],
        _ => Vec::new(),
    };
    report_with(state, lease, kind, retry_after, violations).await;
}

async fn report_with(
    state: &State,
    lease: &LeaseView,
    kind: FailureKind,
    retry_after: Duration,
    violations: Vec<QuotaViolation>,
) {
    state
        .run(
            None,
            Command::ReportFailure {
                lease_id: lease.lease_id.clone(),
                fencing_token: lease.fencing_token,
                report: FailureReport {
                    violations,
                    kind,
                    retry_after_ms: Some(retry_after.as_millis() as u64),
                    detail: String::new(),
                    requests_sent: None,
                },
            },
        )
        .await
        .unwrap()
        .into_reported()
        .unwrap();
}

async fn key_state(state: &State, key_id: &str) -> KeyState {
    state
        .read(|engine, now| engine.key_status(now, key_id))
        .await
        .unwrap()
        .unwrap()
        .state
}

async fn live_leases(state: &State) -> usize {
    state
        .read(|engine, now| engine.status(now, None, None, 1))
        .await
        .unwrap()
        .unwrap()
        .live_leases
}

/// Guarantee 1: a lease the server acknowledged is honoured until it expires.
pub async fn an_acknowledged_lease_is_honoured(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    let a = granted(&state, "a").await;
    let b = granted(&state, "b").await;
    runs.crash(state, Duration::from_secs(5));

    let state = runs.start(&with_keys(&[K1, K2]));
    assert_eq!(live_leases(&state).await, 2);
    assert_eq!(
        refused_for(acquire(&state, "c").await),
        UnavailableReason::AllLeased
    );
    let state = runs.restart(state, Duration::from_secs(3_600));
    let c = granted(&state, "c").await;
    assert!(c.fencing_token > a.fencing_token.max(b.fencing_token));
}

/// Guarantee 2: fencing tokens and lease ids never repeat or go backwards across restarts.
pub async fn fencing_tokens_never_repeat_across_restarts(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let mut tokens = Vec::new();
    let mut held: Option<LeaseView> = None;
    for run in 0..3 {
        let state = runs.start(&with_keys(&[K1, K2]));
        if let Some(lease) = held.take() {
            assert!(matches!(
                release(&state, &lease, 0).await.into_released(),
                Ok(Some(_))
            ));
        }
        for task in ["a", "b"] {
            let lease = granted(&state, &format!("{task}{run}")).await;
            tokens.push(lease.fencing_token);
            release(&state, &lease, 0).await;
        }
        // Granted and not released: still live at the crash.
        let lease = granted(&state, &format!("c{run}")).await;
        tokens.push(lease.fencing_token);
        held = Some(lease);
        // The wall clock reads as at the first start (set back): it cannot help.
        runs.crash(state, Duration::ZERO);
        runs.next_start_ms = START_MS;
    }
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens went back or repeated: {tokens:?}"
    );
}

/// A stale holder's release after a restart neither ends the key's new lease nor is taken for
/// its own: an ended lease is reported ended, a wrong token refused.
pub async fn a_stale_token_is_refused_after_a_restart(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1]));
    let a = granted(&state, "a").await;
    release(&state, &a, 0).await;
    let b = granted(&state, "b").await;
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1]));
    assert!(matches!(
        release(&state, &a, 1).await.into_released(),
        Ok(None)
    ));
    let with_a_token = LeaseView {
        fencing_token: a.fencing_token,
        ..b.clone()
    };
    assert!(
        release(&state, &with_a_token, 1)
            .await
            .into_released()
            .is_err()
    );
    assert_eq!(key_state(&state, "k1").await, KeyState::Leased);
    assert!(matches!(
        release(&state, &b, 1).await.into_released(),
        Ok(Some(_))
    ));
}

/// Guarantee 3: a disabled key stays disabled, also when it comes back under another id.
pub async fn a_disabled_key_stays_disabled_under_any_id(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    let a = granted(&state, "a").await;
    report(&state, &a, FailureKind::InvalidKey, Duration::ZERO).await;
    runs.crash(state, Duration::from_secs(1));

    assert_eq!(a.key_id, K1.0);
    let state = runs.start(&with_keys(&[("renamed", K1.1, K1.2), K2]));
    assert_eq!(key_state(&state, "renamed").await, KeyState::Disabled);
    let other = granted(&state, "b").await;
    assert_ne!(other.api_key, a.api_key);
    assert_eq!(
        refused_for(acquire(&state, "c").await),
        UnavailableReason::AllLeased
    );
}

/// Guarantee 3: a cooldown runs to its end.
pub async fn a_cooldown_runs_to_its_end(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1]));
    let a = granted(&state, "a").await;
    report(
        &state,
        &a,
        FailureKind::RateLimited,
        Duration::from_secs(600),
    )
    .await;
    runs.crash(state, Duration::from_secs(60));

    let state = runs.start(&with_keys(&[K1]));
    assert_eq!(
        refused_for(acquire(&state, "b").await),
        UnavailableReason::CoolingDown
    );
    let state = runs.restart(state, Duration::from_secs(541));
    granted(&state, "b").await;
}

/// Guarantee 3: a task's exclusion of a key it failed on holds across a restart.
pub async fn a_tasks_exclusions_hold(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    let a = granted(&state, "a").await;
    let held = granted(&state, "holder").await;
    report(&state, &a, FailureKind::RateLimited, Duration::from_secs(1)).await;
    runs.crash(state, Duration::from_secs(2));

    let state = runs.start(&with_keys(&[K1, K2]));
    // The cooldown is over and the key free, but not for the task that failed on it.
    assert!(acquire(&state, "a").await.is_err());
    let b = granted(&state, "b").await;
    assert_eq!(b.key_id, a.key_id);
    assert_ne!(b.key_id, held.key_id);
}

/// A failure reported with its replacement, in one command, survives as both: the failed key
/// disabled, the replacement's lease live under its token, and the task still off the key.
pub async fn a_report_and_its_replacement_survive_together(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    let a = granted(&state, "a").await;
    let report = FailureReport {
        violations: Vec::new(),
        kind: FailureKind::InvalidKey,
        retry_after_ms: None,
        detail: String::new(),
        requests_sent: None,
    };
    let (reported, replacement) = state
        .report_and_replace(
            None,
            (a.lease_id.clone(), a.fencing_token),
            report,
            Duration::ZERO,
            None,
            None,
        )
        .await
        .unwrap();
    let replacement = replacement.unwrap();
    assert_eq!(reported.key.state, KeyState::Disabled);
    assert_ne!(replacement.key_id, a.key_id);
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1, K2]));
    assert_eq!(key_state(&state, &a.key_id).await, KeyState::Disabled);
    assert_eq!(
        key_state(&state, &replacement.key_id).await,
        KeyState::Leased
    );
    // The replacement's holder still renews under its token.
    state
        .run(
            None,
            Command::Renew(Renewal {
                lease_id: replacement.lease_id.clone(),
                fencing_token: replacement.fencing_token,
                ttl_ms: None,
                additional_requests: 0,
                additional_tokens: 0,
            }),
        )
        .await
        .unwrap()
        .into_renewed()
        .unwrap();
    // The one key left is the replacement's.
    assert_eq!(
        refused_for(acquire(&state, "b").await),
        UnavailableReason::AllLeased
    );
}

/// A renewal that waited in line for more requests keeps them: the lease it renewed holds
/// them after a restart, and the books count them.
pub async fn a_renewal_served_in_line_survives(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K4]));
    // p1's three requests a minute: two held by `a`, one by `b`.
    let two = AcquireRequest {
        requests: 2,
        ..ask("a")
    };
    let a = state
        .acquire(None, two, Duration::ZERO, None)
        .await
        .unwrap();
    let b = granted(&state, "b").await;
    let renewing = {
        let (state, a) = (state.clone(), a.clone());
        tokio::spawn(async move {
            let renewal = Renewal {
                lease_id: a.lease_id,
                fencing_token: a.fencing_token,
                ttl_ms: None,
                additional_requests: 1,
                additional_tokens: 0,
            };
            state
                .renew(None, renewal, Duration::from_secs(600), None)
                .await
        })
    };
    while !state.read(|engine, _| engine.has_waiters()).await.unwrap() {
        tokio::task::yield_now().await;
    }
    // `b` sent nothing: its request is the renewal's.
    release(&state, &b, 0).await;
    let renewed = renewing.await.unwrap().unwrap();
    assert_eq!(renewed.requests_granted, 3);
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1, K4]));
    let status = state
        .read(|engine, now| engine.key_status(now, &a.key_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.leases[0].requests_granted, 3);
    assert_eq!(
        refused_for(acquire(&state, "c").await),
        UnavailableReason::QuotaSpent
    );
}

/// Guarantee 4: the books keep every granted request: the window and the day.
pub async fn quota_books_never_forget_a_grant(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    for i in 0..6 {
        let lease = granted(&state, &format!("t{i}")).await;
        release(&state, &lease, 1).await;
    }
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1, K2]));
    assert_eq!(
        refused_for(acquire(&state, "next").await),
        UnavailableReason::QuotaSpent,
        "the minute's window was forgotten"
    );
    let state = runs.restart(state, Duration::from_secs(61));
    for i in 0..4 {
        let lease = granted(&state, &format!("u{i}")).await;
        release(&state, &lease, 1).await;
    }
    runs.crash(state, Duration::from_secs(61));

    let state = runs.start(&with_keys(&[K1, K2]));
    assert_eq!(
        refused_for(acquire(&state, "next").await),
        UnavailableReason::QuotaSpent,
        "the day's count was forgotten"
    );
}

/// Trap 1: a release that handed its key to a waiting acquire replays with that waiter.
pub async fn a_grant_to_a_waiter_survives(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1]));
    let a = granted(&state, "a").await;
    let waiter = {
        let state = state.clone();
        tokio::spawn(async move {
            state
                .acquire(None, ask("w"), Duration::from_secs(600), None)
                .await
        })
    };
    while !state.read(|engine, _| engine.has_waiters()).await.unwrap() {
        tokio::task::yield_now().await;
    }
    release(&state, &a, 1).await;
    let w = waiter.await.unwrap().unwrap();
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1]));
    let status = state
        .read(|engine, now| engine.key_status(now, "k1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.leases.len(), 1);
    assert_eq!(status.leases[0].fencing_token, w.fencing_token);
    assert_eq!(status.leases[0].task_id, "w");
}

/// Trap 1: waiters still queued at the crash are dropped (their callers died with the
/// process): the key a release frees goes to no one.
pub async fn waiters_queued_at_a_crash_are_dropped(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1]));
    let a = granted(&state, "a").await;
    let queued = AcquireRequest {
        wait: true,
        ..ask("w")
    };
    state.run(None, Command::Acquire(queued)).await.unwrap();
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1]));
    assert!(!state.read(|engine, _| engine.has_waiters()).await.unwrap());
    release(&state, &a, 1).await;
    assert_eq!(key_state(&state, "k1").await, KeyState::Available);
}

/// Trap 2: records are replayed under the configuration they were decided under; the new one
/// then applies: a key removed drains (its lease runs on, nothing new is lent on it, and it is
/// gone once that lease ends), a key added is lent, leases of keys kept are honoured.
pub async fn a_new_configuration_applies_to_the_recovered_state(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    let a = granted(&state, "a").await;
    let b = granted(&state, "b").await;
    runs.crash(state, Duration::from_secs(1));

    assert_eq!((a.key_id.as_str(), b.key_id.as_str()), (K1.0, K2.0));
    // b's key leaves; a third key arrives, listed first, so that decisions under the new
    // configuration differ from those under the old one.
    let new = with_keys(&[K3, K1]);
    let state = runs.start(&new);
    assert_eq!(live_leases(&state).await, 2);
    let status = state
        .read(|engine, now| engine.key_status(now, &a.key_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.leases[0].fencing_token, a.fencing_token);
    assert_eq!(key_state(&state, "k2").await, KeyState::Draining);
    let c = granted(&state, "c").await;
    assert_eq!(c.key_id, "k3");
    // The same history again, replayed: the same outcome.
    runs.crash(state, Duration::from_secs(1));
    let state = runs.start(&new);
    assert_eq!(live_leases(&state).await, 3);
    assert_eq!(key_state(&state, "k3").await, KeyState::Leased);
    assert_eq!(key_state(&state, "k2").await, KeyState::Draining);
    // Its last lease ended, the key is gone, and stays gone after a restart.
    release(&state, &b, 1).await;
    let gone = state
        .read(|engine, now| engine.key_status(now, "k2"))
        .await
        .unwrap();
    assert!(gone.is_err(), "{gone:?}");
    runs.crash(state, Duration::from_secs(1));
    let state = runs.start(&new);
    let gone = state
        .read(|engine, now| engine.key_status(now, "k2"))
        .await
        .unwrap();
    assert!(gone.is_err(), "{gone:?}");
    assert_eq!(live_leases(&state).await, 2);
}

/// Trap 2: limits changed between runs apply at once to what the books already hold.
pub async fn new_limits_apply_to_the_books_at_once(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1]));
    for task in ["a", "b"] {
        let lease = granted(&state, task).await;
        release(&state, &lease, 1).await;
    }
    runs.crash(state, Duration::from_secs(1));

    let lowered = with_keys(&[K1]).replace("requests_per_minute = 3", "requests_per_minute = 2");
    let state = runs.start(&lowered);
    assert_eq!(
        refused_for(acquire(&state, "c").await),
        UnavailableReason::QuotaSpent,
        "the two requests of the last minute were held to the old limit"
    );
}

/// Guarantee 8: what the provider's 429s taught survives: a figure named, and a limit lowered
/// by a 429 without one.
pub async fn learned_limits_survive(reopen: Reopen) {
    let mut runs = Runs::new(reopen);
    let state = runs.start(&with_keys(&[K1, K2]));
    let a = granted(&state, "a").await;
    let named = QuotaViolation {
        kind: Some(LimitKind::RequestsPerDay),
        quota_id: "GenerateRequestsPerDayPerProjectPerModel-FreeTier".into(),
        model: "m".into(),
        value: Some(4),
    };
    let refused = FailureKind::DailyQuotaExhausted;
    report_with(&state, &a, refused, Duration::ZERO, vec![named]).await;
    let b = granted(&state, "b").await;
    assert_ne!(b.project, a.project);
    report_with(
        &state,
        &b,
        FailureKind::RateLimited,
        Duration::ZERO,
        Vec::new(),
    )
    .await;
    runs.crash(state, Duration::from_secs(1));

    let state = runs.start(&with_keys(&[K1, K2]));
    let groups = state
        .read(|engine, now| engine.status(now, None, None, 10))
        .await
        .unwrap()
        .unwrap()
        .groups;
    let learned = |project: &str, kind: LimitKind| {
        let group = groups.iter().find(|g| g.project == project).unwrap();
        group.limits[kind as usize].learned.map(|l| l.value)
    };
    assert_eq!(learned(&a.project, LimitKind::RequestsPerDay), Some(4));
    // One bare 429 is no limit (it once lowered the group to 1): only the evidence is kept.
    assert_eq!(learned(&b.project, LimitKind::RequestsPerMinute), None);
    let last = groups.iter().find(|g| g.project == b.project).unwrap();
    assert_eq!(last.last_429.as_ref().unwrap().task_id, "b");
}

/// One `#[tokio::test]` per behaviour of the suite, on the store `reopen()` opens.
#[macro_export]
macro_rules! conformance_tests {
    ($reopen:expr) => {
        $crate::conformance_tests!(@each $reopen;
            an_acknowledged_lease_is_honoured,
            fencing_tokens_never_repeat_across_restarts,
            a_stale_token_is_refused_after_a_restart,
            a_disabled_key_stays_disabled_under_any_id,
            a_cooldown_runs_to_its_end,
            a_tasks_exclusions_hold,
            a_report_and_its_replacement_survive_together,
            a_renewal_served_in_line_survives,
            quota_books_never_forget_a_grant,
            learned_limits_survive,
            a_grant_to_a_waiter_survives,
            waiters_queued_at_a_crash_are_dropped,
            a_new_configuration_applies_to_the_recovered_state,
            new_limits_apply_to_the_books_at_once,
        );
    };
    (@each $reopen:expr; $($name:ident,)*) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::store::conformance::$name($reopen).await;
            }
        )*
    };
}
