//! The engine's shell: the engine behind one mutex, the clock, the channels of waiting acquires,
//! the event broadcast, and the timer that ticks the engine at its next deadline. Every engine
//! command runs under the lock with its notices carried out before the lock is let go, so a grant
//! to a waiter and that waiter giving up can never cross.
//!
//! A std mutex, not tokio's: nothing awaits under it and each critical section is one command.

use crate::clock::Clock;
use crate::config::{ConnectionLimits, Settings};
use crate::engine::{
    AcquireRequest, Acquired, Engine, EngineError, Event, EventKind, LeaseView, Notices,
    SetupError, Time, Unavailable, Usage, WaiterId,
};
use crate::secret::{ApiKey, Redactor};
use std::collections::HashMap;
use std::future::pending;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;

/// How many events a slow `WatchEvents` stream may fall behind before it is told it missed some.
const EVENT_BUFFER: usize = 4096;
/// Longest the timer sleeps while acquires wait: a line may wait for the day to turn, which the
/// engine foresees from the wall clock, and a stepped wall clock must be followed this soon.
const CALENDAR_RECHECK: Duration = Duration::from_secs(1);

/// Why an acquire got no lease.
#[derive(Debug)]
pub enum AcquireFailure {
    Invalid(EngineError),
    Unavailable(Unavailable),
    ShuttingDown,
}

impl From<EngineError> for AcquireFailure {
    fn from(error: EngineError) -> Self {
        Self::Invalid(error)
    }
}

type WaiterOutcome = Result<LeaseView, Unavailable>;

struct Inner {
    engine: Engine,
    /// Where to send each waiter's lease.
    waiters: HashMap<WaiterId, oneshot::Sender<WaiterOutcome>>,
}

pub struct State {
    inner: Mutex<Inner>,
    clock: Clock,
    events: broadcast::Sender<Event>,
    /// Wakes the timer when the engine's next deadline moved earlier.
    timer: Notify,
    /// The deadline the timer sleeps until (`u64::MAX`: none).
    timer_target: AtomicU64,
    shutdown: CancellationToken,
    /// Longest an acquire or a renewal may wait.
    pub max_wait: Duration,
    auth_tokens: Vec<ApiKey>,
    /// Masks every configured secret (keys and auth tokens) in free text.
    redactor: Redactor,
    /// What clients may hold of the server.
    pub limits: ConnectionLimits,
}

impl State {
    pub fn new(settings: &Settings, clock: Clock) -> Result<Arc<Self>, SetupError> {
        let engine = Engine::new(settings.engine.clone(), settings.keys.clone(), clock.now())?;
        let redactor = Redactor::new(
            settings
                .keys
                .iter()
                .map(|key| &key.secret)
                .chain(&settings.auth_tokens),
        );
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                engine,
                waiters: HashMap::new(),
            }),
            clock,
            events: broadcast::channel(EVENT_BUFFER).0,
            timer: Notify::new(),
            timer_target: AtomicU64::new(u64::MAX),
            shutdown: CancellationToken::new(),
            max_wait: settings.max_wait,
            auth_tokens: settings.auth_tokens.clone(),
            redactor,
            limits: settings.limits,
        }))
    }

    /// Bearer tokens callers must present; empty: no check.
    pub fn auth_tokens(&self) -> &[ApiKey] {
        &self.auth_tokens
    }

    /// Masks secrets in free text from clients before it is stored or shown.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The engine keeps its invariants between commands; a panic inside one is a bug that
        // must not stop everyone else from being served.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one engine command at the current time and carries out what it decided.
    pub fn run<R>(&self, command: impl FnOnce(&mut Engine, Time) -> R) -> R {
        let mut inner = self.lock();
        let result = command(&mut inner.engine, self.clock.now());
        self.carry_out(&mut inner);
        result
    }

    /// Sends waiters their outcome, streams events, and moves the timer if needed.
    fn carry_out(&self, inner: &mut Inner) {
        loop {
            let notices: Notices = inner.engine.drain();
            if notices.events.is_empty()
                && notices.waiter_grants.is_empty()
                && notices.waiter_failures.is_empty()
            {
                break;
            }
            for event in notices.events {
                log(&event);
                // No subscriber is fine.
                let _ = self.events.send(event);
            }
            for (id, lease) in notices.waiter_grants {
                let undelivered = match inner.waiters.remove(&id) {
                    Some(sender) => sender.send(Ok(lease)).err().and_then(Result::ok),
                    None => Some(lease),
                };
                if let Some(lease) = undelivered {
                    // Its caller is gone: the key goes straight back, unused.
                    let now = self.clock.now();
                    let _ = inner.engine.release(
                        now,
                        &lease.lease_id,
                        lease.fencing_token,
                        Usage::UNUSED,
                    );
                }
            }
            for (id, unavailable) in notices.waiter_failures {
                if let Some(sender) = inner.waiters.remove(&id) {
                    let _ = sender.send(Err(unavailable));
                }
            }
        }
        if let Some(next) = inner.engine.next_wakeup_ms()
            && next < self.timer_target.load(Ordering::Acquire)
        {
            self.timer_target.store(next, Ordering::Release);
            self.timer.notify_one();
        }
    }

    /// Lends a key, waiting up to `wait` for one in first-come-first-served order.
    pub async fn acquire(
        &self,
        mut request: AcquireRequest,
        wait: Duration,
    ) -> Result<LeaseView, AcquireFailure> {
        request.wait = !wait.is_zero();
        let now = self.clock.now();
        let (waiter, receiver) = {
            let mut inner = self.lock();
            let outcome = inner.engine.acquire(now, request);
            // Only a caller that waits needs a channel; it is registered under the same lock
            // as the acquire, so no grant can be sent before it is there.
            let receiver = match outcome {
                Ok(Acquired::Queued(id)) => {
                    let (sender, receiver) = oneshot::channel();
                    inner.waiters.insert(id, sender);
                    Some(receiver)
                }
                _ => None,
            };
            self.carry_out(&mut inner);
            match (outcome?, receiver) {
                (Acquired::Granted(lease), _) => return Ok(lease),
                (Acquired::Unavailable(unavailable), _) => {
                    return Err(AcquireFailure::Unavailable(unavailable));
                }
                (Acquired::Queued(id), Some(receiver)) => (id, receiver),
                (Acquired::Queued(_), None) => unreachable!("a queued acquire has a channel"),
            }
        };
        let deadline = tokio::time::sleep_until(self.clock.instant_at(now.steady_ms) + wait);
        // Boxed: the wait's timer and select would otherwise make every acquire's future several
        // times larger, copied through each layer of the server, though most are granted at once.
        Box::pin(
            Waiting {
                state: self,
                id: waiter,
                receiver,
                done: false,
            }
            .until(deadline),
        )
        .await
    }

    /// Sleeps until the clock reads `at_ms`.
    pub fn sleep_until_ms(&self, at_ms: u64) -> tokio::time::Sleep {
        tokio::time::sleep_until(self.clock.instant_at(at_ms))
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Resolves when the server starts shutting down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waiters get `UNAVAILABLE`, event streams end, the timer stops.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
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
                () = sleep => self.run(|engine, now| { engine.tick(now); }),
                () = self.timer.notified() => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }
}

/// What operators need in the log: key and project trouble at `info`, lease traffic at `debug`.
fn log(event: &Event) {
    match &event.kind {
        EventKind::KeyDisabled { key_id, reason } => tracing::warn!(key_id, reason, "key disabled"),
        EventKind::KeyEnabled { key_id } => tracing::info!(key_id, "key enabled"),
        EventKind::CooledDown {
            pool,
            project,
            model,
            until_ms,
            reason,
        } => {
            tracing::info!(
                pool,
                project,
                model,
                until_ms,
                reason = reason.as_str(),
                "quota group cooling down"
            );
        }
        EventKind::Failed {
            lease,
            kind,
            detail,
        } => {
            tracing::info!(
                key_id = lease.key_id,
                task_id = lease.lease.task_id,
                kind = kind.as_str(),
                detail,
                "failure reported"
            );
        }
        EventKind::Granted(lease) => tracing::debug!(
            key_id = lease.key_id,
            lease_id = lease.lease.lease_id,
            task_id = lease.lease.task_id,
            "granted"
        ),
        EventKind::Renewed(lease) => tracing::debug!(lease_id = lease.lease.lease_id, "renewed"),
        EventKind::Released {
            lease,
            requests_sent,
        } => tracing::debug!(lease_id = lease.lease.lease_id, requests_sent, "released"),
        EventKind::Expired(lease) => tracing::debug!(
            key_id = lease.key_id,
            lease_id = lease.lease.lease_id,
            "expired"
        ),
    }
}

/// An acquire in line. Dropped before its outcome arrived (disconnect, shutdown), it takes the
/// waiter out of line, and gives back a lease granted in that very moment, so that no lease is
/// ever held for a caller that is gone.
struct Waiting<'a> {
    state: &'a State,
    id: WaiterId,
    receiver: oneshot::Receiver<WaiterOutcome>,
    /// The outcome reached the caller: nothing to undo.
    done: bool,
}

impl Waiting<'_> {
    async fn until(mut self, deadline: tokio::time::Sleep) -> Result<LeaseView, AcquireFailure> {
        let shutdown = self.state.shutdown.clone();
        tokio::select! {
            outcome = &mut self.receiver => {
                self.done = true;
                outcome.map_err(|_| AcquireFailure::ShuttingDown)?.map_err(AcquireFailure::Unavailable)
            }
            () = deadline => {
                self.done = true;
                match self.cancel() {
                    Some(unavailable) => Err(AcquireFailure::Unavailable(unavailable)),
                    // Served just before the deadline: the outcome is already in the channel.
                    None => match self.receiver.try_recv() {
                        Ok(outcome) => outcome.map_err(AcquireFailure::Unavailable),
                        Err(_) => Err(AcquireFailure::ShuttingDown),
                    },
                }
            }
            () = shutdown.cancelled() => Err(AcquireFailure::ShuttingDown),
        }
    }

    /// Takes the waiter out of line; `None` when it was already served.
    fn cancel(&mut self) -> Option<Unavailable> {
        let mut inner = self.state.lock();
        let unavailable = inner.engine.cancel_waiter(self.state.clock.now(), self.id);
        // The engine brings itself to now before the waiter leaves, which may serve this very
        // waiter: its lease must reach the channel, not be handed back as undelivered.
        self.state.carry_out(&mut inner);
        inner.waiters.remove(&self.id);
        unavailable
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done || self.cancel().is_some() {
            return;
        }
        if let Ok(Ok(lease)) = self.receiver.try_recv() {
            self.state.run(|engine, now| {
                engine
                    .release(now, &lease.lease_id, lease.fencing_token, Usage::UNUSED)
                    .ok()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Overrides};

    fn state(config: &str) -> Arc<State> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keylease-state-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keylease.toml");
        std::fs::write(&path, config).unwrap();
        let settings = config::load(Some(&path), &HashMap::new(), &Overrides::default()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        State::new(&settings, Clock::starting_at(1_773_086_400_000)).unwrap()
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
        let lease = state.acquire(ask("a"), Duration::ZERO).await.unwrap();
        let report = crate::engine::FailureReport {
            kind: crate::engine::FailureKind::DailyQuotaExhausted,
            retry_after_ms: None,
            detail: String::new(),
            requests_sent: None,
        };
        state
            .run(|engine, now| {
                engine.report_failure(now, &lease.lease_id, lease.fencing_token, report)
            })
            .unwrap();
        let waiter = {
            let state = state.clone();
            tokio::spawn(async move { state.acquire(ask("b"), Duration::from_secs(3_600)).await })
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

    /// No timer task runs here: only the waiter's own deadline brings the engine to the moment
    /// the holder's lease expires, which serves the waiter as it leaves.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_served_as_its_deadline_passes_gets_the_lease() {
        let state = state(
            "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n[[keys]]\nid = \"k1\"\nsecret = \"fake-key-1\"\n",
        );
        let held = state.acquire(ask("holder"), Duration::ZERO).await.unwrap();
        let waited = state
            .acquire(ask("waiter"), Duration::from_millis(1_000))
            .await;
        let lease = waited.unwrap_or_else(|failure| panic!("no lease: {failure:?}"));
        assert_eq!(lease.key_id, "k1");
        assert!(lease.fencing_token > held.fencing_token);
    }
}
