//! How a [`Setup`] is laid out in records and snapshots, so that every build reads what it
//! needs of every other's. A [`Limits`] keeps the layout of rules 2 and 3 (three figures and
//! three `auto` marks); tokens per day, which rules 4 added, follow the setup's `rules` as a
//! trailing table, written from rules 4 on and read only where `rules` says it is there.
//!
//! Why a trailing table rather than a fourth figure: a `Configure` record ends with its setup,
//! and an older build ignores bytes after what it reads. Such a build reads a newer setup
//! whole, learns from its `rules` that newer rules decided what follows, and refuses the
//! records with a message that says so, instead of misreading every limit after the first.
//! Whether keys are checked, which rules 8 added, follows the table the same way.

use crate::quota::Limits;
use crate::{EngineConfig, KeySpec, Setup};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The rules from which a setup carries tokens per day.
pub(crate) const RULES_TOKENS_PER_DAY: u32 = 4;
/// The rules from which a setup says whether keys are checked.
const RULES_CHECKING_KEYS: u32 = crate::health::RULES_KEY_HEALTH;

/// [`Limits`] as rules 2 and 3 laid them out.
#[derive(Serialize, Deserialize)]
pub(crate) struct LimitsLayout {
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    requests_per_day: Option<u64>,
    auto: [bool; 3],
}

impl From<Limits> for LimitsLayout {
    fn from(limits: Limits) -> Self {
        let [rpm, tpm, rpd, _] = limits.auto;
        Self {
            requests_per_minute: limits.requests_per_minute,
            tokens_per_minute: limits.tokens_per_minute,
            requests_per_day: limits.requests_per_day,
            auto: [rpm, tpm, rpd],
        }
    }
}

impl From<LimitsLayout> for Limits {
    fn from(layout: LimitsLayout) -> Self {
        let [rpm, tpm, rpd] = layout.auto;
        Self {
            requests_per_minute: layout.requests_per_minute,
            tokens_per_minute: layout.tokens_per_minute,
            requests_per_day: layout.requests_per_day,
            tokens_per_day: None,
            auto: [rpm, tpm, rpd, false],
        }
    }
}

/// Which of a pool's limits a trailing entry belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Place {
    Model(String),
    Project { project: String, model: String },
    OtherModels,
}

/// One tokens-per-day limit of the trailing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TokensPerDay {
    pool: String,
    place: Place,
    figure: Option<u64>,
    auto: bool,
}

/// Every tokens-per-day limit `config` sets, in a stable order.
fn table_of(config: &EngineConfig) -> Vec<TokensPerDay> {
    let mut table = Vec::new();
    for (pool, limits) in &config.pools {
        let mut add = |place: Place, limits: &Limits| {
            let auto = limits.auto[3];
            if limits.tokens_per_day.is_some() || auto {
                table.push(TokensPerDay {
                    pool: pool.clone(),
                    place,
                    figure: limits.tokens_per_day,
                    auto,
                });
            }
        };
        for (model, l) in &limits.models {
            add(Place::Model(model.clone()), l);
        }
        for ((project, model), l) in &limits.project_limits {
            let place = Place::Project {
                project: project.clone(),
                model: model.clone(),
            };
            add(place, l);
        }
        if let Some(l) = &limits.other_models {
            add(Place::OtherModels, l);
        }
    }
    table
}

/// Puts `table` back into `config`; an entry naming no limit there is refused.
fn apply_table(config: &mut EngineConfig, table: Vec<TokensPerDay>) -> Result<(), String> {
    for entry in table {
        let pool = config
            .pools
            .get_mut(&entry.pool)
            .ok_or_else(|| format!("tokens per day of unknown pool {}", entry.pool))?;
        let limits = match &entry.place {
            Place::Model(model) => pool.models.get_mut(model),
            Place::Project { project, model } => pool
                .project_limits
                .get_mut(&(project.clone(), model.clone())),
            Place::OtherModels => pool.other_models.as_mut(),
        }
        .ok_or_else(|| {
            format!(
                "tokens per day of {:?} in pool {}: no such limits",
                entry.place, entry.pool
            )
        })?;
        limits.tokens_per_day = entry.figure;
        limits.auto[3] = entry.auto;
    }
    Ok(())
}

impl Serialize for Setup {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let trailing = self.rules >= RULES_TOKENS_PER_DAY;
        let checks = self.rules >= RULES_CHECKING_KEYS;
        let len = 4 + usize::from(trailing) + usize::from(checks);
        let mut tuple = serializer.serialize_tuple(len)?;
        tuple.serialize_element(&self.config)?;
        tuple.serialize_element(&self.keys)?;
        tuple.serialize_element(&self.token_floor)?;
        tuple.serialize_element(&self.rules)?;
        if trailing {
            tuple.serialize_element(&table_of(&self.config))?;
        }
        if checks {
            tuple.serialize_element(&self.config.check_keys)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Setup {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SetupVisitor;

        impl<'de> Visitor<'de> for SetupVisitor {
            type Value = Setup;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a keylease setup")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Setup, A::Error> {
                let missing = |what: &str| de::Error::custom(format!("setup without its {what}"));
                let mut config: EngineConfig = seq
                    .next_element()?
                    .ok_or_else(|| missing("configuration"))?;
                let keys: Vec<KeySpec> = seq.next_element()?.ok_or_else(|| missing("keys"))?;
                let token_floor: u64 = seq.next_element()?.ok_or_else(|| missing("token floor"))?;
                let rules: u32 = seq.next_element()?.ok_or_else(|| missing("rules"))?;
                if rules >= RULES_TOKENS_PER_DAY {
                    let table: Vec<TokensPerDay> = seq
                        .next_element()?
                        .ok_or_else(|| missing("tokens per day"))?;
                    apply_table(&mut config, table).map_err(de::Error::custom)?;
                }
                if rules >= RULES_CHECKING_KEYS {
                    config.check_keys = seq.next_element()?.ok_or_else(|| missing("key checks"))?;
                }
                Ok(Setup {
                    config,
                    keys,
                    token_floor,
                    rules,
                })
            }
        }

        // Read as a tuple as long as the longest layout: postcard reads only what is asked.
        deserializer.deserialize_tuple(6, SetupVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PoolConfig, RULES_VERSION};

    fn limits(tokens_per_day: Option<u64>, auto: bool) -> Limits {
        Limits {
            requests_per_minute: Some(10),
            tokens_per_minute: None,
            requests_per_day: Some(1_000),
            tokens_per_day,
            auto: [true, false, false, auto],
        }
    }

    fn setup(rules: u32) -> Setup {
        let pool = PoolConfig {
            max_leases_per_key: 1,
            models: [("m".to_string(), limits(Some(1_000_000), false))].into(),
            project_limits: [(("p".to_string(), "m".to_string()), limits(Some(5), true))].into(),
            other_models: Some(limits(None, true)),
        };
        let mut config = crate::tests::config(10, 100);
        config.pools = [("gemini".to_string(), pool)].into();
        Setup {
            rules,
            ..Setup::new(config, Vec::new(), 7)
        }
    }

    /// A setup as rules 2 and 3 laid it out (their `Setup` derived its layout).
    #[derive(Serialize, Deserialize)]
    struct SetupOfRules3 {
        config: EngineConfig,
        keys: Vec<KeySpec>,
        token_floor: u64,
        rules: u32,
    }

    #[test]
    fn key_checks_survive_a_record_from_rules_8_on() {
        let mut checked = setup(RULES_VERSION);
        checked.config.check_keys = true;
        let read: Setup = super::super::decode(&super::super::encode(&checked)).unwrap();
        assert!(read.config.check_keys);
        // Rules 7 had no checks: nothing is written, and none are read.
        let mut older = setup(7);
        older.config.check_keys = true;
        let bytes = super::super::encode(&older);
        let read: Setup = super::super::decode(&bytes).unwrap();
        assert!(!read.config.check_keys);
        assert_eq!(bytes, super::super::encode(&setup(7)));
    }

    #[test]
    fn tokens_per_day_survive_a_record() {
        let setup = setup(RULES_VERSION);
        let bytes = super::super::encode(&setup);
        let read: Setup = super::super::decode(&bytes).unwrap();
        assert_eq!(read, setup);
        // Cut inside the trailing table: refused, not read as a setup without it.
        assert!(super::super::decode::<Setup>(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_setup_of_rules_3_reads_without_tokens_per_day() {
        let mut old = setup(3);
        let bytes = super::super::encode(&old);
        let written_then: SetupOfRules3 = super::super::decode(&bytes).unwrap();
        assert_eq!(super::super::encode(&written_then), bytes, "the old layout");
        for pool in old.config.pools.values_mut() {
            for l in pool
                .models
                .values_mut()
                .chain(pool.project_limits.values_mut())
            {
                (l.tokens_per_day, l.auto[3]) = (None, false);
            }
            if let Some(l) = &mut pool.other_models {
                (l.tokens_per_day, l.auto[3]) = (None, false);
            }
        }
        assert_eq!(super::super::decode::<Setup>(&bytes).unwrap(), old);
    }

    #[test]
    fn an_older_build_reads_a_newer_setup_up_to_its_rules() {
        let bytes = super::super::encode(&setup(RULES_VERSION));
        let read: SetupOfRules3 = super::super::decode(&bytes).unwrap();
        assert_eq!(read.rules, RULES_VERSION);
        assert_eq!(read.token_floor, 7);
        let model = &read.config.pools["gemini"].models["m"];
        assert_eq!(model.requests_per_day, Some(1_000));
        assert!(model.auto[0]);
    }

    #[test]
    fn a_table_naming_no_limit_is_refused() {
        let mut config = setup(RULES_VERSION).config;
        let stray = vec![TokensPerDay {
            pool: "gemini".into(),
            place: Place::Model("unknown".into()),
            figure: Some(1),
            auto: false,
        }];
        let error = apply_table(&mut config, stray).unwrap_err();
        assert!(error.contains("no such limits"), "{error}");
    }
}
