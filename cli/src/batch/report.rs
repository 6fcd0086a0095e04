//! What the batch tells people: the plan (keys, projects, the pool's limits for the model and
//! the duration they allow), the live progress bar while it runs (drawn only on a terminal), and
//! the summary at the end: totals, the rate achieved against the pool's theoretical rate, use per
//! key and per project, errors by class.

use super::checkpoint::{Row, Status};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keylease::pb;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// What the pool offers the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub model: String,
    /// Enabled keys, and the calls they can carry at once.
    pub keys: usize,
    pub slots: usize,
    pub projects: Vec<ProjectPlan>,
    /// The window per-minute limits count over.
    pub window: Duration,
    /// Keys by state, in the words metrics use (`available`, `checking`, `disabled`, ...).
    pub key_states: BTreeMap<String, usize>,
    /// Each disabled key: who disabled it, and why.
    pub disabled: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProjectPlan {
    pub project: String,
    pub keys: usize,
    pub requests_per_window: Option<u64>,
    pub tokens_per_window: Option<u64>,
    /// Requests the project may still make today; `None`: no daily limit.
    pub left_today: Option<u64>,
    /// Input tokens the project may still send today; `None`: no daily limit.
    pub tokens_left_today: Option<u64>,
    /// A limit configured `auto` and not yet named by Gemini: the figure is only a ceiling.
    pub guessed: bool,
}

impl Plan {
    /// The plan for `model` from keylease's status (asked with that model).
    pub fn from_status(status: &pb::GetStatusResponse, model: &str) -> Self {
        let enabled: Vec<&pb::KeyStatus> = status
            .keys
            .iter()
            .filter(|k| {
                !matches!(
                    pb::KeyState::try_from(k.state),
                    Ok(pb::KeyState::Disabled | pb::KeyState::Draining)
                )
            })
            .collect();
        let mut keys_per_project: BTreeMap<&str, usize> = BTreeMap::new();
        for key in &enabled {
            *keys_per_project.entry(key.project.as_str()).or_default() += 1;
        }
        let projects = keys_per_project
            .into_iter()
            .map(|(project, keys)| {
                let group = status
                    .quota_groups
                    .iter()
                    .find(|g| g.project == project && g.model == model);
                let limit = |usage: Option<&pb::Usage>| usage.map(|u| u.limit).filter(|&l| l > 0);
                let left = |usage: Option<&pb::Usage>| {
                    usage.and_then(|u| (u.limit > 0).then(|| u.limit.saturating_sub(u.used)))
                };
                let guessed = group.is_some_and(|g| {
                    [
                        &g.requests_per_minute_limit,
                        &g.tokens_per_minute_limit,
                        &g.requests_per_day_limit,
                        &g.tokens_per_day_limit,
                    ]
                    .into_iter()
                    .flatten()
                    .any(|l| l.auto && l.named.is_none())
                });
                ProjectPlan {
                    project: project.to_string(),
                    keys,
                    requests_per_window: limit(group.and_then(|g| g.requests_per_minute.as_ref())),
                    tokens_per_window: limit(group.and_then(|g| g.tokens_per_minute.as_ref())),
                    left_today: left(group.and_then(|g| g.requests_per_day.as_ref())),
                    tokens_left_today: left(group.and_then(|g| g.tokens_per_day.as_ref())),
                    guessed,
                }
            })
            .collect();
        let window = status
            .window
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|w| !w.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let mut key_states = BTreeMap::new();
        let mut disabled = Vec::new();
        for key in &status.keys {
            let state = pb::KeyState::try_from(key.state).unwrap_or_default();
            let word = state
                .as_str_name()
                .trim_start_matches("KEY_STATE_")
                .to_lowercase();
            *key_states.entry(word).or_default() += 1;
            if state == pb::KeyState::Disabled {
                let by = match key.disabled_by() {
                    pb::Decider::Operator => "an operator",
                    pb::Decider::Report => "a worker's report",
                    pb::Decider::Check => "a check",
                    pb::Decider::Unspecified => "keylease",
                };
                disabled.push(format!(
                    "{} disabled by {by}: {}",
                    key.key_id, key.disabled_reason
                ));
            }
        }
        Self {
            key_states,
            disabled,
            model: model.to_string(),
            keys: enabled.len(),
            slots: enabled.iter().map(|k| k.max_leases.max(1) as usize).sum(),
            projects,
            window,
        }
    }

    /// Requests a second the limits allow for prompts of `tokens` input tokens; `None` when a
    /// project has no per-minute limit (nothing bounds it but the keys).
    pub fn theoretical_rate(&self, tokens: u64) -> Option<f64> {
        let window = self.window.as_secs_f64();
        let mut rate = 0.0;
        for project in &self.projects {
            let by_requests = project.requests_per_window.map(|r| r as f64 / window);
            let by_tokens = project
                .tokens_per_window
                .map(|t| t as f64 / tokens.max(1) as f64 / window);
            rate += match (by_requests, by_tokens) {
                (Some(r), Some(t)) => r.min(t),
                (Some(r), None) => r,
                (None, Some(t)) => t,
                (None, None) => return None,
            };
        }
        Some(rate)
    }

    /// Requests of `tokens` input tokens the daily limits still allow today; `None` when some
    /// project has no daily limit.
    pub fn left_today(&self, tokens: u64) -> Option<u64> {
        self.projects
            .iter()
            .map(|p| {
                let by_tokens = p.tokens_left_today.map(|t| t / tokens.max(1));
                match (p.left_today, by_tokens) {
                    (Some(r), Some(t)) => Some(r.min(t)),
                    (r, t) => r.or(t),
                }
            })
            .try_fold(0u64, |sum, left| left.map(|l| sum.saturating_add(l)))
    }

    /// The plan for `tasks` tasks of about `tokens` input tokens, for people.
    pub fn describe(&self, tasks: usize, tokens: u64, concurrency: usize) -> String {
        let mut text = String::new();
        let window = humantime::format_duration(self.window);
        let _ = writeln!(
            text,
            "plan: {tasks} tasks of ~{tokens} input tokens on {}, {} keys in {} projects, {concurrency} at once",
            self.model,
            self.keys,
            self.projects.len()
        );
        if self.key_states.len() > 1 || !self.key_states.contains_key("available") {
            let states: Vec<String> = self
                .key_states
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect();
            let _ = writeln!(text, "  keys: {}", states.join(", "));
        }
        for line in &self.disabled {
            let _ = writeln!(text, "  {line}");
        }
        for p in &self.projects {
            let figure = |v: Option<u64>| v.map_or("no limit".to_string(), |v| v.to_string());
            let _ = writeln!(
                text,
                "  {}: {} keys; {} requests and {} tokens per {window}; {} requests and {} tokens left today{}",
                p.project,
                p.keys,
                figure(p.requests_per_window),
                figure(p.tokens_per_window),
                figure(p.left_today),
                figure(p.tokens_left_today),
                if p.guessed {
                    " (auto: ceilings until Gemini names the limits)"
                } else {
                    ""
                }
            );
        }
        match self.theoretical_rate(tokens) {
            Some(rate) if rate > 0.0 => {
                let today = self
                    .left_today(tokens)
                    .map_or(tasks as u64, |l| l.min(tasks as u64));
                let _ = writeln!(
                    text,
                    "  theoretical rate {rate:.2} requests/s: about {} for the {today} the limits allow today",
                    humantime::format_duration(Duration::from_secs(
                        (today as f64 / rate).ceil() as u64
                    ))
                );
                if today < tasks as u64 {
                    let _ = writeln!(
                        text,
                        "  the daily limits leave {} tasks for after the next daily reset (midnight Pacific)",
                        tasks as u64 - today
                    );
                }
            }
            Some(_) => {
                let _ = writeln!(text, "  no project can serve {} now", self.model);
            }
            None => {
                let _ = writeln!(
                    text,
                    "  no per-minute limit is configured: only the keys bound the rate"
                );
            }
        }
        text
    }
}

/// The live bar: hidden when standard error is not a terminal, or when asked.
pub fn progress_bar(total: usize, visible: bool) -> ProgressBar {
    let target = if visible {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total as u64), target);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {rate} ETA {eta}")
            .expect("a valid template")
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}/s", state.per_sec());
                },
            ),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// The bar's message: what is running, waiting and failed.
pub fn progress_message(active: usize, queued: usize, failed: usize) -> String {
    format!("| {active} active, {queued} queued, {failed} failed |")
}

/// What the run did, counted as its lines were written.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: usize,
    pub failed: usize,
    pub left: usize,
    pub skipped_done: usize,
    pub skipped_failed: usize,
    pub bad_lines: usize,
    pub attempts: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Per key id and per project: calls answered.
    pub per_key: BTreeMap<String, usize>,
    pub per_project: BTreeMap<String, usize>,
    pub errors: BTreeMap<String, usize>,
    /// Why tasks were left for a later run, once each.
    pub left_because: Vec<String>,
}

impl Tally {
    pub fn count(&mut self, row: &Row) {
        match row.status {
            Status::Ok => self.ok += 1,
            Status::Failed => self.failed += 1,
        }
        self.attempts += u64::from(row.attempts);
        self.input_tokens = self.input_tokens.saturating_add(row.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(row.output_tokens);
        if let Some(key) = &row.key_id {
            *self.per_key.entry(key.clone()).or_default() += 1;
        }
        if let Some(project) = &row.project {
            *self.per_project.entry(project.clone()).or_default() += 1;
        }
        if let Some(error) = &row.error {
            *self.errors.entry(error.class.clone()).or_default() += 1;
        }
    }

    /// The summary, for people.
    pub fn summary(&self, elapsed: Duration, theoretical: Option<f64>) -> String {
        let mut text = String::new();
        let finished = self.ok + self.failed;
        let rate = finished as f64 / elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(
            text,
            "done: {} ok, {} failed, {} left for a later run, in {}; {} calls, {} input and {} output tokens",
            self.ok,
            self.failed,
            self.left,
            humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64)),
            self.attempts,
            self.input_tokens,
            self.output_tokens
        );
        if self.skipped_done + self.skipped_failed + self.bad_lines > 0 {
            let _ = writeln!(
                text,
                "skipped: {} done before, {} failed before (--retry-failed runs them), {} bad input lines",
                self.skipped_done, self.skipped_failed, self.bad_lines
            );
        }
        match theoretical {
            Some(limit) if limit > 0.0 => {
                let _ = writeln!(
                    text,
                    "rate: {rate:.2} tasks/s, {:.0}% of the pool's theoretical {limit:.2} requests/s",
                    100.0 * rate / limit
                );
            }
            _ => {
                let _ = writeln!(text, "rate: {rate:.2} tasks/s");
            }
        }
        let list = |map: &BTreeMap<String, usize>| {
            map.iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.per_project.is_empty() {
            let _ = writeln!(text, "per project: {}", list(&self.per_project));
            let _ = writeln!(text, "per key: {}", list(&self.per_key));
        }
        if !self.errors.is_empty() {
            let _ = writeln!(text, "errors: {}", list(&self.errors));
        }
        for reason in &self.left_because {
            let _ = writeln!(text, "left: {reason}");
        }
        text
    }
}

/// What keylease's records say of the keys this run used (`used`): calls, failures by kind,
/// latency, a line each.
pub fn key_records(status: &pb::GetStatusResponse, used: &BTreeMap<String, usize>) -> String {
    let shown = |d: &Option<prost_types::Duration>| {
        d.map(|d| {
            humantime::format_duration(Duration::new(
                d.seconds.max(0) as u64,
                d.nanos.max(0) as u32,
            ))
            .to_string()
        })
    };
    let mut text = String::new();
    for key in status.keys.iter().filter(|k| used.contains_key(&k.key_id)) {
        let Some(record) = &key.performance else {
            continue;
        };
        let failures: Vec<String> = record
            .failures
            .iter()
            .map(|f| {
                let kind = pb::FailureKind::try_from(f.kind).unwrap_or_default();
                format!(
                    "{} {}",
                    f.count,
                    kind.as_str_name()
                        .trim_start_matches("FAILURE_KIND_")
                        .to_lowercase()
                )
            })
            .collect();
        let _ = write!(text, "key {}: {} calls", key.key_id, record.calls);
        if !failures.is_empty() {
            let _ = write!(text, ", failed {}", failures.join(", "));
        }
        if let (Some(p50), Some(p90)) = (shown(&record.latency_p50), shown(&record.latency_p90)) {
            let _ = write!(text, "; latency p50 ≤ {p50}, p90 ≤ {p90}");
        }
        if let Some(percent) = record.recent_own_failure_percent.filter(|&p| p > 0) {
            let _ = write!(
                text,
                "; {percent}% of its recent calls failed for its own reasons"
            );
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(rpm: Option<u64>, tpm: Option<u64>, left: Option<u64>) -> ProjectPlan {
        ProjectPlan {
            project: "p".into(),
            keys: 1,
            requests_per_window: rpm,
            tokens_per_window: tpm,
            left_today: left,
            tokens_left_today: None,
            guessed: false,
        }
    }

    #[test]
    fn the_records_of_the_keys_a_run_used_are_a_line_each() {
        let ms = |ms: i32| {
            Some(prost_types::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            })
        };
        let key = |id: &str| pb::KeyStatus {
            key_id: id.into(),
            performance: Some(pb::KeyPerformance {
                calls: 40,
                failures: vec![pb::FailureCount {
                    kind: pb::FailureKind::Timeout as i32,
                    count: 12,
                }],
                latency_p50: ms(256),
                latency_p90: ms(512),
                latency_p99: ms(512),
                recent_own_failure_percent: Some(30),
            }),
            ..Default::default()
        };
        let status = pb::GetStatusResponse {
            keys: vec![key("k1"), key("k2")],
            ..Default::default()
        };
        let used = [("k1".to_string(), 28)].into();
        assert_eq!(
            key_records(&status, &used),
            "key k1: 40 calls, failed 12 timeout; latency p50 ≤ 256ms, p90 ≤ 512ms; 30% of its recent calls failed for its own reasons\n"
        );
    }

    #[test]
    fn the_plan_counts_keys_by_state_and_says_who_disabled_which() {
        let key = |id: &str, state: pb::KeyState| pb::KeyStatus {
            key_id: id.into(),
            project: "p".into(),
            state: state as i32,
            max_leases: 1,
            ..Default::default()
        };
        let mut dead = key("k3", pb::KeyState::Disabled);
        dead.disabled_by = pb::Decider::Check as i32;
        dead.disabled_reason = "leaked: PERMISSION_DENIED".into();
        let status = pb::GetStatusResponse {
            keys: vec![
                key("k1", pb::KeyState::Available),
                key("k2", pb::KeyState::Checking),
                dead,
                key("k4", pb::KeyState::Unchecked),
            ],
            ..Default::default()
        };
        let plan = Plan::from_status(&status, "m");
        assert_eq!(plan.keys, 3, "every key but the disabled one");
        let text = plan.describe(10, 100, 2);
        assert!(
            text.contains("keys: 1 available, 1 checking, 1 disabled, 1 unchecked"),
            "{text}"
        );
        assert!(
            text.contains("k3 disabled by a check: leaked: PERMISSION_DENIED"),
            "{text}"
        );
    }

    #[test]
    fn the_theoretical_rate_sums_each_projects_tighter_limit() {
        let plan = Plan {
            model: "m".into(),
            keys: 3,
            slots: 3,
            projects: vec![
                project(Some(60), None, Some(100)),
                project(Some(120), Some(6_000), Some(50)),
            ],
            window: Duration::from_secs(60),
            key_states: BTreeMap::new(),
            disabled: Vec::new(),
        };
        // 1/s, plus min(2/s, 6000 tokens / 100 per prompt / 60 s = 1/s).
        assert_eq!(plan.theoretical_rate(100), Some(2.0));
        assert_eq!(plan.theoretical_rate(10), Some(3.0));
        assert_eq!(plan.left_today(100), Some(150));
        let text = plan.describe(200, 100, 3);
        assert!(text.contains("theoretical rate 2.00 requests/s"), "{text}");
        assert!(
            text.contains("leave 50 tasks for after the next daily reset"),
            "{text}"
        );
        let unbounded = Plan {
            projects: vec![project(None, None, None)],
            ..plan
        };
        assert_eq!(unbounded.theoretical_rate(100), None);
        assert_eq!(unbounded.left_today(100), None);
    }

    #[test]
    fn tokens_left_today_bound_the_tasks_of_today_as_requests_do() {
        let tokens_only = ProjectPlan {
            tokens_left_today: Some(10_000),
            ..project(Some(60), None, None)
        };
        let both = ProjectPlan {
            tokens_left_today: Some(100_000),
            ..project(Some(60), None, Some(300))
        };
        let plan = Plan {
            model: "m".into(),
            keys: 2,
            slots: 2,
            projects: vec![tokens_only, both],
            window: Duration::from_secs(60),
            key_states: BTreeMap::new(),
            disabled: Vec::new(),
        };
        // 10,000 / 500 = 20 tasks, plus min(300, 100,000 / 500 = 200).
        assert_eq!(plan.left_today(500), Some(220));
        let text = plan.describe(1_000, 500, 2);
        assert!(
            text.contains("no limit requests and 10000 tokens left today"),
            "{text}"
        );
        assert!(
            text.contains("leave 780 tasks for after the next daily reset"),
            "{text}"
        );
    }
}
