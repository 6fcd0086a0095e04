//! One Gemini call under a lease: borrow a key, send, classify the outcome, report it, and act.
//! Quota errors rotate to another project's key, bad keys are disabled and rotated away from,
//! provider trouble is retried with backoff, request errors end at once with the provider's
//! message. Key failures do not spend the task's retry budget (they are the service's business);
//! provider trouble does. An overall deadline bounds everything.

use super::{CallError, Failure, GeminiClient, GenerateContentRequest, GenerateContentResponse};
use crate::client::{Error, KeyLeaseClient};
use crate::clock::now;
use crate::lease::{AcquireOptions, LeaseGuard};
use keylease::pb::{FailureClass, FailureKind};
use std::future::Future;
use std::time::Duration;

/// How hard to try.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries of a call that met provider trouble (5xx, timeouts) before giving up.
    pub task_attempts: u32,
    /// First backoff after provider trouble; doubles, up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Longest one Gemini call may take.
    pub call_timeout: Duration,
    /// Bounds the whole call: waits for keys, retries and all.
    pub deadline: Duration,
    /// Lease time to live; `None`: the server's default.
    pub lease_ttl: Option<Duration>,
    /// Longest wait for a key at a time; `None`: until the deadline.
    pub key_wait: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            task_attempts: 4,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            call_timeout: Duration::from_secs(60),
            deadline: Duration::from_secs(300),
            lease_ttl: None,
            key_wait: None,
        }
    }
}

/// A call's result: an answer, or a safety block (a content decision, not a failure).
#[derive(Debug, Clone, PartialEq)]
pub enum Generated {
    Answer(GenerateContentResponse),
    Blocked {
        block: super::Block,
        response: GenerateContentResponse,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The request itself is wrong; retrying does not help.
    #[error("Gemini refused the request ({status}): {message}")]
    Request {
        status: u16,
        message: String,
        /// The provider's answer as it came, for a proxy to pass on.
        body: String,
    },
    /// Provider trouble outlasted the retry budget.
    #[error("Gemini failed {attempts} times; last: {last}")]
    Provider {
        attempts: u32,
        last: String,
        /// The last answer's HTTP status, when there was one.
        status: Option<u16>,
    },
    #[error("no answer within the deadline of {0:?}")]
    DeadlineExceeded(Duration),
    #[error(transparent)]
    KeyLease(#[from] Error),
}

/// Gemini calls, each under a keylease lease.
#[derive(Clone)]
pub struct LeasedGemini {
    keylease: KeyLeaseClient,
    gemini: GeminiClient,
    policy: RetryPolicy,
}

impl LeasedGemini {
    pub fn new(keylease: KeyLeaseClient, gemini: GeminiClient, policy: RetryPolicy) -> Self {
        Self {
            keylease,
            gemini,
            policy,
        }
    }

    /// One `generateContent` call for `task_id`, on whatever key keylease lends.
    pub async fn generate(
        &self,
        task_id: &str,
        model: &str,
        request: &GenerateContentRequest,
    ) -> Result<Generated, GenerateError> {
        let mut options = AcquireOptions::new(task_id, model);
        options.ttl = self.policy.lease_ttl;
        options.estimated_input_tokens = request.estimated_input_tokens();
        let (response, lease) = with_lease(
            &self.keylease,
            &self.policy,
            options,
            Booking::Request,
            |key| async move { self.gemini.generate_content(&key, model, request).await },
        )
        .await?;
        let usage = response.usage_metadata.unwrap_or_default();
        lease.record_tokens(usage.prompt_token_count);
        lease.release().await?;
        Ok(match response.block() {
            Some(block) => Generated::Blocked { block, response },
            None => Generated::Answer(response),
        })
    }
}

/// Whether a call spends one of the model's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booking {
    /// A generation or an embedding: one request of the lease.
    Request,
    /// Uses a key but not the model's quota (`countTokens`, the model listing): the lease is
    /// released with nothing sent.
    Nothing,
}

/// Runs `send` with a leased key until it answers: quota and key failures are reported and the
/// call goes to another key; provider trouble backs off and retries, within the task's budget;
/// request errors end it at once. A call stops when the lease does (renewals failed), so a key
/// is never in use after keylease may have lent it again. Returns the answer and the lease,
/// still held: record what was used and release it, or keep it while a stream runs.
pub async fn with_lease<T, F, Fut>(
    keylease: &KeyLeaseClient,
    policy: &RetryPolicy,
    mut options: AcquireOptions,
    booking: Booking,
    mut send: F,
) -> Result<(T, LeaseGuard), GenerateError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let deadline = now() + policy.deadline;
    let remaining = || deadline.saturating_duration_since(now());
    let key_wait = || policy.key_wait.map_or(remaining(), |w| w.min(remaining()));
    options.wait = key_wait();
    let mut lease = keylease.acquire(options.clone()).await?;
    let mut provider_failures = 0;
    let mut backoff = policy.backoff;
    loop {
        if remaining().is_zero() {
            return Err(GenerateError::DeadlineExceeded(policy.deadline));
        }
        let call_time = policy.call_timeout.min(remaining());
        let key = match booking {
            Booking::Request => lease.begin_request(call_time).await?.0,
            Booking::Nothing => lease.api_key()?,
        };
        let began = now();
        let answer = tokio::time::timeout(call_time, async {
            tokio::select! {
                answer = send(key.clone()) => Some(answer),
                () = lease.expired() => None,
            }
        })
        .await;
        if !matches!(answer, Ok(None)) {
            // To its answer (a stream's start) or its timeout: the key's latency.
            lease.record_call(began.elapsed());
        }
        let mut failure = match answer {
            Ok(Some(Ok(answer))) => return Ok((answer, lease)),
            Ok(Some(Err(CallError::Provider {
                status,
                classified,
                body,
            }))) => match classified.failure {
                // What the provider said goes on to the caller, who must not learn the key of
                // a lease it never saw, even from a provider that echoes it.
                Failure::Request | Failure::CallerBug => {
                    lease.release().await?;
                    return Err(GenerateError::Request {
                        status,
                        message: keylease::mask_in(&classified.message, &key),
                        body: keylease::mask_in(&body, &key),
                    });
                }
                failure => Reported {
                    kind: failure
                        .report_kind()
                        .expect("every other failure is reported"),
                    class: classified.report_class(),
                    retry_after: classified.retry_after,
                    detail: keylease::mask_in(&format!("{status} {}", classified.reason), &key),
                    blames_key: failure.blames_key(),
                    status: Some(status),
                    violations: classified.violations,
                },
            },
            Ok(Some(Err(CallError::Decode(message)))) => {
                Reported::provider(FailureKind::ServerError, message)
            }
            Ok(Some(Err(CallError::Transport { message, timed_out }))) => Reported::provider(
                if timed_out {
                    FailureKind::Timeout
                } else {
                    FailureKind::ServerError
                },
                message,
            ),
            Ok(None) => {
                return Err(GenerateError::KeyLease(crate::Error::LeaseEnded(
                    lease.lease().lease_id,
                )));
            }
            Err(_) => Reported::provider(
                FailureKind::Timeout,
                format!("no answer within {call_time:?}"),
            ),
        };
        let report = crate::lease::Failure {
            kind: failure.kind,
            class: failure.class,
            retry_after: failure.retry_after,
            detail: failure.detail.clone(),
            violations: std::mem::take(&mut failure.violations),
        };
        if failure.blames_key {
            // The service rests or disables the key and lends one from elsewhere.
            tracing::debug!(task_id = %options.task_id, kind = ?failure.kind, "rotating to another key");
            match lease.report_failure(report, Some(key_wait())).await? {
                Some(next) => lease = next,
                None => return Err(GenerateError::DeadlineExceeded(policy.deadline)),
            }
            continue;
        }
        provider_failures += 1;
        lease.report_failure(report, None).await?;
        if provider_failures >= policy.task_attempts {
            return Err(GenerateError::Provider {
                attempts: provider_failures,
                last: failure.detail,
                status: failure.status,
            });
        }
        // The provider's own delay when it gave one (the model's capacity says when it
        // comes back), else the backoff; never past the task's deadline.
        let pause = failure
            .retry_after
            .map_or(backoff, |delay| delay.max(backoff));
        tokio::time::sleep(pause.min(remaining())).await;
        backoff = (backoff * 2).min(policy.backoff_max);
        options.wait = key_wait();
        lease = keylease.acquire(options.clone()).await?;
    }
}

/// What to tell keylease about a failed call.
struct Reported {
    kind: FailureKind,
    class: FailureClass,
    retry_after: Option<Duration>,
    detail: String,
    blames_key: bool,
    /// The provider's HTTP status, when it answered.
    status: Option<u16>,
    violations: Vec<super::classify::QuotaViolation>,
}

impl Reported {
    fn provider(kind: FailureKind, detail: String) -> Self {
        Self {
            kind,
            class: FailureClass::Unspecified,
            retry_after: None,
            detail,
            blames_key: false,
            status: None,
            violations: Vec::new(),
        }
    }
}
