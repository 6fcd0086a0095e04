//! Configuration: the TOML file with `KEYLEASE_…` overrides, and the keys from config entries, a
//! keys file and `GEMINI_API_KEY*` variables. Everything is read and validated here, before any
//! port is bound; an error names the file, field or line, and the reason, never a secret. Text
//! that can hold one (a secret or token field, a keys-file line, a token variable, any value a
//! parser quotes) is never quoted: the error gives where it is and what was expected.
//! A section with settings of its own is split out beside this file: [`proxy`], [`health`].

use crate::auth::{self, Access, Credential, Role, TokenSpec};
use crate::secret::Redactor;
use crate::tls::TlsFiles;
use keylease_core::ApiKey;
use keylease_engine::{
    DEFAULT_POOL, DailyReset, EngineConfig, KeySpec, PoolConfig, canonical_model, quota::Limits,
};
use regex::Regex;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

/// Prefix of environment overrides: `KEYLEASE_SERVER__LISTEN=0.0.0.0:50051`.
mod access;
pub mod health;
mod keys;
mod pools;
pub mod proxy;
mod replication;
pub mod tenants;

use access::tls_files;
pub use keys::{name_problem, secret_problem};
pub use pools::{AutoCeiling, LimitSection, LimitValue, PoolSection};
pub use replication::{Replication, ReplicationSection};

use health::{HealthSection, HealthSettings, health_settings};
use proxy::{ProxySection, ProxySettings, proxy_settings};

pub const ENV_PREFIX: &str = "KEYLEASE";
/// Keys from the environment: `GEMINI_API_KEY`, `GEMINI_API_KEY_1`, `GEMINI_API_KEY_2`, ...
const GEMINI_KEY_VAR: &str = "GEMINI_API_KEY";
/// Longest any configured duration may be.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Settings that are lists, so that their `KEYLEASE_…` override may be `a,b,c`.
const LIST_SETTINGS: [&str; 1] = ["server.auth_tokens"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{location}: {reason}")]
    Invalid { location: String, reason: String },
    /// Nothing configures a key: a tool may tell this from a mistake.
    #[error(
        "{location}: no keys: add [[keys]] entries, key_sources.file, key_sources.command, or {GEMINI_KEY_VAR} / {GEMINI_KEY_VAR}_<n>"
    )]
    NoKeys { location: String },
}

fn invalid(location: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        location: location.into(),
        reason: reason.into(),
    }
}

/// The file's shape. Every section has defaults; unknown fields are errors (typos).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerSection,
    pub leases: LeaseSection,
    pub quota: QuotaSection,
    pub key_sources: KeySourceSection,
    pub state: StateSection,
    pub replication: ReplicationSection,
    pub metrics: MetricsSection,
    pub proxy: ProxySection,
    /// Absent: keys are not checked.
    pub health: Option<HealthSection>,
    /// Absent: every acquire waits first come, first served.
    pub tenants: BTreeMap<String, tenants::TenantSection>,
    pub pools: BTreeMap<String, PoolSection>,
    pub keys: Vec<KeyEntry>,
}

/// `[metrics]`: Prometheus text at `http://LISTEN/metrics`; off unless `listen` is set.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// Where leases, quotas and disabled keys are kept; relative to the config file.
    /// Default: `keylease-state` beside the config file (or in the working directory).
    pub dir: Option<PathBuf>,
    /// Keep nothing: a restart forgets every lease and quota (tests, demos).
    pub ephemeral: bool,
    /// `redis://HOST:PORT/DB`: the state lives in Redis, shared by several replicas (see
    /// [`crate::replica`]); the state directory then only remembers which log this replica
    /// followed and how far.
    pub store: Option<ApiKeyField>,
}

/// Where the server keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// Memory only.
    Ephemeral,
    /// A state directory, locked by the running server.
    Directory(PathBuf),
    /// Redis, shared with other replicas.
    Redis(Box<Replication>),
}

/// The state directory's name when none is configured.
pub const DEFAULT_STATE_DIR: &str = "keylease-state";
/// The configuration file read from the working directory when none is named (the server's and
/// `keylease batch`'s).
pub const DEFAULT_CONFIG_FILE: &str = "keylease.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: String,
    /// `text` or `json`.
    pub log_format: String,
    /// How long in-flight calls get to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `"off"`: nobody is checked, on any address. Unset: callers need one of `tokens`, and
    /// with none configured the server runs open on a loopback address only.
    pub auth: Option<String>,
    /// Who may call, each with a name and a role, known by a token's SHA-256 or a client
    /// certificate's name.
    pub tokens: Vec<TokenSection>,
    /// Deprecated: tokens in clear, each an admin. Use `tokens`.
    pub auth_tokens: Vec<ApiKeyField>,
    /// TLS on the gRPC port; plaintext without it.
    pub tls: Option<TlsSection>,
    /// Client connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Calls at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_calls_per_connection: u32,
    /// `WatchEvents` streams at once, over all connections.
    pub max_watch_streams: usize,
    /// A connection with no call in flight this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 pings this often; a peer that does not answer within `keepalive_timeout` is gone.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            log_format: "text".into(),
            shutdown_grace: Duration::from_secs(10),
            auth: None,
            tokens: Vec::new(),
            auth_tokens: Vec::new(),
            tls: None,
            max_connections: 1024,
            max_calls_per_connection: 256,
            max_watch_streams: 64,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// `[server.tls]`: PEM files, relative to the config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The server's certificate, then its intermediates.
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// CAs whose client certificates are accepted (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// `optional` (the default: a token will do instead) or `required`.
    pub client_certificates: Option<String>,
}

/// One caller: `name`, `role`, and `sha256` (of its bearer token) or `certificate` (the name
/// its TLS client certificate is issued to).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSection {
    pub name: Option<String>,
    pub role: Option<String>,
    pub sha256: Option<String>,
    pub certificate: Option<String>,
    /// Never accepted: read only to say so without quoting it.
    pub token: Option<ApiKeyField>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSection {
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Longest an acquire (or a renewal waiting for quota) may wait.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    pub max_requests_per_lease: u32,
    /// How long a key-related failure keeps the key away from the task that saw it.
    #[serde(with = "humantime_serde")]
    pub exclusion_ttl: Duration,
    /// Tasks, client request ids and ended leases remembered (oldest forgotten first).
    pub memory_capacity: usize,
}

impl Default for LeaseSection {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(600),
            max_wait: Duration::from_secs(300),
            max_requests_per_lease: 1000,
            exclusion_ttl: Duration::from_secs(600),
            memory_capacity: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSection {
    /// The provider's sliding window; shorter only for scaled-time tests and benchmarks.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub safety_margin: Duration,
    pub daily_reset_time_zone: String,
    #[serde(with = "humantime_serde")]
    pub cooldown_base: Duration,
    #[serde(with = "humantime_serde")]
    pub cooldown_max: Duration,
    /// Windows at a limit lowered by a 429 without a figure, without another 429, before it
    /// climbs back.
    pub relearn_after: u32,
    pub auto_ceiling: AutoCeiling,
}

impl Default for QuotaSection {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            safety_margin: Duration::from_secs(2),
            daily_reset_time_zone: "America/Los_Angeles".into(),
            cooldown_base: Duration::from_secs(60),
            cooldown_max: Duration::from_secs(900),
            relearn_after: 10,
            auto_ceiling: AutoCeiling::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeySourceSection {
    /// One key per line; relative to the config file.
    pub file: Option<PathBuf>,
    /// A program and its arguments whose standard output is read as a keys file (vault,
    /// gcloud secrets, sops, 1Password's op); run in the config file's directory.
    pub command: Option<Vec<String>>,
    /// Longest the command may run before it is killed and its keys refused.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Read the keys again this often (the command re-run, the file re-read); off when unset.
    #[serde(with = "humantime_serde")]
    pub refresh: Option<Duration>,
    /// Read the keys again when the keys file changes.
    pub watch: bool,
    /// Read `GEMINI_API_KEY` and `GEMINI_API_KEY_<n>` (project from `GEMINI_API_KEY_<n>_PROJECT`).
    pub environment: bool,
    /// Salt of the ids derived from secrets; set your own to keep ids unlinkable elsewhere.
    pub id_salt: String,
}

impl Default for KeySourceSection {
    fn default() -> Self {
        Self {
            file: None,
            command: None,
            command_timeout: keys::DEFAULT_COMMAND_TIMEOUT,
            refresh: None,
            watch: true,
            environment: true,
            id_salt: "keylease".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KeyEntry {
    pub id: Option<String>,
    pub secret: Option<ApiKeyField>,
    /// Name of an environment variable holding the secret.
    pub secret_env: Option<String>,
    pub project: Option<String>,
    pub pool: Option<String>,
    pub max_leases: Option<u32>,
}

/// A secret (API key, auth token) as read from the file: masked in `Debug` like every secret.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct ApiKeyField(String);

impl std::fmt::Debug for ApiKeyField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", ApiKey::new(self.0.clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What clients may hold of the server, so that none can exhaust it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_calls_per_connection: u32,
    pub max_watch_streams: usize,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub limits: ConnectionLimits,
    /// Who may call.
    pub access: Access,
    /// TLS on the gRPC port, when configured.
    pub tls: Option<TlsFiles>,
    /// Where Prometheus scrapes `/metrics`, when configured.
    pub metrics_listen: Option<SocketAddr>,
    /// The Gemini-compatible endpoint, when configured.
    pub proxy: Option<ProxySettings>,
    /// Checking keys with the provider, when configured.
    pub health: Option<HealthSettings>,
    /// The teams sharing the keys; empty without `[tenants]`.
    pub tenants: tenants::Tenants,
    /// What the operator should hear about at start (deprecated settings, no auth).
    pub notices: Vec<String>,
    pub max_wait: Duration,
    pub engine: EngineConfig,
    pub keys: Vec<KeySpec>,
    /// The keys file, when one is configured: where `AddKey` and `RemoveKey` write.
    pub keys_file: Option<PathBuf>,
    /// How often the keys are read again by themselves (`key_sources.refresh`).
    pub key_refresh: Option<Duration>,
    /// Whether the keys file is read again when it changes (`key_sources.watch`).
    pub watch_keys_file: bool,
    pub state: StateLocation,
}

impl Settings {
    /// Every secret the server was given: keys, auth tokens, the replication token, the Redis
    /// URL (which may hold a password). All of them are masked in free text.
    pub fn secrets(&self) -> impl Iterator<Item = &ApiKey> {
        let replication = match &self.state {
            StateLocation::Redis(replication) => vec![&replication.token, &replication.url],
            _ => Vec::new(),
        };
        let clear_tokens =
            self.access
                .callers
                .iter()
                .filter_map(|caller| match &caller.credential {
                    Credential::Clear(token) => Some(token),
                    _ => None,
                });
        self.keys
            .iter()
            .map(|key| &key.secret)
            .chain(clear_tokens)
            .chain(replication)
    }
}

impl Settings {
    /// These settings read again, with what only a restart changes as it runs in `running`
    /// (compared again at the next reload). Keys are checked as they were: a key added waits
    /// for its first check only where a checker runs.
    pub fn keeping_what_needs_a_restart(self, running: &Settings) -> Settings {
        let mut engine = self.engine;
        engine.check_keys = running.engine.check_keys;
        Settings {
            listen: running.listen,
            log_format: running.log_format,
            shutdown_grace: running.shutdown_grace,
            limits: running.limits,
            max_wait: running.max_wait,
            state: running.state.clone(),
            tls: running.tls.clone(),
            metrics_listen: running.metrics_listen,
            proxy: running.proxy.clone(),
            health: running.health.clone(),
            engine,
            ..self
        }
    }

    /// The SHA-256 of every token known only by it: masked where a caller writes one.
    pub fn token_hashes(&self) -> impl Iterator<Item = [u8; 32]> + '_ {
        self.access
            .callers
            .iter()
            .filter_map(|caller| match &caller.credential {
                Credential::Sha256(hash) => Some(*hash),
                _ => None,
            })
    }

    /// Masks every secret and token of these settings in free text.
    pub fn redactor(&self) -> Redactor {
        Redactor::new(self.secrets()).with_token_hashes(self.token_hashes())
    }
}

/// What the command line may override.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub keys_file: Option<PathBuf>,
    pub log_format: Option<String>,
    /// Relative to the working directory, as command-line paths are.
    pub state_dir: Option<PathBuf>,
    pub ephemeral: bool,
    /// `--store`: overrides `state.store`.
    pub store: Option<String>,
    /// `--proxy-listen`: overrides `proxy.listen`; `off` turns the proxy off.
    pub proxy_listen: Option<String>,
}

/// Reads the file (if any) and the environment's overrides, then validates everything.
/// `env` is the process environment, passed in so tests can feed their own.
pub fn load(
    path: Option<&Path>,
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> Result<Settings, ConfigError> {
    let origin = path.map_or_else(|| "configuration".to_string(), |p| p.display().to_string());
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(&origin, format!("cannot read: {e}")))?;
        check_toml_syntax(&origin, &text)?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    // Only `KEYLEASE_SECTION__FIELD`: other KEYLEASE_ variables (KEYLEASE_LOG) are not config.
    let overrides_from_env: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")) && k.contains("__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .list_separator(",");
    for key in LIST_SETTINGS {
        environment = environment.with_list_parse_key(key);
    }
    builder = builder.add_source(environment.source(Some(overrides_from_env)));
    let file: FileConfig = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| {
            invalid(
                format!("{origin} (or its {ENV_PREFIX}_ overrides)"),
                without_values(&e.to_string()),
            )
        })?;
    let base_dir = path.and_then(Path::parent).unwrap_or(Path::new("."));
    validate(file, &origin, base_dir, env, overrides)
}

/// Refuses a file that is not TOML, by line and column: the parser's own report quotes the
/// line, which may be a secret's.
fn check_toml_syntax(origin: &str, text: &str) -> Result<(), ConfigError> {
    let Err(error) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let place = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("{origin}:{line}:{column}")
        }
        None => origin.to_string(),
    };
    let message = without_values(error.message().trim()).replace('\n', "; ");
    Err(invalid(place, format!("not valid TOML: {message}")))
}

/// A parser's message without the values it quotes: a value may be a secret in the wrong field.
/// Field names and paths in backticks stay (lower case, as every field of ours is, and not
/// shaped like a credential), as do single marks such as `"`.
fn without_values(message: &str) -> String {
    static QUOTED: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r#""(?:[^"\\]|\\.)*"|'[^']*'|`([^`]*)`"#).expect("a valid pattern")
    });
    static FIELD_PATH: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^[a-z0-9_\-]{1,40}(?:\[[0-9]+\])*(?:\.?[a-z0-9_\-]{1,40}(?:\[[0-9]+\])*)*$|^[^A-Za-z0-9]$")
            .expect("a valid pattern")
    });
    let shapes = Redactor::default();
    QUOTED
        .replace_all(message, |found: &regex::Captures<'_>| match found.get(1) {
            Some(name)
                if FIELD_PATH.is_match(name.as_str()) && !shapes.finds_secret(name.as_str()) =>
            {
                found[0].to_string()
            }
            _ => "(a value, not shown)".to_string(),
        })
        .into_owned()
}

/// Turns a parsed file into settings, or says what is wrong and where.
pub fn validate(
    mut file: FileConfig,
    origin: &str,
    base_dir: &Path,
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> Result<Settings, ConfigError> {
    let at = |field: &str| format!("{origin}: {field}");
    if let Some(listen) = &overrides.listen {
        file.server.listen = listen.clone();
    }
    if let Some(format) = &overrides.log_format {
        file.server.log_format = format.clone();
    }
    match overrides.proxy_listen.as_deref() {
        Some("off") => file.proxy.listen = None,
        Some(listen) => file.proxy.listen = Some(listen.to_string()),
        None => {}
    }
    let listen = SocketAddr::from_str(&file.server.listen).map_err(|_| {
        invalid(
            at("server.listen"),
            format!("{:?} is not an address:port", file.server.listen),
        )
    })?;
    let log_format = match file.server.log_format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(invalid(
                at("server.log_format"),
                format!("{other:?} is neither \"text\" nor \"json\""),
            ));
        }
    };

    let server = &file.server;
    for (field, value) in [
        ("server.max_connections", server.max_connections as u64),
        (
            "server.max_calls_per_connection",
            u64::from(server.max_calls_per_connection),
        ),
        ("server.max_watch_streams", server.max_watch_streams as u64),
    ] {
        if value == 0 {
            return Err(invalid(at(field), "must be above zero"));
        }
    }
    let limits = ConnectionLimits {
        max_connections: server.max_connections,
        max_calls_per_connection: server.max_calls_per_connection,
        max_watch_streams: server.max_watch_streams,
        idle_timeout: server.idle_timeout,
        keepalive_interval: server.keepalive_interval,
        keepalive_timeout: server.keepalive_timeout,
    };

    let leases = &file.leases;
    // Each duration, and whether it may be zero. At most a year: deadlines are steady time
    // plus these, and a year keeps every sum far from overflowing.
    for (field, value, may_be_zero) in [
        ("server.shutdown_grace", server.shutdown_grace, true),
        ("server.idle_timeout", server.idle_timeout, false),
        (
            "server.keepalive_interval",
            server.keepalive_interval,
            false,
        ),
        ("server.keepalive_timeout", server.keepalive_timeout, false),
        ("leases.default_ttl", leases.default_ttl, false),
        ("leases.max_ttl", leases.max_ttl, false),
        ("leases.max_wait", leases.max_wait, true),
        ("leases.exclusion_ttl", leases.exclusion_ttl, false),
        ("quota.window", file.quota.window, false),
        ("quota.safety_margin", file.quota.safety_margin, true),
        ("quota.cooldown_base", file.quota.cooldown_base, false),
        ("quota.cooldown_max", file.quota.cooldown_max, false),
    ] {
        if !may_be_zero && value.as_millis() == 0 {
            return Err(invalid(at(field), "must be at least a millisecond"));
        }
        if value > MAX_DURATION {
            return Err(invalid(at(field), "must be at most a year"));
        }
    }
    if leases.default_ttl > leases.max_ttl {
        return Err(invalid(at("leases.default_ttl"), "is above leases.max_ttl"));
    }
    if file.quota.cooldown_base > file.quota.cooldown_max {
        return Err(invalid(
            at("quota.cooldown_base"),
            "is above quota.cooldown_max",
        ));
    }
    if leases.max_requests_per_lease == 0 {
        return Err(invalid(
            at("leases.max_requests_per_lease"),
            "must be above zero",
        ));
    }
    if leases.memory_capacity == 0 {
        return Err(invalid(at("leases.memory_capacity"), "must be above zero"));
    }
    let zone = chrono_tz::Tz::from_str(&file.quota.daily_reset_time_zone).map_err(|_| {
        invalid(
            at("quota.daily_reset_time_zone"),
            format!(
                "{:?} is not an IANA time zone",
                file.quota.daily_reset_time_zone
            ),
        )
    })?;

    let (access, mut notices) = access::access(&file.server, listen, &at)?;
    let tls = tls_files(&file, base_dir, &at)?;
    let metrics_listen = match &file.metrics.listen {
        None => None,
        Some(address) => {
            let parsed = SocketAddr::from_str(address).map_err(|_| {
                invalid(
                    at("metrics.listen"),
                    format!("{address:?} is not an address:port"),
                )
            })?;
            if parsed == listen && parsed.port() != 0 {
                return Err(invalid(
                    at("metrics.listen"),
                    "is server.listen: metrics need a port of their own",
                ));
            }
            Some(parsed)
        }
    };
    let mut proxy = proxy_settings(&file, listen, metrics_listen, &access, &at)?;
    if let Some(proxy) = &mut proxy
        && proxy.wait > leases.max_wait
    {
        // keylease refuses a longer wait: the proxy's callers would get 400s.
        notices.push(format!(
            "proxy.wait ({}) is above leases.max_wait ({}): the proxy waits at most {}",
            humantime::format_duration(proxy.wait),
            humantime::format_duration(leases.max_wait),
            humantime::format_duration(leases.max_wait)
        ));
        proxy.wait = leases.max_wait;
    }
    if tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        && let Some(index) = access
            .callers
            .iter()
            .position(|c| matches!(c.credential, Credential::Certificate(_)))
    {
        return Err(invalid(
            at(&format!("server.tokens[{index}].certificate")),
            "client certificates need mutual TLS: set server.tls.client_ca",
        ));
    }

    if file.quota.relearn_after == 0 {
        return Err(invalid(at("quota.relearn_after"), "must be above zero"));
    }
    let pools = pools::pools(&file, &mut notices, &at)?;
    let listed: Vec<(String, Vec<String>)> = pools
        .iter()
        .map(|(name, pool)| (name.clone(), pool.models.keys().cloned().collect()))
        .collect();
    let health = health_settings(&file, &listed, &at)?;
    let tenants = tenants::tenants(&file, &at)?;
    let key_refresh = file.key_sources.refresh;
    for (field, value) in [
        ("key_sources.refresh", key_refresh),
        (
            "key_sources.command_timeout",
            Some(file.key_sources.command_timeout),
        ),
    ] {
        if let Some(value) = value
            && (value < Duration::from_secs(1) || value > MAX_DURATION)
        {
            return Err(invalid(at(field), "must be between a second and a year"));
        }
    }
    let (keys, keys_file) = keys::keys(&file, origin, base_dir, env, overrides, &pools, &at)?;
    let state = replication::state_location(&file, overrides, listen, base_dir, &at)?;
    Ok(Settings {
        state,
        listen,
        log_format,
        shutdown_grace: file.server.shutdown_grace,
        limits,
        access,
        tls,
        metrics_listen,
        proxy,
        notices,
        health,
        tenants,
        max_wait: leases.max_wait,
        engine: EngineConfig {
            default_ttl_ms: leases.default_ttl.as_millis() as u64,
            max_ttl_ms: leases.max_ttl.as_millis() as u64,
            max_requests_per_lease: leases.max_requests_per_lease,
            window_ms: file.quota.window.as_millis() as u64,
            safety_margin_ms: file.quota.safety_margin.as_millis() as u64,
            exclusion_ttl_ms: leases.exclusion_ttl.as_millis() as u64,
            cooldown_base_ms: file.quota.cooldown_base.as_millis() as u64,
            cooldown_max_ms: file.quota.cooldown_max.as_millis() as u64,
            memory_capacity: leases.memory_capacity,
            daily: DailyReset { zone },
            pools,
            relearn_after_windows: file.quota.relearn_after,
            check_keys: file.health.is_some(),
        },
        keys,
        keys_file,
        key_refresh,
        watch_keys_file: file.key_sources.watch,
    })
}

#[cfg(test)]
mod tests;
