//! Checking keys with the provider (`[health]`): a read of a model with the key, which costs no
//! quota, classified by the one classifier of Gemini's answers. One checker runs where the
//! engine is decided (the single server, the leader of a replica fleet, the batch's own
//! server); each result is a [`Command::KeyChecked`], logged and replayed like any other, so it
//! survives a restart or a failover.
//!
//! When: every key at start (but those an operator disabled), a key added at once (it is not
//! lent before), keys without an answer and keys disabled for a reason an operator may fix
//! every `retry_interval`, healthy keys every `interval` if set, and any on demand
//! (`KeyAdmin/CheckKeys`). At most `concurrency` checks at once, each within `timeout`. An
//! answer that says nothing of the key (a timeout, a 5xx, a 429, the endpoint unreachable) is
//! no evidence: the key is lent as before, and shows as unchecked.

use crate::config::health::HealthSettings;
use crate::shell::State;
use crate::store::journal::StoreFailed;
use futures_util::StreamExt;
use keylease::pb;
use keylease_client::gemini::{CallError, Failure, GeminiClient};
use keylease_core::MAX_DETAIL_BYTES;
use keylease_engine::{
    CheckOutcome, CheckTarget, Command, Decider, EngineError, EventKind, KeyCheck, KeyProblem,
    KeyView,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Most keys one `CheckKeys` call may name.
pub const MAX_KEYS_PER_CALL: usize = 10_000;

/// Why keys could not be checked on demand.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no key {0:?}")]
    UnknownKey(String),
    #[error("{0} keys named: at most {MAX_KEYS_PER_CALL} per call")]
    TooMany(usize),
    #[error("{0}")]
    Store(#[from] StoreFailed),
}

/// One key's check, as `CheckKeys` answers it.
#[derive(Debug, Clone)]
pub struct Checked {
    pub key_id: String,
    pub check: KeyCheck,
    /// The key as the check left it; `None` when it changed meanwhile (removed, or its secret
    /// replaced), and the result was not taken.
    pub key: Option<KeyView>,
}

/// What keys are checked with: `[health]`, and the client that calls the provider (made once
/// per process; a replica's checker is made anew each time it leads).
#[derive(Debug, Clone)]
pub struct CheckSetup {
    settings: HealthSettings,
    gemini: GeminiClient,
}

impl CheckSetup {
    /// Fails only where no HTTP client can be made (its TLS cannot start): why, for people.
    pub fn new(settings: &HealthSettings) -> Result<Self, String> {
        Ok(Self {
            gemini: GeminiClient::new(settings.upstream.clone(), settings.timeout)
                .map_err(|error| error.to_string())?,
            settings: settings.clone(),
        })
    }

    /// The setup `[health]` asks for, if any.
    pub fn of(settings: Option<&HealthSettings>) -> Result<Option<Self>, String> {
        settings.map(Self::new).transpose()
    }
}

pub struct Checker {
    state: Arc<State>,
    settings: HealthSettings,
    gemini: GeminiClient,
    /// Bounds checks at once, scheduled and on demand together.
    slots: tokio::sync::Semaphore,
    /// Keys (by identity) this checker has checked since it started: the others are due.
    seen: Mutex<HashSet<String>>,
}

impl Checker {
    pub fn new(state: Arc<State>, setup: CheckSetup) -> Arc<Self> {
        let CheckSetup { settings, gemini } = setup;
        Arc::new(Self {
            slots: tokio::sync::Semaphore::new(settings.concurrency),
            state,
            settings,
            gemini,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// Checks keys on schedule until the state shuts down (its server stops, or its replica
    /// stops leading). A key added, disabled or enabled has it look at the schedule again at
    /// once; other events (grants, releases) do not.
    pub async fn run(self: Arc<Self>) {
        let mut events = self.state.subscribe();
        let shutdown = self.state.shutdown_token();
        loop {
            let Ok(targets) = self.state.read(|engine, _| engine.check_targets()).await else {
                return;
            };
            let now_ms = self.state.time().wall_ms;
            let (due, next_ms) = {
                let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                schedule(&targets, &seen, &self.settings, now_ms)
            };
            if !due.is_empty() {
                if self.check_all(None, due).await.is_err() {
                    return;
                }
                continue;
            }
            let sleep = async {
                match next_ms {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms);
                        self.state
                            .sleep_until_ms(self.state.now_ms().saturating_add(wait))
                            .await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = &mut sleep => break,
                    event = events.recv() => match event {
                        Ok(published) if changes_the_schedule(&published.event.kind) => break,
                        Ok(_) => {}
                        // Events were missed, one of them may have mattered: look again.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// Checks the keys named (every key when none is), now, as caller `by`.
    pub async fn check_now(
        &self,
        by: Option<&Arc<str>>,
        key_ids: Vec<String>,
    ) -> Result<Vec<Checked>, CheckError> {
        if key_ids.len() > MAX_KEYS_PER_CALL {
            return Err(CheckError::TooMany(key_ids.len()));
        }
        let targets = self.state.read(|engine, _| engine.check_targets()).await?;
        let chosen = if key_ids.is_empty() {
            targets
        } else {
            let mut chosen = Vec::with_capacity(key_ids.len());
            let mut named = HashSet::new();
            for id in key_ids {
                if !named.insert(id.clone()) {
                    continue;
                }
                let target = targets
                    .iter()
                    .find(|t| t.key_id == id)
                    .ok_or(CheckError::UnknownKey(id))?;
                chosen.push(target.clone());
            }
            chosen
        };
        Ok(self.check_all(by, chosen).await?)
    }

    /// Checks `targets`, at most `concurrency` at once, each result applied as it comes.
    async fn check_all(
        &self,
        by: Option<&Arc<str>>,
        targets: Vec<CheckTarget>,
    ) -> Result<Vec<Checked>, StoreFailed> {
        let checks = futures_util::stream::iter(targets)
            .map(|target| async move {
                let outcome = {
                    let _slot = self.slots.acquire().await.expect("never closed");
                    self.probe(&target).await
                };
                self.seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(target.identity.clone());
                let command = Command::KeyChecked {
                    identity: target.identity,
                    outcome: outcome.clone(),
                };
                let reply = self.state.run(by, command).await?;
                let key = match reply.into_key_checked() {
                    Ok(view) => Some(view),
                    // Removed, or its secret replaced, while it was checked.
                    Err(EngineError::KeyNotFound(_)) => None,
                    Err(error) => {
                        tracing::error!(%error, key_id = target.key_id, "a check was refused");
                        None
                    }
                };
                let check = KeyCheck {
                    at_wall_ms: self.state.time().wall_ms,
                    outcome,
                };
                Ok(Checked {
                    key_id: target.key_id,
                    check,
                    key,
                })
            })
            .buffer_unordered(self.settings.concurrency);
        checks.collect::<Vec<_>>().await.into_iter().collect()
    }

    /// What the provider says of the key.
    async fn probe(&self, target: &CheckTarget) -> CheckOutcome {
        let model = self.settings.model_of(&target.pool);
        let answer = self.gemini.check_key(target.secret.reveal(), model).await;
        let outcome = outcome_of(answer, model);
        // The provider's words are free text: masked and cut before anyone sees them.
        match outcome {
            CheckOutcome::Refused { problem, detail } => CheckOutcome::Refused {
                problem,
                detail: self.fit(detail),
            },
            CheckOutcome::NoAnswer { detail } => CheckOutcome::NoAnswer {
                detail: self.fit(detail),
            },
            CheckOutcome::Fine => CheckOutcome::Fine,
        }
    }

    fn fit(&self, detail: String) -> String {
        let masked = self.state.redact(detail);
        keylease::truncate_on_char_boundary(&masked, MAX_DETAIL_BYTES).to_string()
    }
}

/// Whether an event may make a key due for a check sooner than the schedule said.
fn changes_the_schedule(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::KeyAdded { .. } | EventKind::KeyDisabled { .. } | EventKind::KeyEnabled { .. }
    )
}

/// What an answer to a check says of the key: only a refusal that blames the key is
/// evidence against it.
fn outcome_of(answer: Result<(), CallError>, model: Option<&str>) -> CheckOutcome {
    match answer {
        Ok(()) => CheckOutcome::Fine,
        Err(CallError::Provider {
            status, classified, ..
        }) => match (classified.failure, classified.key_problem) {
            (Failure::InvalidKey | Failure::KeyUnusable, Some(problem)) => CheckOutcome::Refused {
                problem: problem_of(problem),
                detail: format!("{}: {}", classified.reason, classified.message),
            },
            (Failure::Request, _) if status == 404 => CheckOutcome::NoAnswer {
                detail: format!(
                    "the provider knows no model {:?}: set [health] model to one it serves",
                    model.unwrap_or_default()
                ),
            },
            _ => CheckOutcome::NoAnswer {
                detail: format!("HTTP {status}: {}", classified.reason),
            },
        },
        Err(CallError::Transport { message, timed_out }) => CheckOutcome::NoAnswer {
            detail: if timed_out {
                "timed out".to_string()
            } else {
                format!("unreachable: {message}")
            },
        },
        Err(CallError::Decode(message)) => CheckOutcome::NoAnswer { detail: message },
    }
}

fn problem_of(problem: pb::KeyProblem) -> KeyProblem {
    match problem {
        pb::KeyProblem::Invalid => KeyProblem::Invalid,
        pb::KeyProblem::Leaked => KeyProblem::Leaked,
        pb::KeyProblem::Suspended => KeyProblem::Suspended,
        pb::KeyProblem::ServiceDisabled => KeyProblem::ServiceDisabled,
        pb::KeyProblem::PermissionDenied | pb::KeyProblem::Unspecified => {
            KeyProblem::PermissionDenied
        }
    }
}

/// The keys due for a check at wall time `now_ms`, and when the next one falls due after them.
/// `seen`: keys this checker has checked since it started.
fn schedule(
    targets: &[CheckTarget],
    seen: &HashSet<String>,
    settings: &HealthSettings,
    now_ms: u64,
) -> (Vec<CheckTarget>, Option<u64>) {
    let mut due = Vec::new();
    let mut next: Option<u64> = None;
    for target in targets {
        let Some(at) = due_at(target, seen.contains(&target.identity), settings) else {
            continue;
        };
        if at <= now_ms {
            due.push(target.clone());
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    (due, next)
}

/// When `target` is next due for a check (wall ms), if ever on schedule.
fn due_at(target: &CheckTarget, seen: bool, settings: &HealthSettings) -> Option<u64> {
    let after = |interval: Duration, since: u64| since.saturating_add(interval.as_millis() as u64);
    let last = target.last_check.as_ref().map_or(0, |c| c.at_wall_ms);
    match &target.disabled {
        // An operator's word holds: a check would change nothing.
        Some(disabled) if disabled.by == Decider::Operator => None,
        _ if target.awaiting_check || !seen => Some(0),
        Some(disabled) if disabled.may_heal() => {
            let since = disabled.since_wall_ms.unwrap_or(0).max(last);
            Some(after(settings.retry_interval, since))
        }
        Some(_) => None,
        None => match target.last_check.as_ref().map(|c| &c.outcome) {
            Some(CheckOutcome::NoAnswer { .. }) => Some(after(settings.retry_interval, last)),
            _ => settings.interval.map(|interval| after(interval, last)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylease_client::gemini::classify;
    use keylease_core::ApiKey;
    use keylease_engine::Disabled;

    fn settings(interval: Option<Duration>) -> HealthSettings {
        HealthSettings {
            upstream: "http://127.0.0.1:1".into(),
            models: vec![("gemini".into(), "m".into())],
            timeout: Duration::from_secs(1),
            concurrency: 2,
            retry_interval: Duration::from_secs(300),
            interval,
        }
    }

    fn target(disabled: Option<Disabled>, last: Option<CheckOutcome>) -> CheckTarget {
        CheckTarget {
            key_id: "k1".into(),
            identity: "fp-k1".into(),
            secret: ApiKey::new("AIzaFAKE-k1".to_string()),
            pool: "gemini".into(),
            awaiting_check: false,
            disabled,
            last_check: last.map(|outcome| KeyCheck {
                at_wall_ms: 1_000_000,
                outcome,
            }),
        }
    }

    fn disabled(by: Decider, problem: Option<KeyProblem>) -> Option<Disabled> {
        Some(Disabled {
            reason: "r".into(),
            since_wall_ms: Some(2_000_000),
            by,
            problem,
        })
    }

    #[test]
    fn keys_fall_due_by_what_is_known_of_them() {
        let s = settings(None);
        let fine = Some(CheckOutcome::Fine);
        // Every key once after start, and a key waiting for its first check at once.
        assert_eq!(due_at(&target(None, fine.clone()), false, &s), Some(0));
        let waiting = CheckTarget {
            awaiting_check: true,
            ..target(None, None)
        };
        assert_eq!(due_at(&waiting, true, &s), Some(0));
        // Healthy: only with an interval.
        assert_eq!(due_at(&target(None, fine.clone()), true, &s), None);
        let every_hour = settings(Some(Duration::from_secs(3_600)));
        assert_eq!(
            due_at(&target(None, fine), true, &every_hour),
            Some(1_000_000 + 3_600_000)
        );
        // Without an answer: again after the retry interval.
        let no_answer = Some(CheckOutcome::NoAnswer { detail: "x".into() });
        assert_eq!(
            due_at(&target(None, no_answer), true, &s),
            Some(1_000_000 + 300_000)
        );
        // Disabled for a reason that may heal: after the retry interval from the disable.
        let suspended = disabled(Decider::Report, Some(KeyProblem::Suspended));
        assert_eq!(
            due_at(&target(suspended, None), true, &s),
            Some(2_000_000 + 300_000)
        );
        // Leaked or invalid: never on schedule; an operator's disable: never, not even at start.
        let leaked = disabled(Decider::Check, Some(KeyProblem::Leaked));
        assert_eq!(due_at(&target(leaked, None), true, &s), None);
        let operator = disabled(Decider::Operator, None);
        assert_eq!(due_at(&target(operator, None), false, &s), None);
    }

    fn answered(status: u16, body: &str) -> CallError {
        CallError::Provider {
            status,
            classified: classify(status, body),
            body: body.to_string(),
        }
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/../fake-gemini/fixtures/errors/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn only_an_answer_that_blames_the_key_is_evidence_against_it() {
        let refused =
            |status, name: &str| match outcome_of(Err(answered(status, &fixture(name))), None) {
                CheckOutcome::Refused { problem, .. } => Some(problem),
                _ => None,
            };
        assert_eq!(
            refused(400, "400-api-key-invalid.json"),
            Some(KeyProblem::Invalid)
        );
        assert_eq!(refused(403, "403-leaked.json"), Some(KeyProblem::Leaked));
        assert_eq!(
            refused(403, "403-consumer-suspended.json"),
            Some(KeyProblem::Suspended)
        );
        assert_eq!(
            refused(403, "403-service-disabled.json"),
            Some(KeyProblem::ServiceDisabled)
        );
        for (status, name) in [
            (403, "403-unregistered-caller.json"),
            (404, "404-model-not-found.json"),
            (429, "429-no-details.json"),
            (429, "429-requests-per-minute.json"),
            (500, "500-internal.json"),
            (503, "503-overloaded.json"),
        ] {
            assert_eq!(refused(status, name), None, "{name}");
        }
        let timeout = Err(CallError::Transport {
            message: "deadline".into(),
            timed_out: true,
        });
        assert_eq!(
            outcome_of(timeout, None),
            CheckOutcome::NoAnswer {
                detail: "timed out".into()
            }
        );
        let unknown_model = outcome_of(
            Err(answered(404, &fixture("404-model-not-found.json"))),
            Some("m9"),
        );
        assert!(
            unknown_model.detail().contains("[health] model"),
            "{unknown_model:?}"
        );
        assert_eq!(outcome_of(Ok(()), None), CheckOutcome::Fine);
    }
}
