//! Scenario 3: how much of the provider's limit a fleet gets. 8 worker processes of 8 jobs call
//! the fake Gemini (12 keys in 5 projects, limits on scaled time) through keylease, and the same
//! workload the two usual ways without it: each process rotating round-robin over all keys, and
//! each job pinning one key at a fixed pace of a request per 4 provider seconds.

use crate::procs::{self, Child};
use crate::roles::Mode;
use std::path::Path;
use std::time::Duration;

const MODEL: &str = "gemini-2.5-flash";
const PROJECTS: usize = 5;
const KEYS: usize = 12;
const PROCESSES: usize = 8;
const JOBS: usize = 8;
/// Requests per provider minute, per project.
const RPM: u64 = 10;
/// The provider's minute lasts a second.
const TIME_SCALE: f64 = 60.0;

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let (warmup, measured) = if smoke {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(30))
    };
    let dir = procs::scratch("utilization")?;
    let keys = procs::fake_keys(KEYS, PROJECTS);
    let (secrets, fake_keys) = procs::fleet_keys(&dir, &keys)?;
    let fake_config = dir.join("fake.json");
    std::fs::write(
        &fake_config,
        serde_json::json!({
            "keys": fake_keys,
            "models": {MODEL: {"requests_per_minute": RPM}},
            "time_scale": TIME_SCALE,
            "faults": {"latency_ms": 5},
        })
        .to_string(),
    )?;
    let limits = format!("requests_per_minute = {RPM}");
    let scaled = "[quota]\nwindow = \"1s\"\nsafety_margin = \"5ms\"";
    let keylease_config = procs::keylease_config(&dir, &keys, MODEL, &limits, scaled)?;
    let server = procs::spawn(
        &["serve".into(), keylease_config.display().to_string()],
        true,
    )?;

    println!("\n### Quota utilization\n");
    println!(
        "`cargo run --release -p keylease-bench -- utilization`; {PROCESSES} worker processes x {JOBS} jobs, {KEYS} keys in {PROJECTS} projects, \
         {RPM} requests per provider minute per project, the provider's minute lasting 1 s, calls of 5 ms; \
         {} s measured after {} s of warm-up.\n",
        measured.as_secs(),
        warmup.as_secs()
    );
    println!("| how keys are chosen | calls answered | aggregate limit | utilization | 429s |");
    println!("|---|---|---|---|---|");
    let limit = RPM * PROJECTS as u64 * measured.as_secs();
    for (mode, name) in [
        (Mode::Keylease, "keylease"),
        (Mode::RoundRobin, "round-robin over all keys, per process"),
        (
            Mode::Pinned,
            "one key per job, a request per 4 provider seconds",
        ),
    ] {
        let fake = procs::spawn(&["fake".into(), fake_config.display().to_string()], true)?;
        let workers = spawn_workers(
            &Fleet {
                mode,
                keylease: &server.address,
                gemini: &fake.address,
                secrets: &secrets,
                model: MODEL,
                processes: PROCESSES,
                jobs: JOBS,
                time_scale: TIME_SCALE,
            },
            warmup,
            measured,
        )?;
        let mut answered = 0u64;
        for worker in workers {
            let line = worker
                .lines
                .recv_timeout(warmup + measured + Duration::from_secs(120))?;
            answered += line
                .strip_prefix("answered ")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            worker.wait(Duration::from_secs(60))?;
        }
        let stats = fake_stats(&fake.address).await?;
        println!(
            "| {name} | {answered} | {limit} | {:.1}% | {} |",
            100.0 * answered as f64 / limit as f64,
            stats.all().status(429)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Worker processes of one fleet, and what they call.
pub struct Fleet<'a> {
    pub mode: Mode,
    pub keylease: &'a str,
    pub gemini: &'a str,
    pub secrets: &'a Path,
    pub model: &'a str,
    pub processes: usize,
    pub jobs: usize,
    pub time_scale: f64,
}

/// Starts the fleet's worker processes, each calling until `warmup` and `measured` have passed.
pub fn spawn_workers(
    fleet: &Fleet,
    warmup: Duration,
    measured: Duration,
) -> anyhow::Result<Vec<Child>> {
    (0..fleet.processes)
        .map(|index| {
            let args: Vec<String> = [
                "worker",
                "--mode",
                mode_name(fleet.mode),
                "--keylease",
                fleet.keylease,
                "--gemini",
                fleet.gemini,
                "--secrets",
                &fleet.secrets.display().to_string(),
                "--model",
                fleet.model,
                "--jobs",
                &fleet.jobs.to_string(),
                "--index",
                &index.to_string(),
                "--processes",
                &fleet.processes.to_string(),
                "--time-scale",
                &fleet.time_scale.to_string(),
                "--warmup-ms",
                &warmup.as_millis().to_string(),
                "--measure-ms",
                &measured.as_millis().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs::spawn(&args, false)
        })
        .collect()
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Keylease => "keylease",
        Mode::RoundRobin => "round-robin",
        Mode::Pinned => "pinned",
    }
}

/// The fake's counts, read over HTTP from its process.
pub async fn fake_stats(address: &str) -> anyhow::Result<fake_gemini::Stats> {
    Ok(reqwest::get(format!("{address}/_fake/stats"))
        .await?
        .error_for_status()?
        .json()
        .await?)
}
