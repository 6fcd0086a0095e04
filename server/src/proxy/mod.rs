//! The Gemini-compatible HTTP endpoint: point any Gemini SDK's base URL here and every call runs
//! under a keylease lease. The caller authenticates with its keylease token wherever its SDK puts
//! the API key (`x-goog-api-key`, `?key=`, `Authorization: Bearer`); the proxy leases a key for
//! the model as that caller, over gRPC through the client crate (in memory when it runs inside
//! the server, over the network when it runs as `keylease-proxy`), sends the request upstream
//! with the leased key in a header, and releases the lease with the answer's usage. Quota and
//! key failures move the request to another key and provider trouble is retried, both unseen
//! by the caller ([`keylease_client::gemini::with_lease`]); when no key can be had within
//! `[proxy] wait` the caller gets Gemini's own 429 with `RetryInfo`.
//!
//! - [`route`]: which call a request is.
//! - [`forward`]: one call, leased, sent, streamed back.
//! - [`estimate`]: the input-token estimate, and the usage read from answers.
//! - [`reply`]: the proxy's own answers, in Gemini's error format.

pub mod estimate;
mod forward;
pub mod reply;
pub mod route;

use crate::auth::token_sha256;
use crate::config::proxy::ProxySettings;
use axum::Router;
use axum::extract::{Request, State};
use axum::response::Response;
use keylease_client::KeyLeaseClient;
use keylease_client::gemini::GeminiClient;
use reply::ProxyError;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a model listing is served from memory.
const LISTING_TTL: Duration = Duration::from_secs(600);
/// Most callers whose keylease connections are kept; past it the set starts again.
const MAX_CALLERS: usize = 4096;

/// The proxy's shared state: one per listener.
pub struct Proxy {
    settings: ProxySettings,
    /// keylease, with no token: each caller's own is put on a clone of it.
    keylease: KeyLeaseClient,
    /// Per caller token (by its SHA-256): a client sending that token.
    callers: Mutex<HashMap<[u8; 32], KeyLeaseClient>>,
    upstream: GeminiClient,
    listings: Mutex<Listings>,
    /// Task ids for calls that do not name their task.
    next_task: AtomicU64,
    instance: u64,
    clock: crate::clock::Clock,
    /// The server's metrics, when the proxy runs inside it.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The secrets its own answers are masked against (besides each caller's token).
    secrets: Secrets,
}

/// The one redaction, as it stands now: the server's configured keys and tokens when the proxy
/// runs inside it (keys added later included); only credential shapes in `keylease-proxy`.
pub type Secrets = Arc<dyn Fn() -> Arc<crate::secret::Redactor> + Send + Sync>;

/// What a proxy inside a server takes from it.
pub struct Embedding {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub secrets: Secrets,
}

impl Embedding {
    /// Inside a single server: its metrics and its redaction, which follows reloads.
    pub fn of(state: &Arc<crate::shell::State>) -> Self {
        let redacting = state.clone();
        Self {
            metrics: state.metrics().clone(),
            secrets: Arc::new(move || redacting.redactor()),
        }
    }

    /// Inside a replica: its metrics and the secrets it started with.
    pub fn replica(
        metrics: Arc<crate::metrics::Metrics>,
        settings: &crate::config::Settings,
    ) -> Self {
        let redactor = Arc::new(settings.redactor());
        Self {
            metrics,
            secrets: Arc::new(move || redactor.clone()),
        }
    }
}

/// Model listings, per API version, and the callers known to keylease since they were made.
#[derive(Default)]
struct Listings {
    /// With when it was made (steady ms).
    by_version: HashMap<&'static str, (u64, Arc<serde_json::Value>)>,
    /// Tokens (by SHA-256) that got a lease: they may read a cached listing.
    admitted: HashSet<[u8; 32]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyStartError {
    /// The upstream's HTTP client could not be built.
    #[error("proxy upstream: {0}")]
    Upstream(String),
    #[error("the proxy cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("the proxy cannot reach keylease: {0}")]
    KeyLease(String),
}

impl Proxy {
    /// A proxy that leases through `keylease` (its token, if any, is replaced by each caller's).
    pub fn new(
        settings: ProxySettings,
        keylease: KeyLeaseClient,
        embedding: Option<Embedding>,
    ) -> Result<Arc<Self>, ProxyStartError> {
        let (metrics, secrets) = match embedding {
            Some(Embedding { metrics, secrets }) => (Some(metrics), secrets),
            None => {
                let shapes_only = Arc::new(crate::secret::Redactor::default());
                let secrets: Secrets = Arc::new(move || shapes_only.clone());
                (None, secrets)
            }
        };
        let upstream = GeminiClient::new(settings.upstream.clone(), settings.timeout)
            .map_err(|e| ProxyStartError::Upstream(e.to_string()))?;
        let instance = getrandom::u64().unwrap_or_else(|_| u64::from(std::process::id()));
        Ok(Arc::new(Self {
            settings,
            keylease,
            callers: Mutex::new(HashMap::new()),
            upstream,
            listings: Mutex::new(Listings::default()),
            next_task: AtomicU64::new(1),
            instance,
            clock: crate::clock::Clock::system(),
            metrics,
            secrets,
        }))
    }

    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// The redaction of its own answers to the holder of `token`: the secrets it knows, and
    /// that token.
    fn redact(&self, text: &str, token: Option<&str>) -> String {
        let masked = (self.secrets)().redact(text).into_owned();
        match token.filter(|t| !t.is_empty()) {
            Some(token) => keylease::mask_in(&masked, token),
            None => masked,
        }
    }

    /// The keylease client that calls as the holder of `token`.
    fn client_for(&self, token: Option<&str>) -> Result<KeyLeaseClient, ProxyError> {
        let hash = token_sha256(token.unwrap_or_default());
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = callers.get(&hash) {
            return Ok(client.clone());
        }
        let client = self.keylease.with_token(token).map_err(|_| {
            ProxyError::Unauthenticated(
                "the API key given is not valid header text, so it cannot be a keylease token"
                    .into(),
            )
        })?;
        if callers.len() >= MAX_CALLERS {
            callers.clear();
        }
        callers.insert(hash, client.clone());
        Ok(client)
    }

    /// A task id for a call that names none: unique, so that calls share no exclusions.
    fn new_task_id(&self) -> String {
        format!(
            "proxy-{:x}-{}",
            self.instance,
            self.next_task.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Notes that the holder of this token got a lease: it may read cached listings.
    fn admitted(&self, token_hash: [u8; 32]) {
        let mut listings = self.lock_listings();
        if listings.admitted.len() >= MAX_CALLERS {
            listings.admitted.clear();
        }
        listings.admitted.insert(token_hash);
    }

    fn lock_listings(&self) -> std::sync::MutexGuard<'_, Listings> {
        self.listings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The proxy inside the server: binds `settings.listen` and serves until the process ends,
/// leasing through `keylease`, this server's own client (its lease calls as functions, or its
/// gRPC service through memory), as each caller. Returns the address it listens on.
pub async fn start_embedded(
    settings: ProxySettings,
    keylease: KeyLeaseClient,
    embedding: Embedding,
) -> Result<SocketAddr, ProxyStartError> {
    let listen = settings.listen;
    let listen_failed = |source| ProxyStartError::Listen {
        address: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(listen_failed)?;
    let address = listener.local_addr().map_err(listen_failed)?;
    let upstream = settings.upstream.clone();
    let proxy = Proxy::new(settings, keylease, Some(embedding))?;
    tracing::info!(%address, %upstream, "Gemini-compatible proxy at http://{address}");
    tokio::spawn(async move {
        if let Err(error) = serve(listener, proxy, std::future::pending()).await {
            tracing::error!(%error, "serving the proxy failed");
        }
    });
    Ok(address)
}

/// Serves the proxy on `listener` until `shutdown` resolves and in-flight calls have ended.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = proxy.settings.limits;
    let clock = proxy.clock.clone();
    let router = Router::new().fallback(handle).with_state(proxy);
    crate::connections::serve_http(listener, clock, router, limits, shutdown).await;
    Ok(())
}

async fn handle(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    forward::call(&proxy, request).await
}
