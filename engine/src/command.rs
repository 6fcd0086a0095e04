//! Commands as data: everything that changes the engine's state is one [`Command`] applied
//! through [`Engine::apply`], so that a store can log it and recovery can replay it to the same
//! state. Reads (status, a key's view, the next deadline) take `&self` and change nothing.

use super::{
    AcquireRequest, Acquired, Amount, CheckOutcome, Engine, EngineError, EventKind, FailureReport,
    GroupView, KeyView, Notices, Renewal, Renewed, Reported, Setup, SetupError, Time, Usage,
    WaiterId, tenants::Caller,
};
use serde::{Deserialize, Serialize};

/// One state change, as a client, an operator or the shell asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Lend a key now, or queue for one when `wait` is set.
    Acquire(AcquireRequest),
    /// Take a waiter out of line (its deadline passed, or its caller left).
    CancelWaiter(WaiterId),
    /// Laid out as the struct variant of these fields it was before rules 7, byte for byte.
    Renew(Renewal),
    Release {
        lease_id: String,
        fencing_token: u64,
        usage: Usage,
    },
    ReportFailure {
        lease_id: String,
        fencing_token: u64,
        report: FailureReport,
    },
    SetKeyEnabled {
        key_id: String,
        enabled: bool,
        reason: String,
    },
    /// A grant whose waiter was gone by the time it was made: the key goes back, unused.
    HandBack {
        lease_id: String,
        fencing_token: u64,
    },
    /// Bring the state to the command's time: expire leases, serve waiters.
    Tick,
    /// Every waiter leaves its line: their callers died with the process that recovered.
    DropWaiters,
    /// Keys, pools and limits from now on; the state carries over (see [`super::image`]).
    Configure(Setup),
    /// End a quota group's cooldown and its project's backoff, and with `forget_learned` what
    /// it learned from the provider's 429s: an operator knows better.
    ResetCooldown {
        pool: String,
        project: String,
        model: String,
        forget_learned: bool,
    },
    /// Last of all, as each variant keeps its place in the records older builds wrote.
    /// A failure report and, in the same command, the acquire of its replacement (rules 6 on):
    /// no other command comes between the key's failure and the task's next key. The
    /// replacement queues when `wait` is set.
    ReportFailureAndReplace {
        lease_id: String,
        fencing_token: u64,
        report: FailureReport,
        wait: bool,
    },
    /// A renewal whose requests and tokens more, when their group has no room now, wait in
    /// the lease's line for it (rules 7 on); [`Command::Renew`] says why there is none.
    RenewWaiting(Renewal),
    /// What a check of a key with the provider found (rules 8 on); the key is named by its
    /// identity, so that a check of a secret since replaced changes nothing.
    KeyChecked {
        identity: String,
        outcome: CheckOutcome,
    },
    /// A release or a failure report (with its replacement or not) whose holder said how long
    /// its call took, `call_ms`: kept in the lease's key's record, then `command` applied as
    /// itself (rules 8 on).
    Timed { call_ms: u64, command: Box<Command> },
    /// An acquire, a failure report with its replacement, or a renewal that may wait, made
    /// for `caller` (rules 9 on): the tenant, class and share its waiter is placed by (see
    /// [`crate::tenants`]). Anything else, or under older rules, applies as itself.
    ForCaller {
        caller: Caller,
        command: Box<Command>,
    },
}

impl Command {
    /// This command, with how long its call took when its holder said (see
    /// [`Command::Timed`]).
    pub fn timed(self, call_ms: Option<u64>) -> Self {
        match call_ms {
            Some(call_ms) => Self::Timed {
                call_ms,
                command: Box::new(self),
            },
            None => self,
        }
    }

    /// This command, made for `caller` (see [`Command::ForCaller`]).
    pub fn for_caller(self, caller: Caller) -> Self {
        Self::ForCaller {
            caller,
            command: Box::new(self),
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Acquire(_) => "acquire",
            Self::CancelWaiter(_) => "cancel_waiter",
            Self::Renew(_) => "renew",
            Self::Release { .. } => "release",
            Self::ReportFailure { .. } => "report_failure",
            Self::SetKeyEnabled { .. } => "set_key_enabled",
            Self::HandBack { .. } => "hand_back",
            Self::Tick => "tick",
            Self::DropWaiters => "drop_waiters",
            Self::Configure(_) => "configure",
            Self::ResetCooldown { .. } => "reset_cooldown",
            Self::ReportFailureAndReplace { .. } => "report_failure_and_replace",
            Self::RenewWaiting(_) => "renew_waiting",
            Self::KeyChecked { .. } => "key_checked",
            Self::Timed { command, .. } | Self::ForCaller { command, .. } => command.name(),
        }
    }
}

/// What a command answers; each command has its own variant.
#[derive(Debug, Clone)]
pub enum Reply {
    Acquired(Result<Acquired, EngineError>),
    /// `None`: the waiter was no longer in line (its outcome is in the notices).
    WaiterCancelled(Option<super::Unavailable>),
    Renewed(Result<Renewed, EngineError>),
    /// `Ok(None)`: the lease had already ended.
    Released(Result<Option<Amount>, EngineError>),
    Reported(Result<Reported, EngineError>),
    /// Boxed, as the other key views are: see [`Reply::ReportedAndReplaced`].
    KeySet(Result<Box<KeyView>, EngineError>),
    /// The key as the check left it.
    KeyChecked(Result<Box<KeyView>, EngineError>),
    HandedBack,
    Ticked,
    /// How many waiters left.
    WaitersDropped(usize),
    Configured(Result<Reconfigured, SetupError>),
    /// The group as it stands after the reset.
    CooldownReset(Result<Box<GroupView>, EngineError>),
    /// The report, then its replacement's acquire. Boxed: every reply is as large as the
    /// largest, and this one would nearly double them all.
    ReportedAndReplaced(Box<Replaced>),
}

/// A failure report with its replacement: the report (refused, and then nothing was
/// acquired), and the replacement's acquire.
pub type Replaced = Result<(Reported, Result<Acquired, EngineError>), EngineError>;

/// What a new configuration did to the state it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconfigured {
    /// Keys newly configured.
    pub added_keys: Vec<String>,
    /// Keys no longer configured and without a lease: gone at once.
    pub removed_keys: Vec<String>,
    /// Keys no longer configured whose live leases run to their end (how many).
    pub draining_keys: Vec<(String, usize)>,
    /// Keys that came back under another id: (old id, new id).
    pub renamed_keys: Vec<(String, String)>,
    /// Live leases dropped because their model or pool is no longer configured.
    pub dropped_leases: usize,
}

impl Engine {
    /// The one entry point for state changes: applies `command` at `time` and returns its reply
    /// with what the shell must carry out. Given the same commands at the same times, a fresh
    /// engine reaches the same state.
    pub fn apply(&mut self, time: Time, command: Command) -> (Reply, Notices) {
        if let Command::Timed { call_ms, command } = command {
            self.timed(&command, call_ms);
            return self.apply(time, *command);
        }
        if let Command::ForCaller { caller, command } = command {
            self.caller = caller;
            let applied = self.apply(time, *command);
            self.caller = Caller::default();
            return applied;
        }
        if let Command::ReportFailureAndReplace {
            lease_id,
            fencing_token,
            report,
            wait,
        } = command
        {
            // The two commands it joins, applied one after the other at one time: a replica or
            // a recovery replaying it decides exactly what they would.
            let report = Command::ReportFailure {
                lease_id,
                fencing_token,
                report,
            };
            let (reported, mut notices) = self.apply(time, report);
            let reported = match reported.into_reported() {
                Ok(reported) => reported,
                Err(error) => return (Reply::ReportedAndReplaced(Box::new(Err(error))), notices),
            };
            let replacement = AcquireRequest {
                wait,
                ..reported.replacement.clone()
            };
            let (acquired, more) = self.apply(time, Command::Acquire(replacement));
            notices.extend(more);
            let replaced = Ok((reported, acquired.into_acquired()));
            let reply = Reply::ReportedAndReplaced(Box::new(replaced));
            return (reply, notices);
        }
        let reply = match command {
            Command::Acquire(request) => Reply::Acquired(self.acquire(time, request)),
            Command::CancelWaiter(id) => Reply::WaiterCancelled(self.cancel_waiter(time, id)),
            Command::Renew(renewal) => Reply::Renewed(self.renew(time, renewal, false)),
            Command::RenewWaiting(renewal) => Reply::Renewed(self.renew(time, renewal, true)),
            Command::KeyChecked { identity, outcome } => {
                Reply::KeyChecked(self.key_checked(time, &identity, outcome).map(Box::new))
            }
            Command::Release {
                lease_id,
                fencing_token,
                usage,
            } => Reply::Released(self.release(time, &lease_id, fencing_token, usage)),
            Command::ReportFailure {
                lease_id,
                fencing_token,
                report,
            } => Reply::Reported(self.report_failure(time, &lease_id, fencing_token, report)),
            Command::SetKeyEnabled {
                key_id,
                enabled,
                reason,
            } => Reply::KeySet(
                self.set_key_enabled(time, &key_id, enabled, &reason)
                    .map(Box::new),
            ),
            Command::HandBack {
                lease_id,
                fencing_token,
            } => {
                // The lease may have ended meanwhile (expired, its key disabled): nothing to do.
                let _ = self.release(time, &lease_id, fencing_token, Usage::UNUSED);
                Reply::HandedBack
            }
            Command::Tick => {
                self.tick(time);
                Reply::Ticked
            }
            Command::DropWaiters => Reply::WaitersDropped(self.drop_waiters(time)),
            Command::Configure(setup) => Reply::Configured(self.configure(time, setup)),
            Command::ReportFailureAndReplace { .. } => unreachable!("applied as its two parts"),
            Command::Timed { .. } | Command::ForCaller { .. } => {
                unreachable!("applied as its command")
            }
            Command::ResetCooldown {
                pool,
                project,
                model,
                forget_learned,
            } => Reply::CooldownReset(
                self.reset_cooldown(time, &pool, &project, &model, forget_learned)
                    .map(Box::new),
            ),
        };
        for (group, change) in self.books.take_changes() {
            // A limit raised may serve someone waiting.
            self.freed = true;
            let kind = EventKind::LimitLearned {
                pool: self.catalogue.pool_name(group).to_string(),
                project: self.catalogue.projects.name(group.project).to_string(),
                model: self.catalogue.models.name(group.model).to_string(),
                change,
            };
            self.emit(self.time, kind);
        }
        let drained = std::mem::take(&mut self.drained);
        if !drained.is_empty() {
            for key in drained {
                let key_id = self.catalogue.key(key).spec.id.clone();
                self.emit(self.time, EventKind::KeyRemoved { key_id });
            }
            self.forget_gone_keys();
        }
        (reply, self.drain())
    }
}

impl Engine {
    /// Keeps `call_ms` in the record of the key of the live lease `command` ends, if it is
    /// one that ends a lease (anything else is applied as itself, timing nothing).
    fn timed(&mut self, command: &Command, call_ms: u64) {
        let (Command::Release {
            lease_id,
            fencing_token,
            ..
        }
        | Command::ReportFailure {
            lease_id,
            fencing_token,
            ..
        }
        | Command::ReportFailureAndReplace {
            lease_id,
            fencing_token,
            ..
        }) = command
        else {
            return;
        };
        if let Ok(token) = self.leases.live_token(lease_id, *fencing_token) {
            let key = self.leases.get(token).expect("live").key;
            self.catalogue.record(key).timed(call_ms);
        }
    }
}

// Each command has its own reply: the shell takes it out by the command it applied.
impl Reply {
    pub fn into_acquired(self) -> Result<Acquired, EngineError> {
        match self {
            Self::Acquired(reply) => reply,
            other => unreachable!("an acquire answered {other:?}"),
        }
    }

    pub fn into_waiter_cancelled(self) -> Option<super::Unavailable> {
        match self {
            Self::WaiterCancelled(reply) => reply,
            other => unreachable!("a cancel answered {other:?}"),
        }
    }

    pub fn into_renewed(self) -> Result<Renewed, EngineError> {
        match self {
            Self::Renewed(reply) => reply,
            other => unreachable!("a renew answered {other:?}"),
        }
    }

    pub fn into_released(self) -> Result<Option<Amount>, EngineError> {
        match self {
            Self::Released(reply) => reply,
            other => unreachable!("a release answered {other:?}"),
        }
    }

    pub fn into_reported(self) -> Result<Reported, EngineError> {
        match self {
            Self::Reported(reply) => reply,
            other => unreachable!("a report answered {other:?}"),
        }
    }

    pub fn into_reported_and_replaced(self) -> Replaced {
        match self {
            Self::ReportedAndReplaced(reply) => *reply,
            other => unreachable!("a report with its replacement answered {other:?}"),
        }
    }

    pub fn into_configured(self) -> Result<Reconfigured, SetupError> {
        match self {
            Self::Configured(reply) => reply,
            other => unreachable!("a configure answered {other:?}"),
        }
    }

    pub fn into_cooldown_reset(self) -> Result<GroupView, EngineError> {
        match self {
            Self::CooldownReset(reply) => reply.map(|group| *group),
            other => unreachable!("a cooldown reset answered {other:?}"),
        }
    }

    pub fn into_key_checked(self) -> Result<KeyView, EngineError> {
        match self {
            Self::KeyChecked(reply) => reply.map(|view| *view),
            other => unreachable!("a check answered {other:?}"),
        }
    }

    pub fn into_key_set(self) -> Result<KeyView, EngineError> {
        match self {
            Self::KeySet(reply) => reply.map(|view| *view),
            other => unreachable!("a set-enabled answered {other:?}"),
        }
    }
}
