//! A batch worker: takes prompts from a file (one per line) and answers them with N concurrent
//! jobs, each Gemini call under a keylease lease.
//!
//! ```sh
//! cargo run -p keylease-client --example worker -- --prompts prompts.txt --jobs 8 \
//!     --keylease http://127.0.0.1:50051 --model gemini-2.5-flash
//! ```
//! `--gemini-url` points it at a proxy or the fake (`cargo run -p fake-gemini`).

use clap::Parser;
use keylease_client::gemini::{
    DEFAULT_BASE_URL, GeminiClient, Generated, LeasedGemini, RetryPolicy, run_batch,
};
use keylease_client::{ClientConfig, KeyLeaseClient};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
struct Args {
    /// A file with one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Concurrent jobs.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// keylease endpoint(s), comma separated.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    keylease: String,
    #[arg(long, default_value = DEFAULT_BASE_URL)]
    gemini_url: String,
    #[arg(long, default_value = "gemini-2.5-flash")]
    model: String,
    /// Names this worker's tasks.
    #[arg(long, default_value = "worker")]
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prompts: Vec<String> = std::fs::read_to_string(&args.prompts)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect();
    let mut config = ClientConfig::new(String::new());
    config.endpoints = args.keylease.split(',').map(str::to_string).collect();
    let keylease = KeyLeaseClient::connect(config)?;
    let gemini = GeminiClient::new(&args.gemini_url, Duration::from_secs(60))?;
    let calls = LeasedGemini::new(keylease, gemini, RetryPolicy::default());

    let results = run_batch(&calls, &args.model, prompts, args.jobs, &args.name).await;
    let mut failed = 0;
    for (index, result) in results.iter().enumerate() {
        match result {
            Ok(Generated::Answer(answer)) => println!(
                "{index}\t{}",
                answer.text().unwrap_or_default().replace('\n', " ")
            ),
            Ok(Generated::Blocked { block, .. }) => println!("{index}\tblocked: {block:?}"),
            Err(error) => {
                failed += 1;
                eprintln!("{index}\tfailed: {error}");
            }
        }
    }
    eprintln!("{} answered, {failed} failed", results.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
