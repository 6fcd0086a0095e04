//! Scenario: what checking keys (`[health]`) saves and costs. A fleet of 12 keys of which 3 are
//! dead at start (expired, leaked, project suspended) serves 300 calls through keylease's
//! proxy, 16 at a time, without and with checks: the calls the fake Gemini answered on a dead
//! key are the calls wasted. Then, with 1,000 healthy keys, without and with checks (each a
//! read of a model, 8 at once), in turn, three times: the time from start to the first grant,
//! and to every key checked (none left `CHECKING`).

use crate::procs;
use crate::roles::now;
use fake_gemini::{FakeConfig, FakeGemini, FakeKey, KeyHealth, RunningFake};
use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use std::time::Duration;

const MODEL: &str = "bench-model";
const DEAD: [(usize, KeyHealth); 3] = [
    (3, KeyHealth::Expired),
    (7, KeyHealth::Leaked),
    (11, KeyHealth::Suspended),
];

async fn start_fake(keys: &[(String, String, String)], dead: bool) -> anyhow::Result<RunningFake> {
    Ok(FakeGemini::start(FakeConfig {
        keys: keys
            .iter()
            .enumerate()
            .map(|(i, (id, project, secret))| FakeKey {
                id: id.clone(),
                secret: secret.clone(),
                project: project.clone(),
                health: DEAD
                    .iter()
                    .find(|(at, _)| dead && *at == i)
                    .map_or(KeyHealth::Healthy, |(_, health)| *health),
            })
            .collect(),
        models: [(MODEL.to_string(), Default::default())].into(),
        projects: Default::default(),
        time_scale: 1.0,
        faults: Default::default(),
        seed: 11,
    })
    .await?)
}

/// A keylease server of `keys` whose proxy and checks (when `checked`) call `upstream`.
fn serve(
    dir: &std::path::Path,
    keys: &[(String, String, String)],
    upstream: &str,
    checked: bool,
) -> anyhow::Result<procs::Child> {
    let health = if checked {
        format!("[health]\nupstream = \"{upstream}\"\n")
    } else {
        String::new()
    };
    let config = procs::keylease_config(
        dir,
        keys,
        MODEL,
        "",
        &format!(
            "[state]\nephemeral = true\n[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{health}"
        ),
    )?;
    procs::spawn(&["serve".into(), config.display().to_string()], true)
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let (calls, startup_keys, rounds) = if smoke { (40, 50, 1) } else { (300, 1_000, 3) };
    println!("\n### Keys checked with the provider (`[health]`)\n");
    println!(
        "`cargo run --release -p keylease-bench -- health`; {}.\n",
        procs::machine()
    );
    println!(
        "12 keys in 4 projects, 3 dead at start (expired, leaked, project suspended); {calls} calls through the proxy, 16 at a time, ephemeral. Wasted: calls the fake answered on a dead key.\n"
    );
    println!(
        "| checks | calls answered 200 | calls on dead keys (wasted) | checks made | first call after start |"
    );
    println!("|---|---|---|---|---|");
    let keys = procs::fake_keys(12, 4);
    for checked in [false, true] {
        let dir = procs::scratch("health")?;
        let fake = start_fake(&keys, true).await?;
        let started = now();
        let server = serve(&dir, &keys, &fake.base_url(), checked)?;
        let proxy = server.proxy_url()?;
        let http = reqwest::Client::new();
        let url = format!("{proxy}/v1beta/models/{MODEL}:generateContent");
        let first = {
            let answer = call(&http, &url, 0).await?;
            anyhow::ensure!(answer == 200, "the first call answered {answer}");
            started.elapsed()
        };
        let mut waves = Vec::new();
        for worker in 0..16 {
            let http = http.clone();
            let url = url.clone();
            waves.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                for n in (worker..calls).step_by(16) {
                    codes.push(call(&http, &url, n + 1).await);
                }
                codes
            }));
        }
        for wave in waves {
            for code in wave.await? {
                code?;
            }
        }
        let stats = fake.fake.stats();
        let wasted: u64 = DEAD
            .iter()
            .map(|(at, _)| stats.keys[&keys[*at].0].total())
            .sum();
        let probes: u64 = stats.keys.values().map(|c| c.probes).sum();
        println!(
            "| {} | {} | {wasted} | {probes} | {:.0} ms |",
            if checked { "on" } else { "off" },
            stats.all().status(200),
            first.as_secs_f64() * 1_000.0
        );
        drop(server);
        let _ = std::fs::remove_dir_all(dir);
    }

    println!(
        "\nStart to the first grant (AcquireKey waiting up to 60 s), and to every key checked, with {startup_keys} healthy keys, ephemeral; the rounds alternate.\n"
    );
    println!("| round | first grant, checks off | first grant, checks on | every key checked |");
    println!("|---|---|---|---|");
    let keys = procs::fake_keys(startup_keys, startup_keys / 4);
    let fake = start_fake(&keys, false).await?;
    for round in 1..=rounds {
        let mut took = [Duration::ZERO; 2];
        let mut all_checked = Duration::ZERO;
        for (i, checked) in [false, true].into_iter().enumerate() {
            let dir = procs::scratch("health-start")?;
            let started = now();
            let server = serve(&dir, &keys, &fake.base_url(), checked)?;
            let mut client = KeyLeaseClient::connect(server.address.clone()).await?;
            client
                .acquire_key(pb::AcquireKeyRequest {
                    task_id: "first".into(),
                    model: MODEL.into(),
                    wait: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await?;
            took[i] = started.elapsed();
            if checked {
                loop {
                    let status = client
                        .get_status(pb::GetStatusRequest {
                            page_size: 10_000,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    if status
                        .keys
                        .iter()
                        .all(|k| k.state() != pb::KeyState::Checking)
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                all_checked = started.elapsed();
            }
            drop(server);
            let _ = std::fs::remove_dir_all(dir);
        }
        println!(
            "| {round} | {:.0} ms | {:.0} ms | {:.0} ms |",
            took[0].as_secs_f64() * 1_000.0,
            took[1].as_secs_f64() * 1_000.0,
            all_checked.as_secs_f64() * 1_000.0
        );
    }
    Ok(())
}

/// One `generateContent` through the proxy: its HTTP status.
async fn call(http: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<u16> {
    let answer = http
        .post(url)
        .header("x-goog-api-key", "bench")
        .header("x-keylease-task", format!("call-{n}"))
        .json(&serde_json::json!({"contents": [{"parts": [{"text": format!("call {n}")}]}]}))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    Ok(answer.status().as_u16())
}
