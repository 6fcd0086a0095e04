//! `fake-gemini --config fake.json [--listen 127.0.0.1:0]`: serves the fake Gemini API and prints
//! `fake-gemini listening on http://ADDRESS` once it accepts calls. Stops on SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use fake_gemini::{FakeConfig, FakeGemini};
use std::path::PathBuf;
use tokio::signal::unix::{SignalKind, signal};

/// A fake Gemini API for tests, benchmarks and demos.
#[derive(Debug, Parser)]
struct Args {
    /// JSON: {"keys": [{"id","secret","project","health"?}], "models": {"NAME": {"requests_per_minute"?, ...}},
    /// "time_scale"?, "faults"?: {"error_rate","status","latency_ms"}, "seed"?}
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("{}: cannot read", args.config.display()))?;
    let config: FakeConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid", args.config.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("fake-gemini listening on http://{}", listener.local_addr()?);
    let mut terminate = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    FakeGemini::new(config).serve(listener, shutdown).await?;
    Ok(())
}
