//! How the engine's commands and state are laid out in bytes, for stores to keep and replicas
//! to replay: a [`Record`] of each command applied, a [`Snapshot`] of the whole state, and the
//! layouts older builds wrote, read into today's types ([`v1`], [`v3`], [`v6`], [`v7`], [`v8`]; a
//! [`Setup`]'s own in [`setup`]). Bytes are postcard's: compact and fast to read back (a log of millions of
//! records is replayed at start-up).

mod setup;
mod v1;
mod v3;
mod v6;
mod v7;
mod v8;

pub(super) use setup::LimitsLayout;

use super::{Command, Engine, Image, KeySpec, Setup, Time};
use serde::{Deserialize, Serialize};

/// One applied command: replayed at its time, it changes a recovering engine as it changed the
/// live one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub time: Time,
    pub command: Command,
}

/// The whole state after record `seq`, with the setup it was reached under (no secrets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub seq: u64,
    pub setup: Setup,
    pub image: Image,
    /// Keys no longer configured whose leases still run (see [`Engine::draining_keys`]).
    pub draining: Vec<KeySpec>,
}

/// Opened the snapshots of rules 2 and 3 (since limits are learned): a first-format snapshot
/// opens with its `seq`, which never comes near it.
const SNAPSHOT_MARK: u64 = u64::MAX;
/// Opened the snapshots of rules 4 to 6 (since learning weighs evidence).
const SNAPSHOT_MARK_WEIGHING: u64 = u64::MAX - 1;
/// Opened the snapshots of rules 7 (since renewals wait in line).
const SNAPSHOT_MARK_RENEWALS: u64 = u64::MAX - 2;
/// Opened the snapshots of rules 8 (since a key's health is kept).
const SNAPSHOT_MARK_HEALTH: u64 = u64::MAX - 3;
/// Opens every snapshot written since waiters are placed by class and share (rules 9).
const SNAPSHOT_MARK_TENANTS: u64 = u64::MAX - 4;

impl Snapshot {
    pub fn of(engine: &Engine, seq: u64) -> Self {
        Self {
            seq,
            setup: engine.setup(),
            image: engine.image(),
            draining: engine.draining_keys(),
        }
    }

    /// Its bytes, behind [`SNAPSHOT_MARK_TENANTS`].
    pub fn encode(&self) -> Vec<u8> {
        encode(&(SNAPSHOT_MARK_TENANTS, self))
    }

    /// A snapshot from its bytes, as written by this server or an earlier one.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let read = match postcard::take_from_bytes::<u64>(bytes) {
            Ok((SNAPSHOT_MARK_TENANTS, rest)) => decode(rest),
            Ok((SNAPSHOT_MARK_HEALTH, rest)) => v8::decode(rest),
            Ok((SNAPSHOT_MARK_RENEWALS, rest)) => v7::decode(rest),
            Ok((SNAPSHOT_MARK_WEIGHING, rest)) => v6::decode(rest),
            Ok((SNAPSHOT_MARK, rest)) => v3::decode(rest),
            Ok((mark, _)) if mark > NEWER_MARKS_FROM => {
                return Err(SnapshotError::NewerLayout(u64::MAX - mark));
            }
            _ => v1::decode(bytes),
        };
        Ok(read?)
    }
}

/// Marks count down from `u64::MAX`, one per layout; a first-format snapshot's `seq` never
/// comes near them. A mark below the newest this build knows, down to here, is a newer build's.
const NEWER_MARKS_FROM: u64 = u64::MAX - (1 << 32);

/// Why a snapshot's bytes cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("written by a newer keylease, in snapshot layout {0}, which this build does not know")]
    NewerLayout(u64),
    #[error(transparent)]
    Bytes(#[from] postcard::Error),
}

/// The setup an older build of `rules` ran when it wrote the snapshots [`v1`] and [`v3`] read:
/// one key, and the tests' limits for model `m` without tokens per day, which those builds did
/// not know.
#[cfg(test)]
fn setup_of_an_older_build(rules: u32) -> Setup {
    let mut config = super::tests::config(60, 1_000);
    let pool = config.pools.values_mut().next().expect("the tests' pool");
    let (_, limits) = pool.models.pop_first().expect("the tests' model");
    pool.models.insert("m".into(), limits);
    Setup {
        rules,
        ..Setup::new(config, super::tests::key_specs(&[("k1", "p1")]), 0)
    }
}

/// The bytes of a [`Record`] of `command` at `time`, without copying the command.
pub fn encode_record(time: Time, command: &Command) -> Vec<u8> {
    #[derive(Serialize)]
    struct RecordRef<'a> {
        time: Time,
        command: &'a Command,
    }
    encode(&RecordRef { time, command })
}

/// Records and snapshots as bytes.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("records hold only sized collections")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcquireRequest, Renewal, WaiterId};

    /// The first variants of [`Command`] as builds before rules 7 laid them out (the first two
    /// only hold their places).
    #[derive(Serialize)]
    #[allow(dead_code)]
    enum CommandBeforeRules7 {
        Acquire(AcquireRequest),
        CancelWaiter(WaiterId),
        Renew {
            lease_id: String,
            fencing_token: u64,
            ttl_ms: Option<u64>,
            additional_requests: u32,
            additional_tokens: u64,
        },
    }

    #[test]
    fn a_renewal_an_older_build_logged_reads_as_todays() {
        #[derive(Serialize)]
        struct RecordBefore {
            time: Time,
            command: CommandBeforeRules7,
        }
        let bytes = encode(&RecordBefore {
            time: Time::at(7_000),
            command: CommandBeforeRules7::Renew {
                lease_id: "lease-9".into(),
                fencing_token: 9,
                ttl_ms: Some(60_000),
                additional_requests: 2,
                additional_tokens: 300,
            },
        });
        let record: Record = decode(&bytes).unwrap();
        let renewal = Renewal {
            lease_id: "lease-9".into(),
            fencing_token: 9,
            ttl_ms: Some(60_000),
            additional_requests: 2,
            additional_tokens: 300,
        };
        assert_eq!(record.command, Command::Renew(renewal));
        assert_eq!(encode_record(record.time, &record.command), bytes);
    }

    #[test]
    fn a_snapshot_in_a_newer_layout_is_named_so_rather_than_misread() {
        let engine = Engine::new(
            setup_of_an_older_build(crate::RULES_VERSION),
            Time::at(5_000),
        )
        .unwrap();
        let newer = encode(&(SNAPSHOT_MARK_TENANTS - 1, Snapshot::of(&engine, 3)));
        let error = Snapshot::decode(&newer).unwrap_err();
        assert!(matches!(error, SnapshotError::NewerLayout(5)), "{error:?}");
        assert!(error.to_string().contains("newer keylease"), "{error}");
        // Today's reads back (without the keys' secrets, which snapshots never hold).
        let today = Snapshot::decode(&Snapshot::of(&engine, 3).encode()).unwrap();
        assert_eq!((today.seq, today.image), (3, engine.image()));
    }
}
