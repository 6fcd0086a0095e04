//! Each event, logged: one line a change, with the caller's name and never a secret.

use super::*;
use keylease_engine::{CheckOutcome, KeyProblem};

/// What operators need in the log: key and project trouble at `info`, lease traffic at `debug`.
/// A match of its own beside `wire::event_to_pb`'s: a log line picks fields and a level for
/// people searching logs, the event stream carries each event whole for programs, and neither
/// should change when the other does.
pub(super) fn log(event: &Event, by: Option<&str>) {
    match &event.kind {
        EventKind::KeyDisabled {
            key_id,
            reason,
            by: decider,
        } => {
            tracing::warn!(
                key_id,
                reason,
                decided_by = decider.as_str(),
                by,
                "key disabled"
            )
        }
        EventKind::KeyEnabled {
            key_id,
            by: decider,
        } => tracing::info!(key_id, decided_by = decider.as_str(), by, "key enabled"),
        EventKind::KeyChecked {
            key_id,
            outcome: CheckOutcome::Fine,
        } => tracing::debug!(key_id, by, "key checked: fine"),
        EventKind::KeyChecked { key_id, outcome } => tracing::info!(
            key_id,
            outcome = outcome.as_str(),
            problem = outcome.problem().map(KeyProblem::as_str),
            detail = outcome.detail(),
            by,
            "key checked"
        ),
        EventKind::KeyAdded { key_id } => tracing::info!(key_id, by, "key added"),
        EventKind::KeyDraining { key_id, leases } => {
            tracing::info!(
                key_id,
                leases,
                by,
                "key draining: its live leases run to their end"
            )
        }
        EventKind::KeyRemoved { key_id } => tracing::info!(key_id, by, "key removed"),
        EventKind::CooldownReset {
            pool,
            project,
            model,
        } => tracing::info!(pool, project, model, by, "cooldown reset"),
        EventKind::LimitLearned {
            pool,
            project,
            model,
            change,
        } => tracing::info!(
            pool,
            project,
            model,
            limit = change.kind.as_str(),
            before = change.before,
            after = change.after,
            reason = change.reason,
            by,
            "learned limit changed"
        ),
        EventKind::Reloaded {
            changes,
            needs_restart,
        } => tracing::info!(?changes, ?needs_restart, by, "configuration reloaded"),
        EventKind::CooledDown {
            pool,
            project,
            model,
            until_ms,
            reason,
        } => {
            tracing::info!(
                pool,
                project,
                model,
                until_ms,
                reason = reason.as_str(),
                "quota group cooling down"
            );
        }
        EventKind::Failed {
            lease,
            kind,
            detail,
        } => {
            tracing::info!(
                key_id = lease.key_id,
                task_id = lease.lease.task_id,
                kind = kind.as_str(),
                detail,
                by,
                "failure reported"
            );
        }
        EventKind::Granted(lease) => tracing::debug!(
            key_id = lease.key_id,
            lease_id = lease.lease.lease_id,
            task_id = lease.lease.task_id,
            by,
            "granted"
        ),
        EventKind::Renewed(lease) => {
            tracing::debug!(lease_id = lease.lease.lease_id, by, "renewed")
        }
        EventKind::Released {
            lease,
            requests_sent,
        } => tracing::debug!(
            lease_id = lease.lease.lease_id,
            requests_sent,
            by,
            "released"
        ),
        EventKind::Expired(lease) => tracing::debug!(
            key_id = lease.key_id,
            lease_id = lease.lease.lease_id,
            "expired"
        ),
    }
}
