//! Scenario 1: what a lease costs. AcquireKey+Release cycles per second and their latency at 1,
//! 16 and 256 concurrent clients, on a server that keeps nothing and on one that keeps its state
//! on disk, beside a no-op unary RPC (health Check): the most any gRPC service on this machine
//! can do.

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
    pub fn add(&mut self, other: Samples) {
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
    pub fn cpu_per_call(&self) -> (f64, f64) {
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
    measure_spread(&[server], clients, duration, pace, call).await
}

/// As [`measure`], with the clients spread over `servers` (replicas of one service); the
/// server CPU is theirs together.
pub async fn measure_spread<F, Fut>(
    servers: &[&procs::Child],
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
    let connections = clients.clamp(1, 8).max(servers.len());
    for n in 0..connections {
        channels.push(
            Channel::from_shared(servers[n % servers.len()].address.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let cpu = || {
        let servers: Option<Duration> = servers.iter().map(|s| s.cpu_time()).sum();
        (servers, procs::cpu_time_of("self"))
    };
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
    use keylease_engine::{AcquireRequest, Acquired, Command, Engine, Setup, Usage};
    let settings =
        keylease_server::config::load(Some(config), &Default::default(), &Default::default())?;
    let clock = keylease_server::clock::Clock::system();
    let setup = Setup::new(settings.engine, settings.keys, 0);
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
        call_duration: None,
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
/// all alike.
const ROUNDS: usize = 5;

/// The same configuration served twice: in memory only, and on the durable default.
struct Servers {
    ephemeral: procs::Child,
    durable: procs::Child,
    /// The durable server's store counters, as it last printed them.
    journal: procs::JournalCounts,
}

/// Cycles on each server and no-ops (on the ephemeral one), over the same rounds.
struct Measured {
    ephemeral: Samples,
    durable: Samples,
    noops: Samples,
    /// The durable server's commits and records over its rounds.
    commits: u64,
    records: u64,
    commit_micros: u64,
}

/// `rounds` rounds of `round` each of ephemeral cycles, durable cycles and no-ops, in turn.
async fn in_turn(
    servers: &mut Servers,
    clients: usize,
    rounds: usize,
    round: Duration,
    pace: Pace,
) -> anyhow::Result<Measured> {
    let before = servers.journal.read(&servers.durable).await;
    let mut measured = Measured {
        ephemeral: Samples::default(),
        durable: Samples::default(),
        noops: Samples::default(),
        commits: 0,
        records: 0,
        commit_micros: 0,
    };
    for _ in 0..rounds {
        let ephemeral = measure(&servers.ephemeral, clients, round, pace, cycle).await?;
        measured.ephemeral.add(ephemeral);
        let durable = measure(&servers.durable, clients, round, pace, cycle).await?;
        measured.durable.add(durable);
        let noops = measure(&servers.ephemeral, clients, round, pace, noop).await?;
        measured.noops.add(noops);
    }
    let after = servers.journal.read(&servers.durable).await;
    measured.commits = after.0 - before.0;
    measured.records = after.1 - before.1;
    measured.commit_micros = after.2 - before.2;
    Ok(measured)
}

/// The lease cycle on the ephemeral server against the same server with `[tenants]` (every
/// acquire then decided for a tenant and made for it), 16 clients, taken in turn.
async fn with_and_without_tenants(
    dir: &std::path::Path,
    keys: &[(String, String, String)],
    without: &procs::Child,
    rounds: usize,
    round: Duration,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("tenants"))?;
    let config = procs::keylease_config(
        &dir.join("tenants"),
        keys,
        MODEL,
        "",
        "[state]\nephemeral = true\n\n[tenants.anonymous]\nshare = 3\npriority = \"interactive\"",
    )?;
    let with = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let (mut none, mut some) = (Samples::default(), Samples::default());
    for _ in 0..rounds {
        none.add(measure(without, 16, round, Pace::Closed, cycle).await?);
        some.add(measure(&with, 16, round, Pace::Closed, cycle).await?);
    }
    println!(
        "\nWith `[tenants]` (each acquire decided for a tenant and made for it), 16 clients, taken in turn: {:.0} cycles/s without, {:.0} with ({:.3} of without).",
        none.per_second(),
        some.per_second(),
        some.per_second() / none.per_second()
    );
    Ok(())
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let dir = procs::scratch("overhead")?;
    // More keys than clients, no limits: the cycle measures the service, not contention.
    let keys = procs::fake_keys(512, 512);
    std::fs::create_dir_all(dir.join("ephemeral"))?;
    std::fs::create_dir_all(dir.join("durable"))?;
    let ephemeral_config = procs::keylease_config(
        &dir.join("ephemeral"),
        &keys,
        MODEL,
        "",
        "[state]\nephemeral = true",
    )?;
    let durable_config = procs::keylease_config(&dir.join("durable"), &keys, MODEL, "", "")?;
    let serve = |config: &std::path::Path| {
        procs::spawn(&["serve".into(), config.display().to_string()], true)
    };
    let mut servers = Servers {
        ephemeral: serve(&ephemeral_config)?,
        durable: serve(&durable_config)?,
        journal: procs::JournalCounts::default(),
    };
    let (rounds, round) = if smoke {
        (1, Duration::from_millis(500))
    } else {
        (ROUNDS, Duration::from_secs(1))
    };
    let state_dir = dir.join("durable").join("keylease-state");
    println!("\n### Overhead, in memory and durable\n");
    println!(
        "`cargo run --release -p keylease-bench -- overhead`; per row {rounds} rounds of {} ms each of cycles on an ephemeral server, cycles on a durable one (state in `{}`, {}), and no-ops, taken in turn; the load from this one process. `commits/s` and `records per commit` are the durable store's own counters.\n",
        round.as_millis(),
        state_dir.display(),
        procs::file_system_of(&state_dir)
    );
    let (fsync_p50, fsync_p99) =
        procs::fsync_latency(&dir.join("durable"), if smoke { 20 } else { 500 })?;
    println!(
        "Raw latency of that disk: write 4 KiB + fdatasync, p50 {fsync_p50} µs, p99 {fsync_p99} µs.\n"
    );
    println!(
        "| clients | store | cycles/s | cycle p50 | p99 | p99.9 | no-op RPC/s | cycles / no-op | commits/s | records per commit | time per commit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cpu_rows = Vec::new();
    let mut ratios = Vec::new();
    let mut closed_loop_16 = (0.0, 0.0);
    for clients in [1, 16, 256] {
        let mut m = in_turn(&mut servers, clients, rounds, round, Pace::Closed).await?;
        let durable_time = round.as_secs_f64() * rounds as f64;
        let noops_per_second = m.noops.per_second();
        for (store, cycles) in [("ephemeral", &mut m.ephemeral), ("durable", &mut m.durable)] {
            let (commits, per_commit, commit_time) = if store == "durable" {
                let commits = m.commits.max(1) as f64;
                (
                    format!("{:.0}", m.commits as f64 / durable_time),
                    format!("{:.1}", m.records as f64 / commits),
                    format!("{:.0} µs", m.commit_micros as f64 / commits),
                )
            } else {
                Default::default()
            };
            println!(
                "| {clients} | {store} | {:.0} | {} µs | {} µs | {} µs | {:.0} | {:.3} | {commits} | {per_commit} | {commit_time} |",
                cycles.per_second(),
                cycles.percentile(0.5),
                cycles.percentile(0.99),
                cycles.percentile(0.999),
                noops_per_second,
                cycles.per_second() / noops_per_second
            );
        }
        if clients == 16 {
            closed_loop_16 = (m.ephemeral.per_second(), m.durable.per_second());
        }
        ratios.push((clients, m.durable.per_second() / m.ephemeral.per_second()));
        cpu_rows.push((
            clients,
            m.ephemeral.cpu_per_call(),
            m.durable.cpu_per_call(),
            m.noops.cpu_per_call(),
        ));
    }
    let ratios: Vec<String> = ratios
        .iter()
        .map(|(clients, ratio)| format!("{ratio:.2} at {clients}"))
        .collect();
    println!(
        "\nDurable cycles / ephemeral cycles, same run: {}.",
        ratios.join(", ")
    );
    println!("\nCPU per call, in µs (user + system, from /proc; the load is this process):\n");
    println!(
        "| clients | server per ephemeral cycle | server per durable cycle | server per no-op | load per cycle | load per no-op | whole ephemeral cycle / whole no-op |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (clients, ephemeral, durable, noop) in cpu_rows {
        println!(
            "| {clients} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            ephemeral.0,
            durable.0,
            noop.0,
            ephemeral.1,
            noop.1,
            (ephemeral.0 + ephemeral.1) / (noop.0 + noop.1)
        );
    }

    println!(
        "\nLatency at a set load: 16 clients, each on a fixed schedule, together offering a share of each store's closed-loop rate above ({:.0} and {:.0} cycles/s); a call sent late because the previous one had not returned counts from when it was due. The no-op is offered the ephemeral rate.\n",
        closed_loop_16.0, closed_loop_16.1
    );
    println!("| offered | store | cycles/s | cycle p50 | p99 | p99.9 | no-op p50 | p99 | p99.9 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for share in [0.25, 0.5, 0.75] {
        for (store, closed) in [
            ("ephemeral", closed_loop_16.0),
            ("durable", closed_loop_16.1),
        ] {
            let rate = (closed * share).max(16.0);
            let pace = Pace::Every(Duration::from_secs_f64(16.0 / rate));
            let mut m = in_turn(&mut servers, 16, rounds, round, pace).await?;
            let cycles = if store == "durable" {
                &mut m.durable
            } else {
                &mut m.ephemeral
            };
            println!(
                "| {:.0}% | {store} | {:.0} | {} µs | {} µs | {} µs | {} µs | {} µs | {} µs |",
                share * 100.0,
                cycles.per_second(),
                cycles.percentile(0.5),
                cycles.percentile(0.99),
                cycles.percentile(0.999),
                m.noops.percentile(0.5),
                m.noops.percentile(0.99),
                m.noops.percentile(0.999),
            );
        }
    }
    let server = &servers.ephemeral;
    println!(
        "\nServer peak memory: {:.0} MiB ephemeral, {:.0} MiB durable.",
        server.peak_memory_mib().unwrap_or(0.0),
        servers.durable.peak_memory_mib().unwrap_or(0.0)
    );
    with_and_without_tenants(&dir, &keys, &servers.ephemeral, rounds, round).await?;
    let engine = engine_alone(&ephemeral_config, if smoke { 20_000 } else { 1_000_000 })?;
    println!(
        "\nThe engine alone, in this process without gRPC: {engine:.0} AcquireKey+Release cycles/s on one core."
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
