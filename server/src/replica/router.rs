//! Where a KeyLease call goes on a replica: served here while this replica leads, forwarded to
//! the leader over gRPC while it follows (every call, waiting acquires and event streams
//! included, so clients may talk to any replica), refused with `UNAVAILABLE` saying why
//! otherwise (electing, catching up, Redis unreachable, Redis lost the log). A forwarded call
//! carries the replicas' shared token as its bearer token and the caller this replica admitted
//! (see [`crate::auth`]), never the client's own credential; a replica never forwards a
//! forwarded call again.

use crate::admin::{ConfigSource, Control, KeyAdminService};
use crate::auth::{CALLER_HEADER, Caller};
use crate::config::Settings;
use crate::fleet::FleetView;
use crate::key_checks::CheckSetup;
use crate::metrics::{Metrics, StatusSource};
use crate::server::keylease_routes;
use crate::shell::State;
use crate::tls::Tls;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keylease::pb::key_admin_server::KeyAdminServer;
use keylease::pb::key_lease_server::KeyLeaseServer;
use rustls_pki_types::ServerName;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::service::Routes;
use tower::ServiceExt;

/// Connections from a follower to the leader: each carries at most the leader's
/// `server.max_calls_per_connection` calls at once, and calls spread over them.
const CONNECTIONS_TO_LEADER: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What this replica does with a call now.
#[derive(Clone)]
pub enum Serving {
    /// Starting, electing, catching up, or refusing: the reason is the caller's answer.
    Unavailable(Arc<str>),
    /// KeyLease and KeyAdmin on the state this replica leads.
    Leading(Routes, Arc<State>),
    Following(Arc<Leader>),
}

/// The leader calls are forwarded to, over HTTP/2 connections made when the first call needs
/// them and again after one closes. hyper's connections directly, not tonic's channels: a
/// channel hands each call to a task of its own, a wake-up more per forwarded call.
pub struct Leader {
    pub id: String,
    pub address: String,
    /// `http://ADDRESS` (`https://` over TLS), the origin of forwarded calls.
    origin: String,
    /// TLS to the leader, with the name its certificate must have, when this server has TLS.
    tls: Option<(Arc<Tls>, ServerName<'static>)>,
    connections: Vec<tokio::sync::Mutex<Option<SendRequest<Body>>>>,
    next: AtomicUsize,
}

impl Leader {
    fn new(id: String, address: String, tls: Option<Arc<Tls>>) -> Result<Self, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let origin = format!("{scheme}://{address}");
        http::Uri::try_from(origin.as_str())
            .map_err(|e| format!("the leader's address {address:?}: {e}"))?;
        let tls = match tls {
            Some(tls) => Some((tls, crate::tls::server_name(&address)?)),
            None => None,
        };
        Ok(Self {
            id,
            address,
            origin,
            tls,
            connections: (0..CONNECTIONS_TO_LEADER)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Sends `request` to the leader on one of the connections.
    async fn forward(&self, mut request: http::Request<Body>) -> Result<Response, String> {
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *request.uri_mut() = format!("{}{path}", self.origin)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let mut sender = self.sender().await?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.map(Body::new))
    }

    /// A connection that is open, made anew if the last one closed.
    async fn sender(&self) -> Result<SendRequest<Body>, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let mut slot = self.connections[n].lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.address),
        )
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let sender = match &self.tls {
            None => handshake(stream).await?,
            Some((tls, name)) => {
                let connecting = tls.connector().connect(name.clone(), stream);
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                    .await
                    .map_err(|_| format!("no TLS handshake within {CONNECT_TIMEOUT:?}"))?
                    .map_err(|e| format!("TLS: {e}"))?;
                handshake(stream).await?
            }
        };
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

/// An HTTP/2 connection on `stream`, driven by a task of its own.
async fn handshake<S>(stream: S) -> Result<SendRequest<Body>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection to the leader ended");
        }
    });
    Ok(sender)
}

impl Serving {
    /// Serving KeyLease and KeyAdmin from `state`, which this replica leads with `settings`.
    /// Serving `state` as the leader; its checker of keys, if any, runs on `runtime` until
    /// the state shuts down.
    pub fn leading(
        state: Arc<State>,
        fleet: FleetView,
        settings: Settings,
        checks: Option<CheckSetup>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, crate::tls::TlsError> {
        let control = Control::new(ConfigSource::default(), settings, state.clone(), checks)?;
        if let Some(checker) = control.checker() {
            runtime.spawn(checker.clone().run());
        }
        let routes = Routes::new(keylease_routes(state.clone(), Some(fleet)))
            .add_service(KeyAdminServer::new(KeyAdminService::new(control)));
        Ok(Self::Leading(routes, state))
    }

    pub fn unavailable(reason: impl Into<Arc<str>>) -> Self {
        Self::Unavailable(reason.into())
    }
}

/// The KeyLease service of a replica: one per process, pointed at whatever it does now.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

struct Shared {
    serving: RwLock<Serving>,
    /// Whether calls are served (led or forwarded), for health checks.
    serving_now: tokio::sync::watch::Sender<bool>,
    /// `authorization: Bearer TOKEN` of the replicas' shared token, as a forwarded call carries it.
    authorization: http::HeaderValue,
    /// TLS to the leader, when this server has TLS.
    tls: Option<Arc<Tls>>,
    /// What this process counts, whichever state leads.
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(token: &keylease_core::ApiKey, tls: Option<Arc<Tls>>) -> Result<Self, String> {
        let mut authorization = http::HeaderValue::from_str(&format!("Bearer {}", token.reveal()))
            .map_err(|_| "replication.token: must be printable ASCII".to_string())?;
        authorization.set_sensitive(true);
        Ok(Self {
            shared: Arc::new(Shared {
                serving: RwLock::new(Serving::unavailable("this replica is starting")),
                serving_now: tokio::sync::watch::Sender::new(false),
                authorization,
                tls,
                metrics: Arc::new(Metrics::new()),
            }),
        })
    }

    pub fn set(&self, serving: Serving) {
        let now = !matches!(serving, Serving::Unavailable(_));
        self.shared.serving_now.send_if_modified(|was| {
            let changed = *was != now;
            *was = now;
            changed
        });
        *self
            .shared
            .serving
            .write()
            .unwrap_or_else(PoisonError::into_inner) = serving;
    }

    pub fn serving(&self) -> Serving {
        self.shared
            .serving
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether this replica serves calls now (leads, or follows a leader), as it changes.
    pub fn serving_now(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.serving_now.subscribe()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The state this replica serves from while it leads, and its role now.
    pub fn scraped(&self) -> (Option<Arc<dyn StatusSource>>, Option<&'static str>) {
        match self.serving() {
            Serving::Leading(_, state) => (Some(state as Arc<dyn StatusSource>), Some("leader")),
            Serving::Following(_) => (None, Some("follower")),
            Serving::Unavailable(_) => (None, Some("unavailable")),
        }
    }

    /// The leader at `address`, to forward calls to (over TLS when this server has it).
    pub fn leader(&self, id: String, address: String) -> Result<Leader, String> {
        Leader::new(id, address, self.shared.tls.clone())
    }

    /// Shutdown has begun: the calls waiting on the state this replica leads get `UNAVAILABLE`
    /// and its event streams end (forwarded ones end when their leader's do).
    pub fn end_waits(&self) {
        if let Serving::Leading(_, state) = self.serving() {
            state.shut_down();
        }
    }

    /// The leader calls are forwarded to now, if this replica follows one.
    pub fn following(&self) -> Option<Arc<Leader>> {
        match self.serving() {
            Serving::Following(leader) => Some(leader),
            _ => None,
        }
    }
}

impl NamedService for Router {
    const NAME: &'static str = <KeyLeaseServer<crate::service::KeyLeaseService>>::NAME;
}

/// The router again, for the admin service's calls: led, forwarded or refused alike.
#[derive(Clone)]
pub struct AdminRouter(pub Router);

impl NamedService for AdminRouter {
    const NAME: &'static str = <KeyAdminServer<KeyAdminService>>::NAME;
}

impl tower::Service<http::Request<Body>> for AdminRouter {
    type Response = Response;
    type Error = Infallible;
    type Future = <Router as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<Body>>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.0.call(request)
    }
}

type Response = http::Response<Body>;

impl tower::Service<http::Request<Body>> for Router {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The gate admitted the call before it came here.
        let Some(caller) = request.extensions().get::<Caller>().cloned() else {
            return refuse(Status::internal(
                "a call reached the router without a caller",
            ));
        };
        let forwarded = caller.forwarded;
        match self.serving() {
            Serving::Leading(routes, _) => Box::pin(async move {
                let response = routes.oneshot(request).await?;
                Ok(response.map(Body::new))
            }),
            Serving::Following(leader) if forwarded => refuse(Status::unavailable(format!(
                "a replica forwarded this call here, but this replica follows {}: retry",
                leader.id
            ))),
            Serving::Following(leader) => {
                let headers = request.headers_mut();
                headers.insert(
                    http::header::AUTHORIZATION,
                    self.shared.authorization.clone(),
                );
                headers.insert(CALLER_HEADER, caller.header_value());
                Box::pin(async move {
                    match leader.forward(request).await {
                        Ok(response) => Ok(response),
                        Err(error) => Ok(Status::unavailable(format!(
                            "the leader {} at {} cannot be reached ({error}): retry",
                            leader.id, leader.address
                        ))
                        .into_http()),
                    }
                })
            }
            Serving::Unavailable(reason) => refuse(Status::unavailable(reason.to_string())),
        }
    }
}

fn refuse(status: Status) -> <Router as tower::Service<http::Request<Body>>>::Future {
    Box::pin(std::future::ready(Ok(status.into_http())))
}
