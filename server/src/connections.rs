//! Client connections and what each may hold of the server. Connections are served with
//! hyper's HTTP/2 directly (tonic's router as the service), so that every limit is ours to set:
//! at most `max_connections` at once (one more is accepted and closed at once, so that its
//! client fails fast instead of hanging in the listen backlog); at most `max_calls_per_connection`
//! calls on one; at most [`MAX_SEND_BUFFER`] bytes queued for a stream whose reader has stopped;
//! HTTP/2 pings to find peers that are gone; and a connection with no call in flight for
//! `idle_timeout` is closed. A call is in flight from its request until its response body ends,
//! so a `WatchEvents` stream or a waiting `AcquireKey` keeps its connection however long it lasts.

use crate::auth::{Gate, PeerCertificate};
use crate::clock::Clock;
use crate::config::proxy::HttpLimits;
use crate::config::{ConnectionLimits, Settings, StateLocation};
use crate::tls::{Tls, TlsError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tonic::codegen::http;
use tonic::service::Routes;
use tonic::transport::server::TcpConnectInfo;

/// What every call passes before a service sees it, shared by every connection and replaced
/// piece by piece by a reload.
#[derive(Clone)]
pub struct Front {
    pub gate: Arc<Gate>,
    /// TLS, when configured.
    pub tls: Option<Arc<Tls>>,
    /// What connections may hold (fixed at start).
    pub limits: ConnectionLimits,
}

impl Front {
    pub fn new(settings: &Settings) -> Result<Self, TlsError> {
        let replication_token = match &settings.state {
            StateLocation::Redis(replication) => Some(&replication.token),
            _ => None,
        };
        let tls = settings.tls.clone().map(Tls::load).transpose()?;
        Ok(Self {
            gate: Arc::new(Gate::new(&settings.access, replication_token)),
            tls: tls.map(Arc::new),
            limits: settings.limits,
        })
    }
}

/// Most bytes queued for one stream that its peer does not read: 300 stalled event streams
/// then hold 20 MB, where hyper's default (400 KB) let them hold well over 100 MB.
pub const MAX_SEND_BUFFER: usize = 64 * 1024;
/// How long a client gets to complete the TLS handshake: a slot is held meanwhile.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Where connections come from: a TCP listener, and connections made inside this process (the
/// embedded proxy's, `keylease batch`'s), which are served like any other but need no TLS and
/// hold no slot.
pub struct Incoming {
    /// `None`: only this process can connect.
    pub tcp: Option<TcpListener>,
    pub local: Option<mpsc::Receiver<DuplexStream>>,
}

impl From<TcpListener> for Incoming {
    fn from(tcp: TcpListener) -> Self {
        Self {
            tcp: Some(tcp),
            local: None,
        }
    }
}

impl Incoming {
    /// `tcp`, plus the in-process connections that `LocalConnector` makes.
    pub fn with_local(tcp: TcpListener) -> (Self, LocalConnector) {
        let (incoming, local) = Self::local_only();
        (
            Self {
                tcp: Some(tcp),
                ..incoming
            },
            local,
        )
    }

    /// Only the in-process connections that `LocalConnector` makes: a server no other process
    /// can reach.
    pub fn local_only() -> (Self, LocalConnector) {
        let (connect, accept) = mpsc::channel(16);
        let incoming = Self {
            tcp: None,
            local: Some(accept),
        };
        (incoming, LocalConnector(connect))
    }
}

/// The next TCP connection; never, without a listener.
async fn next_tcp(tcp: Option<&TcpListener>) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    match tcp {
        Some(tcp) => tcp.accept().await,
        None => std::future::pending().await,
    }
}

/// The next in-process connection; never, once none can come.
async fn next_local(local: &mut Option<mpsc::Receiver<DuplexStream>>) -> DuplexStream {
    if let Some(receiver) = local
        && let Some(stream) = receiver.recv().await
    {
        return stream;
    }
    *local = None;
    std::future::pending().await
}

/// Makes connections to this process's own gRPC service, through memory.
#[derive(Clone, Debug)]
pub struct LocalConnector(mpsc::Sender<DuplexStream>);

impl LocalConnector {
    /// A channel whose connections are made in memory: the same gate, services and limits
    /// as a TCP client gets, without a port, a certificate or a copy through the kernel.
    pub fn channel(&self) -> tonic::transport::Channel {
        let connect = self.0.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let connect = connect.clone();
            async move {
                let (ours, theirs) = tokio::io::duplex(LOCAL_BUFFER);
                connect
                    .send(theirs)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "server stopped"))?;
                Ok::<_, io::Error>(TokioIo::new(ours))
            }
        });
        tonic::transport::Endpoint::from_static("http://keylease.local")
            .connect_with_connector_lazy(connector)
    }
}

/// Bytes in flight each way on an in-process connection.
const LOCAL_BUFFER: usize = 256 * 1024;

/// A connection just accepted.
enum Accepted {
    Tcp(TcpStream),
    Local(DuplexStream),
}

/// Serves `routes` to the connections from `incoming`, within `front`'s limits, until
/// `shutdown` resolves; then accepts no more, tells every connection to finish (HTTP/2 GOAWAY)
/// and waits until they have.
pub async fn serve_grpc(
    incoming: Incoming,
    clock: Clock,
    routes: Routes,
    front: Front,
    shutdown: impl Future<Output = ()>,
) {
    let limits = front.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_calls_per_connection)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_send_buf_size(MAX_SEND_BUFFER);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let Incoming { tcp, mut local } = incoming;
    loop {
        let accepted = tokio::select! {
            accepted = next_tcp(tcp.as_ref()) => match accepted {
                Ok((stream, _)) => Accepted::Tcp(stream),
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was taken: the
                    // listener itself is fine.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            stream = next_local(&mut local) => Accepted::Local(stream),
            () = &mut shutdown => break,
        };
        let (slot, info) = match &accepted {
            Accepted::Tcp(stream) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection refused: the server holds as many as it may"
                    );
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let info = TcpConnectInfo {
                    local_addr: stream.local_addr().ok(),
                    remote_addr: stream.peer_addr().ok(),
                };
                (Some(slot), info)
            }
            Accepted::Local(_) => (
                None,
                TcpConnectInfo {
                    local_addr: None,
                    remote_addr: None,
                },
            ),
        };
        let (http2, watcher, routes, gate) = (
            http2.clone(),
            graceful.watcher(),
            routes.clone(),
            front.gate.clone(),
        );
        let (tls, clock, peer) = (front.tls.clone(), clock.clone(), info.remote_addr);
        tokio::spawn(async move {
            let serve =
                |io, certificate| {
                    let connection = Connection::new(io, slot, limits.idle_timeout, clock);
                    let service = Tracked {
                        routes,
                        gate,
                        activity: connection.activity.clone(),
                        info,
                        certificate,
                    };
                    watcher.watch(http2.serve_connection(
                        TokioIo::new(connection),
                        TowerToHyperService::new(service),
                    ))
                };
            let served = match (accepted, tls) {
                (Accepted::Local(stream), _) => serve(Stream::Local(stream), None).await,
                (Accepted::Tcp(stream), None) => serve(Stream::Plain(stream), None).await,
                (Accepted::Tcp(stream), Some(tls)) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, ?peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(?peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certificate = crate::tls::peer_certificate(stream.get_ref().1);
                    serve(Stream::Tls(Box::new(stream)), certificate).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended");
            }
        });
    }
    drop((tcp, local));
    graceful.shutdown().await;
}

/// Calls in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Steady ms at which the last call ended (or the connection opened).
    idle_since_ms: AtomicU64,
    clock: Clock,
}

impl Activity {
    /// Marks a call in flight until the guard is dropped.
    pub fn call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// When the connection will have been idle too long, unless a call comes: `None` while
    /// calls are in flight.
    fn idle_deadline_ms(&self, idle_timeout: Duration) -> Option<u64> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Some(since.saturating_add(idle_timeout.as_millis() as u64))
    }
}

/// A call in flight on a connection.
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .store(activity.clock.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection runs on: TCP, TLS over it, or memory.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Local(DuplexStream),
}

/// Each method goes to the stream underneath.
macro_rules! on_stream {
    ($stream:expr, $s:ident => $call:expr) => {
        match $stream {
            Stream::Plain($s) => $call,
            Stream::Tls($s) => $call,
            Stream::Local($s) => $call,
        }
    };
}

/// An accepted connection holding one of the server's connection slots.
struct Connection {
    stream: Stream,
    /// None for an in-process connection.
    _slot: Option<OwnedSemaphorePermit>,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    /// Wakes the reader when the connection may have been idle too long.
    idle_check: Pin<Box<Sleep>>,
}

impl Connection {
    fn new(
        stream: Stream,
        slot: Option<OwnedSemaphorePermit>,
        idle_timeout: Duration,
        clock: Clock,
    ) -> Self {
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(clock.now_ms()),
            clock,
        });
        let timeout_ms = idle_timeout.as_millis() as u64;
        let first_check = activity
            .clock
            .instant_at(activity.clock.now_ms().saturating_add(timeout_ms));
        Self {
            stream,
            _slot: slot,
            activity,
            idle_timeout,
            idle_check: Box::pin(tokio::time::sleep_until(first_check)),
        }
    }

    /// Whether the connection has been idle too long; otherwise arranges to be woken when it
    /// may have been.
    fn idle_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let clock = &self.activity.clock;
        let now = clock.now_ms();
        let next_check = match self.activity.idle_deadline_ms(self.idle_timeout) {
            Some(deadline) if deadline <= now => return true,
            Some(deadline) => clock.instant_at(deadline),
            // Calls are in flight: a check still ahead will do; else look a timeout from now.
            None if self.idle_check.deadline() > clock.instant_at(now) => {
                self.idle_check.deadline()
            }
            None => clock.instant_at(now.saturating_add(self.idle_timeout.as_millis() as u64)),
        };
        // Most reads of a busy connection find the check already set: no timer to move.
        if self.idle_check.deadline() != next_check {
            self.idle_check.as_mut().reset(next_check);
        }
        // Registers the waker; it cannot be ready, the deadline being in the future.
        let _ = self.idle_check.as_mut().poll(cx);
        false
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = on_stream!(&mut self.stream, s => Pin::new(s).poll_read(cx, buf));
        if read.is_pending() && self.idle_too_long(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no call for the idle timeout",
            )));
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(&mut self.stream, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(&mut self.stream, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(&mut self.stream, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(&mut self.stream, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_stream!(&self.stream, s => s.is_write_vectored())
    }
}

/// The router as one connection serves it: each call passes the gate, which puts its caller in
/// the request's extensions, is marked in flight until its response body has ended, and
/// carries the connection's addresses (as tonic's own server would).
#[derive(Clone)]
struct Tracked {
    routes: Routes,
    gate: Arc<Gate>,
    activity: Arc<Activity>,
    info: TcpConnectInfo,
    /// The client's certificate, when it presented one over TLS.
    certificate: Option<PeerCertificate>,
}

type Response = http::Response<tonic::body::Body>;

impl<B> tower::Service<http::Request<B>> for Tracked
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Taken out and put back: the gate reads the path while it changes the headers.
        let mut headers = std::mem::take(request.headers_mut());
        let admitted = self.gate.admit(
            request.uri().path(),
            &mut headers,
            self.certificate.as_ref(),
        );
        *request.headers_mut() = headers;
        match admitted {
            Ok(Some(caller)) => {
                request.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(refused) => return Box::pin(std::future::ready(Ok(refused.into_http()))),
        }
        request.extensions_mut().insert(self.info.clone());
        let guard = self.activity.call();
        let response = self.routes.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(GuardedBody {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its call in flight until it is done or dropped.
struct GuardedBody<B = tonic::body::Body> {
    body: B,
    _guard: CallGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `app` over HTTP/1.1 and HTTP/2 (cleartext) on `listener` within `limits` until
/// `shutdown` resolves; then accepts no more and waits for the connections to finish.
pub async fn serve_http(
    listener: TcpListener,
    clock: Clock,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_send_buf_size(MAX_SEND_BUFFER);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection to the proxy failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max_connections = limits.max_connections,
                "proxy connection refused: it holds as many as it may"
            );
            continue;
        };
        // Stream chunks go out as they come, not held back for a delayed acknowledgement.
        let _ = stream.set_nodelay(true);
        let connection = Connection::new(
            Stream::Plain(stream),
            Some(slot),
            limits.idle_timeout,
            clock.clone(),
        );
        let service = TrackedHttp {
            app: app.clone(),
            activity: connection.activity.clone(),
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let served =
                watcher
                    .watch(builder.serve_connection(
                        TokioIo::new(connection),
                        TowerToHyperService::new(service),
                    ))
                    .await;
            if let Err(error) = served {
                tracing::debug!(%error, "proxy connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// An HTTP app as one connection serves it: each request is in flight until its response body
/// has ended, for the idle timeout.
#[derive(Clone)]
struct TrackedHttp {
    app: axum::Router,
    activity: Arc<Activity>,
}

impl tower::Service<http::Request<hyper::body::Incoming>> for TrackedHttp {
    type Response = http::Response<axum::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let guard = self.activity.call();
        let response =
            tower::ServiceExt::oneshot(self.app.clone(), request.map(axum::body::Body::new));
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                axum::body::Body::new(GuardedBody {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// File descriptors kept out of the connection caps: the state store, Redis, the proxy's
/// upstream connections and its own to keylease, logs, the runtime.
pub const RESERVED_FILES: u64 = 256;

/// The connection caps as they fit the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileBudget {
    /// The soft `RLIMIT_NOFILE`, raised to the hard one when it could be.
    pub open_files: u64,
    pub grpc: usize,
    pub proxy: usize,
}

impl FileBudget {
    /// Raises the soft open-file limit to the hard one, then fits the gRPC port's and the
    /// proxy's caps (0: none) in it with [`RESERVED_FILES`] to spare; logs what it cut.
    pub fn raise_and_fit(grpc: usize, proxy: usize) -> Self {
        let open_files = rlimit::increase_nofile_limit(u64::MAX)
            .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
            .unwrap_or(1024);
        let budget = Self::fit(open_files, grpc, proxy);
        let cut: Vec<String> = [
            ("server.max_connections", grpc, budget.grpc),
            ("proxy.max_connections", proxy, budget.proxy),
        ]
        .into_iter()
        .filter(|(_, configured, fitted)| fitted < configured)
        .map(|(name, configured, fitted)| format!("{name} {configured} → {fitted}"))
        .collect();
        if !cut.is_empty() {
            tracing::warn!(
                open_files,
                reserved = RESERVED_FILES,
                "the open-file limit cannot hold the configured connections: {}; raise the limit (LimitNOFILE=) to serve more",
                cut.join(", ")
            );
        }
        budget
    }

    /// As configured when both caps fit; else the gRPC port keeps up to two thirds of what is
    /// left, so that workers are served when the proxy is full, and the proxy gets the rest.
    pub fn fit(open_files: u64, grpc: usize, proxy: usize) -> Self {
        let left = usize::try_from(open_files.saturating_sub(RESERVED_FILES))
            .unwrap_or(usize::MAX)
            .max(2);
        if grpc.saturating_add(proxy) <= left {
            return Self {
                open_files,
                grpc,
                proxy,
            };
        }
        let grpc = if proxy == 0 {
            grpc.min(left)
        } else {
            grpc.min(left * 2 / 3).max(1)
        };
        Self {
            open_files,
            grpc,
            proxy: proxy.min(left - grpc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_the_open_files_stay_as_configured() {
        let budget = FileBudget::fit(65_536, 1024, 1024);
        assert_eq!((budget.grpc, budget.proxy), (1024, 1024));
    }

    #[test]
    fn caps_over_the_open_files_are_cut_keeping_the_grpc_port_first() {
        // 1,024 files: 768 left after the reserve.
        let budget = FileBudget::fit(1024, 1024, 1024);
        assert_eq!((budget.grpc, budget.proxy), (512, 256));
        let small_proxy = FileBudget::fit(1024, 1024, 100);
        assert_eq!((small_proxy.grpc, small_proxy.proxy), (512, 100));
        let no_proxy = FileBudget::fit(1024, 1024, 0);
        assert_eq!((no_proxy.grpc, no_proxy.proxy), (768, 0));
        let tiny = FileBudget::fit(10, 1024, 1024);
        assert!(tiny.grpc >= 1 && tiny.grpc + tiny.proxy <= 2, "{tiny:?}");
    }
}
