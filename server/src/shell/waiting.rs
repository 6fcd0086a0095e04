//! Acquires and renewals that wait: the caller's channel in the engine's line, its deadline,
//! and a grant that becomes durable after its caller left, handed back rather than lost.

use super::*;

/// A new lease on its way to its caller while its record is committed. Dropped before it was
/// delivered (the caller went away), it hands the lease back, as a waiter's would be: a caller
/// that is gone never holds a key.
pub(super) struct Undelivered<'a> {
    state: &'a State,
    /// `None` once delivered.
    lease: Option<LeaseView>,
}

impl<'a> Undelivered<'a> {
    fn new(state: &'a State, lease: LeaseView) -> Self {
        Self {
            state,
            lease: Some(lease),
        }
    }

    /// The lease, once record `seq`, which granted it, is durable.
    async fn deliver(mut self, seq: u64) -> Result<LeaseView, AcquireFailure> {
        self.state.durable(seq).await?;
        Ok(self.lease.take().expect("delivered once"))
    }
}

impl Drop for Undelivered<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.state.execute(Command::HandBack {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
            });
        }
    }
}

/// An acquire or a renewal in line. Dropped before its outcome arrived (disconnect, shutdown),
/// it takes the waiter out of line, and gives back a lease granted in that very moment, so that
/// no lease is ever held for a caller that is gone (a renewal's lease stays its holder's).
pub(super) struct Waiting<'a> {
    state: &'a State,
    id: WaiterId,
    receiver: oneshot::Receiver<(WaiterOutcome, u64)>,
    /// An acquire's: a lease granted to it is new, and goes back if its caller left.
    hands_back: bool,
    /// The outcome reached the caller: nothing to undo.
    done: bool,
}

impl Waiting<'_> {
    /// The lease with the record that granted it.
    async fn until(
        mut self,
        deadline: tokio::time::Sleep,
    ) -> Result<(LeaseView, u64), AcquireFailure> {
        let shutdown = self.state.shutdown.clone();
        let outcome = tokio::select! {
            outcome = &mut self.receiver => {
                self.done = true;
                outcome.map_err(|_| AcquireFailure::ShuttingDown)?
            }
            () = deadline => {
                self.done = true;
                match self.cancel() {
                    Some(unavailable) => return Err(AcquireFailure::Unavailable(unavailable)),
                    // Served just before the deadline: the outcome is already in the channel.
                    None => self.receiver.try_recv().map_err(|_| AcquireFailure::ShuttingDown)?,
                }
            }
            () = shutdown.cancelled() => return Err(AcquireFailure::ShuttingDown),
        };
        let (outcome, seq) = outcome;
        Ok((outcome.map_err(AcquireFailure::Unavailable)?, seq))
    }

    /// Takes the waiter out of line; `None` when it was already served.
    fn cancel(&mut self) -> Option<Unavailable> {
        let mut inner = self.state.lock();
        let (reply, notices) = self
            .state
            .apply_locked(&mut inner, Command::CancelWaiter(self.id));
        // The engine brings itself to now before the waiter leaves, which may serve this very
        // waiter: its lease must reach the channel, not be handed back as undelivered.
        self.state.carry_out(&mut inner, notices, None);
        inner.waiters.remove(&self.id);
        reply.into_waiter_cancelled()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done || self.cancel().is_some() || !self.hands_back {
            return;
        }
        if let Ok((Ok(lease), _)) = self.receiver.try_recv() {
            self.state.execute(Command::HandBack {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
            });
        }
    }
}

impl State {
    /// Lends a key to caller `by`, made for `caller` (tenants configured), waiting up to `wait`
    /// for one in its place in line.
    pub async fn acquire(
        &self,
        by: Option<&Arc<str>>,
        request: AcquireRequest,
        wait: Duration,
        caller: Option<Caller>,
    ) -> Result<LeaseView, AcquireFailure> {
        let began_ms = self.clock.now_ms();
        let counted = caller.clone();
        let acquired = self.acquire_waiting(by, request, wait, caller).await;
        if let (Ok(_), Some(caller)) = (&acquired, &counted) {
            self.metrics.granted_to(caller);
        }
        if acquired.is_ok() {
            let waited_ms = self.clock.now_ms().saturating_sub(began_ms);
            self.metrics.acquire_waited(waited_ms as f64 / 1000.0);
        }
        acquired
    }

    async fn acquire_waiting(
        &self,
        by: Option<&Arc<str>>,
        mut request: AcquireRequest,
        wait: Duration,
        caller: Option<Caller>,
    ) -> Result<LeaseView, AcquireFailure> {
        request.wait = !wait.is_zero();
        let (outcome, applied) = self.apply_queueing(
            by,
            State::for_caller(Command::Acquire(request), caller),
            |reply| Ok(((), reply.into_acquired())),
            queued_acquire,
        );
        let ((), acquired) = outcome?;
        self.deliver_acquired(acquired?, applied, wait).await
    }

    /// Reports a lease's failure and, in the same command, acquires its replacement for caller
    /// `by`, waiting up to `wait` for one as [`State::acquire`] does. The report is answered
    /// once durable whatever the replacement's fate; an error refuses the report, and then
    /// nothing was acquired. `lease`: its id and fencing token.
    pub async fn report_and_replace(
        &self,
        by: Option<&Arc<str>>,
        (lease_id, fencing_token): (String, u64),
        report: FailureReport,
        wait: Duration,
        call_ms: Option<u64>,
        caller: Option<Caller>,
    ) -> Result<(Reported, Result<LeaseView, AcquireFailure>), AcquireFailure> {
        let began_ms = self.clock.now_ms();
        let command = Command::ReportFailureAndReplace {
            lease_id,
            fencing_token,
            report,
            wait: !wait.is_zero(),
        }
        .timed(call_ms);
        let counted = caller.clone();
        let command = State::for_caller(command, caller);
        let (outcome, applied) = self.apply_queueing(
            by,
            command,
            Reply::into_reported_and_replaced,
            queued_acquire,
        );
        let (reported, acquired) = outcome?;
        // The report stands once durable, whether or not a replacement comes.
        self.durable(applied.seq).await?;
        let replacement = match acquired {
            Ok(acquired) => self.deliver_acquired(acquired, applied, wait).await,
            Err(error) => Err(error.into()),
        };
        if let (Ok(_), Some(caller)) = (&replacement, &counted) {
            self.metrics.granted_to(caller);
        }
        if replacement.is_ok() {
            let waited_ms = self.clock.now_ms().saturating_sub(began_ms);
            self.metrics.acquire_waited(waited_ms as f64 / 1000.0);
        }
        Ok((reported, replacement))
    }

    /// Applies `command`, whose reply `outcome_of` reads; when `queued_of` finds it queued a
    /// waiter, the waiter's channel is registered under the same lock as the command, so that
    /// no outcome can be sent before it is there.
    fn apply_queueing<T>(
        &self,
        by: Option<&Arc<str>>,
        command: Command,
        outcome_of: impl FnOnce(Reply) -> T,
        queued_of: impl FnOnce(&T) -> Option<WaiterId>,
    ) -> (T, Applied) {
        let now = self.clock.now();
        let mut inner = self.lock();
        let first_new_token = inner.engine.next_fencing_token();
        let (reply, notices) = self.apply_locked(&mut inner, command);
        let outcome = outcome_of(reply);
        let receiver = queued_of(&outcome).map(|id| {
            let (outcome, receiver) = oneshot::channel();
            let by = by.cloned();
            inner.waiters.insert(id, Waiter { outcome, by });
            receiver
        });
        self.carry_out(&mut inner, notices, by);
        let applied = Applied {
            seq: inner.last_seq,
            receiver,
            first_new_token,
            now,
        };
        (outcome, applied)
    }

    /// An acquire's outcome, delivered: a grant once durable (handed back if its caller left
    /// first), a queued acquire once served or its `wait` ran out.
    async fn deliver_acquired(
        &self,
        acquired: Acquired,
        applied: Applied,
        wait: Duration,
    ) -> Result<LeaseView, AcquireFailure> {
        let Applied {
            seq,
            receiver,
            first_new_token,
            now,
        } = applied;
        let (waiter, receiver) = match (acquired, receiver) {
            // The lease the task already held: nothing to hand back if its caller goes.
            (Acquired::Granted(lease), _) if lease.fencing_token < first_new_token => {
                self.durable(seq).await?;
                return Ok(lease);
            }
            (Acquired::Granted(lease), _) => {
                return Undelivered::new(self, lease).deliver(seq).await;
            }
            (Acquired::Unavailable(unavailable), _) => {
                return Err(AcquireFailure::Unavailable(unavailable));
            }
            (Acquired::Queued(id), Some(receiver)) => (id, receiver),
            (Acquired::Queued(_), None) => unreachable!("a queued acquire has a channel"),
        };
        // Boxed: the wait's timer and select would otherwise make every acquire's future several
        // times larger, copied through each layer of the server, though most are granted at once.
        Box::pin(async move {
            let (lease, seq) = self.wait_in_line(waiter, receiver, now, wait, true).await?;
            Undelivered::new(self, lease).deliver(seq).await
        })
        .await
    }

    /// Waiter `id`'s outcome with the record that decided it, waiting up to `wait` from `since`.
    async fn wait_in_line(
        &self,
        id: WaiterId,
        receiver: oneshot::Receiver<(WaiterOutcome, u64)>,
        since: Time,
        wait: Duration,
        hands_back: bool,
    ) -> Result<(LeaseView, u64), AcquireFailure> {
        let deadline = tokio::time::sleep_until(self.clock.instant_at(since.steady_ms) + wait);
        Waiting {
            state: self,
            id,
            receiver,
            hands_back,
            done: false,
        }
        .until(deadline)
        .await
    }
}

/// The waiter an acquire's outcome queued.
fn queued_acquire<R>(outcome: &AcquiringOutcome<R>) -> Option<WaiterId> {
    match outcome {
        Ok((_, Ok(Acquired::Queued(id)))) => Some(*id),
        _ => None,
    }
}

impl State {
    /// Renews a lease for caller `by`: it lives on at once, and the requests and tokens it asks
    /// for more are booked when the quota has room, the renewal waiting up to `wait` for it in
    /// the lease's line (in its place among the acquires there, made for `caller`; it leaves
    /// when the lease ends).
    pub async fn renew(
        &self,
        by: Option<&Arc<str>>,
        renewal: Renewal,
        wait: Duration,
        caller: Option<Caller>,
    ) -> Result<LeaseView, AcquireFailure> {
        let command = if wait.is_zero() {
            Command::Renew(renewal)
        } else {
            State::for_caller(Command::RenewWaiting(renewal), caller)
        };
        let (renewed, applied) =
            self.apply_queueing(by, command, Reply::into_renewed, |renewed| match renewed {
                Ok(Renewed::Queued(_, id)) => Some(*id),
                _ => None,
            });
        // The lease lives on once its record is durable, whatever comes of what it asked for
        // more; a renewal served in line is answered once the record that served it is.
        let (answer, seq) = match renewed? {
            Renewed::Done(lease) => (Ok(lease), applied.seq),
            Renewed::QuotaUnavailable(_, unavailable) => {
                (Err(AcquireFailure::Unavailable(unavailable)), applied.seq)
            }
            Renewed::Queued(_, id) => {
                let receiver = applied.receiver.expect("a queued renewal has a channel");
                let waiting = self.wait_in_line(id, receiver, applied.now, wait, false);
                match Box::pin(waiting).await {
                    Ok((lease, seq)) => (Ok(lease), seq),
                    Err(failure) => (Err(failure), applied.seq),
                }
            }
        };
        self.durable(seq).await?;
        answer
    }
}

/// What applying a command that acquires left for delivering its outcome.
pub(super) struct Applied {
    /// The command's record.
    seq: u64,
    /// A queued acquire's channel.
    receiver: Option<oneshot::Receiver<(WaiterOutcome, u64)>>,
    /// Tokens below it were lent before the command.
    first_new_token: u64,
    /// When it was applied: a wait runs from then.
    now: Time,
}

/// A command's answer that acquires: what else it answered, and the acquire's outcome.
type AcquiringOutcome<R> = Result<(R, Result<Acquired, EngineError>), EngineError>;
