//! Scenario 9: `keylease batch` on 10,000 prompts (1,000 with `--smoke`), its engine
//! in-process, through the fake Gemini (12 keys in 5 projects, 60 requests per provider minute
//! each, a minute lasting a second; 20 ms a call, and the batch's pause after a 503 scaled
//! alike): the rate achieved against the pool's
//! theoretical rate (5 × 60 requests a scaled minute = 300 a second), and the 429s met; once
//! clean, then with Gemini's noise injected (503s, 429s naming the quota or bare, at several
//! rates), which keylease must ride out without reading it as limits.
//! The `keylease` binary is looked for beside this one (`cargo build --release -p keylease-cli`).

use crate::procs;
use crate::roles::now;
use fake_gemini::limits::Limits;
use fake_gemini::{FakeConfig, FakeGemini, FakeKey, Faults, RunningFake};
use std::time::Duration;

pub const MODEL: &str = "gemini-2.5-flash";
pub const PROJECTS: usize = 5;
pub const KEYS: usize = 12;
pub const RPM: u64 = 60;
pub const TIME_SCALE: f64 = 60.0;
/// High enough that no run meets it.
const REQUESTS_PER_DAY: u64 = 10_000_000;

/// Provider trouble injected in a run.
struct Trouble {
    name: &'static str,
    faults: Faults,
}

/// What one run measured.
struct Measured {
    elapsed: Duration,
    lines: usize,
    limit_429s: u64,
    injected: u64,
    overlaps: u64,
    /// The batch process's CPU time (user + system).
    cpu: Option<Duration>,
    summary: String,
}

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let tasks = if smoke { 1_000 } else { 10_000 };
    let exe = std::env::current_exe()?.with_file_name("keylease");
    anyhow::ensure!(
        exe.exists(),
        "{} is missing: cargo build --release -p keylease-cli",
        exe.display()
    );
    let trouble = |name, error_rate, rate_limit_rate, bare_429s| Trouble {
        name,
        faults: Faults {
            latency_ms: 20,
            error_rate,
            status: 503,
            rate_limit_rate,
            bare_429s,
            ..Faults::default()
        },
    };
    // Gemini's noise: 503s under load, and 429s no limit caused, naming the quota or bare.
    let troubles = [
        trouble("none", 0.0, 0.0, false),
        trouble("3% 503s, 3% 429s naming the quota", 0.03, 0.03, false),
        trouble("3% 503s, 3% bare 429s", 0.03, 0.03, true),
        trouble("3% 503s alone", 0.03, 0.0, false),
        trouble("1% bare 429s", 0.0, 0.01, true),
        trouble("3% bare 429s", 0.0, 0.03, true),
        trouble("10% bare 429s", 0.0, 0.10, true),
    ];
    let theoretical = PROJECTS as f64 * RPM as f64 * TIME_SCALE / 60.0;
    let backoff = scaled_backoff();
    println!("\n### keylease batch: {tasks} prompts, in-process engine, scaled time");
    println!(
        "{KEYS} keys in {PROJECTS} projects, {RPM} requests per provider minute each (a minute lasts {:.1} s), 20 ms a call, `--backoff` scaled alike to {:.0} ms",
        60.0 / TIME_SCALE,
        backoff.as_millis()
    );
    println!(
        "| injected trouble | tasks | lines written | wall time | achieved | pool's theoretical | fraction | 429s the limits caused | injected answers | overlaps | batch CPU per task |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut summaries = String::new();
    // At smoke size, only that it works: the clean run.
    let runs = if smoke { &troubles[..1] } else { &troubles[..] };
    for trouble in runs {
        let measured = run_once(&exe, tasks, trouble.faults, backoff).await?;
        let achieved = tasks as f64 / measured.elapsed.as_secs_f64();
        let cpu_per_task = measured.cpu.map_or("?".to_string(), |cpu| {
            format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / tasks as f64)
        });
        println!(
            "| {} | {tasks} | {} | {:.1} s | {achieved:.0}/s | {theoretical:.0}/s | {:.0}% | {} | {} | {} | {cpu_per_task} |",
            trouble.name,
            measured.lines,
            measured.elapsed.as_secs_f64(),
            100.0 * achieved / theoretical,
            measured.limit_429s,
            measured.injected,
            measured.overlaps
        );
        summaries.push_str(&format!("{}:\n{}", trouble.name, measured.summary));
    }
    println!("\nThe batch's own summaries:\n```\n{summaries}```");
    Ok(())
}

/// The fake Gemini of the batch's pool (and the SDK scenario's): `keys` healthy, `RPM` a
/// scaled minute each project, answering with `faults`.
pub async fn start_pool_fake(
    keys: &[(String, String, String)],
    faults: Faults,
    seed: u64,
) -> anyhow::Result<RunningFake> {
    let limits = Limits {
        requests_per_minute: Some(RPM),
        tokens_per_minute: None,
        requests_per_day: Some(REQUESTS_PER_DAY),
        tokens_per_day: None,
    };
    Ok(FakeGemini::start(FakeConfig {
        keys: keys
            .iter()
            .map(|(id, project, secret)| FakeKey {
                id: id.clone(),
                secret: secret.clone(),
                project: project.clone(),
                health: Default::default(),
            })
            .collect(),
        models: [(MODEL.to_string(), limits)].into(),
        projects: Default::default(),
        time_scale: TIME_SCALE,
        faults,
        seed,
    })
    .await?)
}

/// keylease's configuration of the pool in `dir` (`keylease.toml` and its keys file): its
/// limits, and the quota settings at the scaled minute; `extra` adds sections.
pub fn write_pool_config(
    dir: &std::path::Path,
    keys: &[(String, String, String)],
    extra: &str,
) -> anyhow::Result<std::path::PathBuf> {
    procs::keylease_config(
        dir,
        keys,
        MODEL,
        &format!("requests_per_minute = {RPM}\nrequests_per_day = {REQUESTS_PER_DAY}"),
        &format!(
            "[quota]\nwindow = \"1s\"\nsafety_margin = \"20ms\"\ncooldown_base = \"100ms\"\ncooldown_max = \"2s\"\n\n{extra}"
        ),
    )
}

/// The client's pause after a 503, scaled like the provider's minute: 500 ms of Gemini's 60 s
/// window is 8 ms of this 1 s one.
fn scaled_backoff() -> Duration {
    let backoff = keylease_client::gemini::RetryPolicy::default().backoff;
    Duration::from_millis((backoff.as_secs_f64() * 1_000.0 / TIME_SCALE).round() as u64)
}

async fn run_once(
    exe: &std::path::Path,
    tasks: usize,
    faults: Faults,
    backoff: Duration,
) -> anyhow::Result<Measured> {
    let dir = procs::scratch("batch")?;
    let keys = procs::fake_keys(KEYS, PROJECTS);
    let fake = start_pool_fake(&keys, faults, 3).await?;
    write_pool_config(&dir, &keys, "")?;
    let prompts: String = (1..=tasks)
        .map(|i| format!("{{\"id\": \"t{i}\", \"prompt\": \"Summarise item {i} in one line.\"}}\n"))
        .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts)?;
    let _ = std::fs::remove_file(dir.join("out.jsonl"));
    let started = now();
    let cpu_before = procs::children_cpu_time();
    let output = tokio::process::Command::new(exe)
        .args(["batch", "prompts.jsonl", "-o", "out.jsonl", "--ephemeral"])
        .args(["--backoff", &format!("{}ms", backoff.as_millis())])
        .current_dir(&dir)
        .env("GEMINI_BASE_URL", fake.base_url())
        .output()
        .await?;
    let elapsed = started.elapsed();
    let cpu = procs::children_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(output.status.success(), "keylease batch failed:\n{stderr}");
    let lines = std::fs::read_to_string(dir.join("out.jsonl"))?
        .lines()
        .count();
    let all = fake.fake.stats().all();
    let injected: u64 = all.injected.values().sum();
    let summary = stderr
        .lines()
        .filter(|l| l.starts_with("done:") || l.starts_with("rate:") || l.starts_with("errors:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        elapsed,
        lines,
        limit_429s: all.status(429) - all.injected.get(&429).copied().unwrap_or(0),
        injected,
        overlaps: all.overlaps,
        cpu,
        summary,
    })
}
