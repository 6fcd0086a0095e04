//! The admin service against a real server: keys added and removed live while leases run, keys
//! disabled and enabled, a cooldown ended, limits changed in the config file, and reloads, each
//! recorded as an event with the admin's name; only admins may call it.

mod support;

use keylease::pb;
use keylease_server::auth::token_sha256;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::*;
use tonic::Code;

const ADMIN: &str = "kl_admin-token-for-the-admin-tests";
const WORKER: &str = "kl_worker-token-for-the-admin-tests";
/// A key added at run time: never in a reply, an event or a file but the keys file.
const ADDED: &str = "AIzaFAKE.added-at-run-time-0000000000000";

fn hex(hash: [u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A server with one key in the config, one in a keys file, and an admin and a worker.
async fn server() -> TestServer {
    let tokens = format!(
        "[[server.tokens]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n\
         [[server.tokens]]\nname = \"batch\"\nrole = \"worker\"\nsha256 = \"{}\"\n",
        hex(token_sha256(ADMIN)),
        hex(token_sha256(WORKER))
    );
    let mut config = config_toml(&[("k1", "p1")], 100, &tokens);
    config = config.replace(
        "[key_sources]\nenvironment = false\n",
        "[key_sources]\nenvironment = false\nfile = \"keys.txt\"\n",
    );
    let keys = format!("# the keys file\n{} id=k2 project=p2\n", fake_secret("k2"));
    TestServer::start_with_files(&config, &[("keys.txt", &keys)]).await
}

async fn next_event(events: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event comes")
        .unwrap()
        .unwrap()
}

/// Events until one of the kind `pick` accepts, which is returned with its caller.
async fn event_where(
    events: &mut tonic::Streaming<pb::Event>,
    pick: impl Fn(&pb::event::Kind) -> bool,
) -> pb::Event {
    loop {
        let event = next_event(events).await;
        if event.kind.as_ref().is_some_and(&pick) {
            return event;
        }
    }
}

#[tokio::test]
async fn a_key_is_added_and_removed_while_leases_run() {
    let server = server().await;
    let mut admin = admin_with_token(&server, ADMIN).await;
    let mut worker = raw_with_token(&server, WORKER).await;
    let mut events = raw_with_token(&server, ADMIN)
        .await
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let held = worker
        .acquire_key(acquire("holder"))
        .await
        .unwrap()
        .into_inner();

    let added = admin
        .add_key(pb::AddKeyRequest {
            secret: ADDED.into(),
            key_id: "k3".into(),
            project: "p3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (added.key_id.as_str(), added.project.as_str()),
        ("k3", "p3")
    );
    assert!(!format!("{added:?}").contains(ADDED));
    let event = event_where(&mut events, |k| matches!(k, pb::event::Kind::Added(_))).await;
    assert_eq!(event.caller, "ops");
    let keys_file = server.config_dir().join("keys.txt");
    let text = std::fs::read_to_string(&keys_file).unwrap();
    assert!(text.starts_with("# the keys file\n"), "{text}");
    assert!(
        text.contains(&format!("{ADDED} id=k3 project=p3")),
        "{text}"
    );
    let mode = std::fs::metadata(&keys_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The same secret again, or a malformed one, changes nothing.
    let again = admin
        .add_key(pb::AddKeyRequest {
            secret: ADDED.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(
        again.message().contains("already configured, as k3"),
        "{}",
        again.message()
    );
    assert!(!again.message().contains(ADDED));
    let spaced = admin
        .add_key(pb::AddKeyRequest {
            secret: "two words".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(spaced.code(), Code::InvalidArgument);
    // A key file line starting with `#` is a comment: such a key could never be read back.
    let commented = admin
        .add_key(pb::AddKeyRequest {
            secret: "#AIzaFAKE.commented-000000000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(commented.code(), Code::InvalidArgument, "{commented:?}");
    let unknown_pool = admin
        .add_key(pb::AddKeyRequest {
            secret: "AIzaFAKE.another-000000000000000000000000".into(),
            pool: "nowhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_pool.code(), Code::FailedPrecondition);
    assert!(
        unknown_pool.message().contains("unknown pool"),
        "{}",
        unknown_pool.message()
    );
    assert_eq!(
        std::fs::read_to_string(&keys_file).unwrap(),
        text,
        "put back"
    );

    // k1 comes from the config file: it cannot be removed from the keys file.
    assert_eq!(held.key_id, "k1");
    let refused = admin
        .remove_key(pb::RemoveKeyRequest {
            key_id: "k1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("not in the keys file"),
        "{}",
        refused.message()
    );
    // k2 is leased when it is removed: it drains, and its lease runs on.
    let lent = worker
        .acquire_key(acquire("other"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lent.key_id, "k2");
    let removed = admin
        .remove_key(pb::RemoveKeyRequest {
            key_id: "k2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.draining_leases, 1);
    let event = event_where(&mut events, |k| matches!(k, pb::event::Kind::Draining(_))).await;
    assert_eq!(event.caller, "ops");
    let text = std::fs::read_to_string(&keys_file).unwrap();
    assert!(!text.contains(&fake_secret("k2")), "{text}");
    assert!(text.contains(ADDED), "{text}");
    let status = raw_with_token(&server, ADMIN)
        .await
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let k2 = status.keys.iter().find(|k| k.key_id == "k2").unwrap();
    assert_eq!(k2.state, pb::KeyState::Draining as i32);
    // Nothing new on it: k3 is lent next, then none.
    assert_eq!(
        worker
            .acquire_key(acquire("third"))
            .await
            .unwrap()
            .into_inner()
            .key_id,
        "k3"
    );
    let none = worker.acquire_key(acquire("fourth")).await.unwrap_err();
    assert_eq!(none.code(), Code::ResourceExhausted);
    // Its release makes the key go.
    worker.release(release(&lent, 1)).await.unwrap();
    let event = event_where(&mut events, |k| matches!(k, pb::event::Kind::Removed(_))).await;
    assert_eq!(event.caller, "batch");
    let gone = admin
        .remove_key(pb::RemoveKeyRequest {
            key_id: "k2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn disable_enable_and_reset_are_recorded_with_the_admins_name() {
    let server = server().await;
    let mut admin = admin_with_token(&server, ADMIN).await;
    let mut worker = raw_with_token(&server, WORKER).await;
    let mut events = raw_with_token(&server, ADMIN)
        .await
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let reason = format!("leaked in a ticket: {}", fake_secret("k1"));
    let disabled = admin
        .disable_key(pb::DisableKeyRequest {
            key_id: "k1".into(),
            reason,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disabled.state, pb::KeyState::Disabled as i32);
    assert!(!disabled.disabled_reason.contains(&fake_secret("k1")));
    let event = event_where(&mut events, |k| matches!(k, pb::event::Kind::Disabled(_))).await;
    assert_eq!(event.caller, "ops");
    let enabled = admin
        .enable_key(pb::EnableKeyRequest {
            key_id: "k1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(enabled.state, pb::KeyState::Disabled as i32);
    event_where(&mut events, |k| matches!(k, pb::event::Kind::Enabled(_))).await;

    // A rate limit cools p1 down; an admin ends it.
    let lease = worker.acquire_key(acquire("t")).await.unwrap().into_inner();
    worker
        .report_failure(pb::ReportFailureRequest {
            lease_id: lease.lease_id.clone(),
            fencing_token: lease.fencing_token,
            kind: pb::FailureKind::RateLimited as i32,
            retry_after: seconds(600),
            ..Default::default()
        })
        .await
        .unwrap();
    let group = admin
        .reset_quota_group(pb::ResetQuotaGroupRequest {
            project: lease.project.clone(),
            model: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(group.cooling_until.is_none(), "{group:?}");
    let event = event_where(&mut events, |k| {
        matches!(k, pb::event::Kind::CooldownReset(_))
    })
    .await;
    assert_eq!(event.caller, "ops");
    let unknown = admin
        .reset_quota_group(pb::ResetQuotaGroupRequest {
            project: "p9".into(),
            model: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);

    // Every admin call is an admin's.
    let mut as_worker = admin_with_token(&server, WORKER).await;
    let refused = as_worker.reload(pb::ReloadRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = as_worker
        .disable_key(pb::DisableKeyRequest {
            key_id: "k1".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn limits_change_in_the_file_and_a_reload_applies_an_edited_file() {
    let server = server().await;
    let mut admin = admin_with_token(&server, ADMIN).await;
    let config_path = server.config_dir().join("keylease.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let changed = admin
        .set_limits(pb::SetLimitsRequest {
            model: format!("models/{MODEL}"),
            requests_per_minute: Some(7),
            requests_per_day: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        changed.changes,
        [format!(
            "limits of gemini/{MODEL}: requests_per_minute from 100 to 7, requests_per_day from 100000 to none"
        )]
    );
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains("requests_per_minute = 7"), "{text}");
    assert!(!text.contains("requests_per_day"), "{text}");
    let status = raw_with_token(&server, ADMIN)
        .await
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .quota_groups
            .iter()
            .all(|g| g.requests_per_minute.unwrap().limit == 7
                || g.requests_per_minute.unwrap().used == 0)
    );
    let unknown = admin
        .set_limits(pb::SetLimitsRequest {
            model: "gemini-0".into(),
            requests_per_minute: Some(7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);

    // An operator edits the file: a new key and a listen address; a reload applies the key
    // and says the address needs a restart.
    let edited = format!(
        "{}\n[[keys]]\nid = \"k9\"\nproject = \"p9\"\nsecret = \"{}\"\n",
        std::fs::read_to_string(&config_path).unwrap(),
        fake_secret("k9")
    )
    .replace(
        "[key_sources]",
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[key_sources]",
    );
    std::fs::write(&config_path, &edited).unwrap();
    let reloaded = admin
        .reload(pb::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reloaded.changes, ["key k9 added (pool gemini, project p9)"]);
    assert_eq!(
        reloaded.needs_restart,
        ["server.listen changed: a restart applies it"]
    );
    // A broken file is refused by line, and nothing changes.
    std::fs::write(&config_path, format!("{edited}\n[pools\n")).unwrap();
    let broken = admin.reload(pb::ReloadRequest {}).await.unwrap_err();
    assert_eq!(broken.code(), Code::FailedPrecondition);
    assert!(
        broken.message().contains("keylease.toml:"),
        "{}",
        broken.message()
    );
    assert!(
        broken.message().contains("nothing changed"),
        "{}",
        broken.message()
    );
    std::fs::write(&config_path, &original).unwrap();
    let back = admin
        .reload(pb::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        back.changes.iter().any(|c| c.starts_with("key k9 removed")),
        "{back:?}"
    );
}

/// Names an admin call writes into a file, and so into every reply, event and log line about
/// them, hold no secret and are bounded; a secret an operator typed into the config file as a
/// name is masked in the reload's report; the keys file is written through a link.
#[tokio::test]
async fn names_holding_secrets_are_refused_and_reports_are_masked() {
    let server = server().await;
    let mut admin = admin_with_token(&server, ADMIN).await;
    let mut events = raw_with_token(&server, ADMIN)
        .await
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let config_path = server.config_dir().join("keylease.toml");
    let keys_path = server.config_dir().join("keys.txt");
    let config_before = std::fs::read_to_string(&config_path).unwrap();
    let k1 = fake_secret("k1");

    for (field, request) in [
        (
            "project",
            pb::SetLimitsRequest {
                model: MODEL.into(),
                project: k1.clone(),
                requests_per_minute: Some(5),
                ..Default::default()
            },
        ),
        (
            "pool",
            pb::SetLimitsRequest {
                model: MODEL.into(),
                pool: format!("x{k1}"),
                requests_per_minute: Some(5),
                ..Default::default()
            },
        ),
    ] {
        let refused = admin.set_limits(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().starts_with(field),
            "{}",
            refused.message()
        );
        assert!(!refused.message().contains(&k1), "{}", refused.message());
        assert!(!refused.message().contains(ADDED), "{}", refused.message());
    }
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        config_before
    );

    // A line the keys file reads as something else is refused, and nothing is written.
    let keys_before = std::fs::read_to_string(&keys_path).unwrap();
    let assignment = admin
        .add_key(pb::AddKeyRequest {
            secret: format!("GEMINI_API_KEY_7={ADDED}"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(assignment.code(), Code::InvalidArgument, "{assignment:?}");
    assert!(!assignment.message().contains(ADDED));
    assert_eq!(std::fs::read_to_string(&keys_path).unwrap(), keys_before);
    // Oversized names.
    for (key_id, project) in [
        ("k".repeat(300), String::new()),
        (String::new(), "p".repeat(10_000)),
    ] {
        let long = admin
            .add_key(pb::AddKeyRequest {
                secret: ADDED.into(),
                key_id,
                project,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(long.code(), Code::InvalidArgument, "{long:?}");
        assert!(
            long.message().contains("above the maximum of 128"),
            "{}",
            long.message()
        );
    }
    assert_eq!(std::fs::read_to_string(&keys_path).unwrap(), keys_before);
    let status = raw_with_token(&server, ADMIN)
        .await
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.keys.len(), 2, "no key was loaded");

    // The keys file behind a link: written through, the link kept.
    let target = server.config_dir().join("real-keys.txt");
    std::fs::rename(&keys_path, &target).unwrap();
    std::os::unix::fs::symlink("real-keys.txt", &keys_path).unwrap();
    admin
        .add_key(pb::AddKeyRequest {
            secret: ADDED.into(),
            key_id: "k3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        std::fs::symlink_metadata(&keys_path)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(std::fs::read_to_string(&target).unwrap().contains("id=k3"));

    // An operator types a key as a model name: the reload's reply and event mask it.
    let edited =
        format!("{config_before}\n[pools.gemini.models.\"{k1}\"]\nrequests_per_minute = 3\n");
    std::fs::write(&config_path, &edited).unwrap();
    let reloaded = admin
        .reload(pb::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!reloaded.changes.is_empty(), "{reloaded:?}");
    assert!(!format!("{reloaded:?}").contains(&k1), "{reloaded:?}");
    let event = event_where(&mut events, |k| matches!(k, pb::event::Kind::Reloaded(_))).await;
    assert!(!format!("{event:?}").contains(&k1), "{event:?}");
}

/// An acquire's exclusions are bounded in number and in each id's length.
#[tokio::test]
async fn an_acquire_excluding_too_many_keys_is_refused() {
    let server = server().await;
    let mut worker = raw_with_token(&server, WORKER).await;
    for (excluded, what) in [
        (vec!["k9".to_string(); 100_000], "100000 ids"),
        (vec!["k9".to_string(); 1025], "1025 ids"),
        (vec!["k".repeat(129)], "an id of 129 bytes"),
    ] {
        let refused = worker
            .acquire_key(pb::AcquireKeyRequest {
                exclude_key_ids: excluded,
                ..acquire("greedy")
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains(what), "{}", refused.message());
    }
    let fine = worker
        .acquire_key(pb::AcquireKeyRequest {
            exclude_key_ids: vec!["k1".to_string(); 1024],
            ..acquire("modest")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fine.key_id, "k2");
}

/// A key's secret replaced in the keys file (same id) and reloaded: the new secret is lent at
/// once, and the old one drains beside it under an id of its own until its lease ends; neither
/// secret shows anywhere.
#[tokio::test]
async fn a_secret_replaced_under_its_id_drains_beside_the_new_one() {
    let server = server().await;
    let mut admin = admin_with_token(&server, ADMIN).await;
    let mut worker = raw_with_token(&server, WORKER).await;
    let old = worker
        .acquire_key(pb::AcquireKeyRequest {
            exclude_key_ids: vec!["k1".into()],
            ..acquire("holder")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.key_id, "k2");
    let rotated = "AIzaFAKE.k2-rotated-secret-000000000000000";
    std::fs::write(
        server.config_dir().join("keys.txt"),
        format!("{rotated} id=k2 project=p2\n"),
    )
    .unwrap();
    let reloaded = admin
        .reload(pb::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    let text = format!("{reloaded:?}");
    assert!(text.contains("k2: its secret was replaced"), "{text}");
    assert!(
        !text.contains(rotated) && !text.contains(&fake_secret("k2")),
        "{text}"
    );

    let status = admin_status(&server).await;
    let draining: Vec<&pb::KeyStatus> = status
        .keys
        .iter()
        .filter(|k| k.state() == pb::KeyState::Draining)
        .collect();
    assert_eq!(draining.len(), 1, "{status:?}");
    assert!(draining[0].key_id.starts_with("k2~"), "{status:?}");
    assert_eq!(draining[0].leases.len(), 1);
    let new = worker
        .acquire_key(pb::AcquireKeyRequest {
            exclude_key_ids: vec!["k1".into()],
            ..acquire("after")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((new.key_id.as_str(), new.api_key.as_str()), ("k2", rotated));
    worker.release(release(&old, 1)).await.unwrap();
    let status = admin_status(&server).await;
    assert!(
        status.keys.iter().all(|k| !k.key_id.starts_with("k2~")),
        "the old secret is gone once its lease ended: {status:?}"
    );
}

/// `GetStatus` as an admin asks it (the server requires tokens).
async fn admin_status(server: &TestServer) -> pb::GetStatusResponse {
    raw_with_token(server, ADMIN)
        .await
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}
