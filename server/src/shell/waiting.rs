//! Acquires that wait: the caller's channel in the engine's line, its deadline, and a grant
//! that becomes durable after its caller left, handed back rather than lost.

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

/// An acquire in line. Dropped before its outcome arrived (disconnect, shutdown), it takes the
/// waiter out of line, and gives back a lease granted in that very moment, so that no lease is
/// ever held for a caller that is gone.
pub(super) struct Waiting<'a> {
    state: &'a State,
    id: WaiterId,
    receiver: oneshot::Receiver<(WaiterOutcome, u64)>,
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
        if self.done || self.cancel().is_some() {
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
    /// Lends a key to caller `by`, waiting up to `wait` for one in first-come-first-served order.
    pub async fn acquire(
        &self,
        by: Option<&Arc<str>>,
        request: AcquireRequest,
        wait: Duration,
    ) -> Result<LeaseView, AcquireFailure> {
        let began_ms = self.clock.now_ms();
        let acquired = self.acquire_waiting(by, request, wait).await;
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
    ) -> Result<LeaseView, AcquireFailure> {
        request.wait = !wait.is_zero();
        let now = self.clock.now();
        let (outcome, seq, receiver, first_new_token) = {
            let mut inner = self.lock();
            let first_new_token = inner.engine.next_fencing_token();
            let (reply, notices) = self.apply_locked(&mut inner, Command::Acquire(request));
            let outcome = reply.into_acquired();
            // Only a caller that waits needs a channel; it is registered under the same lock
            // as the acquire, so no grant can be sent before it is there.
            let receiver = match outcome {
                Ok(Acquired::Queued(id)) => {
                    let (outcome, receiver) = oneshot::channel();
                    let by = by.cloned();
                    inner.waiters.insert(id, Waiter { outcome, by });
                    Some(receiver)
                }
                _ => None,
            };
            self.carry_out(&mut inner, notices, by);
            (outcome, inner.last_seq, receiver, first_new_token)
        };
        let (waiter, receiver) = match (outcome?, receiver) {
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
        let deadline = tokio::time::sleep_until(self.clock.instant_at(now.steady_ms) + wait);
        // Boxed: the wait's timer and select would otherwise make every acquire's future several
        // times larger, copied through each layer of the server, though most are granted at once.
        Box::pin(async move {
            let (lease, seq) = Waiting {
                state: self,
                id: waiter,
                receiver,
                done: false,
            }
            .until(deadline)
            .await?;
            Undelivered::new(self, lease).deliver(seq).await
        })
        .await
    }
}
