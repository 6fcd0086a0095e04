//! Lending a key: validating an acquire, choosing among the free keys (least recently used
//! first, then the most quota headroom), granting, queueing when nothing can be lent, serving
//! the lines in order, and saying why nothing can be lent and until when.

use super::catalogue::{GroupKey, MAX_OTHER_MODELS};
use super::health::RULES_KEY_HEALTH;
use super::ids::Token;
use super::ids::{KeyIdx, ModelIdx, PoolIdx, ProjectIdx};
use super::leases::{Lease, lease_id};
use super::tenants::{Place, RULES_TENANTS};
use super::waiting::{Ask, Blocked, Line, WaitQueue, Waiter};
use super::{
    AcquireRequest, Acquired, Engine, EngineError, EventKind, Time, Unavailable, UnavailableReason,
    WaiterId, canonical_model, invalid, pool_or_default, show_ms, validate_id, validate_tokens,
};
use foldhash::{HashMap, HashMapExt};

/// How many grantable keys, least recently used first, are compared for quota headroom.
const SPREAD_CANDIDATES: usize = 4;

enum Selection {
    Key(KeyIdx),
    /// No key; these groups were usable but could not serve the ask now (spent or cooling).
    None {
        unaffordable: Vec<GroupKey>,
    },
}

impl Engine {
    pub(super) fn acquire(
        &mut self,
        now: impl Into<Time>,
        request: AcquireRequest,
    ) -> Result<Acquired, EngineError> {
        let time = self.tick(now);
        let now = time.steady_ms;
        let ask = self.validate_acquire(&request)?;

        if let Some(id) = &request.client_request_id
            && let Some(token) = self.memory.request(id)
        {
            return match self.leases.get(token) {
                Some(lease) if lease.task_id == request.task_id => {
                    Ok(Acquired::Granted(self.view(token)))
                }
                Some(_) => Err(invalid("client_request_id", "already used by another task")),
                None => Err(EngineError::StaleLease {
                    lease_id: lease_id(token),
                    reason: "the lease granted for this client_request_id has ended".into(),
                }),
            };
        }

        if let Some(token) = self.held_lease(&request.task_id, &ask, now) {
            return Ok(Acquired::Granted(self.view(token)));
        }

        let blocked = self
            .lines
            .queue(ask.line())
            .map(|queue| queue.blocked_for(self.caller.priority))
            .unwrap_or_default();
        match self.select(time, &ask, &request.task_id, &blocked) {
            Selection::Key(key) => {
                let token =
                    self.grant(time, key, &request.task_id, &ask, request.client_request_id);
                Ok(Acquired::Granted(self.view(token)))
            }
            Selection::None { unaffordable } => {
                let unavailable = self.unavailable(time, &ask, &request.task_id);
                let hopeless = matches!(
                    unavailable.reason,
                    UnavailableReason::AllDisabled | UnavailableReason::AllExcluded
                );
                if !request.wait || hopeless {
                    return Ok(Acquired::Unavailable(unavailable));
                }
                let id = self.lines.next_id();
                let line = ask.line();
                let waiter = Waiter {
                    exclusion_ends: self.memory.exclusion_ends(&request.task_id, now),
                    task_id: request.task_id,
                    ask,
                    client_request_id: request.client_request_id,
                    renews: None,
                    tenant: String::new(),
                    place: Place::ARRIVAL,
                };
                let caller = (self.rules >= RULES_TENANTS).then_some(&self.caller);
                self.lines.join(id, waiter, caller, unaffordable);
                self.wake_line_at(time, line);
                Ok(Acquired::Queued(id))
            }
        }
    }

    /// Takes a waiter out of line (deadline, disconnect). `None` when it is no longer waiting
    /// (it was granted or failed, and that is in the notices); otherwise why it got nothing.
    pub(super) fn cancel_waiter(
        &mut self,
        now: impl Into<Time>,
        id: WaiterId,
    ) -> Option<Unavailable> {
        let time = self.tick(now);
        let (waiter, unblocks) = self.lines.leave(id)?;
        // A waiter leaving can unblock those behind it only where the line holds groups back.
        if unblocks {
            self.freed = true;
        }
        let unavailable = match waiter.renews {
            Some(token) => {
                self.renewal_unavailable(time, token, waiter.ask.requests, waiter.ask.tokens)
            }
            None => self.unavailable(time, &waiter.ask, &waiter.task_id),
        };
        self.tick(time);
        Some(unavailable)
    }

    fn validate_acquire(&mut self, request: &AcquireRequest) -> Result<Ask, EngineError> {
        validate_id("task_id", &request.task_id, true)?;
        if let Some(id) = &request.client_request_id {
            validate_id("client_request_id", id, false)?;
        }
        let pool_name = pool_or_default(&request.pool);
        let pool = self
            .catalogue
            .pool_by_name(pool_name)
            .ok_or_else(|| invalid("pool", format!("unknown pool {pool_name:?}")))?;
        let model = self.model_of(pool, &request.model)?;
        let ttl_ms =
            self.validate_ttl(request.ttl_ms.unwrap_or(self.config.default_ttl_ms), false)?;
        validate_tokens("estimated_input_tokens", request.estimated_tokens)?;
        let requests = u64::from(request.requests.max(1));
        if requests > u64::from(self.config.max_requests_per_lease) {
            return Err(invalid(
                "requests",
                format!(
                    "{requests} is above the maximum of {} per lease",
                    self.config.max_requests_per_lease
                ),
            ));
        }
        self.check_servable(pool, model, requests, request.estimated_tokens)?;
        let excluded = request
            .exclude_key_ids
            .iter()
            .filter_map(|id| self.catalogue.key_by_id(id))
            .collect();
        Ok(Ask {
            pool,
            model,
            ttl_ms,
            requests,
            tokens: request.estimated_tokens,
            excluded,
        })
    }

    fn model_of(&mut self, pool: PoolIdx, model: &str) -> Result<ModelIdx, EngineError> {
        let name = canonical_model(model);
        if name.is_empty() {
            return Err(invalid("model", "empty"));
        }
        validate_id("model", name, true)?;
        let entry = self.catalogue.pool(pool);
        if self.rules >= super::RULES_FORGETTING_UNLISTED_MODELS
            && entry.config.other_models.is_some()
            && entry.unlisted_full()
            && self.catalogue.model_served(pool, name).is_none()
        {
            self.forget_an_unlisted_model(pool);
        }
        if let Some(model) = self.catalogue.served_model(pool, name) {
            return Ok(model);
        }
        let pool = self.catalogue.pool(pool);
        if pool.config.other_models.is_some() {
            return Err(invalid(
                "model",
                format!(
                    "pool {:?} serves {MAX_OTHER_MODELS} models its configuration does not list, each held by a lease, a waiter or what the provider taught: list {name:?} under pools.{}.models",
                    pool.name, pool.name
                ),
            ));
        }
        let known: Vec<&str> = pool.config.models.keys().map(String::as_str).collect();
        Err(invalid(
            "model",
            format!(
                "unknown model {name:?} in pool {:?} (known: {})",
                pool.name,
                known.join(", ")
            ),
        ))
    }

    /// Makes room for one more unlisted model in `pool`: forgets the unlisted model nothing
    /// holds (no live lease, no waiter, no rest, nothing learned) whose books saw a request
    /// least recently, one with none on its books first, by name among equals (so that a
    /// replay, or an engine restored from its image, forgets the same). A client inventing
    /// model names then cannot lock the models a pool serves; one whose books are full of
    /// real traffic is kept.
    fn forget_an_unlisted_model(&mut self, pool: PoolIdx) {
        let (mut held, latest) = self.books.model_holdings(pool);
        held.extend(
            self.leases
                .iter()
                .filter(|(_, lease)| self.catalogue.key(lease.key).pool == pool)
                .map(|(_, lease)| lease.model),
        );
        held.extend(
            self.lines
                .iter()
                .map(|(line, _)| line)
                .filter(|&(line_pool, _)| line_pool == pool)
                .map(|(_, model)| model),
        );
        let names = &self.catalogue.models;
        let forgotten = self
            .catalogue
            .pool(pool)
            .unlisted()
            .filter(|model| !held.contains(model))
            .min_by(|a, b| {
                let last = |model| latest.get(model).copied();
                last(a)
                    .cmp(&last(b))
                    .then_with(|| names.name(*a).cmp(names.name(*b)))
            });
        if let Some(model) = forgotten {
            self.catalogue.forget_unlisted(pool, model);
            self.books.forget(pool, model);
        }
    }

    /// A TTL of zero or above the maximum is refused, or capped when `cap` (renewals).
    pub(super) fn validate_ttl(&self, ttl_ms: u64, cap: bool) -> Result<u64, EngineError> {
        if ttl_ms == 0 {
            return Err(invalid("ttl", "must be above zero"));
        }
        if ttl_ms > self.config.max_ttl_ms {
            if cap {
                return Ok(self.config.max_ttl_ms);
            }
            return Err(invalid(
                "ttl",
                format!(
                    "{} is above the maximum {}",
                    show_ms(ttl_ms),
                    show_ms(self.config.max_ttl_ms)
                ),
            ));
        }
        Ok(ttl_ms)
    }

    /// Refuses an ask that no project of the pool could ever afford.
    pub(super) fn check_servable(
        &self,
        pool: PoolIdx,
        model: ModelIdx,
        requests: u64,
        tokens: u64,
    ) -> Result<(), EngineError> {
        let largest = self.catalogue.pool(pool).largest_limits[&model];
        let name = self.catalogue.models.name(model);
        for (field, amount, limit, what) in [
            (
                "requests",
                requests,
                largest.requests_per_minute,
                "requests per minute",
            ),
            (
                "requests",
                requests,
                largest.requests_per_day,
                "requests per day",
            ),
            (
                "estimated_input_tokens",
                tokens,
                largest.tokens_per_minute,
                "tokens per minute",
            ),
            (
                "estimated_input_tokens",
                tokens,
                largest.tokens_per_day,
                "tokens per day",
            ),
        ] {
            if let Some(limit) = limit
                && amount > limit
            {
                return Err(invalid(
                    field,
                    format!("{amount} exceeds the limit of {limit} {what} of {name}"),
                ));
            }
        }
        Ok(())
    }

    /// The task's live lease for this pool and model, unless its key is now excluded.
    fn held_lease(&self, task: &str, ask: &Ask, now: u64) -> Option<Token> {
        self.leases.of_task(task).iter().copied().find(|&token| {
            let lease = self.leases.get(token).expect("a task's lease is live");
            lease.model == ask.model
                && self.catalogue.key(lease.key).pool == ask.pool
                && !ask.excluded.contains(&lease.key)
                && !self.memory.excludes(task, lease.key, now)
        })
    }

    /// Picks a key for an ask: among the first grantable keys, least recently used first, the
    /// one whose group has the most headroom. Groups in `blocked` are kept off.
    fn select(&mut self, time: Time, ask: &Ask, task: &str, blocked: &Blocked) -> Selection {
        let task_exclusions = self.memory.excluded_keys(task, time.steady_ms);
        let mut unaffordable = Vec::new();
        let mut best: Option<(KeyIdx, f64)> = None;
        // Keys whose own recent failures have them passed over this time, while another is as
        // good (rules 8 on): the best of them if no other is.
        let mut deferred: Vec<KeyIdx> = Vec::new();
        let mut best_deferred: Option<(KeyIdx, f64)> = None;
        let weighs_records = self.rules >= RULES_KEY_HEALTH;
        let mut candidates = 0;
        let Self {
            catalogue, books, ..
        } = self;
        for key in catalogue.pool(ask.pool).free_keys() {
            if ask.excluded.contains(&key) || task_exclusions.contains(&key) {
                continue;
            }
            let group_key = catalogue.key(key).group(ask.model);
            if blocked.contains_key(&group_key) || unaffordable.contains(&group_key) {
                continue;
            }
            let group = books.group(group_key, time);
            if group.cooldown().is_some() || !group.can_afford(ask.requests, ask.tokens) {
                unaffordable.push(group_key);
                continue;
            }
            let headroom = group.headroom();
            candidates += 1;
            if weighs_records && catalogue.record_of(key).deferred() {
                deferred.push(key);
                if best_deferred.is_none_or(|(_, h)| headroom > h) {
                    best_deferred = Some((key, headroom));
                }
            } else if best.is_none_or(|(_, h)| headroom > h) {
                best = Some((key, headroom));
            }
            if candidates == SPREAD_CANDIDATES {
                break;
            }
        }
        match (best, best_deferred) {
            (Some((key, _)), _) => {
                for passed in deferred {
                    self.catalogue.record(passed).passed();
                }
                Selection::Key(key)
            }
            (None, Some((key, _))) => Selection::Key(key),
            (None, None) => Selection::None { unaffordable },
        }
    }

    /// Lends `key` for `ask`; the group's books were brought to `time` by [`Engine::select`].
    fn grant(
        &mut self,
        time: Time,
        key: KeyIdx,
        task: &str,
        ask: &Ask,
        client_request_id: Option<String>,
    ) -> Token {
        let now = time.steady_ms;
        let group_key = self.catalogue.key(key).group(ask.model);
        self.books
            .reserve(group_key, time, ask.requests, ask.tokens);
        let token = self.leases.issue(Lease {
            key,
            task_id: task.to_string(),
            model: ask.model,
            requests: ask.requests,
            tokens: ask.tokens,
            ttl_ms: ask.ttl_ms,
            expires_ms: now + ask.ttl_ms,
        });
        self.catalogue.lend(key, token, now);
        if let Some(id) = client_request_id {
            self.memory.remember_request(id, token);
        }
        let event = self.lease_event(token);
        self.emit(time, EventKind::Granted(event));
        token
    }

    /// Serves every line in order, first come first served: a waiter is passed over only for
    /// keys it cannot use (excluded) or groups an earlier waiter could not have. A renewal needs
    /// no key, only room in its lease's group. A pass over a line stops as soon as no one
    /// further back could get anything, so that a long line waiting on spent quota costs
    /// little to look at.
    pub(super) fn serve_waiters(&mut self, time: Time) {
        for line in self.lines.lines() {
            let mut queue = self.lines.take(line);
            let (pool, model) = line;
            let mut blocked = Blocked::default();
            let mut served = Vec::new();
            let mut next = queue.first();
            while let Some(at) = next {
                next = queue.after(at);
                let (place, id) = at;
                let renews = queue.waiters[&id].renews;
                if let Some(token) = renews {
                    if self.serve_renewal(time, id, &mut queue, &mut blocked) {
                        served.push((id, Some(token)));
                    }
                    continue;
                }
                let entry = self.catalogue.pool(pool);
                if entry.enabled_keys() == 0 && !entry.awaits_check(self.catalogue.keys()) {
                    queue.remove(id);
                    served.push((id, None));
                    let failure = Unavailable {
                        reason: UnavailableReason::AllDisabled,
                        retry_at_ms: None,
                    };
                    self.notices.waiter_failures.push((id, failure));
                    continue;
                }
                if !self.any_key_beyond(pool, model, &blocked) {
                    if queue.has_renewals() {
                        continue;
                    }
                    break;
                }
                #[cfg(test)]
                {
                    self.waiters_looked_at += 1;
                }
                let waiter = &queue.waiters[&id];
                match self.select(time, &waiter.ask, &waiter.task_id, &blocked) {
                    Selection::Key(key) => {
                        let waiter = queue.remove(id).expect("in line");
                        queue.clock.granted(place.start);
                        served.push((id, None));
                        let token = self.grant(
                            time,
                            key,
                            &waiter.task_id,
                            &waiter.ask,
                            waiter.client_request_id,
                        );
                        let view = self.view(token);
                        self.notices.waiter_grants.push((id, view));
                    }
                    Selection::None { unaffordable } => {
                        for group in unaffordable {
                            blocked.entry(group).or_insert(place.priority);
                        }
                    }
                }
            }
            queue.blocked = blocked;
            queue.wake_at_ms = self.queue_wake_at(time, pool, &queue);
            self.lines.put_back(line, queue, &served);
        }
    }

    /// Whether the pool has a free key outside the `blocked` groups for this model.
    fn any_key_beyond(&self, pool: PoolIdx, model: ModelIdx, blocked: &Blocked) -> bool {
        self.catalogue
            .pool(pool)
            .free_keys()
            .any(|key| !blocked.contains_key(&self.catalogue.key(key).group(model)))
    }

    /// Sets when `line` must be looked at again though nothing is freed.
    pub(super) fn wake_line_at(&mut self, time: Time, line: Line) {
        let at = self
            .lines
            .queue(line)
            .and_then(|queue| self.queue_wake_at(time, line.0, queue));
        self.lines.set_wake(line, at);
    }

    /// When a line must be looked at again though nothing was freed: a group of its pool
    /// changes by itself, or a waiter's exclusion of a key ends.
    fn queue_wake_at(&self, time: Time, pool: PoolIdx, queue: &WaitQueue) -> Option<u64> {
        if queue.waiters.is_empty() {
            return None;
        }
        let groups = self.books.next_change_in_pool(pool, time);
        let exclusion = queue.next_exclusion_end(time);
        groups.into_iter().chain(exclusion).min()
    }

    /// Why an ask gets no key now, and when it might.
    pub(super) fn unavailable(&mut self, time: Time, ask: &Ask, task: &str) -> Unavailable {
        let now = time.steady_ms;
        let pool = self.catalogue.pool(ask.pool);
        // Only ending leases can make room in a group whose live leases fill it: until the
        // first of the project's leases ends, nothing changes.
        let mut project_expiry: HashMap<ProjectIdx, u64> = HashMap::new();
        for &key in &pool.keys {
            let entry = self.catalogue.key(key);
            for &token in &entry.live {
                let at = project_expiry.entry(entry.project).or_insert(u64::MAX);
                *at = (*at).min(self.leases.get(token).expect("live").expires_ms);
            }
        }
        let mut usable = 0;
        let mut any_enabled = false;
        let mut earliest: Option<(u64, UnavailableReason)> = None;
        let mut first_reason = None;
        for position in 0..self.catalogue.pool(ask.pool).keys.len() {
            let key = self.catalogue.pool(ask.pool).keys[position];
            let entry = self.catalogue.key(key);
            if !entry.is_lendable() {
                continue;
            }
            any_enabled = true;
            if ask.excluded.contains(&key) || self.memory.excludes(task, key, now) {
                continue;
            }
            usable += 1;
            let slot_free_at = if entry.has_free_slot() {
                Some(now)
            } else {
                entry
                    .live
                    .iter()
                    .map(|&t| self.leases.get(t).expect("live").expires_ms)
                    .min()
            };
            let project = entry.project;
            let group = self.books.group(entry.group(ask.model), time);
            let reason = if group.cooldown().is_some() {
                UnavailableReason::CoolingDown
            } else if !group.can_afford(ask.requests, ask.tokens) {
                UnavailableReason::QuotaSpent
            } else {
                UnavailableReason::AllLeased
            };
            first_reason.get_or_insert(reason);
            let quota_at = group
                .affordable_at(time, ask.requests, ask.tokens)
                .or_else(|| project_expiry.get(&project).copied());
            let ready = slot_free_at
                .zip(quota_at)
                .map(|(slot, quota)| slot.max(quota));
            if let Some(ready) = ready
                && earliest.is_none_or(|(at, _)| ready < at)
            {
                earliest = Some((ready, reason));
            }
        }
        if !any_enabled {
            let pool = self.catalogue.pool(ask.pool);
            let reason = if pool.awaits_check(self.catalogue.keys()) {
                UnavailableReason::AwaitingCheck
            } else {
                UnavailableReason::AllDisabled
            };
            return Unavailable {
                reason,
                retry_at_ms: None,
            };
        }
        if usable == 0 {
            return Unavailable {
                reason: UnavailableReason::AllExcluded,
                retry_at_ms: self.memory.first_exclusion_end(task, &ask.excluded, now),
            };
        }
        match earliest {
            Some((at, reason)) => Unavailable {
                reason,
                retry_at_ms: Some(at.max(now)),
            },
            None => Unavailable {
                reason: first_reason.expect("a usable key gave a reason"),
                retry_at_ms: None,
            },
        }
    }
}
