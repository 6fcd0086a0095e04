//! Serving: the KeyLease service with gRPC health and reflection (v1 and v1alpha, for grpcurl) on
//! a listener, until a shutdown future resolves. Then health turns to not serving, waiters get
//! `UNAVAILABLE`, event streams end, and in-flight calls finish. Connections are held within
//! the configured limits ([`crate::connections`]), and HTTP/2 pings find peers that are gone.

use crate::connections;
use crate::secret::ApiKey;
use crate::service::KeyLeaseService;
use crate::state::State;
use keylease::pb;
use keylease::pb::key_lease_server::KeyLeaseServer;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::service::Routes;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves on `listener` until `shutdown` resolves and in-flight calls have finished.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<KeyLeaseServer<KeyLeaseService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can show the RetryInfo and ErrorInfo of a RESOURCE_EXHAUSTED reply.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let timer = tokio::spawn(state.clone().run_timer());
    let signal = {
        let state = state.clone();
        async move {
            shutdown.await;
            health
                .set_not_serving::<KeyLeaseServer<KeyLeaseService>>()
                .await;
            state.shut_down();
        }
    };
    let (limits, clock) = (state.limits, state.clock().clone());
    let check = BearerCheck::new(state.auth_tokens());
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(KeyLeaseServer::with_interceptor(
            KeyLeaseService::new(state),
            check,
        ))
        .prepare();
    connections::serve(listener, limits, clock, routes, signal).await;
    let _ = timer.await;
    Ok(())
}

/// Admits KeyLease calls that carry `authorization: Bearer <token>` with a configured token;
/// with none configured, every call. Health and reflection stay open for probes and grpcurl.
#[derive(Clone)]
struct BearerCheck {
    accepted: Arc<Vec<String>>,
}

impl BearerCheck {
    fn new(tokens: &[ApiKey]) -> Self {
        Self {
            accepted: Arc::new(
                tokens
                    .iter()
                    .map(|t| format!("Bearer {}", t.reveal()))
                    .collect(),
            ),
        }
    }
}

impl tonic::service::Interceptor for BearerCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.accepted.is_empty() {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match presented {
            Some(value) if self.accepted.iter().any(|t| t == value) => Ok(request),
            Some(_) => Err(tonic::Status::unauthenticated(
                "authorization: the bearer token is not accepted",
            )),
            None => Err(tonic::Status::unauthenticated(
                "authorization: a bearer token is required",
            )),
        }
    }
}
