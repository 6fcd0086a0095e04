//! The Gemini-compatible proxy end to end: a real server with `[proxy]`, the fake Gemini
//! upstream, and plain HTTP callers (reqwest) as any SDK would be. Every test runs twice: the
//! proxy leasing in process and over the server's gRPC service ([`on_both_paths`]).

mod support;

use fake_gemini::limits::Limits;
use fake_gemini::{Faults, KeyHealth, RunningFake};
use serde_json::{Value, json};
use std::time::Duration;
use support::{MODEL, TestServer, config_toml, fake_secret, start_fake};

const KEYS: [(&str, &str); 4] = [
    ("k1", "project-a"),
    ("k2", "project-a"),
    ("k3", "project-b"),
    ("k4", "project-c"),
];

fn limits(rpm: u64) -> Limits {
    Limits {
        requests_per_minute: Some(rpm),
        ..Limits::default()
    }
}

/// A server whose proxy calls `fake`, with `extra` configuration.
async fn proxied(fake: &RunningFake, rpm: u64, extra: &str) -> (TestServer, String) {
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n{extra}\n",
        fake.base_url()
    );
    let server = TestServer::start(&config_toml(&KEYS, rpm, &extra)).await;
    let url = server.proxy_url.clone().expect("the proxy runs");
    (server, url)
}

fn generate_body(text: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
}

async fn post(url: &str, token: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("x-goog-api-key", token)
        .json(body)
        .send()
        .await
        .expect("the proxy answers")
}

#[allow(
    clippy::disallowed_methods,
    reason = "how long the proxy made a caller wait, in real time"
)]
fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

async fn live_leases(server: &TestServer) -> u32 {
    let mut client = server.client().await;
    client
        .get_status(keylease::pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .live_leases
}

async fn until_no_lease(server: &TestServer, within: Duration) {
    let deadline = now() + within;
    while live_leases(server).await > 0 {
        assert!(now() < deadline, "a lease was still held after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn every_served_call_answers_as_gemini_would() {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let (server, url) = proxied(&fake, 1000, "").await;
    let base = format!("{url}/v1beta/models/{MODEL}");

    let answer = post(
        &format!("{base}:generateContent"),
        "any",
        &generate_body("Hello"),
    )
    .await;
    assert_eq!(answer.status(), 200);
    let served_by = answer.headers()["x-keylease-key-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(KEYS.iter().any(|(id, _)| *id == served_by), "{served_by}");
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(
        answer["candidates"][0]["content"]["parts"][0]["text"],
        "echo: Hello"
    );

    let sse = post(
        &format!("{base}:streamGenerateContent?alt=sse"),
        "any",
        &generate_body("Streamed"),
    )
    .await;
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let text = sse.text().await.unwrap();
    assert_eq!(text.matches("data: ").count(), 2, "{text}");
    assert!(text.contains("Streamed"), "{text}");

    let array = post(
        &format!("{base}:streamGenerateContent"),
        "any",
        &generate_body("In an array"),
    )
    .await;
    let chunks: Vec<Value> = array.json().await.expect("the JSON-array stream parses");
    assert_eq!(chunks.len(), 2);

    let counted: Value = post(
        &format!("{base}:countTokens"),
        "any",
        &generate_body("abcdefgh"),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(counted["totalTokens"], 2);

    let embedded: Value = post(
        &format!("{base}:embedContent"),
        "any",
        &json!({"content": {"parts": [{"text": "embed me"}]}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(embedded["embedding"]["values"].as_array().unwrap().len(), 4);
    let batch: Value = post(
        &format!("{base}:batchEmbedContents"),
        "any",
        &json!({"requests": [
            {"model": format!("models/{MODEL}"), "content": {"parts": [{"text": "one"}]}},
            {"model": format!("models/{MODEL}"), "content": {"parts": [{"text": "two"}]}},
        ]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(batch["embeddings"].as_array().unwrap().len(), 2);

    let http = reqwest::Client::new();
    let listing: Value = http
        .get(format!("{url}/v1beta/models?key=any"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listing["models"][0]["name"], format!("models/{MODEL}"));
    let model: Value = http
        .get(format!("{url}/v1/models/{MODEL}"))
        .header("x-goog-api-key", "any")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(model["name"], format!("models/{MODEL}"));
    let missing = http
        .get(format!("{url}/v1beta/models/gemini-9"))
        .header("x-goog-api-key", "any")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let chat: Value = http
        .post(format!("{url}/v1beta/openai/chat/completions"))
        .bearer_auth("any")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(chat["choices"][0]["message"]["content"], "echo: Hi there");
    let streamed = http
        .post(format!("{url}/v1beta/openai/chat/completions"))
        .bearer_auth("any")
        .json(&json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed}");
    let embeddings: Value = http
        .post(format!("{url}/v1beta/openai/embeddings"))
        .bearer_auth("any")
        .json(&json!({"model": MODEL, "input": ["a", "b", "c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(embeddings["data"].as_array().unwrap().len(), 3);

    // Counting tokens and listing models used keys but booked no request of the model.
    let stats = fake.fake.stats();
    assert_eq!(stats.unknown_keys, 0, "only leased keys reached Gemini");
    assert_eq!(stats.all().overlaps, 0);
    let mut client = server.client().await;
    let status = client
        .get_status(keylease::pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let booked: u64 = status
        .quota_groups
        .iter()
        .map(|g| g.requests_per_minute.as_ref().map_or(0, |u| u.used))
        .sum();
    // generate, two streams, embed, batch embed, chat twice, embeddings: 8.
    assert_eq!(booked, 8, "{:?}", status.quota_groups);
    until_no_lease(&server, Duration::from_secs(5)).await;

    // Each answer counted by call and status.
    let scrape = http
        .get(&server.metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (call, code, count) in [
        ("generate", 200, 1),
        ("stream", 200, 2),
        ("openai_chat", 200, 2),
        ("list_models", 200, 1),
        ("get_model", 404, 1),
    ] {
        let line = scrape
            .lines()
            .find(|line| {
                line.starts_with("keylease_proxy_requests_total{")
                    && line.contains(&format!("call=\"{call}\""))
                    && line.contains(&format!("code=\"{code}\""))
            })
            .unwrap_or_else(|| panic!("no {call} {code} in {scrape}"));
        assert!(line.ends_with(&format!(" {count}")), "{line}");
    }
}

async fn bad_requests_get_geminis_4xx_naming_the_problem_and_unserved_endpoints_501() {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let (_server, url) = proxied(&fake, 1000, "max_body = 2048").await;
    let http = reqwest::Client::new();
    let send = |path: &str, body: String| {
        http.post(format!("{url}{path}"))
            .header("x-goog-api-key", "any")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let error_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("Gemini's error format");
        assert_eq!(body["error"]["code"], status);
        (
            status,
            body["error"]["message"].as_str().unwrap().to_string(),
        )
    };
    let generate = format!("/v1beta/models/{MODEL}:generateContent");

    let (status, message) = error_of(send(&generate, "{not json".into()).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(message.contains("not JSON"), "{message}");

    let big = generate_body(&"x".repeat(4096)).to_string();
    let (status, message) = error_of(send(&generate, big).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(message.contains("over 2048 bytes"), "{message}");

    let (status, message) = error_of(
        send(
            "/v1beta/models/gemini-0-unknown:generateContent",
            generate_body("x").to_string(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("gemini-0-unknown"), "{message}");

    let (status, message) = error_of(
        send(
            "/v1beta/openai/chat/completions",
            "{\"messages\": []}".into(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("no model"), "{message}");

    // Real Gemini endpoints keylease does not serve: 501.
    for path in [
        "/upload/v1beta/files",
        "/v1beta/files",
        "/v1beta/cachedContents",
        "/v1beta/batches",
        &format!("/v1beta/models/{MODEL}:batchGenerateContent"),
    ] {
        let (status, message) = error_of(send(path, "{}".into()).await.unwrap()).await;
        assert_eq!(status, 501, "{path}");
        assert!(message.contains(path), "{message}");
    }
    // A client's mistakes are 4xx: an unknown path 404, a wrong method 405 naming the right one.
    for path in [
        "/v1beta/nowhere",
        "/v3/models/m:generateContent",
        "/",
        &format!("/v1beta/models/{MODEL}:frobnicate"),
    ] {
        let (status, message) = error_of(send(path, "{}".into()).await.unwrap()).await;
        assert_eq!(status, 404, "{path}: {message}");
    }
    let wrong_method = http.get(format!("{url}{generate}")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let (_, message) = error_of(wrong_method).await;
    assert!(message.contains("takes POST"), "{message}");
    // A deadline under a millisecond is a bad header, not a 504.
    let tiny = http
        .post(format!("{url}{generate}"))
        .header("x-goog-api-key", "any")
        .header("x-server-timeout", "1e-300")
        .json(&generate_body("x"))
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(tiny).await;
    assert_eq!(status, 400);
    assert!(message.contains("x-server-timeout"), "{message}");
    // Still serving.
    let ok = send(&generate, generate_body("after all that").to_string())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

async fn callers_authenticate_with_worker_tokens_that_never_go_upstream() {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let token = "kl_worker_token_for_the_proxy_test_0001";
    let viewer = "kl_viewer_token_for_the_proxy_test_0002";
    let hex = |t: &str| {
        keylease_server::auth::token_sha256(t)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let tokens = format!(
        "[[server.tokens]]\nname = \"batch\"\nrole = \"worker\"\nsha256 = \"{}\"\n\n[[server.tokens]]\nname = \"dash\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
        hex(token),
        hex(viewer)
    );
    let config = config_toml(&KEYS, 1000, &tokens).replace(
        "[key_sources]",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n[key_sources]",
            fake.base_url()
        ),
    );
    let server = TestServer::start(&config).await;
    let url = server.proxy_url.clone().unwrap();
    let http = reqwest::Client::new();
    let generate = format!("{url}/v1beta/models/{MODEL}:generateContent");
    let body = generate_body("who am I");

    let anonymous = http.post(&generate).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = post(&generate, "kl_not_a_token", &body).await;
    assert_eq!(wrong.status(), 401);
    let text = wrong.text().await.unwrap();
    assert!(!text.contains("kl_not_a_token"), "{text}");
    let as_viewer = post(&generate, viewer, &body).await;
    assert_eq!(as_viewer.status(), 403);

    let by_header = post(&generate, token, &body).await;
    assert_eq!(by_header.status(), 200);
    let by_query = http
        .post(format!("{generate}?key={token}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    let by_bearer = http
        .post(&generate)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(by_bearer.status(), 200);
    // The fake knows only the real keys: a token sent upstream would count as unknown.
    assert_eq!(fake.fake.stats().unknown_keys, 0);
    assert_eq!(fake.fake.stats().all().status(200), 3);
}

async fn a_leaked_key_is_dropped_after_its_first_403_and_the_caller_never_sees_it() {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let (server, url) = proxied(&fake, 1000, "").await;
    assert!(fake.fake.set_health("k3", KeyHealth::Leaked));
    let generate = format!("{url}/v1beta/models/{MODEL}:generateContent");
    for i in 0..20 {
        let answer = post(&generate, "any", &generate_body(&format!("call {i}"))).await;
        assert_eq!(answer.status(), 200, "call {i}");
        assert_ne!(answer.headers()["x-keylease-key-id"], "k3");
    }
    let stats = fake.fake.stats();
    assert_eq!(stats.keys["k3"].status(403), 1, "{stats:?}");
    let mut client = server.client().await;
    let status = client
        .get_status(keylease::pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let k3 = status.keys.iter().find(|k| k.key_id == "k3").unwrap();
    assert_eq!(k3.state, keylease::pb::KeyState::Disabled as i32);
    let secret = fake_secret("k3");
    assert!(!k3.disabled_reason.contains(&secret));
}

async fn provider_trouble_is_retried_unseen_by_the_caller() {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let (_server, url) = proxied(&fake, 1000, "").await;
    fake.fake.set_faults(Faults {
        error_rate: 0.3,
        status: 503,
        ..Faults::default()
    });
    let generate = format!("{url}/v1beta/models/{MODEL}:generateContent");
    for i in 0..20 {
        let answer = post(&generate, "any", &generate_body(&format!("call {i}"))).await;
        assert_eq!(answer.status(), 200, "call {i}");
    }
    assert!(
        fake.fake.stats().all().status(503) > 0,
        "the fault was injected"
    );
}

async fn without_a_key_in_time_the_caller_gets_geminis_429_with_retry_info() {
    let fake = start_fake(&KEYS, limits(2), 1.0).await;
    let (_server, url) = proxied(&fake, 2, "wait = \"3s\"").await;
    let generate = format!("{url}/v1beta/models/{MODEL}:generateContent");
    // Three projects at two a minute: six calls, then none for a while.
    for i in 0..6 {
        let answer = post(&generate, "any", &generate_body(&format!("call {i}"))).await;
        assert_eq!(answer.status(), 200, "call {i}");
    }
    let started = now();
    let refused = post(&generate, "any", &generate_body("one more")).await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "it waited [proxy] wait"
    );
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=90).contains(&retry_after), "{retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(
        body["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.RetryInfo"
    );
    // The SDK's own deadline shortens the wait.
    let started = now();
    let short = reqwest::Client::new()
        .post(&generate)
        .header("x-goog-api-key", "any")
        .header("x-server-timeout", "0.2")
        .json(&generate_body("hurry"))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(short.status().as_u16(), 429 | 504),
        "{}",
        short.status()
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "X-Server-Timeout cut the wait short"
    );
    // Nothing reached Gemini beyond what the limits allowed.
    assert_eq!(fake.fake.stats().all().status(429), 0);
}

/// One key, leases of 600 ms, and a fake that answers after `latency_ms`: the generate URL.
async fn one_slow_key(latency_ms: u64) -> (RunningFake, TestServer, String) {
    let fake = start_fake(&KEYS[..1], limits(1000), 1.0).await;
    let extra = "[leases]\ndefault_ttl = \"600ms\"\nmax_ttl = \"10s\"\n";
    let (server, url) = proxied(&fake, 1000, extra).await;
    fake.fake.set_faults(Faults {
        latency_ms,
        ..Faults::default()
    });
    let generate = format!("{url}/v1beta/models/{MODEL}:generateContent");
    (fake, server, generate)
}

async fn a_call_longer_than_the_lease_ttl_is_renewed_and_never_overlaps() {
    let (fake, server, generate) = one_slow_key(1500).await;
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let generate = generate.clone();
            tokio::spawn(async move {
                post(&generate, "any", &generate_body(&format!("slow {i}")))
                    .await
                    .status()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let stats = fake.fake.stats();
    assert_eq!(
        stats.all().overlaps,
        0,
        "one key, three slow calls, one at a time"
    );
    assert_eq!(stats.all().status(200), 3);
    until_no_lease(&server, Duration::from_secs(5)).await;
}

/// A server and its proxy in front of a fake with `faults`, and a stream asked of it.
async fn stream_with(faults: Faults, prompt: &str) -> (RunningFake, TestServer, reqwest::Response) {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let (server, url) = proxied(&fake, 1000, "").await;
    fake.fake.set_faults(faults);
    let answer = post(
        &format!("{url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"),
        "any",
        &generate_body(prompt),
    )
    .await;
    (fake, server, answer)
}

async fn a_stream_cut_midway_ends_with_an_error_event_and_frees_its_key() {
    let cut = Faults {
        cut_streams: true,
        ..Faults::default()
    };
    let (fake, server, answer) = stream_with(cut, "cut me").await;
    let text = answer.text().await.unwrap();
    let text = text.replace('\r', "");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].contains("echo: "), "{text}");
    assert!(events[1].contains("\"error\""), "{text}");
    // Once started, a stream is not retried: one upstream call.
    assert_eq!(fake.fake.stats().all().total(), 1);
    until_no_lease(&server, Duration::from_secs(5)).await;
}

async fn a_caller_that_hangs_up_midstream_releases_the_lease_at_once() {
    let slow = Faults {
        stream_pause_ms: 60_000,
        ..Faults::default()
    };
    let (_fake, server, mut answer) = stream_with(slow, "hang up on me").await;
    let first = answer.chunk().await.unwrap().expect("the first chunk");
    assert!(String::from_utf8_lossy(&first).contains("echo: "));
    assert_eq!(live_leases(&server).await, 1, "held while the stream runs");
    drop(answer);
    // Well before the next chunk would come.
    until_no_lease(&server, Duration::from_secs(5)).await;
}

async fn a_call_stops_when_its_lease_ends_under_it() {
    let (_fake, server, generate) = one_slow_key(5_000).await;
    let started = now();
    let call = tokio::spawn(async move { post(&generate, "any", &generate_body("slow")).await });
    while live_leases(&server).await == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An operator takes the key away: its lease ends, and the key must not stay in use.
    let mut admin = keylease::pb::key_admin_client::KeyAdminClient::connect(server.address.clone())
        .await
        .unwrap();
    admin
        .disable_key(keylease::pb::DisableKeyRequest {
            key_id: "k1".into(),
            reason: "rotated out".into(),
        })
        .await
        .unwrap();
    let answer = call.await.unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("ended"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(4_500),
        "the call was cut when the lease ended, not when Gemini answered"
    );
}

/// However a caller spells `key` in the query (case, percent-encoding, duplicates, `;`), its
/// token goes nowhere upstream: the proxy sends only the parameters a call takes, encoded anew.
/// What the proxy answers for itself never quotes a token or key the caller put in the path,
/// and a provider that echoes the leased key in an error has it masked on the way back.
async fn no_spelling_of_key_sends_the_callers_token_upstream_and_nothing_echoes_a_secret() {
    let fake = start_fake(&KEYS, limits(1000), 1.0).await;
    let (_server, url) = proxied(&fake, 1000, "").await;
    let token = "kl_query_token_for_the_proxy_test_0003";
    let http = reqwest::Client::new();
    let generate = format!("{url}/v1beta/models/{MODEL}:generateContent");
    let stream = format!("{url}/v1beta/models/{MODEL}:streamGenerateContent");
    for query in [
        format!("key={token}"),
        format!("k%65y={token}"),
        format!("%6B%65%79={token}"),
        format!("%6b%65%79={token}"),
        format!("KEY={token}"),
        format!("Key={token}"),
        format!("key={token}&key={token}"),
        format!("key;={token}"),
        format!("x=1;key={token}"),
        format!("key%3D{token}"),
        format!("alt=json&key={token}&%6B%65%79={token}"),
    ] {
        let answer = http
            .post(format!("{generate}?{query}"))
            .header("x-goog-api-key", token)
            .json(&generate_body("q"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{query}");
        let answer = http
            .post(format!("{stream}?alt=sse&{query}"))
            .header("x-goog-api-key", token)
            .json(&generate_body("q"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{query}");
        let _ = answer.text().await.unwrap();
    }
    let queries = fake.fake.queries_seen();
    assert!(!queries.is_empty(), "the streams' alt=sse went upstream");
    assert!(queries.iter().all(|q| q == "alt=sse"), "{queries:?}");

    // The proxy's own answers mask the caller's token and anything key-shaped it quotes.
    let secret = fake_secret("k1");
    for path in [
        format!("/v1beta/{token}/{secret}"),
        format!("/v1beta/models/{secret}"),
    ] {
        let answer = http
            .post(format!("{url}{path}"))
            .header("x-goog-api-key", token)
            .json(&generate_body("q"))
            .send()
            .await
            .unwrap();
        assert!(
            answer.status().is_client_error(),
            "{path}: {}",
            answer.status()
        );
        let text = answer.text().await.unwrap();
        assert!(!text.contains(token) && !text.contains(&secret), "{text}");
    }
    // The provider quotes the key it was called with: the caller gets its answer, masked.
    let answer = http
        .post(&generate)
        .header("x-goog-api-key", token)
        .json(&generate_body(fake_gemini::ECHO_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let text = answer.text().await.unwrap();
    assert!(text.contains("API key AIza…"), "{text}");
    for (id, _) in KEYS {
        assert!(!text.contains(&fake_secret(id)), "{text}");
    }
}

on_both_paths!(
    every_served_call_answers_as_gemini_would,
    bad_requests_get_geminis_4xx_naming_the_problem_and_unserved_endpoints_501,
    callers_authenticate_with_worker_tokens_that_never_go_upstream,
    a_leaked_key_is_dropped_after_its_first_403_and_the_caller_never_sees_it,
    provider_trouble_is_retried_unseen_by_the_caller,
    without_a_key_in_time_the_caller_gets_geminis_429_with_retry_info,
    a_call_longer_than_the_lease_ttl_is_renewed_and_never_overlaps,
    a_stream_cut_midway_ends_with_an_error_event_and_frees_its_key,
    a_caller_that_hangs_up_midstream_releases_the_lease_at_once,
    a_call_stops_when_its_lease_ends_under_it,
    no_spelling_of_key_sends_the_callers_token_upstream_and_nothing_echoes_a_secret,
);
