//! The crash loop: clients acquire (waiting too), renew, report and release against the real
//! `keylease-server` binary, which is killed with SIGKILL at random moments and started again on
//! the same state directory. Every reply a client got is recorded, with when it asked and when
//! it was answered; the audit then checks what the server acknowledged, across all the restarts:
//!
//! - no two leases on one key slot overlap (a later grant was answered after the earlier lease
//!   had certainly ended: its release or report was sent, or its TTL ran out);
//! - fencing tokens never repeat, and go up on each key in the order grants were answered;
//! - a stale token is refused after a restart, never taken for a live lease;
//! - a key disabled by a report is never lent again to an acquire sent after the report's reply;
//! - no project's sliding window holds more requests than its limit, whenever each lease sends.
//!
//! `KEYLEASE_CRASH_KILLS` sets the number of kills (20 by default; `BENCHMARKS.md` records a
//! longer run).
// The audit measures real time as the clients see it, not the server's clock.
#![allow(clippy::disallowed_methods)]

mod support;

use support::audit::{self, Grant};

use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use rand::{RngExt, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::Code;

const MODEL: &str = "m";
const TTL: Duration = Duration::from_millis(1_500);
const WINDOW: Duration = Duration::from_secs(2);
/// Requests per window per project.
const LIMIT: u32 = 30;
/// Keys that work; `bad` is rejected by the "provider" and reported.
const KEYS: [(&str, &str); 4] = [("k1", "p1"), ("k2", "p1"), ("k3", "p2"), ("k4", "p2")];
const BAD_KEY: &str = "bad";
const CLIENTS: usize = 12;

fn config() -> String {
    let mut text = format!(
        "[leases]\nmax_wait = \"2s\"\ndefault_ttl = \"{}ms\"\nmax_ttl = \"10s\"\n\n\
         [quota]\nwindow = \"{}s\"\nsafety_margin = \"0s\"\ncooldown_base = \"100ms\"\ncooldown_max = \"400ms\"\n\n\
         [key_sources]\nenvironment = false\n\n\
         [pools.gemini.models.{MODEL}]\nrequests_per_minute = {LIMIT}\n\n",
        TTL.as_millis(),
        WINDOW.as_secs()
    );
    for (id, project) in KEYS.iter().chain([&(BAD_KEY, "p3")]) {
        text.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"{project}\"\nsecret = \"AIzaFAKE.crash-{id}-{}\"\n\n",
            "0".repeat(24)
        ));
    }
    text
}

#[derive(Default)]
struct Audit {
    grants: Vec<Grant>,
    /// When a report that disables `bad` was answered.
    bad_disabled_at: Option<Instant>,
    stale_checks: u32,
    calls: u64,
}

type Shared = Arc<Mutex<Audit>>;

#[test]
fn acknowledged_state_survives_sigkill_at_random_moments() {
    let kills: u32 = std::env::var("KEYLEASE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = support::scratch_dir("crash");
    let config_path = dir.join("keylease.toml");
    std::fs::write(&config_path, config()).unwrap();
    let state_dir = dir.join("state");
    let start = || {
        support::start_with(
            config_path.to_str().unwrap(),
            &[],
            &["--state-dir", state_dir.to_str().unwrap()],
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let audit: Shared = Arc::default();
    let (address_tx, address_rx) = watch::channel(String::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let began = Instant::now();

    let mut server = start();
    address_tx.send_replace(server.address.clone());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            runtime.spawn(client(
                n,
                address_rx.clone(),
                stop_rx.clone(),
                audit.clone(),
            ))
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x06b1_ea5e);
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(80..400)));
        drop(server); // SIGKILL, then reaped.
        server = start();
        address_tx.send_replace(server.address.clone());
    }
    std::thread::sleep(Duration::from_millis(300));
    stop_tx.send_replace(true);
    for client in clients {
        runtime.block_on(client).unwrap();
    }
    // After the last restart: the disabled key is still disabled, in the server's own view.
    let status = runtime.block_on(support::status_of(&server.address));
    let output = server.output();
    drop(server);
    assert!(!output.contains("panicked at"), "{output}");

    let audit = audit.lock().unwrap();
    check(&audit);
    if audit.bad_disabled_at.is_some() {
        let bad = status.keys.iter().find(|k| k.key_id == BAD_KEY).unwrap();
        assert_eq!(bad.state(), pb::KeyState::Disabled);
    }
    eprintln!(
        "{kills} kills in {:.1} s: {} calls, {} leases acknowledged, {} stale tokens refused",
        began.elapsed().as_secs_f64(),
        audit.calls,
        audit.grants.len(),
        audit.stale_checks
    );
    assert!(
        audit.grants.len() > kills as usize,
        "too little traffic to mean anything"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// One worker: acquire (sometimes waiting), maybe renew, then release, report, or abandon the
/// lease; after each restart, a stale token first.
async fn client(
    n: usize,
    mut address: watch::Receiver<String>,
    stop: watch::Receiver<bool>,
    audit: Shared,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    let mut last: Option<(String, u64)> = None;
    let mut round = 0u64;
    while !*stop.borrow() {
        let current = address.borrow_and_update().clone();
        let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{current}"))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
        else {
            let _ = tokio::time::timeout(Duration::from_millis(50), address.changed()).await;
            continue;
        };
        let mut keylease = KeyLeaseClient::new(channel);
        // A restart: the last lease this client saw, with a token that is not its own.
        if let Some((lease_id, token)) = &last
            && let Err(refused) = stale_release(&mut keylease, lease_id, *token, &audit).await
        {
            panic!("a stale token after a restart: {refused}");
        }
        while !*stop.borrow() && !address.has_changed().unwrap_or(true) {
            round += 1;
            match cycle(&mut keylease, n, round, &mut rng, &audit).await {
                Ok(Some(lease)) => last = Some(lease),
                Ok(None) => {}
                // The server died under this call; what it did is unknown and not audited.
                Err(_) => break,
            }
        }
    }
}

/// Releases `lease_id` with a token one above its own: refused, or the lease had ended; never
/// taken. `Err` on an answer that took it.
async fn stale_release(
    keylease: &mut KeyLeaseClient<tonic::transport::Channel>,
    lease_id: &str,
    token: u64,
    audit: &Shared,
) -> Result<(), String> {
    let answer = keylease
        .release(pb::ReleaseRequest {
            lease_id: lease_id.into(),
            fencing_token: token + 1,
            ..Default::default()
        })
        .await;
    match answer {
        Ok(reply) if reply.get_ref().released => {
            Err(format!("{lease_id} released by {}", token + 1))
        }
        Ok(_) => {
            audit.lock().unwrap().stale_checks += 1;
            Ok(())
        }
        Err(status) if status.code() == Code::FailedPrecondition => {
            audit.lock().unwrap().stale_checks += 1;
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// One lease's life. `Ok(Some)`: the lease it held; `Err`: a transport failure.
async fn cycle(
    keylease: &mut KeyLeaseClient<tonic::transport::Channel>,
    n: usize,
    round: u64,
    rng: &mut rand::rngs::StdRng,
    audit: &Shared,
) -> Result<Option<(String, u64)>, tonic::Status> {
    let task = format!("c{n}-{round}");
    let asked = Instant::now();
    let wait = rng.random_bool(0.5).then_some(prost_types::Duration {
        seconds: 0,
        nanos: 500_000_000,
    });
    let requests = rng.random_range(1..=3);
    let answer = keylease
        .acquire_key(pb::AcquireKeyRequest {
            task_id: task,
            model: MODEL.into(),
            requests,
            wait,
            ..Default::default()
        })
        .await;
    audit.lock().unwrap().calls += 1;
    let lease = match answer {
        Ok(lease) => lease.into_inner(),
        Err(status) if status.code() == Code::ResourceExhausted => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Ok(None);
        }
        Err(status) => return Err(status),
    };
    let answered = Instant::now();
    let mut grant = Grant {
        key_id: lease.key_id.clone(),
        project: lease.project.clone(),
        token: lease.fencing_token,
        asked,
        answered,
        requests: lease.requests_granted,
        used_at: answered,
        ended_no_earlier_than: asked + TTL,
    };
    let held = Some((lease.lease_id.clone(), lease.fencing_token));
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;

    if lease.key_id == BAD_KEY {
        let sent = Instant::now();
        grant.ended_no_earlier_than = grant.ended_no_earlier_than.min(sent);
        audit.lock().unwrap().grants.push(grant);
        let reported = keylease
            .report_failure(pb::ReportFailureRequest {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
                kind: pb::FailureKind::InvalidKey as i32,
                ..Default::default()
            })
            .await?;
        drop(reported);
        let mut audit = audit.lock().unwrap();
        audit.bad_disabled_at.get_or_insert(Instant::now());
        return Ok(held);
    }

    if rng.random_bool(0.2) {
        let renew_sent = Instant::now();
        let renewed = keylease
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: lease.lease_id.clone(),
                fencing_token: lease.fencing_token,
                ..Default::default()
            })
            .await;
        match renewed {
            Ok(_) => grant.ended_no_earlier_than = renew_sent + TTL,
            Err(status) if status.code() == Code::FailedPrecondition => {}
            Err(status) => {
                // Unknown whether it was renewed: it ends no earlier than it would have anyway.
                audit.lock().unwrap().grants.push(grant);
                return Err(status);
            }
        }
    }
    let choice = rng.random_range(0..10);
    if choice == 0 {
        // Abandoned: it ends when its TTL runs out.
        audit.lock().unwrap().grants.push(grant);
        return Ok(held);
    }
    let sent = Instant::now();
    grant.ended_no_earlier_than = grant.ended_no_earlier_than.min(sent);
    grant.used_at = answered + (sent - answered) / 2;
    if choice == 1 {
        // Its last request is refused (below): a provider does not count what it refused.
        grant.requests -= 1;
    }
    audit.lock().unwrap().grants.push(grant);
    if choice == 1 {
        keylease
            .report_failure(pb::ReportFailureRequest {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
                kind: pb::FailureKind::RateLimited as i32,
                retry_after: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 200_000_000,
                }),
                // This "provider" refuses at random, well below the limit: its 429s name an
                // input-token limit no request comes near, so that only their cooldowns count.
                quota_violations: vec![pb::QuotaViolation {
                    quota_id: "GenerateContentInputTokensPerModelPerMinute-FreeTier".into(),
                    model: MODEL.into(),
                    quota_value: Some(1_000_000_000),
                }],
                ..Default::default()
            })
            .await?;
    } else {
        keylease
            .release(pb::ReleaseRequest {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
                requests_sent: Some(lease.requests_granted),
                ..Default::default()
            })
            .await?;
    }
    Ok(held)
}

fn check(audit: &Audit) {
    audit::check_slots(&audit.grants);
    if let Some(disabled_at) = audit.bad_disabled_at {
        for grant in audit.grants.iter().filter(|g| g.key_id == BAD_KEY) {
            assert!(
                grant.asked < disabled_at,
                "the disabled key was lent again to an acquire sent after it was disabled"
            );
        }
    }
    audit::check_windows(&audit.grants, WINDOW, LIMIT);
}
