//! The lease engine: who holds which key, what each quota group has spent, who waits. Plain,
//! synchronous and deterministic: each [`Command`] comes with the current time (two readings,
//! see [`calendar`]) through [`Engine::apply`], which decides the reply, changes the state, and
//! records what happened as notices for the shell to carry out (wake a waiter, stream an event).
//! No I/O, no tokio, no protocol types. [`layout`] lays its commands and state out in bytes
//! for the stores that keep them.
#![forbid(unsafe_code)]

mod acquire;
mod books;
pub mod calendar;
mod catalogue;
pub mod command;
mod error;
mod events;
pub mod health;
mod ids;
pub mod image;
pub mod layout;
pub mod learning;

mod leases;
mod memory;
mod outage;
pub mod performance;
pub mod quota;
mod release;
mod renew;
mod requests;
mod setup;
mod status;
pub mod tenants;
mod views;
mod waiting;

use books::Books;
pub use calendar::{DailyReset, Time};
use catalogue::Catalogue;
pub use command::{Command, Reconfigured, Replaced, Reply};
pub use image::Image;
use keylease_core::ApiKey;
use keylease_core::{MAX_DETAIL_BYTES, MAX_ID_BYTES, MAX_INPUT_TOKENS};
pub use learning::{Evidence, LimitChange, LimitKind, QuotaViolation};
use leases::LeaseTable;
pub use leases::lease_id;
use memory::Memory;
use outage::Waves;
pub use quota::Amount;
use quota::{BookKeeping, CooldownReason, Limits};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use waiting::Lines;

pub use error::EngineError;
pub(crate) use error::{invalid, validate_detail, validate_id, validate_tokens};
pub use events::{Event, EventKind, LeaseEvent, Notices};
pub use health::{CheckOutcome, CheckTarget, Decider, Disabled, KeyCheck, KeyProblem};
pub use performance::KeyRecord;
pub use requests::{
    AcquireRequest, Acquired, FailureKind, FailureReport, LeaseSummary, LeaseView, Renewal,
    Renewed, Reported, Unavailable, UnavailableReason, Usage, WaiterId,
};
pub use setup::{
    DEFAULT_POOL, EngineConfig, KeySpec, OLDEST_RULES_DECIDED, PoolConfig, RULES_VERSION, Setup,
    SetupError, canonical_model, pool_or_default,
};
pub(crate) use setup::{
    RULES_EVIDENCE_STANDING, RULES_FORGETTING_UNLISTED_MODELS, RULES_WEIGHING_EVIDENCE,
};
pub use status::{
    Counts, GroupView, KeyState, KeyView, LimitView, StatusView, TenantWaiting, UsageView,
};

/// How far the wall clock must move against the steady one to count as stepped (two readings
/// taken one after the other differ by a millisecond or so).
const WALL_STEP_MS: i128 = 1_000;

/// The engine: its parts, each keeping its own invariants, and the time it has reached.
pub struct Engine {
    config: EngineConfig,
    catalogue: Catalogue,
    leases: LeaseTable,
    books: Books,
    lines: Lines,
    memory: Memory,
    /// The latest time seen: its steady reading never runs backwards.
    time: Time,
    /// Something freed capacity since waiters were last served.
    freed: bool,
    /// How many times a waiter was considered for a key: the cost of serving lines.
    #[cfg(test)]
    waiters_looked_at: u64,
    notices: Notices,
    /// Draining keys whose last lease ended during the current command: announced as removed
    /// once it is done.
    drained: Vec<ids::KeyIdx>,
    /// The rules it decides by: its setup's (see [`RULES_VERSION`]).
    rules: u32,
    /// Recent answers of each project, to tell a wave across the pool from its quota.
    waves: Waves,
    /// Whom the command being applied is for (see [`Command::ForCaller`]); the default
    /// caller between commands.
    caller: tenants::Caller,
}

impl Engine {
    /// An engine with nothing leased yet, configured by `setup`: what the first `Configure`
    /// record of a log starts from.
    pub fn new(setup: Setup, now: Time) -> Result<Self, SetupError> {
        Self::with_draining(setup, Vec::new(), now).map(|(engine, _)| engine)
    }

    /// An engine configured by `setup` whose catalogue also holds the `draining` keys (no
    /// longer configured, still leased); those it could not hold are returned.
    fn with_draining(
        setup: Setup,
        draining: Vec<KeySpec>,
        now: Time,
    ) -> Result<(Self, Vec<KeySpec>), SetupError> {
        let Setup {
            config,
            keys,
            token_floor,
            rules,
        } = setup;
        let (catalogue, left_out) = Catalogue::new(&config, keys, draining, rules)?;
        let engine = Self {
            books: Books::new(&config, &catalogue, rules),
            waves: Waves::default(),
            caller: tenants::Caller::default(),
            leases: LeaseTable::new(token_floor, config.memory_capacity),
            memory: Memory::new(config.memory_capacity),
            lines: Lines::new(),
            catalogue,
            config,
            time: now,
            freed: false,
            #[cfg(test)]
            waiters_looked_at: 0,
            notices: Notices::default(),
            drained: Vec::new(),
            rules,
        };
        Ok((engine, left_out))
    }

    /// The setup the engine runs under (with secrets; a record leaves them out): its configured
    /// keys, not the draining ones.
    pub fn setup(&self) -> Setup {
        let keys = self.catalogue.keys().iter().filter(|key| !key.draining);
        Setup {
            rules: self.rules,
            ..Setup::new(
                self.config.clone(),
                keys.map(|key| key.spec.clone()).collect(),
                0,
            )
        }
    }

    /// Keys no longer configured that still serve live leases: a snapshot keeps them beside
    /// the setup.
    pub fn draining_keys(&self) -> Vec<KeySpec> {
        self.catalogue
            .keys()
            .iter()
            .filter(|key| key.draining && !key.is_gone())
            .map(|key| key.spec.clone())
            .collect()
    }

    /// The latest time the engine has seen.
    pub fn now(&self) -> Time {
        self.time
    }

    /// The fencing token the next grant gets.
    pub fn next_fencing_token(&self) -> u64 {
        self.leases.next_token()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Everything the shell must carry out since the last call.
    fn drain(&mut self) -> Notices {
        std::mem::take(&mut self.notices)
    }

    /// Whether any acquire waits in line (a line may wait for the calendar: see
    /// [`Engine::next_wakeup_ms`]).
    pub fn has_waiters(&self) -> bool {
        self.lines.has_waiters()
    }

    /// The steady time at which the engine next needs [`Command::Tick`] without a command: a
    /// lease expires, or the books change for someone waiting. A day turning is foreseen from
    /// the wall clock as it reads now; a shell that has waiters ticks often enough to follow a
    /// stepped wall clock.
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        let expiry = self.leases.first_expiry().map(|(at, _)| at);
        match (expiry, self.lines.next_wake()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether [`Command::Tick`] at `now` would change anything: a lease expired, a line is due
    /// to be looked at again, or the wall clock was stepped. A read at `now` is only current
    /// after such a tick.
    pub fn tick_due(&self, now: Time) -> bool {
        self.next_wakeup_ms().is_some_and(|at| at <= now.steady_ms)
            || self.freed
            || (now.wall_offset_ms() - self.time.wall_offset_ms()).abs() > WALL_STEP_MS
    }

    /// The engine's time at `now`: its steady reading never runs backwards.
    fn time_at(&self, now: Time) -> Time {
        Time::new(now.wall_ms, self.time.steady_ms.max(now.steady_ms))
    }

    /// Brings the state to `now`: ends expired leases and serves waiters that can now be.
    fn tick(&mut self, now: impl Into<Time>) -> Time {
        let time = self.time_at(now.into());
        if (time.wall_offset_ms() - self.time.wall_offset_ms()).abs() > WALL_STEP_MS {
            // The lines' wake times were foreseen from the wall clock as it read then, and a
            // day may have turned: look at every line again.
            self.freed = true;
        }
        self.time = time;
        while let Some((expires_ms, token)) = self.leases.first_expiry() {
            if expires_ms > time.steady_ms {
                break;
            }
            let used = self.leases.get(token).expect("live").reserved();
            let event = self.end_lease(token, time, used);
            self.emit(time, EventKind::Expired(event));
        }
        if self.freed || self.lines.wake_due(time.steady_ms) {
            self.freed = false;
            self.serve_waiters(time);
        }
        time
    }

    /// Every waiter leaves its line, told nothing: their callers are gone. The lines are
    /// emptied before the engine is brought to `now`, so that nothing is decided for them.
    fn drop_waiters(&mut self, now: impl Into<Time>) -> usize {
        let dropped = self.lines.clear();
        self.tick(now);
        dropped
    }

    fn emit(&mut self, at: Time, kind: EventKind) {
        self.notices.events.push(Event { at, kind });
    }
}

const DAY_MS: u64 = 24 * 3_600_000;

fn show_ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests;
