//! What the previous build (rules version 2) left behind, opened by this one: a state directory
//! and a Redis log it wrote and then was killed on (`fixtures/rules-2`, see its README). Both
//! hold records that build decided after its last snapshot: this build replays them as that
//! build decided them, then serves under its own rules, its fencing tokens above the old ones.

mod support;

use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use keylease_server::redis_server::RedisServer;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The highest fencing token the previous build handed out in each fixture.
const STATE_HIGHEST_TOKEN: u64 = 1_796_614_919_176_002;
const REDIS_HIGHEST_TOKEN: u64 = 1_796_614_930_411_002;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rules-2")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A new task's lease through `address`, asked until the server serves.
fn acquire(address: &str) -> pb::Lease {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for _ in 0..200 {
            let Ok(mut client) = KeyLeaseClient::connect(format!("http://{address}")).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match client
                .acquire_key(pb::AcquireKeyRequest {
                    task_id: "after-the-upgrade".into(),
                    model: "gemini-2.5-flash".into(),
                    ..Default::default()
                })
                .await
            {
                Ok(lease) => return lease.into_inner(),
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
        panic!("the upgraded server never lent a key")
    })
}

#[test]
fn a_state_directory_the_previous_build_crashed_on_is_replayed() {
    let dir = support::scratch_dir("upgrade-state");
    copy_dir(&fixtures().join("state"), &dir.join("state"));
    let config = fixtures().join("keylease.toml");
    let server = support::start_with(
        config.to_str().unwrap(),
        &[],
        &[
            "--state-dir",
            dir.join("state").to_str().unwrap(),
            "--proxy-listen",
            "off",
        ],
    );
    let output = server.output();
    assert!(output.contains("\"records_replayed\":"), "{output}");
    assert!(!output.contains("\"records_replayed\":0"), "{output}");
    let lease = acquire(&server.address);
    assert!(
        lease.fencing_token > STATE_HIGHEST_TOKEN,
        "{} after {STATE_HIGHEST_TOKEN}",
        lease.fencing_token
    );
    server.signal("TERM");
    let (status, output) = server.wait_with_output(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{output}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_redis_log_the_previous_build_led_is_followed_and_led_on() {
    let mut redis = RedisServer::start();
    redis.kill();
    copy_dir(
        &fixtures().join("redis/appendonlydir"),
        &redis.dir().join("appendonlydir"),
    );
    redis.start_again();
    let dir = support::scratch_dir("upgrade-redis");
    let config = fixtures().join("keylease.toml");
    // A replica listens where the others can reach it: a port of its own.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let replica = support::try_start_on(
        &format!("127.0.0.1:{port}"),
        config.to_str().unwrap(),
        &[],
        &[
            "--store",
            &redis.url(),
            "--state-dir",
            dir.join("replica").to_str().unwrap(),
            "--proxy-listen",
            "off",
        ],
    )
    .unwrap_or_else(|output| panic!("the replica did not start:\n{output}"));
    let lease = acquire(&replica.address);
    assert!(
        lease.fencing_token > REDIS_HIGHEST_TOKEN,
        "{} after {REDIS_HIGHEST_TOKEN}",
        lease.fencing_token
    );
    let output = replica.output();
    assert!(output.contains("leading"), "{output}");
    assert!(!output.contains("refusing"), "{output}");
    assert!(!output.contains("cannot follow"), "{output}");
    drop(replica);
    let _ = std::fs::remove_dir_all(dir);
}
