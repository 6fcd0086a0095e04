//! `[health]`: checking keys with the provider (see [`crate::key_checks`]); off unless the
//! section is present. Its section as written, and as validated ([`HealthSettings`]), with its
//! defaults and bounds.

use super::proxy::check_upstream;
use super::{ConfigError, FileConfig, MAX_DURATION, invalid};
use serde::Deserialize;
use std::time::Duration;

/// `[health]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Gemini's base URL, where keys are checked.
    pub upstream: String,
    /// Per pool, the model whose `models.get` checks its keys; a pool without one checks with
    /// the listing (`GET models`). Both cost no quota.
    pub models: Vec<(String, String)>,
    /// Longest one check may take; past it, the check has no answer.
    pub timeout: Duration,
    /// Checks at once.
    pub concurrency: usize,
    /// How often keys without an answer, and keys disabled for a reason an operator may fix
    /// (a suspended project, the API disabled, a permission), are checked again.
    pub retry_interval: Duration,
    /// How often healthy keys are checked again; `None`: only at start and on demand.
    pub interval: Option<Duration>,
}

impl HealthSettings {
    /// The model whose read checks the keys of `pool`, if it has one.
    pub fn model_of(&self, pool: &str) -> Option<&str> {
        self.models
            .iter()
            .find(|(name, _)| name == pool)
            .map(|(_, model)| model.as_str())
    }
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONCURRENCY: usize = 8;
pub const MAX_CONCURRENCY: usize = 256;
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(300);
/// Checks of one key on schedule are at least this far apart: no setting makes keylease
/// hammer the provider.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    /// Default: `[proxy] upstream`, else Google's.
    pub upstream: Option<String>,
    /// Default: each pool's first listed model.
    pub model: Option<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            upstream: None,
            model: None,
            timeout: DEFAULT_TIMEOUT,
            concurrency: DEFAULT_CONCURRENCY,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            interval: None,
        }
    }
}

/// `[health]`, checked; `None` when the section is absent.
pub(super) fn health_settings(
    file: &FileConfig,
    pools: &[(String, Vec<String>)],
    at: &dyn Fn(&str) -> String,
) -> Result<Option<HealthSettings>, ConfigError> {
    let Some(section) = &file.health else {
        return Ok(None);
    };
    let upstream = match &section.upstream {
        Some(url) => {
            check_upstream(url).map_err(|reason| invalid(at("health.upstream"), reason))?
        }
        None => check_upstream(&file.proxy.upstream)
            .map_err(|reason| invalid(at("proxy.upstream"), reason))?,
    };
    if section.timeout.is_zero() || section.timeout > MAX_DURATION {
        return Err(invalid(
            at("health.timeout"),
            "must be between a millisecond and a year",
        ));
    }
    if !(1..=MAX_CONCURRENCY).contains(&section.concurrency) {
        return Err(invalid(
            at("health.concurrency"),
            format!("must be between 1 and {MAX_CONCURRENCY}"),
        ));
    }
    for (field, value) in [
        ("health.retry_interval", Some(section.retry_interval)),
        ("health.interval", section.interval),
    ] {
        if let Some(value) = value
            && (value < MIN_INTERVAL || value > MAX_DURATION)
        {
            return Err(invalid(at(field), "must be between a second and a year"));
        }
    }
    let models = match &section.model {
        Some(model) => {
            let model = keylease_engine::canonical_model(model);
            let known = pools
                .iter()
                .any(|(_, models)| models.iter().any(|m| m == model));
            if !known {
                return Err(invalid(
                    at("health.model"),
                    format!("{model:?} is not a model of any pool"),
                ));
            }
            pools
                .iter()
                .map(|(pool, _)| (pool.clone(), model.to_string()))
                .collect()
        }
        None => pools
            .iter()
            .filter_map(|(pool, models)| Some((pool.clone(), models.first()?.clone())))
            .collect(),
    };
    Ok(Some(HealthSettings {
        upstream,
        models,
        timeout: section.timeout,
        concurrency: section.concurrency,
        retry_interval: section.retry_interval,
        interval: section.interval,
    }))
}
