//! Calling Gemini (`v1beta`): a thin reqwest client for `generateContent` and
//! `streamGenerateContent?alt=sse` (and any request made elsewhere, for a proxy), the classifier
//! of its error answers, and [`with_lease`], which runs any call under a keylease lease
//! ([`LeasedGemini`] for typed generate calls).

mod batch;
pub mod classify;
mod leased;
mod types;

pub use batch::run_batch;
pub use classify::{Classified, Failure, classify};
pub use leased::{Booking, GenerateError, Generated, LeasedGemini, RetryPolicy, with_lease};
pub use types::*;

use futures_util::{Stream, StreamExt};
use std::collections::VecDeque;
use std::time::Duration;

pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider answered with an error.
    #[error("Gemini answered {status}: {} ({})", .classified.message, .classified.reason)]
    Provider {
        status: u16,
        classified: Classified,
        /// The answer as it came.
        body: String,
    },
    /// No answer: connection failure or timeout.
    #[error("Gemini unreachable: {message}")]
    Transport { message: String, timed_out: bool },
    /// An answer that is not what the API sends.
    #[error("Gemini's answer could not be read: {0}")]
    Decode(String),
}

/// A thin Gemini client. The key goes in `x-goog-api-key`, never in a URL or a log.
#[derive(Clone, Debug)]
pub struct GeminiClient {
    http: reqwest::Client,
    base_url: String,
}

impl GeminiClient {
    /// `base_url`: [`DEFAULT_BASE_URL`], or a proxy or fake in front of it.
    pub fn new(base_url: impl Into<String>, timeout: Duration) -> Result<Self, CallError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| CallError::Transport {
                message: e.to_string(),
                timed_out: false,
            })?;
        Ok(Self {
            http,
            base_url: base_url.into().trim_end_matches('/').to_string(),
        })
    }

    fn url(&self, model: &str, method: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!("{}/v1beta/models/{model}:{method}", self.base_url)
    }

    async fn post(
        &self,
        url: String,
        api_key: &str,
        request: &GenerateContentRequest,
    ) -> Result<reqwest::Response, CallError> {
        let request = self
            .http
            .post(url)
            .header(KEY_HEADER, api_key)
            .json(request);
        answered(request.send().await.map_err(transport)?).await
    }

    /// Sends a request made elsewhere (a proxy's) with `api_key`, where the API wants it:
    /// `x-goog-api-key` on native paths, a bearer token on the OpenAI-compatible ones, never in
    /// the URL. `path_and_query` starts with the version (`v1beta/...`). An error answer comes
    /// back classified, with its body.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        api_key: &str,
        headers: reqwest::header::HeaderMap,
        body: bytes::Bytes,
    ) -> Result<reqwest::Response, CallError> {
        let url = format!(
            "{}/{}",
            self.base_url,
            path_and_query.trim_start_matches('/')
        );
        let mut request = self.http.request(method, url).headers(headers).body(body);
        request = if is_openai_path(path_and_query) {
            request.bearer_auth(api_key)
        } else {
            request.header(KEY_HEADER, api_key)
        };
        answered(request.send().await.map_err(transport)?).await
    }

    /// Reads `model` (or, with none, the first page of the models) with `api_key`: a call that
    /// costs no quota, and that the provider refuses as it would refuse a generation with a
    /// dead key. `Ok` once the provider accepted the key.
    pub async fn check_key(&self, api_key: &str, model: Option<&str>) -> Result<(), CallError> {
        let url = match model {
            Some(model) => {
                let model = model.strip_prefix("models/").unwrap_or(model);
                format!("{}/v1beta/models/{model}", self.base_url)
            }
            None => format!("{}/v1beta/models?pageSize=1", self.base_url),
        };
        let request = self.http.get(url).header(KEY_HEADER, api_key);
        let response = answered(request.send().await.map_err(transport)?).await?;
        // Read to the end, so that the connection serves the next check.
        let _ = response.bytes().await;
        Ok(())
    }

    pub async fn generate_content(
        &self,
        api_key: &str,
        model: &str,
        request: &GenerateContentRequest,
    ) -> Result<GenerateContentResponse, CallError> {
        let response = self
            .post(self.url(model, "generateContent"), api_key, request)
            .await?;
        let body = response.bytes().await.map_err(transport)?;
        serde_json::from_slice(&body).map_err(|e| CallError::Decode(e.to_string()))
    }

    /// The answer as it is generated: one response per server-sent event, usage cumulative
    /// (the last event holds the totals).
    pub async fn stream_generate_content(
        &self,
        api_key: &str,
        model: &str,
        request: &GenerateContentRequest,
    ) -> Result<impl Stream<Item = Result<GenerateContentResponse, CallError>> + use<>, CallError>
    {
        let url = format!("{}?alt=sse", self.url(model, "streamGenerateContent"));
        let response = self.post(url, api_key, request).await?;
        let events = Events {
            bytes: response.bytes_stream(),
            buffer: Vec::new(),
            ready: VecDeque::new(),
            done: false,
        };
        Ok(futures_util::stream::unfold(
            events,
            |mut events| async move {
                loop {
                    if let Some(item) = events.ready.pop_front() {
                        return Some((item, events));
                    }
                    if events.done {
                        return None;
                    }
                    match events.bytes.next().await {
                        // Carriage returns only ever separate lines here: JSON escapes them in text.
                        Some(Ok(chunk)) => {
                            events.buffer.extend(chunk.iter().filter(|&&b| b != b'\r'));
                            events.take_complete();
                        }
                        Some(Err(error)) => {
                            events.done = true;
                            return Some((Err(transport(error)), events));
                        }
                        None => {
                            events.done = true;
                            events.buffer.extend_from_slice(b"\n\n");
                            events.take_complete();
                        }
                    }
                }
            },
        ))
    }
}

/// Server-sent events being read: `data: {json}` blocks separated by blank lines.
struct Events<S> {
    bytes: S,
    buffer: Vec<u8>,
    ready: VecDeque<Result<GenerateContentResponse, CallError>>,
    done: bool,
}

impl<S> Events<S> {
    fn take_complete(&mut self) {
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let data: String = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if !data.is_empty() {
                self.ready.push_back(
                    serde_json::from_str(&data).map_err(|e| CallError::Decode(e.to_string())),
                );
            }
        }
    }
}

/// The header that carries a key on Gemini's native paths.
pub const KEY_HEADER: &str = "x-goog-api-key";

/// Gemini's OpenAI-compatible paths (`v1beta/openai/...`) take the key as a bearer token.
pub fn is_openai_path(path: &str) -> bool {
    path.trim_start_matches('/')
        .split('/')
        .nth(1)
        .is_some_and(|segment| segment == "openai")
}

/// A success as it is; an error answer read and classified.
async fn answered(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(CallError::Provider {
        status,
        classified: classify(status, &body),
        body,
    })
}

/// A transport failure, without the URL.
pub fn transport(error: reqwest::Error) -> CallError {
    let timed_out = error.is_timeout();
    CallError::Transport {
        message: error.without_url().to_string(),
        timed_out,
    }
}
