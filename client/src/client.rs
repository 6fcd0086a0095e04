//! The connection to keylease: one or several endpoints (balanced, reconnecting), or keylease in
//! the same process ([`crate::in_process`]); an optional bearer token, per-call timeouts, and a
//! bounded retry when the service cannot be reached, after which calls fail with
//! [`Error::Unreachable`] rather than hang.

use crate::in_process::InProcessCalls;
use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient as Stub;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// How to reach keylease.
#[derive(Clone)]
pub struct ClientConfig {
    /// `http://host:port`, one or more; calls are balanced over those that answer.
    pub endpoints: Vec<String>,
    /// Sent as `authorization: Bearer TOKEN` on every call.
    pub auth_token: Option<String>,
    /// TLS settings for `https://` endpoints (the system's roots are not used: give the CA).
    pub tls: Option<TlsConfig>,
    pub connect_timeout: Duration,
    /// Longest any call may take, on top of the time it asked to wait for a key.
    pub call_timeout: Duration,
    /// Tries of a call while the service is unreachable, before [`Error::Unreachable`]. The
    /// default, five, waits 0.2 + 0.4 + 0.8 + 1.6 s between them: through the failover of
    /// keylease replicas on Redis (about two seconds), when `endpoints` lists them all.
    pub attempts: u32,
    /// Pause after the first failed try; doubles with each further one.
    pub retry_backoff: Duration,
}

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            auth_token: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            attempts: 5,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "…"))
            .field("tls", &self.tls)
            .field("call_timeout", &self.call_timeout)
            .field("attempts", &self.attempts)
            .finish()
    }
}

/// How to reach keylease over TLS: PEM text, as read from files.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// The CA that signed keylease's certificate.
    pub ca_certificate: Option<Vec<u8>>,
    /// A client certificate and its private key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name keylease's certificate must have, when it is not the endpoint's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificate", &self.ca_certificate.is_some())
            .field("identity", &self.identity.as_ref().map(|_| "…"))
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsConfig {
    fn to_tonic(&self) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_certificate {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((certificate, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(certificate, key));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        tls
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("keylease unreachable after {attempts} attempts: {last}")]
    Unreachable { attempts: u32, last: String },
    /// No key could be lent in time: why, and when one may be.
    #[error("no key available ({reason}){}", retry_after.map(|d| format!("; retry after {d:?}")).unwrap_or_default())]
    NoKey {
        reason: String,
        retry_after: Option<Duration>,
        /// Why, as a code: `AllDisabled` lasts until someone acts; the others pass.
        why: pb::UnavailableReason,
    },
    /// The lease ended (expired, or its key was disabled): the key must not be used any more.
    #[error("lease {0} has ended")]
    LeaseEnded(String),
    /// Every request the lease covers was sent: renew for more, or release.
    #[error("lease {0} has no requests left")]
    BudgetSpent(String),
    /// keylease refused the call (bad argument, unknown lease).
    #[error("keylease refused: {} ({:?})", .0.message(), .0.code())]
    Refused(Status),
}

impl Error {
    pub(crate) fn from_status(status: Status) -> Self {
        if status.code() != Code::ResourceExhausted {
            return Self::Refused(status);
        }
        // keylease puts the delay in the metadata too, which spares a dependency on tonic-types.
        let retry_after = status
            .metadata()
            .get(keylease::RETRY_AFTER_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let why = status
            .metadata()
            .get(keylease::UNAVAILABLE_REASON_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(pb::UnavailableReason::from_str_name)
            .unwrap_or_default();
        Self::NoKey {
            reason: status.message().to_string(),
            retry_after,
            why,
        }
    }
}

type Authenticated = InterceptedService<Channel, Authorization>;

#[derive(Clone)]
pub struct Authorization(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A handle on keylease; cheap to clone, shared by all of a process's jobs.
#[derive(Clone)]
pub struct KeyLeaseClient {
    transport: Transport,
    config: Arc<ClientConfig>,
    /// Makes client request ids unique within this process.
    next_request: Arc<AtomicU64>,
    /// Makes them unique across processes.
    instance: u64,
}

impl KeyLeaseClient {
    /// Prepares the connection; it is made on first use and remade after failures.
    pub fn connect(config: ClientConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no endpoint given".into(),
            });
        }
        let mut endpoints = Vec::new();
        for endpoint in &config.endpoints {
            let parsed = Endpoint::from_shared(endpoint.clone())
                .map_err(|e| Error::InvalidEndpoint {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true);
            let parsed = match (&config.tls, endpoint.starts_with("https://")) {
                (Some(tls), true) => {
                    parsed
                        .tls_config(tls.to_tonic())
                        .map_err(|e| Error::InvalidEndpoint {
                            endpoint: endpoint.clone(),
                            reason: format!("TLS: {e}"),
                        })?
                }
                (None, true) => {
                    return Err(Error::InvalidEndpoint {
                        endpoint: endpoint.clone(),
                        reason: "https needs ClientConfig::tls (at least the CA that signed keylease's certificate)".into(),
                    });
                }
                (_, false) => parsed,
            };
            endpoints.push(parsed);
        }
        Self::over_channel(Channel::balance_list(endpoints.into_iter()), config)
    }

    /// A client on a channel made elsewhere (an in-process connection, say); `config`'s
    /// endpoints and TLS settings are not used.
    pub fn over_channel(channel: Channel, config: ClientConfig) -> Result<Self, Error> {
        let token = bearer(config.auth_token.as_deref(), &config)?;
        let transport = Transport::Grpc(Arc::new(Grpc {
            stub: Stub::with_interceptor(channel.clone(), Authorization(token)),
            channel,
        }));
        Ok(Self::on(transport, config))
    }

    /// A client of keylease in this process, calling its service as functions: the same
    /// leases, answers and retries as over gRPC, without a connection. `config`'s endpoints
    /// and TLS settings are not used.
    pub fn in_process(calls: Arc<dyn InProcessCalls>, config: ClientConfig) -> Self {
        let token = config.auth_token.as_deref().map(Arc::from);
        Self::on(Transport::InProcess(calls, token), config)
    }

    fn on(transport: Transport, config: ClientConfig) -> Self {
        Self {
            transport,
            config: Arc::new(config),
            next_request: Arc::new(AtomicU64::new(1)),
            instance: std::process::id() as u64
                ^ (crate::clock::now().elapsed().as_nanos() as u64).rotate_left(32),
        }
    }

    /// The same connections, calling as the holder of `token` (`None`: no token): how a proxy
    /// calls on behalf of each of its callers.
    pub fn with_token(&self, token: Option<&str>) -> Result<Self, Error> {
        let mut config = (*self.config).clone();
        config.auth_token = token.map(str::to_string);
        // Checked for both transports: a token that is no header text is no token.
        let bearer = bearer(token, &config)?;
        let transport = match &self.transport {
            Transport::Grpc(grpc) => Transport::Grpc(Arc::new(Grpc {
                stub: Stub::with_interceptor(grpc.channel.clone(), Authorization(bearer)),
                channel: grpc.channel.clone(),
            })),
            Transport::InProcess(calls, _) => {
                Transport::InProcess(calls.clone(), token.map(Arc::from))
            }
        };
        Ok(Self {
            transport,
            config: Arc::new(config),
            next_request: self.next_request.clone(),
            instance: self.instance,
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub(crate) fn next_request_id(&self) -> String {
        format!(
            "{:x}-{}",
            self.instance,
            self.next_request.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs a call, retrying while the service is unreachable. `extra` is how long the call may
    /// legitimately take on the server (a wait for a key); the timeout is that plus the call timeout.
    /// The answer comes with the send time of the attempt that got it: lease deadlines count
    /// from there.
    async fn call<M, T, F, Fut>(
        &self,
        extra: Duration,
        message: &M,
        mut send: F,
    ) -> Result<(T, Instant), Error>
    where
        M: Clone,
        F: FnMut(Via, Request<M>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let timeout = extra + self.config.call_timeout;
        let mut backoff = self.config.retry_backoff;
        let mut last = String::new();
        for attempt in 1..=self.config.attempts.max(1) {
            let mut request = Request::new(message.clone());
            request.set_timeout(timeout);
            let via = match &self.transport {
                Transport::Grpc(grpc) => Via::Grpc(grpc.stub.clone()),
                Transport::InProcess(calls, token) => Via::InProcess(calls.clone(), token.clone()),
            };
            let sent_at = crate::clock::now();
            match tokio::time::timeout(timeout, send(via, request)).await {
                Ok(Ok(answer)) => return Ok((answer, sent_at)),
                Ok(Err(status)) if !unreachable(&status) => return Err(Error::from_status(status)),
                Ok(Err(status)) => last = format!("{:?}: {}", status.code(), status.message()),
                Err(_) => last = format!("no answer within {timeout:?}"),
            }
            if attempt < self.config.attempts {
                tracing::debug!(attempt, %last, "keylease call failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        Err(Error::Unreachable {
            attempts: self.config.attempts.max(1),
            last,
        })
    }

    /// Keys, leases and usage, as operators see them.
    pub async fn status(&self) -> Result<pb::GetStatusResponse, Error> {
        self.status_of(pb::GetStatusRequest::default()).await
    }

    /// [`Self::status`] of one pool, page or model (see `GetStatusRequest`).
    pub async fn status_of(
        &self,
        request: pb::GetStatusRequest,
    ) -> Result<pb::GetStatusResponse, Error> {
        let (status, _) = self
            .call(Duration::ZERO, &request, |via, request| async move {
                match via {
                    Via::Grpc(mut stub) => answer(stub.get_status(request).await),
                    Via::InProcess(calls, token) => {
                        calls
                            .get_status(token.as_deref(), request.into_inner())
                            .await
                    }
                }
            })
            .await?;
        Ok(status)
    }

    // The lease calls, each to either transport: the same few lines per call of the service,
    // which differ in the call they make.

    /// `AcquireKey`, waiting up to `wait` for a key; with the send time of the attempt answered.
    pub(crate) async fn acquire_key(
        &self,
        wait: Duration,
        request: &pb::AcquireKeyRequest,
    ) -> Result<(pb::Lease, Instant), Error> {
        self.call(wait, request, |via, request| async move {
            match via {
                Via::Grpc(mut stub) => answer(stub.acquire_key(request).await),
                Via::InProcess(calls, token) => {
                    calls
                        .acquire_key(token.as_deref(), request.into_inner())
                        .await
                }
            }
        })
        .await
    }

    pub(crate) async fn renew_lease(
        &self,
        request: &pb::RenewLeaseRequest,
    ) -> Result<(pb::RenewLeaseResponse, Instant), Error> {
        self.call(Duration::ZERO, request, |via, request| async move {
            match via {
                Via::Grpc(mut stub) => answer(stub.renew_lease(request).await),
                Via::InProcess(calls, token) => {
                    calls
                        .renew_lease(token.as_deref(), request.into_inner())
                        .await
                }
            }
        })
        .await
    }

    pub(crate) async fn release(&self, request: &pb::ReleaseRequest) -> Result<(), Error> {
        let released = self.call(Duration::ZERO, request, |via, request| async move {
            match via {
                Via::Grpc(mut stub) => answer(stub.release(request).await),
                Via::InProcess(calls, token) => {
                    calls.release(token.as_deref(), request.into_inner()).await
                }
            }
        });
        released.await.map(drop)
    }

    /// `ReportFailure`, waiting up to `replacement_wait` for a replacement.
    pub(crate) async fn report_failure(
        &self,
        replacement_wait: Duration,
        request: &pb::ReportFailureRequest,
    ) -> Result<(pb::ReportFailureResponse, Instant), Error> {
        self.call(replacement_wait, request, |via, request| async move {
            match via {
                Via::Grpc(mut stub) => answer(stub.report_failure(request).await),
                Via::InProcess(calls, token) => {
                    calls
                        .report_failure(token.as_deref(), request.into_inner())
                        .await
                }
            }
        })
        .await
    }
}

/// How a client reaches keylease.
#[derive(Clone)]
enum Transport {
    /// Shared: a client is cloned for every lease, and the stub is several hundred bytes.
    Grpc(Arc<Grpc>),
    /// With the caller's token, shared by every call (as the gRPC stub's interceptor holds it).
    InProcess(Arc<dyn InProcessCalls>, Option<Arc<str>>),
}

struct Grpc {
    stub: Stub<Authenticated>,
    /// Kept to make clients with other tokens on the same connections.
    channel: Channel,
}

/// What one attempt of a call goes through: a stub, or the calls in this process with the
/// caller's token.
enum Via {
    Grpc(Stub<Authenticated>),
    InProcess(Arc<dyn InProcessCalls>, Option<Arc<str>>),
}

/// A gRPC answer without its metadata, as the in-process calls give it.
fn answer<T>(response: Result<tonic::Response<T>, Status>) -> Result<T, Status> {
    response.map(tonic::Response::into_inner)
}

/// The `authorization` value for `token`.
fn bearer(
    token: Option<&str>,
    config: &ClientConfig,
) -> Result<Option<MetadataValue<Ascii>>, Error> {
    token
        .map(|token| {
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Error::InvalidEndpoint {
                    endpoint: config.endpoints.first().cloned().unwrap_or_default(),
                    reason: "the auth token is not valid header text".into(),
                })
        })
        .transpose()
}

/// Failures that say the service could not be reached or answer, as opposed to a refusal.
fn unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// A wire duration from a std one.
pub(crate) fn to_pb(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A std duration from a wire one (negative counts as zero).
pub(crate) fn from_pb(duration: Option<prost_types::Duration>) -> Duration {
    duration.map_or(Duration::ZERO, |d| {
        Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
    })
}
