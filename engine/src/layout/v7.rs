//! Snapshots as rules 7 wrote them (behind [`super::SNAPSHOT_MARK_RENEWALS`]), read into
//! today's types: a key's health was its disabling reason alone. The keys of [`super::v1`],
//! [`super::v3`] and [`super::v6`] are laid out so too. Frozen: nothing here changes with the
//! engine.

use super::Snapshot;
use super::v8::LineImageV8;
use crate::image::{GroupImage, Image, KeyImage, LeaseImage};
use crate::outage::Answers;
use crate::{Decider, Disabled, KeySpec, Setup, Time};
use serde::Deserialize;

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct KeyImageV7 {
    id: String,
    identity: String,
    disabled: Option<String>,
    last_granted_ms: u64,
}

impl From<KeyImageV7> for KeyImage {
    /// Those builds did not say who disabled a key: it is read as an operator's disable, which
    /// holds until an operator enables the key, as it did then.
    fn from(key: KeyImageV7) -> Self {
        Self {
            id: key.id,
            identity: key.identity,
            disabled: key.disabled.map(|reason| Disabled {
                reason,
                since_wall_ms: None,
                by: Decider::Operator,
                problem: None,
            }),
            last_granted_ms: key.last_granted_ms,
            enabled_from_token: 0,
            last_check: None,
            awaiting_check: false,
            record: Default::default(),
        }
    }
}

/// Keys read into today's.
pub(super) fn keys(keys: Vec<KeyImageV7>) -> Vec<KeyImage> {
    keys.into_iter().map(KeyImage::from).collect()
}

/// Today's keys as those builds wrote them (tests only: they kept no health, and no record,
/// which is left out).
#[cfg(test)]
pub(super) fn keys_v7(keys: Vec<KeyImage>) -> Vec<KeyImageV7> {
    keys.into_iter()
        .map(|key| {
            assert!(
                key.last_check.is_none() && !key.awaiting_check && key.enabled_from_token == 0,
                "rules 7 kept no health"
            );
            KeyImageV7 {
                id: key.id,
                identity: key.identity,
                disabled: key.disabled.map(|d| d.reason),
                last_granted_ms: key.last_granted_ms,
            }
        })
        .collect()
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ImageV7 {
    time: Time,
    next_token: u64,
    next_waiter: u64,
    freed: bool,
    keys: Vec<KeyImageV7>,
    leases: Vec<LeaseImage>,
    groups: Vec<GroupImage>,
    backoff: Vec<(String, String, u32)>,
    exclusions: Vec<(String, Vec<(String, u64)>)>,
    request_ids: Vec<(String, u64)>,
    ended: Vec<LeaseImage>,
    lines: Vec<LineImageV8>,
    waves: Vec<(String, String, Answers)>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SnapshotV7 {
    seq: u64,
    setup: Setup,
    image: ImageV7,
    draining: Vec<KeySpec>,
}

/// A snapshot of rules 7 (its bytes after the mark), as today's.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, postcard::Error> {
    let v7: SnapshotV7 = super::decode(bytes)?;
    let i = v7.image;
    Ok(Snapshot {
        seq: v7.seq,
        setup: v7.setup,
        image: Image {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: keys(i.keys),
            leases: i.leases,
            groups: i.groups,
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: super::v8::lines(i.lines),
            waves: i.waves,
        },
        draining: v7.draining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcquireRequest, Command, Engine};

    /// An engine of rules 7 with a lease and a key an operator disabled.
    fn engine_of_rules_7() -> Engine {
        let mut setup = super::super::setup_of_an_older_build(7);
        setup.keys = crate::tests::key_specs(&[("k1", "p1"), ("k2", "p1")]);
        let mut engine = Engine::new(setup, Time::at(5_000)).unwrap();
        let ask = AcquireRequest {
            task_id: "a".into(),
            model: "m".into(),
            ..Default::default()
        };
        engine.apply(Time::at(6_000), Command::Acquire(ask));
        let disable = Command::SetKeyEnabled {
            key_id: "k2".into(),
            enabled: false,
            reason: "rotating it".into(),
        };
        engine.apply(Time::at(7_000), disable);
        engine
    }

    /// The bytes rules 7 wrote for `snapshot`.
    fn written_by_rules_7(snapshot: &Snapshot) -> Vec<u8> {
        let i = snapshot.image.clone();
        let image = ImageV7 {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: keys_v7(i.keys),
            leases: i.leases,
            groups: i.groups,
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: super::super::v8::lines_v8(i.lines),
            waves: i.waves,
        };
        super::super::encode(&(
            super::super::SNAPSHOT_MARK_RENEWALS,
            SnapshotV7 {
                seq: snapshot.seq,
                setup: snapshot.setup.clone(),
                image,
                draining: snapshot.draining.clone(),
            },
        ))
    }

    #[test]
    fn a_snapshot_of_rules_7_reads_its_disabled_key_as_an_operators() {
        let engine = engine_of_rules_7();
        let mut snapshot = Snapshot::of(&engine, 5);
        for key in &mut snapshot.image.keys {
            // What rules 7 kept of a disable, and no more.
            if let Some(disabled) = &mut key.disabled {
                disabled.since_wall_ms = None;
            }
            key.enabled_from_token = 0;
        }
        let bytes = written_by_rules_7(&snapshot);
        let read = Snapshot::decode(&bytes).unwrap();
        assert_eq!((read.seq, read.setup.rules), (5, 7));
        assert_eq!(read.image, snapshot.image);
        let disabled = read.image.keys[1].disabled.clone().expect("k2 is disabled");
        assert_eq!(disabled.reason, "rotating it");
        assert_eq!(disabled.by, Decider::Operator);
        let (restored, _) = Engine::restore(read.setup, read.draining, read.image).unwrap();
        assert_eq!(restored.image().leases, engine.image().leases);
        // Cut short, it is refused rather than misread.
        assert!(Snapshot::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
