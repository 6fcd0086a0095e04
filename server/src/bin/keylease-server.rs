//! `keylease-server`: loads and validates the configuration, binds, and serves until SIGINT or
//! SIGTERM; in-flight calls then get the configured grace period to finish. Exit codes follow
//! sysexits(3); a panic, which is a bug, aborts the process rather than serve on from a state
//! it may have left half changed.

use clap::Parser;
use keylease_server::admin::ConfigSource;
use keylease_server::builder::{GrpcListener, LaunchError, ServerBuilder};
use keylease_server::config::{Overrides, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
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
    let args = match exit::parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
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
    let runtime = match exit::runtime("keylease-server") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(settings, source, args.reset_state)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            tracing::error!("{failure}");
            ExitCode::from(exit_code(&failure))
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

/// Why the server stopped other than by a signal, as an exit code.
fn exit_code(failure: &LaunchError) -> u8 {
    use keylease_server::proxy::ProxyStartError;
    let denied = |source: &std::io::Error| source.kind() == std::io::ErrorKind::PermissionDenied;
    match failure {
        LaunchError::Open(_) | LaunchError::Replica(_) | LaunchError::Tls(_) => exit::USAGE,
        LaunchError::Proxy(ProxyStartError::Listen { source, .. })
        | LaunchError::Listen { source, .. }
            if denied(source) =>
        {
            exit::NO_PERMISSION
        }
        LaunchError::Proxy(ProxyStartError::Listen { .. }) | LaunchError::Listen { .. } => {
            exit::UNAVAILABLE
        }
        LaunchError::Proxy(_) => exit::USAGE,
        LaunchError::Store(_) => exit::IO,
        LaunchError::Signals(_) | LaunchError::Checks(_) | LaunchError::Watch(..) => exit::OS,
        LaunchError::Serve(_) => exit::SOFTWARE,
    }
}

/// Resolves at SIGINT or SIGTERM.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, LaunchError> {
    let mut interrupt = signal(SignalKind::interrupt()).map_err(LaunchError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(LaunchError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing in-flight calls");
    })
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
) -> Result<(), LaunchError> {
    fit_to_open_files(&mut settings);
    // Before anything says it serves: a SIGTERM from then on stops it cleanly.
    let stop = stop_signal()?;
    ServerBuilder::new(source, settings)
        .reset_state(reset_state)
        .reload_on_hangup()
        .build(GrpcListener::Configured)
        .await?
        .serve(stop)
        .await?;
    tracing::info!("keylease stopped");
    Ok(())
}
