//! Every quota group's books ([`QuotaGroup`]), opened on first use with the limits the group is
//! held to (its project's own for the model, or else the model's in the pool), and brought to the
//! current time whenever they are looked at for a decision.

use super::EngineConfig;
use super::calendar::{DailyReset, Time};
use super::catalogue::{Catalogue, GroupKey, ModelIdx, PoolIdx};
use super::quota::{Amount, BookKeeping, Limits, QuotaGroup};
use foldhash::{HashMap, HashMapExt};

#[derive(Debug)]
pub(super) struct Books {
    groups: HashMap<GroupKey, QuotaGroup>,
    /// A model's limits in a pool.
    model_limits: HashMap<(PoolIdx, ModelIdx), Limits>,
    /// A project's own limits for a model, replacing the model's.
    project_limits: HashMap<GroupKey, Limits>,
    daily: DailyReset,
    keeping: BookKeeping,
}

impl Books {
    /// Empty books for the pools, models and projects of `catalogue`.
    pub fn new(config: &EngineConfig, catalogue: &Catalogue) -> Self {
        let mut books = Self {
            groups: HashMap::new(),
            model_limits: HashMap::new(),
            project_limits: HashMap::new(),
            daily: config.daily,
            keeping: config.book_keeping(),
        };
        for (name, pool_config) in &config.pools {
            let pool = catalogue
                .pool_by_name(name)
                .expect("the catalogue has every pool");
            for (model, limits) in &pool_config.models {
                let model = catalogue.models.get(model).expect("interned");
                books.model_limits.insert((pool, model), *limits);
            }
            for ((project, model), limits) in &pool_config.project_limits {
                let group = GroupKey {
                    pool,
                    project: catalogue.projects.get(project).expect("interned"),
                    model: catalogue.models.get(model).expect("interned"),
                };
                books.project_limits.insert(group, *limits);
            }
        }
        books
    }

    /// The limits a group is held to: its project's own, or else its model's.
    pub fn limits_of(&self, key: GroupKey) -> Limits {
        self.project_limits
            .get(&key)
            .or_else(|| self.model_limits.get(&(key.pool, key.model)))
            .copied()
            .unwrap_or_default()
    }

    /// The group's books brought to `now` (opened on first use).
    pub fn group(&mut self, key: GroupKey, now: Time) -> &mut QuotaGroup {
        let limits = self.limits_of(key);
        let daily = self.daily;
        let group = self
            .groups
            .entry(key)
            .or_insert_with(|| QuotaGroup::new(limits, now, daily));
        group.advance(now, daily);
        group
    }

    /// A lease of the group that reserved `reserved` ended at `time` having used `used`.
    pub fn settle(&mut self, key: GroupKey, time: Time, reserved: Amount, used: Amount) {
        let keeping = self.keeping;
        self.group(key, time).settle(time, keeping, reserved, used);
    }

    /// The groups as they stand (not brought to the current time).
    pub fn iter(&self) -> impl Iterator<Item = (GroupKey, &QuotaGroup)> {
        self.groups.iter().map(|(&key, group)| (key, group))
    }

    /// The groups as they read at `time`, without changing them.
    pub fn read_at(&self, time: Time) -> impl Iterator<Item = (GroupKey, QuotaGroup)> + '_ {
        self.groups.iter().map(move |(&key, group)| {
            let mut group = group.clone();
            group.advance(time, self.daily);
            (key, group)
        })
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// The next time a group of `pool` changes by itself after `time`.
    pub fn next_change_in_pool(&self, pool: PoolIdx, time: Time) -> Option<u64> {
        self.groups
            .iter()
            .filter(|(key, _)| key.pool == pool)
            .filter_map(|(_, group)| group.next_change_after(time))
            .min()
    }

    /// Puts a group's books back (recovery), held to the limits configured now.
    pub fn restore(&mut self, key: GroupKey, mut group: QuotaGroup) {
        group.limits = self.limits_of(key);
        self.groups.insert(key, group);
    }
}
