//! Running the tasks: a fixed number of workers take tasks in input order, each borrows a key
//! for each call through the client crate's [`with_lease`] (which rotates away from keys that
//! failed and backs off from provider trouble), and hands its result line to the one writer.
//! A task fails for good on a request the provider refuses, a safety block, or when its retries
//! are spent on provider trouble or answers that are not the JSON asked for; key failures never
//! spend them. A task that cannot get a key before its deadline (the day's quota is spent, every
//! key is disabled) or whose keylease stops answering is left for a later run, not failed, and
//! the run starts no more tasks.

use super::answer::parse_json;
use super::checkpoint::{Row, RowError, Status};
use super::tasks::Task;
use keylease::pb::UnavailableReason;
use keylease_client::gemini::{
    Booking, CallError, GeminiClient, GenerateContentRequest, GenerateError, RetryPolicy,
    with_lease,
};
use keylease_client::{AcquireOptions, KeyLeaseClient};
use keylease_server::secret::Redactor;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest one `AcquireKey` waits for a key: keylease keeps a waiter in line even when the
/// day's quota is spent, so this is also how long a run takes to see that it is.
const KEY_WAIT: Duration = Duration::from_secs(10);

/// How each task is run.
#[derive(Clone)]
pub struct Runner {
    pub keylease: KeyLeaseClient,
    pub gemini: GeminiClient,
    pub model: String,
    pub pool: String,
    /// The class its tasks wait in (`--priority`).
    pub priority: keylease::pb::Priority,
    /// Generation settings and the like, shared by every task.
    pub base: GenerateContentRequest,
    pub system: Option<String>,
    pub json: bool,
    /// Tries after the first, on provider trouble or an answer that is not JSON.
    pub max_retries: u32,
    /// Bounds one task: its waits for keys, calls and retries.
    pub task_timeout: Duration,
    pub call_timeout: Duration,
    /// First pause after provider trouble.
    pub backoff: Duration,
    /// Leases renew in the background; a run killed outright holds its keys this long at most.
    pub lease_ttl: Duration,
    pub redactor: Arc<Redactor>,
    /// Tells this run's tasks from another run's of the same input in keylease, which lends a
    /// task that already holds a lease that same lease.
    pub run_id: String,
}

/// What became of a task.
#[derive(Debug)]
pub enum Outcome {
    /// Its line, answered or failed for good.
    Finished(Row),
    /// Not run to an end, for a reason outside the task: it is run again next time.
    Left {
        id: String,
        reason: String,
        /// Calls it made all the same.
        attempts: u32,
    },
    /// A try that failed but will be tried again, for the error log.
    Retrying {
        id: String,
        attempt: u32,
        error: RowError,
    },
}

/// Counts for the progress bar.
#[derive(Debug, Default)]
pub struct Counters {
    pub active: AtomicUsize,
    pub queued: AtomicUsize,
}

/// Runs `tasks` on `workers` workers, sending each outcome to `outcomes`. Stops taking tasks
/// when `stop` is cancelled, or when a task is left (nothing more would get a key).
pub async fn run(
    runner: Runner,
    tasks: Vec<Task>,
    workers: usize,
    counters: Arc<Counters>,
    stop: CancellationToken,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    counters.queued.store(tasks.len(), Ordering::Relaxed);
    let queue = Arc::new(Mutex::new(VecDeque::from(tasks)));
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let (runner, queue, counters, stop, outcomes) = (
            runner.clone(),
            queue.clone(),
            counters.clone(),
            stop.clone(),
            outcomes.clone(),
        );
        handles.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let next = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                let Some(task) = next else { break };
                counters.queued.fetch_sub(1, Ordering::Relaxed);
                counters.active.fetch_add(1, Ordering::Relaxed);
                let outcome = runner.run_task(task, &outcomes).await;
                counters.active.fetch_sub(1, Ordering::Relaxed);
                if matches!(outcome, Outcome::Left { .. }) {
                    stop.cancel();
                }
                let _ = outcomes.send(outcome);
            }
        }));
    }
    for handle in handles {
        let _ = handle.await;
    }
}

/// What one task saw of its calls.
#[derive(Debug, Default)]
struct Tries {
    /// Calls sent.
    attempts: u32,
    /// Tries that count against `max_retries`: provider trouble, answers that are not JSON.
    spent: u32,
}

impl Runner {
    /// The task as keylease knows it: this run's, unique by its input line, named by its id.
    fn lease_task_id(&self, task: &Task) -> String {
        let id = format!("{}-{}:{}", self.run_id, task.line, task.id);
        keylease::truncate_on_char_boundary(&id, keylease::MAX_ID_BYTES).to_string()
    }

    async fn run_task(&self, task: Task, log: &mpsc::UnboundedSender<Outcome>) -> Outcome {
        let started = crate::clock::now();
        let request = task.request(self.system.as_deref(), &self.base);
        let budget = self.max_retries.saturating_add(1);
        let tries = Mutex::new(Tries::default());
        let mut row = Row {
            id: task.id.clone(),
            status: Status::Failed,
            text: None,
            json: None,
            error: None,
            attempts: 0,
            key_id: None,
            project: None,
            input_tokens: 0,
            output_tokens: 0,
            latency_ms: 0,
            finish_reason: None,
            metadata: task.metadata.clone(),
        };
        let fail = |mut row: Row, class: &str, message: String, tries: &Mutex<Tries>| {
            row.error = Some(RowError {
                class: class.to_string(),
                message: self.redactor.redact(&message).into_owned(),
            });
            row.attempts = lock(tries).attempts;
            row.latency_ms = started.elapsed().as_millis() as u64;
            Outcome::Finished(row)
        };
        loop {
            let remaining = self.task_timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return fail(
                    row,
                    "deadline",
                    format!("no answer within {:?}", self.task_timeout),
                    &tries,
                );
            }
            let spent = lock(&tries).spent;
            let policy = RetryPolicy {
                task_attempts: budget.saturating_sub(spent).max(1),
                call_timeout: self.call_timeout.min(remaining),
                deadline: remaining,
                // Within any server's `leases.max_wait`; a longer wait is this loop's.
                key_wait: Some(KEY_WAIT.min(remaining)),
                backoff: self.backoff,
                ..RetryPolicy::default()
            };
            let mut options = AcquireOptions::new(self.lease_task_id(&task), self.model.clone());
            options.pool = self.pool.clone();
            options.priority = self.priority;
            options.ttl = Some(self.lease_ttl);
            options.estimated_input_tokens = request.estimated_input_tokens();
            let id = &task.id;
            let send = |key: String| {
                let request = &request;
                let tries = &tries;
                async move {
                    let answer = self
                        .gemini
                        .generate_content(&key, &self.model, request)
                        .await;
                    let mut tries = lock(tries);
                    tries.attempts += 1;
                    if let Err(error) = &answer
                        && provider_trouble(error)
                    {
                        tries.spent += 1;
                        let _ = log.send(Outcome::Retrying {
                            id: id.clone(),
                            attempt: tries.attempts,
                            error: RowError {
                                class: "provider".into(),
                                message: self.redactor.redact(&error.to_string()).into_owned(),
                            },
                        });
                    }
                    answer
                }
            };
            let (response, lease) =
                match with_lease(&self.keylease, &policy, options, Booking::Request, send).await {
                    Ok(answered) => answered,
                    Err(GenerateError::Request {
                        status, message, ..
                    }) => {
                        return fail(row, "request", format!("{status}: {message}"), &tries);
                    }
                    Err(error @ GenerateError::Provider { .. }) => {
                        return fail(row, "provider", error.to_string(), &tries);
                    }
                    Err(error @ GenerateError::DeadlineExceeded(_)) => {
                        return fail(row, "deadline", error.to_string(), &tries);
                    }
                    Err(GenerateError::KeyLease(keylease_client::Error::NoKey {
                        reason,
                        retry_after,
                        why,
                    })) => {
                        // Busy keys free up within the task's time; a spent day, or keys
                        // that are all disabled, do not.
                        let wait = retry_after.unwrap_or(Duration::from_secs(1));
                        if why != UnavailableReason::AllDisabled
                            && started.elapsed() + wait < self.task_timeout
                        {
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        return Outcome::Left {
                            id: task.id,
                            reason: format!("no key: {reason}"),
                            attempts: lock(&tries).attempts,
                        };
                    }
                    // The lease ended under the call: the key's business, not the task's.
                    Err(GenerateError::KeyLease(keylease_client::Error::LeaseEnded(_))) => continue,
                    Err(GenerateError::KeyLease(error)) => {
                        return Outcome::Left {
                            id: task.id,
                            reason: self.redactor.redact(&error.to_string()).into_owned(),
                            attempts: lock(&tries).attempts,
                        };
                    }
                };
            row.key_id = Some(lease.key_id());
            row.project = Some(lease.project());
            let usage = response.usage_metadata.unwrap_or_default();
            lease.record_tokens(usage.prompt_token_count);
            // The answer is had: a release that fails only leaves the lease to expire.
            let _ = lease.release().await;
            row.input_tokens = row.input_tokens.saturating_add(usage.prompt_token_count);
            row.output_tokens = row
                .output_tokens
                .saturating_add(usage.candidates_token_count);
            row.finish_reason = response
                .candidates
                .first()
                .and_then(|c| c.finish_reason.clone());
            if let Some(block) = response.block() {
                return fail(row, "blocked", format!("{block:?}"), &tries);
            }
            let text = response.text().unwrap_or_default();
            let answered = |mut row: Row, tries: &Mutex<Tries>| {
                row.status = Status::Ok;
                row.attempts = lock(tries).attempts;
                row.latency_ms = started.elapsed().as_millis() as u64;
                Outcome::Finished(row)
            };
            if !self.json {
                row.text = Some(text);
                return answered(row, &tries);
            }
            match parse_json(&text, row.finish_reason.as_deref()) {
                Ok(value) => {
                    row.json = Some(value);
                    return answered(row, &tries);
                }
                Err(not_json) => {
                    let (attempt, spent) = {
                        let mut tries = lock(&tries);
                        tries.spent += 1;
                        (tries.attempts, tries.spent)
                    };
                    if spent >= budget {
                        return fail(row, "invalid_json", not_json.to_string(), &tries);
                    }
                    let _ = log.send(Outcome::Retrying {
                        id: task.id.clone(),
                        attempt,
                        error: RowError {
                            class: "invalid_json".into(),
                            message: self.redactor.redact(&not_json.to_string()).into_owned(),
                        },
                    });
                }
            }
        }
    }
}

/// Trouble on the provider's side, which the task's retries pay for (a key's failures do not).
fn provider_trouble(error: &CallError) -> bool {
    match error {
        CallError::Provider { classified, .. } => classified.failure.is_provider_trouble(),
        CallError::Transport { .. } | CallError::Decode(_) => true,
    }
}

fn lock(tries: &Mutex<Tries>) -> std::sync::MutexGuard<'_, Tries> {
    tries.lock().unwrap_or_else(PoisonError::into_inner)
}
