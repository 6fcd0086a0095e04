//! A key's health: who disabled it and why, what the last check of it with the provider found,
//! and whether it waits for its first check before it may be lent. Checks are made outside the
//! engine (a call that costs no quota); their results come back as [`Command::KeyChecked`],
//! logged and replayed like any other command.
//!
//! Who disabled a key decides who may enable it: an operator's disable holds until an
//! operator enables the key; a disable on evidence (a worker's report, a check) is undone by a
//! check that finds the key fine. A report on a lease granted before the key was last enabled
//! is old news and disables nothing (rules 8 on).
//!
//! [`Command::KeyChecked`]: super::Command::KeyChecked

use super::ids::KeyIdx;
use super::{Engine, EngineError, EventKind, FailureKind, KeyView, Time, validate_detail};
use keylease_core::ApiKey;
use serde::{Deserialize, Serialize};

/// The rules from which a key's health is kept: checks, who disabled it, and reports on
/// leases from before an enable disabling nothing.
pub(crate) const RULES_KEY_HEALTH: u32 = 8;

/// Who took a key out of service, or put it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decider {
    Operator,
    /// A worker's report of a failed call.
    Report,
    /// A check of the key with the provider.
    Check,
}

impl Decider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Report => "report",
            Self::Check => "check",
        }
    }
}

/// What is wrong with a key, as the provider's answer showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyProblem {
    /// Invalid, expired or unknown.
    Invalid,
    /// Reported as leaked: blocked for good.
    Leaked,
    /// Its project is suspended.
    Suspended,
    /// The Generative Language API is disabled in its project.
    ServiceDisabled,
    /// It may not call the API or the model.
    PermissionDenied,
}

impl KeyProblem {
    /// Whether an operator may fix it in the project, so that a scheduled check should look
    /// again: a leaked or invalid key never comes back.
    pub fn may_heal(self) -> bool {
        !matches!(self, Self::Invalid | Self::Leaked)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Leaked => "leaked",
            Self::Suspended => "suspended",
            Self::ServiceDisabled => "service disabled",
            Self::PermissionDenied => "permission denied",
        }
    }

    /// The problem a worker's report of `kind` shows, when it shows one.
    fn reported(kind: FailureKind) -> Option<Self> {
        match kind {
            FailureKind::InvalidKey => Some(Self::Invalid),
            FailureKind::PermissionDenied => Some(Self::PermissionDenied),
            _ => None,
        }
    }
}

/// Why and since when a key is disabled, and by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    /// For people: the operator's words, or the evidence's kind and detail.
    pub reason: String,
    /// `None` for a key a build before rules 8 disabled, which kept no time.
    pub since_wall_ms: Option<u64>,
    pub by: Decider,
    /// What the evidence showed; `None` for an operator's disable.
    pub problem: Option<KeyProblem>,
}

impl Disabled {
    /// Whether a scheduled check should look at the key again: disabled on evidence of a
    /// problem that may heal.
    pub fn may_heal(&self) -> bool {
        self.by != Decider::Operator && self.problem.is_some_and(KeyProblem::may_heal)
    }
}

/// What a check of a key with the provider found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckOutcome {
    /// The provider accepted the key.
    Fine,
    /// The provider refused the key for `problem`.
    Refused { problem: KeyProblem, detail: String },
    /// No answer that says anything of the key (a timeout, a 5xx, the endpoint unreachable, a
    /// 429): no evidence either way.
    NoAnswer { detail: String },
}

impl CheckOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Fine => "fine",
            Self::Refused { .. } => "refused",
            Self::NoAnswer { .. } => "no answer",
        }
    }

    pub fn problem(&self) -> Option<KeyProblem> {
        match self {
            Self::Refused { problem, .. } => Some(*problem),
            _ => None,
        }
    }

    /// What the provider said, or what went wrong; empty for a key found fine.
    pub fn detail(&self) -> &str {
        match self {
            Self::Fine => "",
            Self::Refused { detail, .. } | Self::NoAnswer { detail } => detail,
        }
    }
}

/// The last check of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCheck {
    pub at_wall_ms: u64,
    pub outcome: CheckOutcome,
}

/// A key as a checker sees it: what to check it with, and what is known of its health.
#[derive(Debug, Clone)]
pub struct CheckTarget {
    pub key_id: String,
    /// Names the key in [`Command::KeyChecked`](super::Command::KeyChecked).
    pub identity: String,
    pub secret: ApiKey,
    pub pool: String,
    pub awaiting_check: bool,
    pub disabled: Option<Disabled>,
    pub last_check: Option<KeyCheck>,
}

impl Engine {
    /// Every configured key (draining ones aside, which are never lent again), as a checker
    /// sees it.
    pub fn check_targets(&self) -> Vec<CheckTarget> {
        self.catalogue
            .keys()
            .iter()
            .filter(|key| !key.draining)
            .map(|key| CheckTarget {
                key_id: key.spec.id.clone(),
                identity: key.spec.identity().to_string(),
                secret: key.spec.secret.clone(),
                pool: self.catalogue.pool(key.pool).name.clone(),
                awaiting_check: key.awaiting_check,
                disabled: key.disabled.clone(),
                last_check: key.last_check.clone(),
            })
            .collect()
    }

    /// Records a check of the key whose identity (fingerprint) is `identity`: a key refused is
    /// disabled by the check (its leases end); a key disabled on evidence and now found fine
    /// is enabled again; a key an operator disabled stays so. A check of a key that is gone,
    /// or whose secret changed since (another identity), is refused.
    pub(super) fn key_checked(
        &mut self,
        now: impl Into<Time>,
        identity: &str,
        outcome: CheckOutcome,
    ) -> Result<KeyView, EngineError> {
        let time = self.tick(now);
        if let CheckOutcome::Refused { detail, .. } | CheckOutcome::NoAnswer { detail } = &outcome {
            validate_detail("detail", detail)?;
        }
        let key = self
            .catalogue
            .key_by_identity(identity)
            .ok_or_else(|| EngineError::KeyNotFound(identity.to_string()))?;
        let key_id = self.catalogue.key(key).spec.id.clone();
        let check = KeyCheck {
            at_wall_ms: time.wall_ms,
            outcome: outcome.clone(),
        };
        let was_awaiting = self.catalogue.key(key).awaiting_check;
        self.catalogue.update(key, |entry| {
            entry.last_check = Some(check);
            entry.awaiting_check = false;
        });
        self.emit(
            time,
            EventKind::KeyChecked {
                key_id: key_id.clone(),
                outcome: outcome.clone(),
            },
        );
        match outcome {
            CheckOutcome::Fine => {
                let on_evidence = self
                    .catalogue
                    .key(key)
                    .disabled
                    .as_ref()
                    .is_some_and(|d| d.by != Decider::Operator);
                if on_evidence {
                    self.enable(time, key, Decider::Check);
                }
            }
            CheckOutcome::Refused { problem, detail } => {
                let already = self.catalogue.key(key).disabled.clone();
                match already {
                    None => {
                        let reason = if detail.is_empty() {
                            problem.as_str().to_string()
                        } else {
                            format!("{}: {detail}", problem.as_str())
                        };
                        self.disable(time, key, Decider::Check, Some(problem), reason);
                    }
                    // The check names the problem more finely than a worker's report could
                    // (a leaked key reads as a permission error): it decides whether a
                    // scheduled check looks again.
                    Some(disabled) if disabled.by != Decider::Operator => {
                        self.catalogue.update(key, |entry| {
                            if let Some(d) = entry.disabled.as_mut() {
                                d.problem = Some(problem);
                            }
                        });
                    }
                    Some(_) => {}
                }
            }
            CheckOutcome::NoAnswer { .. } => {}
        }
        if was_awaiting {
            // Lendable now, or failed for good: waiters may be served, or must be told.
            self.freed = true;
        }
        self.tick(time);
        Ok(self.key_view(key, time.steady_ms))
    }

    /// Puts a disabled key back in service as `by` decided.
    pub(super) fn enable(&mut self, time: Time, key: KeyIdx, by: Decider) {
        if self.catalogue.key(key).disabled.is_none() {
            return;
        }
        let enabled_from_token = self.leases.next_token();
        self.catalogue.update(key, |entry| {
            entry.disabled = None;
            entry.enabled_from_token = enabled_from_token;
        });
        self.freed = true;
        let key_id = self.catalogue.key(key).spec.id.clone();
        self.emit(time, EventKind::KeyEnabled { key_id, by });
    }

    /// Takes a key out of service as `by` decided (its leases end, counted as fully used),
    /// unless it already is.
    pub(super) fn disable(
        &mut self,
        time: Time,
        key: KeyIdx,
        by: Decider,
        problem: Option<KeyProblem>,
        reason: String,
    ) {
        if self.catalogue.key(key).disabled.is_some() {
            return;
        }
        for token in self.catalogue.key(key).live.clone() {
            let used = self.leases.get(token).expect("live").reserved();
            let event = self.end_lease(token, time, used);
            self.emit(
                time,
                EventKind::Released {
                    lease: event,
                    requests_sent: used.requests,
                },
            );
        }
        let disabled = Disabled {
            reason: reason.clone(),
            since_wall_ms: Some(time.wall_ms),
            by,
            problem,
        };
        self.catalogue
            .update(key, |entry| entry.disabled = Some(disabled));
        // Waiters that only this key could serve must now fail rather than wait.
        self.freed = true;
        self.emit(
            time,
            EventKind::KeyDisabled {
                key_id: self.catalogue.key(key).spec.id.clone(),
                reason,
                by,
            },
        );
    }

    /// What a worker's report of `kind` on the lease with `fencing_token` does to its key:
    /// disables it when it shows a problem with the key, unless the lease was granted before
    /// the key was last enabled (rules 8 on): then it is news of the key as it was.
    pub(super) fn reported_problem(
        &mut self,
        time: Time,
        key: KeyIdx,
        fencing_token: u64,
        kind: FailureKind,
        reason: String,
    ) {
        let Some(problem) = KeyProblem::reported(kind) else {
            return;
        };
        if self.rules >= RULES_KEY_HEALTH
            && fencing_token < self.catalogue.key(key).enabled_from_token
        {
            return;
        }
        self.disable(time, key, Decider::Report, Some(problem), reason);
    }
}
