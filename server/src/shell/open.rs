//! Opening the state: the state directory or Redis log recovered (or moved aside), the
//! configuration applied as a new setup, the journal and the timer started; what was recovered,
//! for the log.

use super::*;

/// Why the state could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid key setup: {0}")]
    Setup(#[from] SetupError),
    #[error("state: {0}")]
    Store(#[from] StoreError),
    #[error("a Redis store is opened by the replica that leads it, not by State::open")]
    Replicated,
}

/// What start-up found in the state directory.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub from_snapshot: bool,
    pub records_replayed: u64,
    pub live_leases: usize,
    pub disabled_keys: usize,
    pub cooling_groups: usize,
    pub quota_groups: usize,
    pub next_fencing_token: u64,
    /// Where `--reset-state` moved the old state.
    pub moved_aside: Option<PathBuf>,
}

/// The store a state is opened on, and how it is kept.
pub struct Opening {
    /// `None`: ephemeral, nothing is kept.
    pub store: Option<Box<dyn Store>>,
    /// Keys the fingerprints of secrets, by which state follows a key across renames.
    pub fingerprint_key: FingerprintKey,
    /// Records between snapshots.
    pub snapshot_every: u64,
    /// Reads wait for the store to confirm it may still write (see [`Store::confirm`]).
    pub confirm_reads: bool,
    /// Where what happens is counted: the process's, shared by every state it opens.
    pub metrics: Arc<Metrics>,
}

/// Fencing tokens after a start are at least this: above any a previous run of this machine can
/// have handed out unless it granted more than [`TOKENS_PER_MS`] leases per millisecond on
/// average, so tokens never repeat even without a state directory (if the wall clock was not
/// set back).
pub fn token_floor(wall_ms: u64) -> u64 {
    wall_ms.saturating_mul(TOKENS_PER_MS)
}

/// The models `settings` lists may be metric labels (see [`Metrics::attest_models`]).
pub(super) fn attest_listed_models(metrics: &Metrics, settings: &Settings) {
    for pool in settings.engine.pools.values() {
        metrics.attest_models(pool.models.keys().map(String::as_str));
        metrics.attest_models(pool.project_limits.keys().map(|(_, model)| model.as_str()));
    }
}

/// The engine's setup from `settings`, each key fingerprinted under `key`.
pub(super) fn setup_of(settings: &Settings, key: &FingerprintKey, now: Time) -> Setup {
    let mut keys = settings.keys.clone();
    for spec in &mut keys {
        spec.fingerprint = key.fingerprint(&spec.secret);
    }
    Setup::new(settings.engine.clone(), keys, token_floor(now.wall_ms))
}

impl State {
    /// Opens the state (recovering what the state directory holds), applies the configuration,
    /// and returns the state with what was recovered. `reset` moves an existing state aside.
    pub fn open(
        settings: &Settings,
        clock: Clock,
        reset: bool,
    ) -> Result<(Arc<Self>, Recovered), OpenError> {
        match &settings.state {
            StateLocation::Redis(_) => Err(OpenError::Replicated),
            StateLocation::Ephemeral => {
                let key = FingerprintKey::random().map_err(|e| StoreError::Io {
                    path: PathBuf::from("(memory)"),
                    reason: format!("no random source: {e}"),
                })?;
                Self::open_on(settings, clock, None, key, SNAPSHOT_EVERY)
            }
            StateLocation::Directory(path) => {
                let reset_at = reset.then(|| clock.now().wall_ms);
                let (dir, moved_aside) = StateDir::open(path, reset_at)?;
                let key = dir.fingerprint_key.clone();
                let store = EmbeddedStore::open(dir)?;
                let (state, mut recovered) =
                    Self::open_on(settings, clock, Some(Box::new(store)), key, SNAPSHOT_EVERY)?;
                recovered.moved_aside = moved_aside;
                Ok((state, recovered))
            }
        }
    }

    /// Opens the state on `store` (`None`: ephemeral), whose secrets' fingerprints are keyed by
    /// `fingerprint_key`: recovers what it holds, then applies the configuration.
    pub fn open_on(
        settings: &Settings,
        clock: Clock,
        store: Option<Box<dyn Store>>,
        fingerprint_key: FingerprintKey,
        snapshot_every: u64,
    ) -> Result<(Arc<Self>, Recovered), OpenError> {
        let recovery = match &store {
            None => None,
            Some(store) => Some(store::recover(store.as_ref())?),
        };
        let opening = Opening {
            store,
            fingerprint_key,
            snapshot_every,
            confirm_reads: false,
            metrics: Arc::new(Metrics::new()),
        };
        Self::open_recovered(settings, clock, opening, recovery)
    }

    /// Opens the state on what was already recovered from `opening.store` (`None`: ephemeral),
    /// then applies the configuration.
    pub fn open_recovered(
        settings: &Settings,
        clock: Clock,
        opening: Opening,
        recovery: Option<store::Recovery>,
    ) -> Result<(Arc<Self>, Recovered), OpenError> {
        let Opening {
            store,
            fingerprint_key,
            snapshot_every,
            confirm_reads,
            metrics,
        } = opening;
        let mut recovered = Recovered::default();
        let started = clock.now();
        let setup = setup_of(settings, &fingerprint_key, started);
        // Refused before anything is logged.
        let fresh = Engine::new(setup.clone(), started)?;

        let (engine, last_seq, clock) = match recovery {
            None => (None, 0, clock),
            Some(recovery) => {
                recovered.from_snapshot = recovery.from_snapshot;
                recovered.records_replayed = recovery.records_replayed;
                // The steady clock goes on from where the recovered state left it.
                let clock = match &recovery.engine {
                    Some(engine) => clock.not_before(engine.now().steady_ms),
                    None => clock,
                };
                (recovery.engine, recovery.last_seq, clock)
            }
        };
        let journal = store.map(|store| Journal::start(store, last_seq));
        if let Some(journal) = &journal {
            let _ = journal.stats.observer.set(metrics.clone());
        }
        attest_listed_models(&metrics, settings);
        let recovering = engine.is_some();
        let state = Arc::new(Self {
            inner: Mutex::new(Inner {
                engine: engine.unwrap_or(fresh),
                waiters: HashMap::new(),
                last_seq,
                since_snapshot: 0,
            }),
            events: broadcast::channel(EVENT_BUFFER).0,
            timer: Notify::new(),
            timer_target: AtomicU64::new(u64::MAX),
            shutdown: CancellationToken::new(),
            max_wait: settings.max_wait,
            redactor: RwLock::new(Arc::new(settings.redactor())),
            tenants: RwLock::new(Arc::new(settings.tenants.clone())),
            secrets: Mutex::new(settings.secrets().cloned().collect()),
            fingerprint_key,
            metrics,
            limits: settings.limits,
            journal,
            snapshot_every: snapshot_every.max(1),
            confirm_reads,
            clock,
        });
        {
            let mut inner = state.lock();
            if recovering {
                // Their callers died with the process that queued them; clients retry.
                let (_, notices) = state.apply_locked(&mut inner, Command::DropWaiters);
                state.carry_out(&mut inner, notices, None);
                let (reply, notices) = state.apply_locked(&mut inner, Command::Configure(setup));
                state.carry_out(&mut inner, notices, None);
                let configured = reply.into_configured()?;
                for (old, new) in &configured.renamed_keys {
                    tracing::info!(old, new, "key renamed: its state carries over");
                }
                if configured.dropped_leases > 0 {
                    tracing::warn!(
                        leases = configured.dropped_leases,
                        "leases dropped: their model or pool is no longer configured"
                    );
                }
            } else if let Some(journal) = &state.journal {
                // The first record of a log: the setup the fresh engine was built with.
                inner.last_seq += 1;
                let record = encode_record(started, &Command::Configure(setup));
                journal.push(inner.last_seq, record);
            }
            if let Some(journal) = &state.journal
                && recovered.records_replayed >= REPLAY_WORTH_A_SNAPSHOT
            {
                // The next start begins here, not at the head of the log.
                journal.push_snapshot(Snapshot::of(&inner.engine, inner.last_seq));
            }
            let counts = inner.engine.counts(state.clock.now());
            recovered.live_leases = counts.live_leases;
            recovered.disabled_keys = counts.disabled_keys;
            recovered.quota_groups = counts.quota_groups;
            recovered.cooling_groups = counts.cooling_groups;
            recovered.next_fencing_token = inner.engine.next_fencing_token();
        }
        Ok((state, recovered))
    }
}
