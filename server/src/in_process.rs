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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::{self, Overrides};
    use crate::shell::State;
    use keylease_client::in_process::InProcessCalls;
    use std::time::Duration;

    const WORKER: &str = "kl_in-process-worker-token-0123456789";
    const VIEWER: &str = "kl_in-process-viewer-token-0123456789";

    /// An ephemeral single server's state and its in-process calls, callers by token.
    fn in_process() -> (Arc<State>, Arc<InProcess>) {
        let hex = |token: &str| -> String {
            crate::auth::token_sha256(token)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let text = format!(
            "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\nrequests_per_minute = 10\n\
             [[keys]]\nid = \"k1\"\nproject = \"p\"\nsecret = \"fake-key-1\"\n\
             [[server.tokens]]\nname = \"workers\"\nrole = \"worker\"\nsha256 = \"{}\"\n\
             [[server.tokens]]\nname = \"dashboards\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
            hex(WORKER),
            hex(VIEWER)
        );
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("keylease-in-process-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keylease.toml");
        std::fs::write(&path, text).unwrap();
        let overrides = Overrides {
            ephemeral: true,
            ..Overrides::default()
        };
        let settings = config::load(Some(&path), &Default::default(), &overrides).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let (state, _) = State::open(&settings, Clock::system(), false).unwrap();
        let service = Arc::new(KeyLeaseService::new(state.clone(), None));
        let gate = Arc::new(crate::auth::Gate::new(&settings.access, None));
        let calls = InProcess::new(service, gate, state.shutdown_token());
        (state, calls)
    }

    fn ask(task: &str) -> pb::AcquireKeyRequest {
        pb::AcquireKeyRequest {
            task_id: task.into(),
            model: "m".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn each_call_passes_the_gate_as_over_grpc_and_its_events_name_the_caller() {
        let (state, calls) = in_process();
        let refused = calls.acquire_key(None, ask("a")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let refused = calls.acquire_key(Some("kl_nobody"), ask("a")).await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
        let refused = calls.acquire_key(Some(VIEWER), ask("a")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(
            calls
                .get_status(Some(VIEWER), Default::default())
                .await
                .is_ok()
        );

        let mut events = state.subscribe();
        let lease = calls.acquire_key(Some(WORKER), ask("a")).await.unwrap();
        let granted = events.recv().await.unwrap();
        assert_eq!(granted.by.as_deref(), Some("workers"));
        // Bounds and validation are the service's: a second lease on the only key waits, and
        // a wait past the maximum is refused by name.
        let mut waits_too_long = ask("b");
        waits_too_long.wait = Some(prost_types::Duration {
            seconds: 10_000_000,
            nanos: 0,
        });
        let refused = calls.acquire_key(Some(WORKER), waits_too_long).await;
        let refused = refused.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("wait"), "{refused:?}");
        let release = pb::ReleaseRequest {
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            requests_sent: Some(1),
            input_tokens: None,
            call_duration: None,
        };
        assert!(calls.release(Some(WORKER), release).await.unwrap().released);
    }

    #[tokio::test]
    async fn a_stop_refuses_new_calls_and_waits_for_those_in_flight() {
        let (state, calls) = in_process();
        let held = calls.acquire_key(Some(WORKER), ask("a")).await.unwrap();
        // A second task waits in line for the only key.
        let waiting = {
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut waits = ask("b");
                waits.wait = Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                });
                calls.acquire_key(Some(WORKER), waits).await
            })
        };
        while !state.read(|engine, _| engine.has_waiters()).await.unwrap() {
            tokio::task::yield_now().await;
        }
        let stopped = {
            let calls = calls.clone();
            tokio::spawn(async move { calls.stop().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !stopped.is_finished(),
            "the stop waits for the call in line"
        );
        // The server begins to stop: its waiters are answered, and nothing new starts.
        state.shut_down();
        let answered = waiting.await.unwrap().unwrap_err();
        assert_eq!(answered.code(), tonic::Code::Unavailable, "{answered:?}");
        stopped.await.unwrap();
        let renewal = pb::RenewLeaseRequest {
            lease_id: held.lease_id,
            fencing_token: held.fencing_token,
            ..Default::default()
        };
        let refused = calls.renew_lease(Some(WORKER), renewal).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    }
}
