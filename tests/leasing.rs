//! End to end over real gRPC on loopback: the leasing rules as a worker sees them.

mod support;

use keylease::pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn concurrent_tasks_competing_for_few_keys_never_share_one() {
    let server = TestServer::start(&config_toml(
        &[("k1", "p1"), ("k2", "p2"), ("k3", "p3")],
        10_000,
        "",
    ))
    .await;
    let holders: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut jobs = Vec::new();
    for job in 0..24 {
        let mut client = server.client().await;
        let holders = holders.clone();
        jobs.push(tokio::spawn(async move {
            for round in 0..5 {
                let task = format!("job-{job}-{round}");
                let request = pb::AcquireKeyRequest {
                    wait: seconds(30),
                    ..acquire(&task)
                };
                let lease = client.acquire_key(request).await.unwrap().into_inner();
                let previous = holders
                    .lock()
                    .unwrap()
                    .insert(lease.key_id.clone(), task.clone());
                assert_eq!(previous, None, "{} was lent twice", lease.key_id);
                tokio::task::yield_now().await;
                holders.lock().unwrap().remove(&lease.key_id);
                assert!(
                    client
                        .release(release(&lease, 1))
                        .await
                        .unwrap()
                        .into_inner()
                        .released
                );
            }
        }));
    }
    for job in jobs {
        job.await.unwrap();
    }
    let status = server.status().await;
    assert_eq!(status.live_leases, 0);
    let used: u64 = status
        .quota_groups
        .iter()
        .map(|g| g.requests_per_minute.unwrap().used)
        .sum();
    assert_eq!(used, 24 * 5);
}

#[tokio::test]
async fn a_waiter_is_woken_by_a_release() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let (mut client, held, waiter) = server.held_with_waiter("waiter", 30).await;
    client.release(release(&held, 1)).await.unwrap();
    let lease = waiter.await.unwrap().unwrap().into_inner();
    assert_eq!(lease.key_id, "k1");
    assert!(lease.fencing_token > held.fencing_token);
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_and_its_holder_refused() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let short = pb::AcquireKeyRequest {
        ttl: millis(200),
        ..acquire("crashed-worker")
    };
    let lost = client.acquire_key(short).await.unwrap().into_inner();
    // The next task waits for the key; the expiry, not a release, hands it over.
    let next = client
        .acquire_key(pb::AcquireKeyRequest {
            wait: seconds(30),
            ..acquire("next")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.key_id, "k1");
    assert!(next.fencing_token > lost.fencing_token);

    let renew = pb::RenewLeaseRequest {
        lease_id: lost.lease_id.clone(),
        fencing_token: lost.fencing_token,
        ..Default::default()
    };
    let refused = client.renew_lease(renew).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Releasing what already ended succeeds and changes nothing.
    assert!(
        !client
            .release(release(&lost, 1))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}

#[tokio::test]
async fn a_stale_fencing_token_is_refused() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let lease = client.acquire_key(acquire("a")).await.unwrap().into_inner();
    let forged = pb::ReportFailureRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token + 7,
        kind: pb::FailureKind::RateLimited as i32,
        ..Default::default()
    };
    let refused = client.report_failure(forged).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("fencing token"),
        "{}",
        refused.message()
    );
    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.keys[0].leases[0].lease_id, lease.lease_id);
    assert!(
        status
            .quota_groups
            .iter()
            .all(|g| g.cooling_until.is_none())
    );
}

#[tokio::test]
async fn a_rate_limit_report_rotates_and_a_second_in_a_row_rests_the_project() {
    let keys = [("a1", "pa"), ("a2", "pa"), ("b1", "pb")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let mut client = server.client().await;
    let in_pa = |task: &str| pb::AcquireKeyRequest {
        exclude_key_ids: vec!["b1".into()],
        ..acquire(task)
    };
    let report = |lease: &pb::Lease, rotate: bool| pb::ReportFailureRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        kind: pb::FailureKind::RateLimited as i32,
        retry_after: seconds(26),
        detail: "429 RESOURCE_EXHAUSTED".into(),
        rotate,
        requests_sent: Some(1),
        ..Default::default()
    };
    let lease = client.acquire_key(in_pa("job")).await.unwrap().into_inner();
    assert_eq!(lease.project, "pa");
    let reported = client
        .report_failure(report(&lease, true))
        .await
        .unwrap()
        .into_inner();
    let replacement = reported.replacement.expect("a replacement");
    assert_ne!(replacement.key_id, lease.key_id);
    // One 429 without a figure is noise as often as not (issue 24): it rests nothing, though
    // it named a retry delay; the task goes on with another key.
    let failed_key = reported.key.unwrap();
    assert_eq!(failed_key.key_id, lease.key_id);
    assert_ne!(failed_key.state, pb::KeyState::CoolingDown as i32);
    client.release(release(&replacement, 0)).await.unwrap();

    // A second in a row, with no acceptance between: the project rests for the retry delay,
    // and its other key is not lent either.
    let second = client
        .acquire_key(in_pa("job2"))
        .await
        .unwrap()
        .into_inner();
    let reported = client
        .report_failure(report(&second, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reported.key.unwrap().state,
        pb::KeyState::CoolingDown as i32
    );
    let refused = client.acquire_key(in_pa("other")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    for key in ["a1", "a2"] {
        let key = status.keys.iter().find(|k| k.key_id == key).unwrap();
        assert_eq!(key.state, pb::KeyState::CoolingDown as i32, "{key:?}");
    }
    let pa = status
        .quota_groups
        .iter()
        .find(|g| g.project == "pa")
        .unwrap();
    // Two 429s without a figure are no limit (issue 24: one once lowered the project to one
    // request a window); they are kept as evidence.
    let learned = pa.requests_per_minute_limit.as_ref().unwrap();
    assert_eq!((learned.configured, learned.learned), (100, None));
    let evidence = pa.evidence.as_ref().unwrap();
    assert_eq!(evidence.window.as_ref().unwrap().refused, 2);
    assert!(pa.last_429.is_some());
}

#[tokio::test]
async fn an_invalid_key_report_disables_it_and_rotation_says_why_none_is_left() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let lease = client
        .acquire_key(acquire("job"))
        .await
        .unwrap()
        .into_inner();
    let report = pb::ReportFailureRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        kind: pb::FailureKind::InvalidKey as i32,
        detail: "API_KEY_INVALID".into(),
        rotate: true,
        replacement_wait: seconds(30),
        ..Default::default()
    };
    let reported = client.report_failure(report).await.unwrap().into_inner();
    assert_eq!(reported.key.unwrap().state, pb::KeyState::Disabled as i32);
    let none = reported
        .replacement_unavailable
        .expect("no replacement, and why");
    assert_eq!(none.reason, pb::UnavailableReason::AllDisabled as i32);
}

#[tokio::test]
async fn no_key_left_carries_the_reason_and_when_to_retry() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    client
        .acquire_key(pb::AcquireKeyRequest {
            ttl: seconds(30),
            ..acquire("holder")
        })
        .await
        .unwrap();
    let refused = client.acquire_key(acquire("late")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.get_details_error_info().unwrap().reason,
        "ALL_LEASED"
    );
    let delay = refused
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        delay > Duration::from_secs(25) && delay <= Duration::from_secs(30),
        "{delay:?}"
    );
    let header: u64 = refused
        .metadata()
        .get("retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(header, delay.as_millis() as u64);
    let reason = refused.metadata().get("unavailable-reason").unwrap();
    assert_eq!(reason, "UNAVAILABLE_REASON_ALL_LEASED");
}

#[tokio::test]
// The deprecated SetKeyEnabled keeps working for one release: still tested.
#[allow(deprecated)]
async fn when_every_key_is_disabled_a_waiting_acquire_fails_at_once() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let disable = pb::SetKeyEnabledRequest {
        key_id: "k1".into(),
        enabled: false,
        reason: "revoked in the console".into(),
    };
    let key = client.set_key_enabled(disable).await.unwrap().into_inner();
    assert_eq!(
        (key.state, key.disabled_reason.as_str()),
        (pb::KeyState::Disabled as i32, "revoked in the console")
    );
    let waiting = client.acquire_key(pb::AcquireKeyRequest {
        wait: seconds(300),
        ..acquire("job")
    });
    let refused = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("failed at once")
        .unwrap_err();
    assert_eq!(
        refused.get_details_error_info().unwrap().reason,
        "ALL_DISABLED"
    );
}

#[tokio::test]
async fn a_waiter_that_disconnects_leaves_the_line_and_gets_nothing() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let (mut client, held, gone) = server.held_with_waiter("gone", 60).await;
    gone.abort();
    until_waiting(&mut client, 0).await;
    client.release(release(&held, 1)).await.unwrap();
    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.live_leases, 0);
}

#[tokio::test]
async fn watchers_see_grants_and_releases() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let mut events = server.watch().await;
    let lease = client
        .acquire_key(acquire("job"))
        .await
        .unwrap()
        .into_inner();
    client.release(release(&lease, 1)).await.unwrap();
    let granted = events.message().await.unwrap().unwrap();
    let Some(pb::event::Kind::Granted(granted)) = granted.kind else {
        panic!("{granted:?}")
    };
    assert_eq!(granted.lease.unwrap().lease_id, lease.lease_id);
    let released = events.message().await.unwrap().unwrap();
    let Some(pb::event::Kind::Released(released)) = released.kind else {
        panic!("{released:?}")
    };
    assert_eq!(
        (released.key_id.as_str(), released.requests_sent),
        ("k1", 1)
    );
}

#[tokio::test]
// The deprecated SetKeyEnabled keeps working for one release: still tested.
#[allow(deprecated)]
async fn bad_requests_name_the_field_and_the_server_keeps_serving() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let cases: Vec<(pb::AcquireKeyRequest, Code, &str)> = vec![
        (acquire(""), Code::InvalidArgument, "task_id: empty"),
        (
            acquire(&"t".repeat(300)),
            Code::InvalidArgument,
            "task_id: 300 bytes",
        ),
        (
            pb::AcquireKeyRequest {
                pool: "openai".into(),
                ..acquire("t")
            },
            Code::InvalidArgument,
            "pool: unknown pool",
        ),
        (
            pb::AcquireKeyRequest {
                model: "gemini-9".into(),
                ..acquire("t")
            },
            Code::InvalidArgument,
            "model: unknown model",
        ),
        (
            pb::AcquireKeyRequest {
                ttl: seconds(0),
                ..acquire("t")
            },
            Code::InvalidArgument,
            "ttl: must be above zero",
        ),
        (
            pb::AcquireKeyRequest {
                ttl: seconds(86_400),
                ..acquire("t")
            },
            Code::InvalidArgument,
            "ttl: 1day",
        ),
        (
            pb::AcquireKeyRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..acquire("t")
            },
            Code::InvalidArgument,
            "ttl: must not be negative",
        ),
        (
            pb::AcquireKeyRequest {
                wait: seconds(86_400),
                ..acquire("t")
            },
            Code::InvalidArgument,
            "wait: 1day is above",
        ),
        (
            pb::AcquireKeyRequest {
                requests: u32::MAX,
                ..acquire("t")
            },
            Code::InvalidArgument,
            "requests: 4294967295 is above",
        ),
        (
            pb::AcquireKeyRequest {
                requests: 101,
                ..acquire("t")
            },
            Code::InvalidArgument,
            "requests: 101 exceeds the limit of 100",
        ),
    ];
    for (request, code, message) in cases {
        let status = client.acquire_key(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().starts_with(message),
            "{:?} does not start with {message:?}",
            status.message()
        );
    }
    // Ids below the next fencing token may have been granted by an earlier run: only one
    // above it is certainly unknown.
    let unknown = client
        .release(pb::ReleaseRequest {
            lease_id: "lease-18446744073709551615".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), unknown.message()),
        (
            Code::NotFound,
            "lease_id: no lease lease-18446744073709551615"
        )
    );
    let bad_kind = pb::ReportFailureRequest {
        lease_id: "lease-1".into(),
        kind: 99,
        ..Default::default()
    };
    assert_eq!(
        client.report_failure(bad_kind).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let bad_page = pb::GetStatusRequest {
        page_token: "xyz".into(),
        ..Default::default()
    };
    assert_eq!(
        client.get_status(bad_page).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let unknown_key = pb::SetKeyEnabledRequest {
        key_id: "nope".into(),
        enabled: true,
        reason: String::new(),
    };
    assert_eq!(
        client
            .set_key_enabled(unknown_key)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    client.acquire_key(acquire("still-served")).await.unwrap();
}

#[tokio::test]
// The deprecated SetKeyEnabled keeps working for one release: still tested.
#[allow(deprecated)]
async fn secrets_in_free_text_are_masked_for_every_viewer() {
    let keys = [("k1", "p1"), ("k2", "p2"), ("k3", "p3")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let mut client = server.client().await;
    let mut events = server.watch().await;
    // A key of ours, and one shaped like a Google key that keylease never saw.
    let ours = fake_secret("k1");
    let foreign = format!("AIza{}", "Q7_-x".repeat(7));
    let leaked =
        |text: &str| text.contains(&ours[4..ours.len() - 4]) || text.contains(&foreign[4..35]);

    let lease = client
        .acquire_key(acquire("t1"))
        .await
        .unwrap()
        .into_inner();
    let report = pb::ReportFailureRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        kind: pb::FailureKind::InvalidKey as i32,
        detail: format!("API key not valid. key={ours}; also tried {foreign}"),
        ..Default::default()
    };
    let reply = client.report_failure(report).await.unwrap().into_inner();
    let reason = reply.key.unwrap().disabled_reason;
    assert!(!leaked(&reason) && reason.contains("AIza…"), "{reason}");

    let disable = pb::SetKeyEnabledRequest {
        key_id: "k2".into(),
        enabled: false,
        reason: format!("rotated, the old one was {}", fake_secret("k2")),
    };
    let k2 = client.set_key_enabled(disable).await.unwrap().into_inner();
    assert!(
        !k2.disabled_reason.contains(&fake_secret("k2")[4..40]),
        "{}",
        k2.disabled_reason
    );

    let task = client
        .acquire_key(acquire(&format!("job-{ours}")))
        .await
        .unwrap()
        .into_inner();
    assert!(!leaked(&task.task_id), "{}", task.task_id);
    let refused = client
        .acquire_key(pb::AcquireKeyRequest {
            model: ours.clone(),
            ..acquire("t2")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(!leaked(refused.message()), "{}", refused.message());

    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut seen = format!("{status:?}");
    for _ in 0..4 {
        seen.push_str(&format!("{:?}", events.message().await.unwrap().unwrap()));
    }
    assert!(
        !leaked(&seen) && !seen.contains(&fake_secret("k2")),
        "{seen}"
    );
    assert!(
        seen.contains("disabled_reason: \"invalid key: API key not valid."),
        "{seen}"
    );
}

#[tokio::test]
async fn a_release_that_says_nothing_books_the_whole_grant() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let request = pb::AcquireKeyRequest {
        requests: 2,
        estimated_input_tokens: 500,
        ..acquire("minimal")
    };
    let lease = client.acquire_key(request).await.unwrap().into_inner();
    // What a client written from the proto sends when it fills in only what it must.
    let minimal = pb::ReleaseRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        ..Default::default()
    };
    let released = client.release(minimal).await.unwrap().into_inner();
    assert_eq!(
        (
            released.released,
            released.requests_booked,
            released.input_tokens_booked
        ),
        (true, 2, 500)
    );
    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.quota_groups[0].requests_per_minute.unwrap().used, 2);
}

#[tokio::test]
async fn absurd_usage_figures_book_no_more_than_the_grant_and_the_ceiling() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let lease = client
        .acquire_key(acquire("liar"))
        .await
        .unwrap()
        .into_inner();
    let release = pb::ReleaseRequest {
        lease_id: lease.lease_id.clone(),
        fencing_token: lease.fencing_token,
        requests_sent: Some(u32::MAX),
        input_tokens: Some(u64::MAX),
        call_duration: None,
    };
    let released = client.release(release).await.unwrap().into_inner();
    assert_eq!(
        (released.requests_booked, released.input_tokens_booked),
        (1, keylease::MAX_INPUT_TOKENS)
    );
    let status = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.quota_groups[0].requests_per_day.unwrap().used, 1);
}

#[tokio::test]
async fn status_masks_every_secret_and_pages_through_keys() {
    let keys = [("k1", "p1"), ("k2", "p1"), ("k3", "p2")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let mut client = server.client().await;
    let first = client
        .get_status(pb::GetStatusRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.keys.len(), first.total_keys), (2, 3));
    assert!(!first.next_page_token.is_empty());
    let rest = pb::GetStatusRequest {
        page_size: 2,
        page_token: first.next_page_token.clone(),
        ..Default::default()
    };
    let second = client.get_status(rest).await.unwrap().into_inner();
    assert_eq!(
        (second.keys.len(), second.next_page_token.as_str()),
        (1, "")
    );
    let text = format!("{first:?}{second:?}");
    for (id, _) in keys {
        assert!(!text.contains(&fake_secret(id)), "a secret in the status");
    }
    assert_eq!(first.keys[0].masked_key, "AIza…0000");
    // Tokens are opaque: an offset, the largest number, or a token naming no key (hex of
    // "k9") is refused by name, and the server keeps serving.
    for token in ["2", "18446744073709551615", "p1.6b39", "p1.zz"] {
        let request = pb::GetStatusRequest {
            page_token: token.into(),
            ..Default::default()
        };
        let refused = client.get_status(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().starts_with("page_token: "),
            "{}",
            refused.message()
        );
    }
    client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_tells_waiters_and_finishes() {
    let mut server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let (_client, _held, waiter) = server.held_with_waiter("waiter", 60).await;
    let mut watcher = server.watch().await;
    server.shut_down().await;
    let refused = waiter.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // The event stream ends rather than holding the shutdown up.
    assert!(matches!(watcher.message().await, Ok(None) | Err(_)));
}
