//! Serving: the KeyLease service with gRPC health and reflection (v1 and v1alpha, for grpcurl) on
//! a listener, until a shutdown future resolves. Then health turns to not serving, waiters get
//! `UNAVAILABLE`, event streams end, and in-flight calls finish. Connections are held within
//! the configured limits ([`crate::connections`]), and HTTP/2 pings find peers that are gone.

use crate::admin::{Control, KeyAdminService};
use crate::clock::Clock;
use crate::connections::{self, Front, Incoming};
use crate::fleet::FleetView;
use crate::service::KeyLeaseService;
use crate::shell::State;
use keylease::pb;
use keylease::pb::key_admin_server::KeyAdminServer;
use keylease::pb::key_lease_server::KeyLeaseServer;
use std::future::Future;
use std::sync::Arc;
use tonic::service::Routes;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The KeyLease service on `state`.
pub type KeyLeaseRoutes = KeyLeaseServer<KeyLeaseService>;

pub fn keylease_routes(state: Arc<State>, fleet: Option<FleetView>) -> KeyLeaseRoutes {
    KeyLeaseServer::new(KeyLeaseService::new(state, fleet))
}

/// Serves KeyLease (`service`) and KeyAdmin on `listener` under `control` until `shutdown`
/// resolves and in-flight calls have finished.
pub async fn serve_single(
    listener: impl Into<Incoming>,
    control: Arc<Control>,
    service: Arc<KeyLeaseService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let state = control.state().clone();
    let front = control.front().clone();
    let timer = tokio::spawn(state.clone().run_timer());
    if let Some(checker) = control.checker() {
        tokio::spawn(checker.clone().run());
    }
    let clock = state.clock().clone();
    let shut_down = {
        let state = state.clone();
        move || state.shut_down()
    };
    // A single server serves whenever it runs.
    let (_serving, serving_now) = tokio::sync::watch::channel(true);
    let services = Routes::new(KeyLeaseServer::from_arc(service))
        .add_service(KeyAdminServer::new(KeyAdminService::new(control)));
    serve_routes(
        listener,
        services,
        front,
        serving_now,
        clock,
        shutdown,
        shut_down,
    )
    .await?;
    let _ = timer.await;
    Ok(())
}

/// Serves `services` (the local services, or a replica's router) with health and reflection,
/// each call admitted by `front`, until `shutdown` resolves; then calls `shut_down` and waits
/// for in-flight calls. Health reports the KeyLease service serving while `serving_now` says
/// so (a replica that cannot serve is not), and not serving once shutdown begins.
pub async fn serve_routes(
    listener: impl Into<Incoming>,
    services: Routes,
    front: Front,
    mut serving_now: tokio::sync::watch::Receiver<bool>,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
    shut_down: impl FnOnce() + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let stopping = tokio_util::sync::CancellationToken::new();
    let follow_serving = {
        let (health, stopping) = (health.clone(), stopping.clone());
        async move {
            loop {
                let serving = *serving_now.borrow_and_update();
                if serving {
                    health
                        .set_serving::<KeyLeaseServer<KeyLeaseService>>()
                        .await;
                } else {
                    health
                        .set_not_serving::<KeyLeaseServer<KeyLeaseService>>()
                        .await;
                }
                tokio::select! {
                    changed = serving_now.changed() => if changed.is_err() { return },
                    () = stopping.cancelled() => return,
                }
            }
        }
    };
    let follower = tokio::spawn(follow_serving);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can show the RetryInfo and ErrorInfo of a RESOURCE_EXHAUSTED reply.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let signal = async move {
        shutdown.await;
        stopping.cancel();
        let _ = follower.await;
        health
            .set_not_serving::<KeyLeaseServer<KeyLeaseService>>()
            .await;
        shut_down();
    };
    let routes = services
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    connections::serve_grpc(listener.into(), clock, routes, front, signal).await;
    Ok(())
}
