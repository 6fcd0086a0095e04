//! Snapshots as rules 2 and 3 wrote them (behind the first [`super::SNAPSHOT_MARK`]), read into
//! today's types: a group's learning was the reacting rule's state, and the image kept no
//! answers for waves. Frozen: nothing here changes with the engine.

use super::Snapshot;
use super::v6::LineImageV6;
use super::v7::KeyImageV7;
use crate::image::{GroupImage, Image, LeaseImage};
use crate::learning::{Learned, Reacting};
use crate::quota::before_tokens_per_day::QuotaGroupV3;
use crate::{KeySpec, Setup, Time};
use serde::Deserialize;

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct GroupImageV3 {
    pool: String,
    project: String,
    model: String,
    books: QuotaGroupV3,
    learned: Option<Reacting>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ImageV3 {
    time: Time,
    next_token: u64,
    next_waiter: u64,
    freed: bool,
    keys: Vec<KeyImageV7>,
    leases: Vec<LeaseImage>,
    groups: Vec<GroupImageV3>,
    backoff: Vec<(String, String, u32)>,
    exclusions: Vec<(String, Vec<(String, u64)>)>,
    request_ids: Vec<(String, u64)>,
    ended: Vec<LeaseImage>,
    lines: Vec<LineImageV6>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SnapshotV3 {
    seq: u64,
    setup: Setup,
    image: ImageV3,
    draining: Vec<KeySpec>,
}

/// A snapshot of rules 2 and 3 (its bytes after the mark), as today's.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, postcard::Error> {
    let v3: SnapshotV3 = super::decode(bytes)?;
    let i = v3.image;
    Ok(Snapshot {
        seq: v3.seq,
        setup: v3.setup,
        image: Image {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: super::v7::keys(i.keys),
            leases: i.leases,
            groups: i
                .groups
                .into_iter()
                .map(|g| GroupImage {
                    pool: g.pool,
                    project: g.project,
                    model: g.model,
                    books: g.books.into(),
                    learned: g.learned.map(Learned::Reacting),
                })
                .collect(),
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: super::v6::lines(i.lines),
            waves: Vec::new(),
        },
        draining: v3.draining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Acquired, Command, Engine, FailureKind, FailureReport, Reply};

    /// An engine of rules 3 that learned from a bare 429 and holds a lease.
    fn engine_of_rules_3() -> Engine {
        let setup = super::super::setup_of_an_older_build(3);
        let mut engine = Engine::new(setup, Time::at(5_000)).unwrap();
        let ask = |task: &str| crate::AcquireRequest {
            task_id: task.into(),
            model: "m".into(),
            ..Default::default()
        };
        let (reply, _) = engine.apply(Time::at(6_000), Command::Acquire(ask("a")));
        let Reply::Acquired(Ok(Acquired::Granted(lease))) = reply else {
            panic!("{reply:?}")
        };
        engine.apply(
            Time::at(7_000),
            Command::ReportFailure {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
                report: FailureReport {
                    kind: FailureKind::RateLimited,
                    retry_after_ms: Some(1),
                    detail: String::new(),
                    requests_sent: None,
                    violations: Vec::new(),
                },
            },
        );
        engine.apply(Time::at(8_000), Command::Acquire(ask("b")));
        engine
    }

    /// The bytes rules 3 wrote for `snapshot` (today's, whose groups learned by reacting).
    fn written_by_rules_3(snapshot: &Snapshot) -> Vec<u8> {
        let i = snapshot.image.clone();
        let image = ImageV3 {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: super::super::v7::keys_v7(i.keys),
            leases: i.leases,
            groups: i
                .groups
                .into_iter()
                .map(|g| GroupImageV3 {
                    pool: g.pool,
                    project: g.project,
                    model: g.model,
                    books: g.books.into(),
                    learned: g.learned.map(|l| match l {
                        Learned::Reacting(r) => r,
                        Learned::Weighing(_) => panic!("rules 3 only reacted"),
                    }),
                })
                .collect(),
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: super::super::v6::lines_v6(i.lines),
        };
        super::super::encode(&(
            super::super::SNAPSHOT_MARK,
            SnapshotV3 {
                seq: snapshot.seq,
                setup: snapshot.setup.clone(),
                image,
                draining: snapshot.draining.clone(),
            },
        ))
    }

    #[test]
    fn a_snapshot_of_rules_3_reads_back_as_it_was_and_restores() {
        let engine = engine_of_rules_3();
        let snapshot = Snapshot::of(&engine, 5);
        assert!(
            snapshot.image.groups[0].learned.is_some(),
            "the fixture learned something"
        );
        let bytes = written_by_rules_3(&snapshot);
        let read = Snapshot::decode(&bytes).unwrap();
        assert_eq!((read.seq, read.setup.rules), (5, 3));
        assert!(matches!(
            read.image.groups[0].learned,
            Some(Learned::Reacting(_))
        ));
        let (restored, _) = Engine::restore(read.setup, read.draining, read.image).unwrap();
        let mut expected = engine.image();
        // That build kept no record of the keys' calls.
        for key in &mut expected.keys {
            key.record = Default::default();
        }
        assert_eq!(restored.image(), expected);
        // Cut short, it is refused rather than misread.
        assert!(Snapshot::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
