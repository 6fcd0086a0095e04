//! Scenario: what the Gemini-compatible proxy adds to a call. Closed-loop callers post
//! `generateContent` (or its server-sent-event stream) to the fake Gemini directly, and the same
//! through keylease's proxy (a lease per call: acquire, send, release), at 1, 16 and 64
//! concurrent callers, with the fake answering at once and after 50 ms; keylease ephemeral and
//! durable. Each round runs the three targets in turn, so slow phases of the machine hit all.

use crate::procs;
use crate::roles::now;
use std::time::Duration;

const MODEL: &str = "bench-model";
/// Keys enough that 64 callers never wait for one another's key.
const KEYS: usize = 128;

/// Where a call goes.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Ephemeral,
    Durable,
}

struct Samples {
    latencies: Vec<u64>,
    elapsed: Duration,
}

impl Samples {
    fn new() -> Self {
        Self {
            latencies: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile(&mut self, p: f64) -> u64 {
        self.latencies.sort_unstable();
        procs::percentile(&self.latencies, p)
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

    let mut proxies = Vec::new();
    for (name, state) in [
        ("ephemeral", "[state]\nephemeral = true\n"),
        ("durable", ""),
    ] {
        let server_dir = dir.join(name);
        std::fs::create_dir_all(&server_dir)?;
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
        let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
        let proxy = server.proxy_url()?;
        proxies.push((server, proxy));
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
        "| fake latency | call | callers | direct p50 / p99 ms | direct calls/s | proxy p50 / p99 ms (ephemeral) | added p50 ms | calls/s, × direct | durable p50 / p99 ms | durable calls/s, × direct |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for latency_ms in [0u64, 50] {
        http.post(format!("{}/_fake/faults", fake.address))
            .json(&serde_json::json!({"latency_ms": latency_ms}))
            .send()
            .await?
            .error_for_status()?;
        for stream in [false, true] {
            for callers in [1usize, 16, 64] {
                let mut measured = [Samples::new(), Samples::new(), Samples::new()];
                for _ in 0..rounds {
                    for (slot, target) in [Target::Direct, Target::Ephemeral, Target::Durable]
                        .into_iter()
                        .enumerate()
                    {
                        let base = match target {
                            Target::Direct => fake.address.clone(),
                            Target::Ephemeral => proxies[0].1.clone(),
                            Target::Durable => proxies[1].1.clone(),
                        };
                        let samples =
                            measure(&http, &base, target, &keys, stream, callers, round).await?;
                        measured[slot].latencies.extend(samples.latencies);
                        measured[slot].elapsed += samples.elapsed;
                    }
                }
                let [mut direct, mut ephemeral, mut durable] = measured;
                let ms = |us: u64| us as f64 / 1000.0;
                let (d50, d99) = (direct.percentile(0.5), direct.percentile(0.99));
                let (e50, e99) = (ephemeral.percentile(0.5), ephemeral.percentile(0.99));
                let (s50, s99) = (durable.percentile(0.5), durable.percentile(0.99));
                println!(
                    "| {latency_ms} ms | {} | {callers} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:+.2} | {:.0}, {:.2} | {:.2} / {:.2} | {:.0}, {:.2} |",
                    if stream { "stream (SSE)" } else { "generate" },
                    ms(d50),
                    ms(d99),
                    direct.per_second(),
                    ms(e50),
                    ms(e99),
                    ms(e50) - ms(d50),
                    ephemeral.per_second(),
                    ephemeral.per_second() / direct.per_second(),
                    ms(s50),
                    ms(s99),
                    durable.per_second(),
                    durable.per_second() / direct.per_second(),
                );
            }
        }
    }
    drop(proxies);
    drop(fake);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `callers` closed loops posting to `base` for `duration`; each direct caller holds a key of
/// its own, as a worker with a key would.
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
        let key = if target == Target::Direct {
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
