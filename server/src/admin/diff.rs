//! What a reload changed, for people: each setting that moved, old and new, and the keys that
//! drain.

use super::*;
use crate::config::tenants::{TenantSettings, Tenants};

/// What changed between the settings in force and those read again, and what of it needs a
/// restart. Never a secret: keys by id, callers by name.
pub(super) fn diff(old: &Settings, new: &Settings) -> Reloaded {
    let mut changes = Vec::new();
    let mut needs_restart = Vec::new();
    let old_keys: HashMap<&str, _> = old.keys.iter().map(|k| (k.id.as_str(), k)).collect();
    let new_keys: HashMap<&str, _> = new.keys.iter().map(|k| (k.id.as_str(), k)).collect();
    for key in &new.keys {
        match old_keys.get(key.id.as_str()) {
            None => changes.push(format!(
                "key {} added (pool {}, project {})",
                key.id, key.pool, key.project
            )),
            Some(was) => {
                for (what, before, after) in [
                    ("pool", &was.pool, &key.pool),
                    ("project", &was.project, &key.project),
                ] {
                    if before != after {
                        changes.push(format!("key {}: {what} from {before} to {after}", key.id));
                    }
                }
                if was.max_leases != key.max_leases {
                    changes.push(format!(
                        "key {}: max_leases from {} to {}",
                        key.id,
                        shown(was.max_leases),
                        shown(key.max_leases)
                    ));
                }
                if was.secret != key.secret {
                    changes.push(format!("key {}: its secret was replaced", key.id));
                }
            }
        }
    }
    for key in &old.keys {
        if !new_keys.contains_key(key.id.as_str()) {
            changes.push(format!("key {} removed", key.id));
        }
    }
    tenants_changed(&old.tenants, &new.tenants, &mut changes);
    let (old_engine, new_engine) = (&old.engine, &new.engine);
    for (name, pool) in &new_engine.pools {
        let Some(was) = old_engine.pools.get(name) else {
            changes.push(format!("pool {name} added"));
            continue;
        };
        if was.max_leases_per_key != pool.max_leases_per_key {
            changes.push(format!(
                "pool {name}: max_leases_per_key from {} to {}",
                was.max_leases_per_key, pool.max_leases_per_key
            ));
        }
        for (model, limits) in &pool.models {
            match was.models.get(model) {
                None => changes.push(format!("pool {name}: model {model} added")),
                Some(before) if before != limits => changes.push(format!(
                    "limits of {name}/{model}: {}",
                    limits_change(before, limits)
                )),
                Some(_) => {}
            }
        }
        for model in was.models.keys() {
            if !pool.models.contains_key(model) {
                changes.push(format!("pool {name}: model {model} removed"));
            }
        }
        for ((project, model), limits) in &pool.project_limits {
            let before = was
                .project_limits
                .get(&(project.clone(), model.clone()))
                .copied()
                .unwrap_or_default();
            if before != *limits {
                changes.push(format!(
                    "limits of {name}/{model} in project {project}: {}",
                    limits_change(&before, limits)
                ));
            }
        }
        for (project, model) in was.project_limits.keys() {
            if !pool
                .project_limits
                .contains_key(&(project.clone(), model.clone()))
            {
                changes.push(format!(
                    "limits of {name}/{model} in project {project} removed: the model's apply"
                ));
            }
        }
    }
    for name in old_engine.pools.keys() {
        if !new_engine.pools.contains_key(name) {
            changes.push(format!("pool {name} removed"));
        }
    }
    let durations = [
        (
            "leases.default_ttl",
            old_engine.default_ttl_ms,
            new_engine.default_ttl_ms,
        ),
        (
            "leases.max_ttl",
            old_engine.max_ttl_ms,
            new_engine.max_ttl_ms,
        ),
        (
            "leases.exclusion_ttl",
            old_engine.exclusion_ttl_ms,
            new_engine.exclusion_ttl_ms,
        ),
        ("quota.window", old_engine.window_ms, new_engine.window_ms),
        (
            "quota.safety_margin",
            old_engine.safety_margin_ms,
            new_engine.safety_margin_ms,
        ),
        (
            "quota.cooldown_base",
            old_engine.cooldown_base_ms,
            new_engine.cooldown_base_ms,
        ),
        (
            "quota.cooldown_max",
            old_engine.cooldown_max_ms,
            new_engine.cooldown_max_ms,
        ),
    ];
    for (name, before, after) in durations {
        if before != after {
            changes.push(format!("{name}: from {before}ms to {after}ms"));
        }
    }
    if old_engine.max_requests_per_lease != new_engine.max_requests_per_lease {
        changes.push(format!(
            "leases.max_requests_per_lease: from {} to {}",
            old_engine.max_requests_per_lease, new_engine.max_requests_per_lease
        ));
    }
    if old_engine.memory_capacity != new_engine.memory_capacity {
        changes.push(format!(
            "leases.memory_capacity: from {} to {}",
            old_engine.memory_capacity, new_engine.memory_capacity
        ));
    }
    if old_engine.daily.zone != new_engine.daily.zone {
        changes.push(format!(
            "quota.daily_reset_time_zone: from {} to {}",
            old_engine.daily.zone, new_engine.daily.zone
        ));
    }
    let callers = |settings: &Settings| -> HashMap<String, String> {
        settings
            .access
            .callers
            .iter()
            .map(|c| (c.name.clone(), c.role.as_str().to_string()))
            .collect()
    };
    let (old_callers, new_callers) = (callers(old), callers(new));
    for (name, role) in &new_callers {
        match old_callers.get(name) {
            None => changes.push(format!("caller {name} added ({role})")),
            Some(was) if was != role => {
                changes.push(format!("caller {name}: role from {was} to {role}"))
            }
            Some(_) => {}
        }
    }
    for name in old_callers.keys() {
        if !new_callers.contains_key(name) {
            changes.push(format!("caller {name} removed"));
        }
    }
    let old_credentials: Vec<_> = old.access.callers.iter().map(|c| &c.credential).collect();
    let new_credentials: Vec<_> = new.access.callers.iter().map(|c| &c.credential).collect();
    if old_callers == new_callers && old_credentials != new_credentials {
        changes.push("a caller's token or certificate name was replaced".into());
    }
    if old.access.required != new.access.required {
        changes.push(format!(
            "callers {}",
            if new.access.required {
                "must now present a token"
            } else {
                "are no longer checked"
            }
        ));
    }
    // Compared by their `Debug` text; only the setting's name is reported.
    let differs = |old: &dyn std::fmt::Debug, new: &dyn std::fmt::Debug| {
        format!("{old:?}") != format!("{new:?}")
    };
    let restart_only = [
        ("server.listen", differs(&old.listen, &new.listen)),
        (
            "server.log_format",
            differs(&old.log_format, &new.log_format),
        ),
        (
            "server.shutdown_grace",
            differs(&old.shutdown_grace, &new.shutdown_grace),
        ),
        (
            "server connection limits",
            differs(&old.limits, &new.limits),
        ),
        ("leases.max_wait", differs(&old.max_wait, &new.max_wait)),
        ("[state]", differs(&old.state, &new.state)),
        ("[server.tls]", differs(&old.tls, &new.tls)),
        (
            "metrics.listen",
            differs(&old.metrics_listen, &new.metrics_listen),
        ),
        ("[proxy]", differs(&old.proxy, &new.proxy)),
        ("[health]", differs(&old.health, &new.health)),
    ];
    for (name, changed) in restart_only {
        if changed {
            needs_restart.push(format!("{name} changed: a restart applies it"));
        }
    }
    Reloaded {
        changes,
        needs_restart,
    }
}

pub(super) fn shown(value: Option<u32>) -> String {
    value.map_or("the pool's".into(), |v| v.to_string())
}

pub(super) fn limits_change(
    before: &keylease_engine::quota::Limits,
    after: &keylease_engine::quota::Limits,
) -> String {
    let show = |limits: &keylease_engine::quota::Limits, kind: LimitKind| match (
        kind.of(limits),
        limits.auto[kind as usize],
    ) {
        (Some(ceiling), true) => format!("auto (ceiling {ceiling})"),
        (Some(figure), false) => figure.to_string(),
        (None, _) => "none".to_string(),
    };
    LimitKind::ALL
        .iter()
        .map(|&kind| (kind, show(before, kind), show(after, kind)))
        .filter(|(_, b, a)| b != a)
        .map(|(kind, b, a)| format!("{} from {b} to {a}", kind.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The engine's word on keys that left with leases running.
pub(super) fn describe_drains(configured: &Reconfigured, changes: &mut Vec<String>) {
    for (key_id, leases) in &configured.draining_keys {
        changes.push(format!(
            "key {key_id} drains: {leases} live lease(s) run to their end, then it is gone"
        ));
    }
    if configured.dropped_leases > 0 {
        changes.push(format!(
            "{} lease(s) dropped: their model or pool is no longer configured",
            configured.dropped_leases
        ));
    }
}

/// Tenants added, removed or set otherwise: they decide the calls made from now on.
fn tenants_changed(old: &Tenants, new: &Tenants, changes: &mut Vec<String>) {
    let described = |t: &TenantSettings| {
        format!(
            "share {}, priority up to {}{}",
            t.share,
            t.highest.as_str(),
            if t.may_name_tenants {
                ", may name tenants"
            } else {
                ""
            }
        )
    };
    let before: HashMap<&str, &TenantSettings> = old.names().collect();
    let after: HashMap<&str, &TenantSettings> = new.names().collect();
    for (name, settings) in new.names() {
        match before.get(name) {
            None => changes.push(format!("tenant {name} added ({})", described(settings))),
            Some(was) if *was != settings => changes.push(format!(
                "tenant {name}: from {} to {}",
                described(was),
                described(settings)
            )),
            Some(_) => {}
        }
    }
    for (name, _) in old.names() {
        if !after.contains_key(name) {
            changes.push(format!("tenant {name} removed"));
        }
    }
}
