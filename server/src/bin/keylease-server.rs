//! `keylease-server`: loads and validates the configuration, binds, and serves until SIGINT or
//! SIGTERM; in-flight calls then get the configured grace period to finish. Exit codes follow
//! sysexits(3); a panic, which is a bug, aborts the process rather than serve on from a state
//! it may have left half changed.

use clap::Parser;
use keylease_server::admin::{ConfigSource, Control};
use keylease_server::clock::Clock;
use keylease_server::config::{Overrides, Replication, Settings, StateLocation};
use keylease_server::connections::Front;
use keylease_server::connections::Incoming;
use keylease_server::metrics::StatusSource;
use keylease_server::replica;
use keylease_server::server::serve;
use keylease_server::state::State;
use std::future::pending;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use keylease_server::exit;

/// Lends API keys to workers as time-bounded leases over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `keylease.toml` in the working directory when it exists.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on, such as 127.0.0.1:50051 (overrides server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Keys file, one key per line (overrides key_sources.file).
    #[arg(long)]
    keys_file: Option<PathBuf>,
    /// `text` or `json` (overrides server.log_format).
    #[arg(long)]
    log_format: Option<String>,
    /// Where leases, quotas and disabled keys are kept across restarts (overrides state.dir;
    /// default: `keylease-state` beside the config file, or in the working directory).
    #[arg(long, conflicts_with = "ephemeral")]
    state_dir: Option<PathBuf>,
    /// Keep nothing: a restart forgets every lease and quota (tests, demos).
    #[arg(long)]
    ephemeral: bool,
    /// Move the state directory aside (renamed `<dir>.reset-<time>`, never deleted) and start
    /// with an empty state: the way out of a damaged or unreadable one.
    #[arg(long, conflicts_with = "ephemeral")]
    reset_state: bool,
    /// `redis://HOST:PORT/DB`: keep the state in Redis, shared by several replicas of this
    /// server (overrides state.store; needs replication.token). With --reset-state, accepts
    /// what Redis holds after it lost the log.
    #[arg(long, conflicts_with = "ephemeral")]
    store: Option<String>,
    /// Address of the Gemini-compatible proxy, such as 127.0.0.1:8080, or `off` (overrides
    /// proxy.listen).
    #[arg(long)]
    proxy_listen: Option<String>,
    #[command(subcommand)]
    tool: Option<Tool>,
}

/// Helpers that print and exit, without serving.
#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Makes a random bearer token and prints it once, with the `[[server.tokens]]` entry that
    /// admits it (the entry holds only the token's SHA-256).
    NewToken {
        /// Who the token is for, as events and logs will name it.
        #[arg(long)]
        name: String,
        /// worker, viewer or admin.
        #[arg(long)]
        role: String,
    },
    /// Reads a token on standard input and prints its SHA-256, for `server.tokens[].sha256`.
    HashToken,
}

/// Runs a helper: what it prints goes to standard output, errors to standard error.
fn run_tool(tool: Tool) -> ExitCode {
    use keylease_server::auth::{Role, check_name, token_sha256};
    let hex = |hash: [u8; 32]| hash.iter().map(|b| format!("{b:02x}")).collect::<String>();
    match tool {
        Tool::NewToken { name, role } => {
            if let Err(reason) = check_name(&name) {
                eprintln!("keylease-server: --name: {reason}");
                return ExitCode::from(exit::USAGE);
            }
            if Role::parse(&role).is_none() {
                eprintln!(
                    "keylease-server: --role: {role:?} is not a role (one of {})",
                    Role::NAMES.join(", ")
                );
                return ExitCode::from(exit::USAGE);
            }
            let mut bytes = [0u8; 32];
            if let Err(error) = getrandom::fill(&mut bytes) {
                eprintln!("keylease-server: no random source: {error}");
                return ExitCode::from(exit::OS);
            }
            let token = format!("kl_{}", hex(bytes));
            println!("# The token, for the caller only (it is not kept anywhere):");
            println!("# {token}");
            println!("[[server.tokens]]");
            println!("name = {name:?}");
            println!("role = {role:?}");
            println!("sha256 = \"{}\"", hex(token_sha256(&token)));
            ExitCode::SUCCESS
        }
        Tool::HashToken => {
            let mut token = String::new();
            if let Err(error) = std::io::stdin().read_line(&mut token) {
                eprintln!("keylease-server: cannot read standard input: {error}");
                return ExitCode::from(exit::USAGE);
            }
            let token = token.trim();
            if token.is_empty() {
                eprintln!("keylease-server: no token on standard input");
                return ExitCode::from(exit::USAGE);
            }
            println!("{}", hex(token_sha256(token)));
            ExitCode::SUCCESS
        }
    }
}

fn main() -> ExitCode {
    abort_on_panic();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(tool) = args.tool {
        return run_tool(tool);
    }
    let config_path = args.config.clone().or_else(|| {
        let default = PathBuf::from(keylease_server::config::DEFAULT_CONFIG_FILE);
        default.exists().then_some(default)
    });
    let env = std::env::vars().collect();
    let overrides = Overrides {
        listen: args.listen,
        keys_file: args.keys_file,
        log_format: args.log_format,
        state_dir: args.state_dir,
        ephemeral: args.ephemeral,
        store: args.store,
        proxy_listen: args.proxy_listen,
    };
    let source = ConfigSource {
        path: config_path,
        env,
        overrides,
    };
    let settings = match source.load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("keylease-server: invalid configuration: {error}");
            return ExitCode::from(exit::USAGE);
        }
    };
    keylease_server::logs::init(settings.log_format, "info");
    for notice in &settings.notices {
        tracing::warn!("{notice}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keylease-server: cannot start the runtime: {error}");
            return ExitCode::from(exit::OS);
        }
    };
    match runtime.block_on(run(settings, source, args.reset_state)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            tracing::error!("{failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

impl From<keylease_server::replica::ServeError> for Failure {
    fn from(error: keylease_server::replica::ServeError) -> Self {
        match error {
            keylease_server::replica::ServeError::Start(start) => Self::Replica(start),
            keylease_server::replica::ServeError::Serve(serve) => Self::Serve(serve),
            keylease_server::replica::ServeError::Proxy(proxy) => Self::Proxy(proxy),
        }
    }
}

/// Prints the panic as usual, then aborts: tonic would otherwise turn a handler's panic into a
/// dropped call and serve on.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // A damaged state file read at start: reported as damage, with exit 64.
        if keylease_server::store::embedded::panic_is_contained() {
            return;
        }
        report(info);
        std::process::abort();
    }));
}

/// Why the server stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Open(#[from] keylease_server::state::OpenError),
    #[error("{0}")]
    Replica(#[from] keylease_server::replica::StartError),
    #[error("{0}")]
    Store(#[from] keylease_server::store::journal::StoreFailed),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] keylease_server::tls::TlsError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("serving failed: {0}")]
    Serve(#[from] keylease_server::server::ServeError),
    #[error("{0}")]
    Proxy(#[from] keylease_server::proxy::ProxyStartError),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Open(_) | Self::Replica(_) | Self::Tls(_) => exit::USAGE,
            Self::Proxy(keylease_server::proxy::ProxyStartError::Listen { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                exit::NO_PERMISSION
            }
            Self::Proxy(keylease_server::proxy::ProxyStartError::Listen { .. }) => {
                exit::UNAVAILABLE
            }
            Self::Proxy(_) => exit::USAGE,
            Self::Store(_) => exit::IO,
            Self::Listen { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                exit::NO_PERMISSION
            }
            Self::Listen { .. } => exit::UNAVAILABLE,
            Self::Signals(_) => exit::OS,
            Self::Serve(_) => exit::SOFTWARE,
        }
    }
}

/// Reloads the configuration at each SIGHUP, logging what changed or why nothing did.
fn reload_on_hangup(control: Arc<Control>) -> Result<(), Failure> {
    let mut hangups = signal(SignalKind::hangup()).map_err(Failure::Signals)?;
    tokio::spawn(async move {
        let by: Arc<str> = Arc::from("SIGHUP");
        while hangups.recv().await.is_some() {
            match control.reload(Some(&by)).await {
                Ok(report) => tracing::info!(
                    changes = report.changes.len(),
                    needs_restart = ?report.needs_restart,
                    "SIGHUP: configuration reloaded"
                ),
                Err(error) => tracing::error!(%error, "SIGHUP: the configuration was not reloaded"),
            }
        }
    });
    Ok(())
}

/// Resolves at SIGINT or SIGTERM.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, Failure> {
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Failure::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(Failure::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing in-flight calls");
    })
}

async fn bind(settings: &Settings) -> Result<TcpListener, Failure> {
    let listen_failed = |source| Failure::Listen {
        address: settings.listen,
        source,
    };
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(listen_failed)?;
    let address = listener.local_addr().map_err(listen_failed)?;
    tracing::info!(%address, keys = settings.keys.len(), "keylease serving");
    Ok(listener)
}

/// The metrics port, when one is configured.
async fn bind_metrics(settings: &Settings) -> Result<Option<TcpListener>, Failure> {
    let Some(address) = settings.metrics_listen else {
        return Ok(None);
    };
    let listen_failed = |source| Failure::Listen { address, source };
    let listener = TcpListener::bind(address).await.map_err(listen_failed)?;
    let address = listener.local_addr().map_err(listen_failed)?;
    tracing::info!(%address, "metrics at http://{address}/metrics");
    Ok(Some(listener))
}

/// One replica of several on Redis (see `keylease_server::replica`).
async fn run_replica(
    settings: Settings,
    source: ConfigSource,
    replication: Replication,
    reset_state: bool,
) -> Result<(), Failure> {
    // Before anything says it serves: a SIGTERM from then on stops it cleanly.
    let stop = stop_signal()?;
    let (grpc, local) = Incoming::with_local(bind(&settings).await?);
    let listeners = replica::Listeners {
        grpc,
        metrics: bind_metrics(&settings).await?,
        proxy: settings.proxy.clone().map(|proxy| (proxy, local)),
    };
    let front = Front::new(&settings)?;
    let (reloads, reload_requests) = tokio::sync::mpsc::unbounded_channel();
    let mut hangups = signal(SignalKind::hangup()).map_err(Failure::Signals)?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match source.load() {
                Ok(loaded) => {
                    tracing::info!("SIGHUP: configuration read again; the replica takes it up");
                    let _ = reloads.send(loaded);
                }
                Err(error) => tracing::error!(%error, "SIGHUP: the configuration was not reloaded"),
            }
        }
    });
    replica::serve(
        listeners,
        settings,
        replication,
        reset_state,
        front,
        reload_requests,
        stop,
    )
    .await?;
    tracing::info!("keylease stopped");
    Ok(())
}

/// Fits the gRPC port's and the proxy's connection caps to the open-file limit (raised to the
/// hard limit first), so that the process never runs out of descriptors for its store, its
/// upstream connections or the gRPC port's workers when the proxy is full.
fn fit_to_open_files(settings: &mut Settings) {
    let grpc = settings.limits.max_connections;
    let proxy = settings
        .proxy
        .as_ref()
        .map_or(0, |p| p.limits.max_connections);
    let budget = keylease_server::connections::FileBudget::raise_and_fit(grpc, proxy);
    settings.limits.max_connections = budget.grpc;
    if let Some(proxy) = &mut settings.proxy {
        proxy.limits.max_connections = budget.proxy;
    }
}

async fn run(
    mut settings: Settings,
    source: ConfigSource,
    reset_state: bool,
) -> Result<(), Failure> {
    fit_to_open_files(&mut settings);
    if let StateLocation::Redis(replication) = &settings.state {
        let replication = (**replication).clone();
        return run_replica(settings, source, replication, reset_state).await;
    }
    let (state, recovered) = State::open(&settings, Clock::system(), reset_state)?;
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
    let control = Control::new(source, settings.clone(), state.clone())?;
    // Before anything says it serves: a SIGTERM from then on stops it cleanly.
    let signalled = stop_signal()?;
    if let Some(listener) = bind_metrics(&settings).await? {
        let scraped = state.clone();
        let source: keylease_server::metrics::Source =
            Arc::new(move || (Some(scraped.clone() as Arc<dyn StatusSource>), None));
        let metrics = state.metrics().clone();
        tokio::spawn(async move {
            let served =
                keylease_server::metrics::serve(listener, metrics, source, pending()).await;
            if let Err(error) = served {
                tracing::error!(%error, "serving metrics failed");
            }
        });
    }
    reload_on_hangup(control.clone())?;
    let (listener, local) = Incoming::with_local(bind(&settings).await?);
    if let Some(proxy) = settings.proxy.clone() {
        let embedding = keylease_server::proxy::Embedding::of(&state);
        keylease_server::proxy::start_embedded(proxy, &local, embedding).await?;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signalled.await;
        let _ = stop.send(true);
    });
    let mut grace_start = stopped.clone();
    let shutdown = async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|&stop| stop).await;
    };
    // A store that stops writing stops the server: nothing more could be acknowledged.
    let store_failed = {
        let state = state.clone();
        async move { state.store_stopped().await }
    };
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            () = store_failed => {}
        }
    };
    tokio::select! {
        served = serve(listener, control, shutdown) => served?,
        () = async {
            let _ = grace_start.wait_for(|&stop| stop).await;
            tokio::time::sleep(settings.shutdown_grace).await;
        } => tracing::warn!("grace period over: stopping with calls still in flight"),
    }
    if let Some(failure) = state.store_failure() {
        return Err(failure.into());
    }
    // The last snapshot, so that the next start replays little.
    tokio::task::spawn_blocking(move || state.close())
        .await
        .ok();
    tracing::info!("keylease stopped");
    Ok(())
}
