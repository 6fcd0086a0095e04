//! `[tenants.NAME]`: the teams that share the keys, by caller name (a token's or a
//! certificate's). Absent, nothing changes: every acquire waits first come, first served. Its
//! section as written, as validated ([`Tenants`]), and the one place a call's tenant, class and
//! share are decided ([`Tenants::caller`]), which the engine then places its waiter by (see
//! [`keylease_engine::tenants`]).

use super::{ConfigError, FileConfig, invalid};
use keylease_engine::tenants::{Caller, MAX_SHARE, Priority};
use serde::Deserialize;
use std::collections::BTreeMap;

/// `[tenants.NAME]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantSection {
    /// Weight among the tenants of a class when a line is contended.
    pub share: u32,
    /// The most urgent class its calls may ask for: `interactive`, `normal` or `batch`.
    pub priority: String,
    /// Whether its calls may name another tenant (`AcquireKey.tenant`): a proxy serving teams.
    pub may_name_tenants: bool,
}

impl Default for TenantSection {
    fn default() -> Self {
        Self {
            share: 1,
            priority: Priority::Normal.as_str().into(),
            may_name_tenants: false,
        }
    }
}

/// One tenant, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSettings {
    pub share: u32,
    pub highest: Priority,
    pub may_name_tenants: bool,
}

impl Default for TenantSettings {
    /// A caller no section names: share 1, at most normal.
    fn default() -> Self {
        Self {
            share: 1,
            highest: Priority::Normal,
            may_name_tenants: false,
        }
    }
}

/// `[tenants]`, validated: empty when the configuration has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenants {
    by_name: BTreeMap<String, TenantSettings>,
}

/// Why a call's tenant or class is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error("tenant: no [tenants] are configured, so there is none to name")]
    NoTenants,
    #[error("tenant: {0:?} is not configured in [tenants]")]
    Unknown(String),
    #[error("tenant: caller {0:?} may not name another tenant (set may_name_tenants)")]
    MayNotName(String),
}

/// A call's caller, decided: `None` without tenants (the command goes as it always went);
/// `lowered` when it asked for a more urgent class than its tenant may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub caller: Option<Caller>,
    pub lowered: bool,
}

impl Tenants {
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = (&str, &TenantSettings)> {
        self.by_name.iter().map(|(name, t)| (name.as_str(), t))
    }

    /// The caller of a call by `by` (the gate's name for it) that named tenant `named` (empty:
    /// none) and asked for class `asked` (`None`: normal).
    pub fn caller(
        &self,
        by: &str,
        named: &str,
        asked: Option<Priority>,
    ) -> Result<Decided, TenantError> {
        if self.by_name.is_empty() {
            if !named.is_empty() {
                return Err(TenantError::NoTenants);
            }
            return Ok(Decided {
                caller: None,
                lowered: false,
            });
        }
        let own = self.by_name.get(by).cloned().unwrap_or_default();
        let (tenant, settings) = if named.is_empty() || named == by {
            (by, own)
        } else if !own.may_name_tenants {
            return Err(TenantError::MayNotName(by.to_string()));
        } else {
            let settings = self
                .by_name
                .get(named)
                .ok_or_else(|| TenantError::Unknown(named.to_string()))?;
            (named, settings.clone())
        };
        let asked = asked.unwrap_or(Priority::Normal);
        let priority = asked.max(settings.highest);
        Ok(Decided {
            caller: Some(Caller {
                tenant: tenant.to_string(),
                priority,
                share: settings.share,
            }),
            lowered: priority != asked,
        })
    }
}

/// A class by its name in the configuration, the proxy's header or the batch's flag.
pub fn priority_named(name: &str) -> Option<Priority> {
    Priority::ALL.into_iter().find(|p| p.as_str() == name)
}

/// `[tenants]`, checked.
pub(super) fn tenants(
    file: &FileConfig,
    at: &dyn Fn(&str) -> String,
) -> Result<Tenants, ConfigError> {
    let mut by_name = BTreeMap::new();
    for (name, section) in &file.tenants {
        let field = |f: &str| at(&format!("tenants.{name}.{f}"));
        if name.is_empty()
            || name.len() > crate::auth::MAX_NAME_BYTES
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                at(&format!("tenants.{name:?}")),
                format!(
                    "a tenant is a caller's name: 1 to {} printable ASCII characters",
                    crate::auth::MAX_NAME_BYTES
                ),
            ));
        }
        if !(1..=MAX_SHARE).contains(&section.share) {
            return Err(invalid(
                field("share"),
                format!("must be between 1 and {MAX_SHARE}"),
            ));
        }
        let highest = priority_named(&section.priority).ok_or_else(|| {
            invalid(
                field("priority"),
                format!(
                    "{:?} is not a class: interactive, normal or batch",
                    section.priority
                ),
            )
        })?;
        by_name.insert(
            name.clone(),
            TenantSettings {
                share: section.share,
                highest,
                may_name_tenants: section.may_name_tenants,
            },
        );
    }
    Ok(Tenants { by_name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_teams() -> Tenants {
        let mut by_name = BTreeMap::new();
        by_name.insert(
            "chat".to_string(),
            TenantSettings {
                share: 3,
                highest: Priority::Interactive,
                may_name_tenants: false,
            },
        );
        by_name.insert(
            "gateway".to_string(),
            TenantSettings {
                share: 1,
                highest: Priority::Normal,
                may_name_tenants: true,
            },
        );
        Tenants { by_name }
    }

    #[test]
    fn without_tenants_a_call_goes_as_it_always_went() {
        let none = Tenants::default();
        let decided = none
            .caller("anyone", "", Some(Priority::Interactive))
            .unwrap();
        assert_eq!(decided.caller, None);
        assert_eq!(
            none.caller("anyone", "chat", None),
            Err(TenantError::NoTenants)
        );
    }

    #[test]
    fn a_class_above_the_tenants_highest_is_lowered_and_said() {
        let teams = two_teams();
        let chat = teams
            .caller("chat", "", Some(Priority::Interactive))
            .unwrap();
        assert_eq!(
            chat.caller.as_ref().unwrap().priority,
            Priority::Interactive
        );
        assert!(!chat.lowered);
        let unnamed = teams
            .caller("nightly", "", Some(Priority::Interactive))
            .unwrap();
        let caller = unnamed.caller.unwrap();
        assert_eq!(
            (caller.tenant.as_str(), caller.priority, caller.share),
            ("nightly", Priority::Normal, 1)
        );
        assert!(unnamed.lowered);
        let batch = teams.caller("chat", "", Some(Priority::Batch)).unwrap();
        assert_eq!(batch.caller.unwrap().priority, Priority::Batch);
        assert!(!batch.lowered);
    }

    #[test]
    fn only_a_tenant_allowed_to_may_name_another_and_only_a_configured_one() {
        let teams = two_teams();
        let named = teams
            .caller("gateway", "chat", Some(Priority::Interactive))
            .unwrap();
        let caller = named.caller.unwrap();
        assert_eq!(
            (caller.tenant.as_str(), caller.share, caller.priority),
            ("chat", 3, Priority::Interactive)
        );
        assert_eq!(
            teams.caller("chat", "gateway", None),
            Err(TenantError::MayNotName("chat".into()))
        );
        assert_eq!(
            teams.caller("gateway", "ghost", None),
            Err(TenantError::Unknown("ghost".into()))
        );
        // Naming oneself is no naming.
        assert!(teams.caller("chat", "chat", None).is_ok());
    }
}
