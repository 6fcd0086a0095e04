//! The Rust client against a real server and a real fake Gemini, over real gRPC and HTTP.

mod support;

use fake_gemini::limits::Limits;
use fake_gemini::{Faults, KeyHealth};
use futures_util::StreamExt;
use keylease::pb;
use keylease_client::gemini::{
    Block, GeminiClient, GenerateContentRequest, GenerateError, Generated, LeasedGemini,
    RetryPolicy,
};
use keylease_client::{AcquireOptions, ClientConfig, Error, KeyLeaseClient};
use std::time::Duration;
use support::*;

fn client_for(server: &TestServer) -> KeyLeaseClient {
    KeyLeaseClient::connect(ClientConfig::new(server.address.clone())).unwrap()
}

fn options(task: &str) -> AcquireOptions {
    AcquireOptions::new(task, MODEL)
}

fn leased(server: &TestServer, base_url: &str, policy: RetryPolicy) -> LeasedGemini {
    let gemini = GeminiClient::new(base_url, Duration::from_secs(10)).unwrap();
    LeasedGemini::new(client_for(server), gemini, policy)
}

fn quick_policy() -> RetryPolicy {
    RetryPolicy {
        backoff: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        call_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(60),
        ..RetryPolicy::default()
    }
}

const UNLIMITED: Limits = Limits {
    requests_per_minute: None,
    tokens_per_minute: None,
    requests_per_day: None,
    tokens_per_day: None,
};

#[tokio::test]
async fn a_guard_renews_its_lease_in_the_background() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut watcher = server.watch().await;
    let client = client_for(&server);
    let guard = client
        .acquire(AcquireOptions {
            ttl: Some(Duration::from_millis(300)),
            ..options("renewed")
        })
        .await
        .unwrap();
    let lease_id = guard.lease().lease_id;
    for _ in 0..3 {
        let renewed = next_event(&mut watcher, |k| match k {
            pb::event::Kind::Renewed(e) => Some(e),
            _ => None,
        })
        .await;
        assert_eq!(renewed.lease.unwrap().lease_id, lease_id);
    }
    // Still the holder, three TTLs after the grant.
    assert!(guard.api_key().is_ok());
    guard.release().await.unwrap();
}

#[tokio::test]
async fn a_dropped_guard_releases_with_its_usage() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut watcher = server.watch().await;
    let client = client_for(&server);
    let guard = client
        .acquire(AcquireOptions {
            requests: 3,
            ..options("dropped")
        })
        .await
        .unwrap();
    guard.begin_request(Duration::from_secs(1)).await.unwrap();
    guard.begin_request(Duration::from_secs(1)).await.unwrap();
    guard.record_tokens(120);
    drop(guard);
    let released = next_event(&mut watcher, |k| match k {
        pb::event::Kind::Released(e) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(released.requests_sent, 2);
}

#[tokio::test]
async fn a_fresh_lease_is_not_renewed_before_a_call_longer_than_its_ttl() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut watcher = server.watch().await;
    let guard = client_for(&server).acquire(options("fresh")).await.unwrap();
    // The TTL is the server's default, a minute: a renewal now would gain nothing.
    let (_, allowed) = guard.begin_request(Duration::from_secs(600)).await.unwrap();
    assert!(allowed <= Duration::from_secs(60), "{allowed:?}");
    guard.release().await.unwrap();
    let renewed_or_released = next_event(&mut watcher, |k| match k {
        pb::event::Kind::Renewed(_) => Some("renewed"),
        pb::event::Kind::Released(_) => Some("released"),
        _ => None,
    })
    .await;
    assert_eq!(renewed_or_released, "released");
}

#[tokio::test]
async fn a_guard_never_sends_more_requests_than_granted() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let guard = client_for(&server)
        .acquire(options("budget"))
        .await
        .unwrap();
    guard.begin_request(Duration::from_secs(1)).await.unwrap();
    assert!(matches!(
        guard.begin_request(Duration::from_secs(1)).await,
        Err(Error::BudgetSpent(_))
    ));
    guard.renew(None, 1).await.unwrap();
    guard.begin_request(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn a_call_longer_than_the_lease_is_bounded_by_it() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let guard = client_for(&server)
        .acquire(AcquireOptions {
            ttl: Some(Duration::from_millis(500)),
            ..options("slow")
        })
        .await
        .unwrap();
    let (_, allowed) = guard.begin_request(Duration::from_secs(60)).await.unwrap();
    assert!(
        allowed > Duration::ZERO && allowed <= Duration::from_millis(500),
        "{allowed:?}"
    );
}

#[tokio::test]
async fn a_guard_stops_offering_its_key_at_its_own_deadline() {
    let mut server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let client = client_for(&server);
    let guard = client
        .acquire(AcquireOptions {
            ttl: Some(Duration::from_millis(600)),
            ..options("orphaned")
        })
        .await
        .unwrap();
    // With the service gone, renewals fail: the key must not outlive the lease.
    server.shut_down().await;
    tokio::time::sleep(guard.remaining()).await;
    assert!(matches!(guard.api_key(), Err(Error::LeaseEnded(_))));
}

#[tokio::test]
async fn an_unreachable_service_fails_after_bounded_retries() {
    let unused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let config = ClientConfig {
        attempts: 3,
        retry_backoff: Duration::from_millis(10),
        connect_timeout: Duration::from_millis(500),
        ..ClientConfig::new(address)
    };
    let client = KeyLeaseClient::connect(config).unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(20), client.acquire(options("lonely")))
        .await
        .expect("bounded");
    assert!(
        matches!(acquired, Err(Error::Unreachable { attempts: 3, .. })),
        "{acquired:?}"
    );
}

#[tokio::test]
async fn the_server_checks_bearer_tokens_when_configured() {
    let extra = "[server]\nauth_tokens = [\"s3cret-token\"]\n";
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, extra)).await;
    let refused = client_for(&server)
        .acquire(options("anonymous"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Refused(s) if s.code() == tonic::Code::Unauthenticated),
        "{refused:?}"
    );
    let config = ClientConfig {
        auth_token: Some("s3cret-token".into()),
        ..ClientConfig::new(server.address.clone())
    };
    KeyLeaseClient::connect(config)
        .unwrap()
        .acquire(options("known"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_returns_the_answer_and_reports_the_tokens_used() {
    let keys = [("k1", "p1")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let fake = start_fake(&keys, UNLIMITED, 1.0).await;
    let mut watcher = server.watch().await;
    let calls = leased(&server, &fake.base_url(), quick_policy());
    let request = GenerateContentRequest::text("Say hello in three languages, please.");
    let Generated::Answer(answer) = calls.generate("hello", MODEL, &request).await.unwrap() else {
        panic!("blocked")
    };
    assert!(answer.text().unwrap().starts_with("echo: Say hello"));
    let released = next_event(&mut watcher, |k| match k {
        pb::event::Kind::Released(e) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(released.requests_sent, 1);
    let status = client_for(&server).status().await.unwrap();
    let used = status.quota_groups[0].tokens_per_minute.unwrap().used;
    assert_eq!(
        used,
        fake_gemini::estimate_tokens("Say hello in three languages, please.")
    );
}

#[tokio::test]
async fn safety_blocks_are_outcomes_not_key_failures() {
    let keys = [("k1", "p1")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let fake = start_fake(&keys, UNLIMITED, 1.0).await;
    let calls = leased(&server, &fake.base_url(), quick_policy());
    for (marker, expected) in [
        (
            fake_gemini::BLOCK_PROMPT,
            Block::Prompt {
                reason: "SAFETY".into(),
            },
        ),
        (
            fake_gemini::BLOCK_ANSWER,
            Block::Answer {
                finish_reason: "SAFETY".into(),
            },
        ),
    ] {
        let request = GenerateContentRequest::text(format!("something {marker}"));
        match calls.generate("blocked", MODEL, &request).await.unwrap() {
            Generated::Blocked { block, .. } => assert_eq!(block, expected),
            other => panic!("{other:?}"),
        }
    }
    let status = client_for(&server).status().await.unwrap();
    assert_eq!(status.keys[0].state, pb::KeyState::Available as i32);
}

#[tokio::test]
async fn a_request_error_ends_at_once_with_the_providers_message() {
    let keys = [("k1", "p1")];
    // keylease knows a model the provider does not serve.
    let extra = "[pools.gemini.models.\"gemini-0-retired\"]\nrequests_per_minute = 10\n";
    let server = TestServer::start(&config_toml(&keys, 100, extra)).await;
    let fake = start_fake(&keys, UNLIMITED, 1.0).await;
    let calls = leased(&server, &fake.base_url(), quick_policy());
    let failed = calls
        .generate(
            "old",
            "gemini-0-retired",
            &GenerateContentRequest::text("hi"),
        )
        .await
        .unwrap_err();
    match failed {
        GenerateError::Request {
            status, message, ..
        } => {
            assert_eq!(status, 404);
            assert!(
                message.contains("gemini-0-retired is not found"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.fake.stats().all().total(), 1);
    let status = client_for(&server).status().await.unwrap();
    assert_eq!(
        (status.live_leases, status.keys[0].state),
        (0, pb::KeyState::Available as i32)
    );
}

#[tokio::test]
async fn a_leaked_key_is_disabled_at_its_first_403_and_never_used_again() {
    let keys = [("leaky", "p1"), ("k2", "p2"), ("k3", "p3")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let fake = start_fake(&keys, UNLIMITED, 1.0).await;
    fake.fake.set_health("leaky", KeyHealth::Leaked);
    let calls = leased(&server, &fake.base_url(), quick_policy());
    for job in 0..12 {
        let answer = calls
            .generate(
                &format!("job-{job}"),
                MODEL,
                &GenerateContentRequest::text("hello"),
            )
            .await
            .unwrap();
        assert!(matches!(answer, Generated::Answer(_)));
    }
    let stats = fake.fake.stats();
    assert_eq!(stats.keys["leaky"].total(), 1, "{stats:?}");
    assert_eq!(stats.keys["leaky"].status(403), 1);
    let status = client_for(&server).status().await.unwrap();
    let leaky = status.keys.iter().find(|k| k.key_id == "leaky").unwrap();
    assert_eq!(leaky.state, pb::KeyState::Disabled as i32);
    assert!(
        leaky.disabled_reason.contains("403"),
        "{}",
        leaky.disabled_reason
    );
}

#[tokio::test]
async fn overloaded_answers_are_retried_without_blaming_keys() {
    let keys = [("k1", "p1"), ("k2", "p2")];
    let server = TestServer::start(&config_toml(&keys, 1000, "")).await;
    let fake = start_fake(&keys, UNLIMITED, 1.0).await;
    fake.fake.set_faults(Faults {
        error_rate: 0.4,
        status: 503,
        ..Faults::default()
    });
    let policy = RetryPolicy {
        task_attempts: 20,
        ..quick_policy()
    };
    let calls = leased(&server, &fake.base_url(), policy);
    for job in 0..10 {
        calls
            .generate(
                &format!("job-{job}"),
                MODEL,
                &GenerateContentRequest::text("hello"),
            )
            .await
            .unwrap();
    }
    let stats = fake.fake.stats().all();
    assert!(stats.status(503) > 0, "no fault was injected: {stats:?}");
    assert_eq!(stats.status(200), 10);
    let status = client_for(&server).status().await.unwrap();
    assert!(
        status
            .keys
            .iter()
            .all(|k| k.state == pb::KeyState::Available as i32),
        "{:?}",
        status.keys
    );
    assert!(
        status
            .quota_groups
            .iter()
            .all(|g| g.cooling_until.is_none())
    );
}

#[tokio::test]
async fn a_provider_limit_below_the_configured_one_cools_projects_down_and_jobs_still_finish() {
    let keys = [("a1", "pa"), ("b1", "pb")];
    // keylease believes 600 a minute; the provider allows 3 a (scaled) minute of 1 s.
    let server = TestServer::start(&config_toml(
        &keys,
        600,
        "[quota]\nwindow = \"1s\"\nsafety_margin = \"10ms\"\n",
    ))
    .await;
    let provider = Limits {
        requests_per_minute: Some(3),
        ..UNLIMITED
    };
    let fake = start_fake(&keys, provider, 60.0).await;
    let calls = leased(&server, &fake.base_url(), quick_policy());
    let mut jobs = Vec::new();
    for job in 0..16 {
        let calls = calls.clone();
        jobs.push(tokio::spawn(async move {
            calls
                .generate(
                    &format!("job-{job}"),
                    MODEL,
                    &GenerateContentRequest::text("hello"),
                )
                .await
        }));
    }
    for job in jobs {
        assert!(matches!(job.await.unwrap(), Ok(Generated::Answer(_))));
    }
    let stats = fake.fake.stats().all();
    assert_eq!(stats.status(200), 16);
    assert!(
        stats.status(429) > 0,
        "the provider's lower limit was never hit: {stats:?}"
    );
}

#[tokio::test]
async fn streaming_answers_arrive_as_events_with_cumulative_usage() {
    let keys = [("k1", "p1")];
    let fake = start_fake(&keys, UNLIMITED, 1.0).await;
    let gemini = GeminiClient::new(fake.base_url(), Duration::from_secs(5)).unwrap();
    let request = GenerateContentRequest::text("Stream me a greeting");
    let stream = gemini
        .stream_generate_content(&fake_secret("k1"), MODEL, &request)
        .await
        .unwrap();
    let chunks: Vec<_> = stream.collect().await;
    assert_eq!(chunks.len(), 2);
    let last = chunks.last().unwrap().as_ref().unwrap();
    assert_eq!(last.candidates[0].finish_reason.as_deref(), Some("STOP"));
    let first_usage = chunks[0].as_ref().unwrap().usage_metadata.unwrap();
    assert!(last.usage_metadata.unwrap().total_token_count > first_usage.total_token_count);
}

#[tokio::test]
async fn a_report_rotates_the_guard_to_another_project() {
    let server = TestServer::start(&config_toml(&[("a1", "pa"), ("b1", "pb")], 100, "")).await;
    let client = client_for(&server);
    let guard = client.acquire(options("rotating")).await.unwrap();
    let first_project = guard.project();
    let failure = keylease_client::Failure {
        class: pb::FailureClass::Unspecified,
        kind: pb::FailureKind::RateLimited,
        retry_after: Some(Duration::from_secs(30)),
        detail: "429".into(),
        violations: Vec::new(),
    };
    let next = guard
        .report_failure(failure, Some(Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next.project(), first_project);
}

#[tokio::test]
async fn a_long_provider_message_in_a_non_latin_script_is_reported() {
    let server = TestServer::start(&config_toml(&[("a1", "pa"), ("b1", "pb")], 100, "")).await;
    let mut watcher = server.watch().await;
    let guard = client_for(&server).acquire(options("kanji")).await.unwrap();
    // 700 characters of three bytes each: under 1,024 characters, over 1,024 bytes.
    let failure = keylease_client::Failure {
        class: pb::FailureClass::Unspecified,
        kind: pb::FailureKind::ServerError,
        retry_after: None,
        detail: "内部エラー".repeat(140),
        violations: Vec::new(),
    };
    guard.report_failure(failure, None).await.unwrap();
    let reported = next_event(&mut watcher, |k| match k {
        pb::event::Kind::Failed(e) => Some(e),
        _ => None,
    })
    .await;
    assert!(reported.detail.starts_with("内部エラー"));
    assert!(reported.detail.len() <= keylease::MAX_DETAIL_BYTES);
}
