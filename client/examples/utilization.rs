//! How much of the provider's limit a fleet gets through keylease, and how many 429s it meets.
//! Runs a keylease server and the fake Gemini in this process, on time scaled so that the
//! provider's minute lasts one second, and keeps `--jobs` jobs calling; the calls answered in
//! `--seconds` after a warm-up are compared with what the limits allow in that time.
//!
//! ```sh
//! cargo run --release -p keylease-client --example utilization -- --seconds 20
//! ```

use clap::Parser;
use fake_gemini::limits::Limits;
use fake_gemini::{FakeConfig, FakeGemini, FakeKey, Faults, KeyHealth};
use keylease_client::gemini::{
    GeminiClient, GenerateContentRequest, Generated, LeasedGemini, RetryPolicy,
};
use keylease_client::{ClientConfig, KeyLeaseClient};
use keylease_server::builder::{GrpcListener, ServerBuilder};
use keylease_server::config::{self, Overrides};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const MODEL: &str = "gemini-2.5-flash";

/// A benchmark measures real elapsed time.
#[allow(clippy::disallowed_methods)]
fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

#[derive(Debug, Parser)]
struct Args {
    /// How long to measure, in real seconds (each a provider minute).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Concurrent jobs.
    #[arg(long, default_value_t = 64)]
    jobs: usize,
    #[arg(long, default_value_t = 12)]
    keys: usize,
    #[arg(long, default_value_t = 5)]
    projects: usize,
    /// Requests per (scaled) minute per project, on both keylease and the fake.
    #[arg(long, default_value_t = 10)]
    rpm: u64,
    /// keylease's safety margin, in milliseconds.
    #[arg(long, default_value_t = 5)]
    margin_ms: u64,
    /// Calls answered in the first seconds are not counted: the measurement is of steady state.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// How long each Gemini call takes, in milliseconds.
    #[arg(long, default_value_t = 5)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let keys: Vec<(String, String, String)> = (0..args.keys)
        .map(|i| {
            (
                format!("k{i}"),
                format!("p{}", i % args.projects),
                format!("AIzaFAKE.utilization-{i:02}-{}", "0".repeat(20)),
            )
        })
        .collect();

    let mut toml = format!(
        "[key_sources]\nenvironment = false\n[quota]\nwindow = \"1s\"\nsafety_margin = \"{}ms\"\n\
         [pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = {}\n",
        args.margin_ms, args.rpm
    );
    for (id, project, secret) in &keys {
        toml.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nproject = \"{project}\"\nsecret = \"{secret}\"\n"
        ));
    }
    let path =
        std::env::temp_dir().join(format!("keylease-utilization-{}.toml", std::process::id()));
    std::fs::write(&path, toml)?;
    // A demo: nothing to keep across runs.
    let ephemeral = Overrides {
        ephemeral: true,
        ..Overrides::default()
    };
    let settings = config::load(Some(&path), &Default::default(), &ephemeral)?;
    std::fs::remove_file(&path)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let keylease_url = format!("http://{}", listener.local_addr()?);
    let server = ServerBuilder::new(Default::default(), settings)
        .build(GrpcListener::Tcp(listener))
        .await?;
    tokio::spawn(server.serve(std::future::pending()));

    let fake = FakeGemini::start(FakeConfig {
        projects: Default::default(),
        keys: keys
            .iter()
            .map(|(id, project, secret)| FakeKey {
                id: id.clone(),
                secret: secret.clone(),
                project: project.clone(),
                health: KeyHealth::Healthy,
            })
            .collect(),
        models: [(
            MODEL.to_string(),
            Limits {
                requests_per_minute: Some(args.rpm),
                ..Limits::default()
            },
        )]
        .into(),
        time_scale: 60.0,
        faults: Faults {
            latency_ms: args.latency_ms,
            ..Faults::default()
        },
        seed: 1,
    })
    .await?;

    let calls = LeasedGemini::new(
        KeyLeaseClient::connect(ClientConfig::new(keylease_url))?,
        GeminiClient::new(fake.base_url(), Duration::from_secs(10))?,
        RetryPolicy {
            deadline: Duration::from_secs(args.warmup + args.seconds + 30),
            ..RetryPolicy::default()
        },
    );
    let answered = Arc::new(AtomicU64::new(0));
    let measuring = Duration::from_secs(args.seconds);
    let started = now();
    let counted_from = started + Duration::from_secs(args.warmup);
    let stop = counted_from + measuring;
    let mut jobs = Vec::new();
    for job in 0..args.jobs {
        let calls = calls.clone();
        let answered = answered.clone();
        jobs.push(tokio::spawn(async move {
            let mut call = 0;
            while now() < stop {
                let task = format!("job{job}-{call}");
                call += 1;
                let request = GenerateContentRequest::text("a short prompt");
                if let Ok(Generated::Answer(_)) = calls.generate(&task, MODEL, &request).await
                    && (counted_from..=stop).contains(&now())
                {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for job in jobs {
        job.await?;
    }

    let answered = answered.load(Ordering::Relaxed);
    let limit = args.rpm * args.projects as u64 * args.seconds;
    let stats = fake.fake.stats().all();
    println!(
        "| keys | projects | jobs | limit per project | window | calls answered in {}s | aggregate limit | utilization | 429s |",
        args.seconds
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} per 1s | margin {}ms, call {}ms | {answered} | {limit} | {:.1}% | {} |",
        args.keys,
        args.projects,
        args.jobs,
        args.rpm,
        args.margin_ms,
        args.latency_ms,
        100.0 * answered as f64 / limit as f64,
        stats.status(429),
    );
    Ok(())
}
