//! `[replication]` and `[state] store`: the Redis log replicas share, its token, and how they
//! find each other, validated into a [`Replication`].

use super::*;

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
pub(super) const MIN_REPLICATION_TOKEN: usize = 16;

/// A replica's settings: the Redis URL (never quoted: it may hold a password) and
/// `[replication]`.
pub(super) fn replication(
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

/// Where the state lives: a Redis log shared by replicas, a directory, or nowhere.
pub(super) fn state_location(
    file: &FileConfig,
    overrides: &Overrides,
    listen: SocketAddr,
    base_dir: &Path,
    at: &impl Fn(&str) -> String,
) -> Result<StateLocation, ConfigError> {
    let dir = match (&overrides.state_dir, &file.state.dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => base_dir.join(dir),
        (None, None) => base_dir.join(DEFAULT_STATE_DIR),
    };
    let store = overrides
        .store
        .clone()
        .or_else(|| file.state.store.as_ref().map(|s| s.0.clone()));
    Ok(match store {
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
    })
}
