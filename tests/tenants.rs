//! Tenants over real gRPC: a more urgent class goes first whatever the order of arrival, a
//! class above the tenant's is lowered and the lease says so, only a tenant allowed to may
//! name another, and without `[tenants]` nothing changes. The fair shares between tenants are
//! the engine's (its tests measure them).

mod support;

use keylease::pb;
use keylease_server::auth::token_sha256;
use support::*;
use tonic::Code;

const CHAT: &str = "kl_chat-token-for-the-tenant-tests";
const NIGHTLY: &str = "kl_nightly-token-for-the-tenant-tests";
const GATEWAY: &str = "kl_gateway-token-for-the-tenant-tests";
const OPS: &str = "kl_ops-token-for-the-tenant-tests";

fn tokens_and_tenants() -> String {
    let tokens: String = [
        ("chat", "worker", CHAT),
        ("nightly", "worker", NIGHTLY),
        ("gateway", "worker", GATEWAY),
        ("ops", "admin", OPS),
    ]
    .iter()
    .map(|(name, role, token)| {
        let hash: String = token_sha256(token)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("[[server.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{hash}\"\n")
    })
    .collect();
    format!(
        "{tokens}\n[tenants.chat]\npriority = \"interactive\"\nshare = 3\n\n[tenants.nightly]\npriority = \"batch\"\n\n[tenants.gateway]\nmay_name_tenants = true\n"
    )
}

fn asking(task: &str, priority: pb::Priority, wait_seconds: u64) -> pb::AcquireKeyRequest {
    pb::AcquireKeyRequest {
        priority: priority as i32,
        wait: seconds(wait_seconds),
        ..acquire(task)
    }
}

/// Waits until the operator sees `expected` waiters in line; the lines then.
async fn until_waiting_as_ops(server: &TestServer, expected: u32) -> Vec<pb::WaitingCount> {
    let mut ops = raw_with_token(server, OPS).await;
    for _ in 0..2_000 {
        let status = ops
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if status.waiting.iter().map(|w| w.waiters).sum::<u32>() == expected {
            return status.waiting;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("the server never reported {expected} waiters");
}

#[tokio::test]
async fn an_interactive_call_goes_before_batch_calls_that_waited_longer() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, &tokens_and_tenants())).await;
    let mut nightly = raw_with_token(&server, NIGHTLY).await;
    let held = nightly
        .acquire_key(acquire("holder"))
        .await
        .unwrap()
        .into_inner();
    let mut waiting_nightly = raw_with_token(&server, NIGHTLY).await;
    let batch = tokio::spawn(async move {
        waiting_nightly
            .acquire_key(asking("n1", pb::Priority::Batch, 20))
            .await
    });
    until_waiting_as_ops(&server, 1).await;
    let mut chat = raw_with_token(&server, CHAT).await;
    let interactive = tokio::spawn(async move {
        chat.acquire_key(asking("c1", pb::Priority::Interactive, 20))
            .await
    });
    let lines = until_waiting_as_ops(&server, 2).await;
    let by_tenant: Vec<(&str, pb::Priority, u32)> = lines[0]
        .tenants
        .iter()
        .map(|t| (t.tenant.as_str(), t.priority(), t.waiters))
        .collect();
    assert_eq!(
        by_tenant,
        vec![
            ("chat", pb::Priority::Interactive, 1),
            ("nightly", pb::Priority::Batch, 1)
        ]
    );
    nightly.release(release(&held, 1)).await.unwrap();
    let first = interactive.await.unwrap().unwrap().into_inner();
    assert_eq!(first.priority(), pb::Priority::Interactive);
    assert!(!batch.is_finished(), "the batch call waits on");
    let mut chat = raw_with_token(&server, CHAT).await;
    chat.release(release(&first, 1)).await.unwrap();
    let second = batch.await.unwrap().unwrap().into_inner();
    assert_eq!(second.priority(), pb::Priority::Batch);
    // Counted by tenant and class (the holder's lease too: nightly's, lowered to batch).
    let series = |tenant: &str, priority: &str| {
        format!("keylease_tenant_grants_total{{tenant=\"{tenant}\",priority=\"{priority}\"}}")
    };
    assert_eq!(server.metric(&series("chat", "interactive")).await, 1.0);
    assert_eq!(server.metric(&series("nightly", "batch")).await, 2.0);
}

#[tokio::test]
async fn a_class_above_the_tenants_is_lowered_and_the_lease_says_so() {
    let server = TestServer::start(&config_toml(
        &[("k1", "p1"), ("k2", "p1")],
        100,
        &tokens_and_tenants(),
    ))
    .await;
    let mut nightly = raw_with_token(&server, NIGHTLY).await;
    let lease = nightly
        .acquire_key(asking("urgent-nightly", pb::Priority::Interactive, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.priority(), pb::Priority::Batch);
    // Unset is normal, lowered too for a tenant of batch alone.
    let mut gateway = raw_with_token(&server, GATEWAY).await;
    let lease = gateway
        .acquire_key(acquire("plain"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.priority(), pb::Priority::Normal);
    // A number that is no class is refused, by name.
    let refused = gateway
        .acquire_key(pb::AcquireKeyRequest {
            priority: 9,
            ..acquire("odd")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("priority: 9"), "{refused:?}");
}

#[tokio::test]
async fn only_a_tenant_allowed_to_may_name_another_and_only_a_configured_one() {
    let server = TestServer::start(&config_toml(
        &[("k1", "p1"), ("k2", "p1")],
        100,
        &tokens_and_tenants(),
    ))
    .await;
    let mut chat = raw_with_token(&server, CHAT).await;
    let refused = chat
        .acquire_key(pb::AcquireKeyRequest {
            tenant: "nightly".into(),
            ..acquire("borrowing")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("may_name_tenants"),
        "{refused:?}"
    );
    let mut gateway = raw_with_token(&server, GATEWAY).await;
    let lease = gateway
        .acquire_key(pb::AcquireKeyRequest {
            tenant: "chat".into(),
            ..asking("for-chat", pb::Priority::Interactive, 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.priority(), pb::Priority::Interactive);
    // A secret put where a tenant's name goes is masked in the refusal that quotes it.
    let secret = fake_secret("k1");
    let refused = gateway
        .acquire_key(pb::AcquireKeyRequest {
            tenant: secret.clone(),
            ..acquire("ghost")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("not configured"), "{refused:?}");
    assert!(!refused.message().contains(&secret), "{refused:?}");
}

#[tokio::test]
async fn without_tenants_a_class_changes_nothing_and_no_tenant_can_be_named() {
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, "")).await;
    let mut client = server.client().await;
    let lease = client
        .acquire_key(asking("a", pb::Priority::Interactive, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.priority(), pb::Priority::Unspecified);
    let refused = client
        .acquire_key(pb::AcquireKeyRequest {
            tenant: "team".into(),
            ..acquire("b")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("no [tenants]"), "{refused:?}");
}
