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
mod prompts;
pub mod responses;
mod verdict;

pub use prompts::estimate_tokens;
use prompts::{batch_texts, openai_inputs, prompt_text};
use verdict::{Verdict, decide};

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
    /// 403 `SERVICE_DISABLED`: the project has not enabled the Generative Language API.
    ServiceDisabled,
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
    /// Streams break off after their first chunk, the connection cut as a network would.
    pub cut_streams: bool,
    /// Pause before each stream chunk after the first, in milliseconds of real time: a long
    /// answer being generated.
    pub stream_pause_ms: u64,
    /// 429s come without details, as `429-no-details.json`: nothing names the limit that was
    /// hit nor its figure (Gemini answers so at times).
    pub bare_429s: bool,
    /// Share of calls, 0 to 1, answered 429 though no limit of the project was reached (Gemini
    /// does so under its own load): the body names the model's requests-per-minute quota at its
    /// true figure (or none, with `bare_429s`), retry in a tenth of the limits' minute. Counted
    /// in [`Counts::injected`], apart from the 429s the limits cause.
    pub rate_limit_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    pub keys: Vec<FakeKey>,
    /// Limits per model, for every project.
    pub models: BTreeMap<String, Limits>,
    /// Limits of one project for one model, replacing the model's.
    #[serde(default)]
    pub projects: BTreeMap<String, BTreeMap<String, Limits>>,
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
    /// Of those, the answers the fault injection made, by status: the rest are what the
    /// limits and the keys' health caused.
    #[serde(default)]
    pub injected: BTreeMap<u16, u64>,
    /// Calls that arrived while another call with the same key was in flight.
    pub overlaps: u64,
    /// Reads of the model listing or of one model (what a health probe sends): no call, so
    /// in neither `by_status` nor `overlaps`.
    #[serde(default)]
    pub probes: u64,
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
            for (status, n) in &counts.injected {
                *all.injected.entry(*status).or_default() += n;
            }
            all.overlaps += counts.overlaps;
            all.probes += counts.probes;
        }
        all
    }
}

struct Inner {
    keys: HashMap<String, FakeKey>,
    models: BTreeMap<String, Limits>,
    projects: BTreeMap<String, BTreeMap<String, Limits>>,
    faults: Faults,
    windows: HashMap<(String, String), Window>,
    in_flight: HashMap<String, u32>,
    stats: Stats,
    /// The query strings of the requests, as they came (the first [`QUERIES_KEPT`]).
    queries: Vec<String>,
    /// xorshift state of the fault injection.
    random: u64,
    next_response: u64,
}

impl Inner {
    /// The limits `project` has for `model` (its own, or the model's for every project); `None`
    /// when the fake does not serve the model.
    fn limits_of(&self, project: &str, model: &str) -> Option<Limits> {
        self.projects
            .get(project)
            .and_then(|models| models.get(model))
            .or_else(|| self.models.get(model))
            .copied()
    }
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
            projects: config.projects,
            faults: config.faults,
            windows: HashMap::new(),
            in_flight: HashMap::new(),
            stats: Stats::default(),
            queries: Vec::new(),
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

    /// The raw query strings of the requests that had one, in arrival order: what a proxy in
    /// front of the fake passed on from its callers.
    pub fn queries_seen(&self) -> Vec<String> {
        self.lock().queries.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Marks a key, by id, leaked, suspended, expired, its project's service disabled, or
    /// healthy again.
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
            .route("/{version}/models/{call}", post(call).get(get_model))
            .route("/{version}/models", get(list_models))
            .route("/v1beta/openai/chat/completions", post(openai_chat))
            .route("/v1beta/openai/embeddings", post(openai_embeddings))
            .route("/_fake/stats", get(stats))
            .route("/_fake/faults", post(set_faults))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                record_query,
            ))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        // Stream chunks go out as they come, as Gemini's do.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
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
/// A prompt containing this is refused (400) with the key it came with quoted in the message,
/// as a careless or malicious upstream might answer: what a proxy passes on must mask it.
pub const ECHO_KEY: &str = "[[echo-key]]";
/// Most request query strings kept for [`FakeGemini::queries_seen`].
const QUERIES_KEPT: usize = 1000;

/// Keeps each request's raw query string, for [`FakeGemini::queries_seen`].
async fn record_query(
    State(fake): State<FakeGemini>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(query) = request.uri().query() {
        let mut inner = fake.lock();
        if inner.queries.len() < QUERIES_KEPT {
            inner.queries.push(query.to_string());
        }
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct CallQuery {
    key: Option<String>,
    alt: Option<String>,
}

/// What a call asked for, once its key and model are known.
enum Method {
    Generate,
    Stream {
        sse: bool,
    },
    CountTokens,
    Embed,
    BatchEmbed,
    /// OpenAI-compatible chat completions, streamed (server-sent events, `[DONE]`) or not.
    Chat {
        stream: bool,
    },
    Embeddings,
}

impl Method {
    fn streams(&self) -> bool {
        matches!(self, Self::Stream { .. } | Self::Chat { stream: true })
    }
}

async fn call(
    State(fake): State<FakeGemini>,
    Path((version, call)): Path<(String, String)>,
    Query(query): Query<CallQuery>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if version != "v1beta" && version != "v1" {
        return json_response(
            StatusCode::NOT_FOUND,
            responses::bad_request(&format!("unknown API version {version}")),
        );
    }
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
        "embedContent" => Method::Embed,
        "batchEmbedContents" => Method::BatchEmbed,
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
    answer(fake, model.to_string(), method, secret, body).await
}

/// OpenAI's shape, on Gemini's compatibility path: the key is a bearer token, the model is in
/// the body.
async fn openai_chat(State(fake): State<FakeGemini>, headers: HeaderMap, body: String) -> Response {
    let stream = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|b| b.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    openai(fake, headers, body, Method::Chat { stream }).await
}

async fn openai_embeddings(
    State(fake): State<FakeGemini>,
    headers: HeaderMap,
    body: String,
) -> Response {
    openai(fake, headers, body, Method::Embeddings).await
}

async fn openai(fake: FakeGemini, headers: HeaderMap, body: String, method: Method) -> Response {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let model = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|b| b.get("model").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let model = model.strip_prefix("models/").unwrap_or(&model).to_string();
    answer(fake, model, method, secret, body).await
}

/// The key a read of the listing or of one model came with, counted as a probe, or the
/// answer (status, body) Gemini gives such a read instead: no key, an unknown key, or the
/// key's ill health.
fn probed_key(
    fake: &FakeGemini,
    headers: &HeaderMap,
    query: CallQuery,
) -> Result<FakeKey, (StatusCode, &'static str)> {
    let secret = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(query.key);
    let mut inner = fake.lock();
    let Some(secret) = secret else {
        return Err((StatusCode::FORBIDDEN, responses::UNREGISTERED));
    };
    let Some(key) = inner.keys.get(&secret).cloned() else {
        return Err((StatusCode::BAD_REQUEST, responses::API_KEY_INVALID));
    };
    let stats = &mut inner.stats;
    for counts in [
        stats.keys.entry(key.id.clone()).or_default(),
        stats.projects.entry(key.project.clone()).or_default(),
    ] {
        counts.probes += 1;
    }
    match verdict::health_answer(key.health) {
        Some(refused) => Err(refused),
        None => Ok(key),
    }
}

/// The models the fake serves, in the listing's shape (one page).
async fn list_models(
    State(fake): State<FakeGemini>,
    headers: HeaderMap,
    Query(query): Query<CallQuery>,
) -> Response {
    if let Err((status, body)) = probed_key(&fake, &headers, query) {
        return raw_response(status, body, false);
    }
    let models: Vec<Value> = fake
        .lock()
        .models
        .keys()
        .map(|name| responses::model_entry(name))
        .collect();
    json_response(StatusCode::OK, serde_json::json!({ "models": models }))
}

/// One model (`models.get`): what a health probe asks, costing no quota.
async fn get_model(
    State(fake): State<FakeGemini>,
    Path((_version, model)): Path<(String, String)>,
    Query(query): Query<CallQuery>,
    headers: HeaderMap,
) -> Response {
    let key = match probed_key(&fake, &headers, query) {
        Ok(key) => key,
        Err((status, body)) => return raw_response(status, body, false),
    };
    let served = fake.lock().limits_of(&key.project, &model).is_some();
    if served {
        json_response(StatusCode::OK, responses::model_entry(&model))
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            responses::model_not_found(&model, "models.get"),
        )
    }
}

/// Decides and answers one call: key, limits, faults, then the answer in its method's shape.
async fn answer(
    fake: FakeGemini,
    model: String,
    method: Method,
    secret: Option<String>,
    body: String,
) -> Response {
    let model = model.as_str();
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
    let streaming = method.streams();

    // Everything up to the answer is decided at arrival, under the lock, as the provider would.
    let (key_id, response_id, latency, (cut_streams, pause), verdict) = {
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
        if prompt.contains(ECHO_KEY) {
            return json_response(
                StatusCode::BAD_REQUEST,
                responses::bad_request(&format!("API key {secret} may not be used here.")),
            );
        }
        let response_id = inner.next_response;
        inner.next_response += 1;
        let overlapping = {
            let in_flight = inner.in_flight.entry(key.id.clone()).or_default();
            *in_flight += 1;
            *in_flight > 1
        };
        let (verdict, injected) = decide(&fake, &mut inner, &key, model, &method, &prompt, tokens);
        let status = verdict.status();
        let stats = &mut inner.stats;
        for counts in [
            stats.keys.entry(key.id.clone()).or_default(),
            stats.projects.entry(key.project.clone()).or_default(),
        ] {
            *counts.by_status.entry(status.as_u16()).or_default() += 1;
            if injected {
                *counts.injected.entry(status.as_u16()).or_default() += 1;
            }
            counts.overlaps += u64::from(overlapping);
        }
        (
            key.id,
            response_id,
            Duration::from_millis(inner.faults.latency_ms),
            (
                inner.faults.cut_streams,
                Duration::from_millis(inner.faults.stream_pause_ms),
            ),
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
            Method::Embed => json_response(StatusCode::OK, responses::embedding(&prompt)),
            Method::BatchEmbed => {
                let texts = batch_texts(&request);
                json_response(StatusCode::OK, responses::embeddings(&texts))
            }
            Method::Embeddings => json_response(
                StatusCode::OK,
                responses::openai_embeddings(model, &openai_inputs(&request), tokens),
            ),
            Method::Chat { stream: false } => json_response(
                StatusCode::OK,
                responses::openai_chat(model, &prompt, tokens, response_id),
            ),
            Method::Chat { stream: true } => {
                let mut events: Vec<String> =
                    responses::openai_chat_chunks(model, &prompt, tokens, response_id)
                        .iter()
                        .map(|c| format!("data: {c}\n\n"))
                        .collect();
                events.push("data: [DONE]\n\n".into());
                stream_response(events, cut_streams, pause)
            }
            Method::Stream { sse } => {
                let chunks = responses::answer_chunks(model, &prompt, tokens, response_id);
                let events: Vec<String> = if sse {
                    chunks
                        .iter()
                        .map(|c| format!("data: {c}\r\n\r\n"))
                        .collect()
                } else {
                    // Gemini's JSON-array stream: `[{...}`, `\r\n,{...}`, ..., `]`.
                    let last = chunks.len() - 1;
                    chunks
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let open = if i == 0 { "[" } else { "\r\n," };
                            let close = if i == last { "]" } else { "" };
                            format!("{open}{c}{close}")
                        })
                        .collect()
                };
                stream_response(events, cut_streams, pause)
            }
        },
    }
}

/// A stream answered event by event, each its own chunk on the wire, `pause` between them;
/// cut after the first when `cut`, with the connection broken rather than closed.
fn stream_response(events: Vec<String>, cut: bool, pause: Duration) -> Response {
    let count = if cut { 1 } else { events.len() };
    let mut chunks: Vec<Result<String, std::io::Error>> =
        events.into_iter().take(count).map(Ok).collect();
    if cut {
        chunks.push(Err(std::io::Error::other("cut by the fake")));
    }
    let numbered = futures_util::stream::iter(chunks.into_iter().enumerate());
    let paced = futures_util::StreamExt::then(numbered, move |(index, chunk)| async move {
        if index > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        // Separate writes, so that the client sees the stream arrive in parts.
        tokio::task::yield_now().await;
        chunk
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(paced),
    )
        .into_response()
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn fake_with(keys: &[(&str, KeyHealth)]) -> FakeGemini {
        FakeGemini::new(FakeConfig {
            keys: keys
                .iter()
                .map(|&(id, health)| FakeKey {
                    id: id.to_string(),
                    secret: format!("secret-{id}"),
                    project: format!("project-{id}"),
                    health,
                })
                .collect(),
            models: [("m".to_string(), Limits::default())].into(),
            projects: BTreeMap::new(),
            time_scale: 1.0,
            faults: Faults::default(),
            seed: 0,
        })
    }

    /// The status and the error's `reason` (or the model's name) of `GET path` with `key`.
    async fn get(fake: &FakeGemini, path: &str, key: Option<&str>) -> (u16, String) {
        let mut request = Request::get(path);
        if let Some(key) = key {
            request = request.header("x-goog-api-key", key);
        }
        let response = fake
            .router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        let said = body["name"]
            .as_str()
            .or_else(|| body["error"]["details"][0]["reason"].as_str())
            .or_else(|| body["error"]["details"][1]["reason"].as_str())
            .or_else(|| body["error"]["status"].as_str())
            .unwrap_or_default();
        (status, said.to_string())
    }

    #[tokio::test]
    async fn a_read_of_a_model_answers_by_the_keys_health_and_counts_as_a_probe() {
        let fake = fake_with(&[
            ("fine", KeyHealth::Healthy),
            ("leaked", KeyHealth::Leaked),
            ("suspended", KeyHealth::Suspended),
            ("expired", KeyHealth::Expired),
            ("disabled", KeyHealth::ServiceDisabled),
        ]);
        let one = "/v1beta/models/m";
        assert_eq!(
            get(&fake, one, Some("secret-fine")).await,
            (200, "models/m".into())
        );
        assert_eq!(get(&fake, one, Some("secret-leaked")).await.0, 403);
        assert_eq!(
            get(&fake, one, Some("secret-suspended")).await,
            (403, "CONSUMER_SUSPENDED".into())
        );
        assert_eq!(
            get(&fake, one, Some("secret-expired")).await,
            (400, "API_KEY_INVALID".into())
        );
        assert_eq!(
            get(&fake, one, Some("secret-disabled")).await,
            (403, "SERVICE_DISABLED".into())
        );
        assert_eq!(
            get(&fake, one, Some("unknown")).await,
            (400, "API_KEY_INVALID".into())
        );
        assert_eq!(get(&fake, one, None).await.0, 403);
        assert_eq!(
            get(&fake, "/v1beta/models/other", Some("secret-fine")).await,
            (404, "NOT_FOUND".into())
        );
        // The listing answers by health too.
        assert_eq!(
            get(&fake, "/v1beta/models", Some("secret-disabled"))
                .await
                .0,
            403
        );
        assert_eq!(
            get(&fake, "/v1beta/models", Some("secret-fine")).await.0,
            200
        );

        // Probes are counted apart from calls: no status, no overlap.
        let stats = fake.stats();
        assert_eq!(stats.keys["fine"].probes, 3);
        assert_eq!(stats.keys["disabled"].probes, 2);
        assert_eq!(stats.all().probes, 8);
        assert_eq!(stats.all().total(), 0);
        assert_eq!(stats.all().overlaps, 0);

        // A project whose service is enabled again answers at once.
        fake.set_health("disabled", KeyHealth::Healthy);
        assert_eq!(get(&fake, one, Some("secret-disabled")).await.0, 200);
    }
}
