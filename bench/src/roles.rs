//! The processes a scenario starts: a keylease server, a fake Gemini, and workers that call it
//! through keylease or the way hand-rolled rotators do.

use clap::ValueEnum;
use fake_gemini::{FakeConfig, FakeGemini};
use keylease_client::gemini::{
    CallError, GeminiClient, GenerateContentRequest, Generated, LeasedGemini, RetryPolicy,
};
use keylease_client::{ClientConfig, KeyLeaseClient};
use keylease_server::admin::ConfigSource;
use keylease_server::builder::{GrpcListener, OwnLeases, ServerBuilder};
use keylease_server::config::{self, Overrides};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// A plain HTTP proxy in front of `upstream`, built on the crates keylease's proxy uses (axum
/// and hyper toward the caller, reqwest toward the provider) and doing nothing else: no lease,
/// no reading of the body, the caller's own key passed on. What a proxy hop costs at the least
/// on this stack, for the proxy scenario to set keylease's beside.
pub async fn pass_through(upstream: String) -> anyhow::Result<()> {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{HeaderName, StatusCode, header};
    use axum::response::{IntoResponse, Response};

    const PASSED: [HeaderName; 2] = [
        header::CONTENT_TYPE,
        HeaderName::from_static("x-goog-api-key"),
    ];
    async fn forward(
        State((http, upstream)): State<(reqwest::Client, Arc<str>)>,
        request: Request,
    ) -> Response {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let mut sent = http.request(parts.method, format!("{upstream}{path}"));
        for name in &PASSED {
            if let Some(value) = parts.headers.get(name) {
                sent = sent.header(name, value);
            }
        }
        match sent.body(body).send().await {
            Ok(answer) => {
                let mut response = Response::builder().status(answer.status());
                if let Some(kind) = answer.headers().get(header::CONTENT_TYPE) {
                    response = response.header(header::CONTENT_TYPE, kind);
                }
                response
                    .body(Body::from_stream(answer.bytes_stream()))
                    .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
            }
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        }
    }
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let app = axum::Router::new()
        .fallback(forward)
        .with_state((http, Arc::<str>::from(upstream)));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    // As keylease's own listeners: a stream's last chunk must not wait for the caller's ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

pub async fn serve(config: PathBuf, over_grpc: bool) -> anyhow::Result<()> {
    let source = ConfigSource {
        path: Some(config),
        ..Default::default()
    };
    let settings = source.load()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let own_leases = if over_grpc {
        OwnLeases::OverGrpc
    } else {
        OwnLeases::InProcess
    };
    let server = ServerBuilder::new(source, settings)
        .own_leases(own_leases)
        .build(GrpcListener::Tcp(listener))
        .await?;
    if let Some(address) = server.proxy_address {
        println!("proxy on http://{address}");
    }
    if let Some(state) = server.state().filter(|state| state.journal().is_some()) {
        // The store's own counters, for the scenario to read around each measurement.
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(STATS_EVERY).await;
                let stats = &state.journal().expect("durable").stats;
                println!(
                    "{STATS_PREFIX}commits={} records={} commit_micros={}",
                    stats.commits.load(Ordering::Relaxed),
                    stats.records.load(Ordering::Relaxed),
                    stats.commit_micros.load(Ordering::Relaxed)
                );
            }
        });
    }
    server.serve(std::future::pending()).await?;
    Ok(())
}

/// A replica on Redis (the configuration names the store) on a loopback port of its own, which
/// it advertises to the other replicas.
pub async fn replica(config: PathBuf) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let source = ConfigSource {
        path: Some(config.clone()),
        overrides: Overrides {
            listen: Some(address.to_string()),
            ..Overrides::default()
        },
        ..Default::default()
    };
    let settings = source.load()?;
    if !matches!(settings.state, config::StateLocation::Redis(_)) {
        anyhow::bail!("{}: no Redis store configured", config.display());
    }
    println!("listening on http://{address}");
    // Stopped as operators stop one, for the failover after SIGTERM; nothing reloads it.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    ServerBuilder::new(source, settings)
        .build(GrpcListener::Tcp(listener))
        .await?
        .serve(async move {
            let _ = terminate.recv().await;
        })
        .await?;
    Ok(())
}

/// How often a durable server prints its store's counters.
pub const STATS_EVERY: Duration = Duration::from_millis(100);
/// The start of those lines: `journal commits=N records=M`.
pub const STATS_PREFIX: &str = "journal ";

pub async fn fake(config: PathBuf) -> anyhow::Result<()> {
    let config: FakeConfig = serde_json::from_str(&std::fs::read_to_string(config)?)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    FakeGemini::new(config)
        .serve(listener, std::future::pending())
        .await?;
    Ok(())
}

/// How a worker picks keys.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Every call under a keylease lease.
    Keylease,
    /// Each process rotates over all keys on its own, moving on at each 429.
    RoundRobin,
    /// Each job pins one key and paces itself at one request per 4 provider seconds.
    Pinned,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    /// keylease's endpoint; several, comma-separated, for replicas (calls are balanced over
    /// those that answer).
    #[arg(long)]
    keylease: String,
    #[arg(long)]
    gemini: String,
    /// One secret per line (the baselines hold keys themselves).
    #[arg(long)]
    secrets: PathBuf,
    #[arg(long)]
    model: String,
    #[arg(long)]
    jobs: usize,
    /// This process's number among `processes`.
    #[arg(long)]
    index: usize,
    #[arg(long)]
    processes: usize,
    /// How much faster than real time the provider's clock runs.
    #[arg(long)]
    time_scale: f64,
    #[arg(long)]
    warmup_ms: u64,
    #[arg(long)]
    measure_ms: u64,
}

/// Calls until the measurement ends and prints `answered N` (calls answered within it).
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let secrets: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(&args.secrets)?
            .lines()
            .map(str::to_string)
            .collect(),
    );
    let gemini = GeminiClient::new(&args.gemini, Duration::from_secs(10))?;
    let leased = LeasedGemini::new(
        KeyLeaseClient::connect(ClientConfig {
            endpoints: args.keylease.split(',').map(str::to_string).collect(),
            // Through a leader's failover (about two seconds) without giving up.
            attempts: 8,
            ..ClientConfig::new(String::new())
        })?,
        gemini.clone(),
        RetryPolicy {
            deadline: Duration::from_millis(args.warmup_ms + args.measure_ms + 30_000),
            ..RetryPolicy::default()
        },
    );
    let start = now();
    let counted_from = start + Duration::from_millis(args.warmup_ms);
    let stop = counted_from + Duration::from_millis(args.measure_ms);
    let answered = Arc::new(AtomicU64::new(0));
    let rotation = Arc::new(AtomicUsize::new(args.index));
    // One request per 4 provider seconds, in real time.
    let pace = Duration::from_secs_f64(4.0 / args.time_scale);
    let mut jobs = Vec::new();
    for job in 0..args.jobs {
        let (gemini, leased, secrets, answered, rotation) = (
            gemini.clone(),
            leased.clone(),
            secrets.clone(),
            answered.clone(),
            rotation.clone(),
        );
        let (mode, model, name) = (
            args.mode,
            args.model.clone(),
            format!("p{}j{job}", args.index),
        );
        let pinned = secrets[(args.index * args.jobs + job) % secrets.len()].clone();
        jobs.push(tokio::spawn(async move {
            let request = GenerateContentRequest::text("a short prompt");
            let mut call = 0u64;
            while now() < stop {
                call += 1;
                let began = now();
                let ok = match mode {
                    Mode::Keylease => {
                        matches!(
                            leased
                                .generate(&format!("{name}-{call}"), &model, &request)
                                .await,
                            Ok(Generated::Answer(_))
                        )
                    }
                    Mode::RoundRobin => {
                        let key =
                            &secrets[rotation.fetch_add(1, Ordering::Relaxed) % secrets.len()];
                        !matches!(
                            gemini.generate_content(key, &model, &request).await,
                            Err(CallError::Provider { .. }
                                | CallError::Transport { .. }
                                | CallError::Decode(_))
                        )
                    }
                    Mode::Pinned => {
                        let ok = gemini
                            .generate_content(&pinned, &model, &request)
                            .await
                            .is_ok();
                        tokio::time::sleep_until(began + pace).await;
                        ok
                    }
                };
                if ok && (counted_from..=stop).contains(&now()) {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for job in jobs {
        job.await?;
    }
    println!("answered {}", answered.load(Ordering::Relaxed));
    Ok(())
}

/// Workers measure real elapsed time.
#[allow(clippy::disallowed_methods)]
pub fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}
