//! Prometheus metrics from a real server, scraped over HTTP while it leases: counters of what
//! happened, gauges of what holds, bounded labels, no secret.

mod support;

use keylease::pb;
use support::*;

async fn scrape(server: &TestServer) -> String {
    let response = reqwest::get(&server.metrics_url).await.unwrap();
    assert!(response.status().is_success());
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    response.text().await.unwrap()
}

/// The value of the series `series` (name and labels, as the text shows them).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_scrape_counts_what_happened_and_shows_what_holds() {
    let keys = [("k1", "p1"), ("k2", "p2")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let mut client = server.client().await;
    let first = client.acquire_key(acquire("a")).await.unwrap().into_inner();
    let second = client.acquire_key(acquire("b")).await.unwrap().into_inner();
    client.release(release(&first, 1)).await.unwrap();
    // Two 429s in a row on p2: the second rests it (one alone rests nothing, issue 24).
    let again = pb::AcquireKeyRequest {
        exclude_key_ids: vec!["k1".into()],
        ..acquire("b2")
    };
    let mut refused = second.clone();
    for _ in 0..2 {
        client
            .report_failure(pb::ReportFailureRequest {
                lease_id: refused.lease_id.clone(),
                fencing_token: refused.fencing_token,
                kind: pb::FailureKind::RateLimited as i32,
                detail: format!("429 for key {}", fake_secret("k2")),
                retry_after: seconds(60),
                ..Default::default()
            })
            .await
            .unwrap();
        if let Ok(next) = client.acquire_key(again.clone()).await {
            refused = next.into_inner();
        }
    }
    let held = client.acquire_key(acquire("c")).await.unwrap().into_inner();

    let text = scrape(&server).await;
    let model = format!("model=\"{MODEL}\"");
    assert_eq!(
        value(&text, &format!("keylease_leases_granted_total{{{model}}}")),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("keylease_leases_released_total{{{model}}}")),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "keylease_failures_reported_total{kind=\"rate_limited\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            "keylease_failures_reported_total{kind=\"invalid_key\"}"
        ),
        Some(0.0)
    );
    assert_eq!(value(&text, "keylease_leases_active"), Some(1.0));
    assert_eq!(
        value(&text, "keylease_keys{pool=\"gemini\",state=\"leased\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "keylease_keys{pool=\"gemini\",state=\"cooling_down\"}"
        ),
        Some(1.0)
    );
    let group = format!(
        "pool=\"gemini\",project=\"{}\",model=\"{MODEL}\"",
        held.project
    );
    assert_eq!(
        value(
            &text,
            &format!("keylease_quota_limit{{{group},limit=\"requests_per_minute\"}}")
        ),
        Some(100.0)
    );
    assert!(
        value(
            &text,
            &format!("keylease_quota_used{{{group},limit=\"requests_per_minute\"}}")
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        value(
            &text,
            "keylease_quota_group_cooling{pool=\"gemini\",project=\"p2\",model=\"gemini-2.5-flash\"}"
        ),
        Some(1.0)
    );
    // 429s without a figure are no limit (issue 24: one once taught p2 one request a
    // window): nothing learned, the configured figure as it was.
    let p2 = |name: &str| {
        value(
            &text,
            &format!(
                "{name}{{pool=\"gemini\",project=\"p2\",model=\"{MODEL}\",limit=\"requests_per_minute\"}}"
            ),
        )
    };
    assert_eq!(p2("keylease_quota_learned_limit"), None, "{text}");
    assert_eq!(p2("keylease_quota_limit"), Some(100.0));
    assert!(
        text.contains("keylease_acquire_wait_seconds_bucket"),
        "{text}"
    );
    assert!(value(&text, "keylease_acquire_wait_seconds_count").unwrap() >= 3.0);
    assert!(
        text.contains("# HELP keylease_failures_reported_total"),
        "{text}"
    );
    // Bounded labels only, and never a secret, a task or a key id.
    assert!(!text.contains("AIza"), "{text}");
    let allowed = [
        "pool", "project", "model", "state", "kind", "limit", "role", "le", "quantile",
    ];
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        let labels = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
        for label in labels.split(',') {
            let name = label.split('=').next().unwrap();
            assert!(allowed.contains(&name), "label {name} in {line}");
        }
    }

    // The lease ends: the gauges follow at the next scrape.
    client.release(release(&held, 0)).await.unwrap();
    let text = scrape(&server).await;
    assert_eq!(value(&text, "keylease_leases_active"), Some(0.0));
    assert_eq!(
        value(&text, "keylease_keys{pool=\"gemini\",state=\"leased\"}"),
        Some(0.0)
    );
}

/// A worker inventing model names in a pool that serves any model: past the per-caller bound of
/// names no pool serves yet, it is refused for the minute; its names never become labels, which
/// only configured models and models the provider answered carry.
#[tokio::test]
async fn invented_model_names_are_bounded_per_caller_and_never_labels() {
    // No [pools]: the gemini pool serves any model, every limit auto.
    let config = format!(
        "[key_sources]\nenvironment = false\n\n[[keys]]\nid = \"k1\"\nproject = \"p1\"\nsecret = \"{}\"\n",
        fake_secret("k1")
    );
    // The bound counts by the minute: the clock starts at one's beginning, so that the names
    // below are all asked within it.
    let minute = keylease_server::clock::Clock::system().now().wall_ms / 60_000 * 60_000;
    let clock = keylease_server::clock::Clock::starting_at(minute);
    let server = TestServer::start_on_clock(&config, &[], clock).await;
    let mut client = server.client().await;
    let bound = keylease_server::service::NEW_MODELS_PER_CALLER_PER_MINUTE as usize;
    let mut refused = None;
    for n in 0..bound + 5 {
        let asked = client
            .acquire_key(pb::AcquireKeyRequest {
                model: format!("invented-{n}"),
                ..acquire(&format!("inventor-{n}"))
            })
            .await;
        match asked {
            Ok(lease) => {
                assert!(n < bound, "name {n} was granted past the bound");
                client
                    .release(release(&lease.into_inner(), 0))
                    .await
                    .unwrap();
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                refused.get_or_insert(n);
            }
        }
    }
    assert_eq!(refused, Some(bound));
    // A name leased before is no new name.
    let again = client
        .acquire_key(pb::AcquireKeyRequest {
            model: "invented-3".into(),
            ..acquire("again")
        })
        .await
        .unwrap()
        .into_inner();
    // One the provider answered (a release that sent a request) is a label from then on.
    client.release(release(&again, 1)).await.unwrap();
    let text = scrape(&server).await;
    let invented: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("model=\"invented-") && !l.contains("model=\"invented-3\""))
        .collect();
    assert!(invented.is_empty(), "{invented:?}");
    assert!(
        value(&text, "keylease_leases_granted_total{model=\"other\"}").is_some_and(|v| v >= 30.0),
        "{text}"
    );
    assert!(text.contains("model=\"invented-3\""), "{text}");
}
