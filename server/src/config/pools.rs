//! `[pools]`: each pool's models and projects with their limits (a figure or `"auto"`),
//! validated into the engine's [`PoolConfig`]s.

use super::*;

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

pub(super) fn pool_config(
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

pub(super) fn limits_of(
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

/// The pools as configured, checked against `quota.auto_ceiling`; with none configured, the
/// default pool that learns every limit (and a notice saying so).
pub(super) fn pools(
    file: &FileConfig,
    notices: &mut Vec<String>,
    at: &impl Fn(&str) -> String,
) -> Result<BTreeMap<String, PoolConfig>, ConfigError> {
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

    Ok(pools)
}
