//! A fake of the Gemini API (`v1beta`) for tests, benchmarks and demos: real HTTP, the real wire
//! format and error bodies. Keys map to projects; it enforces per-project, per-model requests and
//! tokens per minute (a true sliding window) and requests per day itself, on a clock that can be
//! scaled (`time_scale = 60`: a minute lasts a second; delays it reports are real time). It can
//! inject 500/503 answers and latency, and it counts everything it answered, per key and project,
//! including calls that overlapped on one key.
//!
//! - [`limits`]: the sliding windows.
//! - [`responses`]: the bodies, in the shapes of `fixtures/`.
#![forbid(unsafe_code)]

pub mod limits;
pub mod responses;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use limits::{Limits, Window};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How a key answers, whatever the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyHealth {
    #[default]
    Healthy,
    /// 403 "Your API key was reported as leaked".
    Leaked,
    /// 403 `CONSUMER_SUSPENDED`.
    Suspended,
    /// 400 `API_KEY_INVALID`, "API key expired".
    Expired,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeKey {
    /// Name in the statistics (the secret never is).
    pub id: String,
    pub secret: String,
    pub project: String,
    #[serde(default)]
    pub health: KeyHealth,
}

/// Injected provider trouble: a share of calls answered 500 or 503, and latency on every call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Share of calls, 0 to 1, answered with `status`.
    pub error_rate: f64,
    /// 500 or 503.
    pub status: u16,
    /// How long each call takes, in milliseconds of real time.
    pub latency_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    pub keys: Vec<FakeKey>,
    /// Limits per model, for every project.
    pub models: BTreeMap<String, Limits>,
    /// How much faster than real time the limits' minute and day pass.
    #[serde(default = "one")]
    pub time_scale: f64,
    #[serde(default)]
    pub faults: Faults,
    /// Seed of the fault injection's choices, so runs repeat.
    #[serde(default)]
    pub seed: u64,
}

fn one() -> f64 {
    1.0
}

/// What the fake answered, for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Calls that arrived while another call with the same key was in flight.
    pub overlaps: u64,
}

impl Counts {
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.by_status.values().sum()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Per key id.
    pub keys: BTreeMap<String, Counts>,
    /// Per project.
    pub projects: BTreeMap<String, Counts>,
    /// Calls with a key the fake does not know, or none.
    pub unknown_keys: u64,
}

impl Stats {
    pub fn all(&self) -> Counts {
        let mut all = Counts::default();
        for counts in self.projects.values() {
            for (status, n) in &counts.by_status {
                *all.by_status.entry(*status).or_default() += n;
            }
            all.overlaps += counts.overlaps;
        }
        all
    }
}

struct Inner {
    keys: HashMap<String, FakeKey>,
    models: BTreeMap<String, Limits>,
    faults: Faults,
    windows: HashMap<(String, String), Window>,
    in_flight: HashMap<String, u32>,
    stats: Stats,
    /// xorshift state of the fault injection.
    random: u64,
    next_response: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    started: Instant,
    /// The limits' minute, in real time.
    minute: Duration,
    time_scale: f64,
}

/// A handle on a running fake: statistics and fault switches.
#[derive(Clone)]
pub struct FakeGemini {
    shared: Arc<Shared>,
}

impl FakeGemini {
    pub fn new(config: FakeConfig) -> Self {
        let time_scale = if config.time_scale > 0.0 {
            config.time_scale
        } else {
            1.0
        };
        let inner = Inner {
            keys: config
                .keys
                .into_iter()
                .map(|k| (k.secret.clone(), k))
                .collect(),
            models: config.models,
            faults: config.faults,
            windows: HashMap::new(),
            in_flight: HashMap::new(),
            stats: Stats::default(),
            random: config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            next_response: 0,
        };
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                started: now(),
                minute: Duration::from_secs_f64(60.0 / time_scale),
                time_scale,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Marks a key, by id, leaked, suspended, expired or healthy again.
    pub fn set_health(&self, key_id: &str, health: KeyHealth) -> bool {
        let mut inner = self.lock();
        match inner.keys.values_mut().find(|k| k.id == key_id) {
            Some(key) => {
                key.health = health;
                true
            }
            None => false,
        }
    }

    /// The HTTP API: Gemini's routes, plus `/_fake/stats` and `/_fake/faults` for other processes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1beta/models/{call}", post(call))
            .route("/_fake/stats", get(stats))
            .route("/_fake/faults", post(set_faults))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds 127.0.0.1:0 and serves in the background; the address is the base URL to use.
    pub async fn start(config: FakeConfig) -> std::io::Result<RunningFake> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let fake = Self::new(config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fake.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(RunningFake {
            fake,
            address,
            _stop: stop,
            _task: task,
        })
    }
}

/// A fake serving in the background until dropped.
pub struct RunningFake {
    pub fake: FakeGemini,
    pub address: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
    _task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningFake {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }
}

#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    // The fake is its own provider: it keeps real (tokio) time, scaled only in window lengths.
    Instant::now()
}

/// A prompt containing this is blocked (`promptFeedback.blockReason`, no candidates).
pub const BLOCK_PROMPT: &str = "[[block-prompt]]";
/// A prompt containing this gets an answer blocked for safety (`finishReason: SAFETY`).
pub const BLOCK_ANSWER: &str = "[[block-answer]]";

#[derive(Deserialize)]
struct CallQuery {
    key: Option<String>,
    alt: Option<String>,
}

/// What a call asked for, once its key and model are known.
enum Method {
    Generate,
    Stream { sse: bool },
    CountTokens,
}

async fn call(
    State(fake): State<FakeGemini>,
    Path(call): Path<String>,
    Query(query): Query<CallQuery>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some((model, method_name)) = call.split_once(':') else {
        return json_response(
            StatusCode::NOT_FOUND,
            responses::model_not_found(&call, "generateContent"),
        );
    };
    let method = match method_name {
        "generateContent" => Method::Generate,
        "streamGenerateContent" => Method::Stream {
            sse: query.alt.as_deref() == Some("sse"),
        },
        "countTokens" => Method::CountTokens,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                responses::model_not_found(model, method_name),
            );
        }
    };
    let secret = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(query.key);
    let request: Value = match serde_json::from_str(&body) {
        Ok(value) => value,
        Err(error) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                responses::bad_request(&format!("Invalid JSON payload received. {error}")),
            );
        }
    };
    let prompt = prompt_text(&request);
    let tokens = estimate_tokens(&prompt);
    let streaming = matches!(method, Method::Stream { .. });

    // Everything up to the answer is decided at arrival, under the lock, as the provider would.
    let (key_id, response_id, latency, verdict) = {
        let mut inner = fake.lock();
        let Some(secret) = secret else {
            inner.stats.unknown_keys += 1;
            return raw_response(StatusCode::FORBIDDEN, responses::UNREGISTERED, streaming);
        };
        let Some(key) = inner.keys.get(&secret).cloned() else {
            inner.stats.unknown_keys += 1;
            return raw_response(
                StatusCode::BAD_REQUEST,
                responses::API_KEY_INVALID,
                streaming,
            );
        };
        let response_id = inner.next_response;
        inner.next_response += 1;
        let overlapping = {
            let in_flight = inner.in_flight.entry(key.id.clone()).or_default();
            *in_flight += 1;
            *in_flight > 1
        };
        let verdict = decide(&fake, &mut inner, &key, model, &method, &prompt, tokens);
        let status = verdict.status();
        let stats = &mut inner.stats;
        for counts in [
            stats.keys.entry(key.id.clone()).or_default(),
            stats.projects.entry(key.project.clone()).or_default(),
        ] {
            *counts.by_status.entry(status.as_u16()).or_default() += 1;
            counts.overlaps += u64::from(overlapping);
        }
        (
            key.id,
            response_id,
            Duration::from_millis(inner.faults.latency_ms),
            verdict,
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    *fake.lock().in_flight.entry(key_id).or_default() -= 1;

    match verdict {
        Verdict::Raw(status, body) => raw_response(status, body, streaming),
        Verdict::Json(status, body) => {
            let mut response = json_response(status, body);
            if streaming {
                // Errors on the streaming endpoint come as plain JSON labelled as a stream.
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
            }
            response
        }
        Verdict::Answer => match method {
            Method::Generate => json_response(
                StatusCode::OK,
                responses::answer(model, &prompt, tokens, response_id),
            ),
            Method::CountTokens => {
                json_response(StatusCode::OK, serde_json::json!({"totalTokens": tokens}))
            }
            Method::Stream { sse } => {
                let chunks = responses::answer_chunks(model, &prompt, tokens, response_id);
                if sse {
                    let text: String = chunks
                        .iter()
                        .map(|c| format!("data: {c}\r\n\r\n"))
                        .collect();
                    (
                        [(header::CONTENT_TYPE, "text/event-stream")],
                        Body::from(text),
                    )
                        .into_response()
                } else {
                    json_response(StatusCode::OK, Value::Array(chunks))
                }
            }
        },
    }
}

enum Verdict {
    Answer,
    Raw(StatusCode, &'static str),
    Json(StatusCode, Value),
}

impl Verdict {
    fn status(&self) -> StatusCode {
        match self {
            Self::Answer => StatusCode::OK,
            Self::Raw(status, _) | Self::Json(status, _) => *status,
        }
    }
}

fn decide(
    fake: &FakeGemini,
    inner: &mut Inner,
    key: &FakeKey,
    model: &str,
    method: &Method,
    prompt: &str,
    tokens: u64,
) -> Verdict {
    match key.health {
        KeyHealth::Healthy => {}
        KeyHealth::Leaked => return Verdict::Raw(StatusCode::FORBIDDEN, responses::LEAKED),
        KeyHealth::Suspended => return Verdict::Raw(StatusCode::FORBIDDEN, responses::SUSPENDED),
        KeyHealth::Expired => {
            return Verdict::Raw(StatusCode::BAD_REQUEST, responses::API_KEY_EXPIRED);
        }
    }
    let Some(&limits) = inner.models.get(model) else {
        return Verdict::Json(
            StatusCode::NOT_FOUND,
            responses::model_not_found(model, "generateContent"),
        );
    };
    if matches!(method, Method::CountTokens) {
        return Verdict::Answer;
    }
    if inner.faults.error_rate > 0.0 && next_unit(&mut inner.random) < inner.faults.error_rate {
        return match inner.faults.status {
            500 => Verdict::Raw(StatusCode::INTERNAL_SERVER_ERROR, responses::INTERNAL),
            _ => Verdict::Raw(StatusCode::SERVICE_UNAVAILABLE, responses::OVERLOADED),
        };
    }
    let at = now();
    let shared = &fake.shared;
    let scaled_elapsed = at.duration_since(shared.started).as_secs_f64() * shared.time_scale;
    let day = (scaled_elapsed / 86_400.0) as u64;
    let until_tomorrow =
        Duration::from_secs_f64(((day + 1) as f64 * 86_400.0 - scaled_elapsed) / shared.time_scale);
    let window = inner
        .windows
        .entry((key.project.clone(), model.to_string()))
        .or_default();
    if let Err(violation) = window.admit(at, tokens, limits, shared.minute, (day, until_tomorrow)) {
        return Verdict::Json(
            StatusCode::TOO_MANY_REQUESTS,
            responses::quota_exceeded(violation, model),
        );
    }
    // Safety blocks are content decisions: they count against quota like any answer.
    if prompt.contains(BLOCK_PROMPT) {
        return Verdict::Raw(StatusCode::OK, responses::PROMPT_BLOCKED);
    }
    if prompt.contains(BLOCK_ANSWER) {
        return Verdict::Raw(StatusCode::OK, responses::ANSWER_BLOCKED);
    }
    Verdict::Answer
}

/// All text parts of the request's contents, joined.
fn prompt_text(request: &Value) -> String {
    let mut text = String::new();
    if let Some(contents) = request.get("contents").and_then(Value::as_array) {
        for content in contents {
            for part in content
                .get("parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
        }
    }
    text
}

/// Gemini counts about four characters a token.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// A uniform number in [0, 1) from a xorshift state.
fn next_unit(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

fn raw_response(status: StatusCode, body: &'static str, streaming: bool) -> Response {
    let content_type = if streaming {
        "text/event-stream"
    } else {
        "application/json; charset=UTF-8"
    };
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn stats(State(fake): State<FakeGemini>) -> axum::Json<Stats> {
    axum::Json(fake.stats())
}

async fn set_faults(
    State(fake): State<FakeGemini>,
    axum::Json(faults): axum::Json<Faults>,
) -> StatusCode {
    fake.set_faults(faults);
    StatusCode::NO_CONTENT
}
