//! Keys checked with the provider (`[health]`) against a real server and the fake Gemini: dead
//! keys are found before any call is spent on them, a project an operator fixes comes back by
//! itself, a leaked key never does, an operator's disable holds, and an unreachable check
//! endpoint disables nothing.

mod support;

use fake_gemini::KeyHealth;
use keylease::pb;
use std::time::Duration;
use support::*;
use tonic::Code;

fn limits() -> fake_gemini::limits::Limits {
    fake_gemini::limits::Limits {
        requests_per_minute: Some(1_000),
        ..Default::default()
    }
}

const KEYS: [(&str, &str); 4] = [("k1", "p1"), ("k2", "p2"), ("k3", "p3"), ("k4", "p4")];

/// A fake whose k2 is expired (invalid), k3 leaked and k4's project suspended.
async fn fake_with_dead_keys() -> fake_gemini::RunningFake {
    let running = start_fake(&KEYS, limits(), 1.0).await;
    for (key, health) in [
        ("k2", KeyHealth::Expired),
        ("k3", KeyHealth::Leaked),
        ("k4", KeyHealth::Suspended),
    ] {
        assert!(running.fake.set_health(key, health));
    }
    running
}

/// A server checking its keys on `upstream`, its proxy in front of the same upstream.
async fn server_checking(upstream: &str, health: &str) -> TestServer {
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\n[health]\nupstream = \"{upstream}\"\n{health}\n"
    );
    TestServer::start(&config_toml(&KEYS, 1_000, &extra)).await
}

fn key<'a>(status: &'a pb::GetStatusResponse, id: &str) -> &'a pb::KeyStatus {
    status
        .keys
        .iter()
        .find(|k| k.key_id == id)
        .unwrap_or_else(|| panic!("no key {id} in {status:?}"))
}

/// Call `n` through the server's proxy, which must answer 200.
async fn generate_through(server: &TestServer, n: usize) {
    let proxy = server.proxy_url.as_ref().expect("a proxy");
    let answer = reqwest::Client::new()
        .post(format!("{proxy}/v1beta/models/{MODEL}:generateContent"))
        .header("x-goog-api-key", "any")
        .json(&serde_json::json!({"contents":[{"parts":[{"text": format!("call {n}")}]}]}))
        .send()
        .await
        .unwrap();
    let status = answer.status();
    assert_eq!(status, 200, "{}", answer.text().await.unwrap());
}

fn state_of(status: &pb::GetStatusResponse, id: &str) -> pb::KeyState {
    key(status, id).state()
}

#[tokio::test]
async fn dead_keys_are_found_at_start_and_no_call_is_spent_on_them() {
    let fake = fake_with_dead_keys().await;
    let server = server_checking(&fake.base_url(), "").await;
    // The first call through the proxy waits for the first checks rather than meeting a dead key.
    for n in 0..12 {
        generate_through(&server, n).await;
    }
    let stats = fake.fake.stats();
    for dead in ["k2", "k3", "k4"] {
        let counts = &stats.keys[dead];
        assert_eq!(counts.total(), 0, "a call was spent on {dead}: {counts:?}");
        assert_eq!(counts.probes, 1, "{dead} checked once");
    }
    assert_eq!(stats.keys["k1"].status(200), 12);

    let status = server.status().await;
    for (id, problem) in [
        ("k2", pb::KeyProblem::Invalid),
        ("k3", pb::KeyProblem::Leaked),
        ("k4", pb::KeyProblem::Suspended),
    ] {
        let dead = key(&status, id);
        assert_eq!(dead.state(), pb::KeyState::Disabled, "{id}");
        assert_eq!(dead.disabled_by(), pb::Decider::Check, "{id}");
        assert_eq!(dead.problem(), problem, "{id}");
        assert!(dead.disabled_since.is_some(), "{id}");
        let check = dead.last_check.as_ref().unwrap();
        assert_eq!(check.outcome(), pb::CheckOutcome::Refused, "{id}");
    }
    let healthy = key(&status, "k1");
    assert_eq!(healthy.state(), pb::KeyState::Available);
    assert_eq!(
        healthy.last_check.as_ref().unwrap().outcome(),
        pb::CheckOutcome::Fine
    );
}

#[tokio::test]
async fn a_fixed_project_comes_back_by_itself_and_a_leaked_key_never_does() {
    let fake = fake_with_dead_keys().await;
    let server = server_checking(&fake.base_url(), "retry_interval = \"1s\"").await;
    server
        .until_status(Duration::from_secs(10), |s| {
            state_of(s, "k4") == pb::KeyState::Disabled
                && state_of(s, "k3") == pb::KeyState::Disabled
        })
        .await;
    let mut events = server.watch().await;
    // The operator fixes the suspended project; the leaked key is "fixed" too, which Gemini
    // never does: keylease must not look again.
    fake.fake.set_health("k4", KeyHealth::Healthy);
    fake.fake.set_health("k3", KeyHealth::Healthy);
    let status = server
        .until_status(Duration::from_secs(5), |s| {
            state_of(s, "k4") == pb::KeyState::Available
        })
        .await;
    assert_eq!(state_of(&status, "k3"), pb::KeyState::Disabled);
    // The event says a check enabled it.
    let enabled = next_event(&mut events, |kind| match kind {
        pb::event::Kind::Enabled(enabled) => Some(enabled),
        _ => None,
    })
    .await;
    assert_eq!(enabled.key_id, "k4");
    assert_eq!(enabled.by(), pb::Decider::Check);
    // Several retry intervals later, the leaked and the invalid key were checked only at start.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let stats = fake.fake.stats();
    assert_eq!(stats.keys["k3"].probes, 1);
    assert_eq!(stats.keys["k2"].probes, 1);
    assert!(stats.keys["k4"].probes >= 2);
    // Healthy keys are not checked again without an interval.
    assert_eq!(stats.keys["k1"].probes, 1);
    assert_eq!(
        state_of(&server.status().await, "k3"),
        pb::KeyState::Disabled
    );
}

#[tokio::test]
async fn checks_on_demand_answer_each_key_and_an_operators_disable_holds() {
    let fake = fake_with_dead_keys().await;
    let server = server_checking(&fake.base_url(), "").await;
    let mut admin = pb::key_admin_client::KeyAdminClient::connect(server.address.clone())
        .await
        .unwrap();
    server
        .until_status(Duration::from_secs(10), |s| {
            s.keys.iter().all(|k| k.last_check.is_some())
        })
        .await;
    admin
        .disable_key(pb::DisableKeyRequest {
            key_id: "k1".into(),
            reason: "rotating it".into(),
        })
        .await
        .unwrap();
    fake.fake.set_health("k2", KeyHealth::Healthy);
    let checked = admin
        .check_keys(pb::CheckKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let result = |id: &str| {
        checked
            .keys
            .iter()
            .find(|k| k.key_id == id)
            .unwrap_or_else(|| panic!("no result for {id}: {checked:?}"))
    };
    assert_eq!(checked.keys.len(), KEYS.len());
    // Found fine, but an operator disabled it: disabled it stays.
    let k1 = result("k1");
    assert_eq!(k1.check.as_ref().unwrap().outcome(), pb::CheckOutcome::Fine);
    let k1_key = k1.key.as_ref().unwrap();
    assert_eq!(k1_key.state(), pb::KeyState::Disabled);
    assert_eq!(k1_key.disabled_by(), pb::Decider::Operator);
    assert_eq!(k1_key.disabled_reason, "rotating it");
    // Disabled by a check, found fine now: enabled again.
    assert_eq!(
        result("k2").key.as_ref().unwrap().state(),
        pb::KeyState::Available
    );
    let k3 = result("k3").check.as_ref().unwrap();
    assert_eq!(k3.problem(), pb::KeyProblem::Leaked);

    let unknown = admin
        .check_keys(pb::CheckKeysRequest {
            key_ids: vec!["k1".into(), "nope".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("nope"), "{unknown:?}");
}

#[tokio::test]
async fn without_health_checks_on_demand_are_refused_and_keys_lent_at_once() {
    let server = TestServer::start(&config_toml(&KEYS, 1_000, "")).await;
    let mut admin = pb::key_admin_client::KeyAdminClient::connect(server.address.clone())
        .await
        .unwrap();
    let refused = admin
        .check_keys(pb::CheckKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("[health]"), "{refused:?}");
    let status = server.status().await;
    assert!(
        status
            .keys
            .iter()
            .all(|k| k.state() == pb::KeyState::Available && k.last_check.is_none())
    );
}

#[tokio::test]
async fn an_unreachable_check_endpoint_disables_nothing_and_keys_say_unchecked() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let extra = format!("[health]\nupstream = \"{upstream}\"\ntimeout = \"2s\"\n");
    let server = TestServer::start(&config_toml(&KEYS, 1_000, &extra)).await;
    let mut client = server.client().await;
    let lease = client
        .acquire_key(pb::AcquireKeyRequest {
            wait: seconds(10),
            ..acquire("t")
        })
        .await
        .unwrap()
        .into_inner();
    client.release(release(&lease, 1)).await.unwrap();
    let status = server
        .until_status(Duration::from_secs(10), |s| {
            s.keys.iter().all(|k| k.last_check.is_some())
        })
        .await;
    for k in &status.keys {
        assert_eq!(k.state(), pb::KeyState::Unchecked, "{k:?}");
        let check = k.last_check.as_ref().unwrap();
        assert_eq!(check.outcome(), pb::CheckOutcome::NoAnswer);
        assert!(check.detail.contains("unreachable"), "{check:?}");
    }
}

#[tokio::test]
async fn a_key_added_while_checking_waits_for_its_check_and_a_dead_one_is_never_lent() {
    let fake = start_fake(&[("k1", "p1"), ("k5", "p5"), ("k6", "p6")], limits(), 1.0).await;
    fake.fake.set_health("k6", KeyHealth::Leaked);
    let extra = format!("[health]\nupstream = \"{}\"\n", fake.base_url());
    let config = config_toml(&[("k1", "p1")], 1_000, &extra).replace(
        "[key_sources]\nenvironment = false\n",
        "[key_sources]\nenvironment = false\nfile = \"keys.txt\"\n",
    );
    let server = TestServer::start_with_files(&config, &[("keys.txt", "")]).await;
    server
        .until_status(Duration::from_secs(10), |s| {
            state_of(s, "k1") == pb::KeyState::Available
        })
        .await;
    let keys = format!(
        "{} id=k5 project=p5\n{} id=k6 project=p6\n",
        fake_secret("k5"),
        fake_secret("k6")
    );
    std::fs::write(server.config_dir().join("keys.txt"), keys).unwrap();
    let mut admin = pb::key_admin_client::KeyAdminClient::connect(server.address.clone())
        .await
        .unwrap();
    admin.reload(pb::ReloadRequest {}).await.unwrap();
    let status = server
        .until_status(Duration::from_secs(10), |s| {
            state_of(s, "k5") == pb::KeyState::Available
                && state_of(s, "k6") == pb::KeyState::Disabled
        })
        .await;
    assert_eq!(key(&status, "k6").problem(), pb::KeyProblem::Leaked);
    // Every key lent in turn: never k6.
    let mut client = server.client().await;
    for n in 0..6 {
        let lease = client
            .acquire_key(acquire(&format!("t{n}")))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(lease.key_id, "k6");
        client.release(release(&lease, 0)).await.unwrap();
    }
    assert_eq!(fake.fake.stats().keys["k6"].total(), 0);
}

/// The proxy says how long each call took; the key's record in the status keeps its calls and
/// latency (the engine's tests show a key whose calls time out lent less, never not at all).
#[tokio::test]
async fn the_proxys_calls_are_timed_into_their_keys_record() {
    let fake = start_fake_with(
        &[("k1", "p1")],
        limits(),
        &[],
        1.0,
        fake_gemini::Faults {
            latency_ms: 50,
            ..Default::default()
        },
    )
    .await;
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        fake.base_url()
    );
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 1_000, &extra)).await;
    for n in 0..5 {
        generate_through(&server, n).await;
    }
    let status = server.status().await;
    let record = key(&status, "k1").performance.clone().unwrap();
    assert_eq!(record.calls, 5);
    let p50 = record.latency_p50.unwrap();
    let p50_ms = p50.seconds * 1_000 + i64::from(p50.nanos / 1_000_000);
    assert!((64..=1_024).contains(&p50_ms), "{record:?}");
    assert!(record.failures.is_empty(), "{record:?}");
}
