//! A fleet of worker *processes* sharing keys through one keylease server, calling a fake Gemini
//! that enforces the same limits itself and records what it saw. Worker processes are this test
//! binary run again with a role in the environment (see `fleet_worker_process`).

mod support;

use fake_gemini::Faults;
use fake_gemini::limits::Limits;
use keylease::pb;
use keylease_client::gemini::{GeminiClient, Generated, LeasedGemini, RetryPolicy, run_batch};
use keylease_client::{AcquireOptions, ClientConfig, KeyLeaseClient};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::*;

const ROLE: &str = "KEYLEASE_FLEET_ROLE";
const KEYLEASE: &str = "KEYLEASE_FLEET_KEYLEASE";
const GEMINI: &str = "KEYLEASE_FLEET_GEMINI";
const PROMPTS: &str = "KEYLEASE_FLEET_PROMPTS";
const JOBS: &str = "KEYLEASE_FLEET_JOBS";
const NAME: &str = "KEYLEASE_FLEET_NAME";
/// Bounds every wait on a worker process.
const PROCESS_LIMIT: Duration = Duration::from_secs(120);

/// Not a test on its own: the body of a worker process, when started with a role.
#[tokio::test]
async fn fleet_worker_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let keylease = KeyLeaseClient::connect(ClientConfig::new(var(KEYLEASE))).unwrap();
    match role.as_str() {
        "batch" => {
            let gemini = GeminiClient::new(var(GEMINI), Duration::from_secs(10)).unwrap();
            let policy = RetryPolicy {
                backoff: Duration::from_millis(20),
                deadline: Duration::from_secs(90),
                ..RetryPolicy::default()
            };
            let calls = LeasedGemini::new(keylease, gemini, policy);
            let count: usize = var(PROMPTS).parse().unwrap();
            let prompts = (0..count)
                .map(|i| format!("prompt {i} of {}", var(NAME)))
                .collect();
            let results = run_batch(
                &calls,
                MODEL,
                prompts,
                var(JOBS).parse().unwrap(),
                &var(NAME),
            )
            .await;
            for result in &results {
                assert!(matches!(result, Ok(Generated::Answer(_))), "{result:?}");
            }
            println!("answered {}", results.len());
        }
        "holder" => {
            let guard = keylease
                .acquire(AcquireOptions::new(var(NAME), MODEL))
                .await
                .unwrap();
            println!("holding {}", guard.lease().lease_id);
            // Holds (and renews) until killed.
            std::future::pending::<()>().await;
        }
        other => panic!("unknown role {other}"),
    }
}

fn worker(
    role: &str,
    server: &TestServer,
    gemini_url: &str,
    name: &str,
    prompts: usize,
    jobs: usize,
) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "fleet_worker_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(KEYLEASE, &server.address)
        .env(GEMINI, gemini_url)
        .env(NAME, name)
        .env(PROMPTS, prompts.to_string())
        .env(JOBS, jobs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The first line of the worker's output that contains `marker`, within the process limit.
fn line_with(child: &mut Child, marker: &'static str) -> String {
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (found, line) = mpsc::channel();
    std::thread::spawn(move || {
        for text in stdout.lines().map_while(Result::ok) {
            if text.contains(marker) {
                let _ = found.send(text);
            }
        }
    });
    line.recv_timeout(PROCESS_LIMIT)
        .unwrap_or_else(|_| panic!("the worker never printed {marker:?}"))
}

/// 12 keys in 4 projects of 3.
fn fleet_keys() -> Vec<(String, String)> {
    (0..12)
        .map(|i| (format!("k{i}"), format!("p{}", i / 3)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_share_the_limits_without_a_single_429() {
    let keys = fleet_keys();
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
    // The same limits on both sides, on time scaled sixty-fold: a minute lasts a second.
    let rpm = 8;
    let scaled = "[quota]\nwindow = \"1s\"\nsafety_margin = \"20ms\"\n";
    let server = TestServer::start(&config_toml(&keys, rpm, scaled)).await;
    let fake = start_fake(
        &keys,
        Limits {
            requests_per_minute: Some(rpm),
            ..Limits::default()
        },
        60.0,
    )
    .await;
    fake.fake.set_faults(Faults {
        latency_ms: 10,
        cut_streams: false,
        stream_pause_ms: 0,
        ..Faults::default()
    });

    let (processes, jobs, prompts) = (3, 4, 24);
    let workers: Vec<Child> = (0..processes)
        .map(|w| {
            worker(
                "batch",
                &server,
                &fake.base_url(),
                &format!("w{w}"),
                prompts,
                jobs,
            )
        })
        .collect();
    for child in workers {
        assert!(exit_of(child, PROCESS_LIMIT).await.success());
    }

    let stats = fake.fake.stats();
    let all = stats.all();
    assert_eq!(all.status(200), (processes * prompts) as u64, "{stats:?}");
    assert_eq!(all.status(429), 0, "the provider refused calls: {stats:?}");
    assert_eq!(all.overlaps, 0, "a key served two calls at once: {stats:?}");
    assert_eq!(
        stats.projects.len(),
        4,
        "the load did not spread: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_key_is_reclaimed_after_its_ttl() {
    let keys = [("only", "p1")];
    let server = TestServer::start(&config_toml(
        &keys,
        1000,
        "[leases]\ndefault_ttl = \"1s\"\n",
    ))
    .await;
    let fake = start_fake(&keys, Limits::default(), 1.0).await;
    let mut watcher = server.watch().await;

    let mut holder = worker("holder", &server, &fake.base_url(), "holder", 0, 0);
    let held = line_with(&mut holder, "holding");
    let lease_id = held
        .split("holding ")
        .nth(1)
        .expect("a lease id")
        .trim()
        .to_string();
    holder.kill().unwrap();
    holder.wait().unwrap();

    // Only the holder's key exists: these jobs finish only if it comes back.
    let rest = worker("batch", &server, &fake.base_url(), "survivor", 3, 2);
    assert!(exit_of(rest, PROCESS_LIMIT).await.success());
    let expired = next_event(&mut watcher, |k| match k {
        pb::event::Kind::Expired(e) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(expired.lease.unwrap().lease_id, lease_id);
    assert_eq!(fake.fake.stats().all().status(200), 3);
}
