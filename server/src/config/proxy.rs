//! `[proxy]`: the Gemini-compatible proxy's section as written, and as validated
//! ([`ProxySettings`], which `keylease-proxy`'s flags fill too), with its defaults and bounds.

use super::{ConfigError, FileConfig, MAX_DURATION, invalid};
use crate::auth::Access;
use serde::Deserialize;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// `[proxy]` (or `keylease-proxy`'s flags), validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    /// Gemini's base URL: `https://generativelanguage.googleapis.com`, or a fake.
    pub upstream: String,
    /// Longest wait for a key before the caller gets a 429 (the SDK's `X-Server-Timeout`
    /// shortens it).
    pub wait: Duration,
    /// Longest a whole call may take: waits, retries and the answer.
    pub timeout: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// The model whose lease lists the models (`GET models`); `None`: listing is refused.
    pub listing_model: Option<String>,
    /// What its connections may hold.
    pub limits: HttpLimits,
}

pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Gemini's own limit on an inline request.
pub const DEFAULT_MAX_BODY: usize = 20 * 1024 * 1024;
/// What `max_body` may be: room for a prompt, and no more than a GiB held per call.
pub const MAX_BODY_RANGE: std::ops::RangeInclusive<usize> = 1024..=1 << 30;
/// The proxy's connection limits unless configured.
pub const DEFAULT_LIMITS: HttpLimits = HttpLimits {
    max_connections: 1024,
    header_timeout: Duration::from_secs(10),
    body_timeout: Duration::from_secs(60),
    idle_timeout: Duration::from_secs(60),
};
/// What connections to an HTTP port (the proxy's) may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections at once; one more is accepted and closed at once.
    pub max_connections: usize,
    /// How long a client has to send a request's headers (HTTP/1.1), from when the server
    /// starts reading them: a connection that sends a request line and stops is closed.
    pub header_timeout: Duration,
    /// How long a client has to send a request's whole body (see the proxy).
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// An upstream base URL, checked: `http(s)://host[:port][/path]`, without credentials, a query
/// or a fragment (a key in a URL ends up in logs). Returned without a trailing `/`.
pub fn check_upstream(url: &str) -> Result<String, String> {
    // The URL is never quoted: a mistaken one may hold a key.
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err("give an http:// or https:// URL with a host".into());
    }
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(
            "holds credentials, a query or a fragment: give the base URL alone (the proxy puts each leased key in a header)"
                .into(),
        );
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// `[proxy]`: the Gemini-compatible HTTP endpoint; off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub listen: Option<String>,
    /// Gemini's base URL.
    pub upstream: String,
    /// Longest wait for a key before answering 429.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// Longest a whole call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body: u64,
    /// The model leased to list models; default: the first of the `gemini` pool.
    pub listing_model: Option<String>,
    /// Connections at once (fitted to the open-file limit at start).
    pub max_connections: usize,
    /// How long a client has to send a request's headers.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a client has to send a request's body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ProxySection {
    fn default() -> Self {
        let limits = DEFAULT_LIMITS;
        Self {
            listen: None,
            upstream: keylease_client::gemini::DEFAULT_BASE_URL.to_string(),
            wait: DEFAULT_WAIT,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY as u64,
            listing_model: None,
            max_connections: limits.max_connections,
            header_timeout: limits.header_timeout,
            body_timeout: limits.body_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }
}

/// `[proxy]`, checked: its own port, an upstream URL, and no open proxy off loopback.
pub(super) fn proxy_settings(
    file: &FileConfig,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    access: &Access,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<ProxySettings>, ConfigError> {
    let section = &file.proxy;
    let Some(address) = &section.listen else {
        return Ok(None);
    };
    let parsed = SocketAddr::from_str(address).map_err(|_| {
        invalid(
            at("proxy.listen"),
            format!("{address:?} is not an address:port"),
        )
    })?;
    if parsed.port() != 0 && (parsed == listen || Some(parsed) == metrics_listen) {
        return Err(invalid(
            at("proxy.listen"),
            "is the address of server.listen or metrics.listen: the proxy needs a port of its own",
        ));
    }
    if !parsed.ip().is_loopback() && !access.required && file.server.auth.as_deref() != Some("off")
    {
        return Err(invalid(
            at("proxy.listen"),
            format!(
                "{parsed} is not a loopback address and no tokens are configured: anyone who reaches it could spend the keys. Configure [[server.tokens]] (callers give theirs as the API key), or set server.auth = \"off\" to run open"
            ),
        ));
    }
    let upstream = check_upstream(&section.upstream)
        .map_err(|reason| invalid(at("proxy.upstream"), reason))?;
    for (field, value) in [
        ("proxy.wait", section.wait),
        ("proxy.timeout", section.timeout),
        ("proxy.header_timeout", section.header_timeout),
        ("proxy.body_timeout", section.body_timeout),
        ("proxy.idle_timeout", section.idle_timeout),
    ] {
        if value.is_zero() || value > MAX_DURATION {
            return Err(invalid(
                at(field),
                "must be between a millisecond and a year",
            ));
        }
    }
    let max_body = usize::try_from(section.max_body)
        .ok()
        .filter(|bytes| MAX_BODY_RANGE.contains(bytes))
        .ok_or_else(|| invalid(at("proxy.max_body"), "must be between 1024 bytes and 1 GiB"))?;
    let listing_model = match &section.listing_model {
        Some(model) => {
            // Without [pools], the gemini pool serves any model.
            let known = file.pools.is_empty()
                || file
                    .pools
                    .values()
                    .any(|pool| pool.models.contains_key(model));
            if !known {
                return Err(invalid(
                    at("proxy.listing_model"),
                    format!("{model:?} is not a model of any pool"),
                ));
            }
            Some(model.clone())
        }
        None => file
            .pools
            .get(keylease_engine::DEFAULT_POOL)
            .and_then(|pool| pool.models.keys().next().cloned()),
    };
    if section.max_connections == 0 {
        return Err(invalid(at("proxy.max_connections"), "must be above zero"));
    }
    Ok(Some(ProxySettings {
        listen: parsed,
        upstream,
        wait: section.wait,
        timeout: section.timeout,
        max_body,
        listing_model,
        limits: HttpLimits {
            max_connections: section.max_connections,
            header_timeout: section.header_timeout,
            body_timeout: section.body_timeout,
            idle_timeout: section.idle_timeout,
        },
    }))
}
