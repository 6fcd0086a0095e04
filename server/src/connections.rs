//! What client connections may hold of the server: at most `max_connections` at once (one more
//! is accepted and closed at once, so that its client fails fast instead of hanging in the
//! listen backlog), and a connection with no call in flight for `idle_timeout` is closed. A
//! call is in flight from its request until its response body ends, so a `WatchEvents` stream
//! or a waiting `AcquireKey` keeps its connection open however long it lasts.

use crate::clock::Clock;
use crate::config::ConnectionLimits;
use futures_util::Stream;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long to wait before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The connections accepted on `listener`, within `limits`.
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    clock: Clock,
) -> impl Stream<Item = io::Result<Connection>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures_util::stream::unfold(listener, move |listener| {
        let (slots, clock) = (slots.clone(), clock.clone());
        async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of descriptors or a connection reset before it was taken:
                        // nothing to serve, and the listener itself is fine.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection refused: the server holds as many as it may"
                    );
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let connection = Connection::new(stream, slot, limits.idle_timeout, clock.clone());
                return Some((Ok(connection), listener));
            }
        }
    })
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

/// What a request knows of its connection (a request extension).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub activity: Arc<Activity>,
}

/// An accepted connection holding one of the server's connection slots.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    /// Wakes the reader when the connection may have been idle too long.
    idle_check: Pin<Box<Sleep>>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        idle_timeout: Duration,
        clock: Clock,
    ) -> Self {
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(clock.now_ms()),
            clock,
        });
        let first_check = activity.clock.instant_at(activity.clock.now_ms()) + idle_timeout;
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
            Some(deadline) => deadline,
            // Calls are in flight: look again a timeout from now.
            None => now.saturating_add(self.idle_timeout.as_millis() as u64),
        };
        self.idle_check.as_mut().reset(clock.instant_at(next_check));
        // Registers the waker; it cannot be ready, the deadline being in the future.
        let _ = self.idle_check.as_mut().poll(cx);
        false
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
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
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks every call in flight on its connection until its response body has ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCalls;

impl<S> tower::Layer<S> for TrackCalls {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked(inner)
    }
}

#[derive(Debug, Clone)]
pub struct Tracked<S>(S);

type Response = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>, Response = Response> + Send,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| info.activity.call());
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call in flight until it is done or dropped.
struct GuardedBody {
    body: tonic::body::Body,
    _guard: CallGuard,
}

impl http_body::Body for GuardedBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

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
