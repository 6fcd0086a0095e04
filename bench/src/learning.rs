//! Scenario 8: a fleet on a project whose real limit is half of what keylease was told. 8
//! worker processes of 8 jobs call the fake Gemini (12 keys in 5 projects, 30 requests per
//! provider minute each, but 15 for p4) through keylease told 30 for all; the fake's 429s name
//! their figure, or say nothing. Each second the fake's counts are read: 429s, when the last
//! came, and what p4 answered, against a run told p4's true limit. `--before PATH` runs the
//! same fleet against another build's `keylease-bench` (its `serve` role) too, in the same run.

use crate::procs;
use crate::roles::{Mode, now};
use crate::utilization::{Fleet, fake_stats, spawn_workers};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MODEL: &str = "gemini-2.5-flash";
const PROJECTS: usize = 5;
const KEYS: usize = 12;
const PROCESSES: usize = 8;
const JOBS: usize = 8;
const RPM: u64 = 30;
const MISCONFIGURED: &str = "p4";
const TIME_SCALE: f64 = 60.0;

/// One fleet run: which server, told what of p4, and whether 429s name their figure.
struct Setting<'a> {
    server: &'a str,
    exe: Option<&'a Path>,
    told: u64,
    named: bool,
}

/// What the fake counted.
struct Outcome {
    refusals: u64,
    after_first_window: u64,
    last_refusal_s: Option<u64>,
    p4_answered: u64,
    others_answered: u64,
}

pub async fn run(smoke: bool, before: Option<PathBuf>) -> anyhow::Result<()> {
    let seconds = if smoke { 3 } else { 30 };
    println!("\n### Learning the real limits\n");
    println!(
        "`cargo run --release -p keylease-bench -- learning [--before OTHER_BUILD/keylease-bench]`; {PROCESSES} worker processes x {JOBS} jobs, {KEYS} keys in {PROJECTS} projects, \
         {RPM} requests per provider minute per project but {} for {MISCONFIGURED}, keylease told {RPM} for all; the provider's minute lasting 1 s, calls of 5 ms, {seconds} s each run. \
         The defaults otherwise (`relearn_after = 10` windows).\n",
        RPM / 2
    );
    println!(
        "| server | told {MISCONFIGURED} | 429 bodies | 429s | after the first window | last 429 at | {MISCONFIGURED} answered | of the true-limit run | other projects answered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let truth = fleet(
        &Setting {
            server: "this build",
            exe: None,
            told: RPM / 2,
            named: true,
        },
        seconds,
    )
    .await?;
    print_row("this build", RPM / 2, "figures", &truth, &truth);
    let mut settings = Vec::new();
    if let Some(exe) = &before {
        for named in [true, false] {
            settings.push(Setting {
                server: "before",
                exe: Some(exe),
                told: RPM,
                named,
            });
        }
    }
    for named in [true, false] {
        settings.push(Setting {
            server: "this build",
            exe: None,
            told: RPM,
            named,
        });
    }
    for setting in &settings {
        let outcome = fleet(setting, seconds).await?;
        let bodies = if setting.named {
            "figures"
        } else {
            "no details"
        };
        print_row(setting.server, setting.told, bodies, &outcome, &truth);
    }
    Ok(())
}

fn print_row(server: &str, told: u64, bodies: &str, outcome: &Outcome, truth: &Outcome) {
    println!(
        "| {server} | {told} | {bodies} | {} | {} | {} | {} | {:.2} | {} |",
        outcome.refusals,
        outcome.after_first_window,
        outcome
            .last_refusal_s
            .map_or("none".to_string(), |s| format!("{s} s")),
        outcome.p4_answered,
        outcome.p4_answered as f64 / truth.p4_answered.max(1) as f64,
        outcome.others_answered,
    );
}

async fn fleet(setting: &Setting<'_>, seconds: u64) -> anyhow::Result<Outcome> {
    let dir = procs::scratch("learning")?;
    let keys = procs::fake_keys(KEYS, PROJECTS);
    let (secrets, fake_keys) = procs::fleet_keys(&dir, &keys)?;
    let fake_config = dir.join("fake.json");
    std::fs::write(
        &fake_config,
        serde_json::json!({
            "keys": fake_keys,
            "models": {MODEL: {"requests_per_minute": RPM}},
            "projects": {MISCONFIGURED: {MODEL: {"requests_per_minute": RPM / 2}}},
            "time_scale": TIME_SCALE,
            "faults": {"latency_ms": 5, "bare_429s": !setting.named},
        })
        .to_string(),
    )?;
    let limits = format!("requests_per_minute = {RPM}\nrequests_per_day = 1000000");
    // Time scaled sixty-fold, cooldowns too.
    let extra = format!(
        "[quota]\nwindow = \"1s\"\nsafety_margin = \"5ms\"\ncooldown_base = \"1s\"\ncooldown_max = \"15s\"\n\n\
         [pools.gemini.projects.{MISCONFIGURED}.\"{MODEL}\"]\nrequests_per_minute = {}\n",
        setting.told
    );
    let config = procs::keylease_config(&dir, &keys, MODEL, &limits, &extra)?;
    let serve = ["serve".to_string(), config.display().to_string()];
    let server = match setting.exe {
        Some(exe) => procs::spawn_from(exe, &serve, true)?,
        None => procs::spawn(&serve, true)?,
    };
    let fake = procs::spawn(&["fake".into(), fake_config.display().to_string()], true)?;
    let fleet = Fleet {
        mode: Mode::Keylease,
        keylease: &server.address,
        gemini: &fake.address,
        secrets: &secrets,
        model: MODEL,
        processes: PROCESSES,
        jobs: JOBS,
        time_scale: TIME_SCALE,
    };
    let workers = spawn_workers(&fleet, Duration::ZERO, Duration::from_secs(seconds))?;
    let start = now();
    let mut refusals_by_second = Vec::new();
    let mut last = fake_stats(&fake.address).await?;
    let first = last.clone();
    for second in 1..=seconds {
        tokio::time::sleep_until(start + Duration::from_secs(second)).await;
        let stats = fake_stats(&fake.address).await?;
        refusals_by_second.push(stats.all().status(429) - last.all().status(429));
        last = stats;
    }
    for worker in workers {
        worker.wait(Duration::from_secs(120))?;
    }
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
    let answered = |project: &str| {
        last.projects.get(project).map_or(0, |c| c.status(200))
            - first.projects.get(project).map_or(0, |c| c.status(200))
    };
    let others = (0..PROJECTS)
        .map(|p| format!("p{p}"))
        .filter(|p| p != MISCONFIGURED)
        .map(|p| answered(&p))
        .sum();
    Ok(Outcome {
        refusals: refusals_by_second.iter().sum(),
        after_first_window: refusals_by_second.iter().skip(1).sum(),
        last_refusal_s: refusals_by_second
            .iter()
            .rposition(|&n| n > 0)
            .map(|i| i as u64 + 1),
        p4_answered: answered(MISCONFIGURED),
        others_answered: others,
    })
}
