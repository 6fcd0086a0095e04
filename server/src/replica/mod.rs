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
//! [`token_floor`]: crate::state::token_floor

pub mod follower;
pub mod leadership;
pub mod redis;
pub mod router;

use self::follower::{FollowError, Follower};
use self::leadership::Renewal;
use self::redis::{Leader, LogHead, Position, Redis, RedisStore};
use self::router::{Router, Serving};
use crate::clock::Clock;
use crate::config::{Replication, Settings};
use crate::connections::Front;
use crate::fleet::FleetView;
use crate::secret::FingerprintKey;
use crate::state::{Opening, State};
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
pub struct Reloaded(Arc<std::sync::Mutex<Option<Settings>>>);

impl Reloaded {
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
pub async fn serve(
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
        crate::proxy::start_embedded(proxy, &local, embedding).await?;
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
    let served = crate::server::serve_service(
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
) -> Result<(Router, Reloaded, tokio::sync::oneshot::Receiver<()>), StartError> {
    let reloaded = Reloaded::default();
    let redis = Redis::new(replication.url.reveal(), &replication.namespace)
        .map_err(|e| StartError::Invalid(format!("state.store: {e}")))?;
    let router = Router::new(&replication.token, tls).map_err(StartError::Invalid)?;
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

struct Supervisor {
    settings: Settings,
    replication: Replication,
    redis: Redis,
    router: Router,
    /// `ADDRESS#RANDOM`: unique to this process.
    identity: String,
    fingerprint_key: FingerprintKey,
    seen: Seen,
    seen_path: PathBuf,
    /// What the file holds, and when it was written (steady ms).
    remembered: Option<(Seen, u64)>,
    /// Held locked while the replica runs.
    _dir: StateDir,
    /// Whether this replica refuses the log Redis holds (said once in the log).
    refusing: bool,
    /// When an operator confirmed a reset by starting this replica with `--reset-state`.
    reset_ms: Option<u64>,
    runtime: Handle,
    shutdown: CancellationToken,
    keys_published_ms: u64,
    /// Settings read again (SIGHUP), for the supervisor to take up at its next step.
    reloaded: Reloaded,
    /// Keys (`ID=FINGERPRINT`) every live replica reported holding at the last look, `None`
    /// before the first: only those are lent, so that whichever replica leads next can serve
    /// every lease.
    shared_keys: Option<std::collections::BTreeSet<String>>,
    /// The last report on differing key sets, logged when it changes.
    key_report: String,
    /// Why following the log failed last, logged when it changes.
    follow_error: Option<String>,
    fleet: FleetView,
}

/// What following found.
enum Step {
    /// Caught up; someone else leads, or no one could be made to.
    Followed,
    /// This replica took the leadership.
    Lead(Leader),
}

impl Supervisor {
    fn wall_ms(&self) -> u64 {
        Clock::system().now().wall_ms
    }

    fn run(&mut self) {
        tracing::info!(replica = %self.identity, store = %self.redis.location, "replica starting");
        self.check_redis_settings();
        let mut connection: Option<Connection> = None;
        let mut follower: Option<Follower> = None;
        while !self.shutdown.is_cancelled() {
            self.take_up_reloaded();
            let step = connection
                .take()
                .map_or_else(|| self.redis.connect(), Ok)
                .and_then(|mut c| {
                    let step = self.follow(&mut c, &mut follower);
                    connection = Some(c);
                    step
                });
            if step.is_ok() {
                self.follow_error = None;
            }
            match step {
                Ok(Step::Followed) => {}
                Ok(Step::Lead(leader)) => {
                    self.lead(leader, follower.take());
                    connection = None;
                }
                Err(error) => {
                    self.router.set(Serving::unavailable(format!(
                        "this replica cannot serve: {error}; it retries by itself"
                    )));
                    // Said once while it lasts: it is retried ten times a second.
                    let said = error.to_string();
                    if self.follow_error.as_ref() != Some(&said) {
                        tracing::warn!(error = %said, "replica cannot follow the log");
                        self.follow_error = Some(said);
                    }
                    connection = None;
                    follower = None;
                    self.pause();
                }
            }
            self.remember(false);
        }
        self.remember(true);
        tracing::info!(replica = %self.identity, "replica stopped");
    }

    fn pause(&self) {
        // Once stopping, the runtime may be shutting down too: no timer is made then.
        if self.shutdown.is_cancelled() {
            return;
        }
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(POLL, self.shutdown.cancelled()).await });
    }

    /// Warns of Redis settings that can lose the log; refuses none (a managed Redis may not
    /// even allow asking).
    fn check_redis_settings(&self) {
        let Ok(mut connection) = self.redis.connect() else {
            return;
        };
        let get = |connection: &mut Connection, name: &str| -> Option<String> {
            let pair: Vec<String> = ::redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query(connection)
                .ok()?;
            pair.get(1).cloned()
        };
        match get(&mut connection, "maxmemory-policy").as_deref() {
            Some("noeviction") => {}
            Some(policy) => tracing::error!(
                policy,
                "Redis may evict keys (maxmemory-policy is not noeviction): an evicted log makes every replica refuse to serve; set maxmemory-policy noeviction"
            ),
            None => tracing::warn!(
                "cannot read Redis's maxmemory-policy (CONFIG GET refused): make sure it is noeviction"
            ),
        }
        match (
            get(&mut connection, "appendonly").as_deref(),
            get(&mut connection, "appendfsync").as_deref(),
        ) {
            (Some("yes"), Some("always")) => {}
            (Some("yes"), Some(fsync)) => tracing::warn!(
                appendfsync = fsync,
                "Redis fsyncs its append-only file less than always: a crash of the Redis host can lose acknowledged leases (replicas then refuse to serve until a reset)"
            ),
            (Some("no"), _) => tracing::warn!(
                "Redis's append-only file is off: a Redis restart loses the log (replicas then refuse to serve until a reset); set appendonly yes and appendfsync always"
            ),
            _ => tracing::warn!("cannot read Redis's persistence settings (CONFIG GET refused)"),
        }
    }

    /// Refuses to serve, saying why, from now until an operator confirms a reset.
    fn refuse(&mut self, reason: String) -> Result<Step, StoreError> {
        if !self.refusing {
            tracing::error!(%reason, "refusing to serve");
            self.refusing = true;
        }
        self.router.set(Serving::unavailable(format!(
            "replica {} refuses to serve: {reason}",
            self.identity
        )));
        self.pause();
        Ok(Step::Followed)
    }

    /// Whether an operator confirmed a reset of the log Redis holds after this replica last
    /// saw its own log intact (or by starting this replica with `--reset-state`).
    fn reset_confirmed(&self, head: &LogHead) -> bool {
        self.reset_ms.is_some()
            || head
                .reset_ms
                .is_some_and(|reset| reset >= self.seen.intact_ms)
    }

    /// What this replica appended as leader is what it applied: the log must keep it.
    fn remember_appended(&mut self, appended: &std::sync::Mutex<Position>) {
        let at = *appended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.seen.last_seq = self.seen.last_seq.max(at.seq);
        if at.seq > 0 {
            self.seen.entry = at;
        }
    }

    /// Where this replica had applied the log to, for a copy loaded anew to check.
    fn expected(&self) -> Option<Position> {
        (self.seen.entry.seq > 0).then_some(self.seen.entry)
    }

    /// Forgets the position in the log (an operator accepted its loss): the copy is loaded
    /// anew from what Redis holds.
    fn forget_position(&mut self, follower: &mut Option<Follower>) {
        *follower = None;
        self.seen.last_seq = 0;
        self.seen.entry = Position::default();
    }

    /// What to do once the copy tried to catch up: `None` to go on; a step when it cannot.
    fn after_catching_up(
        &mut self,
        caught_up: Result<(), FollowError>,
        log_id: &str,
        head: &LogHead,
        follower: &mut Option<Follower>,
    ) -> Result<Option<Step>, StoreError> {
        match caught_up {
            Ok(()) => Ok(None),
            Err(FollowError::Diverged(_)) if self.reset_confirmed(head) => {
                self.forget_position(follower);
                Ok(Some(Step::Followed))
            }
            Err(FollowError::Diverged(at)) => {
                *follower = None;
                self.refuse(diverged(log_id, at)).map(Some)
            }
            // A snapshot covered records the copy had not applied (it lagged), or an entry
            // cannot be read: the copy is loaded anew after a pause.
            Err(FollowError::Store(error)) => {
                *follower = None;
                Err(error)
            }
        }
    }

    /// Starts a log in an empty Redis (or one whose loss an operator accepted).
    fn create_log(&mut self, connection: &mut Connection) -> Result<Step, StoreError> {
        let new_id = format!("{:016x}", self.wall_ms());
        let id = redis::create_log(&self.redis, connection, &new_id, self.reset_ms)?;
        tracing::info!(log = id, "a new log in Redis");
        Ok(Step::Followed)
    }

    /// Checks the log, catches the hot copy up, and takes the leadership if no one holds it.
    fn follow(
        &mut self,
        connection: &mut Connection,
        follower: &mut Option<Follower>,
    ) -> Result<Step, StoreError> {
        let head = redis::head(&self.redis, connection)?;
        let log_id = match (&head.id, self.seen.log_id.clone()) {
            (None, seen) if seen.is_none() || self.reset_ms.is_some() => {
                return self.create_log(connection);
            }
            (None, seen) => {
                let seen = seen.unwrap_or_default();
                return self.refuse(format!(
                    "Redis holds no keylease log, but this replica followed log {seen} to record {} (Redis restarted without its append-only file, was flushed, evicted keys, or failed over to a replica that was behind); restart one replica with --reset-state once you accept the loss",
                    self.seen.last_seq
                ));
            }
            (Some(id), seen) if seen.as_deref() != Some(id.as_str()) => {
                if seen.is_some() && !self.reset_confirmed(&head) {
                    return self.refuse(format!(
                        "Redis holds log {id}, not log {} which this replica followed to record {}; restart one replica with --reset-state once you accept the change",
                        seen.unwrap_or_default(),
                        self.seen.last_seq
                    ));
                }
                tracing::info!(log = id, "following the log in Redis");
                *follower = None;
                self.seen = Seen {
                    log_id: Some(id.clone()),
                    epoch: self.seen.epoch,
                    ..Seen::default()
                };
                id.clone()
            }
            (Some(id), _) if head.last.seq < self.seen.last_seq => {
                if !self.reset_confirmed(&head) {
                    return self.refuse(format!(
                        "Redis's log {id} ends at record {}, but this replica applied it to record {}: Redis lost records (a restart from an older append-only file or snapshot, or a failover to a replica that was behind); restart one replica with --reset-state once you accept the loss",
                        head.last.seq, self.seen.last_seq
                    ));
                }
                self.forget_position(follower);
                id.clone()
            }
            (Some(id), _)
                if head.last.seq == self.seen.entry.seq
                    && head.last.chain != self.seen.entry.chain
                    && !self.reset_confirmed(&head) =>
            {
                let at = self.seen.entry.seq;
                return self.refuse(diverged(id, at));
            }
            (Some(id), _) => id.clone(),
        };
        if self.reset_ms.take().is_some() {
            // The operator's confirmation, for the replicas that refuse this log to adopt it.
            redis::confirm_reset(&self.redis, connection, self.wall_ms())?;
        }

        let caught_up = match follower.as_mut() {
            Some(copy) => copy.catch_up(),
            None => Follower::load(&self.redis, self.expected()).map(|copy| {
                *follower = Some(copy);
            }),
        };
        if let Some(step) = self.after_catching_up(caught_up, &log_id, &head, follower)? {
            return Ok(step);
        }
        let copy = follower.as_mut().expect("caught up");
        self.seen.last_seq = copy.applied.replay.last_seq;
        if let Some(at) = copy.applied.at {
            self.seen.entry = at;
        }
        // Redis holds all this replica applied, and what followed it.
        self.seen.intact_ms = self.wall_ms();
        if std::mem::take(&mut self.refusing) {
            tracing::info!(log = log_id, "the log in Redis is accepted again");
        }
        if let Some(leader) = &head.leader {
            self.seen.epoch = self.seen.epoch.max(leader.epoch);
        }
        self.publish_keys(connection);

        match head.leader.clone() {
            // Its own leadership from before it stepped down, lapsing.
            Some(leader) if leader.id == self.identity => {
                self.router.set(Serving::unavailable(
                    "this replica stepped down from the leadership: retry",
                ));
                self.pause();
                Ok(Step::Followed)
            }
            Some(leader) => {
                let current = self.router.following();
                if current.as_ref().is_none_or(|l| l.id != leader.id) {
                    // Its connections are made in the runtime.
                    let _runtime = self.runtime.enter();
                    let target = self
                        .router
                        .leader(leader.id.clone(), leader.address.clone())
                        .map_err(|reason| StoreError::Io {
                            path: self.redis.path(),
                            reason,
                        })?;
                    tracing::info!(leader = leader.id, epoch = leader.epoch, "following");
                    self.router.set(Serving::Following(Arc::new(target)));
                }
                let tailed = follower.as_mut().expect("caught up").tail_for(POLL);
                let step = self.after_catching_up(tailed, &log_id, &head, follower)?;
                Ok(step.unwrap_or(Step::Followed))
            }
            None => {
                let taken = redis::take_leadership(
                    &self.redis,
                    connection,
                    &self.identity,
                    &self.replication.advertise,
                    self.replication.leader_ttl,
                    self.seen.epoch,
                    &log_id,
                )?;
                match taken {
                    Some(leader) => Ok(Step::Lead(leader)),
                    None => Ok(Step::Followed),
                }
            }
        }
    }

    /// Leads until the leadership or the log is lost, or shutdown; then hands over.
    fn lead(&mut self, leader: Leader, follower: Option<Follower>) {
        self.seen.epoch = self.seen.epoch.max(leader.epoch);
        self.router.set(Serving::unavailable(
            "this replica is taking over the leadership: retry",
        ));
        let renewal = Renewal::start(
            self.redis.clone(),
            leader.value.clone(),
            self.replication.leader_ttl,
        );
        // What every live replica holds decides what is lent, from the first grant on.
        if let Ok(mut connection) = self.redis.connect() {
            self.keys_published_ms = 0;
            self.publish_keys(&mut connection);
        }
        let (state, appended) = match self.open_leader(&leader, follower) {
            Ok(opened) => opened,
            Err(error) => {
                tracing::error!(%error, "cannot take over the leadership");
                renewal.resign();
                self.pause();
                return;
            }
        };
        tracing::info!(
            replica = %self.identity,
            epoch = leader.epoch,
            "leading"
        );
        self.runtime.spawn(state.clone().run_timer());
        {
            let mut fleet = self.fleet.write();
            fleet.replica = self.identity.clone();
            fleet.epoch = leader.epoch;
        }
        match Serving::leading(state.clone(), self.fleet.clone(), self.settings.clone()) {
            Ok(serving) => self.router.set(serving),
            Err(error) => {
                tracing::error!(%error, "cannot lead: the TLS files cannot be read");
                renewal.resign();
                self.pause();
                return;
            }
        }
        let runtime = self.runtime.clone();
        let why = runtime.block_on(async {
            let mut remember = tokio::time::interval(REMEMBER_EVERY);
            let mut connection = None;
            let mut lent = self.shared_keys.clone();
            loop {
                tokio::select! {
                    // Shutdown first: once it is asked for, nothing else is waited for.
                    biased;
                    () = self.shutdown.cancelled() => return None,
                    () = state.store_stopped() => {
                        let failure = state.store_failure().map(|f| f.to_string()).unwrap_or_default();
                        return Some(format!("the log could not be written: {failure}"));
                    }
                    reason = renewal.lost() => return Some(reason),
                    _ = remember.tick() => {
                        if state.store_failure().is_none() {
                            self.remember_appended(&appended);
                            self.seen.intact_ms = self.wall_ms();
                        }
                        self.remember(false);
                        match connection.take().map_or_else(|| self.redis.connect(), Ok) {
                            Ok(mut c) => {
                                self.publish_keys(&mut c);
                                connection = Some(c);
                            }
                            Err(_) => connection = None,
                        }
                        let reloaded = self.take_up_reloaded();
                        if reloaded && let Some(c) = connection.as_mut() {
                            self.publish_keys(c);
                        }
                        if reloaded || self.shared_keys != lent {
                            lent = self.shared_keys.clone();
                            let settings = self.lendable_settings();
                            match state.reconfigure(None, &settings).await {
                                Ok(Ok(_)) => tracing::info!(keys = settings.keys.len(), "lending the keys every live replica holds"),
                                Ok(Err(error)) => tracing::error!(%error, "the keys every replica holds cannot be configured"),
                                Err(failure) => return Some(format!("the log could not be written: {failure}")),
                            }
                        }
                    }
                }
            }
        });
        self.router.set(Serving::unavailable(
            "this replica stepped down from the leadership: retry",
        ));
        state.shut_down();
        match &why {
            Some(reason) => {
                tracing::warn!(%reason, epoch = leader.epoch, "stepping down: following again");
            }
            // A clean stop: the last snapshot (on this thread, which is no runtime's and may
            // block), then the leadership goes at once.
            None => state.close(),
        }
        self.remember_appended(&appended);
        drop(state);
        // Whatever the reason, the leadership goes at once if it is still this replica's, so
        // that another takes over without waiting for it to lapse.
        renewal.resign();
    }

    /// The leader's state: the hot copy caught up to the end of the log, on a store whose
    /// every write checks this leadership.
    fn open_leader(
        &mut self,
        leader: &Leader,
        follower: Option<Follower>,
    ) -> Result<(Arc<State>, Arc<std::sync::Mutex<Position>>), String> {
        let mut follower = match follower {
            Some(follower) => follower,
            None => Follower::load(&self.redis, self.expected()).map_err(|e| e.to_string())?,
        };
        follower.catch_up().map_err(|e| e.to_string())?;
        let mut connection = self.redis.connect().map_err(|e| e.to_string())?;
        let head = redis::head(&self.redis, &mut connection).map_err(|e| e.to_string())?;
        let Some(log_id) = head.id else {
            return Err("the log vanished from Redis".into());
        };
        let Follower { log, applied } = follower;
        let caught_up = Position {
            seq: applied.replay.last_seq,
            chain: applied.chain,
        };
        if head.last != caught_up {
            return Err(format!(
                "the log ends at {}, but catching up reached {caught_up}",
                head.last
            ));
        }
        let replay = applied.replay;
        let last_seq = replay.last_seq;
        let store = RedisStore::new(log, leader, log_id, head.last);
        let appended = store.appended();
        let clock = Clock::system().behind(self.replication.max_clock_skew.as_millis() as u64);
        let opening = Opening {
            store: Some(Box::new(store)),
            fingerprint_key: self.fingerprint_key.clone(),
            snapshot_every: SNAPSHOT_EVERY,
            confirm_reads: true,
            metrics: self.router.metrics().clone(),
        };
        let recovery = Recovery {
            engine: replay.engine,
            last_seq,
            from_snapshot: false,
            records_replayed: replay.records_replayed,
        };
        let _runtime = self.runtime.enter();
        State::open_recovered(&self.lendable_settings(), clock, opening, Some(recovery))
            .map(|(state, _)| (state, appended))
            .map_err(|e| e.to_string())
    }

    /// Writes the log position to the state directory when it moved (at most once a second
    /// unless `now`), so that a restarted replica still notices Redis losing the log.
    fn remember(&mut self, now: bool) {
        let steady = Clock::system().now_ms();
        if let Some((remembered, at)) = &self.remembered
            && (remembered == &self.seen
                || (!now && steady < at + REMEMBER_EVERY.as_millis() as u64))
        {
            return;
        }
        let Some(log_id) = &self.seen.log_id else {
            return;
        };
        let text = format!(
            "{log_id} {} {} {} {}\n",
            self.seen.last_seq, self.seen.epoch, self.seen.intact_ms, self.seen.entry
        );
        let temporary = self.seen_path.with_extension("new");
        let written = std::fs::write(&temporary, text)
            .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
            .and_then(|()| std::fs::rename(&temporary, &self.seen_path));
        match written {
            Ok(()) => self.remembered = Some((self.seen.clone(), steady)),
            Err(error) => tracing::warn!(
                path = %self.seen_path.display(),
                %error,
                "cannot remember the log position"
            ),
        }
    }

    /// Takes up settings read again, if any: the keys it publishes and, when it leads, lends
    /// from now on (what only a restart changes stays). Whether there were.
    fn take_up_reloaded(&mut self) -> bool {
        let Some(loaded) = self
            .reloaded
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return false;
        };
        self.settings = Settings {
            listen: self.settings.listen,
            log_format: self.settings.log_format,
            shutdown_grace: self.settings.shutdown_grace,
            limits: self.settings.limits,
            max_wait: self.settings.max_wait,
            state: self.settings.state.clone(),
            tls: self.settings.tls.clone(),
            metrics_listen: self.settings.metrics_listen,
            ..loaded
        };
        // Published at once, so that the fleet learns of new keys without waiting.
        self.keys_published_ms = 0;
        true
    }

    /// This replica's settings with only the keys every live replica holds (all of its own
    /// before it has looked): a key another replica lacks is not lent, since that replica could
    /// lead next and could not hand it out.
    fn lendable_settings(&self) -> Settings {
        let mut settings = self.settings.clone();
        if let Some(shared) = &self.shared_keys {
            settings
                .keys
                .retain(|k| shared.contains(&self.key_entry(k)));
        }
        settings
    }

    /// A key as replicas publish it: `ID=FINGERPRINT`.
    fn key_entry(&self, key: &keylease_engine::KeySpec) -> String {
        format!(
            "{}={}",
            key.id,
            self.fingerprint_key.fingerprint(&key.secret)
        )
    }

    /// Publishes this replica's keys (ids and fingerprints), notes those every live replica
    /// holds, and reports replicas whose keys differ.
    fn publish_keys(&mut self, connection: &mut Connection) {
        let now = self.wall_ms();
        if now < self.keys_published_ms + KEYS_EVERY.as_millis() as u64 {
            return;
        }
        self.keys_published_ms = now;
        let mut mine: Vec<String> = self
            .settings
            .keys
            .iter()
            .map(|k| self.key_entry(k))
            .collect();
        mine.sort();
        let mut shared: std::collections::BTreeSet<String> = mine.iter().cloned().collect();
        let entry = format!("{now} {}", mine.join(","));
        let all: Result<std::collections::HashMap<String, String>, _> = ::redis::pipe()
            .hset(&self.redis.keys.replicas, &self.identity, &entry)
            .ignore()
            .hgetall(&self.redis.keys.replicas)
            .query::<(std::collections::HashMap<String, String>,)>(connection)
            .map(|(all,)| all);
        let Ok(all) = all else { return };
        let mut report = Vec::new();
        for (replica, entry) in &all {
            let (seen_ms, keys) = entry.split_once(' ').unwrap_or((entry.as_str(), ""));
            let seen_ms: u64 = seen_ms.parse().unwrap_or(0);
            // Gone, or this very replica before a restart (the same address, another tag).
            let replaced = replica != &self.identity
                && replica.rsplit_once('#').map(|(address, _)| address)
                    == Some(self.replication.advertise.as_str());
            if replaced || seen_ms + (REPLICA_GONE.as_millis() as u64) < now {
                let _: Result<(), _> = ::redis::cmd("HDEL")
                    .arg(&self.redis.keys.replicas)
                    .arg(replica)
                    .query(connection);
                continue;
            }
            if replica == &self.identity {
                continue;
            }
            let theirs: std::collections::BTreeSet<&str> =
                keys.split(',').filter(|k| !k.is_empty()).collect();
            shared.retain(|k| theirs.contains(k.as_str()));
            let only_mine: Vec<&str> = mine
                .iter()
                .map(String::as_str)
                .filter(|k| !theirs.contains(k))
                .map(|k| k.split('=').next().unwrap_or(k))
                .collect();
            let only_theirs: Vec<&str> = theirs
                .iter()
                .filter(|k| !mine.iter().any(|m| m == *k))
                .map(|k| k.split('=').next().unwrap_or(k))
                .collect();
            if !only_mine.is_empty() || !only_theirs.is_empty() {
                report.push(format!(
                    "{replica} lacks [{}] and has [{}] that this replica lacks",
                    only_mine.join(", "),
                    only_theirs.join(", ")
                ));
            }
        }
        report.sort();
        self.shared_keys = Some(shared);
        self.fleet.write().key_set_differences = report.clone();
        let report = report.join("; ");
        if report != self.key_report {
            if report.is_empty() {
                tracing::info!("every replica holds the same keys");
            } else {
                tracing::warn!(
                    differences = %report,
                    "replicas hold different keys: only those every live replica holds are lent"
                );
            }
            self.key_report = report;
        }
    }
}

/// Why a replica refuses a log that differs from the one it applied.
fn diverged(log_id: &str, at: u64) -> String {
    format!(
        "Redis's log {log_id} differs from the one this replica applied, at record {at}: Redis lost records and others were written in their place (a restart from an older append-only file or snapshot, or a failover to a replica that was behind); restart one replica with --reset-state once you accept the loss"
    )
}

#[cfg(test)]
mod tests {
    use super::redis::{Keys, Redis, RedisLog, RedisStore, create_log, head, take_leadership};
    use crate::redis_server::RedisServer;
    use crate::secret::FingerprintKey;
    use crate::store::conformance::Reopen;
    use crate::store::{Store, StoreError};
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
