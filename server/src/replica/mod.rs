//! Several replicas on one Redis: no single point of failure, one view for the whole fleet.
//!
//! One replica at a time leads: it holds the leadership in Redis (a key with its epoch, renewed
//! while it lives; see [`redis`]) and is the only one that applies commands, through the same
//! [`State`] as a single server, on a [`RedisStore`] whose every append checks the epoch.
//! Every reply that asserts a lease waits for such an append (or a bare epoch check), made
//! after the command was applied: a leader paused between the two and deposed meanwhile
//! answers errors, never stale leases. The others follow: they replay the leader's records as
//! they land (a hot copy, ready to lead) and forward every call to the leader ([`router`]).
//!
//! When the leadership lapses (the leader died, or cannot reach Redis), a follower takes it,
//! catches up to the end of the log, and serves; its clock runs `max_clock_skew` behind its
//! own, so it never expires another leader's lease early. A leader that cannot append, or
//! finds its leadership gone, discards its state and follows again.
//!
//! Each replica remembers, in its state directory, which log it followed, how far, and the
//! hash chain there ([`follower`]). When Redis holds another log, a shorter one, or one that
//! differs from what it applied (a restart without AOF, `FLUSHALL`, a failover to a Redis replica
//! that was behind, eviction), it refuses to serve and says why, until an operator confirms a
//! reset by restarting a replica with `--reset-state`; epochs then start above any it has seen,
//! and fencing tokens above any handed out (see [`token_floor`]). [`leadership`] keeps the
//! leadership while this replica leads.
//!
//! [`token_floor`]: crate::shell::token_floor

pub mod follower;
pub mod leadership;
pub mod redis;
pub mod router;
mod supervisor;

use self::follower::{FollowError, Follower};
use self::leadership::Renewal;
use self::redis::{Leader, LogHead, Position, Redis, RedisStore};
use self::router::{Router, Serving};
use self::supervisor::Supervisor;
use crate::clock::Clock;
use crate::config::{Replication, Settings};
use crate::connections::Front;
use crate::fleet::FleetView;
use crate::secret::FingerprintKey;
use crate::shell::{Opening, State};
use crate::store::embedded::StateDir;
use crate::store::{Recovery, StoreError};
use ::redis::Connection;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How often a follower looks for new records and for a leadership to take, at most; new
/// records wake it at once.
const POLL: Duration = Duration::from_millis(100);
/// How often a replica publishes its keys and compares them with the others'.
const KEYS_EVERY: Duration = Duration::from_secs(2);
/// A replica not heard of for this long (three missed publications) is left out.
const REPLICA_GONE: Duration = Duration::from_secs(6);
/// How often the remembered log position is written to the state directory, at most.
const REMEMBER_EVERY: Duration = Duration::from_secs(1);
/// Records between the leader's snapshots: the log a new replica replays stays short.
const SNAPSHOT_EVERY: u64 = 20_000;
/// What stepping down may take at least, however much of the grace period in-flight calls used:
/// the last snapshot and the resignation are a Redis round trip or two.
pub const STEP_DOWN_AT_LEAST: Duration = Duration::from_millis(500);
/// The file in the state directory that remembers the log this replica followed.
const SEEN_FILE: &str = "redis-log";

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state directory: {0}")]
    StateDir(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

/// Which log this replica followed, and how far: what Redis must still hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    log_id: Option<String>,
    last_seq: u64,
    /// The highest epoch seen: a new leadership starts above it.
    epoch: u64,
    /// When (wall ms) Redis last held this log intact: a reset an operator confirmed later
    /// covers whatever was lost since.
    intact_ms: u64,
    /// The end of an entry this replica applied, with its chain value: the log it follows
    /// must still hold that entry.
    entry: Position,
}

impl Seen {
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split_whitespace();
        let log_id = parts.next()?.to_string();
        let last_seq = parts.next()?.parse().ok()?;
        let epoch = parts.next()?.parse().ok()?;
        let intact_ms = parts.next()?.parse().ok()?;
        let entry = Position {
            seq: parts.next()?.parse().ok()?,
            chain: parts.next()?.parse().ok()?,
        };
        Some(Self {
            log_id: Some(log_id),
            last_seq,
            epoch,
            intact_ms,
            entry,
        })
    }
}

/// Where a replica listens: gRPC, Prometheus when configured, and the Gemini-compatible proxy
/// when configured (with the connector to this replica's gRPC service it leases through).
pub struct Listeners {
    pub grpc: crate::connections::Incoming,
    pub metrics: Option<tokio::net::TcpListener>,
    pub proxy: Option<(
        crate::config::proxy::ProxySettings,
        crate::connections::LocalConnector,
    )>,
}

/// Settings read again, waiting for the supervisor to take them up.
#[derive(Clone, Default)]
pub struct PendingReload(Arc<std::sync::Mutex<Option<Settings>>>);

impl PendingReload {
    fn set(&self, settings: Settings) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(settings);
    }
}

/// Runs a replica on `listeners` until `stop` resolves, taking up the settings `reloads`
/// brings (SIGHUP). Then it takes no more calls, waiters get `UNAVAILABLE`, and in-flight calls
/// get `server.shutdown_grace` to finish; only then does it step down (a leader writes its last
/// snapshot and hands the leadership over at once). Stepping down gets what is left of the
/// grace period, and at least [`STEP_DOWN_AT_LEAST`]: a Redis that does not answer never holds
/// the process longer, as the log already holds everything acknowledged and the leadership
/// lapses by itself.
pub async fn run(
    listeners: Listeners,
    settings: Settings,
    replication: Replication,
    reset: bool,
    front: Front,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<Settings>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        metrics,
        proxy,
    } = listeners;
    let shutdown = CancellationToken::new();
    let stop_requested = CancellationToken::new();
    let replication_token = replication.token.clone();
    let (router, reloaded, stepped_down) = start(
        settings.clone(),
        replication,
        reset,
        front.tls.clone(),
        Handle::current(),
        shutdown.clone(),
    )?;
    let stopping = {
        let stop_requested = stop_requested.clone();
        async move {
            stop.await;
            stop_requested.cancel();
        }
    };
    let clock = Clock::system();
    // When the grace ends (steady ms), once stopping began.
    let grace_ends = Arc::new(std::sync::OnceLock::new());
    let grace = {
        let (stop_requested, grace_ends) = (stop_requested.clone(), grace_ends.clone());
        let (clock, grace) = (clock.clone(), settings.shutdown_grace);
        async move {
            stop_requested.cancelled().await;
            let ends = clock.now_ms().saturating_add(grace.as_millis() as u64);
            let _ = grace_ends.set(ends);
            tokio::time::sleep_until(clock.instant_at(ends)).await;
        }
    };
    if let Some((proxy, local)) = proxy {
        let embedding = crate::proxy::Embedding::replica(router.metrics().clone(), &settings);
        // Through the router, which forwards to the leader while this replica follows.
        let keylease = keylease_client::KeyLeaseClient::over_channel(
            local.channel(),
            keylease_client::ClientConfig::new("http://keylease.local"),
        )
        .map_err(|e| crate::proxy::ProxyStartError::KeyLease(e.to_string()))?;
        crate::proxy::start_embedded(proxy, keylease, embedding).await?;
    }
    if let Some(listener) = metrics {
        let scraped = router.clone();
        let source: crate::metrics::Source = Arc::new(move || scraped.scraped());
        let (metrics, stopping) = (router.metrics().clone(), shutdown.clone());
        tokio::spawn(async move {
            let stopped = async move { stopping.cancelled().await };
            if let Err(error) = crate::metrics::serve(listener, metrics, source, stopped).await {
                tracing::error!(%error, "serving metrics failed");
            }
        });
    }
    {
        // Settings read again: callers and TLS here, keys and limits by the supervisor.
        let (front, token) = (front.clone(), replication_token.clone());
        tokio::spawn(async move {
            while let Some(loaded) = reloads.recv().await {
                front.gate.replace(&loaded.access, Some(&token));
                if let Some(tls) = &front.tls
                    && loaded.tls.as_ref() == Some(tls.files())
                    && let Err(error) = tls.reload()
                {
                    tracing::error!(%error, "the TLS files were not read again");
                }
                reloaded.set(loaded);
            }
        });
    }
    let serving_now = router.serving_now();
    let end_waits = {
        let router = router.clone();
        move || router.end_waits()
    };
    let served = crate::server::serve_routes(
        listener,
        tonic::service::Routes::new(router.clone()).add_service(router::AdminRouter(router)),
        front,
        serving_now,
        clock.clone(),
        stopping,
        end_waits,
    );
    let served = tokio::select! {
        served = served => served,
        () = grace => {
            tracing::warn!("grace period over: stopping with calls still in flight");
            Ok(())
        }
    };
    // No call is in flight any more (or the grace is over): the leader may hand over.
    shutdown.cancel();
    let now = clock.now_ms();
    let step_down_by = grace_ends
        .get()
        .copied()
        .unwrap_or(now)
        .max(now + STEP_DOWN_AT_LEAST.as_millis() as u64);
    if tokio::time::timeout_at(clock.instant_at(step_down_by), stepped_down)
        .await
        .is_err()
    {
        tracing::warn!(
            "gave up stepping down (Redis does not answer): the last snapshot may be unwritten, which costs the next leader a longer replay, and the leadership lapses by itself within replication.leader_ttl"
        );
    }
    served?;
    Ok(())
}

/// Why a replica stopped other than by `stop`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("serving failed: {0}")]
    Serve(#[from] crate::server::ServeError),
    #[error("{0}")]
    Proxy(#[from] crate::proxy::ProxyStartError),
}

/// Starts a replica: returns the router to serve with, and what resolves once the thread that
/// runs it has stopped after `shutdown` (stepping down, handing the leadership over at once):
/// awaited with a bound, never joined, so that a Redis call stuck on its timeout cannot hold the
/// process.
pub fn start(
    settings: Settings,
    replication: Replication,
    reset: bool,
    tls: Option<Arc<crate::tls::Tls>>,
    runtime: Handle,
    shutdown: CancellationToken,
) -> Result<(Router, PendingReload, tokio::sync::oneshot::Receiver<()>), StartError> {
    let reloaded = PendingReload::default();
    let redis = Redis::new(replication.url.reveal(), &replication.namespace)
        .map_err(|e| StartError::Invalid(format!("state.store: {e}")))?;
    let router = Router::new(&replication.token, tls).map_err(StartError::Invalid)?;
    let checks = crate::key_checks::CheckSetup::of(settings.health.as_ref())
        .map_err(|e| StartError::Invalid(format!("[health]: keys cannot be checked: {e}")))?;
    let reset_at = reset.then(|| Clock::system().now().wall_ms);
    let (dir, moved_aside) = StateDir::open(&replication.dir, reset_at)?;
    if let Some(aside) = moved_aside {
        tracing::warn!(moved_to = %aside.display(), "--reset-state: what this replica remembered was moved aside");
    }
    let seen_path = dir.path().join(SEEN_FILE);
    let seen = match std::fs::read_to_string(&seen_path) {
        Ok(text) => Seen::parse(&text).ok_or_else(|| {
            StartError::Invalid(format!(
                "{}: not a remembered log position; start with --reset-state to move it aside",
                seen_path.display()
            ))
        })?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Seen::default(),
        Err(error) => {
            return Err(StartError::StateDir(StoreError::Io {
                path: seen_path,
                reason: error.to_string(),
            }));
        }
    };
    // The address for people, a random tag so that a restarted replica is another identity.
    let tag = getrandom::u32().unwrap_or_else(|_| std::process::id()) & 0xff_ffff;
    let identity = format!("{}#{tag:06x}", replication.advertise);
    let mut supervisor = Supervisor {
        fingerprint_key: FingerprintKey::shared_by_replicas(&replication.token),
        settings,
        replication,
        redis,
        router: router.clone(),
        identity,
        seen,
        seen_path,
        remembered: None,
        _dir: dir,
        refusing: false,
        fleet: FleetView::default(),
        reset_ms: reset_at,
        runtime,
        checks,
        shutdown,
        keys_published_ms: 0,
        reloaded: reloaded.clone(),
        shared_keys: None,
        key_report: String::new(),
        follow_error: None,
    };
    let (done, stepped_down) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keylease-replica".into())
        .spawn(move || {
            supervisor.run();
            let _ = done.send(());
        })
        .map_err(|e| StartError::Invalid(format!("cannot start the replica thread: {e}")))?;
    Ok((router, reloaded, stepped_down))
}

#[cfg(test)]
mod tests {
    use super::redis::{Keys, Redis, RedisLog, RedisStore, create_log, head, take_leadership};
    use crate::secret::FingerprintKey;
    use crate::store::conformance::Reopen;
    use crate::store::{Store, StoreError};
    use keylease_test_kits::RedisServer;
    use std::sync::Arc;
    use std::time::Duration;

    /// A new Redis, opened again on each call by a new leader, as a restarted replica would
    /// after the old one's leadership ran out.
    fn on_a_new_redis() -> Reopen {
        let server = Arc::new(RedisServer::start());
        Box::new(move || {
            // The downtime the suite plays is longer than any leadership's TTL.
            let _: () = redis::cmd("DEL")
                .arg(Keys::new("conformance").leader)
                .query(&mut server.connection())
                .unwrap();
            let (store, _) = leading(&server, "conformance", "test");
            let store: Box<dyn Store> = Box::new(store);
            (store, FingerprintKey::from_bytes([7; FingerprintKey::LEN]))
        })
    }

    crate::conformance_tests!(on_a_new_redis());

    /// A store leading the log of `namespace` on `server` (new, if there is none), as
    /// `identity`, once the leadership is free.
    fn leading(
        server: &RedisServer,
        namespace: &str,
        identity: &str,
    ) -> (RedisStore, super::redis::Leader) {
        let redis = Redis::new(&server.url(), namespace).unwrap();
        let mut connection = redis.connect().unwrap();
        let log_id = create_log(&redis, &mut connection, "log-1", None).unwrap();
        let leader = take_leadership(
            &redis,
            &mut connection,
            identity,
            "127.0.0.1:1",
            Duration::from_secs(3_600),
            0,
            &log_id,
        )
        .unwrap()
        .expect("the leadership is free");
        let last = head(&redis, &mut connection).unwrap().last;
        let store = RedisStore::new(RedisLog::open(redis).unwrap(), &leader, log_id, last);
        (store, leader)
    }

    fn new_redis(server: &RedisServer) -> Redis {
        Redis::new(&server.url(), "unit").unwrap()
    }

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        seqs.map(|seq| (seq, vec![seq as u8])).collect()
    }

    fn read(log: &dyn crate::store::Log, after: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        log.records(after, &mut |seq, bytes| {
            assert_eq!(bytes, [seq as u8]);
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn batches_are_read_from_any_record_and_a_snapshot_trims_what_it_covers() {
        let server = RedisServer::start();
        let (mut store, _) = leading(&server, "unit", "a");
        store.append(&batch(1..=3)).unwrap();
        store.append(&batch(4..=6)).unwrap();
        assert_eq!(read(&store, 0), [1, 2, 3, 4, 5, 6]);
        assert_eq!(read(&store, 4), [5, 6]);
        let mut tailed = Vec::new();
        let log = RedisLog::open(Redis::new(&server.url(), "unit").unwrap()).unwrap();
        log.read_after(3, Duration::from_millis(10), &mut |entry| -> Result<
            (),
            StoreError,
        > {
            tailed.extend(entry.records().unwrap().iter().map(|(seq, _)| *seq));
            Ok(())
        })
        .unwrap();
        assert_eq!(tailed, [4, 5, 6]);
        // A snapshot amid the second batch: the first goes, the second stays for record 6.
        store.save_snapshot(5, b"snapshot").unwrap();
        assert_eq!(read(&store, 5), [6]);
        assert_eq!(read(&store, 0), [4, 5, 6]);
    }

    #[test]
    fn a_deposed_leader_cannot_append_and_a_retried_batch_never_lands_twice() {
        let server = RedisServer::start();
        let (mut old, _) = leading(&server, "unit", "old");
        old.append(&batch(1..=2)).unwrap();
        // Its leadership lapses; another replica takes it and appends.
        let _: () = redis::cmd("DEL")
            .arg(Keys::new("unit").leader)
            .query(&mut server.connection())
            .unwrap();
        let (mut new, leader) = leading(&server, "unit", "new");
        let before = head(&new_redis(&server), &mut server.connection())
            .unwrap()
            .last;
        new.append(&batch(3..=3)).unwrap();
        let refused = old.append(&batch(3..=4)).unwrap_err().to_string();
        assert!(refused.contains("no longer leads"), "{refused}");
        assert!(old.confirm().is_err(), "a deposed leader confirmed a read");
        // The same batch again, as after a reply lost on the way back: the store still believes
        // the log ends at record 2.
        let log = RedisLog::open(Redis::new(&server.url(), "unit").unwrap()).unwrap();
        let mut again = RedisStore::new(log, &leader, "log-1".into(), before);
        let moved = again.append(&batch(3..=3)).unwrap_err().to_string();
        assert!(moved.contains("the log ends at 3 "), "{moved}");
        assert_eq!(read(&new, 0), [1, 2, 3]);
    }
}
