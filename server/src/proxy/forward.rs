//! One proxied call: read and check the request, lease a key as the caller, send it upstream
//! (again on another key after a key's failure), and answer with what the provider said. A
//! stream is answered from its first chunk on, holding the lease until it ends; a caller that
//! hangs up drops the stream, which ends the upstream request and releases the lease at once.

use super::estimate::{UsageReader, input_tokens};
use super::reply::ProxyError;
use super::route::{Call, Route, route, valid_model};
use super::{LISTING_TTL, Proxy};
use crate::auth::token_sha256;
use crate::config::tenants::priority_named;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use keylease::pb;
use keylease_client::gemini::{Booking, CallError, KEY_HEADER, RetryPolicy, transport, with_lease};
use keylease_client::lease::Failure;
use keylease_client::{AcquireOptions, KeyLeaseClient, LeaseGuard};
use serde_json::Value;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Names the task of a call: its exclusions and affinity span the calls that share it.
pub const TASK_HEADER: HeaderName = HeaderName::from_static("x-keylease-task");
/// Picks the pool to lease from; the server's default when absent.
pub const POOL_HEADER: HeaderName = HeaderName::from_static("x-keylease-pool");
/// How urgently the call waits for a key, where the server has tenants: `interactive`,
/// `normal` (when absent) or `batch`.
pub const PRIORITY_HEADER: HeaderName = HeaderName::from_static("x-keylease-priority");
/// The tenant the call waits as, where the caller's tenant may name others.
pub const TENANT_HEADER: HeaderName = HeaderName::from_static("x-keylease-tenant");
/// On answers: the id of the key that served the call (never the key).
pub const KEY_ID_HEADER: HeaderName = HeaderName::from_static("x-keylease-key-id");
/// The SDKs' own deadline for the call, in seconds.
const SERVER_TIMEOUT_HEADER: HeaderName = HeaderName::from_static("x-server-timeout");
/// Request headers passed upstream; every other one (the caller's credentials first) stays.
const FORWARDED_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("x-goog-api-client"),
];

/// Answers `request`, and counts the answer by call and status. Every answer of the proxy's
/// own passes the one redaction first, with the caller's token among the secrets it masks, and
/// is logged (masked) at debug.
pub async fn call(proxy: &Arc<Proxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let query = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|Query(pairs)| pairs)
        .map_err(|e| ProxyError::BadRequest(format!("the query string cannot be read: {e}")));
    let token = caller_token(&parts.headers, query.as_deref().unwrap_or_default());
    let read = match query {
        Ok(query) => CheckedCall::read(proxy, parts, body, &query, token.as_deref()).await,
        Err(error) => Err(error),
    };
    let (label, answered) = match read {
        Err(error) => ("unread", Err(error)),
        Ok(call) => {
            let label = call.route.call.label();
            let answered = match call.route.call {
                Call::ListModels | Call::GetModel => call.answer_from_listing(proxy).await,
                _ if call.streams() => call.answer_streaming(proxy).await,
                _ => call.answer_whole(proxy).await,
            };
            (label, answered)
        }
    };
    let response = answered.unwrap_or_else(|error| {
        let error = error.redacted(|text| proxy.redact(text, token.as_deref()));
        tracing::debug!(call = label, %error, "the proxy answered with an error");
        error.into_response()
    });
    if let Some(metrics) = &proxy.metrics {
        metrics.proxied(label, response.status().as_u16());
    }
    response
}

/// A request read and checked: who calls, what for, and what goes upstream.
struct CheckedCall {
    route: Route,
    /// keylease, as the caller.
    keylease: KeyLeaseClient,
    token_hash: [u8; 32],
    /// `Null` for the listing.
    json: Value,
    model: String,
    task_id: String,
    pool: String,
    /// From [`PRIORITY_HEADER`] and [`TENANT_HEADER`].
    priority: pb::Priority,
    tenant: String,
    policy: RetryPolicy,
    upstream: Upstream,
}

impl CheckedCall {
    async fn read(
        proxy: &Proxy,
        parts: axum::http::request::Parts,
        body: Body,
        query: &[(String, String)],
        token: Option<&str>,
    ) -> Result<Self, ProxyError> {
        let alt = query
            .iter()
            .find(|(k, _)| k == "alt")
            .map(|(_, v)| v.as_str());
        let route = route(&parts.method, parts.uri.path(), alt)?;
        let keylease = proxy.client_for(token)?;
        let token_hash = token_sha256(token.unwrap_or_default());

        let max_body = proxy.settings.max_body;
        let body_timeout = proxy.settings.limits.body_timeout;
        let body = tokio::time::timeout(body_timeout, axum::body::to_bytes(body, max_body))
            .await
            .map_err(|_| ProxyError::BodyTimeout(body_timeout))?
            .map_err(|e| {
                if std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                {
                    ProxyError::BadRequest(format!(
                        "the request body is over {max_body} bytes ([proxy] max_body)"
                    ))
                } else {
                    ProxyError::BadRequest(format!("the request body could not be read: {e}"))
                }
            })?;
        let json: Value = if matches!(route.call, Call::ListModels | Call::GetModel) {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ProxyError::BadRequest(format!("the request body is not JSON: {e}")))?
        };
        let model = match &route.model {
            Some(model) => model.clone(),
            None if matches!(route.call, Call::OpenAiChat | Call::OpenAiEmbeddings) => {
                openai_model(&json)?
            }
            None => String::new(),
        };
        let text = |name: &HeaderName| {
            parts
                .headers
                .get(name)
                .map(|v| {
                    v.to_str().map(str::to_string).map_err(|_| {
                        ProxyError::BadRequest(format!("{name}: not valid header text"))
                    })
                })
                .transpose()
        };
        let task_id = text(&TASK_HEADER)?.unwrap_or_else(|| proxy.new_task_id());
        let pool = text(&POOL_HEADER)?.unwrap_or_default();
        let tenant = text(&TENANT_HEADER)?.unwrap_or_default();
        let priority = match text(&PRIORITY_HEADER)? {
            None => pb::Priority::Unspecified,
            Some(name) => priority_named(name.trim())
                .map(crate::wire::priority_to_pb)
                .ok_or_else(|| {
                    ProxyError::BadRequest(format!(
                        "{PRIORITY_HEADER}: {name:?} is not a class: interactive, normal or batch"
                    ))
                })?,
        };
        let deadline = match text(&SERVER_TIMEOUT_HEADER)? {
            None => proxy.settings.timeout,
            Some(seconds) => parse_seconds(&seconds)
                .ok_or_else(|| {
                    ProxyError::BadRequest(format!(
                        "x-server-timeout: {seconds:?} is not a number of seconds"
                    ))
                })?
                .min(proxy.settings.timeout),
        };
        let policy = RetryPolicy {
            call_timeout: deadline,
            deadline,
            key_wait: Some(proxy.settings.wait.min(deadline)),
            ..RetryPolicy::default()
        };
        let upstream = Upstream {
            method: parts.method.clone(),
            path_and_query: upstream_path(parts.uri.path(), &route.call, query),
            headers: forwarded_headers(&parts.headers),
            body,
        };
        Ok(Self {
            route,
            keylease,
            token_hash,
            json,
            model,
            task_id,
            pool,
            priority,
            tenant,
            policy,
            upstream,
        })
    }

    fn streams(&self) -> bool {
        match self.route.call {
            Call::Stream { .. } => true,
            Call::OpenAiChat => self.json.get("stream").and_then(Value::as_bool) == Some(true),
            _ => false,
        }
    }

    fn openai(&self) -> bool {
        matches!(self.route.call, Call::OpenAiChat | Call::OpenAiEmbeddings)
    }

    /// What the answer's usage is read from.
    fn usage_reader(&self) -> UsageReader {
        if self.openai() {
            UsageReader::openai()
        } else {
            UsageReader::gemini()
        }
    }

    fn options(&self) -> AcquireOptions {
        let mut options = AcquireOptions::new(self.task_id.clone(), self.model.clone());
        options.pool = self.pool.clone();
        options.estimated_input_tokens = input_tokens(&self.json).min(keylease::MAX_INPUT_TOKENS);
        options.priority = self.priority;
        options.tenant = self.tenant.clone();
        options
    }

    fn booking(&self) -> Booking {
        if self.route.call.books_request() {
            Booking::Request
        } else {
            Booking::Nothing
        }
    }

    /// What `send` got from upstream on a leased key, with the lease: the one path from a
    /// checked call to an upstream answer, whole or streaming. The caller counts as admitted
    /// from then on.
    async fn leased<T, Fut>(
        &self,
        proxy: &Proxy,
        send: impl FnMut(String) -> Fut,
    ) -> Result<(T, LeaseGuard), ProxyError>
    where
        Fut: Future<Output = Result<T, CallError>>,
    {
        let sent = with_lease(
            &self.keylease,
            &self.policy,
            self.options(),
            self.booking(),
            send,
        )
        .await;
        let answer = answered(sent)?;
        proxy.admitted(self.token_hash);
        Ok(answer)
    }

    /// The whole answer, once it has come; the lease ends with its usage.
    async fn answer_whole(self, proxy: &Proxy) -> Result<Response, ProxyError> {
        let (answer, lease) = self
            .leased(proxy, |key| self.upstream.send_whole(proxy, key))
            .await?;
        let mut usage = self.usage_reader();
        usage.feed(&answer.body);
        let key_id = lease.key_id();
        tracing::debug!(call = ?self.route.call, model = %self.model, key_id, status = %answer.status, "proxied");
        end_lease(lease, usage.prompt_tokens(), None);
        let mut response = (answer.status, answer.body).into_response();
        set_headers(response.headers_mut(), answer.content_type, &key_id);
        Ok(response)
    }

    /// The stream from its first chunk on, under its lease until it ends.
    async fn answer_streaming(self, proxy: &Proxy) -> Result<Response, ProxyError> {
        let (start, lease) = self
            .leased(proxy, |key| self.upstream.send_streaming(proxy, key))
            .await?;
        let key_id = lease.key_id();
        tracing::debug!(call = ?self.route.call, model = %self.model, key_id, status = %start.status, "proxying a stream");
        let relay = Relay {
            first: Some(start.first),
            rest: start.rest,
            lease: Some(lease),
            usage: self.usage_reader(),
            sse: matches!(
                self.route.call,
                Call::Stream { sse: true } | Call::OpenAiChat
            ),
        };
        let mut response = (start.status, Body::from_stream(relay.into_stream())).into_response();
        set_headers(response.headers_mut(), start.content_type, &key_id);
        Ok(response)
    }

    /// `models`, or one model of it, from the listing.
    async fn answer_from_listing(self, proxy: &Proxy) -> Result<Response, ProxyError> {
        let listing = listing(proxy, &self).await?;
        let Some(model) = &self.route.model else {
            return Ok(json_response(StatusCode::OK, listing.to_string()));
        };
        let name = format!("models/{model}");
        listing
            .get("models")
            .and_then(Value::as_array)
            .and_then(|models| {
                models
                    .iter()
                    .find(|m| m.get("name").and_then(Value::as_str) == Some(&name))
            })
            .map(|entry| json_response(StatusCode::OK, entry.to_string()))
            .ok_or_else(|| {
                ProxyError::NotFound(format!(
                    "{name} is not in the model listing of {}",
                    self.route.version
                ))
            })
    }
}

/// The caller's keylease token, wherever its SDK put its API key.
fn caller_token(headers: &HeaderMap, query: &[(String, String)]) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header(KEY_HEADER)
        .map(str::to_string)
        .or_else(|| {
            query
                .iter()
                .find(|(name, _)| name == "key")
                .map(|(_, v)| v.clone())
        })
        .or_else(|| {
            let value = header("authorization")?;
            let (scheme, token) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .filter(|token| !token.is_empty())
}

/// The model an OpenAI-compatible body names.
fn openai_model(body: &Value) -> Result<String, ProxyError> {
    let model = body.get("model").and_then(Value::as_str).ok_or_else(|| {
        ProxyError::BadRequest(
            "the body names no model (\"model\": \"gemini-2.5-flash\", a string)".into(),
        )
    })?;
    let model = model.strip_prefix("models/").unwrap_or(model);
    if !valid_model(model) {
        return Err(ProxyError::BadRequest(format!(
            "model: {model:?} is not a model name"
        )));
    }
    Ok(model.to_string())
}

/// `"60"`, `"12.5"`: at least a millisecond, as no call can be answered sooner.
fn parse_seconds(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.001).then(|| Duration::from_secs_f64(seconds.min(1e9)))
}

/// The path and query sent upstream: the path as routed, and of the query only the parameters
/// the call is known to take, from their decoded names and values, encoded anew, each once (the
/// first, as the route read it). The raw query is never copied: the caller's `key`, in whatever
/// spelling, stays here.
fn upstream_path(path: &str, call: &Call, query: &[(String, String)]) -> String {
    let mut kept = form_urlencoded::Serializer::new(String::new());
    // Only the few names a call takes are remembered: a query of thousands of pairs costs one
    // pass.
    let mut taken: Vec<&str> = Vec::new();
    for (name, value) in query {
        let Some(shape_ok) = call.query_parameter(name) else {
            continue;
        };
        if taken.contains(&name.as_str()) {
            continue;
        }
        taken.push(name);
        if shape_ok(value) {
            kept.append_pair(name, value);
        }
    }
    let kept = kept.finish();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{kept}")
    }
}

fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in &FORWARDED_HEADERS {
        if let Some(value) = headers.get(name) {
            kept.insert(name.clone(), value.clone());
        }
    }
    kept
}

fn set_headers(headers: &mut HeaderMap, content_type: Option<HeaderValue>, key_id: &str) {
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json; charset=UTF-8")),
    );
    if let Ok(value) = HeaderValue::from_str(key_id) {
        headers.insert(KEY_ID_HEADER, value);
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body,
    )
        .into_response()
}

/// A leased call's outcome: the answer and its lease, or what the caller gets instead (a
/// request error the provider answered goes back unchanged).
fn answered<T>(
    sent: Result<(T, LeaseGuard), keylease_client::gemini::GenerateError>,
) -> Result<(T, LeaseGuard), ProxyError> {
    sent.map_err(ProxyError::from_call)
}

/// Ends a lease without keeping the caller waiting: with the answer's prompt tokens (the
/// estimate stands without them), and a failure when the stream broke.
fn end_lease(lease: LeaseGuard, prompt_tokens: Option<u64>, failure: Option<Failure>) {
    if let Some(tokens) = prompt_tokens {
        lease.record_tokens(tokens);
    }
    tokio::spawn(async move {
        let ended = match failure {
            None => lease.release().await,
            Some(failure) => lease.report_failure(failure, None).await.map(drop),
        };
        if let Err(error) = ended {
            tracing::warn!(%error, "ending a proxy lease failed; it will expire");
        }
    });
}

/// What goes upstream, the same on every try.
struct Upstream {
    method: axum::http::Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A whole answer.
struct Whole {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// A stream whose first chunk has come.
struct Started {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    first: Bytes,
    rest: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
}

impl Upstream {
    async fn send(&self, proxy: &Proxy, key: String) -> Result<reqwest::Response, CallError> {
        proxy
            .upstream
            .send_raw(
                self.method.clone(),
                &self.path_and_query,
                &key,
                self.headers.clone(),
                self.body.clone(),
            )
            .await
    }

    /// The whole answer: a failure while it is read is tried again like any other.
    async fn send_whole(&self, proxy: &Proxy, key: String) -> Result<Whole, CallError> {
        let response = self.send(proxy, key).await?;
        let (status, content_type) = (response.status(), content_type(&response));
        let body = response.bytes().await.map_err(transport)?;
        Ok(Whole {
            status,
            content_type,
            body,
        })
    }

    /// Up to the first chunk: a failure before it is tried again on another key.
    async fn send_streaming(&self, proxy: &Proxy, key: String) -> Result<Started, CallError> {
        let response = self.send(proxy, key).await?;
        let (status, content_type) = (response.status(), content_type(&response));
        let mut rest = Box::pin(response.bytes_stream());
        loop {
            match rest.next().await {
                Some(Ok(first)) if first.is_empty() => continue,
                Some(Ok(first)) => {
                    return Ok(Started {
                        status,
                        content_type,
                        first,
                        rest,
                    });
                }
                Some(Err(error)) => return Err(transport(error)),
                None => {
                    return Err(CallError::Decode(
                        "the stream ended before its first chunk".into(),
                    ));
                }
            }
        }
    }
}

fn content_type(response: &reqwest::Response) -> Option<HeaderValue> {
    response.headers().get(header::CONTENT_TYPE).cloned()
}

/// A stream passed to the caller chunk by chunk, under its lease.
struct Relay {
    first: Option<Bytes>,
    rest: Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
    /// Until the stream ends; dropped with the relay when the caller hangs up, which releases it.
    lease: Option<LeaseGuard>,
    usage: UsageReader,
    sse: bool,
}

impl Relay {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        futures_util::stream::unfold(self, |mut relay| async move {
            if let Some(first) = relay.first.take() {
                relay.usage.feed(&first);
                return Some((Ok(first), relay));
            }
            let lease = relay.lease.take()?;
            let next = tokio::select! {
                next = relay.rest.next() => Some(next),
                () = lease.expired() => None,
            };
            match next {
                Some(Some(Ok(chunk))) => {
                    relay.usage.feed(&chunk);
                    relay.lease = Some(lease);
                    Some((Ok(chunk), relay))
                }
                Some(None) => {
                    end_lease(lease, relay.usage.prompt_tokens(), None);
                    None
                }
                Some(Some(Err(error))) => {
                    let failure = Failure {
                        kind: keylease::pb::FailureKind::ServerError,
                        class: keylease::pb::FailureClass::Unspecified,
                        retry_after: None,
                        detail: format!("the stream broke: {}", error.without_url()),
                        violations: Vec::new(),
                    };
                    end_lease(lease, relay.usage.prompt_tokens(), Some(failure));
                    let error = ProxyError::Upstream {
                        status: None,
                        message: "Gemini's stream broke off; the answer is incomplete".into(),
                    };
                    Some((Ok(relay.error_event(&error)), relay))
                }
                None => {
                    let error = ProxyError::Unavailable(
                        "the lease ended (keylease could not renew it) before the stream did"
                            .into(),
                    );
                    drop(lease);
                    Some((Ok(relay.error_event(&error)), relay))
                }
            }
        })
    }

    /// The last thing a broken stream says.
    fn error_event(&self, error: &ProxyError) -> Bytes {
        let body = error.body();
        if self.sse {
            Bytes::from(format!("data: {body}\n\n"))
        } else {
            Bytes::from(format!(",\n{body}]"))
        }
    }
}

/// The model listing of `route.version`, from memory while it is fresh and the caller has had
/// a lease since it was made; else fetched with a lease for the listing model (booking nothing),
/// every page.
async fn listing(proxy: &Proxy, call: &CheckedCall) -> Result<Arc<Value>, ProxyError> {
    {
        let listings = proxy.lock_listings();
        if let Some((made_ms, listing)) = listings.by_version.get(call.route.version)
            && proxy.clock.now_ms().saturating_sub(*made_ms) < LISTING_TTL.as_millis() as u64
            && listings.admitted.contains(&call.token_hash)
        {
            return Ok(listing.clone());
        }
    }
    let model = proxy.settings.listing_model.clone().ok_or_else(|| {
        ProxyError::NotServed(
            "listing models needs a model to lease a key for: set [proxy] listing_model (keylease-proxy --listing-model)".into(),
        )
    })?;
    let mut options = AcquireOptions::new(proxy.new_task_id(), model);
    options.pool = call.pool.clone();
    let version = call.route.version;
    let fetched = with_lease(
        &call.keylease,
        &call.policy,
        options,
        Booking::Nothing,
        |key| async move {
            let mut models = Vec::new();
            let mut page_token = String::new();
            loop {
                let mut path = format!("{version}/models?pageSize=1000");
                if !page_token.is_empty() {
                    path.push_str(&format!("&pageToken={page_token}"));
                }
                let response = proxy
                    .upstream
                    .send_raw(
                        reqwest::Method::GET,
                        &path,
                        &key,
                        HeaderMap::new(),
                        Bytes::new(),
                    )
                    .await?;
                let page: Value = response
                    .json()
                    .await
                    .map_err(|e| CallError::Decode(e.without_url().to_string()))?;
                if let Some(listed) = page.get("models").and_then(Value::as_array) {
                    models.extend(listed.iter().cloned());
                }
                match page.get("nextPageToken").and_then(Value::as_str) {
                    Some(next) if !next.is_empty() && models.len() < 100_000 => {
                        page_token = next
                            .bytes()
                            .filter(u8::is_ascii_alphanumeric)
                            .map(char::from)
                            .collect();
                    }
                    _ => return Ok(serde_json::json!({ "models": models })),
                }
            }
        },
    )
    .await;
    let (listing, lease) = answered(fetched)?;
    end_lease(lease, None, None);
    let listing = Arc::new(listing);
    let now_ms = proxy.clock.now_ms();
    let mut listings = proxy.lock_listings();
    if listings.by_version.get(version).is_none_or(|(made_ms, _)| {
        now_ms.saturating_sub(*made_ms) >= LISTING_TTL.as_millis() as u64
    }) {
        // A new listing: who may read it is learnt again.
        listings.admitted.clear();
    }
    drop(listings);
    proxy.admitted(call.token_hash);
    let mut listings = proxy.lock_listings();
    listings
        .by_version
        .insert(version, (now_ms, listing.clone()));
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query as the proxy reads it: decoded by the same extractor.
    fn decoded(query: &str) -> Vec<(String, String)> {
        let uri: axum::http::Uri = format!("/p?{query}").parse().unwrap();
        Query::try_from_uri(&uri).unwrap().0
    }

    #[test]
    fn the_callers_key_never_goes_upstream() {
        let stream = Call::Stream { sse: true };
        let path = "/v1beta/models/m:streamGenerateContent";
        for query in [
            "alt=sse&key=kl_secret",
            "key=kl_secret&alt=sse",
            "alt=sse&KEY=kl_secret",
            "alt=sse&Key=kl_secret",
            "alt=sse&k%65y=kl_secret",
            "alt=sse&%6B%65%79=kl_secret",
            "alt=sse&%6b%65%79=kl_secret",
            "alt=sse&key=kl_secret&key=kl_secret",
            "alt=sse&key;=kl_secret",
            "alt=sse&key%3Dkl_secret",
            "alt=sse&key=kl%5Fsecret",
            "alt=sse&x=kl_secret",
        ] {
            let sent = upstream_path(path, &stream, &decoded(query));
            assert!(!sent.contains("kl"), "{query} → {sent}");
            assert!(
                sent.starts_with(&format!("{path}?alt=sse")),
                "{query} → {sent}"
            );
        }
        // `;` separates nothing: the first `alt` is `sse;key=…`, not of its shape, so none goes.
        assert_eq!(
            upstream_path(path, &stream, &decoded("alt=sse;key=kl_secret&alt=sse")),
            path
        );
        // Only what a call takes, of its shape.
        assert_eq!(
            upstream_path(
                path,
                &stream,
                &decoded("alt=json&alt=sse%26key%3Dx&alt=sse")
            ),
            format!("{path}?alt=json")
        );
        assert_eq!(
            upstream_path(path, &stream, &decoded("alt=sse%26key%3Dx&alt=sse")),
            path
        );
        assert_eq!(
            upstream_path(
                "/v1beta/models/m:generateContent",
                &Call::Generate,
                &decoded("alt=sse&key=x")
            ),
            "/v1beta/models/m:generateContent"
        );
        assert_eq!(
            upstream_path("/v1beta/models", &Call::ListModels, &[]),
            "/v1beta/models"
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-goog-api-key", HeaderValue::from_static("kl_secret"));
        headers.insert(
            "authorization",
            HeaderValue::from_static("Bearer kl_secret"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let kept = forwarded_headers(&headers);
        assert_eq!(kept.len(), 1);
        assert!(kept.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn the_token_is_read_wherever_an_sdk_puts_its_key() {
        let mut headers = HeaderMap::new();
        assert_eq!(caller_token(&headers, &[]), None);
        let query = [("key".to_string(), "from-query".to_string())];
        assert_eq!(
            caller_token(&headers, &query).as_deref(),
            Some("from-query")
        );
        headers.insert(
            "authorization",
            HeaderValue::from_static("bearer from-bearer"),
        );
        assert_eq!(caller_token(&headers, &[]).as_deref(), Some("from-bearer"));
        headers.insert("x-goog-api-key", HeaderValue::from_static("from-header"));
        assert_eq!(
            caller_token(&headers, &query).as_deref(),
            Some("from-header")
        );
    }

    #[test]
    fn server_timeouts_are_positive_seconds() {
        assert_eq!(parse_seconds("60"), Some(Duration::from_secs(60)));
        assert_eq!(parse_seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("0"), None);
        assert_eq!(parse_seconds("1e-300"), None);
        assert_eq!(parse_seconds("0.0009"), None);
        assert_eq!(parse_seconds("0.001"), Some(Duration::from_millis(1)));
        assert_eq!(parse_seconds("-3"), None);
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(parse_seconds("inf"), None);
    }
}
