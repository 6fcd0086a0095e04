//! What happened, as the engine tells its shell: events to stream, and the notices of one
//! command (wake a waiter, announce a change).

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    pub lease: LeaseSummary,
    pub key_id: String,
    pub project: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Granted(LeaseEvent),
    Renewed(LeaseEvent),
    Released {
        lease: LeaseEvent,
        requests_sent: u64,
    },
    Expired(LeaseEvent),
    Failed {
        lease: LeaseEvent,
        kind: FailureKind,
        detail: String,
    },
    CooledDown {
        pool: String,
        project: String,
        model: String,
        until_ms: u64,
        reason: CooldownReason,
    },
    KeyDisabled {
        key_id: String,
        reason: String,
        by: Decider,
    },
    KeyEnabled {
        key_id: String,
        by: Decider,
    },
    /// A check of the key with the provider answered (what it did to the key follows as its
    /// own event).
    KeyChecked {
        key_id: String,
        outcome: CheckOutcome,
    },
    /// A key came with a new configuration.
    KeyAdded {
        key_id: String,
    },
    /// A key left the configuration while leases run on it: none is granted on it any more,
    /// and it is removed when the last ends.
    KeyDraining {
        key_id: String,
        leases: usize,
    },
    /// A key is gone: it left the configuration, and its last lease has ended.
    KeyRemoved {
        key_id: String,
    },
    /// An operator ended a quota group's cooldown (and made it forget what it learned).
    CooldownReset {
        pool: String,
        project: String,
        model: String,
    },
    /// A limit the books admit changed by what the provider's 429s taught (or an operator
    /// made the group forget it).
    LimitLearned {
        pool: String,
        project: String,
        model: String,
        change: LimitChange,
    },
    /// The configuration was read again (published by the shell, which applies the parts the
    /// engine does not hold: tokens, TLS).
    Reloaded {
        changes: Vec<String>,
        needs_restart: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When it happened; steady times in `kind` convert to wall time with it.
    pub at: Time,
    pub kind: EventKind,
}

/// What the shell must carry out after a command.
#[derive(Debug, Default)]
pub struct Notices {
    pub events: Vec<Event>,
    pub waiter_grants: Vec<(WaiterId, LeaseView)>,
    /// Renewals served in line: the lease with what they asked for more booked.
    pub waiter_renewals: Vec<(WaiterId, LeaseView)>,
    pub waiter_failures: Vec<(WaiterId, Unavailable)>,
}

impl Notices {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.waiter_grants.is_empty()
            && self.waiter_renewals.is_empty()
            && self.waiter_failures.is_empty()
    }

    pub fn extend(&mut self, more: Notices) {
        self.events.extend(more.events);
        self.waiter_grants.extend(more.waiter_grants);
        self.waiter_renewals.extend(more.waiter_renewals);
        self.waiter_failures.extend(more.waiter_failures);
    }
}
