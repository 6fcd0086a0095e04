//! `keylease batch`: a file of prompts through Gemini as fast as the pool's keys allow.
//!
//! - [`tasks`]: the input, JSONL or plain text, checked line by line.
//! - [`checkpoint`]: the output, which is the checkpoint: what is done, torn lines, appending.
//! - [`pool`]: where keys come from: a keylease service, or its engine in this process.
//! - [`run`]: the workers, each task's calls and retries.
//! - [`answer`]: the text or the (repaired) JSON of an answer.
//! - [`report`]: the plan, the progress bar and the summary.

pub mod answer;
pub mod checkpoint;
pub mod pool;
pub mod report;
pub mod run;
pub mod tasks;

use checkpoint::{Output, RowError, Status};
use keylease::pb;
use keylease_client::gemini::{
    DEFAULT_BASE_URL, GeminiClient, GenerateContentRequest, GenerationConfig,
};
use pool::{Pool, PoolOptions};
use report::{Plan, Tally};
use run::{Counters, Outcome, Runner};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit statuses, after sysexits(3) where one fits.
pub mod exit {
    /// Every task answered.
    pub const OK: u8 = 0;
    /// The run ended, and some tasks failed for good.
    pub const SOME_FAILED: u8 = 1;
    /// Also shared with the server: the command line is wrong (`USAGE`), and the system
    /// refused a runtime (`OS`, from `keylease_server::exit::runtime`).
    pub use keylease_server::exit::{IO, NO_PERMISSION, UNAVAILABLE, USAGE};
    /// The input has bad lines (without `--skip-invalid`) or no tasks.
    pub const BAD_INPUT: u8 = 65;
    pub const NO_INPUT: u8 = 66;
    /// Another run writes to the same output.
    pub const OUTPUT_HELD: u8 = 73;
    /// Tasks were left for a later run: no key before their deadline, or keylease went away.
    pub const TRY_LATER: u8 = 75;
    /// Stopped by Ctrl-C or SIGTERM: run again to finish.
    pub const INTERRUPTED: u8 = 130;
}

/// Most workers a run may have.
const MAX_CONCURRENCY: usize = 10_000;
/// Most tries after the first.
const MAX_RETRIES: u32 = 100;
/// Bad lines shown one by one; the rest are counted.
const BAD_LINES_SHOWN: usize = 20;

/// A class of waiting, as `--priority` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Priority {
    Interactive,
    Normal,
    Batch,
}

impl Priority {
    fn to_pb(self) -> pb::Priority {
        match self {
            Self::Interactive => pb::Priority::Interactive,
            Self::Normal => pb::Priority::Normal,
            Self::Batch => pb::Priority::Batch,
        }
    }
}

/// Runs a file of prompts through Gemini on the pool's keys: resumable, with a progress bar.
#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    /// Tasks: JSONL (`{"id", "prompt" | "contents", "system", "metadata"}`) or plain text,
    /// one prompt a line; `-` for standard input.
    pub input: PathBuf,
    /// Results, one JSON line per task; also the checkpoint: a run with the same output skips
    /// what is done.
    #[arg(long, short)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: tasks::Format,
    #[arg(long, short, default_value = "gemini-2.5-flash")]
    pub model: String,
    /// Tasks at once (default: twice as many as the calls the pool's enabled keys can carry).
    #[arg(long, short)]
    pub concurrency: Option<usize>,
    /// System instruction of every task that gives none.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub max_output_tokens: Option<u32>,
    /// A stop sequence (repeat for several).
    #[arg(long = "stop")]
    pub stop_sequences: Vec<String>,
    /// More generation settings, as a JSON object in Gemini's `generationConfig` spelling.
    #[arg(long, value_name = "JSON")]
    pub generation_config: Option<String>,
    /// Parse each answer as JSON (repairing code fences, prose around it, trailing commas,
    /// single quotes); an answer with no JSON is tried again.
    #[arg(long)]
    pub json: bool,
    /// With --json: also ask Gemini for `responseMimeType: application/json`.
    #[arg(long, requires = "json")]
    pub json_mime: bool,
    /// Tries after the first, per task, on provider trouble or an answer that is not JSON;
    /// key failures (429s, dead keys) never count.
    #[arg(long, default_value_t = 3)]
    pub max_retries: u32,
    /// Longest a task may take, waits for keys included.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub task_timeout: Duration,
    /// Longest one Gemini call may take.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub call_timeout: Duration,
    /// First pause of a task after provider trouble (a 503, a timeout) before it tries again,
    /// unless Gemini names a delay; doubles with each, up to 8 s. Default: the client's, 500ms.
    #[arg(long, value_parser = backoff)]
    pub backoff: Option<Duration>,
    /// Lease time to live: leases renew while calls run, and a run killed outright (kill -9)
    /// keeps its keys from the next run this long at most.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Also run the tasks that failed for good in earlier runs (their lines are replaced).
    #[arg(long)]
    pub retry_failed: bool,
    /// Skip bad input lines with a warning instead of stopping before any task runs.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Every failed try and failed task, one JSON line each (appended).
    #[arg(long, value_name = "PATH")]
    pub error_log: Option<PathBuf>,
    /// Print the plan (tasks, keys, projects, expected duration) and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// keylease to lease from (repeat, or separate with commas, for replicas); without it the
    /// batch runs keylease's engine in this process.
    #[arg(long = "keylease", value_name = "URL", value_delimiter = ',')]
    pub keylease: Vec<String>,
    /// File holding the bearer token for --keylease (or set KEYLEASE_TOKEN).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) of an https:// keylease.
    #[arg(long, value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
    /// The pool to lease from (default: keylease's default pool).
    #[arg(long, default_value = "")]
    pub pool: String,
    /// How urgently the tasks wait for keys where keylease has [tenants] (default: normal);
    /// a class above what this caller's tenant may use is lowered.
    #[arg(long, value_enum)]
    pub priority: Option<Priority>,
    /// In-process: the configuration file (default: keylease.toml here, if any); keys also come
    /// from GEMINI_API_KEY_<n>.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// In-process: where counts, cooldowns and disabled keys are kept (default: the server's).
    #[arg(long, value_name = "PATH", conflicts_with = "ephemeral")]
    pub state_dir: Option<PathBuf>,
    /// In-process: keep nothing between runs.
    #[arg(long)]
    pub ephemeral: bool,
    /// Gemini's address.
    #[arg(long, env = "GEMINI_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub gemini_url: String,
}

/// A failure that ends the command, with its exit status.
struct Fatal(u8, String);

/// `--backoff`: a duration up to the 8 s the pauses double to.
fn backoff(text: &str) -> Result<Duration, String> {
    let most = keylease_client::gemini::RetryPolicy::default().backoff_max;
    let backoff = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if backoff > most {
        return Err(format!(
            "{} is longer than the {} the pauses double to",
            humantime::format_duration(backoff),
            humantime::format_duration(most)
        ));
    }
    Ok(backoff)
}

fn fatal(code: u8, message: impl Into<String>) -> Fatal {
    Fatal(code, message.into())
}

pub async fn batch(args: BatchArgs) -> ExitCode {
    match batch_inner(args).await {
        Ok(code) => ExitCode::from(code),
        Err(Fatal(code, message)) => {
            eprintln!("keylease batch: {message}");
            ExitCode::from(code)
        }
    }
}

async fn batch_inner(args: BatchArgs) -> Result<u8, Fatal> {
    let base = request_settings(&args)?;
    if args.concurrency == Some(0) || args.concurrency.is_some_and(|c| c > MAX_CONCURRENCY) {
        return Err(fatal(
            exit::USAGE,
            format!("--concurrency: from 1 to {MAX_CONCURRENCY}"),
        ));
    }
    if args.max_retries > MAX_RETRIES {
        return Err(fatal(
            exit::USAGE,
            format!("--max-retries: at most {MAX_RETRIES}"),
        ));
    }
    if !args.keylease.is_empty()
        && (args.config.is_some() || args.state_dir.is_some() || args.ephemeral)
    {
        return Err(fatal(
            exit::USAGE,
            "--config, --state-dir and --ephemeral are for the in-process engine; with --keylease the service's configuration applies",
        ));
    }
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| fatal(exit::USAGE, format!("--token-file {}: {e}", path.display())))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("KEYLEASE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };

    let input = tasks::read(&args.input, args.format).map_err(|e| match e {
        tasks::InputError::Read { .. } => fatal(exit::NO_INPUT, e.to_string()),
        tasks::InputError::NotText { .. } => fatal(exit::BAD_INPUT, e.to_string()),
    })?;
    let input_name = args.input.display().to_string();
    for bad in input.bad.iter().take(BAD_LINES_SHOWN) {
        eprintln!("keylease batch: {input_name}, {bad}");
    }
    if input.bad.len() > BAD_LINES_SHOWN {
        eprintln!(
            "keylease batch: {input_name}: {} more bad lines",
            input.bad.len() - BAD_LINES_SHOWN
        );
    }
    if !input.bad.is_empty() && !args.skip_invalid {
        return Err(fatal(
            exit::BAD_INPUT,
            format!(
                "{input_name}: {} bad lines: fix them, or run with --skip-invalid to skip them",
                input.bad.len()
            ),
        ));
    }
    if input.tasks.is_empty() {
        // An empty input is skippable like a bad line; one whose every line was bad is not.
        if args.skip_invalid && input.bad.is_empty() {
            eprintln!("keylease batch: warning: {input_name}: no tasks in it; nothing to do");
            return Ok(exit::OK);
        }
        return Err(fatal(
            exit::BAD_INPUT,
            format!("{input_name}: no tasks in it"),
        ));
    }

    let (checkpoint, output) = if args.dry_run {
        (checkpoint::peek(&args.output), None)
    } else {
        let (checkpoint, output) =
            checkpoint::open(&args.output, args.retry_failed).map_err(|e| match e {
                checkpoint::CheckpointError::Held { .. } => fatal(exit::OUTPUT_HELD, e.to_string()),
                _ => fatal(exit::IO, e.to_string()),
            })?;
        (Ok(checkpoint), Some(output))
    };
    let checkpoint = checkpoint.map_err(|e| fatal(exit::IO, e.to_string()))?;
    if let Some(line) = checkpoint.torn_line {
        eprintln!(
            "keylease batch: {}: line {line} was cut short by an earlier run; its task runs again",
            args.output.display()
        );
    }
    let mut tally = Tally {
        bad_lines: input.bad.len(),
        ..Tally::default()
    };
    let pending: Vec<tasks::Task> = input
        .tasks
        .into_iter()
        .filter(|task| {
            if checkpoint.done.contains(&task.id) {
                tally.skipped_done += 1;
                false
            } else if checkpoint.failed.contains(&task.id) && !args.retry_failed {
                tally.skipped_failed += 1;
                false
            } else {
                true
            }
        })
        .collect();

    let pool = Pool::open(&PoolOptions {
        endpoints: args.keylease.clone(),
        token,
        ca_certificate: args.ca_cert.clone(),
        config: args.config.clone(),
        state_dir: args.state_dir.clone(),
        ephemeral: args.ephemeral,
    })
    .await
    .map_err(|e| match e {
        pool::PoolError::Config(_) | pool::PoolError::File { .. } => {
            fatal(exit::USAGE, e.to_string())
        }
        _ => fatal(exit::UNAVAILABLE, e.to_string()),
    })?;
    for notice in &pool.notices {
        eprintln!("keylease batch: note: {notice}");
    }
    let result = run_on(&args, base, pending, &pool, output, &mut tally).await;
    pool.close().await;
    result
}

async fn run_on(
    args: &BatchArgs,
    base: GenerateContentRequest,
    pending: Vec<tasks::Task>,
    pool: &Pool,
    output: Option<Output>,
    tally: &mut Tally,
) -> Result<u8, Fatal> {
    let plan = match pool.status(&args.model, &args.pool).await {
        Ok(status) => Some(Plan::from_status(
            &status,
            keylease_engine::canonical_model(&args.model),
        )),
        Err(pool::PoolError::Client(keylease_client::Error::Refused(status)))
            if status.code() == tonic::Code::Unauthenticated =>
        {
            return Err(fatal(
                exit::NO_PERMISSION,
                format!(
                    "{} does not know this caller ({}): give a worker token in KEYLEASE_TOKEN or --token-file",
                    pool.described,
                    pool.redactor.redact(status.message())
                ),
            ));
        }
        // A worker token may not read the status: the run goes on without a plan.
        Err(error) => {
            eprintln!(
                "keylease batch: no plan: keylease's status cannot be read ({}); the run goes on",
                pool.redactor.redact(&error.to_string())
            );
            None
        }
    };
    if plan.as_ref().is_some_and(|p| p.keys == 0) {
        return Err(fatal(
            exit::UNAVAILABLE,
            format!(
                "{}: no enabled key: configure keys, or set GEMINI_API_KEY_1, GEMINI_API_KEY_2, ...",
                pool.described
            ),
        ));
    }
    // Twice the keys' calls: a task backing off after a provider error holds no key, and the
    // tasks beyond the keys wait in keylease's line, so that no key idles meanwhile.
    let concurrency = args
        .concurrency
        .or(plan.as_ref().map(|p| p.slots.saturating_mul(2)))
        .unwrap_or(8)
        .clamp(1, MAX_CONCURRENCY)
        .min(pending.len().max(1));
    let tokens = average_tokens(&pending, args.system.as_deref(), &base);
    eprintln!(
        "keylease batch: {} tasks to run ({} done before, {} failed before), on {}",
        pending.len(),
        tally.skipped_done,
        tally.skipped_failed,
        pool.described
    );
    if let Some(plan) = &plan {
        eprint!("{}", plan.describe(pending.len(), tokens, concurrency));
    }
    let (Some(mut output), false) = (output, args.dry_run) else {
        return Ok(exit::OK);
    };
    if pending.is_empty() {
        eprintln!("keylease batch: nothing to do");
        return Ok(exit::OK);
    }
    if let Some(0) = plan.as_ref().and_then(|plan| plan.left_today(tokens)) {
        eprintln!(
            "keylease batch: every project has spent today's requests or input tokens for {}: run again after the daily reset (midnight Pacific)",
            args.model
        );
        return Ok(exit::TRY_LATER);
    }
    let mut error_log = match &args.error_log {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| fatal(exit::IO, format!("--error-log {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let gemini = GeminiClient::new(args.gemini_url.clone(), args.call_timeout)
        .map_err(|e| fatal(exit::USAGE, format!("--gemini-url: {e}")))?;
    let runner = Runner {
        keylease: pool.client.clone(),
        gemini,
        model: args.model.clone(),
        pool: args.pool.clone(),
        priority: args
            .priority
            .map_or(pb::Priority::Unspecified, Priority::to_pb),
        base,
        system: args.system.clone(),
        json: args.json,
        max_retries: args.max_retries,
        task_timeout: args.task_timeout,
        call_timeout: args.call_timeout,
        backoff: args
            .backoff
            .unwrap_or(keylease_client::gemini::RetryPolicy::default().backoff),
        lease_ttl: args.lease_ttl,
        redactor: pool.redactor.clone(),
        run_id: run_id(),
    };
    let total = pending.len();
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let (outcomes, mut results) = tokio::sync::mpsc::unbounded_channel();
    let started = crate::clock::now();
    let workers = tokio::spawn(run::run(
        runner,
        pending,
        concurrency,
        counters.clone(),
        stop.clone(),
        outcomes,
    ));
    let bar = report::progress_bar(total, !args.quiet && std::io::stderr().is_terminal());
    let mut interrupts =
        signal(SignalKind::interrupt()).map_err(|e| fatal(exit::IO, e.to_string()))?;
    let mut terminations =
        signal(SignalKind::terminate()).map_err(|e| fatal(exit::IO, e.to_string()))?;
    let mut interrupted = false;
    // A second Ctrl-C: quit now, the tasks in flight dropped.
    let mut abandoned = false;
    let mut write_failure = None;
    loop {
        // SIGINT (Ctrl-C) and SIGTERM alike: the first stops the run, the second quits.
        let next = tokio::select! {
            outcome = results.recv() => outcome,
            _ = interrupts.recv() => None,
            _ = terminations.recv() => None,
        };
        let outcome = match next {
            Some(outcome) => outcome,
            None if results.is_closed() && results.is_empty() => break,
            None if interrupted => {
                abandoned = true;
                break;
            }
            None => {
                interrupted = true;
                stop.cancel();
                bar.suspend(|| eprintln!(
                    "keylease batch: stopping: finishing the {} tasks in flight (Ctrl-C again to quit at once; they run again next time)",
                    counters.active.load(Ordering::Relaxed)
                ));
                continue;
            }
        };
        match outcome {
            Outcome::Finished(row) => {
                if let Err(error) = output.append(&row) {
                    // Nothing more can be kept: stop, and say so.
                    stop.cancel();
                    write_failure.get_or_insert(error.to_string());
                    continue;
                }
                tally.count(&row);
                if row.status == Status::Failed
                    && let Some(error) = &row.error
                {
                    log_error(&mut error_log, &row.id, row.attempts, error, true);
                }
                bar.inc(1);
            }
            Outcome::Retrying { id, attempt, error } => {
                log_error(&mut error_log, &id, attempt, &error, false);
            }
            Outcome::Left {
                id,
                reason,
                attempts,
            } => {
                tally.attempts += u64::from(attempts);
                let error = RowError {
                    class: "left".into(),
                    message: reason.clone(),
                };
                log_error(&mut error_log, &id, attempts, &error, false);
                if !tally.left_because.contains(&reason) {
                    tally.left_because.push(reason);
                }
            }
        }
        bar.set_message(report::progress_message(
            counters.active.load(Ordering::Relaxed),
            counters.queued.load(Ordering::Relaxed),
            tally.failed,
        ));
    }
    if !abandoned {
        let _ = workers.await;
    }
    bar.finish_and_clear();
    let _ = output.sync();
    tally.left = total.saturating_sub(tally.ok + tally.failed);
    let theoretical = plan.as_ref().and_then(|p| p.theoretical_rate(tokens));
    eprint!("{}", tally.summary(started.elapsed(), theoretical));
    if !abandoned
        && !tally.per_key.is_empty()
        && let Ok(status) = pool.status(&args.model, &args.pool).await
    {
        eprint!("{}", report::key_records(&status, &tally.per_key));
    }
    if abandoned {
        // Without waiting for the calls in flight nor closing keylease gracefully: what they
        // held is in the store already, and their leases expire as a killed run's do.
        std::process::exit(exit::INTERRUPTED.into());
    }
    if let Some(reason) = write_failure {
        return Err(fatal(
            exit::IO,
            format!("the output cannot be written: {reason}"),
        ));
    }
    Ok(if interrupted {
        exit::INTERRUPTED
    } else if tally.left > 0 {
        exit::TRY_LATER
    } else if tally.failed > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}

/// A name for this run, unlike another's: the process id and the time it started.
fn run_id() -> String {
    let nanos = crate::clock::since_epoch().subsec_nanos();
    format!("batch-{:x}{:08x}", std::process::id(), nanos)
}

/// The generation settings every task is sent with.
fn request_settings(args: &BatchArgs) -> Result<GenerateContentRequest, Fatal> {
    let bounded = |name: &str, value: Option<f64>, max: f64| match value {
        Some(v) if !(0.0..=max).contains(&v) => Err(fatal(
            exit::USAGE,
            format!("--{name}: {v} is not between 0 and {max}"),
        )),
        _ => Ok(()),
    };
    bounded("temperature", args.temperature, 2.0)?;
    bounded("top-p", args.top_p, 1.0)?;
    let extra = match &args.generation_config {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(fatal(exit::USAGE, "--generation-config: not a JSON object"));
            }
            Err(e) => return Err(fatal(exit::USAGE, format!("--generation-config: {e}"))),
        },
    };
    let config = GenerationConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_output_tokens: args.max_output_tokens,
        stop_sequences: args.stop_sequences.clone(),
        response_mime_type: args.json_mime.then(|| "application/json".to_string()),
        extra,
        ..GenerationConfig::default()
    };
    let config = serde_json::from_value::<GenerationConfig>(
        serde_json::to_value(&config).expect("serializes"),
    )
    .map_err(|e| fatal(exit::USAGE, format!("--generation-config: {e}")))?;
    let empty = config == GenerationConfig::default();
    Ok(GenerateContentRequest {
        generation_config: (!empty).then_some(config),
        ..GenerateContentRequest::default()
    })
}

/// The tasks' mean input tokens, as keylease estimates them.
fn average_tokens(
    tasks: &[tasks::Task],
    system: Option<&str>,
    base: &GenerateContentRequest,
) -> u64 {
    if tasks.is_empty() {
        return 1;
    }
    let sum: u64 = tasks
        .iter()
        .map(|t| t.request(system, base).estimated_input_tokens())
        .fold(0, u64::saturating_add);
    (sum / tasks.len() as u64).max(1)
}

/// One line of the error log: a failed try, or a task that failed for good.
fn log_error(log: &mut Option<File>, id: &str, attempt: u32, error: &RowError, final_: bool) {
    let Some(file) = log else { return };
    let line = serde_json::json!({
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "id": id,
        "attempt": attempt,
        "class": error.class,
        "message": error.message,
        "final": final_,
    });
    let mut text = line.to_string();
    text.push('\n');
    if let Err(e) = file.write_all(text.as_bytes()) {
        eprintln!("keylease batch: the error log cannot be written ({e}); it is closed");
        *log = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backoff_is_a_duration_up_to_the_most_the_pauses_double_to() {
        assert_eq!(backoff("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(backoff("8s"), Ok(Duration::from_secs(8)));
        let error = backoff("9s").unwrap_err();
        assert!(error.contains("9s is longer than the 8s"), "{error}");
        assert!(backoff("soon").is_err());
    }
}
