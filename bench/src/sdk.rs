//! Scenario: the real google-genai SDK through keylease's Gemini-compatible proxy, against
//! a fake Gemini that answers some calls with Gemini's noise (bare 429s or 429s naming the
//! quota, and 503s, none of which spend quota), on the batch scenario's pool: 12 keys in 5
//! projects, 60 requests per provider minute each, a minute lasting a second; 20 ms a call. Python processes of SDK threads call
//! `generate_content` back to back; after a warm-up the fake's accepted calls per second are
//! set against what the projects allow (5 × 60 a second). Needs `python3` with `google-genai`
//! (`pip install google-genai`, as the test command installs it).

use crate::batch::{KEYS, MODEL, PROJECTS, RPM, TIME_SCALE, start_pool_fake, write_pool_config};
use crate::procs;
use crate::roles::now;
use fake_gemini::Faults;
use std::time::Duration;

const PROCESSES: usize = 4;
const THREADS: usize = 16;

/// What one run measured.
struct Measured {
    accepted_per_second: f64,
    sdk_ok: u64,
    sdk_failed: u64,
    first_failures: Vec<String>,
    limit_429s: u64,
    injected: u64,
    overlaps: u64,
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/genai_load.py");
    let found = tokio::process::Command::new("python3")
        .args(["-c", "import google.genai"])
        .output()
        .await;
    anyhow::ensure!(
        found.is_ok_and(|output| output.status.success()),
        "the sdk scenario needs python3 with google-genai: python3 -m pip install google-genai"
    );
    let (warm_up, measured_for) = if smoke {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(20))
    };
    let noise = |error_rate, rate_limit_rate, bare_429s| Faults {
        latency_ms: 20,
        error_rate,
        status: 503,
        rate_limit_rate,
        bare_429s,
        ..Faults::default()
    };
    let rows = [
        ("none", noise(0.0, 0.0, false)),
        ("3% 503s, 3% bare 429s", noise(0.03, 0.03, true)),
        (
            "3% 503s, 3% 429s naming the quota",
            noise(0.03, 0.03, false),
        ),
    ];
    let allowed = PROJECTS as f64 * RPM as f64 * TIME_SCALE / 60.0;
    println!("\n### The google-genai SDK through the proxy, under Gemini's noise");
    println!(
        "{PROCESSES} Python processes × {THREADS} threads calling `generate_content` back to back; {KEYS} keys in {PROJECTS} projects, {RPM} requests per provider minute each (a minute lasts {:.1} s), 20 ms a call; accepted calls counted over {} s after {} s of warm-up",
        60.0 / TIME_SCALE,
        measured_for.as_secs(),
        warm_up.as_secs()
    );
    println!(
        "| injected trouble | accepted | the projects allow | fraction | SDK calls answered | SDK calls failed | 429s the limits caused | injected answers | overlaps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let rows = if smoke { &rows[..1] } else { &rows[..] };
    for (name, faults) in rows {
        let measured = run_once(script, *faults, warm_up, measured_for).await?;
        println!(
            "| {name} | {:.0}/s | {allowed:.0}/s | {:.0}% | {} | {} | {} | {} | {} |",
            measured.accepted_per_second,
            100.0 * measured.accepted_per_second / allowed,
            measured.sdk_ok,
            measured.sdk_failed,
            measured.limit_429s,
            measured.injected,
            measured.overlaps,
        );
        for failure in &measured.first_failures {
            println!("  - a failed call: {failure}");
        }
    }
    Ok(())
}

async fn run_once(
    script: &str,
    faults: Faults,
    warm_up: Duration,
    measured_for: Duration,
) -> anyhow::Result<Measured> {
    let dir = procs::scratch("sdk")?;
    let keys = procs::fake_keys(KEYS, PROJECTS);
    let fake = start_pool_fake(&keys, faults, 5).await?;
    let config = write_pool_config(
        &dir,
        &keys,
        &format!(
            "[state]\nephemeral = true\n\n[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            fake.base_url()
        ),
    )?;
    let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let proxy = server.proxy_url()?;
    let seconds = (warm_up + measured_for + Duration::from_secs(1)).as_secs_f64();
    let started = now();
    let callers: Vec<_> = (0..PROCESSES)
        .map(|_| {
            tokio::process::Command::new("python3")
                .args([
                    script,
                    &proxy,
                    "bench",
                    MODEL,
                    &THREADS.to_string(),
                    &format!("{seconds:.1}"),
                ])
                .kill_on_drop(true)
                .output()
        })
        .map(tokio::spawn)
        .collect();
    tokio::time::sleep_until(started + warm_up).await;
    let before = fake.fake.stats().all().status(200);
    let from = now();
    tokio::time::sleep_until(from + measured_for).await;
    let accepted = fake.fake.stats().all().status(200) - before;
    let accepted_per_second = accepted as f64 / from.elapsed().as_secs_f64();
    let (mut sdk_ok, mut sdk_failed, mut first_failures) = (0, 0, Vec::new());
    for caller in callers {
        let output = tokio::time::timeout(Duration::from_secs(120), caller).await???;
        let stdout = String::from_utf8_lossy(&output.stdout);
        anyhow::ensure!(
            output.status.success(),
            "an SDK process failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim())
            .map_err(|e| anyhow::anyhow!("an SDK process printed {stdout:?}: {e}"))?;
        sdk_ok += report["ok"].as_u64().unwrap_or(0);
        sdk_failed += report["failed"].as_u64().unwrap_or(0);
        if let Some(failures) = report["first_failures"].as_array() {
            first_failures.extend(failures.iter().filter_map(|f| f.as_str()).map(String::from));
        }
    }
    first_failures.truncate(5);
    drop(server);
    let all = fake.fake.stats().all();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        accepted_per_second,
        sdk_ok,
        sdk_failed,
        first_failures,
        limit_429s: all.status(429) - all.injected.get(&429).copied().unwrap_or(0),
        injected: all.injected.values().sum(),
        overlaps: all.overlaps,
    })
}
