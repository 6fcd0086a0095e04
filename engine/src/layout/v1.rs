//! Snapshots as the first state format wrote them (before limits were learned), read into
//! today's types: limits were figures only, pools listed every model they served, and groups
//! had learned nothing. Frozen: nothing here changes with the engine.

use super::Snapshot;
use super::v6::LineImageV6;
use super::v7::KeyImageV7;
use crate::image::{GroupImage, Image, LeaseImage};
use crate::quota::Limits;
use crate::quota::before_tokens_per_day::QuotaGroupV3;
use crate::{DailyReset, EngineConfig, KeySpec, PoolConfig, Setup, Time};
use serde::Deserialize;
use std::collections::BTreeMap;

/// How many windows a lowered limit waited to climb when nothing configured it.
const RELEARN_AFTER_WINDOWS: u32 = 10;

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct LimitsV1 {
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    requests_per_day: Option<u64>,
}

impl From<LimitsV1> for Limits {
    fn from(v1: LimitsV1) -> Self {
        Self {
            requests_per_minute: v1.requests_per_minute,
            tokens_per_minute: v1.tokens_per_minute,
            requests_per_day: v1.requests_per_day,
            tokens_per_day: None,
            auto: [false; 4],
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct PoolConfigV1 {
    max_leases_per_key: u32,
    models: BTreeMap<String, LimitsV1>,
    project_limits: BTreeMap<(String, String), LimitsV1>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct EngineConfigV1 {
    default_ttl_ms: u64,
    max_ttl_ms: u64,
    max_requests_per_lease: u32,
    window_ms: u64,
    safety_margin_ms: u64,
    exclusion_ttl_ms: u64,
    cooldown_base_ms: u64,
    cooldown_max_ms: u64,
    memory_capacity: usize,
    daily: DailyReset,
    pools: BTreeMap<String, PoolConfigV1>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SetupV1 {
    config: EngineConfigV1,
    keys: Vec<KeySpec>,
    token_floor: u64,
    rules: u32,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct GroupImageV1 {
    pool: String,
    project: String,
    model: String,
    books: QuotaGroupV3,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ImageV1 {
    time: Time,
    next_token: u64,
    next_waiter: u64,
    freed: bool,
    keys: Vec<KeyImageV7>,
    leases: Vec<LeaseImage>,
    groups: Vec<GroupImageV1>,
    backoff: Vec<(String, String, u32)>,
    exclusions: Vec<(String, Vec<(String, u64)>)>,
    request_ids: Vec<(String, u64)>,
    ended: Vec<LeaseImage>,
    lines: Vec<LineImageV6>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SnapshotV1 {
    seq: u64,
    setup: SetupV1,
    image: ImageV1,
    draining: Vec<KeySpec>,
}

/// A snapshot written before keys could drain.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SnapshotBeforeDraining {
    seq: u64,
    setup: SetupV1,
    image: ImageV1,
}

/// A snapshot of the first format, as today's.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, postcard::Error> {
    let v1 = match super::decode::<SnapshotV1>(bytes) {
        Ok(v1) => v1,
        Err(postcard::Error::DeserializeUnexpectedEnd) => {
            let before: SnapshotBeforeDraining = super::decode(bytes)?;
            SnapshotV1 {
                seq: before.seq,
                setup: before.setup,
                image: before.image,
                draining: Vec::new(),
            }
        }
        Err(error) => return Err(error),
    };
    Ok(Snapshot {
        seq: v1.seq,
        setup: setup(v1.setup),
        image: image(v1.image),
        draining: v1.draining,
    })
}

fn limits<K: Ord>(map: BTreeMap<K, LimitsV1>) -> BTreeMap<K, Limits> {
    map.into_iter().map(|(k, v)| (k, v.into())).collect()
}

fn setup(v1: SetupV1) -> Setup {
    let c = v1.config;
    Setup {
        config: EngineConfig {
            default_ttl_ms: c.default_ttl_ms,
            max_ttl_ms: c.max_ttl_ms,
            max_requests_per_lease: c.max_requests_per_lease,
            window_ms: c.window_ms,
            safety_margin_ms: c.safety_margin_ms,
            exclusion_ttl_ms: c.exclusion_ttl_ms,
            cooldown_base_ms: c.cooldown_base_ms,
            cooldown_max_ms: c.cooldown_max_ms,
            memory_capacity: c.memory_capacity,
            daily: c.daily,
            pools: c
                .pools
                .into_iter()
                .map(|(name, pool)| {
                    let pool = PoolConfig {
                        max_leases_per_key: pool.max_leases_per_key,
                        models: limits(pool.models),
                        project_limits: limits(pool.project_limits),
                        other_models: None,
                    };
                    (name, pool)
                })
                .collect(),
            relearn_after_windows: RELEARN_AFTER_WINDOWS,
            check_keys: false,
        },
        keys: v1.keys,
        token_floor: v1.token_floor,
        rules: v1.rules,
    }
}

fn image(v1: ImageV1) -> Image {
    Image {
        time: v1.time,
        next_token: v1.next_token,
        next_waiter: v1.next_waiter,
        freed: v1.freed,
        keys: super::v7::keys(v1.keys),
        leases: v1.leases,
        groups: v1
            .groups
            .into_iter()
            .map(|g| GroupImage {
                pool: g.pool,
                project: g.project,
                model: g.model,
                books: g.books.into(),
                learned: None,
            })
            .collect(),
        backoff: v1.backoff,
        exclusions: v1.exclusions,
        request_ids: v1.request_ids,
        ended: v1.ended,
        lines: super::v6::lines(v1.lines),
        waves: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Limits;
    use crate::{Engine, image::Image};

    fn limits_v1(limits: Limits) -> LimitsV1 {
        LimitsV1 {
            requests_per_minute: limits.requests_per_minute,
            tokens_per_minute: limits.tokens_per_minute,
            requests_per_day: limits.requests_per_day,
        }
    }

    /// What the first format wrote for `setup` and `image`.
    fn written_by_v1(setup: &Setup, image: &Image) -> (SetupV1, ImageV1) {
        let c = setup.config.clone();
        let config = EngineConfigV1 {
            default_ttl_ms: c.default_ttl_ms,
            max_ttl_ms: c.max_ttl_ms,
            max_requests_per_lease: c.max_requests_per_lease,
            window_ms: c.window_ms,
            safety_margin_ms: c.safety_margin_ms,
            exclusion_ttl_ms: c.exclusion_ttl_ms,
            cooldown_base_ms: c.cooldown_base_ms,
            cooldown_max_ms: c.cooldown_max_ms,
            memory_capacity: c.memory_capacity,
            daily: c.daily,
            pools: c
                .pools
                .into_iter()
                .map(|(name, pool)| {
                    let pool = PoolConfigV1 {
                        max_leases_per_key: pool.max_leases_per_key,
                        models: pool
                            .models
                            .into_iter()
                            .map(|(k, v)| (k, limits_v1(v)))
                            .collect(),
                        project_limits: pool
                            .project_limits
                            .into_iter()
                            .map(|(k, v)| (k, limits_v1(v)))
                            .collect(),
                    };
                    (name, pool)
                })
                .collect(),
        };
        let image = image.clone();
        let image = ImageV1 {
            time: image.time,
            next_token: image.next_token,
            next_waiter: image.next_waiter,
            freed: image.freed,
            keys: super::super::v7::keys_v7(image.keys),
            leases: image.leases,
            groups: image
                .groups
                .into_iter()
                .map(|g| GroupImageV1 {
                    pool: g.pool,
                    project: g.project,
                    model: g.model,
                    books: g.books.into(),
                })
                .collect(),
            backoff: image.backoff,
            exclusions: image.exclusions,
            request_ids: image.request_ids,
            ended: image.ended,
            lines: super::super::v6::lines_v6(image.lines),
        };
        let setup = SetupV1 {
            config,
            keys: setup.keys.clone(),
            token_floor: setup.token_floor,
            rules: 1,
        };
        (setup, image)
    }

    fn engine_with_books() -> Engine {
        let setup = super::super::setup_of_an_older_build(crate::RULES_VERSION);
        let mut engine = Engine::new(setup, Time::at(5_000)).unwrap();
        let ask = crate::AcquireRequest {
            task_id: "t".into(),
            model: "m".into(),
            ..Default::default()
        };
        engine.apply(Time::at(6_000), crate::Command::Acquire(ask));
        engine
    }

    #[test]
    fn a_first_format_snapshot_is_read_with_nothing_learned() {
        let engine = engine_with_books();
        let (setup, image) = written_by_v1(&engine.setup(), &engine.image());
        let bytes = super::super::encode(&SnapshotV1 {
            seq: 7,
            setup,
            image,
            draining: Vec::new(),
        });
        let snapshot = Snapshot::decode(&bytes).unwrap();
        assert_eq!(snapshot.seq, 7);
        assert_eq!(snapshot.setup.rules, 1);
        assert_eq!(snapshot.image.groups.len(), 1);
        // The books come back whole; the auto marks were never stored with them.
        let expected = without_auto_marks(engine.image());
        assert_eq!(snapshot.image, expected);
        // Cut inside the image, it is refused rather than misread.
        assert!(Snapshot::decode(&bytes[..bytes.len() - 2]).is_err());
        // Today's snapshots read back as written.
        let today = Snapshot::decode(&Snapshot::of(&engine, 9).encode()).unwrap();
        assert_eq!((today.seq, today.setup.rules), (9, crate::RULES_VERSION));
        assert_eq!(today.image, expected);
    }

    /// Books keep their limits' figures only: restored, the configuration sets them again.
    fn without_auto_marks(mut image: Image) -> Image {
        for group in &mut image.groups {
            group.books.limits.auto = [false; 4];
        }
        image
    }

    #[test]
    fn a_snapshot_written_before_keys_could_drain_is_read() {
        let engine = engine_with_books();
        let (setup, image) = written_by_v1(&engine.setup(), &engine.image());
        let bytes = super::super::encode(&SnapshotBeforeDraining {
            seq: 7,
            setup,
            image,
        });
        let snapshot = Snapshot::decode(&bytes).unwrap();
        assert_eq!((snapshot.seq, snapshot.draining.len()), (7, 0));
        assert_eq!(
            snapshot.setup.config.relearn_after_windows,
            RELEARN_AFTER_WINDOWS
        );
    }
}
