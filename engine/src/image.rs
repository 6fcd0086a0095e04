//! The engine's whole state as data, by names and key fingerprints rather than indexes: what a
//! snapshot stores, what a new configuration carries over, and what determinism tests compare.
//! An image taken, restored into an engine of the same setup and taken again is the same image.

use super::catalogue::GroupKey;
use super::ids::KeyIdx;
use super::ids::Token;
use super::learning::Learned;
use super::leases::Lease;
use super::outage::Answers;
use super::quota::QuotaGroup;
use super::tenants::{FairClock, Place, Priority};
use super::waiting::{Ask, WaitQueue, Waiter};
use super::{
    Disabled, Engine, EventKind, KeyCheck, KeyRecord, KeySpec, Reconfigured, Setup, SetupError,
    Time, Unavailable, UnavailableReason, WaiterId,
};
use foldhash::{HashMap, HashSet};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub time: Time,
    pub next_token: u64,
    pub next_waiter: u64,
    /// Capacity was freed since the lines were last served.
    pub freed: bool,
    /// In catalogue order.
    pub keys: Vec<KeyImage>,
    /// Live leases, by fencing token.
    pub leases: Vec<LeaseImage>,
    /// By (pool, project, model).
    pub groups: Vec<GroupImage>,
    /// (pool, project, consecutive rate-limit cooldowns), sorted.
    pub backoff: Vec<(String, String, u32)>,
    /// Per task, (key identity, until): least recently touched first.
    pub exclusions: Vec<(String, Vec<(String, u64)>)>,
    /// Client request id and the token it was granted: least recently touched first.
    pub request_ids: Vec<(String, u64)>,
    /// Ended leases remembered for late reports: least recently touched first.
    pub ended: Vec<LeaseImage>,
    /// By (pool, model).
    pub lines: Vec<LineImage>,
    /// (pool, project, recent answers), sorted: the evidence of a wave across the pool.
    pub waves: Vec<(String, String, Answers)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyImage {
    pub id: String,
    /// The key's identity across configurations (its fingerprint).
    pub identity: String,
    pub disabled: Option<Disabled>,
    pub last_granted_ms: u64,
    /// Leases from this fencing token on were granted after it was last enabled (rules 8 on).
    pub enabled_from_token: u64,
    pub last_check: Option<KeyCheck>,
    pub awaiting_check: bool,
    pub record: KeyRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseImage {
    pub token: u64,
    /// The identity of its key.
    pub key: String,
    pub task_id: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub ttl_ms: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupImage {
    pub pool: String,
    pub project: String,
    pub model: String,
    pub books: QuotaGroup,
    /// What the provider's 429s taught the group.
    pub learned: Option<Learned>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineImage {
    pub pool: String,
    pub model: String,
    /// By id (their places say the line's order).
    pub waiters: Vec<WaiterImage>,
    /// Projects a waiter could not have at the last pass, with the most urgent class that
    /// could not, sorted.
    pub blocked: Vec<(String, Priority)>,
    pub wake_at_ms: Option<u64>,
    /// The line's fair-queueing clock: where it stands, and each tenant's finish past it,
    /// sorted (rules 9 on).
    pub clock_now: u64,
    pub finishes: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaiterImage {
    pub id: WaiterId,
    pub task_id: String,
    /// Identities of the keys it asked to exclude, sorted.
    pub excluded: Vec<String>,
    pub requests: u64,
    pub tokens: u64,
    pub ttl_ms: u64,
    pub client_request_id: Option<String>,
    pub exclusion_ends: Vec<u64>,
    /// A renewal's: the fencing token of the live lease it waits on (rules 7 on).
    pub renews: Option<u64>,
    /// Whom it waits for, and its place in line (rules 9 on).
    pub tenant: String,
    pub place: Place,
}

impl Engine {
    /// The whole state, as data.
    pub fn image(&self) -> Image {
        let catalogue = &self.catalogue;
        let identity = |key: KeyIdx| catalogue.key(key).spec.identity().to_string();
        let lease_image = |token: Token, lease: &Lease| LeaseImage {
            token,
            key: identity(lease.key),
            task_id: lease.task_id.clone(),
            model: catalogue.models.name(lease.model).to_string(),
            requests: lease.requests,
            tokens: lease.tokens,
            ttl_ms: lease.ttl_ms,
            expires_ms: lease.expires_ms,
        };
        let mut leases: Vec<LeaseImage> = self
            .leases
            .iter()
            .map(|(token, lease)| lease_image(token, lease))
            .collect();
        leases.sort_by_key(|lease| lease.token);
        let mut groups: Vec<GroupImage> = self
            .books
            .iter()
            .map(|(g, books)| GroupImage {
                pool: catalogue.pool_name(g).to_string(),
                project: catalogue.projects.name(g.project).to_string(),
                model: catalogue.models.name(g.model).to_string(),
                books: books.clone(),
                learned: self.books.learned(g).cloned(),
            })
            .collect();
        groups
            .sort_by(|a, b| (&a.pool, &a.project, &a.model).cmp(&(&b.pool, &b.project, &b.model)));
        let mut backoff: Vec<(String, String, u32)> = self
            .memory
            .backoffs()
            .map(|((pool, project), count)| {
                (
                    catalogue.pool(pool).name.clone(),
                    catalogue.projects.name(project).to_string(),
                    count,
                )
            })
            .collect();
        backoff.sort();
        let mut waves: Vec<(String, String, Answers)> = self
            .waves
            .iter()
            .map(|((pool, project), answers)| {
                (
                    catalogue.pool(pool).name.clone(),
                    catalogue.projects.name(project).to_string(),
                    answers,
                )
            })
            .collect();
        waves.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let lines = self
            .lines
            .iter()
            .map(|((pool, model), queue)| {
                let mut blocked: Vec<(String, Priority)> = queue
                    .blocked
                    .iter()
                    .map(|(g, &class)| (catalogue.projects.name(g.project).to_string(), class))
                    .collect();
                blocked.sort();
                let mut finishes: Vec<(String, u64)> = queue
                    .clock
                    .finishes
                    .iter()
                    .map(|(tenant, &finish)| (tenant.clone(), finish))
                    .collect();
                finishes.sort();
                LineImage {
                    pool: catalogue.pool(pool).name.clone(),
                    model: catalogue.models.name(model).to_string(),
                    waiters: queue
                        .waiters
                        .iter()
                        .map(|(&id, waiter)| {
                            let mut excluded: Vec<String> =
                                waiter.ask.excluded.iter().map(|&k| identity(k)).collect();
                            excluded.sort();
                            WaiterImage {
                                id,
                                task_id: waiter.task_id.clone(),
                                excluded,
                                requests: waiter.ask.requests,
                                tokens: waiter.ask.tokens,
                                ttl_ms: waiter.ask.ttl_ms,
                                client_request_id: waiter.client_request_id.clone(),
                                exclusion_ends: waiter.exclusion_ends.clone(),
                                renews: waiter.renews,
                                tenant: waiter.tenant.clone(),
                                place: waiter.place,
                            }
                        })
                        .collect(),
                    blocked,
                    wake_at_ms: queue.wake_at_ms,
                    clock_now: queue.clock.now,
                    finishes,
                }
            })
            .collect();
        Image {
            time: self.time,
            next_token: self.leases.next_token(),
            next_waiter: self.lines.next_waiter(),
            freed: self.freed,
            keys: catalogue
                .keys()
                .iter()
                .enumerate()
                .filter(|(_, key)| !key.is_gone())
                .map(|(idx, key)| KeyImage {
                    id: key.spec.id.clone(),
                    identity: key.spec.identity().to_string(),
                    disabled: key.disabled.clone(),
                    last_granted_ms: key.last_granted_ms,
                    enabled_from_token: key.enabled_from_token,
                    last_check: key.last_check.clone(),
                    awaiting_check: key.awaiting_check,
                    record: catalogue.record_of(idx).clone(),
                })
                .collect(),
            leases,
            groups,
            backoff,
            exclusions: self
                .memory
                .exclusions_oldest_first()
                .map(|(task, list)| {
                    let list = list
                        .iter()
                        .map(|&(k, until)| (identity(k), until))
                        .collect();
                    (task.clone(), list)
                })
                .collect(),
            request_ids: self
                .memory
                .requests_oldest_first()
                .map(|(id, token)| (id.clone(), token))
                .collect(),
            ended: self
                .leases
                .ended_oldest_first()
                .map(|(token, lease)| lease_image(token, lease))
                .collect(),
            lines,
            waves,
        }
    }

    /// An engine configured by `setup`, with the `draining` keys (no longer configured, still
    /// leased), holding the state of `image`: keys are matched by identity, so a key renamed
    /// keeps its leases, disabling and exclusions; what neither has any more (keys, pools,
    /// models) is dropped and reported; the setup's limits apply at once.
    pub fn restore(
        setup: Setup,
        draining: Vec<KeySpec>,
        image: Image,
    ) -> Result<(Self, Reconfigured), SetupError> {
        let (mut engine, _) = Self::with_draining(setup, draining, image.time)?;
        let mut report = Reconfigured::default();
        let by_identity: HashMap<String, KeyIdx> = engine
            .catalogue
            .keys()
            .iter()
            .enumerate()
            .map(|(idx, key)| (key.spec.identity().to_string(), idx))
            .collect();
        engine.time = image.time;
        engine.leases.raise_next_token(image.next_token);
        engine.lines.set_next_waiter(image.next_waiter);
        engine.freed = image.freed;

        // Models a pool serves without listing them are known by what the image names.
        let key_pools = image.leases.iter().chain(&image.ended).filter_map(|lease| {
            let &key = by_identity.get(&lease.key)?;
            Some((engine.catalogue.key(key).pool, lease.model.as_str()))
        });
        let named_pools = image
            .groups
            .iter()
            .map(|g| (g.pool.as_str(), g.model.as_str()))
            .chain(
                image
                    .lines
                    .iter()
                    .map(|l| (l.pool.as_str(), l.model.as_str())),
            )
            .filter_map(|(pool, model)| Some((engine.catalogue.pool_by_name(pool)?, model)));
        let served: Vec<(u32, String)> = key_pools
            .chain(named_pools)
            .map(|(pool, model)| (pool, model.to_string()))
            .collect();
        for (pool, model) in served {
            engine.catalogue.served_model(pool, &model);
        }

        let restore_lease = |engine: &Engine, lease: &LeaseImage| -> Option<Lease> {
            let &key = by_identity.get(&lease.key)?;
            let model = engine.catalogue.models.get(&lease.model)?;
            let pool = engine.catalogue.pool(engine.catalogue.key(key).pool);
            pool.serves(model).then(|| Lease {
                key,
                task_id: lease.task_id.clone(),
                model,
                requests: lease.requests,
                tokens: lease.tokens,
                ttl_ms: lease.ttl_ms,
                expires_ms: lease.expires_ms,
            })
        };
        let mut live: HashMap<KeyIdx, Vec<Token>> = HashMap::default();
        for image_lease in &image.leases {
            let Some(lease) = restore_lease(&engine, image_lease) else {
                if by_identity.contains_key(&image_lease.key) {
                    report.dropped_leases += 1;
                }
                continue;
            };
            live.entry(lease.key).or_default().push(image_lease.token);
            engine.leases.insert(image_lease.token, lease);
        }
        let imaged: HashSet<&str> = image.keys.iter().map(|k| k.identity.as_str()).collect();
        for key in engine.catalogue.keys() {
            if !key.draining && !imaged.contains(key.spec.identity()) {
                report.added_keys.push(key.spec.id.clone());
            }
        }
        for key in &image.keys {
            let Some(&idx) = by_identity.get(&key.identity) else {
                let leases = image
                    .leases
                    .iter()
                    .filter(|l| l.key == key.identity)
                    .count();
                report.dropped_leases += leases;
                report.removed_keys.push(key.id.clone());
                continue;
            };
            let live = live.remove(&idx).unwrap_or_default();
            let draining = engine.catalogue.key(idx).draining;
            if draining && live.is_empty() {
                // Its last lease ended with the configuration that drained it.
                report.removed_keys.push(key.id.clone());
            } else if draining {
                // By the id it drains under: its own, or its own beside its successor's.
                let id = engine.catalogue.key(idx).spec.id.clone();
                report.draining_keys.push((id, live.len()));
            }
            let renamed = engine.catalogue.update(idx, |entry| {
                entry.last_granted_ms = key.last_granted_ms;
                entry.disabled = key.disabled.clone();
                entry.enabled_from_token = key.enabled_from_token;
                entry.last_check = key.last_check.clone();
                // A key checked no longer waits; one that waited keeps waiting while keys are
                // checked.
                entry.awaiting_check = key.awaiting_check && entry.awaiting_check;
                entry.live = live;
                // A secret replaced under its id drains under another: not a rename.
                (!draining && entry.spec.id != key.id).then(|| entry.spec.id.clone())
            });
            *engine.catalogue.record(idx) = key.record.clone();
            if let Some(new_id) = renamed {
                report.renamed_keys.push((key.id.clone(), new_id));
            }
        }

        for group in image.groups {
            let (Some(pool), Some(model)) = (
                engine.catalogue.pool_by_name(&group.pool),
                engine.catalogue.models.get(&group.model),
            ) else {
                continue;
            };
            let key = GroupKey {
                pool,
                project: engine.catalogue.projects.intern(&group.project),
                model,
            };
            engine.books.restore(key, group.books, group.learned);
        }
        for (pool, project, answers) in image.waves {
            if let Some(pool) = engine.catalogue.pool_by_name(&pool) {
                let project = engine.catalogue.projects.intern(&project);
                engine.waves.restore(pool, project, answers);
            }
        }
        for (pool, project, count) in image.backoff {
            if let Some(pool) = engine.catalogue.pool_by_name(&pool) {
                let project = engine.catalogue.projects.intern(&project);
                engine.memory.restore_backoff(pool, project, count);
            }
        }
        for (task, list) in image.exclusions {
            let list: Vec<(KeyIdx, u64)> = list
                .into_iter()
                .filter_map(|(identity, until)| Some((*by_identity.get(&identity)?, until)))
                .collect();
            if !list.is_empty() {
                engine.memory.restore_exclusions(task, list);
            }
        }
        for (id, token) in image.request_ids {
            engine.memory.remember_request(id, token);
        }
        for image_lease in &image.ended {
            if let Some(lease) = restore_lease(&engine, image_lease) {
                engine.leases.remember_ended(image_lease.token, lease);
            }
        }

        for line in image.lines {
            let found = engine.catalogue.pool_by_name(&line.pool).and_then(|pool| {
                let model = engine.catalogue.models.get(&line.model)?;
                engine
                    .catalogue
                    .pool(pool)
                    .serves(model)
                    .then_some((pool, model))
            });
            let Some((pool, model)) = found else {
                let failure = Unavailable {
                    reason: UnavailableReason::AllDisabled,
                    retry_at_ms: None,
                };
                for waiter in line.waiters {
                    engine.notices.waiter_failures.push((waiter.id, failure));
                }
                continue;
            };
            let mut queue = WaitQueue::default();
            queue.blocked = line
                .blocked
                .iter()
                .map(|(project, class)| {
                    let group = GroupKey {
                        pool,
                        project: engine.catalogue.projects.intern(project),
                        model,
                    };
                    (group, *class)
                })
                .collect();
            queue.wake_at_ms = line.wake_at_ms;
            queue.clock = FairClock {
                now: line.clock_now,
                finishes: line.finishes.into_iter().collect(),
            };
            for waiter in line.waiters {
                if let Some(token) = waiter.renews
                    && !engine.leases.is_live(token)
                {
                    // Its lease was dropped with its key, pool or model.
                    let failure = Unavailable {
                        reason: UnavailableReason::AllDisabled,
                        retry_at_ms: None,
                    };
                    engine.notices.waiter_failures.push((waiter.id, failure));
                    continue;
                }
                let excluded: HashSet<KeyIdx> = waiter
                    .excluded
                    .iter()
                    .filter_map(|identity| by_identity.get(identity).copied())
                    .collect();
                queue.push(
                    waiter.id,
                    Waiter {
                        task_id: waiter.task_id,
                        ask: Ask {
                            pool,
                            model,
                            ttl_ms: waiter.ttl_ms,
                            requests: waiter.requests,
                            tokens: waiter.tokens,
                            excluded,
                        },
                        client_request_id: waiter.client_request_id,
                        exclusion_ends: waiter.exclusion_ends,
                        renews: waiter.renews,
                        tenant: waiter.tenant,
                        place: waiter.place,
                    },
                );
            }
            if !queue.waiters.is_empty() {
                engine.lines.restore_line((pool, model), queue);
            }
        }
        Ok((engine, report))
    }

    /// Rebuilds the engine without its gone keys, and without whatever still named them (a
    /// task's exclusion, an ended lease): exactly what an engine restored from a snapshot
    /// taken now would hold, so a replay from any snapshot decides as this engine does.
    pub(super) fn forget_gone_keys(&mut self) {
        let (mut engine, _) = Self::restore(self.setup(), self.draining_keys(), self.image())
            .expect("the engine's own setup is valid");
        engine.notices = std::mem::take(&mut self.notices);
        *self = engine;
    }

    /// Applies a new setup to the current state (see [`Engine::restore`]); on a setup error the
    /// state stays as it was.
    pub(super) fn configure(
        &mut self,
        now: impl Into<Time>,
        setup: Setup,
    ) -> Result<Reconfigured, SetupError> {
        let time = self.tick(now);
        // Keys with live leases drain rather than drop them, whether the new setup still has
        // them or not (the catalogue keeps those it has as configured).
        let leased: Vec<KeySpec> = self
            .catalogue
            .keys()
            .iter()
            .filter(|key| !key.live.is_empty())
            .map(|key| key.spec.clone())
            .collect();
        let (mut engine, report) = Self::restore(setup, leased, self.image())?;
        engine.time = time;
        let mut events: Vec<EventKind> = Vec::new();
        for key_id in &report.added_keys {
            events.push(EventKind::KeyAdded {
                key_id: key_id.clone(),
            });
        }
        let was_draining: HashSet<&str> = self
            .catalogue
            .keys()
            .iter()
            .filter(|key| key.draining)
            .map(|key| key.spec.id.as_str())
            .collect();
        for (key_id, leases) in &report.draining_keys {
            if !was_draining.contains(key_id.as_str()) {
                events.push(EventKind::KeyDraining {
                    key_id: key_id.clone(),
                    leases: *leases,
                });
            }
        }
        for key_id in &report.removed_keys {
            events.push(EventKind::KeyRemoved {
                key_id: key_id.clone(),
            });
        }
        // The new limits or keys may serve someone waiting.
        engine.freed = true;
        engine.notices = std::mem::take(&mut self.notices);
        *self = engine;
        for event in events {
            self.emit(time, event);
        }
        self.tick(time);
        Ok(report)
    }
}
