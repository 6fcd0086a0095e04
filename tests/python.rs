//! The README's Python example, run against a real server and the fake Gemini: keylease from
//! any language, reporting what a 429 names so that keylease learns the real limit.

mod support;

use fake_gemini::limits::Limits;
use support::*;

fn gemini_at(fake: &fake_gemini::RunningFake) -> Vec<(&'static str, String)> {
    vec![("GEMINI_BASE_URL", fake.base_url())]
}

#[tokio::test]
async fn the_python_example_borrows_calls_and_returns_a_key() {
    let keys = [("k1", "p1")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let fake = start_fake(&keys, Limits::default(), 1.0).await;
    let address = server.address.trim_start_matches("http://").to_string();
    let stdout = run_python_example(address, gemini_at(&fake)).await;
    assert!(stdout.contains("leased k1 of project p1"), "{stdout}");
    // "Say hello": the fake counts 3 prompt tokens, and the release books them.
    assert!(
        stdout.contains("released: True, booked 1 request(s) and 3 input tokens"),
        "{stdout}"
    );
    assert_eq!(fake.fake.stats().all().status(200), 1);
}

#[tokio::test]
async fn the_python_example_reports_the_limit_a_429_names() {
    let keys = [("k1", "p1")];
    let server = TestServer::start(&config_toml(&keys, 100, "")).await;
    let limits = Limits {
        requests_per_minute: Some(2),
        ..Limits::default()
    };
    let fake = start_fake(&keys, limits, 1.0).await;
    // Someone else spent the project's minute.
    let gemini = keylease_client::gemini::GeminiClient::new(
        fake.base_url(),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    for _ in 0..2 {
        gemini
            .generate_content(
                &fake_secret("k1"),
                MODEL,
                &keylease_client::gemini::GenerateContentRequest::text("elsewhere"),
            )
            .await
            .unwrap();
    }
    let address = server.address.trim_start_matches("http://").to_string();
    let stdout = run_python_example(address, gemini_at(&fake)).await;
    assert!(
        stdout.contains(
            "reported FAILURE_KIND_RATE_LIMITED (429; GenerateRequestsPerMinutePerProjectPerModel-FreeTier=2)"
        ),
        "{stdout}"
    );
    let status = server.status().await;
    let group = &status.quota_groups[0];
    let learned = group.requests_per_minute_limit.as_ref().unwrap();
    // The provider named 2 while keylease's books held nothing: the figure is taken (never
    // probed above), and the 429 counts as a bare one does (issue 24): one is no evidence to
    // go below the figure, where the reacting rule held itself to 1.
    assert_eq!(
        (learned.configured, learned.named, learned.learned),
        (100, Some(2), Some(2))
    );
    assert!(
        learned.learned_reason.contains("named by the provider: 2"),
        "{}",
        learned.learned_reason
    );
    assert_eq!(group.last_429.as_ref().unwrap().task_id, "python-job-1");
}
