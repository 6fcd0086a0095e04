//! The engine's shell: the engine behind one mutex, the clock, the store's journal, the
//! channels of waiting acquires, the event broadcast, and the timer that ticks the engine at its
//! next deadline. Every state change is a [`Command`] applied under the lock, its record queued
//! for the store in the same critical section (log order is apply order), and its notices
//! carried out before the lock is let go, so a grant to a waiter and that waiter giving up can
//! never cross. Replies, grants and events are released once their record is durable.
//!
//! A std mutex, not tokio's: nothing awaits under it and each critical section is one command.
//!
//! - [`open`]: opening and recovering the state, and the setup a configuration makes.
//! - [`waiting`]: acquires that wait, and grants handed back when their caller left.
//! - [`log`]: each event logged as one line.

mod log;
mod open;
mod waiting;

use log::log;
pub use open::{OpenError, Opening, Recovered, token_floor};
use open::{attest_listed_models, setup_of};

use crate::clock::Clock;
use crate::config::tenants::{Decided, TenantError, Tenants};
use crate::config::{ConnectionLimits, Settings, StateLocation};
use crate::metrics::Metrics;
use crate::secret::{FingerprintKey, Redactor};
use crate::store::embedded::{EmbeddedStore, StateDir};
use crate::store::journal::{Journal, StoreFailed};
use crate::store::{self, Store, StoreError};
use keylease_core::ApiKey;
use keylease_engine::layout::{Snapshot, encode_record};
use keylease_engine::tenants::{Caller, Priority};
use keylease_engine::{
    AcquireRequest, Acquired, Command, Engine, EngineError, Event, EventKind, FailureReport,
    KeyView, LeaseView, Notices, Reconfigured, Renewal, Renewed, Reply, Reported, Setup,
    SetupError, Time, Unavailable, WaiterId,
};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::pending;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;

/// How many events a slow `WatchEvents` stream may fall behind before it is told it missed some.
const EVENT_BUFFER: usize = 4096;
/// Longest the timer sleeps while acquires wait: a line may wait for the day to turn, which the
/// engine foresees from the wall clock, and a stepped wall clock must be followed this soon.
const CALENDAR_RECHECK: Duration = Duration::from_secs(1);
/// Records between snapshots: bounds how much of the log a restart replays.
pub const SNAPSHOT_EVERY: u64 = 100_000;
/// Records replayed at start-up above which a snapshot is taken at once, so that a server
/// restarted often never replays a long log.
const REPLAY_WORTH_A_SNAPSHOT: u64 = 1_000;
/// Fencing tokens handed out per millisecond of wall time that a restart without state
/// ([`token_floor`]) can never reach again.
const TOKENS_PER_MS: u64 = 1_000;

/// Why an acquire, a failure report's replacement or a renewal that asked for more got no lease.
#[derive(Debug)]
pub enum AcquireFailure {
    Invalid(EngineError),
    Unavailable(Unavailable),
    ShuttingDown,
    Store(StoreFailed),
}

impl From<EngineError> for AcquireFailure {
    fn from(error: EngineError) -> Self {
        Self::Invalid(error)
    }
}

impl From<StoreFailed> for AcquireFailure {
    fn from(failure: StoreFailed) -> Self {
        Self::Store(failure)
    }
}

/// Longest error message sent, in bytes: it travels in a header (`grpc-message`), which
/// clients bound (16 KiB by default) and fail on as a transport error beyond.
const MAX_MESSAGE_BYTES: usize = 2048;

type WaiterOutcome = Result<LeaseView, Unavailable>;

/// An acquire in line, as the shell knows it.
struct Waiter {
    /// Where its outcome goes, with the record it must wait for.
    outcome: oneshot::Sender<(WaiterOutcome, u64)>,
    /// Who asked: the grant is theirs.
    by: Option<Arc<str>>,
}

/// An event as the server publishes it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The record that made it: it may be shown once that is durable.
    pub seq: u64,
    pub event: Event,
    /// The caller whose call made it happen; `None` for the server's own doings (expiries,
    /// a day turning, a grant whose caller left going back).
    pub by: Option<Arc<str>>,
}

struct Inner {
    engine: Engine,
    /// Where to send each waiter's outcome, with the record it must wait for.
    waiters: HashMap<WaiterId, Waiter>,
    /// The last record queued for the store.
    last_seq: u64,
    /// Records queued since the last snapshot.
    since_snapshot: u64,
}

pub struct State {
    inner: Mutex<Inner>,
    clock: Clock,
    /// Events with the record that made them.
    events: broadcast::Sender<Published>,
    /// Wakes the timer when the engine's next deadline moved earlier.
    timer: Notify,
    /// The deadline the timer sleeps until (`u64::MAX`: none).
    timer_target: AtomicU64,
    shutdown: CancellationToken,
    /// Longest an acquire or a renewal may wait.
    pub max_wait: Duration,
    /// Masks every configured secret (keys and auth tokens) in free text; replaced by a reload.
    redactor: RwLock<Arc<Redactor>>,
    /// The teams sharing the keys, which decide each call's caller; replaced by a reload.
    tenants: RwLock<Arc<Tenants>>,
    /// Every secret configured since start: one removed by a reload may still be in a client's
    /// hands and so in what it writes, and stays masked.
    secrets: Mutex<HashSet<ApiKey>>,
    /// Keys the fingerprints of secrets (see [`Opening::fingerprint_key`]).
    fingerprint_key: FingerprintKey,
    metrics: Arc<Metrics>,
    /// What clients may hold of the server.
    pub limits: ConnectionLimits,
    /// `None`: ephemeral, nothing is kept.
    journal: Option<Arc<Journal>>,
    snapshot_every: u64,
    /// Reads wait for the store to confirm it may still write (a replica's leadership), so a
    /// deposed leader never shows a lease as held.
    confirm_reads: bool,
}

impl State {
    /// Masks secrets in free text from clients before it is stored or shown.
    pub fn redactor(&self) -> Arc<Redactor> {
        self.redactor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The caller of a call by `by` that named tenant `named` and asked for class `asked` (see
    /// [`Tenants::caller`]).
    pub fn decide_caller(
        &self,
        by: Option<&Arc<str>>,
        named: &str,
        asked: Option<Priority>,
    ) -> Result<Decided, TenantError> {
        let tenants = self
            .tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tenants.caller(by.map_or(crate::auth::ANONYMOUS, |b| b), named, asked)
    }

    /// `command`, made for `caller` where there is one (tenants configured).
    pub fn for_caller(command: Command, caller: Option<Caller>) -> Command {
        match caller {
            Some(caller) => command.for_caller(caller),
            None => command,
        }
    }

    /// `text` with any secret in it masked.
    pub fn redact(&self, text: String) -> String {
        match self.redactor().redact(&text) {
            Cow::Borrowed(_) => text,
            Cow::Owned(masked) => masked,
        }
    }

    /// The status as it may leave: errors quote what clients sent, so any secret in the
    /// message is masked and the message is cut to fit a header.
    pub fn outgoing<T>(&self, result: Result<T, tonic::Status>) -> Result<T, tonic::Status> {
        result.map_err(|status| {
            let message = self.redactor().redact(status.message()).into_owned();
            let fitting = keylease::truncate_on_char_boundary(&message, MAX_MESSAGE_BYTES);
            if message == status.message() && fitting.len() == message.len() {
                return status;
            }
            let cut = if fitting.len() < message.len() {
                "…"
            } else {
                ""
            };
            tonic::Status::with_details_and_metadata(
                status.code(),
                format!("{fitting}{cut}"),
                status.details().to_vec().into(),
                status.metadata().clone(),
            )
        })
    }

    /// Applies the keys, pools and limits of `settings` (a reload) by caller `by`: live leases
    /// carry on, keys no longer configured drain. Secrets of the new keys are masked from now on.
    pub async fn reconfigure(
        &self,
        by: Option<&Arc<str>>,
        settings: &Settings,
    ) -> Result<Result<Reconfigured, SetupError>, StoreFailed> {
        // Masked before any command could quote them.
        let redactor = {
            let mut secrets = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
            secrets.extend(settings.secrets().cloned());
            Redactor::new(secrets.iter()).with_token_hashes(settings.token_hashes())
        };
        *self
            .redactor
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(redactor);
        *self.tenants.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(settings.tenants.clone());
        attest_listed_models(&self.metrics, settings);
        let setup = setup_of(settings, &self.fingerprint_key, self.clock.now());
        Ok(self
            .run(by, Command::Configure(setup))
            .await?
            .into_configured())
    }

    /// Publishes an event that no command made (a reload's report) as caller `by`'s.
    pub fn publish(&self, by: Option<&Arc<str>>, kind: EventKind) {
        let inner = self.lock();
        let event = Event {
            at: self.clock.now(),
            kind,
        };
        let by: Option<Arc<str>> = by.cloned();
        log(&event, by.as_deref());
        let _ = self.events.send(Published {
            seq: inner.last_seq,
            event,
            by,
        });
    }

    /// The steady reading of the clock: what the engine's instants are in.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Both readings of the clock.
    pub fn time(&self) -> Time {
        self.clock.now()
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Whether `pool` serves `model` now (listed, or remembered from an earlier lease):
    /// a lease on it makes the engine remember nothing new.
    pub fn serves_model(&self, pool: &str, model: &str) -> bool {
        self.lock().engine.serves(pool, model)
    }

    /// Where what happens is counted.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store's journal, when the state is kept.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Without a store, the engine keeps its invariants between commands and a panic inside
        // one (a bug) must not stop everyone else from being served. With one, a panic inside
        // `apply` aborts the process before the lock is let go (see `apply_locked`).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one command at the current time and queues its record; the caller carries out
    /// the notices.
    fn apply_locked(&self, inner: &mut Inner, command: Command) -> (Reply, Notices) {
        let time = self.clock.now();
        let record = self.journal.as_ref().map(|_| encode_record(time, &command));
        let _abort = self.journal.as_ref().map(|_| AbortOnPanic);
        let applied = inner.engine.apply(time, command);
        if let (Some(journal), Some(record)) = (&self.journal, record) {
            inner.last_seq += 1;
            journal.push(inner.last_seq, record);
            inner.since_snapshot += 1;
            if inner.since_snapshot >= self.snapshot_every {
                inner.since_snapshot = 0;
                journal.push_snapshot(Snapshot::of(&inner.engine, inner.last_seq));
            }
        }
        applied
    }

    /// Resolves once record `seq` would survive a crash.
    async fn durable(&self, seq: u64) -> Result<(), StoreFailed> {
        match &self.journal {
            None => Ok(()),
            Some(journal) => journal.wait(seq).await,
        }
    }

    /// Applies a command and carries out what it decided, without waiting for the store: for
    /// the shell's own commands, which nobody waits on.
    fn execute(&self, command: Command) {
        let mut inner = self.lock();
        let (_, notices) = self.apply_locked(&mut inner, command);
        self.carry_out(&mut inner, notices, None);
    }

    /// Applies one command of caller `by` at the current time, carries out what it decided,
    /// and answers once its record is durable.
    pub async fn run(&self, by: Option<&Arc<str>>, command: Command) -> Result<Reply, StoreFailed> {
        let (reply, seq) = {
            let mut inner = self.lock();
            let (reply, notices) = self.apply_locked(&mut inner, command);
            self.carry_out(&mut inner, notices, by);
            (reply, inner.last_seq)
        };
        self.durable(seq).await?;
        Ok(reply)
    }

    /// Disables a key (its `reason` masked: status and events show it) or enables it, as
    /// caller `by`.
    pub async fn set_key_enabled(
        &self,
        by: Option<&Arc<str>>,
        key_id: String,
        enabled: bool,
        reason: String,
    ) -> Result<Result<KeyView, EngineError>, StoreFailed> {
        let command = Command::SetKeyEnabled {
            key_id,
            enabled,
            reason: self.redact(reason),
        };
        Ok(self.run(by, command).await?.into_key_set())
    }

    /// Reads the engine as it is now (ticked first when due), once what it shows is durable.
    pub async fn read<R>(&self, read: impl FnOnce(&Engine, Time) -> R) -> Result<R, StoreFailed> {
        let (result, seq) = {
            let mut inner = self.lock();
            let now = self.clock.now();
            if inner.engine.tick_due(now) {
                let (_, notices) = self.apply_locked(&mut inner, Command::Tick);
                self.carry_out(&mut inner, notices, None);
            }
            (read(&inner.engine, now), inner.last_seq)
        };
        self.durable(seq).await?;
        if let (true, Some(journal)) = (self.confirm_reads, &self.journal) {
            journal.confirm().await?;
        }
        Ok(result)
    }

    /// Sends waiters their outcome, streams events (each by the caller `by` whose command made
    /// it, a waiter's grant or renewal by that waiter's), and moves the timer if needed. A grant
    /// whose waiter is gone goes straight back, by a command of its own.
    fn carry_out(&self, inner: &mut Inner, mut notices: Notices, by: Option<&Arc<str>>) {
        let mut by: Option<Arc<str>> = by.cloned();
        while !notices.is_empty() {
            let seq = inner.last_seq;
            let waiter_of = |served: &[(WaiterId, LeaseView)], lease_id: &str| {
                served
                    .iter()
                    .find(|(_, lease)| lease.lease_id == lease_id)
                    .and_then(|(id, _)| inner.waiters.get(id))
                    .map(|waiter| waiter.by.clone())
            };
            for event in notices.events {
                let served = match &event.kind {
                    EventKind::Granted(lease) => Some((&notices.waiter_grants, lease)),
                    EventKind::Renewed(lease) => Some((&notices.waiter_renewals, lease)),
                    _ => None,
                };
                let by = match served {
                    Some((served, lease)) if !served.is_empty() => {
                        waiter_of(served, &lease.lease.lease_id).unwrap_or_else(|| by.clone())
                    }
                    _ => by.clone(),
                };
                log(&event, by.as_deref());
                self.metrics.event(&event.kind);
                // No subscriber is fine.
                let _ = self.events.send(Published { seq, event, by });
            }
            let mut more = Notices::default();
            for (id, lease) in notices.waiter_grants {
                let undelivered = match inner.waiters.remove(&id) {
                    Some(waiter) => waiter
                        .outcome
                        .send((Ok(lease), seq))
                        .err()
                        .and_then(|(o, _)| o.ok()),
                    None => Some(lease),
                };
                if let Some(lease) = undelivered {
                    let hand_back = Command::HandBack {
                        lease_id: lease.lease_id,
                        fencing_token: lease.fencing_token,
                    };
                    let (_, handed_back) = self.apply_locked(inner, hand_back);
                    more.extend(handed_back);
                }
            }
            for (id, lease) in notices.waiter_renewals {
                // The lease is its holder's whether or not the answer reaches them.
                if let Some(waiter) = inner.waiters.remove(&id) {
                    let _ = waiter.outcome.send((Ok(lease), seq));
                }
            }
            for (id, unavailable) in notices.waiter_failures {
                if let Some(waiter) = inner.waiters.remove(&id) {
                    let _ = waiter.outcome.send((Err(unavailable), seq));
                }
            }
            notices = more;
            // What follows is the server handing back grants nobody took.
            by = None;
        }
        if let Some(next) = inner.engine.next_wakeup_ms()
            && next < self.timer_target.load(Ordering::Acquire)
        {
            self.timer_target.store(next, Ordering::Release);
            self.timer.notify_one();
        }
    }

    /// Sleeps until the clock reads `at_ms`.
    pub fn sleep_until_ms(&self, at_ms: u64) -> tokio::time::Sleep {
        tokio::time::sleep_until(self.clock.instant_at(at_ms))
    }

    /// Every event from now on, each with the record that made it (see [`State::durable_event`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.events.subscribe()
    }

    /// Resolves once the record that made an event is durable: only then may it be shown.
    pub async fn durable_event(&self, seq: u64) -> Result<(), StoreFailed> {
        self.durable(seq).await
    }

    /// Resolves when the server starts shutting down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waiters get `UNAVAILABLE`, event streams end, the timer stops.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Writes a last snapshot and what is queued, and stops the store (after serving ended).
    pub fn close(&self) {
        if let Some(journal) = &self.journal {
            {
                let inner = self.lock();
                if inner.since_snapshot > 0 {
                    journal.push_snapshot(Snapshot::of(&inner.engine, inner.last_seq));
                }
            }
            journal.close();
        }
    }

    /// Resolves when the store stops writing (never, without a store): the server must then
    /// stop, as it can acknowledge nothing more.
    pub async fn store_stopped(&self) {
        match &self.journal {
            Some(journal) => journal.stopped().await,
            None => pending().await,
        }
    }

    /// Why the store stopped writing, if it did: the server must then stop.
    pub fn store_failure(&self) -> Option<StoreFailed> {
        self.journal.as_ref().and_then(|journal| journal.failure())
    }

    /// Ticks the engine at each of its deadlines until shutdown; nothing polls.
    pub async fn run_timer(self: Arc<Self>) {
        loop {
            let (next, waiters) = {
                let inner = self.lock();
                (inner.engine.next_wakeup_ms(), inner.engine.has_waiters())
            };
            let next = if waiters {
                let recheck = self.clock.now_ms() + CALENDAR_RECHECK.as_millis() as u64;
                Some(next.map_or(recheck, |at| at.min(recheck)))
            } else {
                next
            };
            self.timer_target
                .store(next.unwrap_or(u64::MAX), Ordering::Release);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(self.clock.instant_at(at)).await,
                    None => pending().await,
                }
            };
            tokio::select! {
                () = sleep => self.execute(Command::Tick),
                () = self.timer.notified() => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }
}

impl Drop for State {
    /// Stops the committer once what is queued is written, releasing the store.
    fn drop(&mut self) {
        if let Some(journal) = &self.journal {
            journal.close();
        }
    }
}

/// Aborts the process if dropped while a panic unwinds: with a store, a command half applied
/// must never be served, nor its record written.
struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keylease: a command panicked while being applied; aborting");
            std::process::abort();
        }
    }
}

/// Gauges at a scrape read the whole status as it is now.
impl crate::metrics::StatusSource for State {
    fn status(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<keylease_engine::StatusView>> + Send + '_>>
    {
        Box::pin(async move {
            self.read(|engine, now| engine.status(now, None, None, usize::MAX))
                .await
                .ok()?
                .ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Overrides};
    use crate::store::testing::HookedStore;

    fn state(config: &str) -> Arc<State> {
        state_at(config, 1_773_086_400_000)
    }

    /// An ephemeral state whose clock starts at `start_ms`.
    fn state_at(config: &str, start_ms: u64) -> Arc<State> {
        let settings = settings_of(config);
        State::open(&settings, Clock::starting_at(start_ms), false)
            .unwrap()
            .0
    }

    /// The settings of this configuration text, ephemeral.
    fn settings_of(config: &str) -> Settings {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keylease-state-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keylease.toml");
        std::fs::write(&path, config).unwrap();
        let ephemeral = Overrides {
            ephemeral: true,
            ..Overrides::default()
        };
        let settings = config::load(Some(&path), &HashMap::new(), &ephemeral).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        settings
    }

    fn ask(task: &str) -> AcquireRequest {
        AcquireRequest {
            task_id: task.into(),
            model: "m".into(),
            ttl_ms: Some(1_000),
            ..Default::default()
        }
    }

    /// A waiter on a project resting for the day is served within a second of the wall clock
    /// being stepped past midnight, though no command comes and the steady clock barely moves.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_follows_a_stepped_wall_clock_within_a_second() {
        let state = state(
            "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n[[keys]]\nid = \"k1\"\nsecret = \"fake-key-1\"\n",
        );
        tokio::spawn(state.clone().run_timer());
        let lease = state
            .acquire(None, ask("a"), Duration::ZERO, None)
            .await
            .unwrap();
        let report = keylease_engine::FailureReport {
            violations: Vec::new(),
            kind: keylease_engine::FailureKind::DailyQuotaExhausted,
            retry_after_ms: None,
            detail: String::new(),
            requests_sent: None,
        };
        state
            .run(
                None,
                Command::ReportFailure {
                    lease_id: lease.lease_id,
                    fencing_token: lease.fencing_token,
                    report,
                },
            )
            .await
            .unwrap()
            .into_reported()
            .unwrap();
        let waiter = {
            let state = state.clone();
            tokio::spawn(async move {
                state
                    .acquire(None, ask("b"), Duration::from_secs(3_600), None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        // 13:00 in Los Angeles: midnight is eleven hours away; NTP steps the clock past it.
        state.clock().step_wall(11 * 3_600_000);
        tokio::time::sleep(CALENDAR_RECHECK + Duration::from_millis(10)).await;
        assert!(
            waiter.is_finished(),
            "the waiter still waits a second after the step"
        );
        assert_eq!(waiter.await.unwrap().unwrap().key_id, "k1");
    }

    /// A renewal that asks for more than the minute has left waits for it in line, within its
    /// wait: refused when the wait ends first, granted once another lease gives a request back,
    /// and out of line when its caller leaves.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_waits_for_the_quota_it_asks_for_within_its_wait() {
        let state = state(
            "[key_sources]\nenvironment = false\n[quota]\nsafety_margin = \"0s\"\n[pools.gemini.models.m]\nrequests_per_minute = 3\n[[keys]]\nid = \"k1\"\nproject = \"p\"\nsecret = \"fake-key-1\"\n[[keys]]\nid = \"k2\"\nproject = \"p\"\nsecret = \"fake-key-2\"\n",
        );
        tokio::spawn(state.clone().run_timer());
        let long = |task| AcquireRequest {
            ttl_ms: Some(90_000),
            ..ask(task)
        };
        let lease = state
            .acquire(None, long("a"), Duration::ZERO, None)
            .await
            .unwrap();
        let other = state
            .acquire(None, long("b"), Duration::ZERO, None)
            .await
            .unwrap();
        let more = || Renewal {
            lease_id: lease.lease_id.clone(),
            fencing_token: lease.fencing_token,
            ttl_ms: None,
            additional_requests: 1,
            additional_tokens: 0,
        };
        let renewed = state
            .renew(None, more(), Duration::ZERO, None)
            .await
            .unwrap();
        assert_eq!(renewed.requests_granted, 2);

        let began = state.now_ms();
        let refused = state
            .renew(None, more(), Duration::from_secs(10), None)
            .await;
        assert!(
            matches!(&refused, Err(AcquireFailure::Unavailable(u)) if u.reason == keylease_engine::UnavailableReason::QuotaSpent),
            "{refused:?}"
        );
        assert_eq!(state.now_ms() - began, 10_000);

        // A renewal whose caller leaves takes itself out of line; the lease stays its holder's.
        let leaving = {
            let (state, renewal) = (state.clone(), more());
            tokio::spawn(async move {
                state
                    .renew(None, renewal, Duration::from_secs(120), None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let waits = || state.read(|engine, _| engine.has_waiters());
        assert!(waits().await.unwrap());
        leaving.abort();
        assert!(leaving.await.unwrap_err().is_cancelled());
        assert!(!waits().await.unwrap());
        let key = state
            .read(|engine, now| engine.key_status(now, &lease.key_id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key.leases[0].requests_granted, 2);

        // Room comes when the other lease ends unused, ten seconds on: the renewal wakes then.
        let waiting = {
            let (state, renewal) = (state.clone(), more());
            tokio::spawn(async move {
                state
                    .renew(None, renewal, Duration::from_secs(120), None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiting.is_finished());
        let unused = Command::Release {
            lease_id: other.lease_id,
            fencing_token: other.fencing_token,
            usage: keylease_engine::Usage {
                requests_sent: Some(0),
                input_tokens: Some(0),
            },
        };
        state.run(None, unused).await.unwrap();
        let began = state.now_ms();
        let renewed = waiting.await.unwrap().unwrap();
        assert_eq!(renewed.requests_granted, 3);
        assert_eq!(state.now_ms(), began);
    }

    /// Without a state directory the tokens still never repeat: a restart a millisecond later
    /// starts above what the earlier run handed out.
    #[tokio::test]
    async fn ephemeral_restarts_never_repeat_a_fencing_token() {
        let config = "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n[[keys]]\nid = \"k1\"\nsecret = \"fake-key-1\"\nmax_leases = 100\n";
        let first = state(config);
        let mut tokens = Vec::new();
        for i in 0..3 {
            let lease = first
                .acquire(None, ask(&format!("t{i}")), Duration::ZERO, None)
                .await
                .unwrap();
            tokens.push(lease.fencing_token);
        }
        let later = state_at(config, first.time().wall_ms + 1);
        let lease = later
            .acquire(None, ask("t"), Duration::ZERO, None)
            .await
            .unwrap();
        assert!(
            tokens.iter().all(|&t| t < lease.fencing_token),
            "{tokens:?} then {}",
            lease.fencing_token
        );
    }

    /// Once the disk fails, no call is acknowledged: each gets the failure, and the state says
    /// it stopped, for the server to stop.
    #[tokio::test]
    async fn after_the_disk_fails_calls_get_the_failure_and_the_server_is_told() {
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let settings = settings_of(
            "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n[[keys]]\nid = \"k1\"\nsecret = \"fake-key-1\"\nmax_leases = 10\n",
        );
        let store = {
            let broken = broken.clone();
            HookedStore::new(move || match broken.load(Ordering::Relaxed) {
                true => Err("Input/output error".into()),
                false => Ok(()),
            })
        };
        let key = FingerprintKey::from_bytes([1; FingerprintKey::LEN]);
        let clock = Clock::starting_at(1_773_086_400_000);
        let (state, _) =
            State::open_on(&settings, clock, Some(Box::new(store)), key, u64::MAX).unwrap();
        state
            .acquire(None, ask("a"), Duration::ZERO, None)
            .await
            .unwrap();

        broken.store(true, Ordering::Relaxed);
        match state.acquire(None, ask("b"), Duration::ZERO, None).await {
            Err(AcquireFailure::Store(failed)) => {
                assert!(
                    failed.to_string().contains("Input/output error"),
                    "{failed}"
                )
            }
            other => panic!("acknowledged after the disk failed: {other:?}"),
        }
        state.store_stopped().await;
        assert!(state.store_failure().is_some());
        let status = state.read(|engine, now| engine.counts(now)).await;
        assert!(
            status.is_err(),
            "a read showed state the disk does not hold"
        );
    }

    /// A caller that goes away while its new lease is being committed never holds the key.
    #[tokio::test(flavor = "current_thread")]
    async fn a_grant_whose_caller_left_before_it_was_durable_goes_back() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let config = "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n[[keys]]\nid = \"k1\"\nsecret = \"fake-key-1\"\n";
        let settings = settings_of(config);
        let store = {
            let gate = gate.clone();
            HookedStore::new(move || {
                let (open, opened) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = opened.wait(open).unwrap();
                }
                Ok(())
            })
        };
        let key = FingerprintKey::from_bytes([1; FingerprintKey::LEN]);
        let clock = Clock::starting_at(1_773_086_400_000);
        let (state, _) =
            State::open_on(&settings, clock, Some(Box::new(store)), key, u64::MAX).unwrap();
        let caller = {
            let state = state.clone();
            tokio::spawn(async move { state.acquire(None, ask("a"), Duration::ZERO, None).await })
        };
        // The caller runs until it waits for the commit, then goes away.
        tokio::task::yield_now().await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        {
            let (open, opened) = &*gate;
            *open.lock().unwrap() = true;
            opened.notify_all();
        }
        let live = state
            .read(|engine, now| engine.status(now, None, None, 1).unwrap().live_leases)
            .await
            .unwrap();
        assert_eq!(live, 0, "the lease of a caller that left is still held");
    }

    /// No timer task runs here: only the waiter's own deadline brings the engine to the moment
    /// the holder's lease expires, which serves the waiter as it leaves.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_served_as_its_deadline_passes_gets_the_lease() {
        let state = state(
            "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n[[keys]]\nid = \"k1\"\nsecret = \"fake-key-1\"\n",
        );
        let held = state
            .acquire(None, ask("holder"), Duration::ZERO, None)
            .await
            .unwrap();
        let waited = state
            .acquire(None, ask("waiter"), Duration::from_millis(1_000), None)
            .await;
        let lease = waited.unwrap_or_else(|failure| panic!("no lease: {failure:?}"));
        assert_eq!(lease.key_id, "k1");
        assert!(lease.fencing_token > held.fencing_token);
    }
}
