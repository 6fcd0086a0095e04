//! The proxy as operators run it: inside `keylease-server` (`[proxy] listen`), and on its own
//! as `keylease-proxy` against a remote keylease with each caller's token.

mod support;

use fake_gemini::limits::Limits;
use fake_gemini::{FakeConfig, FakeGemini, FakeKey, KeyHealth, RunningFake};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const PROXY: &str = env!("CARGO_BIN_EXE_keylease-proxy");
const MODEL: &str = "gemini-2.5-flash";
const SECRET: &str = "AIzaFAKE.proxy-binary-test-key-0000000001";
const WORKER_TOKEN: &str = "kl_proxy_binary_worker_token_000000000001";

async fn fake() -> RunningFake {
    FakeGemini::start(FakeConfig {
        keys: vec![FakeKey {
            id: "k1".into(),
            secret: SECRET.into(),
            project: "p1".into(),
            health: KeyHealth::Healthy,
        }],
        models: [(
            MODEL.to_string(),
            Limits {
                requests_per_minute: Some(100),
                ..Limits::default()
            },
        )]
        .into(),
        projects: Default::default(),
        time_scale: 1.0,
        faults: Default::default(),
        seed: 1,
    })
    .await
    .unwrap()
}

/// A config file with one key, a worker token when `with_token`, and `extra`.
fn config(with_token: bool, extra: &str) -> String {
    let dir = support::scratch_dir("proxy-binaries");
    let mut text = format!(
        "{extra}\n[key_sources]\nenvironment = false\n\n[pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = 100\n\n[[keys]]\nid = \"k1\"\nproject = \"p1\"\nsecret = \"{SECRET}\"\n"
    );
    if with_token {
        let hash: String = keylease_server::auth::token_sha256(WORKER_TOKEN)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        text = format!(
            "[[server.tokens]]\nname = \"workers\"\nrole = \"worker\"\nsha256 = \"{hash}\"\n\n{text}"
        );
    }
    let path = dir.join("keylease.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The proxy address a process logs once it serves, or everything it printed if it stopped.
fn proxy_address(child: &mut Child) -> Result<String, String> {
    let stderr = child.stderr.take().unwrap();
    let (found, address) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("proxy at http://").nth(1) {
                let address: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"')
                    .collect();
                let _ = found.send(Ok(address));
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = found.send(Err(seen));
    });
    address
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| Err("nothing within 30 s".into()))
}

async fn generate(address: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!(
            "http://{address}/v1beta/models/{MODEL}:generateContent"
        ))
        .json(&serde_json::json!({"contents": [{"parts": [{"text": "hi"}]}]}));
    if let Some(token) = token {
        request = request.header("x-goog-api-key", token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_server_serves_the_proxy_it_is_configured_with() {
    let fake = fake().await;
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        fake.base_url()
    );
    let config = config(true, &extra);
    let server = support::start(&config, &[]);
    let url = server.proxy_url();
    let address = url.trim_start_matches("http://");
    assert_eq!(generate(address, Some(WORKER_TOKEN)).await.status(), 200);
    assert_eq!(generate(address, None).await.status(), 401);
    assert_eq!(fake.fake.stats().all().status(200), 1);
    assert!(!server.output().contains(SECRET));
}

#[tokio::test]
async fn keylease_proxy_leases_from_a_remote_keylease_with_each_callers_token() {
    let fake = fake().await;
    let server = support::start(&config(true, ""), &[]);
    let mut proxy = Command::new(PROXY)
        .args(["--keylease", &format!("http://{}", server.address)])
        .args(["--listen", "127.0.0.1:0", "--upstream", &fake.base_url()])
        .args(["--listing-model", MODEL])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = proxy_address(&mut proxy).unwrap();
    assert_eq!(generate(&address, Some(WORKER_TOKEN)).await.status(), 200);
    assert_eq!(generate(&address, Some("kl_unknown")).await.status(), 401);
    let listing = reqwest::Client::new()
        .get(format!("http://{address}/v1beta/models"))
        .header("x-goog-api-key", WORKER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 200);
    assert_eq!(fake.fake.stats().unknown_keys, 0);
    let _ = proxy.kill();
    let _ = proxy.wait();

    // Off loopback it serves, keylease checking tokens.
    let mut open = Command::new(PROXY)
        .args(["--keylease", &format!("http://{}", server.address)])
        .args(["--listen", "0.0.0.0:0", "--upstream", &fake.base_url()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(proxy_address(&mut open).is_ok());
    let _ = open.kill();
    let _ = open.wait();
}

#[test]
fn keylease_proxy_refuses_to_serve_off_loopback_for_a_keylease_without_tokens() {
    let server = support::start(&config(false, ""), &[]);
    let output = Command::new(PROXY)
        .args(["--keylease", &format!("http://{}", server.address)])
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lends keys without a token"), "{stderr}");

    for (flag, value) in [
        ("--upstream", "ftp://x"),
        ("--max-body", "10"),
        ("--wait", "0s"),
    ] {
        let output = Command::new(PROXY)
            .args(["--keylease", "http://127.0.0.1:1", flag, value])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
}

/// Under the open-file limit systemd gives a service by default (1,024), 1,141 connections to
/// the proxy that send a request line and a `Host` header and nothing more cannot exhaust the
/// process: the caps are fitted to the limit (the gRPC port first), the proxy refuses what does
/// not fit, its header timeout closes the rest, and the gRPC port serves throughout. A body
/// announced as 10^12 bytes of which one comes is answered 408 within the body timeout.
#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "how long the server held connections, in real time"
)]
fn idle_proxy_connections_cannot_exhaust_the_process() {
    use std::io::{Read, Write};
    // This test holds more connections than the server may.
    let _ = rlimit::increase_nofile_limit(8192);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(fake());
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\nidle_timeout = \"3s\"\n",
        fake.base_url()
    );
    let config = config(false, &extra);
    let server = support::try_start_wrapped(
        &["prlimit", "--nofile=1024:1024", "--"],
        "127.0.0.1:0",
        &config,
        &[],
        &["--ephemeral"],
    )
    .unwrap_or_else(|output| panic!("the server did not start under prlimit:\n{output}"));
    let proxy = server.proxy_url().trim_start_matches("http://").to_string();
    assert!(
        server.output().contains("proxy.max_connections 1024 → 256"),
        "{}",
        server.output()
    );
    let grpc_status = || {
        runtime.block_on(async {
            let channel =
                tonic::transport::Channel::from_shared(format!("http://{}", server.address))
                    .unwrap()
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
            keylease::pb::key_lease_client::KeyLeaseClient::new(channel)
                .get_status(keylease::pb::GetStatusRequest::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    };

    let mut idle = Vec::new();
    for n in 0..1141 {
        let mut stream = std::net::TcpStream::connect(&proxy).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
        idle.push(stream);
        if n % 300 == 299 {
            grpc_status()
                .unwrap_or_else(|e| panic!("gRPC refused with {n} idle proxy connections: {e}"));
        }
    }
    grpc_status().expect("gRPC serves while the proxy is full");
    // Every one of them is closed by the server within the header timeout and a margin.
    let began = std::time::Instant::now();
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(6)))
            .unwrap();
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "idle connections were held {:?}",
        began.elapsed()
    );
    drop(idle);

    // A body that never comes.
    let mut slow = std::net::TcpStream::connect(&proxy).unwrap();
    slow.write_all(
        format!(
            "POST /v1beta/models/{MODEL}:generateContent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    grpc_status().expect("gRPC still serves");
    let output = server.output();
    assert!(!output.contains("Too many open files"), "{output}");
    assert!(output.contains("proxy connection refused"), "{output}");
}
