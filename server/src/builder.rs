//! The one way a server is put together, used by `keylease-server`, `keylease batch`, the tests
//! and the bench: the engine's state on its store (or a replica on Redis), the gRPC services,
//! Prometheus, the embedded Gemini-compatible proxy and reloads; then serving until a stop,
//! with the shutdown grace, ending with the last snapshot. What differs between its users is
//! only what they hand it: listeners, a clock, whether to reset the state, whether SIGHUP
//! reloads.

use crate::admin::{ConfigSource, Control};
use crate::clock::Clock;
use crate::config::{ConfigError, Settings, StateLocation};
use crate::connections::{Front, Incoming, LocalConnector};
use crate::in_process::InProcess;
use crate::key_checks::CheckSetup;
use crate::key_sources;
use crate::metrics::StatusSource;
use crate::service::KeyLeaseService;
use crate::shell::{OpenError, Recovered, State};
use crate::store::journal::StoreFailed;
use crate::tls::TlsError;
use keylease_client::{ClientConfig, KeyLeaseClient};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Why a server could not be assembled, or stopped other than when asked.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Proxy(#[from] crate::proxy::ProxyStartError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The store stopped writing: nothing more could be acknowledged.
    #[error("{0}")]
    Store(#[from] StoreFailed),
    #[error("serving failed: {0}")]
    Serve(#[from] crate::server::ServeError),
    #[error("{0}")]
    Replica(#[from] crate::replica::StartError),
    #[error("[health]: keys cannot be checked: {0}")]
    Checks(String),
    #[error(
        "{0}: the keys file cannot be watched for changes: {1} (set key_sources.watch = false to read it only on reloads)"
    )]
    Watch(String, notify::Error),
}

impl From<crate::replica::ServeError> for LaunchError {
    fn from(error: crate::replica::ServeError) -> Self {
        match error {
            crate::replica::ServeError::Start(start) => Self::Replica(start),
            crate::replica::ServeError::Serve(serve) => Self::Serve(serve),
            crate::replica::ServeError::Proxy(proxy) => Self::Proxy(proxy),
        }
    }
}

/// Where the gRPC services are reached.
pub enum GrpcListener {
    /// `server.listen`, and `metrics.listen` when set, bound by the builder once the state is
    /// open (the binary): clients find the port closed until the server can answer.
    Configured,
    /// A TCP port (the embedded proxy leases through memory all the same).
    Tcp(TcpListener),
    /// Memory only, through [`Assembled::connector`]: nothing listens (the batch).
    InProcess,
}

/// How the server's own clients (the embedded proxy, [`Assembled::client`]) reach its lease
/// calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OwnLeases {
    /// Called as functions ([`crate::in_process`]), on a single server; a replica's go over
    /// gRPC all the same, as its router forwards them to the leader.
    #[default]
    InProcess,
    /// Through the gRPC service on a connection in memory, as a remote client's: the path
    /// tests and benchmarks compare the in-process one with.
    OverGrpc,
}

/// What a server is built from; [`ServerBuilder::build`] assembles it.
pub struct ServerBuilder {
    source: ConfigSource,
    settings: Settings,
    clock: Clock,
    reset_state: bool,
    metrics: Option<TcpListener>,
    reload_on_hangup: bool,
    own_leases: OwnLeases,
}

impl ServerBuilder {
    /// A server with `settings`, read from `source` (which reloads read again).
    pub fn new(source: ConfigSource, settings: Settings) -> Self {
        Self {
            source,
            settings,
            clock: Clock::system(),
            reset_state: false,
            metrics: None,
            reload_on_hangup: false,
            own_leases: OwnLeases::default(),
        }
    }

    /// The clock the state runs on (the system's unless a test controls it).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Move the state aside and start empty (`--reset-state`); for a replica, accept what
    /// Redis holds after it lost the log.
    pub fn reset_state(mut self, reset: bool) -> Self {
        self.reset_state = reset;
        self
    }

    /// Serve Prometheus metrics on `listener`.
    pub fn metrics(mut self, listener: Option<TcpListener>) -> Self {
        self.metrics = listener;
        self
    }

    /// Read the configuration again at each SIGHUP (the binary).
    pub fn reload_on_hangup(mut self) -> Self {
        self.reload_on_hangup = true;
        self
    }

    /// How the embedded proxy and [`Assembled::client`] lease (in process unless told).
    pub fn own_leases(mut self, own_leases: OwnLeases) -> Self {
        self.own_leases = own_leases;
        self
    }

    /// Opens the state and starts Prometheus, the embedded proxy and reloads: everything but
    /// the gRPC services, which [`Assembled::serve`] serves. A replica opens its state when it
    /// serves, as it leads or follows.
    pub async fn build(self, grpc: GrpcListener) -> Result<Assembled, LaunchError> {
        match &self.settings.state {
            StateLocation::Redis(replication) => {
                let replication = (**replication).clone();
                self.build_replica(replication, grpc).await
            }
            _ => self.build_single(grpc).await,
        }
    }

    async fn build_single(self, grpc: GrpcListener) -> Result<Assembled, LaunchError> {
        let Self {
            source,
            settings,
            clock,
            reset_state,
            metrics,
            reload_on_hangup,
            own_leases,
        } = self;
        let (state, recovered) = State::open(&settings, clock, reset_state)?;
        log_recovery(&settings, &recovered);
        let checks = CheckSetup::of(settings.health.as_ref()).map_err(LaunchError::Checks)?;
        let control = Control::new(source, settings.clone(), state.clone(), checks)?;
        let service = Arc::new(KeyLeaseService::new(state.clone(), None));
        let in_process = InProcess::new(
            service.clone(),
            control.front().gate.clone(),
            state.shutdown_token(),
        );
        let metrics = match grpc {
            GrpcListener::Configured => bind_metrics(&settings).await?,
            _ => metrics,
        };
        if let Some(listener) = metrics {
            let scraped = state.clone();
            let source: crate::metrics::Source =
                Arc::new(move || (Some(scraped.clone() as Arc<dyn StatusSource>), None));
            let metrics = state.metrics().clone();
            // Scraped until the process ends, through the shutdown grace too.
            tokio::spawn(async move {
                let served =
                    crate::metrics::serve(listener, metrics, source, std::future::pending()).await;
                if let Err(error) = served {
                    tracing::error!(%error, "serving metrics failed");
                }
            });
        }
        // A reload no call asked for: SIGHUP, a refresh, the keys file changing. Its outcome
        // is logged (a refresh that changed nothing, only at debug) and a failure counted.
        let reload_by = {
            let control = control.clone();
            move |why: &'static str, trigger: &'static str| {
                let control = control.clone();
                async move {
                    let by: Arc<str> = Arc::from(why);
                    match control.reload(Some(&by)).await {
                        Ok(report)
                            if trigger != "sighup"
                                && report.changes.is_empty()
                                && report.needs_restart.is_empty() =>
                        {
                            tracing::debug!("{why}: configuration reloaded, nothing changed")
                        }
                        Ok(report) => tracing::info!(
                            changes = report.changes.len(),
                            needs_restart = ?report.needs_restart,
                            "{why}: configuration reloaded"
                        ),
                        Err(error) => {
                            control.state().metrics().reload_failed(trigger);
                            // A key source's errors may quote a key it printed.
                            let error = control.state().redact(error.to_string());
                            tracing::error!(
                                %error,
                                "{why}: the configuration was not reloaded; what is in force stays"
                            )
                        }
                    }
                }
            }
        };
        if reload_on_hangup {
            let reload_by = reload_by.clone();
            on_hangup(move || reload_by("SIGHUP", "sighup"))?;
        }
        if let Some(every) = settings.key_refresh {
            let reload_by = reload_by.clone();
            key_sources::every(every, state.shutdown_token(), move || {
                reload_by("key_sources.refresh", "refresh")
            });
        }
        if let Some(path) = settings
            .keys_file
            .as_ref()
            .filter(|_| settings.watch_keys_file)
        {
            key_sources::watch(path, state.shutdown_token(), move || {
                reload_by("the keys file changed", "keys_file")
            })
            .map_err(|e| LaunchError::Watch(path.display().to_string(), e))?;
        }
        let (incoming, connector) = listen(grpc, &settings).await?;
        let own_calls = (own_leases == OwnLeases::InProcess).then(|| in_process.clone());
        let mut assembled = Assembled {
            connector,
            proxy_address: None,
            own_calls,
            running: Running::Single(Box::new(Single {
                state: state.clone(),
                control,
                recovered,
                incoming,
                service,
                in_process,
                grace: settings.shutdown_grace,
            })),
        };
        if let Some(proxy) = settings.proxy.clone() {
            let keylease = assembled
                .client(ClientConfig::new("http://keylease.local"))
                .map_err(|e| crate::proxy::ProxyStartError::KeyLease(e.to_string()))?;
            let embedding = crate::proxy::Embedding::of(&state);
            assembled.proxy_address =
                Some(crate::proxy::start_embedded(proxy, keylease, embedding).await?);
        }
        Ok(assembled)
    }

    /// A replica: its listeners and reloads now; its state as it leads or follows, when it
    /// serves.
    async fn build_replica(
        self,
        replication: crate::config::Replication,
        grpc: GrpcListener,
    ) -> Result<Assembled, LaunchError> {
        let Self {
            source,
            settings,
            reset_state,
            metrics,
            reload_on_hangup,
            ..
        } = self;
        let binds = matches!(grpc, GrpcListener::Configured);
        let (incoming, connector) = listen(grpc, &settings).await?;
        let metrics = if binds {
            bind_metrics(&settings).await?
        } else {
            metrics
        };
        let front = Front::new(&settings)?;
        let (reloads, reload_requests) = tokio::sync::mpsc::unbounded_channel();
        // Read here; the replica takes up callers and TLS, its supervisor keys and limits.
        let read_again = move |why: &'static str| {
            let source = source.clone();
            let reloads = reloads.clone();
            async move {
                match load_off_the_runtime(source).await {
                    Ok(loaded) => {
                        tracing::info!("{why}: configuration read again; the replica takes it up");
                        let _ = reloads.send(loaded);
                    }
                    Err(error) => {
                        tracing::error!(%error, "{why}: the configuration was not reloaded; what is in force stays")
                    }
                }
            }
        };
        if reload_on_hangup {
            let read_again = read_again.clone();
            on_hangup(move || read_again("SIGHUP"))?;
        }
        if let Some(every) = settings.key_refresh {
            let read_again = read_again.clone();
            key_sources::every(every, CancellationToken::new(), move || {
                read_again("key_sources.refresh")
            });
        }
        if let Some(path) = settings
            .keys_file
            .as_ref()
            .filter(|_| settings.watch_keys_file)
        {
            key_sources::watch(path, CancellationToken::new(), move || {
                read_again("the keys file changed")
            })
            .map_err(|e| LaunchError::Watch(path.display().to_string(), e))?;
        }
        let listeners = crate::replica::Listeners {
            grpc: incoming,
            metrics,
            proxy: settings
                .proxy
                .clone()
                .map(|proxy| (proxy, connector.clone())),
        };
        Ok(Assembled {
            connector,
            proxy_address: None,
            own_calls: None,
            running: Running::Replica(Box::new(Replica {
                listeners,
                settings,
                replication,
                reset_state,
                front,
                reloads: reload_requests,
            })),
        })
    }
}

/// A server assembled, ready to serve.
pub struct Assembled {
    /// Reaches the gRPC services through memory.
    pub connector: LocalConnector,
    /// Where the embedded proxy listens, once started (a replica starts it as it serves).
    pub proxy_address: Option<SocketAddr>,
    /// The lease calls its own clients make as functions; `None`: over gRPC.
    own_calls: Option<Arc<InProcess>>,
    running: Running,
}

enum Running {
    Single(Box<Single>),
    Replica(Box<Replica>),
}

struct Single {
    state: Arc<State>,
    control: Arc<Control>,
    recovered: Recovered,
    incoming: Incoming,
    /// The KeyLease service, served over gRPC and called in process.
    service: Arc<KeyLeaseService>,
    in_process: Arc<InProcess>,
    grace: std::time::Duration,
}

struct Replica {
    listeners: crate::replica::Listeners,
    settings: Settings,
    replication: crate::config::Replication,
    reset_state: bool,
    front: Front,
    reloads: tokio::sync::mpsc::UnboundedReceiver<Settings>,
}

impl Assembled {
    /// A client of this server for this process (`config`'s endpoints and TLS are not used):
    /// calling its lease calls as functions on a single server, through its gRPC service in
    /// memory on a replica (or when built with [`OwnLeases::OverGrpc`]). Refused only for a
    /// token that is no header text.
    pub fn client(&self, config: ClientConfig) -> Result<KeyLeaseClient, keylease_client::Error> {
        match &self.own_calls {
            Some(calls) => Ok(KeyLeaseClient::in_process(calls.clone(), config)),
            None => KeyLeaseClient::over_channel(self.connector.channel(), config),
        }
    }

    /// The state a single server lends from (a replica's changes with its leadership).
    pub fn state(&self) -> Option<&Arc<State>> {
        match &self.running {
            Running::Single(single) => Some(&single.state),
            Running::Replica(_) => None,
        }
    }

    /// What a single server found when it opened its state.
    pub fn recovered(&self) -> Option<&Recovered> {
        match &self.running {
            Running::Single(single) => Some(&single.recovered),
            Running::Replica(_) => None,
        }
    }

    /// Serves until `stop` resolves (or the store stops writing); in-flight calls then get
    /// `server.shutdown_grace` to finish. A single server then writes its last snapshot, so
    /// that the next start replays little; a replica steps down.
    pub async fn serve(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), LaunchError> {
        let single = match self.running {
            Running::Replica(replica) => {
                let replica = *replica;
                crate::replica::run(
                    replica.listeners,
                    replica.settings,
                    replica.replication,
                    replica.reset_state,
                    replica.front,
                    replica.reloads,
                    stop,
                )
                .await?;
                return Ok(());
            }
            Running::Single(single) => *single,
        };
        let Single {
            state,
            control,
            incoming,
            service,
            in_process,
            grace,
            ..
        } = single;
        let (stopped, mut grace_start) = tokio::sync::watch::channel(false);
        let store_failed = {
            let state = state.clone();
            async move { state.store_stopped().await }
        };
        let shutdown = async move {
            tokio::select! {
                () = stop => { let _ = stopped.send(true); }
                () = store_failed => {}
            }
        };
        let serving = async move {
            crate::server::serve_single(incoming, control, service, shutdown).await?;
            // The calls made in this process end too, before the last snapshot.
            in_process.stop().await;
            Ok::<_, LaunchError>(())
        };
        tokio::select! {
            served = serving => served?,
            () = async {
                let _ = grace_start.wait_for(|&stop| stop).await;
                tokio::time::sleep(grace).await;
            } => tracing::warn!("grace period over: stopping with calls still in flight"),
        }
        if let Some(failure) = state.store_failure() {
            return Err(failure.into());
        }
        let _ = tokio::task::spawn_blocking(move || state.close()).await;
        Ok(())
    }
}

/// Runs `reload` at each SIGHUP, one after the other.
/// Reads the configuration on a thread of its own: a key source may run a command that takes
/// seconds, which must not hold a runtime thread.
pub async fn load_off_the_runtime(source: ConfigSource) -> Result<Settings, ConfigError> {
    tokio::task::spawn_blocking(move || source.load())
        .await
        .unwrap_or_else(|join| {
            Err(ConfigError::Invalid {
                location: "the configuration".into(),
                reason: format!("reading it failed: {join}"),
            })
        })
}

fn on_hangup<F, Fut>(mut reload: F) -> Result<(), LaunchError>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let mut hangups = signal(SignalKind::hangup()).map_err(LaunchError::Signals)?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload().await;
        }
    });
    Ok(())
}

/// The gRPC services' listener, bound from `server.listen` when the builder binds.
async fn listen(
    grpc: GrpcListener,
    settings: &Settings,
) -> Result<(Incoming, LocalConnector), LaunchError> {
    let listener = match grpc {
        GrpcListener::InProcess => return Ok(Incoming::local_only()),
        GrpcListener::Tcp(listener) => listener,
        GrpcListener::Configured => {
            let listener = bind(settings.listen).await?;
            let address = listener
                .local_addr()
                .map_err(|source| LaunchError::Listen {
                    address: settings.listen,
                    source,
                })?;
            tracing::info!(%address, keys = settings.keys.len(), "keylease serving");
            listener
        }
    };
    Ok(Incoming::with_local(listener))
}

/// The metrics port, when one is configured.
async fn bind_metrics(settings: &Settings) -> Result<Option<TcpListener>, LaunchError> {
    let Some(address) = settings.metrics_listen else {
        return Ok(None);
    };
    let listener = bind(address).await?;
    let bound = listener
        .local_addr()
        .map_err(|source| LaunchError::Listen { address, source })?;
    tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
    Ok(Some(listener))
}

async fn bind(address: SocketAddr) -> Result<TcpListener, LaunchError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| LaunchError::Listen { address, source })
}

/// Says where the state came from, and what it held.
fn log_recovery(settings: &Settings, recovered: &Recovered) {
    if let Some(aside) = &recovered.moved_aside {
        tracing::warn!(moved_to = %aside.display(), "--reset-state: the old state was moved aside");
    }
    match &settings.state {
        StateLocation::Ephemeral => tracing::info!("ephemeral: nothing is kept across restarts"),
        StateLocation::Redis(_) => {}
        StateLocation::Directory(dir) => tracing::info!(
            state_dir = %dir.display(),
            from_snapshot = recovered.from_snapshot,
            records_replayed = recovered.records_replayed,
            live_leases = recovered.live_leases,
            disabled_keys = recovered.disabled_keys,
            cooling_groups = recovered.cooling_groups,
            quota_groups = recovered.quota_groups,
            next_fencing_token = recovered.next_fencing_token,
            "state recovered"
        ),
    }
}
