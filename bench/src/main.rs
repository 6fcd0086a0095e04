//! `keylease-bench`: where keylease stands against the limit and the alternatives, with real
//! processes on loopback. Each scenario prints a Markdown table for `BENCHMARKS.md`; `--smoke`
//! runs it at a size that only shows it still works (CI does that; figures are never asserted).
//!
//! ```sh
//! cargo run --release -p keylease-bench -- overhead | scale | utilization | limits | recovery | replicas | proxy | learning | batch | idle | sdk | health | all [--smoke]
//! ```
//! The other subcommands are the roles the scenarios start this binary in.

mod batch;
mod health;
mod idle;
mod learning;
mod limits;
mod overhead;
mod procs;
mod proxy;
mod recovery;
mod replicas;
mod roles;
mod scale;
mod sdk;
mod utilization;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Scenario,
    /// Let the scheduler place the processes on every core, instead of all on one.
    #[arg(long, global = true)]
    all_cores: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// AcquireKey+Release cycles against a no-op RPC of the same server, at 1, 16, 256 clients.
    Overhead {
        #[arg(long)]
        smoke: bool,
    },
    /// Acquire latency with 10, 1,000 and 100,000 keys; 10,000 waiters: memory and order.
    Scale {
        #[arg(long)]
        smoke: bool,
    },
    /// Share of the aggregate limit served, and 429s: keylease against two common alternatives.
    Utilization {
        #[arg(long)]
        smoke: bool,
    },
    /// Memory under non-reading event streams; time to take thousands of waiters out of line.
    Limits {
        #[arg(long)]
        smoke: bool,
    },
    /// Start-up on 100,000 keys and 2,000,000 logged commands: the whole log, and a snapshot.
    Recovery {
        #[arg(long)]
        smoke: bool,
    },
    /// Cycles through 1 and 3 replicas on Redis beside the embedded store; failover time.
    Replicas {
        #[arg(long)]
        smoke: bool,
    },
    /// Latency and throughput the Gemini-compatible proxy adds, against calling the fake directly.
    Proxy {
        #[arg(long)]
        smoke: bool,
    },
    /// A fleet on a project whose real limit is half of what keylease was told: 429s, when
    /// they stop, and what the project serves; with `--before`, against another build too.
    Learning {
        #[arg(long)]
        smoke: bool,
        /// Another build's `keylease-bench`, whose `serve` role serves the same fleet.
        #[arg(long)]
        before: Option<PathBuf>,
    },
    /// `keylease batch` on 10,000 prompts on scaled time: the rate against the pool's limit.
    Batch {
        #[arg(long)]
        smoke: bool,
    },
    /// gRPC cycles while 2,000 idle connections are held on the proxy's port, alternating.
    Idle {
        #[arg(long)]
        smoke: bool,
    },
    Sdk {
        #[arg(long)]
        smoke: bool,
    },
    /// Calls wasted on dead keys without and with `[health]`; start-up time checking 1,000 keys.
    Health {
        #[arg(long)]
        smoke: bool,
    },
    /// Every scenario.
    All {
        #[arg(long)]
        smoke: bool,
    },
    /// Role: a keylease server on 127.0.0.1:0.
    #[command(hide = true)]
    Serve {
        config: PathBuf,
        /// Its embedded proxy leases over its gRPC service, as before leases in process.
        #[arg(long)]
        over_grpc: bool,
    },
    /// Role: a keylease replica on Redis, on 127.0.0.1:0.
    #[command(hide = true)]
    Replica { config: PathBuf },
    /// Role: a fake Gemini on 127.0.0.1:0.
    #[command(hide = true)]
    Fake { config: PathBuf },
    /// Role: a plain HTTP proxy to `upstream` on 127.0.0.1:0 (the proxy scenario's floor).
    #[command(hide = true)]
    PassThrough { upstream: String },
    /// Role: a worker process of the utilization scenario.
    #[command(hide = true)]
    Worker(roles::WorkerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Scenario::Serve { config, over_grpc } => return roles::serve(config, over_grpc).await,
        Scenario::Replica { config } => return roles::replica(config).await,
        Scenario::Fake { config } => return roles::fake(config).await,
        Scenario::PassThrough { upstream } => return roles::pass_through(upstream).await,
        Scenario::Worker(worker) => return roles::worker(worker).await,
        _ => {}
    }
    let machine = procs::machine();
    let placement = if args.all_cores {
        "processes on every core".to_string()
    } else {
        procs::run_on_one_core()
    };
    println!("Machine: {machine}; {placement}");
    match args.command {
        Scenario::Overhead { smoke } => overhead::run(smoke).await?,
        Scenario::Scale { smoke } => scale::run(smoke).await?,
        Scenario::Utilization { smoke } => utilization::run(smoke).await?,
        Scenario::Limits { smoke } => limits::run(smoke).await?,
        Scenario::Recovery { smoke } => recovery::run(smoke).await?,
        Scenario::Replicas { smoke } => replicas::run(smoke).await?,
        Scenario::Proxy { smoke } => proxy::run(smoke).await?,
        Scenario::Learning { smoke, before } => learning::run(smoke, before).await?,
        Scenario::Batch { smoke } => batch::run(smoke).await?,
        Scenario::Idle { smoke } => idle::run(smoke).await?,
        Scenario::Sdk { smoke } => sdk::run(smoke).await?,
        Scenario::Health { smoke } => health::run(smoke).await?,
        Scenario::All { smoke } => {
            overhead::run(smoke).await?;
            scale::run(smoke).await?;
            utilization::run(smoke).await?;
            limits::run(smoke).await?;
            recovery::run(smoke).await?;
            replicas::run(smoke).await?;
            proxy::run(smoke).await?;
            learning::run(smoke, None).await?;
            batch::run(smoke).await?;
            idle::run(smoke).await?;
            sdk::run(smoke).await?;
            health::run(smoke).await?;
        }
        Scenario::Serve { .. }
        | Scenario::Replica { .. }
        | Scenario::Fake { .. }
        | Scenario::PassThrough { .. }
        | Scenario::Worker(_) => {
            unreachable!("handled above")
        }
    }
    Ok(())
}
