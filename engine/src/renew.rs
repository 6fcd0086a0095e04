//! Renewing a lease: it lives on at once, and what it asks for more is booked when its
//! project has room, or waits for it in the lease's line (served among the acquires there, first
//! come, first served, needing no free key), or is refused with why and until when. A renewal
//! in line leaves it when its lease ends ([`Engine::end_lease`]) or its key begins to drain.

use super::catalogue::GroupKey;
use super::ids::Token;
use super::quota::QuotaGroup;
use super::tenants::{Place, RULES_TENANTS};
use super::waiting::{Ask, Blocked, WaitQueue, Waiter};
use super::{
    Engine, EngineError, EventKind, Renewal, Renewed, Time, Unavailable, UnavailableReason,
    WaiterId, invalid, validate_tokens,
};
use foldhash::HashSet;
use keylease_core::MAX_INPUT_TOKENS;

impl Engine {
    /// Renews a lease: it lives on at once (to its TTL from now), and the requests and tokens
    /// it asks for more are booked when its group has room. Without room, with `wait` the
    /// renewal joins its lease's line for them (served in line order, leaving when the lease
    /// ends); without, it says why and until when.
    pub(super) fn renew(
        &mut self,
        now: impl Into<Time>,
        renewal: Renewal,
        wait: bool,
    ) -> Result<Renewed, EngineError> {
        let Renewal {
            lease_id,
            fencing_token,
            ttl_ms,
            additional_requests,
            additional_tokens,
        } = renewal;
        let time = self.tick(now);
        let token = self.leases.live_token(&lease_id, fencing_token)?;
        let lease = self.leases.get(token).expect("live");
        let ttl_ms = self.validate_ttl(ttl_ms.unwrap_or(lease.ttl_ms), true)?;
        validate_tokens("additional_input_tokens", additional_tokens)?;
        let total_tokens = lease.tokens.saturating_add(additional_tokens);
        if total_tokens > MAX_INPUT_TOKENS {
            return Err(invalid(
                "additional_input_tokens",
                format!(
                    "the lease's {total_tokens} input tokens in all are above the maximum of {MAX_INPUT_TOKENS}"
                ),
            ));
        }
        let total = lease.requests + u64::from(additional_requests);
        if total > u64::from(self.config.max_requests_per_lease) {
            return Err(invalid(
                "additional_requests",
                format!(
                    "{total} in all is above the maximum of {} per lease",
                    self.config.max_requests_per_lease
                ),
            ));
        }
        let group_key = self.catalogue.key(lease.key).group(lease.model);
        self.check_servable(group_key.pool, group_key.model, total, total_tokens)?;
        let draining = self.catalogue.key(lease.key).draining;
        // A draining key's leases run to the end they had: the drain is over within max_ttl.
        if !draining {
            self.leases.extend(token, ttl_ms, time.steady_ms);
        }

        let (requests, tokens) = (u64::from(additional_requests), additional_tokens);
        let shortfall = if requests == 0 && tokens == 0 {
            None
        } else {
            self.more_for_lease(time, token, requests, tokens)
        };
        let event = self.lease_event(token);
        self.emit(time, EventKind::Renewed(event));
        let view = self.view(token);
        Ok(match shortfall {
            None => Renewed::Done(view),
            Some(unavailable) if wait && unavailable.reason != UnavailableReason::KeyDraining => {
                let id = self.lines.next_id();
                let lease = self.leases.get(token).expect("live");
                let line = (group_key.pool, group_key.model);
                let waiter = Waiter {
                    task_id: lease.task_id.clone(),
                    ask: Ask {
                        pool: group_key.pool,
                        model: group_key.model,
                        ttl_ms: lease.ttl_ms,
                        requests,
                        tokens,
                        excluded: HashSet::default(),
                    },
                    client_request_id: None,
                    exclusion_ends: Vec::new(),
                    renews: Some(token),
                    tenant: String::new(),
                    place: Place::ARRIVAL,
                };
                let caller = (self.rules >= RULES_TENANTS).then_some(&self.caller);
                self.lines.join(id, waiter, caller, vec![group_key]);
                self.wake_line_at(time, line);
                Renewed::Queued(view, id)
            }
            Some(unavailable) => Renewed::QuotaUnavailable(view, unavailable),
        })
    }

    /// Books `requests` and `tokens` more on live lease `token` when its group has room for
    /// them; otherwise why not, and until when.
    pub(super) fn more_for_lease(
        &mut self,
        time: Time,
        token: Token,
        requests: u64,
        tokens: u64,
    ) -> Option<Unavailable> {
        let (group_key, draining) = self.group_of_lease(token);
        let group = self.books.group(group_key, time);
        if !draining && group.cooldown().is_none() && group.can_afford(requests, tokens) {
            self.books.reserve(group_key, time, requests, tokens);
            self.leases.add_reservation(token, requests, tokens);
            return None;
        }
        Some(self.renewal_unavailable(time, token, requests, tokens))
    }

    /// Why live lease `token` gets no `requests` and `tokens` more now, and when it might.
    pub(super) fn renewal_unavailable(
        &mut self,
        time: Time,
        token: Token,
        requests: u64,
        tokens: u64,
    ) -> Unavailable {
        let (group_key, draining) = self.group_of_lease(token);
        if draining {
            // Its leases run to the end they had: nothing more comes to them.
            return Unavailable {
                reason: UnavailableReason::KeyDraining,
                retry_at_ms: None,
            };
        }
        let group = self.books.group(group_key, time);
        Unavailable {
            reason: shortfall_reason(group),
            retry_at_ms: group.affordable_at(time, requests, tokens),
        }
    }

    /// Renewals waiting on lease `token`, which just ended in `group_key`, leave the line:
    /// there is nothing more to renew.
    pub(super) fn fail_renewals_of(&mut self, token: Token, time: Time, group_key: GroupKey) {
        for id in self.lines.renewals_of(token) {
            self.lines.leave(id).expect("in line");
            let unavailable = Unavailable {
                reason: shortfall_reason(self.books.group(group_key, time)),
                retry_at_ms: None,
            };
            self.notices.waiter_failures.push((id, unavailable));
        }
    }

    /// Live lease `token`'s quota group, and whether its key is draining.
    fn group_of_lease(&self, token: Token) -> (GroupKey, bool) {
        let lease = self.leases.get(token).expect("live");
        let key = self.catalogue.key(lease.key);
        (key.group(lease.model), key.draining)
    }

    /// Books renewal `id`'s requests and tokens on its lease when its group has room and no
    /// earlier waiter was refused it; whether it left the line (served, or failed on a key
    /// that began draining).
    pub(super) fn serve_renewal(
        &mut self,
        time: Time,
        id: WaiterId,
        queue: &mut WaitQueue,
        blocked: &mut Blocked,
    ) -> bool {
        let waiter = &queue.waiters[&id];
        let place = waiter.place;
        let token = waiter.renews.expect("a renewal");
        let (requests, tokens) = (waiter.ask.requests, waiter.ask.tokens);
        let lease = self.leases.get(token).expect("a renewal's lease is live");
        let group_key = self.catalogue.key(lease.key).group(lease.model);
        if blocked.contains_key(&group_key) {
            return false;
        }
        #[cfg(test)]
        {
            self.waiters_looked_at += 1;
        }
        match self.more_for_lease(time, token, requests, tokens) {
            None => {
                queue.remove(id);
                queue.clock.granted(place.start);
                let event = self.lease_event(token);
                self.emit(time, EventKind::Renewed(event));
                let view = self.view(token);
                self.notices.waiter_renewals.push((id, view));
                true
            }
            Some(unavailable) if unavailable.reason == UnavailableReason::KeyDraining => {
                queue.remove(id);
                self.notices.waiter_failures.push((id, unavailable));
                true
            }
            Some(_) => {
                blocked.entry(group_key).or_insert(place.priority);
                false
            }
        }
    }
}

/// Why a group cannot book more for a lease it has.
fn shortfall_reason(group: &QuotaGroup) -> UnavailableReason {
    if group.cooldown().is_some() {
        UnavailableReason::CoolingDown
    } else {
        UnavailableReason::QuotaSpent
    }
}
