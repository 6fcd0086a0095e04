//! The gRPC service `keylease.v1.KeyLease`: each call converts its request at the edge, runs
//! engine commands through the shared state, and converts the answer back. No rules live here.

use crate::engine::{EventKind, FailureReport, Renewed};
use crate::state::{AcquireFailure, State};
use crate::wire;
use keylease::pb;
use keylease::pb::key_lease_server::KeyLease;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Keys per `GetStatus` page unless asked otherwise, and at most.
const DEFAULT_PAGE_SIZE: usize = 1000;
const MAX_PAGE_SIZE: usize = 10_000;

pub struct KeyLeaseService {
    state: Arc<State>,
}

impl KeyLeaseService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl KeyLease for KeyLeaseService {
    async fn acquire_key(
        &self,
        request: Request<pb::AcquireKeyRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let request = request.into_inner();
        let wait = wire::wait_of("wait", request.wait, self.state.max_wait)?;
        let request = wire::acquire_request(request)?;
        match self.state.acquire(request, wait).await {
            Ok(lease) => Ok(Response::new(wire::lease_to_pb(lease))),
            Err(failure) => Err(wire::acquire_failure_status(failure, self.state.now_ms())),
        }
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let request = request.into_inner();
        let ttl_ms = wire::duration_ms("ttl", request.ttl)?;
        let wait = wire::wait_of("wait", request.wait, self.state.max_wait)?;
        let deadline_ms = self.state.now_ms() + wait.as_millis() as u64;
        let shutdown = self.state.shutdown_token();
        loop {
            // Subscribed before trying, so a release between the try and the wait is not missed.
            let mut events = self.state.subscribe();
            let renewed = self.state.run(|engine, now| {
                engine.renew(
                    now,
                    &request.lease_id,
                    request.fencing_token,
                    ttl_ms,
                    request.additional_requests,
                    request.additional_input_tokens,
                )
            })?;
            let (lease, unavailable) = match renewed {
                Renewed::Done(lease) => {
                    return Ok(Response::new(pb::RenewLeaseResponse {
                        lease: Some(wire::lease_to_pb(lease)),
                    }));
                }
                Renewed::QuotaUnavailable(lease, unavailable) => (lease, unavailable),
            };
            let now = self.state.now_ms();
            let wake_ms = unavailable
                .retry_at_ms
                .unwrap_or(deadline_ms)
                .min(deadline_ms)
                .min(lease.expires_ms);
            if now >= deadline_ms || now >= lease.expires_ms {
                return Err(wire::unavailable_status(unavailable, now));
            }
            tokio::select! {
                () = self.state.sleep_until_ms(wake_ms) => {}
                () = room_made(&mut events) => {}
                () = shutdown.cancelled() => return Err(Status::unavailable("the server is shutting down")),
            }
        }
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let request = request.into_inner();
        let released = self.state.run(|engine, now| {
            engine.release(
                now,
                &request.lease_id,
                request.fencing_token,
                request.requests_sent,
                request.input_tokens,
            )
        })?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn report_failure(
        &self,
        request: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let request = request.into_inner();
        let report = FailureReport {
            kind: wire::failure_kind(request.kind)?,
            retry_after_ms: wire::duration_ms("retry_after", request.retry_after)?,
            detail: request.detail,
            requests_sent: request.requests_sent,
        };
        let wait = wire::wait_of(
            "replacement_wait",
            request.replacement_wait,
            self.state.max_wait,
        )?;
        let reported = self.state.run(|engine, now| {
            engine.report_failure(now, &request.lease_id, request.fencing_token, report)
        })?;
        let key = self
            .state
            .run(|engine, now| engine.key_status(now, &reported.key_id))?;
        let mut response = pb::ReportFailureResponse {
            key: Some(wire::key_to_pb(key)),
            ..Default::default()
        };
        if request.rotate {
            match self.state.acquire(reported.replacement, wait).await {
                Ok(lease) => response.replacement = Some(wire::lease_to_pb(lease)),
                Err(AcquireFailure::Unavailable(unavailable)) => {
                    response.replacement_unavailable =
                        Some(wire::unavailable_to_pb(unavailable, self.state.now_ms()));
                }
                Err(failure) => {
                    return Err(wire::acquire_failure_status(failure, self.state.now_ms()));
                }
            }
        }
        Ok(Response::new(response))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {size} is above the maximum {MAX_PAGE_SIZE}"
                )));
            }
            size => size,
        };
        let offset = match request.page_token.as_str() {
            "" => 0,
            token => token.parse::<usize>().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token: {token:?} is not a token this server gave"
                ))
            })?,
        };
        let pool = Some(request.pool.as_str()).filter(|p| !p.is_empty());
        let status = self
            .state
            .run(|engine, now| engine.status(now, pool, offset, page_size))?;
        Ok(Response::new(pb::GetStatusResponse {
            keys: status.keys.into_iter().map(wire::key_to_pb).collect(),
            quota_groups: status
                .groups
                .into_iter()
                .map(|group| pb::QuotaGroupStatus {
                    pool: group.pool,
                    project: group.project,
                    model: group.model,
                    requests_per_minute: Some(wire::usage_to_pb(group.requests_per_minute)),
                    tokens_per_minute: Some(wire::usage_to_pb(group.tokens_per_minute)),
                    requests_per_day: Some(wire::usage_to_pb(group.requests_per_day)),
                    cooling_until: group.cooldown.map(|c| wire::timestamp(c.until_ms)),
                    cooling_reason: group
                        .cooldown
                        .map(|c| c.reason.as_str().to_string())
                        .unwrap_or_default(),
                })
                .collect(),
            waiting: status
                .waiting
                .into_iter()
                .map(|(pool, model, waiters)| pb::WaitingCount {
                    pool,
                    model,
                    waiters: waiters as u32,
                })
                .collect(),
            next_page_token: status
                .next_offset
                .map(|o| o.to_string())
                .unwrap_or_default(),
            total_keys: status.total_keys as u32,
            live_leases: status.live_leases as u32,
            now: Some(wire::timestamp(status.now_ms)),
        }))
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let mut events = self.state.subscribe();
        let shutdown = self.state.shutdown_token();
        let state = self.state.clone();
        let (sender, receiver) = mpsc::channel(64);
        // Ends when the server shuts down or the watcher goes away.
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    received = events.recv() => match received {
                        Ok(event) => wire::event_to_pb(event),
                        Err(broadcast::error::RecvError::Lagged(missed)) => pb::Event {
                            at: Some(wire::timestamp(state.now_ms())),
                            kind: Some(pb::event::Kind::Missed(missed)),
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
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn set_key_enabled(
        &self,
        request: Request<pb::SetKeyEnabledRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let request = request.into_inner();
        let key = self.state.run(|engine, now| {
            engine.set_key_enabled(now, &request.key_id, request.enabled, &request.reason)
        })?;
        Ok(Response::new(wire::key_to_pb(key)))
    }
}

/// Resolves at the next event that may have made quota room: a lease ended.
async fn room_made(events: &mut broadcast::Receiver<crate::engine::Event>) {
    loop {
        match events.recv().await {
            Ok(event)
                if matches!(
                    event.kind,
                    EventKind::Released { .. } | EventKind::Expired(_) | EventKind::Failed { .. }
                ) =>
            {
                return;
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}
