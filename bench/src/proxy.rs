//! Scenario: what the Gemini-compatible proxy adds to a call. Closed-loop callers post
//! `generateContent` (or its server-sent-event stream) to the fake Gemini directly, and the same
//! through keylease's embedded proxy (a lease per call: acquire, send, release), at 1, 16 and
//! 64 concurrent callers, with the fake answering at once and after 50 ms; keylease ephemeral
//! and durable, its proxy leasing in process (a single server's way) and over its own gRPC
//! service (the way before, and a replica's); and, as the floor of any proxy on keylease's
//! stack, a plain pass-through proxy that leases nothing. Each round runs the targets in turn,
//! so slow phases of the machine hit all; each process's CPU time is read around each target's
//! turn.

use crate::procs;
use crate::roles::now;
use std::time::Duration;

const MODEL: &str = "bench-model";
/// Keys enough that 64 callers never wait for one another's key.
const KEYS: usize = 128;

/// Where a call goes: the fake itself, a plain proxy in front of it, or one of keylease's.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    /// What a proxy hop costs at the least on keylease's stack (`roles::pass_through`).
    PassThrough,
    Proxy {
        durable: bool,
        over_grpc: bool,
    },
}

impl Target {
    const ALL: [Target; 6] = [
        Target::Direct,
        Target::PassThrough,
        Target::Proxy {
            durable: false,
            over_grpc: false,
        },
        Target::Proxy {
            durable: false,
            over_grpc: true,
        },
        Target::Proxy {
            durable: true,
            over_grpc: false,
        },
        Target::Proxy {
            durable: true,
            over_grpc: true,
        },
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::PassThrough => "plain pass-through, no lease",
            Target::Proxy {
                durable: false,
                over_grpc: false,
            } => "ephemeral, in process",
            Target::Proxy {
                durable: false,
                over_grpc: true,
            } => "ephemeral, over gRPC",
            Target::Proxy {
                durable: true,
                over_grpc: false,
            } => "durable, in process",
            Target::Proxy {
                durable: true,
                over_grpc: true,
            } => "durable, over gRPC",
        }
    }
}

struct Samples {
    latencies: Vec<u64>,
    elapsed: Duration,
    /// The proxying server's CPU time over the turns measured.
    server_cpu: Duration,
    /// The fake Gemini's and this process's (the callers') CPU time over the same turns: with
    /// every process on one core, a target's rate is one over the sum of the three per call.
    fake_cpu: Duration,
    callers_cpu: Duration,
}

impl Samples {
    fn new() -> Self {
        Self {
            latencies: Vec::new(),
            elapsed: Duration::ZERO,
            server_cpu: Duration::ZERO,
            fake_cpu: Duration::ZERO,
            callers_cpu: Duration::ZERO,
        }
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile(&mut self, p: f64) -> u64 {
        self.latencies.sort_unstable();
        procs::percentile(&self.latencies, p)
    }

    /// `cpu` per call, in µs.
    fn per_call(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.latencies.len().max(1) as f64
    }
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let dir = procs::scratch("proxy")?;
    let keys = procs::fake_keys(KEYS, 16);
    let fake_config = serde_json::json!({
        "keys": keys.iter().map(|(id, project, secret)| serde_json::json!({
            "id": id, "secret": secret, "project": project,
        })).collect::<Vec<_>>(),
        "models": {MODEL: {}},
    });
    let fake_path = dir.join("fake.json");
    std::fs::write(&fake_path, fake_config.to_string())?;
    let fake = procs::spawn(&["fake".into(), fake_path.display().to_string()], true)?;

    // Each target's process and address, in the order of `Target::ALL` (none for `Direct`).
    let mut proxies: Vec<Option<(procs::Child, String)>> = Vec::new();
    for target in &Target::ALL {
        let (durable, over_grpc) = match *target {
            Target::Direct => {
                proxies.push(None);
                continue;
            }
            Target::PassThrough => {
                let args = ["pass-through".to_string(), fake.address.clone()];
                let proxy = procs::spawn(&args, true)?;
                let address = proxy.address.clone();
                proxies.push(Some((proxy, address)));
                continue;
            }
            Target::Proxy { durable, over_grpc } => (durable, over_grpc),
        };
        let server_dir = dir.join(target.name().replace([',', ' '], "-"));
        std::fs::create_dir_all(&server_dir)?;
        let state = if durable {
            ""
        } else {
            "[state]\nephemeral = true\n"
        };
        let extra = format!(
            "{state}\n[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            fake.address
        );
        let config = procs::keylease_config(
            &server_dir,
            &keys,
            MODEL,
            "requests_per_minute = 100000000",
            &extra,
        )?;
        let mut args = vec!["serve".to_string(), config.display().to_string()];
        if over_grpc {
            args.push("--over-grpc".into());
        }
        let server = procs::spawn(&args, true)?;
        let proxy = server.proxy_url()?;
        proxies.push(Some((server, proxy)));
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let (round, rounds) = if smoke {
        (Duration::from_millis(200), 1)
    } else {
        (Duration::from_secs(2), 3)
    };
    println!();
    println!("### Gemini-compatible proxy");
    println!();
    println!(
        "| fake latency | call | callers | target | p50 / p99 ms | added p50 ms | calls/s | × direct | CPU per call: callers / server / fake |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for latency_ms in [0u64, 50] {
        http.post(format!("{}/_fake/faults", fake.address))
            .json(&serde_json::json!({"latency_ms": latency_ms}))
            .send()
            .await?
            .error_for_status()?;
        for stream in [false, true] {
            for callers in [1usize, 16, 64] {
                let mut measured: Vec<Samples> =
                    Target::ALL.iter().map(|_| Samples::new()).collect();
                for _ in 0..rounds {
                    for (slot, &target) in Target::ALL.iter().enumerate() {
                        let (base, server) = match &proxies[slot] {
                            None => (fake.address.clone(), None),
                            Some((server, address)) => (address.clone(), Some(server)),
                        };
                        let cpu = || {
                            (
                                server.and_then(|s| s.cpu_time()),
                                fake.cpu_time(),
                                procs::cpu_time_of("self"),
                            )
                        };
                        let before = cpu();
                        let samples =
                            measure(&http, &base, target, &keys, stream, callers, round).await?;
                        let after = cpu();
                        let spent = |before: Option<Duration>, after: Option<Duration>| {
                            after
                                .zip(before)
                                .map_or(Duration::ZERO, |(a, b)| a.saturating_sub(b))
                        };
                        measured[slot].server_cpu += spent(before.0, after.0);
                        measured[slot].fake_cpu += spent(before.1, after.1);
                        measured[slot].callers_cpu += spent(before.2, after.2);
                        measured[slot].latencies.extend(samples.latencies);
                        measured[slot].elapsed += samples.elapsed;
                    }
                }
                let ms = |us: u64| us as f64 / 1000.0;
                let direct_p50 = ms(measured[0].percentile(0.5));
                let direct_rate = measured[0].per_second();
                let call = if stream { "stream (SSE)" } else { "generate" };
                for (slot, target) in Target::ALL.iter().enumerate() {
                    let samples = &mut measured[slot];
                    let (p50, p99) = (ms(samples.percentile(0.5)), ms(samples.percentile(0.99)));
                    let added = match target {
                        Target::Direct => String::new(),
                        _ => format!("{:+.2}", p50 - direct_p50),
                    };
                    let cpu = format!(
                        "{:.0} / {:.0} / {:.0} µs",
                        samples.per_call(samples.callers_cpu),
                        samples.per_call(samples.server_cpu),
                        samples.per_call(samples.fake_cpu),
                    );
                    println!(
                        "| {latency_ms} ms | {call} | {callers} | {} | {p50:.2} / {p99:.2} | {added} | {:.0} | {:.2} | {cpu} |",
                        target.name(),
                        samples.per_second(),
                        samples.per_second() / direct_rate,
                    );
                }
            }
        }
    }
    drop(proxies);
    drop(fake);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `callers` closed loops posting to `base` for `duration`; each caller past no lease (direct,
/// or through the plain proxy) holds a key of its own, as a worker with a key would.
async fn measure(
    http: &reqwest::Client,
    base: &str,
    target: Target,
    keys: &[(String, String, String)],
    stream: bool,
    callers: usize,
    duration: Duration,
) -> anyhow::Result<Samples> {
    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    let url = format!("{base}/v1beta/models/{MODEL}:{method}");
    let body = serde_json::json!({"contents": [{"parts": [{"text": "A prompt of a few words."}]}]})
        .to_string();
    let began = now();
    let stop = began + duration;
    let mut loops = Vec::new();
    for caller in 0..callers {
        let key = if matches!(target, Target::Direct | Target::PassThrough) {
            keys[caller % keys.len()].2.clone()
        } else {
            "bench".to_string()
        };
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while now() < stop {
                let sent = now();
                let response = http
                    .post(&url)
                    .header("x-goog-api-key", &key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status();
                let answer = response.bytes().await?;
                anyhow::ensure!(
                    status.is_success(),
                    "{status}: {}",
                    String::from_utf8_lossy(&answer)
                );
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut samples = Samples::new();
    for handle in loops {
        samples.latencies.extend(handle.await??);
    }
    samples.elapsed = began.elapsed();
    Ok(samples)
}
