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

/// How each client sends: as soon as its previous call returned (closed loop, the most the
/// machine can do), or on a fixed schedule (open loop, latency at a set load).
#[derive(Clone, Copy)]
pub enum Pace {
    Closed,
    Every(Duration),
}

/// The calls of one or more measurements: latencies (microseconds), time, and the CPU the server
/// and this process (the load) used meanwhile.
#[derive(Default)]
pub struct Samples {
    latencies: Vec<u64>,
    elapsed: Duration,
    server_cpu: Duration,
    load_cpu: Duration,
}

impl Samples {
    fn add(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
        self.server_cpu += other.server_cpu;
        self.load_cpu += other.load_cpu;
    }

    pub fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency percentile `p` (0 to 1), in microseconds.
    pub fn percentile(&mut self, p: f64) -> u64 {
        self.latencies.sort_unstable();
        percentile(&self.latencies, p)
    }

    /// CPU per call in microseconds: (server, load).
    fn cpu_per_call(&self) -> (f64, f64) {
        let calls = self.latencies.len().max(1) as f64;
        (
            self.server_cpu.as_secs_f64() * 1e6 / calls,
            self.load_cpu.as_secs_f64() * 1e6 / calls,
        )
    }
}

/// Runs `call` from `clients` concurrent loops for `duration`, over a few shared connections.
/// On a schedule, a call that could not be sent on time counts from when it was due, so a
/// server that falls behind is not flattered by the calls it delayed.
pub async fn measure<F, Fut>(
    server: &procs::Child,
    clients: usize,
    duration: Duration,
    pace: Pace,
    call: F,
) -> anyhow::Result<Samples>
where
    F: Fn(Channel, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let mut channels = Vec::new();
    for _ in 0..clients.clamp(1, 8) {
        channels.push(
            Channel::from_shared(server.address.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let cpu = || (server.cpu_time(), procs::cpu_time_of("self"));
    let cpu_before = cpu();
    let began = now();
    let stop = began + duration;
    let mut loops = Vec::new();
    for client in 0..clients {
        let (channel, call) = (channels[client % channels.len()].clone(), call.clone());
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            // Clients start spread over one interval, not all at once.
            let mut due = match pace {
                Pace::Closed => began,
                Pace::Every(interval) => began + interval * client as u32 / clients as u32,
            };
            while due < stop {
                // Behind schedule, the wait for the previous call counts; ahead of it, the call
                // counts from when the timer (1 ms grain) actually woke us.
                let sent = match pace {
                    Pace::Every(_) if now() < due => {
                        tokio::time::sleep_until(due).await;
                        now()
                    }
                    Pace::Every(_) => due,
                    Pace::Closed => now(),
                };
                call(channel.clone(), client).await?;
                latencies.push(sent.elapsed().as_micros() as u64);
                due = match pace {
                    Pace::Every(interval) => due + interval,
                    Pace::Closed => now(),
                };
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut samples = Samples {
        elapsed: duration,
        ..Default::default()
    };
    for handle in loops {
        samples.latencies.extend(handle.await??);
    }
    let cpu_after = cpu();
    let used = |before: Option<Duration>, after: Option<Duration>| {
        after
            .zip(before)
            .map_or(Duration::ZERO, |(a, b)| a.saturating_sub(b))
    };
    samples.server_cpu = used(cpu_before.0, cpu_after.0);
    samples.load_cpu = used(cpu_before.1, cpu_after.1);
    Ok(samples)
}

/// Cycles per second of the engine itself: the same configuration, no gRPC, one thread.
fn engine_alone(config: &std::path::Path, cycles: usize) -> anyhow::Result<f64> {
    use keylease_server::engine::{AcquireRequest, Acquired, Command, Engine, Setup, Usage};
    let settings =
        keylease_server::config::load(Some(config), &Default::default(), &Default::default())?;
    let clock = keylease_server::clock::Clock::system();
    let setup = Setup {
        config: settings.engine,
        keys: settings.keys,
        token_floor: 0,
    };
    let mut engine = Engine::new(setup, clock.now())?;
    let tasks: Vec<String> = (0..256).map(|i| format!("bench-{i}")).collect();
    let began = now();
    for i in 0..cycles {
        let request = AcquireRequest {
            task_id: tasks[i % tasks.len()].clone(),
            model: MODEL.into(),
            ..Default::default()
        };
        let (reply, _) = engine.apply(clock.now(), Command::Acquire(request));
        let Acquired::Granted(lease) = reply.into_acquired()? else {
            anyhow::bail!("no key")
        };
        let release = Command::Release {
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            usage: Usage {
                requests_sent: Some(1),
                input_tokens: Some(0),
            },
        };
        engine.apply(clock.now(), release).0.into_released()?;
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
        requests_sent: Some(1),
        input_tokens: Some(0),
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

/// Rounds of cycles and no-ops taken in turn, so that whatever else the machine does falls on
/// both alike.
const ROUNDS: usize = 5;

/// Cycles and no-ops, `rounds` rounds of `round` each, taken in turn.
async fn in_turn(
    server: &procs::Child,
    clients: usize,
    rounds: usize,
    round: Duration,
    pace: Pace,
) -> anyhow::Result<(Samples, Samples)> {
    let (mut cycles, mut noops) = (Samples::default(), Samples::default());
    for _ in 0..rounds {
        cycles.add(measure(server, clients, round, pace, cycle).await?);
        noops.add(measure(server, clients, round, pace, noop).await?);
    }
    Ok((cycles, noops))
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let dir = procs::scratch("overhead")?;
    // More keys than clients, no limits: the cycle measures the service, not contention.
    let keys = procs::fake_keys(512, 512);
    let config = procs::keylease_config(&dir, &keys, MODEL, "", "")?;
    let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let (rounds, round) = if smoke {
        (1, Duration::from_millis(500))
    } else {
        (ROUNDS, Duration::from_secs(1))
    };
    println!("\n### Overhead (in-memory engine)\n");
    println!(
        "`cargo run --release -p keylease-bench -- overhead`; per row {rounds} rounds of {} ms of cycles and {} ms of no-ops, taken in turn; one server process, the load from this one.\n",
        round.as_millis(),
        round.as_millis()
    );
    println!(
        "| clients | cycles/s | cycle p50 | p99 | p99.9 | no-op RPC/s | no-op p50 | p99 | cycles / no-op |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    let mut closed_loop_16 = 0.0;
    for clients in [1, 16, 256] {
        let (mut cycles, mut noops) =
            in_turn(&server, clients, rounds, round, Pace::Closed).await?;
        println!(
            "| {clients} | {:.0} | {} µs | {} µs | {} µs | {:.0} | {} µs | {} µs | {:.3} |",
            cycles.per_second(),
            cycles.percentile(0.5),
            cycles.percentile(0.99),
            cycles.percentile(0.999),
            noops.per_second(),
            noops.percentile(0.5),
            noops.percentile(0.99),
            cycles.per_second() / noops.per_second()
        );
        if clients == 16 {
            closed_loop_16 = cycles.per_second();
        }
        cpu_rows.push((clients, cycles.cpu_per_call(), noops.cpu_per_call()));
    }
    println!("\nCPU per call, in µs (user + system, from /proc; the load is this process):\n");
    println!(
        "| clients | server per cycle | server per no-op | load per cycle | load per no-op | whole cycle / whole no-op |"
    );
    println!("|---|---|---|---|---|---|");
    for (clients, cycle, noop) in cpu_rows {
        println!(
            "| {clients} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            cycle.0,
            noop.0,
            cycle.1,
            noop.1,
            (cycle.0 + cycle.1) / (noop.0 + noop.1)
        );
    }

    println!(
        "\nLatency at a set load: 16 clients, each on a fixed schedule, together offering a share of the closed-loop rate above ({closed_loop_16:.0} cycles/s); a call sent late because the previous one had not returned counts from when it was due. The no-op is offered the same number of calls.\n"
    );
    println!("| offered | cycles/s | cycle p50 | p99 | p99.9 | no-op p50 | p99 | p99.9 |");
    println!("|---|---|---|---|---|---|---|---|");
    for share in [0.25, 0.5, 0.75] {
        let rate = (closed_loop_16 * share).max(16.0);
        let pace = Pace::Every(Duration::from_secs_f64(16.0 / rate));
        let (mut cycles, mut noops) = in_turn(&server, 16, rounds, round, pace).await?;
        println!(
            "| {:.0}% | {:.0} | {} µs | {} µs | {} µs | {} µs | {} µs | {} µs |",
            share * 100.0,
            cycles.per_second(),
            cycles.percentile(0.5),
            cycles.percentile(0.99),
            cycles.percentile(0.999),
            noops.percentile(0.5),
            noops.percentile(0.99),
            noops.percentile(0.999),
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
