//! Prometheus metrics on an HTTP port (`GET /metrics`): what happened, counted as it happens
//! (grants, releases, expiries, failures by kind, the time acquires waited), and what holds now,
//! read from the engine at each scrape (live leases, keys by state, quota used and configured
//! limits per group, waiters, store commits, the replica's role). Labels are only names from
//! the configuration (pool, project, model) and fixed words: never a secret, a key id or a task.

use crate::store::journal::CommitObserver;
use keylease_engine::tenants::{Caller, Priority};
use keylease_engine::{CheckOutcome, EventKind, FailureKind, KeyState, LimitKind, StatusView};
use metrics::{Counter, Histogram, Key, Label, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

const GRANTED: &str = "keylease_leases_granted_total";
const RELEASED: &str = "keylease_leases_released_total";
const EXPIRED: &str = "keylease_leases_expired_total";
const FAILURES: &str = "keylease_failures_reported_total";
const CHECKS: &str = "keylease_key_checks_total";
const RELOAD_FAILURES: &str = "keylease_reload_failures_total";
const TENANT_GRANTS: &str = "keylease_tenant_grants_total";
const ACQUIRE_WAIT: &str = "keylease_acquire_wait_seconds";
const ACTIVE: &str = "keylease_leases_active";
const KEYS: &str = "keylease_keys";
const QUOTA_USED: &str = "keylease_quota_used";
const QUOTA_LIMIT: &str = "keylease_quota_limit";
const QUOTA_LEARNED: &str = "keylease_quota_learned_limit";
const WAITERS: &str = "keylease_waiters";
const COOLING: &str = "keylease_quota_group_cooling";
const COMMIT: &str = "keylease_store_commit_seconds";
const ROLE: &str = "keylease_replica_role";
const PROXIED: &str = "keylease_proxy_requests_total";

/// Buckets of a store commit: an fsync on a local disk, a round trip to Redis.
const COMMIT_BUCKETS: [f64; 10] = [
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
];

/// Buckets of the acquire wait: most are granted at once, some wait minutes for quota.
const WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 180.0, 600.0,
];

const KEY_STATES: [(KeyState, &str); 7] = [
    (KeyState::Available, "available"),
    (KeyState::Leased, "leased"),
    (KeyState::CoolingDown, "cooling_down"),
    (KeyState::Disabled, "disabled"),
    (KeyState::Draining, "draining"),
    (KeyState::Unchecked, "unchecked"),
    (KeyState::Checking, "checking"),
];

fn outcome_label(outcome: &CheckOutcome) -> &'static str {
    match outcome {
        CheckOutcome::Fine => "fine",
        CheckOutcome::Refused { .. } => "refused",
        CheckOutcome::NoAnswer { .. } => "no_answer",
    }
}

fn kind_label(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::RateLimited => "rate_limited",
        FailureKind::DailyQuotaExhausted => "daily_quota_exhausted",
        FailureKind::InvalidKey => "invalid_key",
        FailureKind::PermissionDenied => "permission_denied",
        FailureKind::ServerError => "server_error",
        FailureKind::Timeout => "timeout",
        FailureKind::Other => "other",
        FailureKind::ModelCapacity => "model_capacity",
    }
}

/// A gauge's name and labels.
type GaugeSeries = (&'static str, Vec<(&'static str, String)>);

/// The metrics of one server process (every state it opens, as a replica, records here).
pub struct Metrics {
    recorder: PrometheusRecorder,
    /// Handles of the counters events touch, by name and label value: counting is then a
    /// lookup without allocating, under the engine's lock as events are carried out.
    counters: Mutex<HashMap<&'static str, HashMap<String, Counter>>>,
    /// The proxy's answers, by call and HTTP status.
    proxied: Mutex<HashMap<(&'static str, u16), Counter>>,
    /// Leases granted to acquires made for a tenant, by tenant and class.
    tenant_grants: Mutex<HashMap<(String, Priority), Counter>>,
    acquire_wait: Histogram,
    commit_latency: Histogram,
    /// Histograms keep each sample until an upkeep folds it into their buckets: they record
    /// only while [`serve`] runs, which folds them regularly, so that a server nobody scrapes
    /// keeps nothing.
    served: std::sync::atomic::AtomicBool,
    /// Label sets of gauges set at a scrape: set to zero at the next unless set again, so a
    /// group gone idle reads 0 rather than its last value.
    scraped: Mutex<BTreeSet<GaugeSeries>>,
    /// Model names a `model` label may carry: those configured, and those the provider
    /// answered at least once (a release that sent a request). Others count as
    /// [`UNATTESTED_MODEL`]: a client cannot fill the metrics with names it invents.
    attested: std::sync::RwLock<HashSet<String>>,
}

/// The `model` label of a model neither configured nor ever answered by the provider.
pub const UNATTESTED_MODEL: &str = "other";
/// Models the provider answered that are labelled by name, at most.
const MAX_ATTESTED: usize = 1_000;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

const METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(ACQUIRE_WAIT.into()), &WAIT_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT.into()), &COMMIT_BUCKETS))
            .expect("buckets are given")
            .build_recorder();
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(name.into(), None, help.into());
        };
        describe(GRANTED, "Leases granted, by model.");
        describe(
            RELEASED,
            "Leases released by their holder (or ended by a disable).",
        );
        describe(
            EXPIRED,
            "Leases that reached their end unreleased, by model.",
        );
        describe(
            CHECKS,
            "Checks of keys with the provider, by outcome (fine, refused, no_answer).",
        );
        describe(
            TENANT_GRANTS,
            "Leases granted to acquires made for a tenant ([tenants] configured), by tenant (a caller's name) and priority.",
        );
        describe(
            RELOAD_FAILURES,
            "Reloads no call asked for that failed, by trigger (sighup, refresh, keys_file): what is in force stays.",
        );
        describe(
            FAILURES,
            "Failures reported by workers, by kind (rate_limited is the provider's 429).",
        );
        describe(
            ACQUIRE_WAIT,
            "How long granted acquires waited for their key.",
        );
        describe(ACTIVE, "Live leases.");
        describe(KEYS, "Keys by pool and state.");
        describe(
            QUOTA_USED,
            "Quota in use per group and limit kind (in the window, or today).",
        );
        describe(
            QUOTA_LIMIT,
            "Configured limit per group and limit kind, the ceiling of an auto one (absent: no limit).",
        );
        describe(
            QUOTA_LEARNED,
            "Limit learned from the provider's 429s per group and limit kind (0 or absent: none); the books admit the lower of it and the configured one.",
        );
        describe(WAITERS, "Acquires waiting for a key, by pool and model.");
        describe(COOLING, "1 while a quota group cools down.");
        describe(
            COMMIT,
            "How long each commit of the state store took (write and sync).",
        );
        describe(
            ROLE,
            "1 for this replica's role: leader, follower or unavailable.",
        );
        describe(
            PROXIED,
            "Calls answered by the Gemini-compatible proxy, by call and HTTP status.",
        );
        let acquire_wait = recorder.register_histogram(&key(ACQUIRE_WAIT, &[]), &METADATA);
        let commit_latency = recorder.register_histogram(&key(COMMIT, &[]), &METADATA);
        let metrics = Self {
            recorder,
            counters: Mutex::new(HashMap::new()),
            proxied: Mutex::new(HashMap::new()),
            tenant_grants: Mutex::new(HashMap::new()),
            acquire_wait,
            commit_latency,
            served: std::sync::atomic::AtomicBool::new(false),
            scraped: Mutex::new(BTreeSet::new()),
            attested: std::sync::RwLock::new(HashSet::new()),
        };
        for kind in FailureKind::ALL {
            // Present from the start, so that rate() sees the first failure.
            metrics
                .recorder
                .register_counter(&key(FAILURES, &[("kind", kind_label(kind))]), &METADATA)
                .increment(0);
        }
        metrics
    }

    /// The models the configuration lists: labelled by name from now on.
    pub fn attest_models<'a>(&self, models: impl IntoIterator<Item = &'a str>) {
        let mut attested = self
            .attested
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        attested.extend(models.into_iter().map(str::to_string));
    }

    /// `model`, if it may be a label; else [`UNATTESTED_MODEL`].
    fn model_label<'m>(&self, model: &'m str) -> &'m str {
        let attested = self.attested.read().unwrap_or_else(PoisonError::into_inner);
        if attested.contains(model) {
            model
        } else {
            UNATTESTED_MODEL
        }
    }

    /// Counts what an event says happened.
    pub fn event(&self, event: &EventKind) {
        if let EventKind::Released {
            lease,
            requests_sent,
        } = event
            && *requests_sent > 0
        {
            let model = lease.lease.model.as_str();
            if self.model_label(model) == UNATTESTED_MODEL {
                let mut attested = self
                    .attested
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if attested.len() < MAX_ATTESTED {
                    attested.insert(model.to_string());
                }
            }
        }
        let (name, label, value) = match event {
            EventKind::Granted(lease) => (GRANTED, "model", self.model_label(&lease.lease.model)),
            EventKind::Released { lease, .. } => {
                (RELEASED, "model", self.model_label(&lease.lease.model))
            }
            EventKind::Expired(lease) => (EXPIRED, "model", self.model_label(&lease.lease.model)),
            EventKind::Failed { kind, .. } => (FAILURES, "kind", kind_label(*kind)),
            EventKind::KeyChecked { outcome, .. } => (CHECKS, "outcome", outcome_label(outcome)),
            _ => return,
        };
        self.count(name, label, value);
    }

    /// A reload no call asked for (`trigger`: SIGHUP, a refresh, the keys file changing)
    /// failed: the keys and settings in force stay.
    pub fn reload_failed(&self, trigger: &'static str) {
        self.count(RELOAD_FAILURES, "trigger", trigger);
    }

    /// One more of counter `name` with `label` = `value`.
    fn count(&self, name: &'static str, label: &'static str, value: &str) {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let by_value = counters.entry(name).or_default();
        match by_value.get(value) {
            Some(counter) => counter.increment(1),
            None => {
                let counter = self
                    .recorder
                    .register_counter(&key(name, &[(label, value)]), &METADATA);
                counter.increment(1);
                by_value.insert(value.to_string(), counter);
            }
        }
    }

    /// A lease was granted to an acquire made for `caller`.
    pub fn granted_to(&self, caller: &Caller) {
        let mut counters = self
            .tenant_grants
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counters
            .entry((caller.tenant.clone(), caller.priority))
            .or_insert_with(|| {
                let labels = [
                    ("tenant", caller.tenant.as_str()),
                    ("priority", caller.priority.as_str()),
                ];
                self.recorder
                    .register_counter(&key(TENANT_GRANTS, &labels), &METADATA)
            })
            .increment(1);
    }

    /// The proxy answered a `call` with HTTP status `code`.
    pub fn proxied(&self, call: &'static str, code: u16) {
        let mut counters = self.proxied.lock().unwrap_or_else(PoisonError::into_inner);
        counters
            .entry((call, code))
            .or_insert_with(|| {
                let code = code.to_string();
                let labels = [("call", call), ("code", code.as_str())];
                self.recorder
                    .register_counter(&key(PROXIED, &labels), &METADATA)
            })
            .increment(1);
    }

    /// An acquire was granted after waiting `seconds`.
    pub fn acquire_waited(&self, seconds: f64) {
        if self.is_served() {
            self.acquire_wait.record(seconds);
        }
    }

    /// Whether histograms record: only while they are served and folded.
    pub fn is_served(&self) -> bool {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.recorder
            .register_gauge(&key(name, labels), &METADATA)
            .set(value);
        let owned = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.scraped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((name, owned));
    }

    /// The Prometheus text: the counters, with gauges set from `state` as it is now (none
    /// when this replica does not lead) and the replica's `role` when it is one.
    pub async fn render(&self, state: Option<&dyn StatusSource>, role: Option<&str>) -> String {
        let stale: Vec<_> =
            std::mem::take(&mut *self.scraped.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .collect();
        for (name, labels) in &stale {
            let labels: Vec<(&'static str, &str)> =
                labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.recorder
                .register_gauge(&key(name, &labels), &METADATA)
                .set(0.0);
        }
        if let Some(role) = role {
            for each in ["leader", "follower", "unavailable"] {
                self.gauge(ROLE, &[("role", each)], f64::from(u8::from(each == role)));
            }
        }
        if let Some(state) = state
            && let Some(status) = state.status().await
        {
            self.status_gauges(&status);
        }
        self.recorder.handle().render()
    }

    fn status_gauges(&self, status: &StatusView) {
        self.gauge(ACTIVE, &[], status.live_leases as f64);
        let pools: BTreeSet<&str> = status.keys.iter().map(|k| k.pool.as_str()).collect();
        for pool in pools {
            for (state, label) in KEY_STATES {
                let count = status
                    .keys
                    .iter()
                    .filter(|k| k.pool == pool && k.state == state)
                    .count();
                self.gauge(KEYS, &[("pool", pool), ("state", label)], count as f64);
            }
        }
        for group in &status.groups {
            // A group per invented name would be a series per invented name.
            if self.model_label(&group.model) == UNATTESTED_MODEL {
                continue;
            }
            let labels = |limit: &'static str| {
                [
                    ("pool", group.pool.as_str()),
                    ("project", group.project.as_str()),
                    ("model", group.model.as_str()),
                    ("limit", limit),
                ]
            };
            let usages = [
                group.requests_per_minute,
                group.tokens_per_minute,
                group.requests_per_day,
                group.tokens_per_day,
            ];
            for ((kind, usage), limit) in LimitKind::ALL.into_iter().zip(usages).zip(group.limits) {
                let labels = labels(kind.as_str());
                self.gauge(QUOTA_USED, &labels, usage.used as f64);
                if let Some(value) = limit.configured {
                    self.gauge(QUOTA_LIMIT, &labels, value as f64);
                }
                if let Some(learned) = limit.learned {
                    self.gauge(QUOTA_LEARNED, &labels, learned.value as f64);
                }
            }
            let group_labels = [
                ("pool", group.pool.as_str()),
                ("project", group.project.as_str()),
                ("model", group.model.as_str()),
            ];
            self.gauge(
                COOLING,
                &group_labels,
                f64::from(u8::from(group.cooldown.is_some())),
            );
        }
        for (pool, model, waiters) in &status.waiting {
            let model = self.model_label(model);
            self.gauge(
                WAITERS,
                &[("pool", pool.as_str()), ("model", model)],
                *waiters as f64,
            );
        }
    }
}

impl CommitObserver for Metrics {
    /// A commit of the state store took `seconds`.
    fn committed(&self, seconds: f64) {
        if self.is_served() {
            self.commit_latency.record(seconds);
        }
    }
}

/// Where a scrape reads the gauges: the whole status of the state that serves (the shell's
/// [`crate::shell::State`]), or `None` when it cannot be read.
pub trait StatusSource: Send + Sync {
    fn status(&self) -> Pin<Box<dyn Future<Output = Option<StatusView>> + Send + '_>>;
}

/// What a scrape reads: the state that serves now (if any) and the replica's role (if one).
pub type Source =
    Arc<dyn Fn() -> (Option<Arc<dyn StatusSource>>, Option<&'static str>) + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    source: Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let scraped = metrics.clone();
    let scrape = move || {
        let (metrics, source) = (scraped.clone(), source.clone());
        async move {
            let (state, role) = source();
            let text = metrics.render(state.as_deref(), role).await;
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                text,
            )
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    metrics
        .served
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let handle = metrics.recorder.handle();
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    upkeep.abort();
    metrics
        .served
        .store(false, std::sync::atomic::Ordering::Relaxed);
    served
}

/// How often histogram samples are folded into their buckets while metrics are served.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
