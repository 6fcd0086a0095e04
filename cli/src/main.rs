//! `keylease`: the command-line tool of keylease. `keylease batch` runs a file of prompts
//! through Gemini on the pool's keys (see [`batch`]).
#![forbid(unsafe_code)]

mod batch;
mod clock;

use clap::Parser;
use keylease_server::exit;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keylease: lend a pool of LLM API keys to many workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Runs a file of prompts through Gemini as fast as the keys allow; resumable.
    Batch(Box<batch::BatchArgs>),
}

fn main() -> ExitCode {
    let cli = match exit::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Warnings only: the progress bar and the summary are the batch's voice.
    keylease_server::logs::init(keylease_server::config::LogFormat::Text, "warn");
    let runtime = match exit::runtime("keylease") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match cli.command {
        Command::Batch(args) => runtime.block_on(batch::batch(*args)),
    }
}
