//! Each key's record: the calls made on its leases, its failures by kind, how long its calls
//! took (when holders say), and its recent share of failures that are its own: timeouts and
//! server errors on it, not quota (which is the project's) nor model capacity (everyone's).
//! From rules 8 on, selection passes a key with such failures over now and then among keys as
//! free as it (see [`KeyRecord::passes`]): it gets fewer grants, never none.

use super::FailureKind;
use serde::{Deserialize, Serialize};

/// Latency buckets: bucket `i` counts calls that took less than 2^i ms (the last, any longer).
pub const LATENCY_BUCKETS: usize = 24;
/// The recent share is of about this many calls: past it, both counts are halved.
const RECENT_CALLS: u32 = 100;
/// Fewer recent calls than this say nothing of a key.
const RECENT_ENOUGH: u32 = 10;
/// Most times a key is passed over before it is granted again.
const MOST_PASSES: u32 = 9;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Calls made on its leases: requests sent, as releases and reports said.
    pub calls: u64,
    /// Failures reported, by kind in [`FailureKind::ALL`] order.
    pub failures: [u64; 8],
    /// Calls by how long they took, for those whose holder said.
    pub latency: [u64; LATENCY_BUCKETS],
    recent_calls: u32,
    recent_own_failures: u32,
    /// Times selection passed it over since it was last granted.
    passed_over: u32,
}

impl KeyRecord {
    /// `sent` calls went through.
    pub(super) fn called(&mut self, sent: u64) {
        self.calls = self.calls.saturating_add(sent);
        self.recent(u32::try_from(sent).unwrap_or(u32::MAX), 0);
    }

    /// A call failed with `kind`.
    pub(super) fn failed(&mut self, kind: FailureKind) {
        self.calls = self.calls.saturating_add(1);
        let at = FailureKind::ALL
            .iter()
            .position(|&k| k == kind)
            .expect("every kind is listed");
        self.failures[at] = self.failures[at].saturating_add(1);
        let own = matches!(kind, FailureKind::Timeout | FailureKind::ServerError);
        self.recent(1, u32::from(own));
    }

    /// A call took `ms`.
    pub(super) fn timed(&mut self, ms: u64) {
        let bucket = (u64::BITS - ms.leading_zeros()) as usize;
        let bucket = bucket.min(LATENCY_BUCKETS - 1);
        self.latency[bucket] = self.latency[bucket].saturating_add(1);
    }

    fn recent(&mut self, calls: u32, own_failures: u32) {
        self.recent_calls = self.recent_calls.saturating_add(calls);
        self.recent_own_failures = self.recent_own_failures.saturating_add(own_failures);
        while self.recent_calls > RECENT_CALLS {
            self.recent_calls /= 2;
            self.recent_own_failures /= 2;
        }
    }

    /// Of its recent calls, the share (in percent) that failed for the key's own reasons;
    /// `None` while too few to say.
    pub fn recent_own_failure_percent(&self) -> Option<u32> {
        (self.recent_calls >= RECENT_ENOUGH).then(|| {
            (self.recent_own_failures.min(self.recent_calls) * 100)
                .div_ceil(self.recent_calls.max(1))
        })
    }

    /// How many times selection passes it over before granting it: a tenth of its recent
    /// own-failure percent, rounded up (30% of timeouts: 3, so about one grant for three of a
    /// clean peer's), at most [`MOST_PASSES`].
    fn passes(&self) -> u32 {
        self.recent_own_failure_percent()
            .map_or(0, |percent| percent.div_ceil(10).min(MOST_PASSES))
    }

    /// Whether selection should pass it over this time (when another key is as good).
    pub(super) fn deferred(&self) -> bool {
        self.passed_over < self.passes()
    }

    pub(super) fn passed(&mut self) {
        self.passed_over = self.passed_over.saturating_add(1);
    }

    pub(super) fn granted(&mut self) {
        self.passed_over = 0;
    }

    /// The latency under which share `p` (0 to 1) of its timed calls fell, in ms: a bucket's
    /// upper bound; `None` before any was timed.
    pub fn latency_percentile_ms(&self, p: f64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = ((total as f64) * p.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return Some(1u64 << bucket);
            }
        }
        Some(1u64 << (LATENCY_BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_falls_in_power_of_two_buckets() {
        let mut record = KeyRecord::default();
        for ms in [0, 1, 3, 900, 1_100] {
            record.timed(ms);
        }
        record.timed(u64::MAX);
        assert_eq!(record.latency_percentile_ms(0.0), Some(1));
        assert_eq!(record.latency_percentile_ms(0.5), Some(4));
        assert_eq!(record.latency_percentile_ms(0.8), Some(2_048));
        assert_eq!(record.latency_percentile_ms(1.0), Some(1 << 23));
        assert_eq!(KeyRecord::default().latency_percentile_ms(0.5), None);
    }

    #[test]
    fn only_the_keys_own_failures_defer_it_and_only_recently() {
        let mut record = KeyRecord::default();
        record.called(7);
        for _ in 0..3 {
            record.failed(FailureKind::Timeout);
        }
        assert_eq!(record.recent_own_failure_percent(), Some(30));
        assert_eq!(record.passes(), 3);
        let mut quota = KeyRecord::default();
        quota.called(7);
        for _ in 0..3 {
            quota.failed(FailureKind::RateLimited);
        }
        assert_eq!(quota.passes(), 0, "quota is the project's");
        // Clean calls since wash it out.
        record.called(1_000);
        assert_eq!(record.passes(), 0);
        assert_eq!(record.calls, 1_010);
        assert_eq!(record.failures[5], 3, "timeouts, in FailureKind::ALL order");
    }
}
