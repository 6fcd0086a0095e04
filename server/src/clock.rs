//! The one place that reads the time. Each reading has two parts (see
//! [`keylease_engine::calendar`]): a steady time from tokio's clock, anchored to the wall clock
//! at start, so that `tokio::time::pause` and `advance` drive expiry and cooldowns in tests; and
//! the wall clock itself, read afresh each time, for the calendar.
#![allow(clippy::disallowed_methods)]

use keylease_engine::Time;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Clock {
    /// Steady time at `anchor`: the wall time when the clock was made.
    anchor_ms: u64,
    /// tokio's instant when the clock was made.
    anchor: Instant,
    /// `None`: the system's wall clock. Otherwise the wall clock reads the steady time plus
    /// this step, which tests move to play an NTP step.
    wall_step_ms: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// Anchored to the system's wall clock now, which it keeps reading.
    pub fn system() -> Self {
        Self {
            anchor_ms: system_wall_ms(),
            anchor: Instant::now(),
            wall_step_ms: None,
        }
    }

    /// Starting at a chosen time, with a wall clock that follows the steady one until
    /// [`Clock::step_wall`] (tests).
    pub fn starting_at(anchor_ms: u64) -> Self {
        Self {
            anchor_ms,
            anchor: Instant::now(),
            wall_step_ms: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// The same clock, its steady reading moved forward where needed so that it never reads
    /// before `floor_ms`: a restarted server's steady time goes on from the recovered state's,
    /// whatever the wall clock did meanwhile.
    pub fn not_before(mut self, floor_ms: u64) -> Self {
        let now = self.now_ms();
        if now < floor_ms {
            let ahead = floor_ms - now;
            self.anchor_ms += ahead;
            if let Some(step) = &self.wall_step_ms {
                // A test clock's wall reading stays where it was.
                step.fetch_sub(ahead as i64, Ordering::Relaxed);
            }
        }
        self
    }

    /// The same clock, its steady reading `by_ms` behind (its wall reading unmoved): a new
    /// leader's, so that a lease another replica recorded by a clock up to that far ahead is
    /// never expired early.
    pub fn behind(mut self, by_ms: u64) -> Self {
        let by_ms = by_ms.min(self.anchor_ms);
        self.anchor_ms -= by_ms;
        if let Some(step) = &self.wall_step_ms {
            step.fetch_add(by_ms as i64, Ordering::Relaxed);
        }
        self
    }

    /// Steps the wall clock of a clock made by [`Clock::starting_at`] by `by_ms`, as NTP would;
    /// the steady clock goes on unmoved. The system's wall clock is not ours to step.
    pub fn step_wall(&self, by_ms: i64) {
        if let Some(step) = &self.wall_step_ms {
            step.fetch_add(by_ms, Ordering::Relaxed);
        }
    }

    /// Both readings, now.
    pub fn now(&self) -> Time {
        let steady_ms = self.now_ms();
        let wall_ms = match &self.wall_step_ms {
            None => system_wall_ms(),
            Some(step) => {
                (i128::from(steady_ms) + i128::from(step.load(Ordering::Relaxed))).max(0) as u64
            }
        };
        Time::new(wall_ms, steady_ms)
    }

    /// The steady reading, now.
    pub fn now_ms(&self) -> u64 {
        self.anchor_ms + self.anchor.elapsed().as_millis() as u64
    }

    /// The tokio instant at which the steady clock reads `at_ms` (at most a century ahead).
    pub fn instant_at(&self, at_ms: u64) -> Instant {
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        let after = Duration::from_millis(at_ms.saturating_sub(self.anchor_ms)).min(CENTURY);
        self.anchor + after
    }
}

fn system_wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
