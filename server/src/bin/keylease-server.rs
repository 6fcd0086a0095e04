//! `keylease-server`: loads and validates the configuration, binds, and serves until SIGINT or
//! SIGTERM; in-flight calls then get the configured grace period to finish.

use anyhow::Context;
use clap::Parser;
use keylease_server::clock::Clock;
use keylease_server::config::{self, LogFormat, Overrides, Settings};
use keylease_server::server::serve;
use keylease_server::state::State;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Exit code of an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
const DEFAULT_CONFIG: &str = "keylease.toml";

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config_path = args.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    });
    let env = std::env::vars().collect();
    let overrides = Overrides {
        listen: args.listen,
        keys_file: args.keys_file,
        log_format: args.log_format,
    };
    let settings = match config::load(config_path.as_deref(), &env, &overrides) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("keylease-server: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keylease-server: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYLEASE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let state = State::new(&settings, Clock::system()).context("invalid key setup")?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    tracing::info!(address = %listener.local_addr()?, keys = settings.keys.len(), "keylease serving");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing in-flight calls");
        let _ = stop.send(true);
    });
    let mut grace_start = stopped.clone();
    let shutdown = async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|&stop| stop).await;
    };
    tokio::select! {
        served = serve(listener, state, shutdown) => served?,
        () = async {
            let _ = grace_start.wait_for(|&stop| stop).await;
            tokio::time::sleep(settings.shutdown_grace).await;
        } => tracing::warn!("grace period over: stopping with calls still in flight"),
    }
    tracing::info!("keylease stopped");
    Ok(())
}
