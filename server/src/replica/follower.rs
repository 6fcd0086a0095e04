//! The hot copy a follower keeps: the leader's entries applied as they land, each checked
//! against the hash chain of those before it.

use super::redis::{Entry, Position, Redis, RedisLog, chain_after};
use crate::clock::Clock;
use crate::store::{Log, Replay, StoreError};
use std::time::Duration;

/// The hot copy: the leader's records applied as they land, each entry's chain value checked
/// against the one before it, so that a log which differs from what this copy applied (Redis
/// lost records, and others were written in their place) is noticed.
pub struct Follower {
    pub log: RedisLog,
    pub applied: Applied,
}

pub struct Applied {
    pub replay: Replay,
    /// The chain value the next entry must follow from.
    pub chain: u64,
    /// The end of the last entry applied, with its chain value (none just after a snapshot).
    pub at: Option<Position>,
    /// Where this replica had applied the log to before it restarted, checked as the entry
    /// that ends there passes.
    pub expect: Option<Position>,
}

/// Why a copy could not follow the log.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The log differs from the one this copy applied, at the entry ending at this record.
    #[error("the log differs from what this replica applied, at record {0}")]
    Diverged(u64),
}

impl Applied {
    fn apply(&mut self, entry: Entry<'_>) -> Result<(), FollowError> {
        if chain_after(self.chain, entry.body) != entry.chain {
            return Err(FollowError::Diverged(entry.last));
        }
        if let Some(expect) = self.expect
            && entry.last >= expect.seq
        {
            // An entry of the same log ends where this replica's did, with the same chain.
            if entry.last > expect.seq || entry.chain != expect.chain {
                return Err(FollowError::Diverged(expect.seq));
            }
            self.expect = None;
        }
        let records = entry.records().map_err(|e| StoreError::Unreadable {
            path: self.replay.location().to_path_buf(),
            reason: format!("the entry ending at record {}: {e}", entry.last),
        })?;
        for (seq, record) in records {
            // A snapshot may have been taken amid the entry: what it covers is skipped.
            if seq > self.replay.last_seq {
                self.replay.apply(seq, record)?;
            }
        }
        self.chain = entry.chain;
        self.at = Some(Position {
            seq: entry.last,
            chain: entry.chain,
        });
        Ok(())
    }
}

impl Follower {
    /// From the snapshot and the entries after it; `expect`: where this replica had applied the
    /// log to before, checked on the way.
    pub fn load(redis: &Redis, expect: Option<Position>) -> Result<Self, FollowError> {
        // The leader may trim the entries after the snapshot read: try again from the new one.
        let mut tries = 0;
        loop {
            let log = RedisLog::open(redis.clone())?;
            let mut replay = Replay::new(log.location());
            let mut chain = 0;
            if let Some((bytes, after)) = log.snapshot_and_chain()? {
                replay.restore(&bytes)?;
                chain = after;
            }
            let mut follower = Self {
                applied: Applied {
                    expect: expect.filter(|e| e.seq > replay.last_seq),
                    replay,
                    chain,
                    at: None,
                },
                log,
            };
            match follower.catch_up() {
                Ok(()) => return Ok(follower),
                Err(FollowError::Store(StoreError::Unreadable { .. })) if tries < 3 => tries += 1,
                Err(error) => return Err(error),
            }
        }
    }

    pub fn catch_up(&mut self) -> Result<(), FollowError> {
        let applied = &mut self.applied;
        self.log
            .entries(applied.replay.last_seq, &mut |entry| applied.apply(entry))
    }

    /// Applies the leader's entries as they land, for `duration`.
    pub fn tail_for(&mut self, duration: Duration) -> Result<(), FollowError> {
        let until = Clock::system().now_ms() + duration.as_millis() as u64;
        loop {
            let left = until.saturating_sub(Clock::system().now_ms());
            if left == 0 {
                return Ok(());
            }
            let applied = &mut self.applied;
            self.log.read_after(
                applied.replay.last_seq,
                Duration::from_millis(left),
                &mut |entry| applied.apply(entry),
            )?;
        }
    }
}
