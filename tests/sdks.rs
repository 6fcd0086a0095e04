//! The real Gemini SDKs through keylease's proxy: google-genai (Python) in a fleet of
//! processes, the openai Python SDK on the OpenAI-compatible path, and @google/genai
//! (JavaScript). `scripts/test` installs them; these tests never skip without them.

mod support;

use fake_gemini::limits::Limits;
use fake_gemini::{Faults, KeyHealth, RunningFake};
use std::process::{Command, Output};
use std::time::Duration;
use support::{FLEET_KEYS, MODEL, TestServer, fake_secret, start_fake_with};

/// 12 keys in 5 projects; p5 has two.
const KEYS: [(&str, &str); 12] = FLEET_KEYS;
/// Requests a (scaled) minute, per project, as configured in keylease.
const RPM: u64 = 30;
const TOKEN: &str = "kl_sdk_worker_token_0123456789abcdef";
/// Reads the status.
const VIEWER: &str = "kl_sdk_viewer_token_0123456789abcdef";
/// Bounds every SDK process.
const PROCESS_LIMIT: Duration = Duration::from_secs(180);

/// The fake: its minute lasts a second, as keylease's window does here; `real_limits` per
/// project override the configured RPM.
async fn fake(real_limits: &[(&str, u64)]) -> RunningFake {
    noisy_fake(real_limits, Faults::default()).await
}

/// [`fake`], misbehaving as `faults` say.
async fn noisy_fake(real_limits: &[(&str, u64)], faults: Faults) -> RunningFake {
    let limits = |rpm| Limits {
        requests_per_minute: Some(rpm),
        ..Limits::default()
    };
    let projects: Vec<(&str, Limits)> = real_limits
        .iter()
        .map(|(project, rpm)| (*project, limits(*rpm)))
        .collect();
    // Calls long enough that two on one key would be seen overlapping.
    let faults = Faults {
        latency_ms: 5,
        ..faults
    };
    start_fake_with(&KEYS, limits(RPM), &projects, 60.0, faults).await
}

/// keylease with the proxy in front of `fake`, one worker token, a one-second window.
async fn server(fake: &RunningFake) -> (TestServer, String) {
    let hash = |token: &str| -> String {
        keylease_server::auth::token_sha256(token)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let (worker, viewer) = (hash(TOKEN), hash(VIEWER));
    let mut config = format!(
        "[server]\ntokens = [{{ name = \"sdk\", role = \"worker\", sha256 = \"{worker}\" }}, {{ name = \"ops\", role = \"viewer\", sha256 = \"{viewer}\" }}]\n\n\
         [proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n\
         [quota]\nwindow = \"1s\"\nsafety_margin = \"20ms\"\n\n\
         [key_sources]\nenvironment = false\n\n\
         [pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = {RPM}\nrequests_per_day = 1000000\n\n",
        fake.base_url()
    );
    for (id, project) in KEYS {
        config.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"{project}\"\nsecret = \"{}\"\n\n",
            fake_secret(id)
        ));
    }
    let server = TestServer::start(&config).await;
    let url = server.proxy_url.clone().expect("the proxy runs");
    (server, url)
}

/// Runs a command to its end, within [`PROCESS_LIMIT`], and returns what it printed once it
/// succeeded.
async fn run(mut command: Command) -> String {
    let program = format!("{command:?}");
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test installs it)"));
    let pid = child.id();
    let waited = tokio::time::timeout(
        PROCESS_LIMIT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let output: Output = match waited {
        Ok(output) => output.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("{program} ran over {PROCESS_LIMIT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The status, as the viewer reads it.
async fn status(server: &TestServer) -> keylease::pb::GetStatusResponse {
    support::raw_with_token(server, VIEWER)
        .await
        .get_status(keylease::pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `processes` google-genai processes, each `workers` calls at once, `rounds` rounds each.
async fn genai_fleet(url: &str, processes: usize, workers: usize, rounds: usize) {
    let runs: Vec<_> = (0..processes)
        .map(|_| {
            let mut command = Command::new("python3");
            command.args([
                script("genai_through_proxy.py"),
                url.to_string(),
                TOKEN.to_string(),
                MODEL.to_string(),
                workers.to_string(),
                rounds.to_string(),
            ]);
            tokio::spawn(run(command))
        })
        .collect();
    for run in runs {
        let stdout = run.await.unwrap();
        assert!(
            stdout.contains(&format!("\"ok\": {}", workers * rounds)),
            "{stdout}"
        );
    }
}

#[tokio::test]
async fn a_fleet_of_genai_processes_gets_every_answer_with_no_429_and_no_overlap() {
    let fake = fake(&[]).await;
    let (_server, url) = server(&fake).await;
    assert!(fake.fake.set_health("k07", KeyHealth::Leaked));
    genai_fleet(&url, 8, 8, 2).await;
    let stats = fake.fake.stats();
    let all = stats.all();
    assert_eq!(all.status(429), 0, "{stats:?}");
    assert_eq!(all.overlaps, 0, "{stats:?}");
    assert_eq!(stats.unknown_keys, 0, "the token never reached Gemini");
    // The leaked key was tried once, then never again; no caller saw its 403.
    assert_eq!(stats.keys["k07"].total(), 1, "{stats:?}");
    assert_eq!(stats.keys["k07"].status(403), 1);
    // 8 × 8 × 2 rounds of generate, stream, count and embed: count tokens is answered too.
    assert_eq!(all.status(200), 8 * 8 * 2 * 4, "{stats:?}");
}

#[tokio::test]
async fn bare_429s_and_503s_at_random_cost_no_call_and_lower_no_limit() {
    // Gemini as it answers under its own load: 3% of calls a 429 that names nothing, 3% a 503.
    let faults = Faults {
        rate_limit_rate: 0.03,
        bare_429s: true,
        error_rate: 0.03,
        status: 503,
        ..Faults::default()
    };
    let fake = noisy_fake(&[], faults).await;
    let (server, url) = server(&fake).await;
    genai_fleet(&url, 4, 8, 3).await;
    let stats = fake.fake.stats();
    let all = stats.all();
    let injected = |status| all.injected.get(&status).copied().unwrap_or(0);
    assert!(injected(429) > 0 && injected(503) > 0, "{stats:?}");
    assert_eq!(all.overlaps, 0);
    // The noise was weighed, not read as limits: no project learned a lower one, so none
    // serves less than its figure for it (the throughput is measured by `keylease-bench sdk`,
    // in BENCHMARKS.md).
    let status = status(&server).await;
    for group in &status.quota_groups {
        let limit = group.requests_per_minute_limit.as_ref().unwrap();
        assert!(
            limit.learned.is_none_or(|learned| learned >= RPM),
            "{}: {group:?}",
            group.project
        );
        assert_ne!(group.cooling_reason, "provider outage", "{group:?}");
    }
}

#[tokio::test]
async fn a_project_whose_real_limit_is_half_the_configured_one_still_answers_every_call() {
    let fake = fake(&[("p5", RPM / 2)]).await;
    let (server, url) = server(&fake).await;
    genai_fleet(&url, 4, 8, 2).await;
    let stats = fake.fake.stats();
    // Only p5 can have refused; the proxy moved those calls to other projects' keys.
    for (project, counts) in &stats.projects {
        if project != "p5" {
            assert_eq!(counts.status(429), 0, "{project}: {stats:?}");
        }
    }
    assert_eq!(stats.all().overlaps, 0);
    // The proxy reported what the 429s named: keylease holds p5 to its real limit now.
    if stats.projects["p5"].status(429) > 0 {
        let status = status(&server).await;
        let p5 = status
            .quota_groups
            .iter()
            .find(|g| g.project == "p5")
            .expect("p5 was used");
        let learned = p5.requests_per_minute_limit.as_ref().unwrap();
        assert_eq!(learned.named, Some(RPM / 2), "{p5:?}");
    }
}

#[tokio::test]
async fn the_openai_sdk_works_on_the_openai_compatible_path_streaming_included() {
    let fake = fake(&[]).await;
    let (_server, url) = server(&fake).await;
    let mut command = Command::new("python3");
    command.args([
        script("openai_through_proxy.py"),
        format!("{url}/v1beta/openai/"),
        TOKEN.to_string(),
        MODEL.to_string(),
    ]);
    let stdout = run(command).await;
    assert!(stdout.contains("chat: echo: Say hi"), "{stdout}");
    assert!(stdout.contains("streamed: echo: Stream it"), "{stdout}");
    assert!(stdout.contains("embeddings: 2"), "{stdout}");
    assert_eq!(fake.fake.stats().all().status(200), 3);
}

#[tokio::test]
async fn the_javascript_sdk_generates_and_streams() {
    let fake = fake(&[]).await;
    let (_server, url) = server(&fake).await;
    let dir = format!("{}/tests/js", env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new("node");
    command
        .current_dir(&dir)
        .args(["genai_through_proxy.mjs", &url, TOKEN, MODEL]);
    let stdout = run(command).await;
    assert!(
        stdout.contains("generated: echo: Hello from JavaScript"),
        "{stdout}"
    );
    assert!(
        stdout.contains("streamed: echo: Stream from JavaScript"),
        "{stdout}"
    );
    assert_eq!(fake.fake.stats().all().status(200), 2);
}
