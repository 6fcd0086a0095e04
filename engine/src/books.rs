//! Every quota group's books ([`QuotaGroup`]), opened on first use with the limits the group is
//! held to (its project's own for the model, or else the model's in the pool, lowered by what
//! the provider taught: [`Learned`]), and brought to the current time whenever they are looked
//! at for a decision.

use super::EngineConfig;
use super::calendar::{DailyReset, Time};
use super::catalogue::{Catalogue, GroupKey};
use super::ids::{ModelIdx, PoolIdx};
use super::learning::{Evidence, Learned, LimitChange, LimitKind, Tuning};
use super::quota::{Amount, BookKeeping, Limits, QuotaGroup};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

#[derive(Debug)]
pub(super) struct Books {
    groups: HashMap<GroupKey, QuotaGroup>,
    /// Groups the provider's 429s taught something.
    learned: HashMap<GroupKey, Learned>,
    tuning: Tuning,
    /// Learned limits changed during the current command, to be announced.
    changes: Vec<(GroupKey, LimitChange)>,
    /// A model's limits in a pool.
    model_limits: HashMap<(PoolIdx, ModelIdx), Limits>,
    /// A project's own limits for a model, replacing the model's.
    project_limits: HashMap<GroupKey, Limits>,
    /// A pool's limits for the models its configuration does not list.
    other_models: HashMap<PoolIdx, Limits>,
    daily: DailyReset,
    keeping: BookKeeping,
    /// Learning weighs evidence ([`super::learning::weighing`]) rather than reacting to each 429: the
    /// rules of the engine's setup say which.
    weighs: bool,
}

impl Books {
    /// Empty books for the pools, models and projects of `catalogue`, learning by `rules`.
    pub fn new(config: &EngineConfig, catalogue: &Catalogue, rules: u32) -> Self {
        let mut books = Self {
            groups: HashMap::new(),
            learned: HashMap::new(),
            tuning: Tuning {
                window_ms: config.window_ms,
                relearn_after: config.relearn_after_windows,
                evidence_stands: rules >= super::RULES_EVIDENCE_STANDING,
            },
            changes: Vec::new(),
            model_limits: HashMap::new(),
            project_limits: HashMap::new(),
            other_models: HashMap::new(),
            daily: config.daily,
            keeping: config.book_keeping(),
            weighs: rules >= super::RULES_WEIGHING_EVIDENCE,
        };
        for (name, pool_config) in &config.pools {
            let pool = catalogue
                .pool_by_name(name)
                .expect("the catalogue has every pool");
            if let Some(limits) = pool_config.other_models {
                books.other_models.insert(pool, limits);
            }
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

    /// The limits a group is configured with: its project's own, or else its model's.
    pub fn configured(&self, key: GroupKey) -> Limits {
        self.project_limits
            .get(&key)
            .or_else(|| self.model_limits.get(&(key.pool, key.model)))
            .or_else(|| self.other_models.get(&key.pool))
            .copied()
            .unwrap_or_default()
    }

    /// The limits a group is held to: the configured ones, lowered by what it learned.
    fn limits_of(&self, key: GroupKey) -> Limits {
        let configured = self.configured(key);
        match self.learned.get(&key) {
            Some(learned) => learned.effective(configured),
            None => configured,
        }
    }

    /// The group's books brought to `now` (opened on first use), a lowered limit's climb too.
    pub fn group(&mut self, key: GroupKey, now: Time) -> &mut QuotaGroup {
        if !self.learned.is_empty() {
            self.advance_learned(key, now);
        }
        let daily = self.daily;
        // The limits are looked up only to open a group: every change of them after that
        // (learned, restored) writes them into the group.
        if !self.groups.contains_key(&key) {
            let group = QuotaGroup::new(self.limits_of(key), now, daily);
            self.groups.insert(key, group);
        }
        let group = self.groups.get_mut(&key).expect("opened above");
        group.advance(now, daily);
        group
    }

    fn advance_learned(&mut self, key: GroupKey, now: Time) {
        if !self.learned.contains_key(&key) {
            return;
        }
        let configured = self.configured(key);
        let learned = self.learned.get_mut(&key).expect("present");
        if let Some(change) = learned.advance(now, self.tuning, configured) {
            self.learned_changed(key, change);
        }
    }

    /// Reserves `requests` and `tokens` on a group brought to `now`.
    pub fn reserve(&mut self, key: GroupKey, now: Time, requests: u64, tokens: u64) {
        let group = self.group(key, now);
        group.reserve(requests, tokens);
        let held = group.requests_in_window();
        if let Some(learned) = self.learned.get_mut(&key) {
            learned.granted(held);
        }
    }

    /// What a group learned so far, opened by the rules the engine decides under.
    fn learning(&mut self, key: GroupKey) -> &mut Learned {
        let (weighs, tuning) = (self.weighs, self.tuning);
        self.learned
            .entry(key)
            .or_insert_with(|| Learned::new(weighs, tuning))
    }

    /// The provider accepted `requests` of a group at `now` (rules that weigh evidence).
    pub fn accepted(&mut self, key: GroupKey, now: Time, requests: u64) {
        if !self.weighs || requests == 0 {
            return;
        }
        self.group(key, now);
        let tuning = self.tuning;
        if let Learned::Weighing(learned) = self.learning(key) {
            learned.accepted(requests, now, tuning);
        }
    }

    /// The 429s heard at the peak by the groups of `model` in `pool` were a wave's.
    pub fn discount_refusals(&mut self, pool: PoolIdx, model: ModelIdx) {
        for (key, learned) in &mut self.learned {
            if key.pool == pool
                && key.model == model
                && let Learned::Weighing(learned) = learned
            {
                learned.discount_refusals();
            }
        }
    }

    /// What the group learned, if anything.
    pub fn learned(&self, key: GroupKey) -> Option<&Learned> {
        self.learned.get(&key)
    }

    /// A 429 named `kind`'s figure (at least 1).
    pub fn learn_named(
        &mut self,
        key: GroupKey,
        kind: LimitKind,
        value: u64,
        now: Time,
        evidence: Evidence,
    ) {
        self.group(key, now);
        let configured = self.configured(key);
        let learned = self.learning(key);
        if let Some(change) = learned.named(kind, value, now, evidence, configured) {
            self.learned_changed(key, change);
        }
    }

    /// A 429 without a figure (or with one the books were below) for one of the `sent` requests
    /// of a lease that settled on books brought to `now`.
    pub fn learn_unnamed(&mut self, key: GroupKey, now: Time, sent: u64, evidence: Evidence) {
        let refused = sent.min(1);
        let held = self
            .group(key, now)
            .requests_in_window()
            .saturating_sub(refused);
        let configured = self.configured(key);
        let tuning = self.tuning;
        let change = match self.learning(key) {
            Learned::Reacting(learned) => learned.unnamed(held, now, tuning, evidence, configured),
            Learned::Weighing(learned) => learned.refused(now, tuning, evidence, configured),
        };
        if let Some(change) = change {
            self.learned_changed(key, change);
        }
    }

    /// How learning is tuned.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// Forgets what the group learned: the configured limits apply again.
    pub fn forget_learned(&mut self, key: GroupKey) {
        let before = self.limits_of(key);
        let Some(learned) = self.learned.remove(&key) else {
            return;
        };
        let configured = self.configured(key);
        for kind in LimitKind::ALL {
            if learned.limit(kind).is_some() && kind.of(&before) != kind.of(&configured) {
                self.changes.push((
                    key,
                    LimitChange {
                        kind,
                        before: kind.of(&before),
                        after: kind.of(&configured),
                        reason: "forgotten by an operator".into(),
                    },
                ));
            }
        }
        if let Some(group) = self.groups.get_mut(&key) {
            group.limits = configured;
        }
    }

    fn learned_changed(&mut self, key: GroupKey, change: LimitChange) {
        let limits = self.limits_of(key);
        if let Some(group) = self.groups.get_mut(&key) {
            group.limits = limits;
        }
        self.changes.push((key, change));
    }

    /// The learned limits that changed since the last call.
    pub fn take_changes(&mut self) -> Vec<(GroupKey, LimitChange)> {
        std::mem::take(&mut self.changes)
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

    /// The group `key` as it reads at `time`, without changing anything: one never opened
    /// reads as it would open.
    pub fn read_one(&self, key: GroupKey, time: Time) -> QuotaGroup {
        let mut group = match self.groups.get(&key) {
            Some(group) => group.clone(),
            None => QuotaGroup::new(self.limits_of(key), time, self.daily),
        };
        group.advance(time, self.daily);
        group
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

    /// The next time a group of `pool` changes by itself after `time`: its books, or a
    /// lowered limit's climb.
    pub fn next_change_in_pool(&self, pool: PoolIdx, time: Time) -> Option<u64> {
        let books = self
            .groups
            .iter()
            .filter(|(key, _)| key.pool == pool)
            .filter_map(|(_, group)| group.next_change_after(time));
        let climbs = self
            .learned
            .iter()
            .filter(|(key, _)| key.pool == pool)
            .filter_map(|(&key, learned)| learned.next_change_ms(self.tuning, self.configured(key)))
            .filter(|&at| at > time.steady_ms);
        books.chain(climbs).min()
    }

    /// For the models of `pool`'s groups: those a group of which holds what forgetting would
    /// lose (a rest, a learned limit), and for the others when their latest request leaves the
    /// window (absent: none on the books). One pass over the groups.
    pub fn model_holdings(&self, pool: PoolIdx) -> (HashSet<ModelIdx>, HashMap<ModelIdx, u64>) {
        let mut held = HashSet::new();
        let mut latest: HashMap<ModelIdx, u64> = HashMap::new();
        for (key, group) in &self.groups {
            if key.pool != pool {
                continue;
            }
            if group.is_resting() || self.learned.get(key).is_some_and(Learned::holds_something) {
                held.insert(key.model);
            } else if let Some(until) = group.last_on_books_ms() {
                let entry = latest.entry(key.model).or_default();
                *entry = (*entry).max(until);
            }
        }
        (held, latest)
    }

    /// Drops every group of `model` in `pool`, with what it learned.
    pub fn forget(&mut self, pool: PoolIdx, model: ModelIdx) {
        let of_model = |key: &GroupKey| key.pool == pool && key.model == model;
        self.groups.retain(|key, _| !of_model(key));
        self.learned.retain(|key, _| !of_model(key));
    }

    /// Puts a group's books and what it learned back (recovery), held to the limits
    /// configured now.
    pub fn restore(&mut self, key: GroupKey, mut group: QuotaGroup, learned: Option<Learned>) {
        if let Some(learned) = learned {
            let learned = if self.weighs {
                learned.weighing(self.tuning)
            } else {
                learned
            };
            self.learned.insert(key, learned);
        }
        group.limits = self.limits_of(key);
        self.groups.insert(key, group);
    }
}
