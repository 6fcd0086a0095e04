//! Scenario: what idle connections held on the proxy's port cost the gRPC port. 2,000 TCP
//! connections to the embedded proxy that sent a request line and a `Host` header and nothing
//! more are held (the proxy's cap and header timeout raised so that it keeps them all) while
//! 16 clients run AcquireKey+Release cycles on the gRPC port; runs alternate without and with
//! them (A/B/A/B...), so that a slow phase of the machine hits both.

use crate::overhead::{Pace, Samples, cycle, measure};
use crate::procs;
use std::io::Write;
use std::time::Duration;

const MODEL: &str = "bench-model";
const CLIENTS: usize = 16;

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let dir = procs::scratch("idle")?;
    let keys = procs::fake_keys(512, 512);
    let config = procs::keylease_config(
        &dir,
        &keys,
        MODEL,
        "",
        "[state]\nephemeral = true\n[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\nmax_connections = 4096\nheader_timeout = \"1h\"\nidle_timeout = \"1h\"\n",
    )?;
    let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let url = server.proxy_url()?;
    let proxy = url.trim_start_matches("http://");
    let (rounds, round, idle) = if smoke {
        (1, Duration::from_millis(300), 100)
    } else {
        (4, Duration::from_secs(3), 2_000)
    };
    // This process holds them: more than a default open-file limit allows.
    rlimit::increase_nofile_limit(idle as u64 + 1024)?;
    println!("\n### gRPC cycles while idle proxy connections are held\n");
    println!(
        "`cargo run --release -p keylease-bench -- idle`; {CLIENTS} clients, AcquireKey+Release, {} ms a run, ephemeral; runs alternate without and with {idle} idle connections to the proxy (request line and `Host` only, held by a cap of 4,096 and an hour's header timeout).\n",
        round.as_millis()
    );
    println!("| run | idle proxy connections | cycles/s | p50 | p99 | server RSS |");
    println!("|---|---|---|---|---|---|");
    let mut rates = [Vec::new(), Vec::new()];
    for run in 0..rounds * 2 {
        let with_idle = run % 2 == 1;
        let mut held = Vec::new();
        if with_idle {
            for _ in 0..idle {
                let mut stream = std::net::TcpStream::connect(proxy)?;
                stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")?;
                held.push(stream);
            }
            // Accepted and read by the server before the clock starts.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut samples: Samples = measure(&server, CLIENTS, round, Pace::Closed, cycle).await?;
        let rate = samples.per_second();
        rates[usize::from(with_idle)].push(rate);
        println!(
            "| {} | {} | {rate:.0} | {} µs | {} µs | {:.0} MiB |",
            run + 1,
            if with_idle { idle } else { 0 },
            samples.percentile(0.5),
            samples.percentile(0.99),
            server.memory_mib().unwrap_or(0.0),
        );
        drop(held);
    }
    let spread = |rates: &[f64]| {
        let max = rates.iter().copied().fold(f64::MIN, f64::max);
        let min = rates.iter().copied().fold(f64::MAX, f64::min);
        (min, max)
    };
    let (without_min, without_max) = spread(&rates[0]);
    let (with_min, with_max) = spread(&rates[1]);
    println!(
        "\nWithout: {without_min:.0}–{without_max:.0} cycles/s; with {idle} idle: {with_min:.0}–{with_max:.0}."
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
