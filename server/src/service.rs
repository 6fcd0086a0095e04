//! The gRPC service `keylease.v1.KeyLease`: each call converts its request at the edge, runs
//! engine commands through the shared state, and converts the answer back. No rules live here.
//! Free text from clients is redacted here, before any command sees it, and so is every error
//! message on its way out.

use crate::auth::caller_name;
use crate::config::tenants::Decided;
use crate::fleet::FleetView;
use crate::shell::{AcquireFailure, State};
use crate::wire;
use keylease::pb;
use keylease::pb::key_lease_server::KeyLease;
use keylease_engine::{Command, FailureReport, QuotaViolation, Renewal};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Keys per `GetStatus` page unless asked otherwise, and at most.
const DEFAULT_PAGE_SIZE: usize = 1000;
const MAX_PAGE_SIZE: usize = 10_000;
/// Model names no pool serves yet that one caller may ask for in a minute: each may make a pool
/// remember a model, and the engine, which does not know callers, bounds only their number.
pub const NEW_MODELS_PER_CALLER_PER_MINUTE: u32 = 30;
/// (pool, model) pairs remembered as served, and callers counted, at most: past it the
/// memory starts again (a caller then meets its bound later, never sooner).
const MAX_REMEMBERED: usize = 10_000;

pub struct KeyLeaseService {
    state: Arc<State>,
    /// The fleet, when this server is the replica that leads it.
    fleet: Option<FleetView>,
    /// One permit per `WatchEvents` stream that may be open.
    watch_slots: Arc<Semaphore>,
    new_models: NewModels,
}

/// A model name in its pool: `(pool, model)`.
type PoolModel = (String, String);
/// The minute (steady ms / 60,000) a caller's new names were counted in, and those names.
type AskedInMinute = (u64, Vec<PoolModel>);

/// Which model names their pool serves (listed, or leased before), and which new ones each
/// caller asked for in the current minute.
#[derive(Default)]
struct NewModels {
    known: std::sync::RwLock<std::collections::HashSet<PoolModel>>,
    /// Per caller, at most the bound of names.
    asked: std::sync::Mutex<std::collections::HashMap<Arc<str>, AskedInMinute>>,
}

impl NewModels {
    /// Counts a name its pool does not serve yet (`served` asks the engine, on a name not
    /// known here) against the caller's minute, once however often it is asked for (a replica
    /// that just took the leadership has leased nothing yet, and its callers ask for their
    /// usual names again and again until keys come free); refused past the bound.
    fn admit(
        &self,
        by: Option<&Arc<str>>,
        pair: &PoolModel,
        now_ms: u64,
        served: impl FnOnce() -> bool,
    ) -> Result<(), Status> {
        let known = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(pair);
        if known {
            return Ok(());
        }
        if served() {
            self.learn(pair.clone());
            return Ok(());
        }
        let minute = now_ms / 60_000;
        let caller = by.cloned().unwrap_or_else(|| Arc::from(""));
        let mut asked = self
            .asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if asked.len() >= MAX_REMEMBERED && !asked.contains_key(&caller) {
            asked.clear();
        }
        let (counted, names) = asked.entry(caller.clone()).or_insert((minute, Vec::new()));
        if *counted != minute {
            *counted = minute;
            names.clear();
        }
        if names.contains(pair) {
            return Ok(());
        }
        if names.len() >= NEW_MODELS_PER_CALLER_PER_MINUTE as usize {
            let who = if caller.is_empty() {
                "this caller"
            } else {
                &caller
            };
            return Err(Status::resource_exhausted(format!(
                "model: {who} asked for {NEW_MODELS_PER_CALLER_PER_MINUTE} model names no pool serves yet in this minute, the most one caller may; retry in a minute, or list the model in the configuration"
            )));
        }
        names.push(pair.clone());
        Ok(())
    }

    /// The pool serves the (pool, model) `pair` (a lease on it was granted): the name is known
    /// from now on.
    fn learn(&self, pair: PoolModel) {
        if self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&pair)
        {
            return;
        }
        let mut known = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(pair);
    }
}

impl KeyLeaseService {
    pub fn new(state: Arc<State>, fleet: Option<FleetView>) -> Self {
        let watch_slots = Arc::new(Semaphore::new(state.limits.max_watch_streams));
        Self {
            state,
            fleet,
            watch_slots,
            new_models: NewModels::default(),
        }
    }

    fn redact(&self, text: String) -> String {
        self.state.redact(text)
    }

    /// The caller a call of `by` is made for, from the tenant it named (masked: a name is free
    /// text, and an error quotes it) and the class it asked for.
    fn decide_caller(
        &self,
        by: Option<&Arc<str>>,
        named: &str,
        priority: i32,
    ) -> Result<Decided, Status> {
        let asked = wire::priority_of("priority", priority)?;
        let named = self.redact(named.to_string());
        self.state
            .decide_caller(by, &named, asked)
            .map_err(wire::tenant_status)
    }

    pub(crate) fn outgoing<T>(&self, result: Result<T, Status>) -> Result<T, Status> {
        self.state.outgoing(result)
    }

    pub(crate) async fn acquire_key(
        &self,
        by: Option<&Arc<str>>,
        request: pb::AcquireKeyRequest,
    ) -> Result<pb::Lease, Status> {
        let wait = wire::wait_of("wait", request.wait, self.state.max_wait)?;
        let decided = self.decide_caller(by, &request.tenant, request.priority)?;
        let mut request = wire::acquire_request(request)?;
        request.task_id = self.redact(request.task_id);
        let pair = (
            request.pool.clone(),
            keylease_engine::canonical_model(&request.model).to_string(),
        );
        self.new_models.admit(by, &pair, self.state.now_ms(), || {
            self.state.serves_model(&pair.0, &pair.1)
        })?;
        let priority = decided.caller.as_ref().map(|c| c.priority);
        match self.state.acquire(by, request, wait, decided.caller).await {
            Ok(lease) => {
                self.new_models.learn(pair);
                Ok(wire::lease_to_pb(lease, self.state.time(), priority))
            }
            Err(failure) => Err(wire::acquire_failure_status(failure, self.state.now_ms())),
        }
    }

    pub(crate) async fn renew_lease(
        &self,
        by: Option<&Arc<str>>,
        request: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, Status> {
        let ttl_ms = wire::duration_ms("ttl", request.ttl)?;
        let wait = wire::wait_of("wait", request.wait, self.state.max_wait)?;
        let decided = self.decide_caller(by, &request.tenant, request.priority)?;
        let priority = decided.caller.as_ref().map(|c| c.priority);
        let renewal = Renewal {
            lease_id: request.lease_id,
            fencing_token: request.fencing_token,
            ttl_ms,
            additional_requests: request.additional_requests,
            additional_tokens: request.additional_input_tokens,
        };
        match self.state.renew(by, renewal, wait, decided.caller).await {
            Ok(lease) => Ok(pb::RenewLeaseResponse {
                lease: Some(wire::lease_to_pb(lease, self.state.time(), priority)),
            }),
            Err(failure) => Err(wire::acquire_failure_status(failure, self.state.now_ms())),
        }
    }

    pub(crate) async fn release(
        &self,
        by: Option<&Arc<str>>,
        request: pb::ReleaseRequest,
    ) -> Result<pb::ReleaseResponse, Status> {
        let usage = wire::usage(&request);
        let call_ms = wire::duration_ms("call_duration", request.call_duration)?;
        let release = Command::Release {
            lease_id: request.lease_id,
            fencing_token: request.fencing_token,
            usage,
        };
        let booked = self
            .state
            .run(by, release.timed(call_ms))
            .await?
            .into_released()
            .map_err(wire::engine_status)?;
        Ok(pb::ReleaseResponse {
            released: booked.is_some(),
            requests_booked: booked.map_or(0, |b| b.requests as u32),
            input_tokens_booked: booked.map_or(0, |b| b.tokens),
        })
    }

    pub(crate) async fn report_failure(
        &self,
        by: Option<&Arc<str>>,
        request: pb::ReportFailureRequest,
    ) -> Result<pb::ReportFailureResponse, Status> {
        let report = FailureReport {
            kind: wire::failure_kind(request.kind, request.class)?,
            retry_after_ms: wire::duration_ms("retry_after", request.retry_after)?,
            detail: self.redact(request.detail),
            requests_sent: request.requests_sent,
            // Free text from the caller, shown in status: masked as the detail is.
            violations: wire::violations(request.quota_violations)
                .into_iter()
                .map(|v| QuotaViolation {
                    quota_id: self.redact(v.quota_id),
                    model: self.redact(v.model),
                    ..v
                })
                .collect(),
        };
        let wait = wire::wait_of(
            "replacement_wait",
            request.replacement_wait,
            self.state.max_wait,
        )?;
        let call_ms = wire::duration_ms("call_duration", request.call_duration)?;
        let decided = self.decide_caller(by, &request.tenant, request.priority)?;
        let priority = decided.caller.as_ref().map(|c| c.priority);
        let (reported, replacement) = if request.rotate {
            let (reported, replacement) = self
                .state
                .report_and_replace(
                    by,
                    (request.lease_id, request.fencing_token),
                    report,
                    wait,
                    call_ms,
                    decided.caller,
                )
                .await
                .map_err(|failure| wire::acquire_failure_status(failure, self.state.now_ms()))?;
            (reported, Some(replacement))
        } else {
            let command = Command::ReportFailure {
                lease_id: request.lease_id,
                fencing_token: request.fencing_token,
                report,
            };
            let reply = self.state.run(by, command.timed(call_ms)).await?;
            (reply.into_reported().map_err(wire::engine_status)?, None)
        };
        let mut response = pb::ReportFailureResponse {
            key: Some(wire::key_to_pb(*reported.key, self.state.time())),
            requests_booked: reported.booked.map_or(0, |b| b.requests as u32),
            ..Default::default()
        };
        match replacement {
            None => {}
            Some(Ok(lease)) => {
                response.replacement = Some(wire::lease_to_pb(lease, self.state.time(), priority));
            }
            Some(Err(AcquireFailure::Unavailable(unavailable))) => {
                response.replacement_unavailable =
                    Some(wire::unavailable_to_pb(unavailable, self.state.now_ms()));
            }
            Some(Err(failure)) => {
                return Err(wire::acquire_failure_status(failure, self.state.now_ms()));
            }
        }
        Ok(response)
    }

    pub(crate) async fn get_status(
        &self,
        request: pb::GetStatusRequest,
    ) -> Result<pb::GetStatusResponse, Status> {
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {size} is above the maximum {MAX_PAGE_SIZE}"
                )));
            }
            size => size,
        };
        let after = wire::page_after(&request.page_token)?;
        let pool = Some(request.pool.as_str()).filter(|p| !p.is_empty());
        let model = Some(request.model.as_str()).filter(|m| !m.is_empty());
        if request.model.len() > keylease::MAX_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "model: longer than {} bytes",
                keylease::MAX_ID_BYTES
            )));
        }
        let status = self
            .state
            .read(|engine, now| {
                engine.status_with_plan(now, pool, model, after.as_deref(), page_size)
            })
            .await?
            .map_err(wire::engine_status)?;
        let now = status.now;
        let replication = self.fleet.as_ref().map(|fleet| {
            let fleet = fleet.read();
            pb::Replication {
                replica: fleet.replica.clone(),
                epoch: fleet.epoch,
                log_position: self.state.journal().map_or(0, |j| j.durable_seq()),
                key_set_differences: fleet.key_set_differences.clone(),
            }
        });
        Ok(pb::GetStatusResponse {
            replication,
            keys: status
                .keys
                .into_iter()
                .map(|key| wire::key_to_pb(key, now))
                .collect(),
            quota_groups: status
                .groups
                .into_iter()
                .map(|group| wire::group_to_pb(group, now))
                .collect(),
            waiting: status
                .waiting
                .into_iter()
                .map(|(pool, model, waiters)| pb::WaitingCount {
                    tenants: status
                        .tenants_waiting
                        .iter()
                        .filter(|t| t.pool == pool && t.model == model)
                        .map(|t| pb::TenantWaiting {
                            tenant: t.tenant.clone(),
                            priority: wire::priority_to_pb(t.priority) as i32,
                            waiters: t.waiters as u32,
                        })
                        .collect(),
                    pool,
                    model,
                    waiters: waiters as u32,
                })
                .collect(),
            next_page_token: status
                .next_after
                .map(|key_id| wire::page_token(&key_id))
                .unwrap_or_default(),
            total_keys: status.total_keys as u32,
            live_leases: status.live_leases as u32,
            now: Some(wire::timestamp(now.wall_ms)),
            window: Some(wire::duration_to_pb(std::time::Duration::from_millis(
                status.window_ms,
            ))),
        })
    }

    fn watch_events(&self) -> Result<WatchStream, Status> {
        let slot = self.watch_slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "watch_events: {} streams are open, as many as the server allows (server.max_watch_streams)",
                self.state.limits.max_watch_streams
            ))
        })?;
        let mut events = self.state.subscribe();
        let shutdown = self.state.shutdown_token();
        let state = self.state.clone();
        let (sender, receiver) = mpsc::channel(64);
        // Ends when the server shuts down or the watcher goes away, giving its slot back.
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                let event = tokio::select! {
                    received = events.recv() => match received {
                        Ok(published) => {
                            // Shown once it would survive a crash; a store that stopped ends
                            // the stream.
                            if state.durable_event(published.seq).await.is_err() {
                                return;
                            }
                            wire::event_to_pb(published.event, published.by.as_deref())
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => pb::Event {
                            at: Some(wire::timestamp(state.time().wall_ms)),
                            kind: Some(pb::event::Kind::Missed(missed)),
                            caller: String::new(),
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = shutdown.cancelled() => return,
                    () = sender.closed() => return,
                };
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    async fn set_key_enabled(
        &self,
        by: Option<&Arc<str>>,
        request: pb::SetKeyEnabledRequest,
    ) -> Result<pb::KeyStatus, Status> {
        let key = self
            .state
            .set_key_enabled(by, request.key_id, request.enabled, request.reason)
            .await?
            .map_err(wire::engine_status)?;
        Ok(wire::key_to_pb(key, self.state.time()))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// Each call unwraps its request, runs the handler above, and passes its error through
/// [`KeyLeaseService::outgoing`].
#[tonic::async_trait]
impl KeyLease for KeyLeaseService {
    async fn acquire_key(
        &self,
        request: Request<pb::AcquireKeyRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let by = caller_name(&request);
        let answer = self.acquire_key(by.as_ref(), request.into_inner()).await;
        self.outgoing(answer).map(Response::new)
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let by = caller_name(&request);
        let answer = self.renew_lease(by.as_ref(), request.into_inner()).await;
        self.outgoing(answer).map(Response::new)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let by = caller_name(&request);
        let answer = self.release(by.as_ref(), request.into_inner()).await;
        self.outgoing(answer).map(Response::new)
    }

    async fn report_failure(
        &self,
        request: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let by = caller_name(&request);
        let answer = self.report_failure(by.as_ref(), request.into_inner()).await;
        self.outgoing(answer).map(Response::new)
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let answer = self.get_status(request.into_inner()).await;
        self.outgoing(answer).map(Response::new)
    }

    type WatchEventsStream = WatchStream;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.outgoing(self.watch_events()).map(Response::new)
    }

    async fn set_key_enabled(
        &self,
        request: Request<pb::SetKeyEnabledRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let by = caller_name(&request);
        let answer = self
            .set_key_enabled(by.as_ref(), request.into_inner())
            .await;
        self.outgoing(answer).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(model: &str) -> (String, String) {
        ("gemini".to_string(), model.to_string())
    }

    /// The engine's answer for a pool that serves any model: none served yet.
    fn unserved() -> bool {
        false
    }

    #[test]
    fn a_new_name_asked_again_and_again_counts_once() {
        let models = NewModels::default();
        let caller: Arc<str> = Arc::from("workers");
        // Until a key comes free, callers ask for a model their pool does not serve yet far
        // more often than the bound.
        for _ in 0..10 * NEW_MODELS_PER_CALLER_PER_MINUTE {
            models
                .admit(Some(&caller), &pair("m"), 0, unserved)
                .unwrap();
        }
        for n in 1..NEW_MODELS_PER_CALLER_PER_MINUTE {
            models
                .admit(Some(&caller), &pair(&format!("m{n}")), 0, unserved)
                .unwrap();
        }
        let refused = models
            .admit(Some(&caller), &pair("one-more"), 0, unserved)
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("workers"), "{refused:?}");
        // Names it asked for this minute are still admitted; other callers count apart; the
        // next minute starts again.
        models
            .admit(Some(&caller), &pair("m7"), 0, unserved)
            .unwrap();
        models.admit(None, &pair("one-more"), 0, unserved).unwrap();
        models
            .admit(Some(&caller), &pair("one-more"), 60_000, unserved)
            .unwrap();
    }

    #[test]
    fn a_name_its_pool_serves_is_never_counted() {
        let models = NewModels::default();
        for n in 0..NEW_MODELS_PER_CALLER_PER_MINUTE {
            models
                .admit(None, &pair(&format!("m{n}")), 0, unserved)
                .unwrap();
        }
        // Leased before here, or served by the engine (listed, or remembered: a replica that
        // just took the leadership has leased nothing yet).
        models.learn(pair("leased"));
        models.admit(None, &pair("leased"), 0, unserved).unwrap();
        models.admit(None, &pair("listed"), 0, || true).unwrap();
        models.admit(None, &pair("listed"), 0, unserved).unwrap();
        assert!(models.admit(None, &pair("unknown"), 0, unserved).is_err());
    }
}
