//! Scenario 1: what a lease costs. AcquireKey+Release cycles per second and their latency at 1,
//! 16 and 256 concurrent clients, beside a no-op unary RPC of the same server (health Check):
//! the most any gRPC service on this machine can do.

use crate::procs::{self, percentile};
use crate::roles::now;
use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use std::future::Future;
use std::time::Duration;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const MODEL: &str = "bench-model";

/// Calls per second and latency percentiles (microseconds) of one measurement.
pub struct Measured {
    pub per_second: f64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
}

/// Runs `call` from `clients` concurrent loops for `duration`, over a few shared connections.
pub async fn measure<F, Fut>(
    address: &str,
    clients: usize,
    duration: Duration,
    call: F,
) -> anyhow::Result<Measured>
where
    F: Fn(Channel, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let mut channels = Vec::new();
    for _ in 0..clients.clamp(1, 8) {
        channels.push(
            Channel::from_shared(address.to_string())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let stop = now() + duration;
    let mut loops = Vec::new();
    for client in 0..clients {
        let (channel, call) = (channels[client % channels.len()].clone(), call.clone());
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while now() < stop {
                let began = now();
                call(channel.clone(), client).await?;
                latencies.push(began.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for handle in loops {
        all.extend(handle.await??);
    }
    all.sort_unstable();
    Ok(Measured {
        per_second: all.len() as f64 / duration.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        p999: percentile(&all, 0.999),
    })
}

/// Cycles per second of the engine itself: the same configuration, no gRPC, one thread.
fn engine_alone(config: &std::path::Path, cycles: usize) -> anyhow::Result<f64> {
    use keylease_server::engine::{AcquireRequest, Acquired, Engine};
    let settings =
        keylease_server::config::load(Some(config), &Default::default(), &Default::default())?;
    let clock = keylease_server::clock::Clock::system();
    let mut engine = Engine::new(settings.engine, settings.keys, clock.now_ms())?;
    let tasks: Vec<String> = (0..256).map(|i| format!("bench-{i}")).collect();
    let began = now();
    for i in 0..cycles {
        let request = AcquireRequest {
            task_id: tasks[i % tasks.len()].clone(),
            model: MODEL.into(),
            ..Default::default()
        };
        let Acquired::Granted(lease) = engine.acquire(clock.now_ms(), request)? else {
            anyhow::bail!("no key")
        };
        engine.release(clock.now_ms(), &lease.lease_id, lease.fencing_token, 1, 0)?;
        engine.drain();
    }
    Ok(cycles as f64 / began.elapsed().as_secs_f64())
}

/// One AcquireKey and its Release, as client `client`'s task.
pub async fn cycle(channel: Channel, client: usize) -> anyhow::Result<()> {
    let mut keylease = KeyLeaseClient::new(channel);
    let request = pb::AcquireKeyRequest {
        task_id: format!("bench-{client}"),
        model: MODEL.into(),
        ..Default::default()
    };
    let lease = keylease.acquire_key(request).await?.into_inner();
    let release = pb::ReleaseRequest {
        lease_id: lease.lease_id,
        fencing_token: lease.fencing_token,
        requests_sent: 1,
        input_tokens: 0,
    };
    keylease.release(release).await?;
    Ok(())
}

async fn noop(channel: Channel, _client: usize) -> anyhow::Result<()> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(())
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let dir = procs::scratch("overhead")?;
    // More keys than clients, no limits: the cycle measures the service, not contention.
    let keys = procs::fake_keys(512, 512);
    let config = procs::keylease_config(&dir, &keys, MODEL, "", "")?;
    let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let duration = Duration::from_secs(if smoke { 1 } else { 5 });
    println!("\n### Overhead (in-memory engine)\n");
    println!(
        "`cargo run --release -p keylease-bench -- overhead`; {} s per row; one server process, the load from this one.\n",
        duration.as_secs()
    );
    println!(
        "| clients | cycles/s | cycle p50 | p99 | p99.9 | no-op RPC/s | no-op p50 | p99 | cycles / no-op |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for clients in [1, 16, 256] {
        let cycles = measure(&server.address, clients, duration, cycle).await?;
        let baseline = measure(&server.address, clients, duration, noop).await?;
        println!(
            "| {clients} | {:.0} | {} µs | {} µs | {} µs | {:.0} | {} µs | {} µs | {:.3} |",
            cycles.per_second,
            cycles.p50,
            cycles.p99,
            cycles.p999,
            baseline.per_second,
            baseline.p50,
            baseline.p99,
            cycles.per_second / baseline.per_second
        );
    }
    println!(
        "\nServer peak memory: {:.0} MiB",
        server.peak_memory_mib().unwrap_or(0.0)
    );
    let engine = engine_alone(&config, if smoke { 20_000 } else { 1_000_000 })?;
    println!(
        "\nThe engine alone, in this process without gRPC: {engine:.0} AcquireKey+Release cycles/s on one core."
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
