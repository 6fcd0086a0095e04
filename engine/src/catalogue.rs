//! The key catalogue: every configured key with its pool and project, its health (see
//! [`super::health`]), which live leases each holds, and each pool's free set (enabled keys
//! with a free slot, least recently granted first). A key no longer configured while leases
//! run on it stays, draining: never lent again, and gone from every view once its last lease
//! ends. A secret replaced under the same id drains under an id of its own (see
//! [`draining_id`]), beside its successor. A key only changes through [`Catalogue::update`],
//! which keeps the free set and the pool's count of enabled keys in step with it; but for its
//! record, which neither depends on ([`Catalogue::record`], cheap on the lease path).

use super::health::{Disabled, KeyCheck};
use super::ids::{KeyIdx, ModelIdx, PoolIdx, ProjectIdx, Token};
use super::performance::KeyRecord;
use super::quota::Limits;
use super::{EngineConfig, KeySpec, PoolConfig, SetupError};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::BTreeSet;

/// A (pool, project, model): the unit the provider's limits apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct GroupKey {
    pub pool: PoolIdx,
    pub project: ProjectIdx,
    pub model: ModelIdx,
}

/// Names of projects or models, interned: small indexes inside the engine, names at its edges.
#[derive(Debug, Default)]
pub(super) struct Names {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Names {
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&idx) = self.index.get(name) {
            return idx;
        }
        let idx = self.names.len() as u32;
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), idx);
        idx
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn name(&self, idx: u32) -> &str {
        &self.names[idx as usize]
    }
}

#[derive(Debug)]
pub(super) struct Key {
    pub spec: KeySpec,
    pub pool: PoolIdx,
    pub project: ProjectIdx,
    pub max_leases: u32,
    pub disabled: Option<Disabled>,
    /// Leases from this fencing token on were granted after the key was last enabled.
    pub enabled_from_token: u64,
    /// What the last check with the provider found.
    pub last_check: Option<KeyCheck>,
    /// Added while keys are checked: never lent before its first check answers.
    pub awaiting_check: bool,
    /// No longer configured: it serves its live leases to their end and is never lent again.
    pub draining: bool,
    /// Fencing tokens of its live leases, oldest first.
    pub live: Vec<Token>,
    /// Orders the pool's free keys: least recently granted first.
    pub last_granted_ms: u64,
}

impl Key {
    pub fn has_free_slot(&self) -> bool {
        self.is_lendable() && (self.live.len() as u32) < self.max_leases
    }

    /// Neither disabled, draining, nor waiting for its first check.
    pub fn is_lendable(&self) -> bool {
        self.disabled.is_none() && !self.draining && !self.awaiting_check
    }

    /// Drained: no longer configured and no lease left on it. Nothing shows it any more.
    pub fn is_gone(&self) -> bool {
        self.draining && self.live.is_empty()
    }

    /// Its place in the pool's free set.
    fn slot(&self, idx: KeyIdx) -> (u64, KeyIdx) {
        (self.last_granted_ms, idx)
    }

    /// The project and model it serves for `model`.
    pub fn group(&self, model: ModelIdx) -> GroupKey {
        GroupKey {
            pool: self.pool,
            project: self.project,
            model,
        }
    }
}

#[derive(Debug)]
pub(super) struct Pool {
    pub name: String,
    pub config: PoolConfig,
    pub keys: Vec<KeyIdx>,
    enabled_keys: usize,
    /// Enabled keys with a free slot, least recently granted first.
    free: BTreeSet<(u64, KeyIdx)>,
    /// Per model: the largest limit of any project (`None`: some project has no limit), so
    /// that an ask no project could ever serve is refused at once.
    pub largest_limits: HashMap<ModelIdx, Limits>,
    /// Models served that its configuration does not list (named by clients).
    unlisted: BTreeSet<ModelIdx>,
}

impl Pool {
    pub fn enabled_keys(&self) -> usize {
        self.enabled_keys
    }

    /// Whether a key of the pool waits for its first check: the pool may serve once it is
    /// checked, though no key is enabled now.
    pub fn awaits_check(&self, keys: &[Key]) -> bool {
        self.keys.iter().any(|&key| keys[key].awaiting_check)
    }

    /// Enabled keys with a free slot, least recently granted first.
    pub fn free_keys(&self) -> impl Iterator<Item = KeyIdx> + '_ {
        self.free.iter().map(|&(_, key)| key)
    }

    pub fn serves(&self, model: ModelIdx) -> bool {
        self.largest_limits.contains_key(&model)
    }

    /// The models it serves that its configuration does not list.
    pub fn unlisted(&self) -> impl Iterator<Item = ModelIdx> + '_ {
        self.unlisted.iter().copied()
    }

    /// Whether it serves as many unlisted models as it may: a new one needs room first.
    pub fn unlisted_full(&self) -> bool {
        self.unlisted.len() >= MAX_OTHER_MODELS
    }
}

/// The rules from which a secret replaced under the same id drains beside its successor, where
/// it was dropped with its leases.
pub(super) const RULES_ROTATION: u32 = 8;

/// The id a draining secret goes by while a configured key has its id: the id, and the start
/// of its fingerprint (a keyed hash, which says nothing of the secret).
pub(super) fn draining_id(spec: &KeySpec) -> String {
    let identity = spec.identity();
    let short = identity.get(..8).unwrap_or(identity);
    format!("{}~{short}", spec.id)
}

/// How many models not listed in its configuration a pool serves at most: each is named by a
/// client, and remembered.
pub(super) const MAX_OTHER_MODELS: usize = 1_000;

#[derive(Debug)]
pub(super) struct Catalogue {
    keys: Vec<Key>,
    /// Each key's calls, failures and latency (see [`super::performance`]), beside the keys
    /// rather than in them: the lease path reads a key's other fields far more often.
    records: Vec<KeyRecord>,
    by_id: HashMap<String, KeyIdx>,
    pools: Vec<Pool>,
    pool_by_name: HashMap<String, PoolIdx>,
    pub projects: Names,
    pub models: Names,
}

impl Catalogue {
    /// The keys of `specs`, then those of `draining` (no longer configured, still leased),
    /// except any whose pool is gone: those are returned. A draining key whose id a configured
    /// key took goes by [`draining_id`] from rules 8 on; before, it was returned too.
    pub fn new(
        config: &EngineConfig,
        specs: Vec<KeySpec>,
        draining: Vec<KeySpec>,
        rules: u32,
    ) -> Result<(Self, Vec<KeySpec>), SetupError> {
        let mut catalogue = Self {
            keys: Vec::new(),
            records: Vec::new(),
            by_id: HashMap::new(),
            pools: Vec::new(),
            pool_by_name: HashMap::new(),
            projects: Names::default(),
            models: Names::default(),
        };
        for (name, pool_config) in &config.pools {
            let idx = catalogue.pools.len() as PoolIdx;
            let mut largest_limits = HashMap::new();
            for (model, limits) in &pool_config.models {
                largest_limits.insert(catalogue.models.intern(model), *limits);
            }
            for ((project, model), limits) in &pool_config.project_limits {
                catalogue.projects.intern(project);
                let largest = largest_limits
                    .entry(catalogue.models.intern(model))
                    .or_insert(*limits);
                *largest = larger_limits(*largest, *limits);
            }
            catalogue.pool_by_name.insert(name.clone(), idx);
            catalogue.pools.push(Pool {
                name: name.clone(),
                config: pool_config.clone(),
                keys: Vec::new(),
                enabled_keys: 0,
                free: BTreeSet::new(),
                largest_limits,
                unlisted: BTreeSet::new(),
            });
        }
        // A draining key configured again serves as configured.
        let configured_identities: HashSet<String> =
            specs.iter().map(|s| s.identity().to_string()).collect();
        let draining: Vec<KeySpec> = draining
            .into_iter()
            .filter(|spec| !configured_identities.contains(spec.identity()))
            .collect();
        let mut identities = HashSet::new();
        let mut left_out = Vec::new();
        let configured = specs.len();
        for (position, mut spec) in specs.into_iter().chain(draining).enumerate() {
            let is_draining = position >= configured;
            if is_draining && catalogue.by_id.contains_key(&spec.id) && rules >= RULES_ROTATION {
                // Its secret was replaced: it drains beside the new one.
                spec.id = draining_id(&spec);
            }
            if is_draining
                && (catalogue.by_id.contains_key(&spec.id)
                    || !catalogue.pool_by_name.contains_key(&spec.pool))
            {
                left_out.push(spec);
                continue;
            }
            if catalogue.by_id.contains_key(&spec.id) {
                return Err(SetupError::DuplicateKeyId(spec.id));
            }
            if !identities.insert(spec.identity().to_string()) {
                return Err(SetupError::DuplicateSecret(spec.id));
            }
            let Some(&pool) = catalogue.pool_by_name.get(&spec.pool) else {
                return Err(SetupError::UnknownPool {
                    key: spec.id,
                    pool: spec.pool,
                });
            };
            let idx = catalogue.keys.len();
            let project = catalogue.projects.intern(&spec.project);
            let pool_entry = &mut catalogue.pools[pool as usize];
            let max_leases = spec
                .max_leases
                .unwrap_or(pool_entry.config.max_leases_per_key);
            pool_entry.keys.push(idx);
            let awaiting_check = config.check_keys && !is_draining;
            if !is_draining && !awaiting_check {
                pool_entry.enabled_keys += 1;
                pool_entry.free.insert((0, idx));
            }
            catalogue.by_id.insert(spec.id.clone(), idx);
            catalogue.records.push(KeyRecord::default());
            catalogue.keys.push(Key {
                spec,
                pool,
                project,
                max_leases,
                disabled: None,
                enabled_from_token: 0,
                last_check: None,
                awaiting_check,
                draining: is_draining,
                live: Vec::new(),
                last_granted_ms: 0,
            });
        }
        Ok((catalogue, left_out))
    }

    pub fn key(&self, idx: KeyIdx) -> &Key {
        &self.keys[idx]
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The key with this id, unless it is gone.
    pub fn key_by_id(&self, id: &str) -> Option<KeyIdx> {
        self.by_id
            .get(id)
            .copied()
            .filter(|&idx| !self.keys[idx].is_gone())
    }

    /// The key whose identity (fingerprint) is `identity`, unless it is gone.
    pub fn key_by_identity(&self, identity: &str) -> Option<KeyIdx> {
        self.keys
            .iter()
            .position(|key| key.spec.identity() == identity && !key.is_gone())
    }

    pub fn pool(&self, idx: PoolIdx) -> &Pool {
        &self.pools[idx as usize]
    }

    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    pub fn pool_by_name(&self, name: &str) -> Option<PoolIdx> {
        self.pool_by_name.get(name).copied()
    }

    /// The model `name` of `pool` if it serves it now: a listed one, or an unlisted one it
    /// remembers.
    pub fn model_served(&self, pool: PoolIdx, name: &str) -> Option<ModelIdx> {
        self.models
            .get(name)
            .filter(|&m| self.pools[pool as usize].serves(m))
    }

    /// The model `name` of `pool`: a listed one, or else one the pool serves as any other
    /// model (remembered from then on). `None` when the pool serves no such model, or already
    /// serves [`MAX_OTHER_MODELS`] unlisted ones (see [`Catalogue::forget_unlisted`]).
    pub fn served_model(&mut self, pool: PoolIdx, name: &str) -> Option<ModelIdx> {
        if let Some(model) = self.model_served(pool, name) {
            return Some(model);
        }
        let entry = &self.pools[pool as usize];
        let limits = entry.config.other_models?;
        if entry.unlisted_full() {
            return None;
        }
        let model = self.models.intern(name);
        let entry = &mut self.pools[pool as usize];
        entry.unlisted.insert(model);
        entry.largest_limits.insert(model, limits);
        Some(model)
    }

    /// `pool` no longer serves the unlisted `model` (until a client names it again).
    pub fn forget_unlisted(&mut self, pool: PoolIdx, model: ModelIdx) {
        let entry = &mut self.pools[pool as usize];
        if entry.unlisted.remove(&model) {
            entry.largest_limits.remove(&model);
        }
    }

    /// The pool of a group, by name.
    pub fn pool_name(&self, group: GroupKey) -> &str {
        &self.pools[group.pool as usize].name
    }

    /// Changes a key, keeping its place in the free set and its pool's count in step.
    pub fn update<R>(&mut self, idx: KeyIdx, change: impl FnOnce(&mut Key) -> R) -> R {
        let key = &mut self.keys[idx];
        let pool = &mut self.pools[key.pool as usize];
        let was_enabled = key.is_lendable();
        pool.free.remove(&key.slot(idx));
        let result = change(key);
        if key.has_free_slot() {
            pool.free.insert(key.slot(idx));
        }
        match (was_enabled, key.is_lendable()) {
            (true, false) => pool.enabled_keys -= 1,
            (false, true) => pool.enabled_keys += 1,
            _ => {}
        }
        result
    }

    /// The key takes on lease `token`, granted at `now_ms`.
    pub fn lend(&mut self, idx: KeyIdx, token: Token, now_ms: u64) {
        self.update(idx, |key| {
            key.live.push(token);
            key.last_granted_ms = now_ms;
        });
        self.records[idx].granted();
    }

    /// The key's record, to change: no set depends on it.
    pub fn record(&mut self, idx: KeyIdx) -> &mut KeyRecord {
        &mut self.records[idx]
    }

    pub fn record_of(&self, idx: KeyIdx) -> &KeyRecord {
        &self.records[idx]
    }

    /// Lease `token` on the key ended.
    pub fn give_back(&mut self, idx: KeyIdx, token: Token) {
        self.update(idx, |key| key.live.retain(|&t| t != token));
    }
}

/// Per limit, the larger; no limit is the largest.
fn larger_limits(a: Limits, b: Limits) -> Limits {
    let larger = |x: Option<u64>, y: Option<u64>| x.zip(y).map(|(x, y)| x.max(y));
    Limits {
        requests_per_minute: larger(a.requests_per_minute, b.requests_per_minute),
        tokens_per_minute: larger(a.tokens_per_minute, b.tokens_per_minute),
        requests_per_day: larger(a.requests_per_day, b.requests_per_day),
        tokens_per_day: larger(a.tokens_per_day, b.tokens_per_day),
        auto: a.auto,
    }
}
