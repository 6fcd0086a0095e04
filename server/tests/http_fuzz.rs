//! The HTTP request fuzzer: hostile requests to the Gemini-compatible proxy of the real
//! `keylease-server` binary (whose panics abort the process), in front of a fake Gemini that
//! answers every good call. Methods, paths (every route, unserved and unknown ones, traversal,
//! percent-encoding, secrets), queries (every spelling of `key`, `alt`, junk), headers (tokens,
//! `x-server-timeout` extremes, lengths that lie) and bodies (good, broken, too big, nested) are
//! drawn at random and sent raw over TCP. A case fails on a 5xx its input caused (a 501 for an
//! endpoint keylease does not serve, and a 504 for a deadline the caller set, are the answers
//! those inputs ask for), on no answer, or on a planted secret or token in an answer; the run
//! fails on a `panicked` line or a secret in the server's log (at debug), or when it stops
//! serving.

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::io::{Read, Write};
use std::time::Duration;

const MODEL: &str = "gemini-2.5-flash";
const TOKEN: &str = "kl_http_fuzz_worker_token_0123456789";
/// Most bytes a request body may have (configured small, so that "too big" is cheap).
const MAX_BODY: usize = 4096;

fn secret_of(id: &str) -> String {
    format!("AIzaFAKE.httpfuzz-{id}-{}", "0".repeat(24))
}

/// One request, as it goes on the wire.
#[derive(Debug, Clone)]
struct Raw {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The caller set a deadline: a 504 is then the answer it asked for.
    deadline: bool,
    /// Its `Content-Length` says more than it sends: the server must time it out.
    short_body: bool,
}

fn secret_text() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        secret_of("k1"),
        secret_of("k2"),
        TOKEN.to_string(),
        format!("Bearer {TOKEN}"),
        "AIzaSyFAKEfakeFAKEfakeFAKEfakeFAKE012".to_string(),
    ])
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "v1beta".to_string(), "v1".into(), "v2".into(), "upload".into(), "models".into(),
            format!("models/{MODEL}"), format!("{MODEL}:generateContent"),
            format!("{MODEL}:streamGenerateContent"), format!("{MODEL}:countTokens"),
            format!("{MODEL}:embedContent"), format!("{MODEL}:batchEmbedContents"),
            format!("{MODEL}:batchGenerateContent"), "m:frobnicate".into(), "files".into(),
            "cachedContents".into(), "batches".into(), "openai".into(), "chat".into(),
            "completions".into(), "embeddings".into(), "..".into(), ".".into(), "".into(),
            "%2e%2e".into(), "%00".into(), "models%2F..%2Fx".into(), "a:b:c".into(),
        ]),
        1 => secret_text(),
        1 => "[a-zA-Z0-9._~%:-]{0,40}",
        1 => "x{200,400}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            format!("/v1beta/models/{MODEL}:generateContent"),
            format!("/v1beta/models/{MODEL}:streamGenerateContent"),
            format!("/v1/models/{MODEL}:countTokens"),
            "/v1beta/models".to_string(),
            format!("/v1beta/models/{MODEL}"),
            "/v1beta/openai/chat/completions".into(),
            "/v1beta/openai/embeddings".into(),
            "/upload/v1beta/files".into(),
        ]),
        2 => prop::collection::vec(segment(), 0..6).prop_map(|s| format!("/{}", s.join("/"))),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let pair = prop_oneof![
        prop::sample::select(vec![
            "alt=sse".to_string(),
            "alt=json".into(),
            "alt=proto".into(),
            "alt=".into(),
            "pageSize=5".into(),
            "=".into(),
            "&&".into(),
            ";".into(),
            "%".into(),
            "%zz".into(),
        ]),
        (
            prop::sample::select(vec![
                "key",
                "KEY",
                "Key",
                "k%65y",
                "%6B%65%79",
                "%6b%65%79",
                "key;",
                "key%3D",
                "alt",
                "x",
            ]),
            secret_text(),
        )
            .prop_map(|(name, value)| format!("{name}={value}")),
        "[a-zA-Z0-9=&;%._-]{0,30}",
    ];
    prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&"))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let generate = |text: String| {
        serde_json::json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
            .to_string()
            .into_bytes()
    };
    prop_oneof![
        4 => prop::sample::select(vec!["hello", "[[echo-key]]", "[[block-prompt]]", ""])
            .prop_map(move |text| generate(text.to_string())),
        1 => secret_text().prop_map(|secret| {
            serde_json::json!({"model": secret, "messages": [{"role": "user", "content": "x"}]})
                .to_string()
                .into_bytes()
        }),
        1 => Just(br#"{"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}], "stream": true}"#.to_vec()),
        1 => Just(b"{not json".to_vec()),
        1 => Just(vec![b'['; 3000]),
        1 => Just(vec![b'x'; MAX_BODY + 10]),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => Just(Vec::new()),
    ]
}

fn header() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        (
            Just("x-server-timeout".to_string()),
            prop::sample::select(vec![
                "1e-300".to_string(),
                "0".into(),
                "-1".into(),
                "0.001".into(),
                "0.05".into(),
                "NaN".into(),
                "inf".into(),
                "1e300".into(),
                "soon".into(),
                "30".into(),
            ])
        ),
        (
            Just("x-keylease-task".to_string()),
            prop_oneof![Just("task".to_string()), "x{300,600}", secret_text(),]
        ),
        (
            Just("x-keylease-pool".to_string()),
            prop_oneof![
                Just("gemini".to_string()),
                Just("nope".to_string()),
                secret_text(),
            ]
        ),
        (Just("authorization".to_string()), secret_text()),
        (Just("x-goog-api-key".to_string()), secret_text()),
        (
            Just("content-type".to_string()),
            prop::sample::select(vec![
                "application/json".to_string(),
                "text/plain".into(),
                "".into(),
            ])
        ),
        (
            Just("accept".to_string()),
            Just("text/event-stream".to_string())
        ),
        (Just("x-junk".to_string()), "[ -~]{0,200}"),
    ]
}

fn request() -> impl Strategy<Value = Raw> {
    (
        prop_oneof![
            6 => Just("POST".to_string()),
            3 => Just("GET".to_string()),
            1 => prop::sample::select(vec![
                "PUT".to_string(), "DELETE".into(), "PATCH".into(), "OPTIONS".into(),
                "HEAD".into(), "BREW".into(),
            ]),
        ],
        path(),
        query(),
        prop::collection::vec(header(), 0..5),
        prop_oneof![3 => Just(Some(TOKEN.to_string())), 1 => Just(None), 1 => secret_text().prop_map(Some)],
        body(),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(method, path, query, mut headers, token, body, short_body)| {
            if let Some(token) = token {
                headers.push(("x-goog-api-key".into(), token));
            }
            let deadline = headers.iter().any(|(name, _)| name == "x-server-timeout");
            Raw {
                method,
                path,
                query,
                headers,
                body,
                deadline,
                short_body,
            }
        })
}

/// Sends `raw` on a new connection; the status and the whole answer, or why there was none.
fn send(address: &str, raw: &Raw) -> Result<(u16, String), String> {
    let mut stream = std::net::TcpStream::connect(address).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let target = if raw.query.is_empty() {
        raw.path.clone()
    } else {
        format!("{}?{}", raw.path, raw.query)
    };
    let mut head = format!(
        "{} {target} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n",
        raw.method
    );
    for (name, value) in &raw.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let length = raw.body.len() + if raw.short_body { 1000 } else { 0 };
    head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    // A refused request may be answered, and the connection closed, before all of it is sent.
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&raw.body);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if answer.is_empty() => return Err(format!("no answer: {e}")),
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", &text[..text.len().min(200)]))?;
    Ok((status, text))
}

fn planted() -> Vec<String> {
    vec![secret_of("k1"), secret_of("k2"), TOKEN.to_string()]
}

#[test]
fn no_http_request_makes_the_proxy_fail_panic_or_leak() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime
        .block_on(fake_gemini::FakeGemini::start(fake_gemini::FakeConfig {
            keys: ["k1", "k2"]
                .iter()
                .map(|id| fake_gemini::FakeKey {
                    id: id.to_string(),
                    secret: secret_of(id),
                    project: format!("p-{id}"),
                    health: fake_gemini::KeyHealth::Healthy,
                })
                .collect(),
            models: [(MODEL.to_string(), Default::default())].into(),
            projects: Default::default(),
            time_scale: 1.0,
            faults: Default::default(),
            seed: 3,
        }))
        .unwrap();
    let hash: String = keylease_server::auth::token_sha256(TOKEN)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut config = format!(
        "[[server.tokens]]\nname = \"fuzzer\"\nrole = \"worker\"\nsha256 = \"{hash}\"\n\n\
         [proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nmax_body = {MAX_BODY}\nwait = \"1s\"\nbody_timeout = \"1s\"\nheader_timeout = \"2s\"\n\n\
         [key_sources]\nenvironment = false\n\n[pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = 100000\n\n",
        fake.base_url()
    );
    for id in ["k1", "k2"] {
        config.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"p-{id}\"\nsecret = \"{}\"\n\n",
            secret_of(id)
        ));
    }
    let dir = support::scratch_dir("http-fuzz");
    let path = dir.join("keylease.toml");
    std::fs::write(&path, config).unwrap();
    let server = support::start(
        path.to_str().unwrap(),
        &[("KEYLEASE_LOG", "info,keylease_server=debug")],
    );
    let address = server.proxy_url().trim_start_matches("http://").to_string();
    let cases = std::env::var("KEYLEASE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let result = runner.run(&request(), |raw| {
        let (status, answer) = send(&address, &raw).map_err(TestCaseError::fail)?;
        *statuses.lock().unwrap().entry(status).or_default() += 1;
        let asked_for = status == 501 || (status == 504 && raw.deadline);
        if status >= 500 && !asked_for {
            return Err(TestCaseError::fail(format!(
                "{status} for {raw:?}:\n{answer}"
            )));
        }
        for secret in planted() {
            if answer.contains(&secret) {
                return Err(TestCaseError::fail(format!(
                    "{secret} in the answer to {raw:?}:\n{answer}"
                )));
            }
        }
        Ok(())
    });
    let output = server.output();
    assert!(
        !output.contains("panicked"),
        "the server panicked:\n{output}"
    );
    if let Err(failure) = result {
        panic!("{failure}\nstatuses so far: {statuses:?}");
    }
    // Still serving, and its log (debug, every proxy error) holds no planted secret.
    let raw = Raw {
        method: "POST".into(),
        path: format!("/v1beta/models/{MODEL}:generateContent"),
        query: String::new(),
        headers: vec![("x-goog-api-key".into(), TOKEN.into())],
        body: br#"{"contents": [{"parts": [{"text": "still there?"}]}]}"#.to_vec(),
        deadline: false,
        short_body: false,
    };
    assert_eq!(send(&address, &raw).unwrap().0, 200);
    let output = server.output();
    for secret in planted() {
        assert!(!output.contains(&secret), "{secret} in the server's log");
    }
    assert!(
        output.contains("the proxy answered with an error"),
        "proxy errors are logged at debug"
    );
    eprintln!("statuses: {statuses:?}");
    let _ = std::fs::remove_dir_all(dir);
}
