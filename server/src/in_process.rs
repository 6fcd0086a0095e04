//! The KeyLease service called in this process, without a connection: what the embedded proxy
//! and the in-process batch of a single server lease through. Each call passes the gate with
//! the caller's token as a call over gRPC does (the same caller, role and refusal), then the
//! service's own handler, its events by that caller, and its redaction of errors. No call starts
//! once the server begins to stop, and those in flight are waited for before the last snapshot.
//! A replica's proxy keeps the in-memory gRPC connection: its router forwards to the leader.

use crate::auth::Gate;
use crate::service::KeyLeaseService;
use keylease::pb;
use keylease_client::in_process::{Answer, InProcessCalls};
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::codegen::http;

/// The service's lease calls for this process.
pub struct InProcess {
    service: Arc<KeyLeaseService>,
    gate: Arc<Gate>,
    /// Cancelled when the server begins to stop.
    stopping: CancellationToken,
    in_flight: TaskTracker,
}

impl InProcess {
    pub fn new(
        service: Arc<KeyLeaseService>,
        gate: Arc<Gate>,
        stopping: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            service,
            gate,
            stopping,
            in_flight: TaskTracker::new(),
        })
    }

    /// Refuses calls from now on, and resolves once those in flight have ended.
    pub async fn stop(&self) {
        self.in_flight.close();
        self.in_flight.wait().await;
    }

    /// Runs `call` as the holder of `token`, admitted as a call to `method` over gRPC would be.
    fn serve<'a, T, Fut>(
        &'a self,
        method: &'static str,
        token: Option<&str>,
        call: impl FnOnce(&'a KeyLeaseService, Option<Arc<str>>) -> Fut + Send + 'a,
    ) -> Answer<'a, T>
    where
        T: Send + 'a,
        Fut: Future<Output = Result<T, Status>> + Send + 'a,
    {
        let caller = match self.admit(method, token) {
            Ok(caller) => caller,
            Err(refused) => return Box::pin(std::future::ready(Err(refused))),
        };
        let service = &*self.service;
        // Counted before the check: a stop that closes in between waits for it.
        let answer = self
            .in_flight
            .track_future(async move { service.outgoing(call(service, caller).await) });
        if self.in_flight.is_closed() || self.stopping.is_cancelled() {
            return Box::pin(std::future::ready(Err(Status::unavailable(
                "keylease is stopping",
            ))));
        }
        Box::pin(answer)
    }

    /// The caller the gate admits for `method` with `token`.
    fn admit(&self, method: &str, token: Option<&str>) -> Result<Option<Arc<str>>, Status> {
        let mut headers = http::HeaderMap::new();
        if let Some(token) = token {
            let bearer = format!("Bearer {token}").parse().map_err(|_| {
                Status::unauthenticated("authorization: the token is not valid header text")
            })?;
            headers.insert(http::header::AUTHORIZATION, bearer);
        }
        let caller = self.gate.admit(method, &mut headers, None)?;
        Ok(caller.map(|caller| caller.name))
    }
}

impl InProcessCalls for InProcess {
    fn acquire_key<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::AcquireKeyRequest,
    ) -> Answer<'a, pb::Lease> {
        self.serve(
            "/keylease.v1.KeyLease/AcquireKey",
            token,
            move |service, by| async move { service.acquire_key(by.as_ref(), request).await },
        )
    }

    fn renew_lease<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::RenewLeaseRequest,
    ) -> Answer<'a, pb::RenewLeaseResponse> {
        self.serve(
            "/keylease.v1.KeyLease/RenewLease",
            token,
            move |service, by| async move { service.renew_lease(by.as_ref(), request).await },
        )
    }

    fn release<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::ReleaseRequest,
    ) -> Answer<'a, pb::ReleaseResponse> {
        self.serve(
            "/keylease.v1.KeyLease/Release",
            token,
            move |service, by| async move { service.release(by.as_ref(), request).await },
        )
    }

    fn report_failure<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::ReportFailureRequest,
    ) -> Answer<'a, pb::ReportFailureResponse> {
        self.serve(
            "/keylease.v1.KeyLease/ReportFailure",
            token,
            move |service, by| async move { service.report_failure(by.as_ref(), request).await },
        )
    }

    fn get_status<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::GetStatusRequest,
    ) -> Answer<'a, pb::GetStatusResponse> {
        self.serve(
            "/keylease.v1.KeyLease/GetStatus",
            token,
            move |service, _| async move { service.get_status(request).await },
        )
    }
}
