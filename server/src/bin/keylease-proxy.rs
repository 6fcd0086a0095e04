//! `keylease-proxy`: the Gemini-compatible endpoint on its own, next to the workers, leasing
//! from a remote keylease over gRPC with each caller's own token. Exit codes as the server's.

use clap::Parser;
use keylease_client::{ClientConfig, KeyLeaseClient, TlsConfig};
use keylease_server::config::proxy::{self as settings, HttpLimits, ProxySettings};
use keylease_server::proxy::{self, Proxy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use keylease_server::exit;

/// A Gemini-compatible HTTP endpoint whose every call runs under a keylease lease.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// keylease's gRPC address (`http://` or `https://`); repeat for replicas.
    #[arg(long, required = true)]
    keylease: Vec<String>,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Gemini's base URL.
    #[arg(long, default_value = keylease_client::gemini::DEFAULT_BASE_URL)]
    upstream: String,
    /// Longest wait for a key before answering 429 (`60s`, `2m`); at most keylease's
    /// leases.max_wait (5 minutes unless configured), which refuses longer waits.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Longest a whole call may take.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = settings::DEFAULT_MAX_BODY)]
    max_body: usize,
    /// The model leased to list models (`GET models`); without it, listing is refused.
    #[arg(long)]
    listing_model: Option<String>,
    /// Connections at once (fitted to the open-file limit).
    #[arg(long, default_value_t = settings::DEFAULT_LIMITS.max_connections)]
    max_connections: usize,
    /// How long a client has to send a request's headers.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// How long a client has to send a request's body.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// The CA that signed keylease's certificate (PEM), for https:// addresses.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), when keylease requires mutual TLS.
    #[arg(long, requires = "client_key")]
    client_certificate: Option<PathBuf>,
    #[arg(long, requires = "client_certificate")]
    client_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = match exit::parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    keylease_server::logs::init(keylease_server::config::LogFormat::Text, "info");
    let runtime = match exit::runtime("keylease-proxy") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("keylease-proxy: {message}");
            ExitCode::from(code)
        }
    }
}

async fn run(args: Args) -> Result<(), (u8, String)> {
    let usage = |message: String| (exit::USAGE, message);
    let upstream =
        settings::check_upstream(&args.upstream).map_err(|e| usage(format!("--upstream: {e}")))?;
    if [
        args.wait,
        args.timeout,
        args.header_timeout,
        args.body_timeout,
        args.idle_timeout,
    ]
    .iter()
    .any(Duration::is_zero)
        || args.max_connections == 0
    {
        return Err(usage(
            "--wait, --timeout, --header-timeout, --body-timeout, --idle-timeout and --max-connections must be above zero".into(),
        ));
    }
    if !settings::MAX_BODY_RANGE.contains(&args.max_body) {
        return Err(usage(format!(
            "--max-body: {} is not between 1024 bytes and 1 GiB",
            args.max_body
        )));
    }
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| usage(format!("{flag} {}: {e}", path.display())))
    };
    let mut config = ClientConfig::new(args.keylease[0].clone());
    config.endpoints = args.keylease.clone();
    if args.ca.is_some() || args.client_certificate.is_some() {
        let identity = match (&args.client_certificate, &args.client_key) {
            (Some(certificate), Some(key)) => Some((
                read("--client-certificate", certificate)?,
                read("--client-key", key)?,
            )),
            _ => None,
        };
        config.tls = Some(TlsConfig {
            ca_certificate: args.ca.as_ref().map(|ca| read("--ca", ca)).transpose()?,
            identity,
            domain: None,
        });
    }
    let keylease =
        KeyLeaseClient::connect(config).map_err(|e| usage(format!("--keylease: {e}")))?;
    if !args.listen.ip().is_loopback() {
        refuse_if_open(&keylease, args.listen).await?;
    }
    let budget = keylease_server::connections::FileBudget::raise_and_fit(0, args.max_connections);
    let settings = ProxySettings {
        listen: args.listen,
        upstream: upstream.clone(),
        wait: args.wait,
        timeout: args.timeout,
        max_body: args.max_body,
        listing_model: args.listing_model,
        limits: HttpLimits {
            max_connections: budget.proxy,
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            idle_timeout: args.idle_timeout,
        },
    };
    let proxy = Proxy::new(settings, keylease, None).map_err(|e| usage(e.to_string()))?;
    let listener = TcpListener::bind(args.listen).await.map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("cannot listen on {}: {e}", args.listen),
        )
    })?;
    let address = listener
        .local_addr()
        .map_err(|e| (exit::OS, e.to_string()))?;
    tracing::info!(%address, %upstream, keylease = ?args.keylease, "Gemini-compatible proxy at http://{address}");
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| (exit::OS, e.to_string()))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| (exit::OS, e.to_string()))?;
    let stop = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing in-flight calls");
    };
    proxy::serve(listener, proxy, stop)
        .await
        .map_err(|e| (exit::UNAVAILABLE, format!("serving failed: {e}")))
}

/// Off loopback, the proxy serves only when keylease checks tokens: otherwise anyone who
/// reaches it could spend the keys. An empty acquire tells which without taking anything:
/// keylease refuses it as unauthenticated when it checks, as invalid when it does not.
async fn refuse_if_open(keylease: &KeyLeaseClient, listen: SocketAddr) -> Result<(), (u8, String)> {
    let mut probe = keylease_client::AcquireOptions::new("", "");
    probe.wait = Duration::ZERO;
    match keylease.acquire(probe).await {
        Err(keylease_client::Error::Refused(status))
            if status.code() == tonic::Code::Unauthenticated =>
        {
            Ok(())
        }
        Err(keylease_client::Error::Unreachable { last, .. }) => Err((
            exit::UNAVAILABLE,
            format!("keylease cannot be reached to check that it requires tokens: {last}"),
        )),
        _ => Err((
            exit::USAGE,
            format!(
                "keylease lends keys without a token, and {listen} is not a loopback address: anyone who reaches the proxy could spend the keys. Configure tokens on keylease, or listen on loopback"
            ),
        )),
    }
}
