//! Snapshots as rules 4 to 6 wrote them (behind [`super::SNAPSHOT_MARK_WEIGHING`]), read into
//! today's types: every waiter in line was an acquire (renewals waited outside the engine).
//! The lines of [`super::v1`] and [`super::v3`] are laid out so too. Frozen: nothing here
//! changes with the engine.

use super::Snapshot;
use super::v7::KeyImageV7;
use crate::image::{GroupImage, Image, LeaseImage, LineImage, WaiterImage};
use crate::outage::Answers;
use crate::tenants::Place;
use crate::{KeySpec, Setup, Time, WaiterId};
use serde::Deserialize;

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct LineImageV6 {
    pool: String,
    model: String,
    waiters: Vec<WaiterImageV6>,
    blocked: Vec<String>,
    wake_at_ms: Option<u64>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct WaiterImageV6 {
    id: WaiterId,
    task_id: String,
    excluded: Vec<String>,
    requests: u64,
    tokens: u64,
    ttl_ms: u64,
    client_request_id: Option<String>,
    exclusion_ends: Vec<u64>,
}

impl From<LineImageV6> for LineImage {
    fn from(line: LineImageV6) -> Self {
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
                    renews: None,
                    tenant: String::new(),
                    place: Place::ARRIVAL,
                })
                .collect(),
            blocked: super::v8::blocked(line.blocked),
            wake_at_ms: line.wake_at_ms,
            clock_now: 0,
            finishes: Vec::new(),
        }
    }
}

/// Today's lines as those builds wrote them (tests only: they had no renewals in line).
#[cfg(test)]
impl From<LineImage> for LineImageV6 {
    fn from(line: LineImage) -> Self {
        Self {
            pool: line.pool,
            model: line.model,
            waiters: line
                .waiters
                .into_iter()
                .map(|w| {
                    assert!(w.renews.is_none(), "rules 6 had no renewals in line");
                    assert_eq!(w.place, Place::ARRIVAL, "rules 6 placed by arrival alone");
                    WaiterImageV6 {
                        id: w.id,
                        task_id: w.task_id,
                        excluded: w.excluded,
                        requests: w.requests,
                        tokens: w.tokens,
                        ttl_ms: w.ttl_ms,
                        client_request_id: w.client_request_id,
                        exclusion_ends: w.exclusion_ends,
                    }
                })
                .collect(),
            blocked: super::v8::blocked_v8(line.blocked),
            wake_at_ms: line.wake_at_ms,
        }
    }
}

/// Lines read into today's.
pub(super) fn lines(lines: Vec<LineImageV6>) -> Vec<LineImage> {
    lines.into_iter().map(LineImage::from).collect()
}

/// Today's lines as those builds wrote them (tests only).
#[cfg(test)]
pub(super) fn lines_v6(lines: Vec<LineImage>) -> Vec<LineImageV6> {
    lines.into_iter().map(LineImageV6::from).collect()
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ImageV6 {
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
    lines: Vec<LineImageV6>,
    waves: Vec<(String, String, Answers)>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SnapshotV6 {
    seq: u64,
    setup: Setup,
    image: ImageV6,
    draining: Vec<KeySpec>,
}

/// A snapshot of rules 4 to 6 (its bytes after the mark), as today's.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, postcard::Error> {
    let v6: SnapshotV6 = super::decode(bytes)?;
    let i = v6.image;
    Ok(Snapshot {
        seq: v6.seq,
        setup: v6.setup,
        image: Image {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: super::v7::keys(i.keys),
            leases: i.leases,
            groups: i.groups,
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: lines(i.lines),
            waves: i.waves,
        },
        draining: v6.draining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcquireRequest, Acquired, Command, Engine, Reply};

    /// An engine of rules 6 with a lease and a task waiting in line for another.
    fn engine_of_rules_6() -> Engine {
        let mut setup = super::super::setup_of_an_older_build(6);
        setup
            .config
            .pools
            .values_mut()
            .next()
            .unwrap()
            .max_leases_per_key = 1;
        let mut engine = Engine::new(setup, Time::at(5_000)).unwrap();
        let ask = |task: &str| AcquireRequest {
            task_id: task.into(),
            model: "m".into(),
            wait: true,
            ..Default::default()
        };
        let (reply, _) = engine.apply(Time::at(6_000), Command::Acquire(ask("a")));
        assert!(matches!(reply, Reply::Acquired(Ok(Acquired::Granted(_)))));
        let (reply, _) = engine.apply(Time::at(7_000), Command::Acquire(ask("b")));
        assert!(matches!(reply, Reply::Acquired(Ok(Acquired::Queued(_)))));
        engine
    }

    /// The bytes rules 6 wrote for `snapshot`.
    fn written_by_rules_6(snapshot: &Snapshot) -> Vec<u8> {
        let i = snapshot.image.clone();
        let image = ImageV6 {
            time: i.time,
            next_token: i.next_token,
            next_waiter: i.next_waiter,
            freed: i.freed,
            keys: super::super::v7::keys_v7(i.keys),
            leases: i.leases,
            groups: i.groups,
            backoff: i.backoff,
            exclusions: i.exclusions,
            request_ids: i.request_ids,
            ended: i.ended,
            lines: lines_v6(i.lines),
            waves: i.waves,
        };
        super::super::encode(&(
            super::super::SNAPSHOT_MARK_WEIGHING,
            SnapshotV6 {
                seq: snapshot.seq,
                setup: snapshot.setup.clone(),
                image,
                draining: snapshot.draining.clone(),
            },
        ))
    }

    #[test]
    fn a_snapshot_of_rules_6_with_a_waiter_reads_back_as_it_was_and_restores() {
        let engine = engine_of_rules_6();
        let snapshot = Snapshot::of(&engine, 5);
        assert_eq!(
            snapshot.image.lines[0].waiters.len(),
            1,
            "the fixture waits"
        );
        let bytes = written_by_rules_6(&snapshot);
        let read = Snapshot::decode(&bytes).unwrap();
        assert_eq!((read.seq, read.setup.rules), (5, 6));
        assert_eq!(read.image, snapshot.image);
        let (restored, _) = Engine::restore(read.setup, read.draining, read.image).unwrap();
        assert_eq!(restored.image(), engine.image());
        // Cut short, it is refused rather than misread.
        assert!(Snapshot::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
