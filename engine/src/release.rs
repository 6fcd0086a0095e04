//! How a lease ends, and what happens to its key: releasing with what was used, reporting a
//! failure (which may cool the project down, rest it for the day, or disable the key), and
//! operators disabling or enabling a key. Every ending goes through [`Engine::end_lease`],
//! which frees the slot and settles the books. (Renewing is [`super::renew`]'s.)

use super::RULES_WEIGHING_EVIDENCE;
use super::catalogue::GroupKey;
use super::health::Decider;
use super::ids::Token;
use super::learning::weighing::span_of;
use super::quota::{Amount, Cooldown, CooldownReason};
use super::{
    AcquireRequest, DAY_MS, Engine, EngineError, EventKind, Evidence, FailureKind, FailureReport,
    GroupView, KeyView, LeaseEvent, LimitKind, Reported, Time, Usage, canonical_model, invalid,
    show_ms, validate_detail,
};
use keylease_core::{MAX_ID_BYTES, MAX_QUOTA_VALUE, MAX_QUOTA_VIOLATIONS};

/// A model without capacity rests the pool for the provider's retry delay, or this many spans.
const MODEL_CAPACITY_SPANS: u64 = 4;
/// A wave rests the pool this many spans (two seconds of Gemini's minute).
const OUTAGE_SPANS: u64 = 2;

/// What a 429 taught its group.
#[derive(Debug, Default)]
struct Learnt {
    /// A per-day limit, or a figure of 0: the group rests until the day turns.
    rest_for_the_day: bool,
    /// A named figure the books reached explains it.
    explained: bool,
    /// It came in a wave across the pool: the pool rests, the group learns nothing.
    in_a_wave: bool,
}

impl Engine {
    /// Ends a lease with what it used, and says what the books now hold for it: requests sent
    /// are at most those granted, tokens at most [`MAX_INPUT_TOKENS`]. `Ok(None)` when it had
    /// already ended.
    pub(super) fn release(
        &mut self,
        now: impl Into<Time>,
        lease_id: &str,
        fencing_token: u64,
        usage: Usage,
    ) -> Result<Option<Amount>, EngineError> {
        let time = self.tick(now);
        let token = self.leases.known_token(lease_id)?;
        if !self.leases.is_live(token) {
            return Ok(None);
        }
        let token = self.leases.live_token(lease_id, fencing_token)?;
        let lease = self.leases.get(token).expect("live");
        let (key_idx, model) = (lease.key, lease.model);
        let key = self.catalogue.key(key_idx);
        let (pool, project) = (key.pool, key.project);
        let used = lease.used(usage);
        let event = self.end_lease(token, time, used);
        self.catalogue.record(key_idx).called(used.requests);
        if self.rules >= RULES_WEIGHING_EVIDENCE {
            let group = self.catalogue.key(key_idx).group(model);
            self.accepted(time, group, used.requests);
        } else if used.requests > 0 {
            // A call went through: the project's rate-limit backoff starts over.
            self.memory.reset_backoff(pool, project);
        }
        self.emit(
            time,
            EventKind::Released {
                lease: event,
                requests_sent: used.requests,
            },
        );
        self.tick(time);
        Ok(Some(used))
    }

    /// Records a failed call: ends the lease, acts on the failure's class, and says what to ask
    /// for to replace it. Late reports are refused, except evidence that the key is bad.
    pub(super) fn report_failure(
        &mut self,
        now: impl Into<Time>,
        lease_id: &str,
        fencing_token: u64,
        report: FailureReport,
    ) -> Result<Reported, EngineError> {
        let time = self.tick(now);
        let now = time.steady_ms;
        validate_detail("detail", &report.detail)?;
        validate_violations(&report.violations)?;
        if let Some(retry_after_ms) = report.retry_after_ms
            && retry_after_ms > DAY_MS
        {
            return Err(invalid(
                "retry_after",
                format!("{} is longer than a day", show_ms(retry_after_ms)),
            ));
        }
        let weighs = self.rules >= RULES_WEIGHING_EVIDENCE;
        let (token, ended, event, booked) = match self.leases.live_token(lease_id, fencing_token) {
            Ok(token) => {
                let lease = self.leases.get(token).expect("live").clone();
                let mut used = lease.used(Usage {
                    requests_sent: report.requests_sent,
                    input_tokens: None,
                });
                if weighs && report.kind.refused_by_provider() && used.requests > 0 {
                    // The provider does not count a call it refused: only those before it stay
                    // on the books.
                    used.requests -= 1;
                    if used.requests == 0 {
                        used.tokens = 0;
                    }
                }
                let event = self.end_lease(token, time, used);
                // The calls before the failed one went through.
                let before = used.requests.saturating_sub(1);
                let record = self.catalogue.record(lease.key);
                record.called(before);
                record.failed(report.kind);
                (token, lease, event, Some(used))
            }
            // A lease that ended may still bring news of its key; a live one with another
            // token is simply refused.
            Err(EngineError::StaleLease { .. })
                if report.kind.disables_key()
                    && !self.leases.is_live(self.leases.known_token(lease_id)?) =>
            {
                let token = self.leases.known_token(lease_id)?;
                let Some(ended) = self.leases.ended(token).cloned() else {
                    return Err(EngineError::StaleLease {
                        lease_id: lease_id.to_string(),
                        reason: "it ended too long ago to act on".into(),
                    });
                };
                let event = self.event_of(token, &ended);
                (token, ended, event, None)
            }
            Err(error) => return Err(error),
        };
        let key = ended.key;
        self.emit(
            time,
            EventKind::Failed {
                lease: event,
                kind: report.kind,
                detail: report.detail.clone(),
            },
        );
        if report.kind.blames_key() {
            let until = now + self.config.exclusion_ttl_ms;
            self.memory.exclude(&ended.task_id, key, until, now);
        }
        let group_key = self.catalogue.key(key).group(ended.model);
        if weighs && let Some(booked) = booked {
            // The calls before the failed one were accepted; the failed one was not, whether
            // the provider refused it (off the books already) or it failed otherwise (kept on
            // them, as it may have been counted).
            let accepted = if report.kind.refused_by_provider() {
                booked.requests
            } else {
                booked.requests.saturating_sub(1)
            };
            self.accepted(time, group_key, accepted);
        }
        let kind = match report.kind {
            // Only today's clients send it; an older engine knew no such class.
            FailureKind::ModelCapacity if !weighs => FailureKind::ServerError,
            kind => kind,
        };
        let mut learned = Learnt::default();
        if matches!(
            kind,
            FailureKind::RateLimited | FailureKind::DailyQuotaExhausted
        ) && let Some(booked) = booked
        {
            let sent = booked.requests;
            learned = self.learn(time, group_key, &ended.task_id, sent, &report, weighs);
        }
        match kind {
            FailureKind::RateLimited | FailureKind::DailyQuotaExhausted
                if learned.rest_for_the_day || kind == FailureKind::DailyQuotaExhausted =>
            {
                let cooldown = self.books.group(group_key, time).rest_for_the_day(time);
                self.cooled_down(time, group_key, cooldown);
            }
            FailureKind::RateLimited if weighs && !learned.explained => {
                let repeats = self.memory.back_off(group_key.pool, group_key.project);
                if !learned.in_a_wave && repeats > 0 {
                    // A 429 that is no limit rests the project only from the second in a row
                    // without an acceptance: for the provider's retry delay, else a span
                    // doubled each time. One alone is noise as often as not (see
                    // `learning::weighing`).
                    let span = span_of(self.config.window_ms);
                    let delay = report
                        .retry_after_ms
                        .unwrap_or_else(|| span.saturating_mul(1u64 << (repeats - 1).min(32)))
                        .min(self.config.window_ms.max(span));
                    let cooldown = self
                        .books
                        .group(group_key, time)
                        .cool_down(now.saturating_add(delay), CooldownReason::RateLimited);
                    self.cooled_down(time, group_key, cooldown);
                }
            }
            FailureKind::RateLimited | FailureKind::DailyQuotaExhausted => {
                let repeats = self.memory.back_off(group_key.pool, group_key.project);
                let delay = report.retry_after_ms.unwrap_or_else(|| {
                    let doubled = self
                        .config
                        .cooldown_base_ms
                        .saturating_mul(1u64 << repeats.min(32));
                    doubled.min(self.config.cooldown_max_ms)
                });
                let cooldown = self
                    .books
                    .group(group_key, time)
                    .cool_down(now.saturating_add(delay), CooldownReason::RateLimited);
                self.cooled_down(time, group_key, cooldown);
            }
            FailureKind::ModelCapacity => {
                let span = span_of(self.config.window_ms);
                let delay = report
                    .retry_after_ms
                    .unwrap_or(span.saturating_mul(MODEL_CAPACITY_SPANS))
                    .min(self.config.window_ms.max(span));
                if self.waves.refused(
                    group_key.pool,
                    group_key.project,
                    now,
                    self.config.window_ms,
                ) {
                    self.books
                        .discount_refusals(group_key.pool, group_key.model);
                }
                self.rest_pool(
                    time,
                    group_key,
                    now.saturating_add(delay),
                    CooldownReason::ModelCapacity,
                );
            }
            FailureKind::InvalidKey | FailureKind::PermissionDenied => {
                let reason = if report.detail.is_empty() {
                    report.kind.as_str().to_string()
                } else {
                    format!("{}: {}", report.kind.as_str(), report.detail)
                };
                self.reported_problem(time, key, token, report.kind, reason);
            }
            FailureKind::ServerError | FailureKind::Timeout | FailureKind::Other => {}
        }
        self.tick(time);
        Ok(Reported {
            key_id: self.catalogue.key(key).spec.id.clone(),
            key: Box::new(self.key_view(key, time.steady_ms)),
            booked,
            replacement: AcquireRequest {
                task_id: ended.task_id,
                pool: self.catalogue.pool_name(group_key).to_string(),
                model: self.catalogue.models.name(ended.model).to_string(),
                exclude_key_ids: Vec::new(),
                ttl_ms: Some(ended.ttl_ms),
                wait: false,
                requests: ended.requests as u32,
                estimated_tokens: ended.tokens,
                client_request_id: None,
            },
        })
    }

    /// The provider accepted `requests` of a group (rules that weigh evidence): the evidence
    /// of its limit and of waves, and the end of its project's backoff.
    fn accepted(&mut self, time: Time, group: GroupKey, requests: u64) {
        if requests == 0 {
            return;
        }
        self.books.accepted(group, time, requests);
        self.waves
            .accepted(group.pool, group.project, time.steady_ms);
        self.memory.reset_backoff(group.pool, group.project);
    }

    /// Rests every project of the group's pool for its model until steady `until_ms`.
    fn rest_pool(&mut self, time: Time, group: GroupKey, until_ms: u64, reason: CooldownReason) {
        let mut projects: Vec<_> = self
            .catalogue
            .pool(group.pool)
            .keys
            .iter()
            .map(|&key| self.catalogue.key(key).project)
            .collect();
        projects.sort_unstable();
        projects.dedup();
        for project in projects {
            let group = GroupKey { project, ..group };
            let before = self.books.group(group, time).cooldown();
            let cooldown = self.books.group(group, time).cool_down(until_ms, reason);
            if before != Some(cooldown) {
                self.cooled_down(time, group, cooldown);
            }
        }
    }

    /// What a live lease's 429 teaches its group (see [`super::learning`]): a figure named for
    /// another model is not the group's, and teaches as much as no figure. Under rules that
    /// weigh evidence, a bare 429 first counts toward a wave across the pool; one in a wave
    /// teaches nothing.
    fn learn(
        &mut self,
        time: Time,
        group: GroupKey,
        task_id: &str,
        sent: u64,
        report: &FailureReport,
        weighs: bool,
    ) -> Learnt {
        let model = self.catalogue.models.name(group.model).to_string();
        let evidence = |quota_id: &str| Evidence {
            quota_id: quota_id.to_string(),
            at_wall_ms: time.wall_ms,
            task_id: task_id.to_string(),
        };
        // A per-minute figure explains the 429 only if the books held as much; below it,
        // someone else spends the project, and it counts as if none were named.
        let held = self.books.group(group, time).requests_in_window();
        let mut learnt = Learnt::default();
        for violation in &report.violations {
            let own = violation.model.is_empty() || canonical_model(&violation.model) == model;
            let (Some(kind), Some(value), true) = (violation.kind, violation.value, own) else {
                continue;
            };
            learnt.rest_for_the_day |=
                matches!(kind, LimitKind::RequestsPerDay | LimitKind::TokensPerDay) || value == 0;
            if value > 0 {
                learnt.explained |= kind != LimitKind::RequestsPerMinute
                    || (weighs && held.saturating_add(1) >= value);
                let evidence = evidence(&violation.quota_id);
                self.books.learn_named(group, kind, value, time, evidence);
            }
        }
        if learnt.explained || learnt.rest_for_the_day || report.kind != FailureKind::RateLimited {
            return learnt;
        }
        if weighs {
            let resting_for_a_wave = self
                .books
                .group(group, time)
                .cooldown()
                .is_some_and(|c| c.reason == CooldownReason::ProviderOutage);
            let window = self.config.window_ms;
            if resting_for_a_wave
                || self
                    .waves
                    .refused(group.pool, group.project, time.steady_ms, window)
            {
                learnt.in_a_wave = true;
                if !resting_for_a_wave {
                    self.books.discount_refusals(group.pool, group.model);
                    let until = time
                        .steady_ms
                        .saturating_add(span_of(window).saturating_mul(OUTAGE_SPANS));
                    self.rest_pool(time, group, until, CooldownReason::ProviderOutage);
                }
                return learnt;
            }
        }
        let quota_id = report
            .violations
            .first()
            .map_or("", |v| v.quota_id.as_str());
        self.books
            .learn_unnamed(group, time, sent, evidence(quota_id));
        learnt
    }

    fn cooled_down(&mut self, time: Time, group_key: GroupKey, cooldown: Cooldown) {
        self.emit(
            time,
            EventKind::CooledDown {
                pool: self.catalogue.pool_name(group_key).to_string(),
                project: self.catalogue.projects.name(group_key.project).to_string(),
                model: self.catalogue.models.name(group_key.model).to_string(),
                until_ms: cooldown.until_ms,
                reason: cooldown.reason,
            },
        );
    }

    /// An operator disables a key (its leases end, counted as fully used) or enables it again,
    /// whoever disabled it.
    pub(super) fn set_key_enabled(
        &mut self,
        now: impl Into<Time>,
        key_id: &str,
        enabled: bool,
        reason: &str,
    ) -> Result<KeyView, EngineError> {
        let time = self.tick(now);
        validate_detail("reason", reason)?;
        let key = self
            .catalogue
            .key_by_id(key_id)
            .ok_or_else(|| EngineError::KeyNotFound(key_id.to_string()))?;
        if enabled {
            self.enable(time, key, Decider::Operator);
        } else {
            let reason = if reason.is_empty() {
                "disabled by an operator"
            } else {
                reason
            };
            self.disable(time, key, Decider::Operator, None, reason.to_string());
        }
        self.tick(time);
        Ok(self.key_view(key, time.steady_ms))
    }

    /// Ends the cooldown of `pool`'s group for `project` and `model`, and the backoff of the
    /// project's next rate-limit cooldown, and with `forget_learned` its learned limits: what
    /// the books hold stays.
    pub(super) fn reset_cooldown(
        &mut self,
        now: impl Into<Time>,
        pool: &str,
        project: &str,
        model: &str,
        forget_learned: bool,
    ) -> Result<GroupView, EngineError> {
        let time = self.tick(now);
        let pool_idx = self
            .catalogue
            .pool_by_name(pool)
            .ok_or_else(|| invalid("pool", format!("no pool {pool:?}")))?;
        let model_idx = self
            .catalogue
            .models
            .get(canonical_model(model))
            .filter(|&m| self.catalogue.pool(pool_idx).serves(m))
            .ok_or_else(|| invalid("model", format!("pool {pool} serves no model {model:?}")))?;
        let project_idx = self
            .catalogue
            .projects
            .get(project)
            .filter(|&p| {
                self.catalogue
                    .keys()
                    .iter()
                    .any(|k| k.pool == pool_idx && k.project == p && !k.is_gone())
            })
            .ok_or_else(|| {
                invalid(
                    "project",
                    format!("no key of pool {pool} is in project {project:?}"),
                )
            })?;
        let group_key = GroupKey {
            pool: pool_idx,
            project: project_idx,
            model: model_idx,
        };
        if forget_learned {
            self.books.forget_learned(group_key);
        }
        let group = self.books.group(group_key, time);
        group.end_cooldown();
        let group = group.clone();
        let view = self.group_view(group_key, &group);
        self.memory.reset_backoff(pool_idx, project_idx);
        self.freed = true;
        self.emit(
            time,
            EventKind::CooldownReset {
                pool: view.pool.clone(),
                project: view.project.clone(),
                model: view.model.clone(),
            },
        );
        self.tick(time);
        Ok(view)
    }

    /// Ends a live lease: frees its slot and settles its quota with what it `used`.
    pub(super) fn end_lease(&mut self, token: Token, time: Time, used: Amount) -> LeaseEvent {
        let event = self.lease_event(token);
        let lease = self.leases.end(token);
        self.catalogue.give_back(lease.key, token);
        if self.catalogue.key(lease.key).is_gone() {
            self.drained.push(lease.key);
        }
        let group_key = self.catalogue.key(lease.key).group(lease.model);
        self.books.settle(group_key, time, lease.reserved(), used);
        self.freed = true;
        self.fail_renewals_of(token, time, group_key);
        event
    }
}

/// A report's quota violations, bounded as the protocol says.
fn validate_violations(violations: &[super::QuotaViolation]) -> Result<(), EngineError> {
    if violations.len() > MAX_QUOTA_VIOLATIONS {
        return Err(invalid(
            "quota_violations",
            format!(
                "{} is above the maximum of {MAX_QUOTA_VIOLATIONS}",
                violations.len()
            ),
        ));
    }
    for violation in violations {
        for (field, text) in [
            ("quota_violations.quota_id", &violation.quota_id),
            ("quota_violations.model", &violation.model),
        ] {
            if text.len() > MAX_ID_BYTES {
                return Err(invalid(
                    field,
                    format!(
                        "{} bytes is above the maximum of {MAX_ID_BYTES}",
                        text.len()
                    ),
                ));
            }
        }
        if let Some(value) = violation.value
            && value > MAX_QUOTA_VALUE
        {
            return Err(invalid(
                "quota_violations.quota_value",
                format!("{value} is above the maximum of {MAX_QUOTA_VALUE}"),
            ));
        }
    }
    Ok(())
}
