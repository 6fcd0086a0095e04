//! What the engine shows without changing anything: a lease as its holder and as others see
//! it, a key's status, the status page of keys, quota groups and lines, and the counts logged at
//! start-up. Everything here takes `&self`.

use super::catalogue::GroupKey;
use super::ids::Token;
use super::ids::{KeyIdx, PoolIdx, ProjectIdx};
use super::learning::Learned;
use super::leases::{Lease, lease_id};
use super::quota::QuotaGroup;
use super::status::TenantWaiting;
use super::tenants::Priority;
use super::{
    CheckOutcome, Counts, Engine, EngineError, GroupView, KeyState, KeyView, LeaseEvent,
    LeaseSummary, LeaseView, LimitKind, LimitView, StatusView, Time, UsageView, canonical_model,
    invalid, pool_or_default,
};
use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, BTreeSet};

impl Engine {
    /// How much state there is, at `now`: for the start-up log.
    pub fn counts(&self, now: Time) -> Counts {
        let now = self.time_at(now);
        Counts {
            live_leases: self.leases.len(),
            disabled_keys: self
                .catalogue
                .keys()
                .iter()
                .filter(|k| k.disabled.is_some())
                .count(),
            quota_groups: self.books.len(),
            cooling_groups: self
                .books
                .iter()
                .filter(|(_, g)| g.cooldown().is_some_and(|c| c.until_ms > now.steady_ms))
                .count(),
        }
    }

    pub(super) fn summary(&self, token: Token) -> LeaseSummary {
        self.summary_of(token, self.leases.get(token).expect("live"))
    }

    /// A live or ended lease, as others see it.
    fn summary_of(&self, token: Token, lease: &Lease) -> LeaseSummary {
        LeaseSummary {
            lease_id: lease_id(token),
            task_id: lease.task_id.clone(),
            model: self.catalogue.models.name(lease.model).to_string(),
            fencing_token: token,
            requests_granted: lease.requests as u32,
            expires_ms: lease.expires_ms,
        }
    }

    pub(super) fn lease_event(&self, token: Token) -> LeaseEvent {
        self.event_of(token, self.leases.get(token).expect("live"))
    }

    pub(super) fn event_of(&self, token: Token, lease: &Lease) -> LeaseEvent {
        let key = self.catalogue.key(lease.key);
        LeaseEvent {
            lease: self.summary_of(token, lease),
            key_id: key.spec.id.clone(),
            project: self.catalogue.projects.name(key.project).to_string(),
        }
    }

    pub(super) fn view(&self, token: Token) -> LeaseView {
        let lease = self.leases.get(token).expect("live");
        let key = self.catalogue.key(lease.key);
        LeaseView {
            lease_id: lease_id(token),
            key_id: key.spec.id.clone(),
            api_key: key.spec.secret.clone(),
            fencing_token: token,
            ttl_ms: lease.ttl_ms,
            expires_ms: lease.expires_ms,
            pool: self.catalogue.pool(key.pool).name.clone(),
            project: self.catalogue.projects.name(key.project).to_string(),
            model: self.catalogue.models.name(lease.model).to_string(),
            requests_granted: lease.requests as u32,
            task_id: lease.task_id.clone(),
        }
    }

    pub fn key_status(&self, now: impl Into<Time>, key_id: &str) -> Result<KeyView, EngineError> {
        let time = self.time_at(now.into());
        let key = self
            .catalogue
            .key_by_id(key_id)
            .ok_or_else(|| EngineError::KeyNotFound(key_id.to_string()))?;
        Ok(self.key_view(key, time.steady_ms))
    }

    pub(super) fn group_view(&self, key: GroupKey, group: &QuotaGroup) -> GroupView {
        GroupView {
            pool: self.catalogue.pool_name(key).to_string(),
            project: self.catalogue.projects.name(key.project).to_string(),
            model: self.catalogue.models.name(key.model).to_string(),
            requests_per_minute: UsageView {
                used: group.requests_in_window(),
                limit: group.limits.requests_per_minute,
            },
            tokens_per_minute: UsageView {
                used: group.tokens_in_window(),
                limit: group.limits.tokens_per_minute,
            },
            requests_per_day: UsageView {
                used: group.requests_today(),
                limit: group.limits.requests_per_day,
            },
            tokens_per_day: UsageView {
                used: group.tokens_today(),
                limit: group.limits.tokens_per_day,
            },
            cooldown: group.cooldown(),
            limits: self.limit_views(key),
            last_429: self.books.learned(key).and_then(|l| l.last_429().cloned()),
            answers: self
                .books
                .learned(key)
                .and_then(|l| l.answers(self.time, self.books.tuning()))
                .map(Box::new),
        }
    }

    fn limit_views(&self, key: GroupKey) -> [LimitView; 4] {
        let configured = self.books.configured(key);
        let learned = self.books.learned(key);
        LimitKind::ALL.map(|kind| LimitView {
            configured: kind.of(&configured),
            auto: configured.auto[kind as usize],
            learned: learned.and_then(|l| l.limit(kind)),
        })
    }

    pub(super) fn key_view(&self, key: KeyIdx, now: u64) -> KeyView {
        let entry = self.catalogue.key(key);
        let cooling_until_ms = self
            .books
            .iter()
            .filter(|(g, _)| g.pool == entry.pool && g.project == entry.project)
            .filter_map(|(_, group)| group.cooldown().map(|c| c.until_ms))
            .filter(|&until| until > now)
            .max();
        self.key_view_with(key, cooling_until_ms)
    }

    fn key_view_with(&self, key: KeyIdx, cooling_until_ms: Option<u64>) -> KeyView {
        let entry = self.catalogue.key(key);
        let unchecked = entry
            .last_check
            .as_ref()
            .is_some_and(|check| matches!(check.outcome, CheckOutcome::NoAnswer { .. }));
        let state = if entry.disabled.is_some() {
            KeyState::Disabled
        } else if entry.draining {
            KeyState::Draining
        } else if entry.awaiting_check {
            KeyState::Checking
        } else if !entry.live.is_empty() {
            KeyState::Leased
        } else if cooling_until_ms.is_some() {
            KeyState::CoolingDown
        } else if unchecked {
            KeyState::Unchecked
        } else {
            KeyState::Available
        };
        KeyView {
            key_id: entry.spec.id.clone(),
            masked_key: entry.spec.secret.masked(),
            pool: self.catalogue.pool(entry.pool).name.clone(),
            project: self.catalogue.projects.name(entry.project).to_string(),
            state,
            disabled: entry.disabled.clone(),
            last_check: entry.last_check.clone(),
            record: self.catalogue.record_of(key).clone(),
            max_leases: entry.max_leases,
            leases: entry.live.iter().map(|&t| self.summary(t)).collect(),
            cooling_until_ms,
        }
    }

    /// The group of `model` in every project of `pool` (every pool when `None`) that has a
    /// key, used or not: what a client plans a batch by. A group never opened reads as it
    /// would open: nothing used, the limits it would be held to.
    pub fn plan(
        &self,
        now: impl Into<Time>,
        pool: Option<&str>,
        model: &str,
    ) -> Result<Vec<GroupView>, EngineError> {
        let time = self.time_at(now.into());
        let pools: Vec<PoolIdx> = match pool {
            None => (0..self.catalogue.pool_count() as PoolIdx).collect(),
            Some(name) => vec![
                self.catalogue
                    .pool_by_name(name)
                    .ok_or_else(|| invalid("pool", format!("unknown pool {name:?}")))?,
            ],
        };
        let name = canonical_model(model);
        let known = self.catalogue.models.get(name);
        let mut views = Vec::new();
        for pool in pools {
            let entry = self.catalogue.pool(pool);
            let projects: BTreeSet<ProjectIdx> = entry
                .keys
                .iter()
                .map(|&k| self.catalogue.key(k))
                .filter(|key| !key.is_gone())
                .map(|key| key.project)
                .collect();
            for project in projects {
                if let Some(model) = known.filter(|&m| entry.serves(m)) {
                    let key = GroupKey {
                        pool,
                        project,
                        model,
                    };
                    views.push(self.group_view(key, &self.books.read_one(key, time)));
                } else if let Some(limits) = entry.config.other_models {
                    // Served as any other model, and never asked for yet.
                    views.push(GroupView {
                        pool: entry.name.clone(),
                        project: self.catalogue.projects.name(project).to_string(),
                        model: name.to_string(),
                        requests_per_minute: UsageView {
                            used: 0,
                            limit: limits.requests_per_minute,
                        },
                        tokens_per_minute: UsageView {
                            used: 0,
                            limit: limits.tokens_per_minute,
                        },
                        requests_per_day: UsageView {
                            used: 0,
                            limit: limits.requests_per_day,
                        },
                        tokens_per_day: UsageView {
                            used: 0,
                            limit: limits.tokens_per_day,
                        },
                        cooldown: None,
                        answers: None,
                        limits: LimitKind::ALL.map(|kind| LimitView {
                            configured: kind.of(&limits),
                            auto: limits.auto[kind as usize],
                            learned: None,
                        }),
                        last_429: None,
                    });
                }
            }
        }
        Ok(views)
    }

    /// Whether `pool` (the default pool when empty) serves `model` now, listed or remembered:
    /// asking for it makes the engine remember nothing new.
    pub fn serves(&self, pool: &str, model: &str) -> bool {
        self.catalogue
            .pool_by_name(pool_or_default(pool))
            .is_some_and(|pool| {
                self.catalogue
                    .model_served(pool, canonical_model(model))
                    .is_some()
            })
    }

    /// Keys (a page of them, starting after key `after`), quota groups and lines, for
    /// operators.
    pub fn status(
        &self,
        now: impl Into<Time>,
        pool: Option<&str>,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<StatusView, EngineError> {
        let time = self.time_at(now.into());
        let pool = match pool {
            None => None,
            Some(name) => Some(
                self.catalogue
                    .pool_by_name(name)
                    .ok_or_else(|| invalid("pool", format!("unknown pool {name:?}")))?,
            ),
        };
        // The books as they read at `time`, without changing them; idle groups are not shown.
        let books: Vec<(GroupKey, QuotaGroup)> = self
            .books
            .read_at(time)
            .filter(|(g, group)| {
                pool.is_none_or(|p| g.pool == p)
                    && (!group.is_idle()
                        || self.books.learned(*g).is_some_and(Learned::holds_something))
            })
            .collect();
        let mut cooling: HashMap<(PoolIdx, ProjectIdx), u64> = HashMap::new();
        for (group_key, group) in &books {
            if let Some(cooldown) = group.cooldown() {
                let until = cooling
                    .entry((group_key.pool, group_key.project))
                    .or_insert(0);
                *until = (*until).max(cooldown.until_ms);
            }
        }
        let selected: Vec<KeyIdx> = (0..self.catalogue.keys().len())
            .filter(|&k| {
                let key = self.catalogue.key(k);
                pool.is_none_or(|p| key.pool == p) && !key.is_gone()
            })
            .collect();
        let start = match after {
            None => 0,
            Some(key_id) => self
                .catalogue
                .key_by_id(key_id)
                .and_then(|key| selected.binary_search(&key).ok())
                .map(|position| position + 1)
                .ok_or_else(|| {
                    invalid(
                        "page_token",
                        "names no key of this listing (was the pool changed?)",
                    )
                })?,
        };
        let page: Vec<KeyIdx> = selected
            .iter()
            .skip(start)
            .take(page_size)
            .copied()
            .collect();
        let next_after = page
            .last()
            .filter(|_| start.saturating_add(page.len()) < selected.len())
            .map(|&k| self.catalogue.key(k).spec.id.clone());
        let keys = page
            .iter()
            .map(|&k| {
                let entry = self.catalogue.key(k);
                self.key_view_with(k, cooling.get(&(entry.pool, entry.project)).copied())
            })
            .collect();
        let mut groups: Vec<GroupView> = books
            .iter()
            .map(|(g, group)| self.group_view(*g, group))
            .collect();
        groups
            .sort_by(|a, b| (&a.pool, &a.project, &a.model).cmp(&(&b.pool, &b.project, &b.model)));
        let waiting = self
            .lines
            .iter()
            .filter(|((p, _), _)| pool.is_none_or(|pool| *p == pool))
            .map(|((p, m), q)| {
                (
                    self.catalogue.pool(p).name.clone(),
                    self.catalogue.models.name(m).to_string(),
                    q.waiters.len(),
                )
            })
            .collect();
        let mut tenants_waiting = Vec::new();
        for ((p, m), queue) in self.lines.iter() {
            if pool.is_some_and(|pool| p != pool) {
                continue;
            }
            let mut counts: BTreeMap<(Priority, &str), usize> = BTreeMap::new();
            for waiter in queue.waiters.values().filter(|w| !w.tenant.is_empty()) {
                *counts
                    .entry((waiter.place.priority, waiter.tenant.as_str()))
                    .or_default() += 1;
            }
            tenants_waiting.extend(counts.into_iter().map(|((priority, tenant), waiters)| {
                TenantWaiting {
                    pool: self.catalogue.pool(p).name.clone(),
                    model: self.catalogue.models.name(m).to_string(),
                    tenant: tenant.to_string(),
                    priority,
                    waiters,
                }
            }));
        }
        Ok(StatusView {
            keys,
            groups,
            waiting,
            tenants_waiting,
            next_after,
            total_keys: selected.len(),
            live_leases: self.leases.len(),
            now: time,
            window_ms: self.config.window_ms,
        })
    }

    /// [`Engine::status`], and with `model` the groups [`Engine::plan`] shows for it as well:
    /// every project's group of that model, those never used reading as they would open. One
    /// list, sorted by pool, project and model, each group once.
    pub fn status_with_plan(
        &self,
        now: impl Into<Time>,
        pool: Option<&str>,
        model: Option<&str>,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<StatusView, EngineError> {
        let now = now.into();
        let mut status = self.status(now, pool, after, page_size)?;
        let Some(model) = model else {
            return Ok(status);
        };
        let name = |group: &GroupView| {
            (
                group.pool.clone(),
                group.project.clone(),
                group.model.clone(),
            )
        };
        let shown: BTreeSet<_> = status.groups.iter().map(name).collect();
        let planned = self.plan(now, pool, model)?;
        status.groups.extend(
            planned
                .into_iter()
                .filter(|group| !shown.contains(&name(group))),
        );
        status
            .groups
            .sort_by(|a, b| (&a.pool, &a.project, &a.model).cmp(&(&b.pool, &b.project, &b.model)));
        Ok(status)
    }
}
