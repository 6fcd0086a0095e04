//! `keylease batch` end to end: the real binary, the fake Gemini over real HTTP, keylease
//! in-process (its state directory, called as functions) or a real keylease server over gRPC;
//! the tests of what a run does whatever lends its keys run on both ([`Lender`]). Time is
//! scaled: the fake's minute lasts a second, and so does keylease's window.

use fake_gemini::limits::Limits;
use fake_gemini::responses::REPLY_VERBATIM;
use fake_gemini::{FakeConfig, FakeGemini, FakeKey, Faults, KeyHealth, RunningFake};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

const MODEL: &str = "gemini-2.5-flash";
/// Every test process ends within this, or the test fails.
const PROCESS_LIMIT: Duration = Duration::from_secs(120);

fn secret(id: &str) -> String {
    format!("AIzaFAKE.batch-{id}-{}", "0".repeat(24))
}

/// `n` keys, `per_project` in each project: (id, project).
fn keys(n: usize, per_project: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| {
            (
                format!("k{i:02}"),
                format!("p{}", (i - 1) / per_project + 1),
            )
        })
        .collect()
}

async fn start_fake(
    keys: &[(String, String)],
    rpm: u64,
    faults: Faults,
    health: &[(&str, KeyHealth)],
) -> RunningFake {
    let health: HashMap<&str, KeyHealth> = health.iter().copied().collect();
    FakeGemini::start(FakeConfig {
        keys: keys
            .iter()
            .map(|(id, project)| FakeKey {
                id: id.clone(),
                secret: secret(id),
                project: project.clone(),
                health: health.get(id.as_str()).copied().unwrap_or_default(),
            })
            .collect(),
        models: [(
            MODEL.to_string(),
            Limits {
                requests_per_minute: Some(rpm),
                tokens_per_minute: None,
                requests_per_day: Some(1_000_000),
                tokens_per_day: None,
            },
        )]
        .into(),
        projects: BTreeMap::new(),
        time_scale: 60.0,
        faults,
        seed: 11,
    })
    .await
    .expect("fake gemini")
}

/// keylease's configuration: these keys, the fake's limits, a one-second window.
fn config(keys: &[(String, String)], rpm: u64) -> String {
    let mut text = format!(
        "[key_sources]\nenvironment = false\n\n[quota]\nwindow = \"1s\"\nsafety_margin = \"20ms\"\ncooldown_base = \"100ms\"\ncooldown_max = \"2s\"\n\n\
         [pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = {rpm}\nrequests_per_day = 1000000\n\n"
    );
    for (id, project) in keys {
        text.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"{project}\"\nsecret = \"{}\"\n\n",
            secret(id)
        ));
    }
    text
}

/// A directory with `keylease.toml` and `prompts.jsonl` of `tasks` prompts.
fn workdir(config_text: &str, tasks: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keylease.toml"), config_text).unwrap();
    let prompts: String = (1..=tasks)
        .map(|i| format!("{{\"id\": \"t{i}\", \"prompt\": \"Prompt number {i}\", \"metadata\": {{\"n\": {i}}}}}\n"))
        .collect();
    std::fs::write(dir.path().join("prompts.jsonl"), prompts).unwrap();
    dir
}

/// `keylease batch ARGS` in `dir`, with no key or keylease settings from this environment.
fn batch(dir: &Path, fake: &RunningFake, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keylease"));
    command
        .arg("batch")
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GEMINI_BASE_URL", fake.base_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Where a test's batch borrows its keys.
#[derive(Debug, Clone, Copy)]
enum Lender {
    /// keylease in the batch's own process (the default).
    InProcess,
    /// A keylease server on a loopback port, over gRPC (`--keylease URL`).
    Server,
}

impl Lender {
    /// The batch's arguments for this lender, on the configuration in `dir`; the server, when
    /// there is one, runs until the second value is dropped.
    async fn arguments(
        self,
        dir: &Path,
    ) -> (Vec<String>, Option<tokio::sync::oneshot::Sender<()>>) {
        match self {
            Self::InProcess => (Vec::new(), None),
            Self::Server => {
                let (address, server) = serve(&dir.join("keylease.toml")).await;
                (vec!["--keylease".into(), address], Some(server))
            }
        }
    }
}

/// Runs to the end: exit code and standard error.
async fn finish(mut command: Command) -> (i32, String) {
    let child = command.spawn().expect("keylease binary");
    let output = tokio::time::timeout(PROCESS_LIMIT, child.wait_with_output())
        .await
        .expect("batch ended in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

/// Waits until the output at `path` has `lines` lines.
async fn until_lines(path: &Path, lines: usize) {
    let written = async {
        while rows(path).len() < lines {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PROCESS_LIMIT, written)
        .await
        .unwrap_or_else(|_| panic!("{lines} lines written in time"));
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

/// Ids of the output with how many lines each has.
fn id_counts(rows: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for row in rows {
        *counts
            .entry(row["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

fn assert_each_once(rows: &[Value], tasks: usize) {
    let counts = id_counts(rows);
    assert_eq!(counts.len(), tasks, "every id has a line");
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "ids with more than one line: {repeated:?}"
    );
    for i in 1..=tasks {
        assert!(counts.contains_key(&format!("t{i}")), "t{i} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_prompts_through_faults_finish_each_once_without_a_limit_429() {
    a_thousand_prompts_through_faults(Lender::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_prompts_through_faults_from_a_keylease_server() {
    a_thousand_prompts_through_faults(Lender::Server).await;
}

async fn a_thousand_prompts_through_faults(lender: Lender) {
    let keys = keys(8, 2);
    let faults = Faults {
        error_rate: 0.03,
        status: 503,
        rate_limit_rate: 0.03,
        latency_ms: 5,
        ..Faults::default()
    };
    let fake = start_fake(&keys, 120, faults, &[("k03", KeyHealth::Leaked)]).await;
    let dir = workdir(&config(&keys, 120), 1000);
    let (mut args, _server) = lender.arguments(dir.path()).await;
    args.extend(
        [
            "prompts.jsonl",
            "-o",
            "out.jsonl",
            "--error-log",
            "errors.jsonl",
            // The fake's minute lasts a second: a pause in proportion.
            "--backoff",
            "20ms",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 0, "{stderr}");
    let rows = rows(&dir.path().join("out.jsonl"));
    assert_each_once(&rows, 1000);
    for row in &rows {
        assert_eq!(row["status"], "ok", "{row}");
        assert!(
            row["text"]
                .as_str()
                .unwrap()
                .starts_with("echo: Prompt number")
        );
        assert_eq!(
            row["metadata"]["n"].as_u64(),
            Some(row["id"].as_str().unwrap()[1..].parse().unwrap())
        );
        assert!(row["key_id"].as_str().is_some_and(|k| k != "k03"), "{row}");
        assert!(row["attempts"].as_u64().unwrap() >= 1);
        assert!(row["input_tokens"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["output_tokens"].as_u64(), Some(8));
    }
    let stats = fake.fake.stats();
    let all = stats.all();
    let injected_429 = all.injected.get(&429).copied().unwrap_or(0);
    let injected_503 = all.injected.get(&503).copied().unwrap_or(0);
    assert!(
        injected_429 > 0 && injected_503 > 0,
        "faults were injected: {all:?}"
    );
    assert_eq!(
        all.status(429) - injected_429,
        0,
        "429s the limits caused: {all:?}"
    );
    assert_eq!(all.overlaps, 0, "never two calls on one key");
    let leaked = &stats.keys["k03"];
    assert!(
        leaked.total() <= 2,
        "the leaked key is dropped at once: {leaked:?}"
    );
    // The summary counts the same things, and the error log names each retried fault.
    assert!(
        stderr.contains("done: 1000 ok, 0 failed, 0 left"),
        "{stderr}"
    );
    assert!(stderr.contains("per project: p1 "), "{stderr}");
    let errors = std::fs::read_to_string(dir.path().join("errors.jsonl")).unwrap();
    assert!(errors.lines().count() as u64 >= injected_503, "{errors}");
    assert!(
        !errors.contains("AIza") && !stderr.contains("AIza"),
        "no secret is shown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_killed_halfway_finishes_on_restart_without_redoing_done_tasks() {
    let keys = keys(4, 1);
    let faults = Faults {
        latency_ms: 20,
        ..Faults::default()
    };
    let fake = start_fake(&keys, 600, faults, &[]).await;
    let dir = workdir(&config(&keys, 600), 400);
    let out = dir.path().join("out.jsonl");
    // The killed run's leases hold their keys from the restart until they expire.
    let args = [
        "prompts.jsonl",
        "-o",
        "out.jsonl",
        "--concurrency",
        "4",
        "--lease-ttl",
        "2s",
    ];
    let mut child: Child = batch(dir.path(), &fake, &args).spawn().unwrap();
    until_lines(&out, 150).await;
    child.start_kill().unwrap();
    let killed = child.wait().await.unwrap();
    assert!(!killed.success());
    let before = rows(&out);
    assert!(
        before.len() < 400,
        "killed before the end: {}",
        before.len()
    );
    let answered_before = fake.fake.stats().all().status(200);
    assert!(answered_before >= before.len() as u64);

    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} tasks to run ({} done before",
            400 - before.len(),
            before.len()
        )),
        "{stderr}"
    );
    let after = rows(&out);
    assert_each_once(&after, 400);
    assert_eq!(
        after[..before.len()],
        before[..],
        "the lines written before are kept as they were"
    );
    // Only the tasks in flight at the kill (at most the concurrency) were asked twice.
    let answered = fake.fake.stats().all().status(200);
    assert!(answered <= 400 + 4, "{answered} answers for 400 tasks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ctrl_c_finishes_the_tasks_in_flight_and_loses_no_answer() {
    let keys = keys(4, 1);
    let faults = Faults {
        latency_ms: 50,
        ..Faults::default()
    };
    let fake = start_fake(&keys, 600, faults, &[]).await;
    let dir = workdir(&config(&keys, 600), 300);
    let out = dir.path().join("out.jsonl");
    let args = ["prompts.jsonl", "-o", "out.jsonl", "--concurrency", "4"];
    let child = batch(dir.path(), &fake, &args).spawn().unwrap();
    until_lines(&out, 40).await;
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let output = tokio::time::timeout(PROCESS_LIMIT, child.wait_with_output())
        .await
        .expect("stopped in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopping: finishing the"), "{stderr}");
    let stopped = rows(&out);
    assert!(stopped.len() < 300, "stopped early: {}", stopped.len());
    assert_eq!(
        fake.fake.stats().all().status(200),
        stopped.len() as u64,
        "every answer had is written"
    );
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 0, "{stderr}");
    assert_each_once(&rows(&out), 300);
    assert_eq!(
        fake.fake.stats().all().status(200),
        300,
        "nothing was asked twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_cut_and_its_task_redone() {
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let dir = workdir(&config(&keys, 600), 5);
    let out = dir.path().join("out.jsonl");
    let done = "{\"id\":\"t1\",\"status\":\"ok\",\"text\":\"x\",\"attempts\":1,\"input_tokens\":1,\"output_tokens\":1,\"latency_ms\":1}\n";
    std::fs::write(&out, format!("{done}{{\"id\":\"t2\",\"status\":\"o")).unwrap();
    let (code, stderr) = finish(batch(
        dir.path(),
        &fake,
        &["prompts.jsonl", "-o", "out.jsonl"],
    ))
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("line 2 was cut short"), "{stderr}");
    let rows = rows(&out);
    assert_each_once(&rows, 5);
    assert_eq!(rows[0]["text"], "x", "the done task is not redone");
    assert_eq!(fake.fake.stats().all().status(200), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_repaired_and_prose_is_retried_then_failed() {
    json_answers_repaired_and_prose_failed(Lender::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_repaired_with_keys_from_a_keylease_server() {
    json_answers_repaired_and_prose_failed(Lender::Server).await;
}

async fn json_answers_repaired_and_prose_failed(lender: Lender) {
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let dir = workdir(&config(&keys, 600), 0);
    let replies = [
        ("fenced", "```json\n{\"city\": \"Paris\", \"n\": 1,}\n```"),
        ("quotes", "{'name': 'Ada', 'tags': ['x', 'y']}"),
        ("prose-first", "Sure! Here it is: {\"ok\": true}"),
        ("clean", "[1, 2, 3]"),
        ("prose", "I cannot answer that in JSON."),
    ];
    let input: String = replies
        .iter()
        .map(|(id, reply)| {
            serde_json::json!({"id": id, "prompt": format!("{REPLY_VERBATIM}{reply}")}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("json.jsonl"), input).unwrap();
    let (mut args, _server) = lender.arguments(dir.path()).await;
    args.extend(
        [
            "json.jsonl",
            "-o",
            "out.jsonl",
            "--json",
            "--max-retries",
            "2",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 1, "one task failed for good: {stderr}");
    let rows = rows(&dir.path().join("out.jsonl"));
    let by_id: HashMap<&str, &Value> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(
        by_id["fenced"]["json"],
        serde_json::json!({"city": "Paris", "n": 1})
    );
    assert_eq!(
        by_id["quotes"]["json"],
        serde_json::json!({"name": "Ada", "tags": ["x", "y"]})
    );
    assert_eq!(
        by_id["prose-first"]["json"],
        serde_json::json!({"ok": true})
    );
    assert_eq!(by_id["clean"]["json"], serde_json::json!([1, 2, 3]));
    assert!(by_id["clean"].get("text").is_none());
    let prose = by_id["prose"];
    assert_eq!(prose["status"], "failed");
    assert_eq!(prose["error"]["class"], "invalid_json");
    assert_eq!(prose["attempts"], 3, "the first try and two retries");
    assert!(stderr.contains("errors: invalid_json 1"), "{stderr}");

    // The failed task is skipped on the next run, and run again with --retry-failed.
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("0 tasks to run (4 done before, 1 failed before)"),
        "{stderr}"
    );
    let mut retry = args.to_vec();
    retry.push("--retry-failed");
    let (code, stderr) = finish(batch(dir.path(), &fake, &retry)).await;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        rows_of(dir.path()).len(),
        5,
        "the failed line was replaced, not repeated"
    );
}

fn rows_of(dir: &Path) -> Vec<Value> {
    rows(&dir.join("out.jsonl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_named_by_line_and_stops_the_run_unless_skipped() {
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let dir = workdir(&config(&keys, 600), 0);
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"id\": \"a\", \"prompt\": \"fine\"}\n{\"id\": \"b\", \"prompt\": \n{\"id\": \"a\", \"prompt\": \"again\"}\n{\"id\": \"c\"}\n{\"id\": \"d\", \"prompt\": \"fine too\"}\n",
    )
    .unwrap();
    let (code, stderr) = finish(batch(dir.path(), &fake, &["bad.jsonl", "-o", "out.jsonl"])).await;
    assert_eq!(code, 65, "{stderr}");
    for line in [
        "line 2: not a task",
        "line 3: id \"a\" was already used",
        "line 4: no prompt",
    ] {
        assert!(stderr.contains(line), "{line}: {stderr}");
    }
    assert!(stderr.contains("3 bad lines"), "{stderr}");
    assert!(rows_of(dir.path()).is_empty(), "nothing ran");

    let (code, stderr) = finish(batch(
        dir.path(),
        &fake,
        &["bad.jsonl", "-o", "out.jsonl", "--skip-invalid"],
    ))
    .await;
    assert_eq!(code, 0, "{stderr}");
    let ids: Vec<_> = rows_of(dir.path())
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"a".to_string()) && ids.contains(&"d".to_string()));

    std::fs::write(dir.path().join("empty.txt"), "\n\n").unwrap();
    let (code, stderr) = finish(batch(dir.path(), &fake, &["empty.txt", "-o", "e.jsonl"])).await;
    assert_eq!(code, 65, "{stderr}");
    assert!(stderr.contains("empty.txt: no tasks in it"), "{stderr}");
    let (code, stderr) = finish(batch(
        dir.path(),
        &fake,
        &["empty.txt", "-o", "e.jsonl", "--skip-invalid"],
    ))
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: empty.txt: no tasks in it"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_environment_keys_and_a_dry_run_plan() {
    // No configuration at all: keys from GEMINI_API_KEY_<n>, every limit auto.
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prompts.txt"),
        "What is 2+2?\n\nName a colour.\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut command = batch(dir.path(), &fake, &["prompts.txt", "-o", "out.jsonl"]);
        command.args(extra);
        for (n, (id, _)) in keys.iter().enumerate() {
            command.env(format!("GEMINI_API_KEY_{}", n + 1), secret(id));
        }
        command
    };
    let (code, stderr) = finish(run(&["--dry-run"])).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("plan: 2 tasks"), "{stderr}");
    assert!(stderr.contains("2 keys in 2 projects"), "{stderr}");
    assert!(
        !dir.path().join("out.jsonl").exists(),
        "a dry run writes nothing"
    );
    let (code, stderr) = finish(run(&[])).await;
    assert_eq!(code, 0, "{stderr}");
    let rows = rows_of(dir.path());
    let ids: Vec<_> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.contains(&"1") && ids.contains(&"3"),
        "ids are line numbers: {ids:?}"
    );
    assert!(
        dir.path().join("keylease-state").is_dir(),
        "the state is kept"
    );
    assert!(!stderr.contains("AIza"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_day_leaves_the_rest_for_later_and_the_next_run_remembers_it() {
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let ten_a_day =
        config(&keys, 600).replace("requests_per_day = 1000000", "requests_per_day = 10");
    let dir = workdir(&ten_a_day, 30);
    let args = ["prompts.jsonl", "-o", "out.jsonl"];
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 75, "{stderr}");
    // Planned from groups never used yet, with keylease's window.
    assert!(
        stderr.contains(
            "p2: 1 keys; 600 requests and no limit tokens per 1s; 10 requests and no limit tokens left today"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("theoretical rate 1200.00 requests/s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("20 requests the limits allow today") || stderr.contains("leave 10 tasks"),
        "{stderr}"
    );
    assert!(
        stderr.contains("done: 20 ok, 0 failed, 10 left for a later run"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "left: no key: no key available: every usable key's project has spent its quota"
        ),
        "{stderr}"
    );
    assert_eq!(rows_of(dir.path()).len(), 20);
    assert_eq!(
        fake.fake.stats().all().total(),
        20,
        "no call beyond the day's quota"
    );

    // The state directory remembers today's counts: the next run calls nothing.
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 75, "{stderr}");
    assert!(
        stderr.contains("10 tasks to run (20 done before"),
        "{stderr}"
    );
    assert!(
        stderr.contains("0 requests and no limit tokens left today"),
        "{stderr}"
    );
    assert!(
        stderr.contains("every project has spent today's requests"),
        "{stderr}"
    );
    assert_eq!(fake.fake.stats().all().total(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_key_is_dead_the_tasks_are_left_at_once() {
    when_every_key_is_dead(Lender::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_key_of_a_keylease_server_is_dead_the_tasks_are_left_at_once() {
    when_every_key_is_dead(Lender::Server).await;
}

async fn when_every_key_is_dead(lender: Lender) {
    let keys = keys(2, 1);
    let dead = [("k01", KeyHealth::Leaked), ("k02", KeyHealth::Suspended)];
    let fake = start_fake(&keys, 600, Faults::default(), &dead).await;
    let dir = workdir(&config(&keys, 600), 5);
    let (mut args, _server) = lender.arguments(dir.path()).await;
    args.extend(["prompts.jsonl", "-o", "out.jsonl"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = finish(batch(dir.path(), &fake, &args)).await;
    assert_eq!(code, 75, "{stderr}");
    assert!(
        stderr.contains("left: no key: AllDisabled")
            || stderr.contains("every key of the pool is disabled"),
        "{stderr}"
    );
    assert!(stderr.contains("2 calls"), "{stderr}");
    assert!(rows_of(dir.path()).is_empty(), "no task failed for good");
    assert!(
        fake.fake.stats().all().total() <= 2,
        "each dead key is tried once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_a_server_holds_is_refused() {
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let dir = workdir(&config(&keys, 600), 3);
    let settings = keylease_server::config::load(
        Some(&dir.path().join("keylease.toml")),
        &HashMap::new(),
        &keylease_server::config::Overrides {
            state_dir: Some(dir.path().join("keylease-state")),
            ..Default::default()
        },
    )
    .unwrap();
    let (server_state, _) = keylease_server::shell::State::open(
        &settings,
        keylease_server::clock::Clock::system(),
        false,
    )
    .unwrap();
    let (code, stderr) = finish(batch(
        dir.path(),
        &fake,
        &["prompts.jsonl", "-o", "out.jsonl"],
    ))
    .await;
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("another keylease server"), "{stderr}");
    drop(server_state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_batches_on_one_keylease_server_share_the_quota_without_a_429() {
    let keys = keys(6, 2);
    let faults = Faults {
        latency_ms: 5,
        ..Faults::default()
    };
    let fake = start_fake(&keys, 120, faults, &[]).await;
    let dir = workdir(&config(&keys, 120), 300);
    let (address, _server) = serve(&dir.path().join("keylease.toml")).await;
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for run_dir in [&one, &two] {
        std::fs::copy(
            dir.path().join("prompts.jsonl"),
            run_dir.path().join("prompts.jsonl"),
        )
        .unwrap();
        let args = [
            "prompts.jsonl",
            "-o",
            "out.jsonl",
            "--keylease",
            &address,
            "--concurrency",
            "6",
        ];
        runs.push(tokio::spawn(finish(batch(run_dir.path(), &fake, &args))));
    }
    for run in runs {
        let (code, stderr) = run.await.unwrap();
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stderr.contains(&format!("on keylease at {address}")),
            "{stderr}"
        );
    }
    for run_dir in [&one, &two] {
        assert_each_once(&rows_of(run_dir.path()), 300);
    }
    let all = fake.fake.stats().all();
    assert_eq!(all.status(200), 600, "{all:?}");
    assert_eq!(all.status(429), 0, "{all:?}");
    assert_eq!(all.overlaps, 0, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_a_token_gets_it_from_the_environment() {
    let keys = keys(2, 1);
    let fake = start_fake(&keys, 600, Faults::default(), &[]).await;
    let token = "kl_batch-worker-token-0123456789abcdef";
    let hash: String = keylease_server::auth::token_sha256(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let text = config(&keys, 600)
        + &format!("[[server.tokens]]\nname = \"batch\"\nrole = \"worker\"\nsha256 = \"{hash}\"\n");
    let dir = workdir(&text, 20);
    let (address, _server) = serve(&dir.path().join("keylease.toml")).await;
    let run_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("prompts.jsonl"),
        run_dir.path().join("prompts.jsonl"),
    )
    .unwrap();
    let args = ["prompts.jsonl", "-o", "out.jsonl", "--keylease", &address];
    let (code, stderr) = finish(batch(run_dir.path(), &fake, &args)).await;
    assert_eq!(code, 77, "{stderr}");
    assert!(stderr.contains("does not know this caller"), "{stderr}");
    assert!(rows_of(run_dir.path()).is_empty());

    let mut with_token = batch(run_dir.path(), &fake, &args);
    with_token.env("KEYLEASE_TOKEN", token);
    let (code, stderr) = finish(with_token).await;
    assert_eq!(code, 0, "{stderr}");
    // A worker may lease but not read the status: no plan, and the run goes on.
    assert!(stderr.contains("no plan:"), "{stderr}");
    assert_each_once(&rows_of(run_dir.path()), 20);
    assert!(!stderr.contains(token), "{stderr}");
}

/// A keylease server on a loopback port with the configuration at `path`, until dropped.
async fn serve(path: &Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let settings = keylease_server::config::load(
        Some(path),
        &HashMap::new(),
        &keylease_server::config::Overrides {
            ephemeral: true,
            ..Default::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let source = keylease_server::admin::ConfigSource {
        path: Some(path.to_path_buf()),
        ..Default::default()
    };
    let server = keylease_server::builder::ServerBuilder::new(source, settings)
        .build(keylease_server::builder::GrpcListener::Tcp(listener))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    (address, stop)
}

/// Two runs on one output would each run every task: the second is refused at once (exit 73)
/// naming the first, which finishes with each id once. With no key configured the run exits 69;
/// with no input 66.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_run_on_the_same_output_is_refused_and_missing_things_say_so() {
    let keys = keys(2, 1);
    let faults = Faults {
        latency_ms: 20,
        ..Faults::default()
    };
    let fake = start_fake(&keys, 600, faults, &[]).await;
    let dir = workdir(&config(&keys, 600), 200);
    let args = ["prompts.jsonl", "-o", "out.jsonl", "--concurrency", "2"];
    let mut first = batch(dir.path(), &fake, &args).spawn().unwrap();
    until_lines(&dir.path().join("out.jsonl"), 5).await;
    let second_dir = dir.path();
    let (code, stderr) = finish({
        // The second on its own state, so that only the output is shared.
        let mut command = batch(second_dir, &fake, &args);
        command.arg("--ephemeral");
        command
    })
    .await;
    assert_eq!(code, 73, "{stderr}");
    assert!(
        stderr.contains(&format!("process {}", first.id().unwrap())),
        "{stderr}"
    );
    let status = tokio::time::timeout(PROCESS_LIMIT, first.wait())
        .await
        .expect("the first run ends")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_each_once(&rows_of(dir.path()), 200);

    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("prompts.txt"), "hello\n").unwrap();
    let (code, stderr) = finish(batch(
        empty.path(),
        &fake,
        &["prompts.txt", "-o", "out.jsonl"],
    ))
    .await;
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("no keys"), "{stderr}");
    let (code, stderr) = finish(batch(
        empty.path(),
        &fake,
        &["missing.txt", "-o", "out.jsonl"],
    ))
    .await;
    assert_eq!(code, 66, "{stderr}");
    assert!(stderr.contains("missing.txt"), "{stderr}");
}
