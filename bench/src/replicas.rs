//! Scenario: replicas on Redis. AcquireKey+Release cycles per second and their latency at 16
//! and 64 clients on the embedded store (one server), on one replica on Redis, on three
//! replicas with the clients spread over all three (two thirds of the calls through followers,
//! which forward them to the leader), and on three replicas whose Redis fsyncs its append-only
//! file once a second instead of at every write (what `appendfsync always` costs); then the
//! failover time: the leader killed (SIGKILL) → the first grant by the new leader, asked
//! through a surviving replica.

use crate::overhead::{Pace, Samples, cycle, measure_spread};
use crate::procs::{self, Child};
use crate::roles::now;
use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use keylease_test_kits::RedisServer;
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;

const MODEL: &str = "bench-model";
const TOKEN: &str = "bench-replication-token-0123456789";

/// What one deployment's rounds add up to.
#[derive(Default)]
struct Totals {
    samples: Samples,
    redis_cpu: Duration,
    followers_cpu: Duration,
    /// Batches appended (one XADD each), and the records in them.
    appends: u64,
    records: u64,
}

/// One deployment: its name, its servers, and the Redis it uses (none: embedded).
struct Deployment<'a> {
    name: &'static str,
    /// Its keys' prefix in Redis.
    namespace: &'static str,
    servers: Vec<Child>,
    /// Each server's configuration, in the same order.
    configs: Vec<std::path::PathBuf>,
    redis: Option<&'a RedisServer>,
}

fn replica_config(
    dir: &Path,
    keys: &[(String, String, String)],
    redis: &RedisServer,
    namespace: &str,
) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    procs::keylease_config(
        dir,
        keys,
        MODEL,
        "",
        &format!(
            "[state]\nstore = \"{}\"\n[replication]\ntoken = \"{TOKEN}\"\nnamespace = \"{namespace}\"",
            redis.url()
        ),
    )
}

fn start_replica(config: &Path) -> anyhow::Result<Child> {
    procs::spawn(&["replica".into(), config.display().to_string()], true)
}

/// Waits until `server` lends a key (a leader is elected and serves through it).
async fn until_serving(server: &Child, limit: Duration) -> anyhow::Result<Duration> {
    let began = now();
    loop {
        let served = async {
            let channel = Channel::from_shared(server.address.clone())?
                .connect()
                .await?;
            let mut client = KeyLeaseClient::new(channel);
            let lease = client
                .acquire_key(pb::AcquireKeyRequest {
                    task_id: "bench-probe".into(),
                    model: MODEL.into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            client
                .release(pb::ReleaseRequest {
                    lease_id: lease.lease_id,
                    fencing_token: lease.fencing_token,
                    requests_sent: Some(0),
                    input_tokens: Some(0),
                    call_duration: None,
                })
                .await?;
            anyhow::Ok(())
        };
        if served.await.is_ok() {
            return Ok(began.elapsed());
        }
        if began.elapsed() > limit {
            anyhow::bail!("{} did not serve within {limit:?}", server.address);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Which of `servers` leads, by Redis's leadership key of `namespace`.
fn leader_of(redis: &RedisServer, namespace: &str, servers: &[Child]) -> Option<usize> {
    let mut connection = redis.connection();
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{{{namespace}}}:leader"))
        .query(&mut connection)
        .ok()?;
    let address = value?.split(' ').nth(2)?.to_string();
    servers
        .iter()
        .position(|s| s.address == format!("http://{address}"))
}

/// The last record of a namespace's log (its position is `SEQ CHAIN`).
fn last_record(redis: &RedisServer, namespace: &str) -> u64 {
    redis::cmd("GET")
        .arg(format!("{{{namespace}}}:last"))
        .query::<Option<String>>(&mut redis.connection())
        .ok()
        .flatten()
        .and_then(|position| position.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Calls of each kind Redis answered so far (`INFO commandstats`).
fn redis_calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let dir = procs::scratch("replicas")?;
    let keys = procs::fake_keys(512, 512);
    let always = RedisServer::start();
    let everysec = RedisServer::start_with_fsync("everysec");
    std::fs::create_dir_all(dir.join("embedded"))?;
    let embedded_config = procs::keylease_config(&dir.join("embedded"), &keys, MODEL, "", "")?;
    let one_config = replica_config(&dir.join("one"), &keys, &always, "one")?;
    let mut deployments = vec![
        Deployment {
            name: "embedded",
            namespace: "",
            servers: vec![procs::spawn(
                &["serve".into(), embedded_config.display().to_string()],
                true,
            )?],
            configs: vec![embedded_config],
            redis: None,
        },
        Deployment {
            name: "1 replica",
            namespace: "one",
            servers: vec![start_replica(&one_config)?],
            configs: vec![one_config],
            redis: Some(&always),
        },
    ];
    for (name, redis, namespace) in [
        ("3 replicas", &always, "three"),
        (
            "3 replicas, Redis fsync every second",
            &everysec,
            "everysec",
        ),
    ] {
        let (mut servers, mut configs) = (Vec::new(), Vec::new());
        for n in 0..3 {
            let config = replica_config(
                &dir.join(format!("{namespace}-{n}")),
                &keys,
                redis,
                namespace,
            )?;
            servers.push(start_replica(&config)?);
            configs.push(config);
        }
        deployments.push(Deployment {
            name,
            namespace,
            servers,
            configs,
            redis: Some(redis),
        });
    }
    for deployment in &deployments {
        for server in &deployment.servers {
            until_serving(server, Duration::from_secs(30)).await?;
        }
    }

    let (rounds, round) = if smoke {
        (1, Duration::from_millis(500))
    } else {
        (5, Duration::from_secs(1))
    };
    println!("\n### Replicas on Redis\n");
    println!(
        "`cargo run --release -p keylease-bench -- replicas`; per row {rounds} rounds of {} ms of AcquireKey+Release cycles on each deployment in turn; the load from this one process, its clients spread over the deployment's replicas (two thirds through followers with 3). Redis {} ({}), append-only file fsync'd always, except where the row says; the embedded store on the same disk. `Redis CPU` comes from the Redis process; `records per append` from `INFO commandstats` (one XADD per batch the leader appends, by an epoch-checked script) and the log's last record number. `of which followers`: the CPU of the replicas that did not lead (forwarding and replaying the log).\n",
        round.as_millis(),
        redis_version(&always),
        procs::file_system_of(always.dir())
    );
    println!(
        "| clients | deployment | cycles/s | vs embedded | cycle p50 | p99 | p99.9 | keylease CPU per cycle | of which followers | Redis CPU per cycle | records per append |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for clients in [16, 64] {
        let mut measured: Vec<Totals> = deployments.iter().map(|_| Totals::default()).collect();
        for _ in 0..rounds {
            for (deployment, totals) in deployments.iter().zip(&mut measured) {
                let redis_pid = deployment.redis.and_then(RedisServer::pid);
                let redis_cpu = || {
                    redis_pid
                        .and_then(|pid| procs::cpu_time_of(&pid.to_string()))
                        .unwrap_or_default()
                };
                let calls = |command| deployment.redis.map_or(0, |r| redis_calls(r, command));
                let leader = deployment
                    .redis
                    .and_then(|r| leader_of(r, deployment.namespace, &deployment.servers));
                let followers_cpu = || -> Duration {
                    (deployment.servers.iter().enumerate())
                        .filter(|(i, _)| Some(*i) != leader)
                        .filter_map(|(_, s)| s.cpu_time())
                        .sum()
                };
                let last = || {
                    deployment
                        .redis
                        .map_or(0, |r| last_record(r, deployment.namespace))
                };
                let before = (redis_cpu(), calls("xadd"), last(), followers_cpu());
                let servers: Vec<&Child> = deployment.servers.iter().collect();
                let samples = measure_spread(&servers, clients, round, Pace::Closed, cycle).await?;
                totals.samples.add(samples);
                totals.redis_cpu += redis_cpu().saturating_sub(before.0);
                totals.appends += calls("xadd").saturating_sub(before.1);
                totals.records += last().saturating_sub(before.2);
                if leader.is_some() && deployment.servers.len() > 1 {
                    totals.followers_cpu += followers_cpu().saturating_sub(before.3);
                }
            }
        }
        let embedded = measured[0].samples.per_second();
        for (deployment, totals) in deployments.iter().zip(&mut measured) {
            let samples = &mut totals.samples;
            let cycles = samples.per_second();
            let count = (cycles * round.as_secs_f64() * rounds as f64).max(1.0);
            let per_cycle = |cpu: Duration| format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / count);
            let (redis, per_append) = match deployment.redis {
                Some(_) => (
                    per_cycle(totals.redis_cpu),
                    format!(
                        "{:.1}",
                        totals.records as f64 / totals.appends.max(1) as f64
                    ),
                ),
                None => Default::default(),
            };
            let followers = match deployment.servers.len() {
                1 => String::new(),
                _ => per_cycle(totals.followers_cpu),
            };
            println!(
                "| {clients} | {} | {cycles:.0} | {:.2} | {} µs | {} µs | {} µs | {:.0} µs | {followers} | {redis} | {per_append} |",
                deployment.name,
                cycles / embedded,
                samples.percentile(0.5),
                samples.percentile(0.99),
                samples.percentile(0.999),
                samples.cpu_per_call().0,
            );
            if deployment.name == "3 replicas" {
                ratios.push(format!("{:.2} at {clients}", cycles / embedded));
            }
        }
    }
    println!(
        "\n3 replicas on Redis (fsync always) / embedded, same run: {}.",
        ratios.join(", ")
    );

    // Failover, on the three replicas whose Redis fsyncs always: killed and stopped in turn.
    let fleet = &mut deployments[2];
    println!(
        "\nFailover: the leader killed with SIGKILL, or stopped with SIGTERM (it finishes its calls, writes its last snapshot and resigns), then AcquireKey every 5 ms through a surviving replica until one is granted (default settings: leader_ttl 2 s, max_clock_skew 500 ms). The two alternate in one run.\n"
    );
    println!("| try | leader SIGKILL → first grant | leader SIGTERM → first grant |");
    println!("|---|---|---|");
    for attempt in 1..=(if smoke { 1 } else { 5 }) {
        let mut took = Vec::new();
        for stop in ["SIGKILL", "SIGTERM"] {
            let Some(leader) = leader_of(&always, "three", &fleet.servers) else {
                anyhow::bail!("no leader among the three replicas");
            };
            let config = fleet.configs.remove(leader);
            let stopped = fleet.servers.remove(leader);
            // Dropped, it is killed; stopped, it is left to finish and then waited for.
            let stopping = if stop == "SIGTERM" {
                stopped.terminate()?;
                Some(stopped)
            } else {
                drop(stopped);
                None
            };
            let survivor = &fleet.servers[0];
            took.push(until_serving(survivor, Duration::from_secs(30)).await?);
            if let Some(stopping) = stopping {
                let status = stopping.wait(Duration::from_secs(30))?;
                anyhow::ensure!(status.success(), "the leader stopped with {status}");
            }
            fleet.servers.push(start_replica(&config)?);
            fleet.configs.push(config);
            until_serving(
                fleet.servers.last().expect("started"),
                Duration::from_secs(30),
            )
            .await?;
        }
        println!(
            "| {attempt} | {} ms | {} ms |",
            took[0].as_millis(),
            took[1].as_millis()
        );
    }
    drop(deployments);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn redis_version(redis: &RedisServer) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut redis.connection())
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map_or_else(|| "?".into(), |v| v.trim().to_string())
}
