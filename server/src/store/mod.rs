//! Durable state: the log of every command the engine applied (with its time, in apply order)
//! and snapshots of the whole state, so that a restart rebuilds exactly what was acknowledged
//! rather than deciding it again. [`Store`] is the seam a backend fills ([`embedded`]: a redb
//! file in a locked state directory); [`journal`] commits records in groups; [`recover`] replays.

#[cfg(test)]
pub mod conformance;
pub mod embedded;
pub mod journal;
#[cfg(test)]
pub mod testing;

use keylease_engine::layout::{Record, Snapshot, SnapshotError, decode, encode};
use keylease_engine::{Command, Engine, RULES_VERSION};
use std::path::PathBuf;

/// The layout of records and snapshots. A store written by a newer format is refused.
pub const FORMAT_VERSION: u64 = 1;

/// The records of one commit as one value, each with its number: how every store keeps a
/// commit, so that a reader parses one value per commit rather than one per record.
pub fn encode_batch(records: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let batch: Vec<(u64, &[u8])> = records
        .iter()
        .map(|(seq, bytes)| (*seq, bytes.as_slice()))
        .collect();
    encode(&batch)
}

/// The records of a commit encoded by [`encode_batch`].
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, postcard::Error> {
    decode(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: in use by {holder}; stop it first, or give this server another --state-dir")]
    Locked { path: PathBuf, holder: String },
    #[error(
        "{path}: {reason}. Start with --reset-state to move it aside (it is kept, not deleted) and begin with an empty state"
    )]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "{path}: written in state format {found}, newer than this server's {FORMAT_VERSION}; run the newer keylease, or start with --reset-state to move it aside"
    )]
    NewerFormat { path: PathBuf, found: u64 },
    /// Records decided by other rules than this build's: replaying them could decide otherwise.
    #[error(
        "{path}: the records from {seq} on were decided by rules version {found} of keylease, and this server's is {RULES_VERSION}: {}",
        other_rules_advice(*found)
    )]
    OtherRules { path: PathBuf, seq: u64, found: u32 },
    /// Writing failed while serving: what was not yet written was never acknowledged.
    #[error("{path}: cannot write: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The way on from records of rules `found`, which this build does not replay.
fn other_rules_advice(found: u32) -> &'static str {
    if found > RULES_VERSION {
        // Its snapshot may be laid out as this build cannot read either.
        "run a keylease of that version or newer, or start with --reset-state to move the state aside"
    } else {
        "start the keylease that wrote them and stop it with SIGTERM (it writes a snapshot, so nothing is replayed), or start with --reset-state to move the state aside"
    }
}

/// Called with each record read back: its number and bytes.
pub type RecordVisitor<'a> = dyn FnMut(u64, &[u8]) -> Result<(), StoreError> + 'a;

/// What a log can be read for: the latest snapshot and the records after it.
pub trait Log: Send {
    /// The latest snapshot, if any, as bytes.
    fn snapshot(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// The records after `after`, in order.
    fn records(&self, after: u64, visit: &mut RecordVisitor<'_>) -> Result<(), StoreError>;
    /// Where it is, for messages.
    fn location(&self) -> PathBuf;
}

/// Where records and snapshots are kept. Appends are durable when they return.
pub trait Store: Log {
    /// Appends records (numbered in order), all or none, durably.
    fn append(&mut self, records: &[(u64, Vec<u8>)]) -> Result<(), StoreError>;
    /// Keeps a snapshot taken after record `seq` and drops the records it covers.
    fn save_snapshot(&mut self, seq: u64, snapshot: &[u8]) -> Result<(), StoreError>;
    /// Confirms that this store may still write (a replica's leadership): what it has written
    /// may be asserted to clients. Always, for a store no one else writes.
    fn confirm(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What recovery rebuilt.
pub struct Recovery {
    /// `None`: the store was empty.
    pub engine: Option<Engine>,
    /// The last record applied: the next is numbered after it.
    pub last_seq: u64,
    pub from_snapshot: bool,
    pub records_replayed: u64,
}

/// Rebuilds the engine from the latest snapshot and the records after it.
pub fn recover(log: &dyn Log) -> Result<Recovery, StoreError> {
    let mut replay = Replay::new(log.location());
    let from_snapshot = match log.snapshot()? {
        None => false,
        Some(bytes) => {
            replay.restore(&bytes)?;
            true
        }
    };
    log.records(replay.last_seq, &mut |seq, bytes| replay.apply(seq, bytes))?;
    Ok(Recovery {
        last_seq: replay.last_seq,
        records_replayed: replay.records_replayed,
        engine: replay.engine,
        from_snapshot,
    })
}

/// Records decided under earlier rules were written in a format this build does not read.
const FIRST_RULES_OF_THIS_RECORD_FORMAT: u32 = keylease_engine::OLDEST_RULES_DECIDED;

/// An engine rebuilt record by record: at recovery, and on a replica that follows the leader's
/// log as it grows.
pub struct Replay {
    /// `None` until a snapshot or the first `Configure`.
    pub engine: Option<Engine>,
    /// The last record applied.
    pub last_seq: u64,
    pub records_replayed: u64,
    /// The rules that decided the records being replayed: those of the last setup before them.
    rules: u32,
    location: PathBuf,
}

impl Replay {
    pub fn new(location: PathBuf) -> Self {
        Self {
            engine: None,
            last_seq: 0,
            records_replayed: 0,
            rules: RULES_VERSION,
            location,
        }
    }

    /// The log it replays, for messages.
    pub fn location(&self) -> &std::path::Path {
        &self.location
    }

    fn unreadable(&self, reason: String) -> StoreError {
        StoreError::Unreadable {
            path: self.location.clone(),
            reason,
        }
    }

    /// Starts again from a snapshot, whatever was applied before.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let snapshot = Snapshot::decode(bytes).map_err(|e| match e {
            SnapshotError::NewerLayout(_) => {
                self.unreadable(format!("the snapshot was {e}: run that keylease"))
            }
            SnapshotError::Bytes(_) => self.unreadable(format!("the snapshot: {e}")),
        })?;
        self.rules = snapshot.setup.rules;
        let (restored, _) = Engine::restore(snapshot.setup, snapshot.draining, snapshot.image)
            .map_err(|e| self.unreadable(format!("the snapshot's configuration: {e}")))?;
        self.engine = Some(restored);
        self.last_seq = snapshot.seq;
        Ok(())
    }

    /// Applies record `seq`, which must be the next one.
    pub fn apply(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        if seq != self.last_seq + 1 {
            return Err(self.unreadable(format!(
                "record {} is missing (the next is {seq})",
                self.last_seq + 1
            )));
        }
        if self.rules < FIRST_RULES_OF_THIS_RECORD_FORMAT {
            // Written in a record format this build no longer reads.
            return Err(StoreError::OtherRules {
                path: self.location.clone(),
                seq,
                found: self.rules,
            });
        }
        let record: Record = match decode(bytes) {
            Ok(record) => record,
            // A newer build's record may be laid out as this build cannot read: its rules
            // say why, which "unreadable" would not.
            Err(_) if self.rules > RULES_VERSION => {
                return Err(StoreError::OtherRules {
                    path: self.location.clone(),
                    seq,
                    found: self.rules,
                });
            }
            Err(e) => return Err(self.unreadable(format!("record {seq}: {e}"))),
        };
        match &record.command {
            Command::Configure(setup) => self.rules = setup.rules,
            // Mechanical, whatever the rules: they decide nothing.
            Command::DropWaiters => {}
            // The engine decides by its setup's rules, older ones too; a newer build's it
            // does not know.
            _ if self.rules > RULES_VERSION => {
                return Err(StoreError::OtherRules {
                    path: self.location.clone(),
                    seq,
                    found: self.rules,
                });
            }
            _ => {}
        }
        match (&mut self.engine, record.command) {
            (Some(engine), command) => {
                engine.apply(record.time, command);
            }
            (None, Command::Configure(setup)) => {
                let first = Engine::new(setup, record.time)
                    .map_err(|e| self.unreadable(format!("record {seq}: {e}")))?;
                self.engine = Some(first);
            }
            (None, command) => {
                return Err(self.unreadable(format!(
                    "record {seq} ({}) comes before any configuration",
                    command.name()
                )));
            }
        }
        self.last_seq = seq;
        self.records_replayed += 1;
        Ok(())
    }
}
