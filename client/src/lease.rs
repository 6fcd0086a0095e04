//! A borrowed key: the lease guard. Its deadline counts from when each grant or renewal was
//! *sent*, so a slow reply never makes it believe it holds the key longer than the server does.
//! It renews in the background once a third of the TTL has passed, stops offering the key when
//! its deadline passes, renews before any call that could outlive it, and releases (with the
//! usage recorded) when dropped.

use crate::client::{Error, KeyLeaseClient, from_pb, to_pb};
use crate::clock::now;
use keylease::pb;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What to borrow.
#[derive(Debug, Clone)]
pub struct AcquireOptions {
    pub task_id: String,
    pub model: String,
    /// Empty: the server's default pool.
    pub pool: String,
    pub exclude_key_ids: Vec<String>,
    /// `None`: the server's default.
    pub ttl: Option<Duration>,
    /// How long to wait for a key; zero fails fast.
    pub wait: Duration,
    pub requests: u32,
    pub estimated_input_tokens: u64,
    /// How urgently to wait, where the server has tenants; the lease's replacement and its
    /// renewals wait so too. Unspecified: normal.
    pub priority: pb::Priority,
    /// The tenant to wait as, where the caller's may name others; empty: the caller's own.
    pub tenant: String,
}

impl AcquireOptions {
    pub fn new(task_id: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            task_id: task_id.into(),
            model: model.into(),
            pool: String::new(),
            exclude_key_ids: Vec::new(),
            ttl: None,
            wait: Duration::from_secs(30),
            requests: 1,
            estimated_input_tokens: 0,
            priority: pb::Priority::Unspecified,
            tenant: String::new(),
        }
    }
}

/// What a lease was used for, reported when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every request sent, whatever its answer.
    pub requests_sent: u32,
    /// Input tokens recorded; `None` until some are, and then the server keeps the estimate.
    pub input_tokens: Option<u64>,
    /// How long the last call made with the key took, when recorded: the server keeps it in
    /// the key's record.
    pub last_call: Option<Duration>,
}

/// A failed call, to report.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: pb::FailureKind,
    /// Finer than `kind`, where the provider's answer said more (see `pb::FailureClass`).
    pub class: pb::FailureClass,
    pub retry_after: Option<Duration>,
    /// Short (cut to `keylease::MAX_DETAIL_BYTES` when sent); a key in it is masked by the
    /// server, but better never put one there.
    pub detail: String,
    /// What the provider's 429 said of the limit it hit: keylease learns the real limits.
    pub violations: Vec<crate::gemini::classify::QuotaViolation>,
}

#[derive(Debug)]
struct Held {
    lease: pb::Lease,
    /// When this client stops using the key: send time of the last grant or renewal + its TTL.
    deadline: Instant,
    usage: Usage,
    /// Released, reported, or found ended by a renewal.
    ended: bool,
    /// The class and tenant asked for: renewals and the replacement wait so too.
    priority: pb::Priority,
    tenant: String,
}

/// A borrowed key. Use [`LeaseGuard::api_key`] for each call, record what was sent, and end it
/// with [`LeaseGuard::release`] or [`LeaseGuard::report_failure`]; dropped, it releases itself.
pub struct LeaseGuard {
    client: KeyLeaseClient,
    held: Arc<Mutex<Held>>,
    renewer: JoinHandle<()>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = lock(&self.held);
        f.debug_struct("LeaseGuard")
            .field("lease_id", &held.lease.lease_id)
            .field("key_id", &held.lease.key_id)
            .field("deadline", &held.deadline)
            .finish()
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Leasing is this module's: the client's connection knows nothing of guards.
impl KeyLeaseClient {
    /// Borrows a key for a task; the guard renews it in the background and releases it when dropped.
    pub async fn acquire(&self, options: AcquireOptions) -> Result<LeaseGuard, Error> {
        LeaseGuard::acquire(self.clone(), options).await
    }
}

impl LeaseGuard {
    pub(crate) async fn acquire(
        client: KeyLeaseClient,
        options: AcquireOptions,
    ) -> Result<Self, Error> {
        let request = pb::AcquireKeyRequest {
            task_id: options.task_id,
            pool: options.pool,
            model: options.model,
            exclude_key_ids: options.exclude_key_ids,
            ttl: options.ttl.map(to_pb),
            wait: Some(to_pb(options.wait)),
            requests: options.requests,
            estimated_input_tokens: options.estimated_input_tokens,
            // Retries after a lost reply get the same lease instead of a second one.
            client_request_id: client.next_request_id(),
            priority: options.priority as i32,
            tenant: options.tenant,
        };
        let (lease, sent_at) = client.acquire_key(options.wait, &request).await?;
        Ok(Self::hold(
            client,
            lease,
            sent_at,
            (options.priority, request.tenant),
        ))
    }

    /// Wraps a lease granted at `sent_at` (acquire or replacement) and starts renewing it;
    /// `asked`: the class and tenant it was asked for.
    fn hold(
        client: KeyLeaseClient,
        lease: pb::Lease,
        sent_at: Instant,
        (priority, tenant): (pb::Priority, String),
    ) -> Self {
        let deadline = sent_at + from_pb(lease.ttl);
        let held = Arc::new(Mutex::new(Held {
            lease,
            deadline,
            usage: Usage::default(),
            ended: false,
            priority,
            tenant,
        }));
        let renewer = tokio::spawn(renew_in_background(client.clone(), Arc::downgrade(&held)));
        Self {
            client,
            held,
            renewer,
        }
    }

    /// The key, while the lease is live by this client's own reckoning.
    pub fn api_key(&self) -> Result<String, Error> {
        let held = lock(&self.held);
        if held.ended || now() >= held.deadline {
            return Err(Error::LeaseEnded(held.lease.lease_id.clone()));
        }
        Ok(held.lease.api_key.clone())
    }

    pub fn lease(&self) -> pb::Lease {
        let mut lease = lock(&self.held).lease.clone();
        lease.api_key.clear();
        lease
    }

    pub fn key_id(&self) -> String {
        lock(&self.held).lease.key_id.clone()
    }

    pub fn project(&self) -> String {
        lock(&self.held).lease.project.clone()
    }

    /// How long the key may still be used.
    pub fn remaining(&self) -> Duration {
        lock(&self.held).deadline.saturating_duration_since(now())
    }

    /// Before a call that wants up to `call_time`: renews first if the lease could end sooner
    /// and a renewal would move its end (a third of its TTL has passed, as the background
    /// renewal does), and takes one of the lease's requests. Returns the key and how long the
    /// call may take, which is never past the lease's end: bound the call by it.
    pub async fn begin_request(&self, call_time: Duration) -> Result<(String, Duration), Error> {
        let remaining = self.remaining();
        let ttl = from_pb(lock(&self.held).lease.ttl);
        // A renewal sets the end a TTL from now: on a fresh lease it would gain nothing but a
        // round trip (and, durable, a commit) before every call that outlasts the TTL.
        if remaining <= call_time && remaining <= ttl - ttl / 3 {
            self.renew(None, 0).await?;
        }
        let allowed = self.remaining().min(call_time);
        let mut held = lock(&self.held);
        if allowed.is_zero() {
            return Err(Error::LeaseEnded(held.lease.lease_id.clone()));
        }
        if held.usage.requests_sent >= held.lease.requests_granted {
            return Err(Error::BudgetSpent(held.lease.lease_id.clone()));
        }
        held.usage.requests_sent += 1;
        drop(held);
        Ok((self.api_key()?, allowed))
    }

    /// Resolves once this client may no longer use the key: the deadline passed with no
    /// renewal pushing it on, or the lease ended. A call in flight stops there, so that the key
    /// is never in use after the server may have lent it again.
    pub async fn expired(&self) {
        loop {
            let deadline = {
                let held = lock(&self.held);
                if held.ended {
                    return;
                }
                held.deadline
            };
            if now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Records input tokens actually used, reported when the lease ends.
    pub fn record_tokens(&self, input_tokens: u64) {
        let usage = &mut lock(&self.held).usage;
        usage.input_tokens = Some(usage.input_tokens.unwrap_or(0).saturating_add(input_tokens));
    }

    /// Records how long a call made with the key took (to its answer, or to its timeout).
    pub fn record_call(&self, took: Duration) {
        lock(&self.held).usage.last_call = Some(took);
    }

    pub fn usage(&self) -> Usage {
        lock(&self.held).usage
    }

    /// Extends the lease (`ttl`: the server's cap applies) and reserves `more_requests`, waiting
    /// for quota up to the call timeout.
    pub async fn renew(&self, ttl: Option<Duration>, more_requests: u32) -> Result<(), Error> {
        renew(&self.client, &self.held, ttl, more_requests).await
    }

    /// Ends the lease with the usage recorded.
    pub async fn release(self) -> Result<(), Error> {
        let (request, _) = self.end();
        let Some(request) = request else {
            return Ok(());
        };
        self.client.release(&request).await
    }

    /// Reports a failed call and ends the lease; with `replacement`, borrows another key that
    /// avoids every key this task failed on, waiting up to `wait`.
    pub async fn report_failure(
        self,
        failure: Failure,
        replacement: Option<Duration>,
    ) -> Result<Option<LeaseGuard>, Error> {
        let (_, lease) = self.end();
        let (usage, asked) = {
            let held = lock(&self.held);
            (held.usage, (held.priority, held.tenant.clone()))
        };
        let request = pb::ReportFailureRequest {
            lease_id: lease.lease_id.clone(),
            fencing_token: lease.fencing_token,
            kind: failure.kind as i32,
            class: failure.class as i32,
            retry_after: failure.retry_after.map(to_pb),
            detail: keylease::truncate_on_char_boundary(
                &failure.detail,
                keylease::MAX_DETAIL_BYTES,
            )
            .to_string(),
            rotate: replacement.is_some(),
            requests_sent: Some(usage.requests_sent),
            call_duration: usage.last_call.map(to_pb),
            replacement_wait: replacement.map(to_pb),
            quota_violations: failure
                .violations
                .iter()
                .take(keylease::MAX_QUOTA_VIOLATIONS)
                .map(|v| v.to_pb())
                .collect(),
            priority: asked.0 as i32,
            tenant: asked.1.clone(),
        };
        let reported = self
            .client
            .report_failure(replacement.unwrap_or_default(), &request)
            .await;
        let (reported, sent_at) = match reported {
            Ok(answer) => answer,
            // The lease ended meanwhile (expired): the report has nothing left to end.
            Err(Error::Refused(status))
                if status.code() == tonic::Code::FailedPrecondition && replacement.is_none() =>
            {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        match (reported.replacement, reported.replacement_unavailable) {
            (Some(next), _) => Ok(Some(Self::hold(self.client.clone(), next, sent_at, asked))),
            (None, Some(unavailable)) if replacement.is_some() => {
                let why = pb::UnavailableReason::try_from(unavailable.reason).unwrap_or_default();
                Err(Error::NoKey {
                    reason: format!("{why:?}"),
                    retry_after: unavailable.retry_after.map(|d| from_pb(Some(d))),
                    why,
                })
            }
            _ => Ok(None),
        }
    }

    /// Marks the lease ended; the release to send unless it already was.
    fn end(&self) -> (Option<pb::ReleaseRequest>, pb::Lease) {
        self.renewer.abort();
        let mut held = lock(&self.held);
        let was_ended = std::mem::replace(&mut held.ended, true);
        let request = (!was_ended).then(|| pb::ReleaseRequest {
            lease_id: held.lease.lease_id.clone(),
            fencing_token: held.lease.fencing_token,
            requests_sent: Some(held.usage.requests_sent),
            input_tokens: held.usage.input_tokens,
            call_duration: held.usage.last_call.map(to_pb),
        });
        (request, held.lease.clone())
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let (request, _) = self.end();
        let (Some(request), Ok(runtime)) = (request, tokio::runtime::Handle::try_current()) else {
            // Without a runtime the lease simply expires on the server.
            return;
        };
        let client = self.client.clone();
        runtime.spawn(async move {
            let released = client.release(&request).await;
            if let Err(error) = released {
                tracing::warn!(%error, "releasing a dropped lease failed; it will expire");
            }
        });
    }
}

async fn renew(
    client: &KeyLeaseClient,
    held: &Mutex<Held>,
    ttl: Option<Duration>,
    more_requests: u32,
) -> Result<(), Error> {
    let (request, ended) = {
        let held = lock(held);
        let request = pb::RenewLeaseRequest {
            lease_id: held.lease.lease_id.clone(),
            fencing_token: held.lease.fencing_token,
            ttl: ttl.map(to_pb),
            additional_requests: more_requests,
            additional_input_tokens: 0,
            wait: (more_requests > 0).then(|| to_pb(client.config().call_timeout / 2)),
            priority: held.priority as i32,
            tenant: held.tenant.clone(),
        };
        (request, held.ended)
    };
    if ended {
        return Err(Error::LeaseEnded(request.lease_id));
    }
    let renewed = client.renew_lease(&request).await;
    let mut held = lock(held);
    match renewed {
        Ok((response, sent_at)) => {
            let lease = response.lease.unwrap_or_default();
            held.deadline = sent_at + from_pb(lease.ttl);
            held.lease.ttl = lease.ttl;
            held.lease.expires_at = lease.expires_at;
            held.lease.requests_granted = lease.requests_granted;
            Ok(())
        }
        Err(Error::Refused(status)) if status.code() == tonic::Code::FailedPrecondition => {
            held.ended = true;
            Err(Error::LeaseEnded(held.lease.lease_id.clone()))
        }
        Err(error) => Err(error),
    }
}

/// Renews once a third of the TTL has passed, until the lease ends or the guard is gone.
async fn renew_in_background(client: KeyLeaseClient, held: std::sync::Weak<Mutex<Held>>) {
    loop {
        let Some(strong) = held.upgrade() else { return };
        let (wake, ended) = {
            let held = lock(&strong);
            let ttl = from_pb(held.lease.ttl);
            (
                held.deadline
                    .checked_sub(ttl - ttl / 3)
                    .unwrap_or(held.deadline),
                held.ended,
            )
        };
        drop(strong);
        if ended {
            return;
        }
        tokio::time::sleep_until(wake).await;
        let Some(strong) = held.upgrade() else { return };
        match renew(&client, &strong, None, 0).await {
            Ok(()) => {}
            Err(Error::LeaseEnded(_)) => return,
            Err(error) => {
                // Unreachable for now: keep trying until the deadline, then stop offering the key.
                tracing::warn!(%error, "renewing a lease failed");
                if now() >= lock(&strong).deadline {
                    return;
                }
                tokio::time::sleep(client.config().retry_backoff).await;
            }
        }
    }
}
