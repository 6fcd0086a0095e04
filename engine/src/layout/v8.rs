//! Snapshots as rules 8 wrote them (behind [`super::SNAPSHOT_MARK_HEALTH`]), read into today's
//! types: waiters stood in arrival order, each line's blocked projects held back every arrival,
//! and no line kept a fair-queueing clock. The lines of [`super::v7`] are laid out so too.
//! Frozen: nothing here changes with the engine.

use super::Snapshot;
use crate::image::{GroupImage, Image, KeyImage, LeaseImage, LineImage, WaiterImage};
use crate::outage::Answers;
use crate::tenants::{Place, Priority};
use crate::{KeySpec, Setup, Time, WaiterId};
use serde::Deserialize;

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct LineImageV8 {
    pool: String,
    model: String,
    waiters: Vec<WaiterImageV8>,
    blocked: Vec<String>,
    wake_at_ms: Option<u64>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct WaiterImageV8 {
    id: WaiterId,
    task_id: String,
    excluded: Vec<String>,
    requests: u64,
    tokens: u64,
    ttl_ms: u64,
    client_request_id: Option<String>,
    exclusion_ends: Vec<u64>,
    renews: Option<u64>,
}

/// Blocked projects as those builds kept them: every class kept off them, as the normal class
/// of today does (all waiters were of it).
pub(super) fn blocked(projects: Vec<String>) -> Vec<(String, Priority)> {
    projects
        .into_iter()
        .map(|project| (project, Priority::Normal))
        .collect()
}

/// Today's blocked projects as those builds wrote them (tests only: all of the normal class).
#[cfg(test)]
pub(super) fn blocked_v8(projects: Vec<(String, Priority)>) -> Vec<String> {
    projects
        .into_iter()
        .map(|(project, class)| {
            assert_eq!(class, Priority::Normal, "rules 8 had one class");
            project
        })
        .collect()
}

impl From<LineImageV8> for LineImage {
    fn from(line: LineImageV8) -> Self {
        Self {
            pool: line.pool,
            model: line.model,
            waiters: line
                .waiters
                .into_iter()
                .map(|w| WaiterImage {
                    id: w.id,
                    task_id: w.task_id,
                    excluded: w.excluded,
                    requests: w.requests,
                    tokens: w.tokens,
                    ttl_ms: w.ttl_ms,
                    client_request_id: w.client_request_id,
                    exclusion_ends: w.exclusion_ends,
                    renews: w.renews,
                    tenant: String::new(),
                    place: Place::ARRIVAL,
                })
                .collect(),
            blocked: blocked(line.blocked),
            wake_at_ms: line.wake_at_ms,
            clock_now: 0,
            finishes: Vec::new(),
        }
    }
}

/// Today's lines as those builds wrote them (tests only: one tenant, in arrival order).
#[cfg(test)]
impl From<LineImage> for LineImageV8 {
    fn from(line: LineImage) -> Self {
        assert!(
            line.clock_now == 0 && line.finishes.is_empty(),
            "rules 8 kept no clock"
        );
        Self {
            pool: line.pool,
            model: line.model,
            waiters: line
                .waiters
                .into_iter()
                .map(|w| {
                    assert_eq!(w.place, Place::ARRIVAL, "rules 8 placed by arrival alone");
                    WaiterImageV8 {
                        id: w.id,
                        task_id: w.task_id,
                        excluded: w.excluded,
                        requests: w.requests,
                        tokens: w.tokens,
                        ttl_ms: w.ttl_ms,
                        client_request_id: w.client_request_id,
                        exclusion_ends: w.exclusion_ends,
                        renews: w.renews,
                    }
                })
                .collect(),
            blocked: blocked_v8(line.blocked),
            wake_at_ms: line.wake_at_ms,
        }
    }
}

/// Lines read into today's.
pub(super) fn lines(lines: Vec<LineImageV8>) -> Vec<LineImage> {
    lines.into_iter().map(LineImage::from).collect()
}

/// Today's lines as those builds wrote them (tests only).
#[cfg(test)]
pub(super) fn lines_v8(lines: Vec<LineImage>) -> Vec<LineImageV8> {
    lines.into_iter().map(LineImageV8::from).collect()
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ImageV8 {
    time: Time,
    next_token: u64,
    next_waiter: u64,
    freed: bool,
    keys: Vec<KeyImage>,
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
struct SnapshotV8 {
    seq: u64,
    setup: Setup,
    image: ImageV8,
    draining: Vec<KeySpec>,
}

/// A snapshot of rules 8 (its bytes after the mark), as today's.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, postcard::Error> {
    let v8: SnapshotV8 = super::decode(bytes)?;
    let i = v8.image;
    Ok(Snapshot {
        seq: v8.seq,
        setup: v8.setup,
        image: Image {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: i.keys,
            leases: i.leases,
            groups: i.groups,
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: lines(i.lines),
            waves: i.waves,
        },
        draining: v8.draining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcquireRequest, Command, Engine};

    /// An engine of rules 8 with a lease and, the pool's one key being leased, a task waiting.
    fn engine_of_rules_8() -> Engine {
        let mut setup = super::super::setup_of_an_older_build(8);
        setup.keys = crate::tests::key_specs(&[("k1", "p1")]);
        let mut engine = Engine::new(setup, Time::at(5_000)).unwrap();
        for (task, wait) in [("a", false), ("b", true)] {
            let ask = AcquireRequest {
                task_id: task.into(),
                model: "m".into(),
                wait,
                ..Default::default()
            };
            engine.apply(Time::at(6_000), Command::Acquire(ask));
        }
        engine
    }

    /// The bytes rules 8 wrote for `snapshot`.
    fn written_by_rules_8(snapshot: &Snapshot) -> Vec<u8> {
        let i = snapshot.image.clone();
        let image = ImageV8 {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: i.keys,
            leases: i.leases,
            groups: i.groups,
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: lines_v8(i.lines),
            waves: i.waves,
        };
        super::super::encode(&(
            super::super::SNAPSHOT_MARK_HEALTH,
            SnapshotV8 {
                seq: snapshot.seq,
                setup: snapshot.setup.clone(),
                image,
                draining: snapshot.draining.clone(),
            },
        ))
    }

    #[test]
    fn a_snapshot_of_rules_8_reads_its_waiters_in_arrival_order() {
        let engine = engine_of_rules_8();
        let snapshot = Snapshot::of(&engine, 5);
        assert_eq!(snapshot.image.lines[0].waiters.len(), 1);
        let bytes = written_by_rules_8(&snapshot);
        let read = Snapshot::decode(&bytes).unwrap();
        assert_eq!((read.seq, read.setup.rules), (5, 8));
        assert_eq!(read.image, snapshot.image);
        let (restored, _) = Engine::restore(read.setup, read.draining, read.image).unwrap();
        assert_eq!(restored.image(), engine.image());
        // Cut short, it is refused rather than misread.
        assert!(Snapshot::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
