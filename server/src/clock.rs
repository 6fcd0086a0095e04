//! The one place that reads the time. The engine works on wall-clock milliseconds passed in; the
//! shell gets them here, from tokio's clock anchored to the wall clock at start, so that
//! `tokio::time::pause` and `advance` drive expiry and cooldowns in tests.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Wall-clock milliseconds since the Unix epoch, advancing with tokio's (pausable) clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall time at `anchor`.
    anchor_ms: u64,
    /// tokio's instant when the clock was made.
    anchor: Instant,
}

impl Clock {
    /// Anchored to the system's wall clock now.
    pub fn system() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::starting_at(wall.as_millis() as u64)
    }

    /// Anchored to a chosen wall time (tests).
    pub fn starting_at(anchor_ms: u64) -> Self {
        Self {
            anchor_ms,
            anchor: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.anchor_ms + self.anchor.elapsed().as_millis() as u64
    }

    /// The tokio instant at which this clock reads `at_ms`.
    pub fn instant_at(&self, at_ms: u64) -> Instant {
        self.anchor + Duration::from_millis(at_ms.saturating_sub(self.anchor_ms))
    }
}
