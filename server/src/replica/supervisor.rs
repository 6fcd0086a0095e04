//! The supervisor of one replica: a thread that follows the log, takes the leadership when it
//! lapses, leads until it cannot, publishes this replica's keys and compares them with the
//! others', and remembers how far it followed (see the module above for the whole design).

use super::*;

pub(super) struct Supervisor {
    pub(super) settings: Settings,
    pub(super) replication: Replication,
    pub(super) redis: Redis,
    pub(super) router: Router,
    /// `ADDRESS#RANDOM`: unique to this process.
    pub(super) identity: String,
    pub(super) fingerprint_key: FingerprintKey,
    pub(super) seen: Seen,
    pub(super) seen_path: PathBuf,
    /// What the file holds, and when it was written (steady ms).
    pub(super) remembered: Option<(Seen, u64)>,
    /// Held locked while the replica runs.
    pub(super) _dir: StateDir,
    /// Whether this replica refuses the log Redis holds (said once in the log).
    pub(super) refusing: bool,
    /// When an operator confirmed a reset by starting this replica with `--reset-state`.
    pub(super) reset_ms: Option<u64>,
    pub(super) runtime: Handle,
    /// What the leader checks keys with, when `[health]` is configured.
    pub(super) checks: Option<crate::key_checks::CheckSetup>,
    pub(super) shutdown: CancellationToken,
    pub(super) keys_published_ms: u64,
    /// Settings read again (SIGHUP), for the supervisor to take up at its next step.
    pub(super) reloaded: PendingReload,
    /// Keys (`ID=FINGERPRINT`) every live replica reported holding at the last look, `None`
    /// before the first: only those are lent, so that whichever replica leads next can serve
    /// every lease.
    pub(super) shared_keys: Option<std::collections::BTreeSet<String>>,
    /// The last report on differing key sets, logged when it changes.
    pub(super) key_report: String,
    /// Why following the log failed last, logged when it changes.
    pub(super) follow_error: Option<String>,
    pub(super) fleet: FleetView,
}

/// What following found.
pub(super) enum Step {
    /// Caught up; someone else leads, or no one could be made to.
    Followed,
    /// This replica took the leadership.
    Lead(Leader),
}

impl Supervisor {
    fn wall_ms(&self) -> u64 {
        Clock::system().now().wall_ms
    }

    pub(super) fn run(&mut self) {
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
        let leading = Serving::leading(
            state.clone(),
            self.fleet.clone(),
            self.settings.clone(),
            self.checks.clone(),
            &self.runtime,
        );
        match leading {
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
        self.settings = loaded.keeping_what_needs_a_restart(&self.settings);
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
pub(super) fn diverged(log_id: &str, at: u64) -> String {
    format!(
        "Redis's log {log_id} differs from the one this replica applied, at record {at}: Redis lost records and others were written in their place (a restart from an older append-only file or snapshot, or a failover to a replica that was behind); restart one replica with --reset-state once you accept the loss"
    )
}
