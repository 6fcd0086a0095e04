//! Configuration: the TOML file with `KEYLEASE_…` overrides, and the keys from config entries, a
//! keys file and `GEMINI_API_KEY*` variables. Everything is read and validated here, before any
//! port is bound; an error names the file, field or line, and the reason, never a secret. Text
//! that can hold one (a secret or token field, a keys-file line, a token variable, any value a
//! parser quotes) is never quoted: the error gives where it is and what was expected.
//! A section with settings of its own is split out beside this file: [`proxy`].

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
pub mod proxy;

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
        "{location}: no keys: add [[keys]] entries, key_sources.file, or {GEMINI_KEY_VAR} / {GEMINI_KEY_VAR}_<n>"
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

/// How replicas on one Redis find and trust each other.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// Shared by every replica: calls forwarded between replicas carry it.
    pub token: Option<ApiKeyField>,
    /// With `[server.tls]`: the CAs that signed the replicas' certificates (default:
    /// `server.tls.client_ca`, else this server's own certificate chain).
    pub ca: Option<PathBuf>,
    /// `HOST:PORT` at which the other replicas reach this one (default: `server.listen`).
    pub advertise: Option<String>,
    /// Prefix of every Redis key, so that several fleets may share one Redis.
    pub namespace: String,
    /// How long a leadership lasts unless renewed: a dead leader is replaced this soon.
    #[serde(with = "humantime_serde")]
    pub leader_ttl: Duration,
    /// How far the replicas' clocks may disagree: a new leader's clock runs this far behind
    /// its own, so that it never expires another leader's lease early.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        Self {
            token: None,
            ca: None,
            advertise: None,
            namespace: "keylease".into(),
            leader_ttl: Duration::from_secs(2),
            max_clock_skew: Duration::from_millis(500),
        }
    }
}

/// A replica's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// May hold a password: masked like any secret.
    pub url: ApiKey,
    pub namespace: String,
    pub token: ApiKey,
    pub advertise: String,
    pub leader_ttl: Duration,
    pub max_clock_skew: Duration,
    /// Where this replica remembers the log it followed, to notice Redis losing it.
    pub dir: PathBuf,
}

/// Shortest replication token accepted: it is all that stands between a stranger and the
/// replicas' trust.
const MIN_REPLICATION_TOKEN: usize = 16;

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
    /// Read `GEMINI_API_KEY` and `GEMINI_API_KEY_<n>` (project from `GEMINI_API_KEY_<n>_PROJECT`).
    pub environment: bool,
    /// Salt of the ids derived from secrets; set your own to keep ids unlinkable elsewhere.
    pub id_salt: String,
}

impl Default for KeySourceSection {
    fn default() -> Self {
        Self {
            file: None,
            environment: true,
            id_salt: "keylease".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    pub max_leases_per_key: Option<u32>,
    /// Limits per model.
    pub models: BTreeMap<String, LimitSection>,
    /// Limits per project and model, replacing the model's.
    pub projects: BTreeMap<String, BTreeMap<String, LimitSection>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSection {
    pub requests_per_minute: Option<LimitValue>,
    pub tokens_per_minute: Option<LimitValue>,
    pub requests_per_day: Option<LimitValue>,
    /// Input tokens per day (Gemini's `GenerateContentInputTokensPerModelPerDay`).
    pub tokens_per_day: Option<LimitValue>,
}

/// A limit as configured: a figure, or `"auto"` (a ceiling, `quota.auto_ceiling`, until the
/// provider names the real figure in a 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitValue {
    Figure(u64),
    Auto,
}

impl<'de> Deserialize<'de> for LimitValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = LimitValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number above zero, or auto")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<LimitValue, E> {
                Ok(LimitValue::Figure(value))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<LimitValue, E> {
                u64::try_from(value)
                    .map(LimitValue::Figure)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(value), &self))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<LimitValue, E> {
                match value {
                    "auto" => Ok(LimitValue::Auto),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The figures `auto` limits start from.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoCeiling {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    pub requests_per_day: u64,
    pub tokens_per_day: u64,
}

impl Default for AutoCeiling {
    fn default() -> Self {
        // Above the paid tiers' figures seen in public reports: the first 429 of each kind
        // names the real one.
        Self {
            requests_per_minute: 10_000,
            tokens_per_minute: 10_000_000,
            requests_per_day: 1_000_000,
            tokens_per_day: 1_000_000_000,
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
    /// What the operator should hear about at start (deprecated settings, no auth).
    pub notices: Vec<String>,
    pub max_wait: Duration,
    pub engine: EngineConfig,
    pub keys: Vec<KeySpec>,
    /// The keys file, when one is configured: where `AddKey` and `RemoveKey` write.
    pub keys_file: Option<PathBuf>,
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

    let (access, mut notices) = access(&file.server, listen, &at)?;
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
    let ceiling = &file.quota.auto_ceiling;
    for (field, value) in [
        ("requests_per_minute", ceiling.requests_per_minute),
        ("tokens_per_minute", ceiling.tokens_per_minute),
        ("requests_per_day", ceiling.requests_per_day),
        ("tokens_per_day", ceiling.tokens_per_day),
    ] {
        if value == 0 {
            return Err(invalid(
                at(&format!("quota.auto_ceiling.{field}")),
                "must be above zero",
            ));
        }
    }
    let mut pools = BTreeMap::new();
    for (name, pool) in &file.pools {
        pools.insert(name.clone(), pool_config(name, pool, ceiling, &at)?);
    }
    if pools.is_empty() {
        // The first run needs nothing but keys: every model's limits are learned.
        notices.push(format!(
            "no [pools] configured: pool {DEFAULT_POOL} serves any model with every limit auto (starting at quota.auto_ceiling, then the figures Gemini's 429s name); configure [pools.{DEFAULT_POOL}.models.\"MODEL\"] to set them"
        ));
        let auto = LimitSection {
            requests_per_minute: Some(LimitValue::Auto),
            tokens_per_minute: Some(LimitValue::Auto),
            requests_per_day: Some(LimitValue::Auto),
            tokens_per_day: Some(LimitValue::Auto),
        };
        pools.insert(
            DEFAULT_POOL.to_string(),
            PoolConfig {
                max_leases_per_key: 1,
                models: BTreeMap::new(),
                project_limits: BTreeMap::new(),
                other_models: Some(limits_of(&auto, ceiling, &at("pools"))?),
            },
        );
    }

    let mut keys = KeyCollector::new(&file.key_sources.id_salt);
    for (index, entry) in file.keys.iter().enumerate() {
        keys.add_entry(&at(&format!("keys[{index}]")), entry, env)?;
    }
    let keys_file = overrides
        .keys_file
        .clone()
        .or_else(|| file.key_sources.file.as_ref().map(|f| base_dir.join(f)));
    if let Some(path) = &keys_file {
        keys.add_file(path)?;
    }
    if file.key_sources.environment {
        keys.add_environment(env)?;
    }
    let keys = keys.finish()?;
    if keys.is_empty() {
        return Err(ConfigError::NoKeys {
            location: origin.to_string(),
        });
    }
    for key in &keys {
        if !pools.contains_key(&key.pool) {
            return Err(invalid(
                format!("key {}", key.id),
                format!("unknown pool {:?}", key.pool),
            ));
        }
    }

    let dir = match (&overrides.state_dir, &file.state.dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => base_dir.join(dir),
        (None, None) => base_dir.join(DEFAULT_STATE_DIR),
    };
    let store = overrides
        .store
        .clone()
        .or_else(|| file.state.store.as_ref().map(|s| s.0.clone()));
    let state = match store {
        Some(_) if overrides.ephemeral || file.state.ephemeral => {
            return Err(invalid(
                at("state.store"),
                "a Redis store keeps state: it cannot be ephemeral too",
            ));
        }
        Some(url) => StateLocation::Redis(Box::new(replication(
            url,
            &file.replication,
            listen,
            dir,
            &at,
        )?)),
        None if overrides.ephemeral || file.state.ephemeral => StateLocation::Ephemeral,
        None => StateLocation::Directory(dir),
    };
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
        },
        keys,
        keys_file,
    })
}

/// Who may call: `server.auth`, `server.tokens` and the deprecated `server.auth_tokens`;
/// with what to tell the operator at start.
fn access(
    server: &ServerSection,
    listen: SocketAddr,
    at: &dyn Fn(&str) -> String,
) -> Result<(Access, Vec<String>), ConfigError> {
    let mut notices = Vec::new();
    let mut callers = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut hashes: HashMap<[u8; 32], String> = HashMap::new();
    for (index, section) in server.tokens.iter().enumerate() {
        let field = at(&format!("server.tokens[{index}]"));
        if section.token.is_some() {
            return Err(invalid(
                format!("{field}.token"),
                "tokens are never configured in clear: give sha256 = the SHA-256 of the token in hex (`keylease-server new-token` makes one and prints both)",
            ));
        }
        let name = section.name.clone().ok_or_else(|| {
            invalid(
                &field,
                "no name (who this caller is, shown in events and logs)",
            )
        })?;
        auth::check_name(&name).map_err(|reason| invalid(format!("{field}.name"), reason))?;
        let role = section.role.as_deref().ok_or_else(|| {
            invalid(
                &field,
                format!("no role (one of {})", Role::NAMES.join(", ")),
            )
        })?;
        let role = Role::parse(role).ok_or_else(|| {
            invalid(
                format!("{field}.role"),
                format!("{role:?} is not a role (one of {})", Role::NAMES.join(", ")),
            )
        })?;
        let credential = match (&section.sha256, &section.certificate) {
            (Some(hex), None) => {
                let hash = sha256_of_hex(hex).ok_or_else(|| {
                    invalid(
                        format!("{field}.sha256"),
                        "not a SHA-256 in hex (64 characters 0-9, a-f); the value is not shown",
                    )
                })?;
                if let Some(first) = hashes.insert(hash, name.clone()) {
                    return Err(invalid(
                        format!("{field}.sha256"),
                        format!("the same token as {first:?}'s"),
                    ));
                }
                Credential::Sha256(hash)
            }
            (None, Some(certificate)) => {
                auth::check_name(certificate)
                    .map_err(|reason| invalid(format!("{field}.certificate"), reason))?;
                Credential::Certificate(certificate.clone())
            }
            (Some(_), Some(_)) => {
                return Err(invalid(&field, "give sha256 or certificate, not both"));
            }
            (None, None) => {
                return Err(invalid(
                    &field,
                    "no credential: give sha256 (of a bearer token) or certificate (a client certificate's name)",
                ));
            }
        };
        if let Some(first) = names.insert(name.clone(), field.clone()) {
            return Err(invalid(
                format!("{field}.name"),
                format!("{name:?} is already the name of {first}"),
            ));
        }
        callers.push(TokenSpec {
            name,
            role,
            credential,
        });
    }
    for (index, token) in server.auth_tokens.iter().enumerate() {
        if token.0.trim().is_empty() || token.0.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                at(&format!("server.auth_tokens[{index}]")),
                "must be non-empty, without white space",
            ));
        }
        let name = format!("auth_tokens-{index}");
        if names.contains_key(&name) {
            return Err(invalid(
                at("server.tokens"),
                format!("{name:?} is the name the deprecated server.auth_tokens[{index}] takes"),
            ));
        }
        callers.push(TokenSpec {
            name,
            role: Role::Admin,
            credential: Credential::Clear(ApiKey::new(token.0.clone())),
        });
    }
    if !server.auth_tokens.is_empty() {
        notices.push(format!(
            "server.auth_tokens is deprecated and will be removed in the next release: its {} token(s) are admins named auth_tokens-N; configure [[server.tokens]] with a name, a role and the token's sha256 instead",
            server.auth_tokens.len()
        ));
    }
    let required = match server.auth.as_deref() {
        Some("off") if !callers.is_empty() => {
            return Err(invalid(
                at("server.auth"),
                "is \"off\" but callers are configured (server.tokens or server.auth_tokens): remove one or the other",
            ));
        }
        Some("off") => {
            notices.push(format!(
                "server.auth is \"off\": every caller on {listen} may do everything, admin calls included"
            ));
            false
        }
        Some(other) => {
            return Err(invalid(
                at("server.auth"),
                format!("{other:?} is not a setting: \"off\", or leave it out to require a token"),
            ));
        }
        None if !callers.is_empty() => true,
        None if listen.ip().is_loopback() => {
            notices.push(format!(
                "no tokens are configured: every caller on {listen} (loopback only) may do everything; configure [[server.tokens]] to require them"
            ));
            false
        }
        None => {
            return Err(invalid(
                at("server.tokens"),
                format!(
                    "none configured and server.listen ({listen}) is not a loopback address: anyone who reaches it could take keys. Configure [[server.tokens]], or set server.auth = \"off\" to run open"
                ),
            ));
        }
    };
    Ok((Access { required, callers }, notices))
}

/// `[server.tls]`, with `replication.ca`: the files exist and hold what they should.
fn tls_files(
    file: &FileConfig,
    base_dir: &Path,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<TlsFiles>, ConfigError> {
    let Some(section) = &file.server.tls else {
        if file.replication.ca.is_some() {
            return Err(invalid(
                at("replication.ca"),
                "only used with TLS: set [server.tls] too",
            ));
        }
        return Ok(None);
    };
    let (Some(certificate), Some(private_key)) = (&section.certificate, &section.private_key)
    else {
        return Err(invalid(
            at("server.tls"),
            "needs both certificate and private_key (PEM files)",
        ));
    };
    let client_certificate_required = match section.client_certificates.as_deref() {
        None | Some("optional") => false,
        Some("required") if section.client_ca.is_some() => true,
        Some("required") => {
            return Err(invalid(
                at("server.tls.client_certificates"),
                "\"required\" needs client_ca, the CAs that sign client certificates",
            ));
        }
        Some(other) => {
            return Err(invalid(
                at("server.tls.client_certificates"),
                format!("{other:?} is neither \"optional\" nor \"required\""),
            ));
        }
    };
    let files = TlsFiles {
        certificate: base_dir.join(certificate),
        private_key: base_dir.join(private_key),
        client_ca: section.client_ca.as_ref().map(|p| base_dir.join(p)),
        client_certificate_required,
        replica_ca: file.replication.ca.as_ref().map(|p| base_dir.join(p)),
    };
    crate::tls::Tls::load(files.clone())
        .map_err(|error| invalid(at("server.tls"), error.to_string()))?;
    Ok(Some(files))
}

/// 64 hexadecimal digits, as `sha256sum` prints them.
fn sha256_of_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

/// A replica's settings: the Redis URL (never quoted: it may hold a password) and
/// `[replication]`.
fn replication(
    url: String,
    section: &ReplicationSection,
    listen: SocketAddr,
    dir: PathBuf,
    at: &dyn Fn(&str) -> String,
) -> Result<Replication, ConfigError> {
    let parsed = match url.split_once("://") {
        Some(("redis", _)) => redis::Client::open(url.as_str()).ok(),
        _ => None,
    };
    if parsed.is_none() {
        return Err(invalid(
            at("state.store"),
            "not a Redis URL: expected redis://HOST:PORT/DB (the value is not shown: it may hold a password)",
        ));
    }
    let token = match &section.token {
        None => {
            return Err(invalid(
                at("replication.token"),
                "required with a Redis store: the same secret on every replica (or KEYLEASE_REPLICATION__TOKEN)",
            ));
        }
        Some(token)
            if token.0.chars().count() < MIN_REPLICATION_TOKEN
                || token.0.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            return Err(invalid(
                at("replication.token"),
                format!("must be at least {MIN_REPLICATION_TOKEN} characters, without white space"),
            ));
        }
        Some(token) => ApiKey::new(token.0.clone()),
    };
    let advertise = match &section.advertise {
        Some(address) => {
            let port = address
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            match port {
                Some((host, Ok(port))) if !host.is_empty() && port != 0 => address.clone(),
                _ => {
                    return Err(invalid(
                        at("replication.advertise"),
                        format!("{address:?} is not HOST:PORT"),
                    ));
                }
            }
        }
        None if listen.ip().is_unspecified() || listen.port() == 0 => {
            return Err(invalid(
                at("replication.advertise"),
                format!(
                    "required when server.listen ({listen}) is not an address other replicas can reach"
                ),
            ));
        }
        None => listen.to_string(),
    };
    let namespace = &section.namespace;
    if namespace.is_empty()
        || namespace.len() > 64
        || !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(invalid(
            at("replication.namespace"),
            "must be 1 to 64 letters, digits, `_`, `-` or `.`",
        ));
    }
    let ttl = section.leader_ttl;
    if ttl < Duration::from_millis(300) || ttl > Duration::from_secs(60) {
        return Err(invalid(
            at("replication.leader_ttl"),
            "must be between 300ms and 60s",
        ));
    }
    if section.max_clock_skew > Duration::from_secs(60) {
        return Err(invalid(
            at("replication.max_clock_skew"),
            "must be at most 60s",
        ));
    }
    Ok(Replication {
        url: ApiKey::new(url),
        namespace: namespace.clone(),
        token,
        advertise,
        leader_ttl: ttl,
        max_clock_skew: section.max_clock_skew,
        dir,
    })
}

fn pool_config(
    name: &str,
    pool: &PoolSection,
    ceiling: &AutoCeiling,
    at: &dyn Fn(&str) -> String,
) -> Result<PoolConfig, ConfigError> {
    let field = |rest: &str| at(&format!("pools.{name}.{rest}"));
    if pool.models.is_empty() {
        return Err(invalid(field("models"), "no model is configured"));
    }
    let max_leases_per_key = pool.max_leases_per_key.unwrap_or(1);
    if max_leases_per_key == 0 {
        return Err(invalid(field("max_leases_per_key"), "must be above zero"));
    }
    let mut models = BTreeMap::new();
    for (model, limits) in &pool.models {
        let canonical = canonical_model(model).to_string();
        if canonical.is_empty() {
            return Err(invalid(field("models"), "a model name is empty"));
        }
        if models
            .insert(
                canonical.clone(),
                limits_of(limits, ceiling, &field(&format!("models.{model:?}")))?,
            )
            .is_some()
        {
            return Err(invalid(
                field(&format!("models.{model:?}")),
                format!("{canonical} is configured twice"),
            ));
        }
    }
    let mut project_limits = BTreeMap::new();
    for (project, per_model) in &pool.projects {
        for (model, limits) in per_model {
            let location = field(&format!("projects.{project:?}.{model:?}"));
            let canonical = canonical_model(model).to_string();
            if !models.contains_key(&canonical) {
                return Err(invalid(
                    location,
                    format!("unknown model {canonical:?} (not in pools.{name}.models)"),
                ));
            }
            project_limits.insert(
                (project.clone(), canonical),
                limits_of(limits, ceiling, &location)?,
            );
        }
    }
    Ok(PoolConfig {
        max_leases_per_key,
        models,
        project_limits,
        other_models: None,
    })
}

fn limits_of(
    limits: &LimitSection,
    ceiling: &AutoCeiling,
    location: &str,
) -> Result<Limits, ConfigError> {
    let mut figures = [None; 4];
    let mut auto = [false; 4];
    for (index, (field, value, ceiling)) in [
        (
            "requests_per_minute",
            limits.requests_per_minute,
            ceiling.requests_per_minute,
        ),
        (
            "tokens_per_minute",
            limits.tokens_per_minute,
            ceiling.tokens_per_minute,
        ),
        (
            "requests_per_day",
            limits.requests_per_day,
            ceiling.requests_per_day,
        ),
        (
            "tokens_per_day",
            limits.tokens_per_day,
            ceiling.tokens_per_day,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        figures[index] = match value {
            Some(LimitValue::Figure(0)) => {
                return Err(invalid(
                    format!("{location}.{field}"),
                    "must be above zero (leave it out for no limit)",
                ));
            }
            Some(LimitValue::Figure(figure)) => Some(figure),
            Some(LimitValue::Auto) => {
                auto[index] = true;
                Some(ceiling)
            }
            None => None,
        };
    }
    let [
        requests_per_minute,
        tokens_per_minute,
        requests_per_day,
        tokens_per_day,
    ] = figures;
    Ok(Limits {
        requests_per_minute,
        tokens_per_minute,
        requests_per_day,
        tokens_per_day,
        auto,
    })
}

/// Gathers keys from every source, refusing duplicates with both places named.
struct KeyCollector<'a> {
    id_salt: &'a str,
    keys: Vec<KeySpec>,
    /// Where each secret and each id came from.
    secret_origin: HashMap<ApiKey, String>,
    id_origin: HashMap<String, String>,
}

impl<'a> KeyCollector<'a> {
    fn new(id_salt: &'a str) -> Self {
        Self {
            id_salt,
            keys: Vec::new(),
            secret_origin: HashMap::new(),
            id_origin: HashMap::new(),
        }
    }

    fn add(
        &mut self,
        origin: &str,
        secret: &str,
        id: Option<&str>,
        project: Option<&str>,
        pool: Option<&str>,
        max_leases: Option<u32>,
    ) -> Result<(), ConfigError> {
        let secret = secret.trim();
        if let Some(problem) = secret_problem(secret) {
            return Err(invalid(origin, problem));
        }
        let secret = ApiKey::new(secret);
        if let Some(first) = self.secret_origin.get(&secret) {
            return Err(invalid(
                origin,
                format!("duplicate key {} (first at {first})", secret.masked()),
            ));
        }
        let id = match id {
            Some(id) if id.trim().is_empty() => return Err(invalid(origin, "the id is empty")),
            Some(id) => id.trim().to_string(),
            None => crate::secret::derived_id(&secret, self.id_salt),
        };
        for (what, name) in [
            ("id", Some(id.as_str())),
            ("project", project),
            ("pool", pool),
        ] {
            if let Some(problem) = name.and_then(|name| name_problem(name.trim())) {
                return Err(invalid(origin, format!("the {what} {problem}")));
            }
        }
        if let Some(first) = self.id_origin.get(&id) {
            return Err(invalid(
                origin,
                format!("duplicate key id {id:?} (first at {first})"),
            ));
        }
        if max_leases == Some(0) {
            return Err(invalid(origin, "max_leases must be above zero"));
        }
        let project = match project {
            Some(p) if p.trim().is_empty() => return Err(invalid(origin, "the project is empty")),
            Some(p) => p.trim().to_string(),
            // Without a project the key is its own quota group.
            None => format!("project-of-{id}"),
        };
        self.secret_origin
            .insert(secret.clone(), origin.to_string());
        self.id_origin.insert(id.clone(), origin.to_string());
        self.keys.push(KeySpec {
            fingerprint: String::new(),
            id,
            pool: pool.unwrap_or(DEFAULT_POOL).to_string(),
            project,
            secret,
            max_leases,
        });
        Ok(())
    }

    fn add_entry(
        &mut self,
        origin: &str,
        entry: &KeyEntry,
        env: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        let secret = match (&entry.secret, &entry.secret_env) {
            (Some(secret), None) => secret.0.clone(),
            (None, Some(var)) => env.get(var).cloned().ok_or_else(|| {
                invalid(origin, format!("secret_env names {var}, which is not set"))
            })?,
            (Some(_), Some(_)) => {
                return Err(invalid(origin, "give secret or secret_env, not both"));
            }
            (None, None) => return Err(invalid(origin, "no secret (give secret or secret_env)")),
        };
        self.add(
            origin,
            &secret,
            entry.id.as_deref(),
            entry.project.as_deref(),
            entry.pool.as_deref(),
            entry.max_leases,
        )
    }

    /// One key per line: `SECRET [id=ID] [project=P] [pool=POOL] [max_leases=N]`, `#` comments;
    /// or `.env` lines, `[export] GEMINI_API_KEY[_<n>][_PROJECT]=VALUE`, read as the environment
    /// source reads those variables. Errors give the line and column, never the line's text.
    fn add_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path)
            .map_err(|e| invalid(&name, format!("cannot read the keys file: {e}")))?;
        let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
        let text = std::str::from_utf8(bytes).map_err(|e| {
            invalid(
                &name,
                format!("not UTF-8 text (at byte {})", e.valid_up_to()),
            )
        })?;
        let mut variables: HashMap<String, String> = HashMap::new();
        let mut variable_lines: HashMap<String, usize> = HashMap::new();
        for (number, line) in lines_any_ending(text).enumerate() {
            let origin = format!("{name}:{}", number + 1);
            let at_column = |word: &str| {
                let offset = word.as_ptr() as usize - line.as_ptr() as usize;
                format!("{origin}:{}", line[..offset].chars().count() + 1)
            };
            // A comment starts the line or follows white space: keys never hold either.
            let comment = line
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || line[..i].ends_with(char::is_whitespace)));
            let line = comment.map_or(line, |(i, _)| &line[..i]);
            let mut words = line.split_whitespace().peekable();
            if words.peek() == Some(&"export") {
                words.next();
            }
            let Some(first) = words.next() else { continue };
            if let Some((variable, value)) = first.split_once('=')
                && ASSIGNMENT.is_match(first)
            {
                if !is_key_variable(variable) {
                    return Err(invalid(
                        at_column(first),
                        format!(
                            "a NAME=VALUE line whose name is not {GEMINI_KEY_VAR}, {GEMINI_KEY_VAR}_<n> or {GEMINI_KEY_VAR}_<n>_PROJECT (the line is not shown: it may hold a secret)"
                        ),
                    ));
                }
                let rest_start = value.as_ptr() as usize - line.as_ptr() as usize;
                let value = line[rest_start..].trim();
                let value = ['"', '\'']
                    .iter()
                    .find_map(|&q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
                    .unwrap_or(value);
                if let Some(first_line) = variable_lines.insert(variable.to_string(), number + 1) {
                    return Err(invalid(
                        at_column(first),
                        format!("{variable} is set twice (first on line {first_line})"),
                    ));
                }
                variables.insert(variable.to_string(), value.to_string());
                continue;
            }
            if let Some((annotation, _)) = first.split_once('=')
                && ANNOTATIONS.contains(&annotation)
            {
                return Err(invalid(
                    at_column(first),
                    "the key must come first on the line, before id=, project=, pool= and max_leases=",
                ));
            }
            let mut notes: HashMap<&str, &str> = HashMap::new();
            for word in words {
                let Some((annotation, value)) = word.split_once('=') else {
                    return Err(invalid(
                        at_column(word),
                        "expected name=value after the key, found a word without '=' (one key per line; the word is not shown)",
                    ));
                };
                if !ANNOTATIONS.contains(&annotation) {
                    return Err(invalid(
                        at_column(word),
                        "unknown annotation (id, project, pool, max_leases); the word is not shown",
                    ));
                }
                notes.insert(annotation, value);
            }
            let max_leases = notes
                .get("max_leases")
                .map(|v| {
                    v.parse::<u32>()
                        .map_err(|_| invalid(&origin, "max_leases is not a number"))
                })
                .transpose()?;
            self.add(
                &origin,
                first,
                notes.get("id").copied(),
                notes.get("project").copied(),
                notes.get("pool").copied(),
                max_leases,
            )?;
        }
        let origin_of = |variable: &str| {
            format!(
                "{name}:{} ({variable})",
                variable_lines.get(variable).copied().unwrap_or(0)
            )
        };
        self.add_variables(&variables, origin_of)
    }

    fn add_environment(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        self.add_variables(env, |variable| variable.to_string())
    }

    /// The keys in `GEMINI_API_KEY` and `GEMINI_API_KEY_<n>` of `env`, each in the project of
    /// its `…_PROJECT` variable; `origin_of` says where a variable was set.
    fn add_variables(
        &mut self,
        env: &HashMap<String, String>,
        origin_of: impl Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let mut numbered: Vec<(u32, &String)> = env
            .iter()
            .filter_map(|(name, value)| {
                let n = name
                    .strip_prefix(GEMINI_KEY_VAR)?
                    .strip_prefix('_')?
                    .parse()
                    .ok()?;
                Some((n, value))
            })
            .collect();
        numbered.sort();
        if let Some(value) = env.get(GEMINI_KEY_VAR) {
            self.add(
                &origin_of(GEMINI_KEY_VAR),
                value,
                None,
                env.get(&format!("{GEMINI_KEY_VAR}_PROJECT"))
                    .map(String::as_str),
                None,
                None,
            )?;
        }
        for (n, value) in numbered {
            let var = format!("{GEMINI_KEY_VAR}_{n}");
            let project = env.get(&format!("{var}_PROJECT")).map(String::as_str);
            self.add(&origin_of(&var), value, None, project, None, None)?;
        }
        Ok(())
    }

    /// The keys, unless an id or project holds a secret: both are shown to every operator.
    fn finish(self) -> Result<Vec<KeySpec>, ConfigError> {
        let redactor = Redactor::new(self.keys.iter().map(|k| &k.secret));
        for key in &self.keys {
            for (what, text) in [("id", &key.id), ("project", &key.project)] {
                if redactor.finds_secret(text) {
                    let origin = &self.secret_origin[&key.secret];
                    return Err(invalid(
                        origin,
                        format!(
                            "the {what} holds a key or looks like one; ids and projects are shown to every operator"
                        ),
                    ));
                }
            }
        }
        Ok(self.keys)
    }
}

/// What a keys-file line may say after its key, as `name=value`.
const ANNOTATIONS: [&str; 4] = ["id", "project", "pool", "max_leases"];

/// What is wrong with `secret` (trimmed) as a key's secret, if anything.
pub fn secret_problem(secret: &str) -> Option<&'static str> {
    if secret.is_empty() {
        Some("the key is empty")
    } else if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("the key contains white space")
    } else if ASSIGNMENT.is_match(secret) {
        Some("the key starts with a variable name and '=': give the key alone")
    } else {
        None
    }
}

/// What is wrong with `name` as a key id, project or pool, if anything (never quoting it).
pub fn name_problem(name: &str) -> Option<String> {
    (name.len() > keylease::MAX_NAME_BYTES).then(|| {
        format!(
            "is {} bytes, above the maximum of {}",
            name.len(),
            keylease::MAX_NAME_BYTES
        )
    })
}

/// `NAME=` at the start of a word: an environment assignment, not a key.
static ASSIGNMENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Z_][A-Z0-9_]*=").expect("a valid pattern"));

/// Whether `name` is a variable the environment source reads: `GEMINI_API_KEY`,
/// `GEMINI_API_KEY_<n>`, and the same with `_PROJECT`.
fn is_key_variable(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(GEMINI_KEY_VAR) else {
        return false;
    };
    let rest = rest.strip_suffix("_PROJECT").unwrap_or(rest);
    rest.is_empty()
        || rest
            .strip_prefix('_')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Lines of a text file, each ended by LF, CRLF or a lone CR.
fn lines_any_ending(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .flat_map(|line| line.strip_suffix('\r').unwrap_or(line).split('\r'))
}

#[cfg(test)]
mod tests;
