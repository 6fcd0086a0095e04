//! What earlier builds (rules versions 2 to 8) left behind, opened by this one: a state
//! directory and a Redis log each wrote and then was killed on (`fixtures/rules-N`, see their
//! READMEs). All hold records that build decided after its last snapshot: this build replays
//! them as that build decided them, then serves under its own rules, its fencing tokens above
//! the old ones. The state directories of rules 6 to 8 also hold a snapshot in that build's
//! layout.

mod support;

use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use keylease_test_kits::RedisServer;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What an earlier build left behind.
struct Fixture {
    /// Its folder under `tests/fixtures`.
    name: &'static str,
    /// The highest fencing token it handed out in the state directory, and in the Redis log.
    state_highest_token: u64,
    redis_highest_token: u64,
    /// A project whose requests per minute that build's rules lowered to 1 from a bare 429,
    /// where today's would not: the replay must decide as that build did.
    lowered_by_its_rules: Option<&'static str>,
    /// A project whose input tokens per day that build learned from a named figure, and the
    /// figure: the books of rules 4 carry a fourth limit.
    tokens_per_day_learned: Option<(&'static str, u64)>,
    /// Its state directory holds a snapshot that build wrote.
    state_snapshot: bool,
    /// A key an operator disabled, and why: it reads as an operator's disable.
    disabled_by_an_operator: Option<(&'static str, &'static str)>,
    /// A key that build disabled on late news of a lease granted before an operator enabled it
    /// again, which today's rules would not: the replay must decide as that build did.
    disabled_late_by_its_rules: Option<&'static str>,
    /// A key whose late news that build left alone, as the lease was granted before an
    /// operator enabled the key again: the replay must leave it enabled too.
    enabled_despite_late_news: Option<&'static str>,
    /// A key one of whose calls was timed on its release, and that call's median latency as
    /// the status shows it: the key's record came through.
    timed_call: Option<(&'static str, &'static str)>,
}

const RULES_2: Fixture = Fixture {
    name: "rules-2",
    state_highest_token: 1_796_614_919_176_002,
    redis_highest_token: 1_796_614_930_411_002,
    lowered_by_its_rules: None,
    tokens_per_day_learned: None,
    state_snapshot: false,
    disabled_by_an_operator: None,
    disabled_late_by_its_rules: None,
    enabled_despite_late_news: None,
    timed_call: None,
};

const RULES_3: Fixture = Fixture {
    name: "rules-3",
    state_highest_token: 1_796_623_435_162_002,
    redis_highest_token: 1_796_623_437_755_002,
    lowered_by_its_rules: Some("p2"),
    tokens_per_day_learned: None,
    state_snapshot: false,
    disabled_by_an_operator: None,
    disabled_late_by_its_rules: None,
    enabled_despite_late_news: None,
    timed_call: None,
};

const RULES_4: Fixture = Fixture {
    name: "rules-4",
    state_highest_token: 1_796_636_890_222_002,
    redis_highest_token: 1_796_636_892_666_002,
    lowered_by_its_rules: None,
    tokens_per_day_learned: Some(("p3", 1_000_000)),
    state_snapshot: false,
    disabled_by_an_operator: None,
    disabled_late_by_its_rules: None,
    enabled_despite_late_news: None,
    timed_call: None,
};

const RULES_5: Fixture = Fixture {
    name: "rules-5",
    state_highest_token: 1_796_647_680_031_003,
    redis_highest_token: 1_796_647_682_692_003,
    lowered_by_its_rules: None,
    tokens_per_day_learned: Some(("p3", 1_000_000)),
    state_snapshot: false,
    disabled_by_an_operator: None,
    disabled_late_by_its_rules: None,
    enabled_despite_late_news: None,
    timed_call: None,
};

const RULES_6: Fixture = Fixture {
    name: "rules-6",
    state_highest_token: 1_796_656_997_683_000,
    redis_highest_token: 1_796_657_000_776_000,
    lowered_by_its_rules: None,
    tokens_per_day_learned: Some(("p3", 1_000_000)),
    state_snapshot: true,
    disabled_by_an_operator: None,
    disabled_late_by_its_rules: None,
    enabled_despite_late_news: None,
    timed_call: None,
};

const RULES_7: Fixture = Fixture {
    name: "rules-7",
    state_highest_token: 1_796_677_680_030_000,
    redis_highest_token: 1_796_677_683_533_000,
    lowered_by_its_rules: None,
    tokens_per_day_learned: None,
    state_snapshot: true,
    disabled_by_an_operator: Some(("k3", "rotating k3")),
    disabled_late_by_its_rules: Some("k1"),
    enabled_despite_late_news: None,
    timed_call: None,
};

const RULES_8: Fixture = Fixture {
    name: "rules-8",
    state_highest_token: 1_796_690_982_725_000,
    redis_highest_token: 1_796_690_988_793_000,
    lowered_by_its_rules: None,
    tokens_per_day_learned: None,
    state_snapshot: true,
    disabled_by_an_operator: Some(("k3", "rotating k3")),
    disabled_late_by_its_rules: None,
    enabled_despite_late_news: Some("k1"),
    timed_call: Some(("k1", "0.256s")),
};

impl Fixture {
    fn dir(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(self.name)
    }

    /// Whether `address` serves what this build's records decided.
    fn check_decisions(&self, address: &str) {
        let status = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(support::status_of(address));
        let group = |project: &str| {
            status
                .quota_groups
                .iter()
                .find(|g| g.project == project)
                .unwrap_or_else(|| panic!("no group of {project}: {status:?}"))
                .clone()
        };
        if let Some(project) = self.lowered_by_its_rules {
            let group = group(project);
            let limit = group.requests_per_minute_limit.as_ref().unwrap();
            assert_eq!(limit.learned, Some(1), "{group:?}");
        }
        let key = |id: &str| {
            status
                .keys
                .iter()
                .find(|k| k.key_id == id)
                .unwrap_or_else(|| panic!("no key {id}: {status:?}"))
                .clone()
        };
        if let Some((id, reason)) = self.disabled_by_an_operator {
            let key = key(id);
            assert_eq!(key.state(), pb::KeyState::Disabled, "{key:?}");
            assert_eq!(key.disabled_by(), pb::Decider::Operator, "{key:?}");
            assert_eq!(key.disabled_reason, reason, "{key:?}");
        }
        if let Some(id) = self.disabled_late_by_its_rules {
            let key = key(id);
            assert_eq!(key.state(), pb::KeyState::Disabled, "{key:?}");
            assert!(key.disabled_reason.starts_with("invalid key"), "{key:?}");
        }
        if let Some(id) = self.enabled_despite_late_news {
            let key = key(id);
            assert_eq!(key.state(), pb::KeyState::Available, "{key:?}");
        }
        if let Some((id, p50)) = self.timed_call {
            let key = key(id);
            let performance = key.performance.as_ref().expect("a record");
            let p50_read = performance
                .latency_p50
                .map(|d| format!("{}.{:03}s", d.seconds, d.nanos / 1_000_000));
            assert_eq!(p50_read.as_deref(), Some(p50), "{key:?}");
        }
        if let Some((project, figure)) = self.tokens_per_day_learned {
            let group = group(project);
            let limit = group.tokens_per_day_limit.as_ref().unwrap();
            assert_eq!(limit.learned, Some(figure), "{group:?}");
            assert_eq!(limit.named, Some(figure), "{group:?}");
        }
    }
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
fn a_state_directory_rules_2_crashed_on_is_replayed() {
    replays_the_state_directory(&RULES_2);
}

#[test]
fn a_state_directory_rules_3_crashed_on_is_replayed_as_rules_3_decided() {
    replays_the_state_directory(&RULES_3);
}

#[test]
fn a_state_directory_rules_4_crashed_on_is_replayed_with_its_tokens_per_day() {
    replays_the_state_directory(&RULES_4);
}

#[test]
fn a_state_directory_rules_5_crashed_on_is_replayed_with_its_report_and_replacement_apart() {
    replays_the_state_directory(&RULES_5);
}

#[test]
fn a_state_directory_rules_6_crashed_on_is_read_from_its_snapshot_and_replayed() {
    replays_the_state_directory(&RULES_6);
}

#[test]
fn a_state_directory_rules_7_crashed_on_is_read_from_its_snapshot_and_replayed() {
    replays_the_state_directory(&RULES_7);
}

#[test]
fn a_redis_log_rules_7_led_is_followed_and_led_on() {
    follows_and_leads_the_redis_log(&RULES_7);
}

#[test]
fn a_state_directory_rules_8_crashed_on_is_read_from_its_snapshot_and_replayed() {
    replays_the_state_directory(&RULES_8);
}

#[test]
fn a_redis_log_rules_8_led_is_followed_and_led_on() {
    follows_and_leads_the_redis_log(&RULES_8);
}

#[test]
fn a_redis_log_rules_2_led_is_followed_and_led_on() {
    follows_and_leads_the_redis_log(&RULES_2);
}

#[test]
fn a_redis_log_rules_3_led_is_followed_and_led_on_as_rules_3_decided() {
    follows_and_leads_the_redis_log(&RULES_3);
}

#[test]
fn a_redis_log_rules_4_led_is_followed_and_led_on_with_its_tokens_per_day() {
    follows_and_leads_the_redis_log(&RULES_4);
}

#[test]
fn a_redis_log_rules_5_led_is_followed_and_led_on_with_its_report_and_replacement_apart() {
    follows_and_leads_the_redis_log(&RULES_5);
}

#[test]
fn a_redis_log_rules_6_led_is_followed_and_led_on() {
    follows_and_leads_the_redis_log(&RULES_6);
}

fn replays_the_state_directory(fixture: &Fixture) {
    let dir = support::scratch_dir(&format!("upgrade-state-{}", fixture.name));
    copy_dir(&fixture.dir().join("state"), &dir.join("state"));
    let config = fixture.dir().join("keylease.toml");
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
    let from_snapshot = format!("\"from_snapshot\":{}", fixture.state_snapshot);
    assert!(output.contains(&from_snapshot), "{output}");
    fixture.check_decisions(&server.address);
    let lease = acquire(&server.address);
    assert!(
        lease.fencing_token > fixture.state_highest_token,
        "{} after {}",
        lease.fencing_token,
        fixture.state_highest_token
    );
    server.signal("TERM");
    let (status, output) = server.wait_with_output(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{output}");
    let _ = std::fs::remove_dir_all(dir);
}

fn follows_and_leads_the_redis_log(fixture: &Fixture) {
    let mut redis = RedisServer::start();
    redis.kill();
    copy_dir(
        &fixture.dir().join("redis/appendonlydir"),
        &redis.dir().join("appendonlydir"),
    );
    redis.start_again();
    let dir = support::scratch_dir(&format!("upgrade-redis-{}", fixture.name));
    let config = fixture.dir().join("keylease.toml");
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
    fixture.check_decisions(&replica.address);
    assert!(
        lease.fencing_token > fixture.redis_highest_token,
        "{} after {}",
        lease.fencing_token,
        fixture.redis_highest_token
    );
    let output = replica.output();
    assert!(output.contains("leading"), "{output}");
    assert!(!output.contains("refusing"), "{output}");
    assert!(!output.contains("cannot follow"), "{output}");
    drop(replica);
    let _ = std::fs::remove_dir_all(dir);
}
