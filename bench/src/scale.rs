//! Scenario 2: how keylease scales. Acquire latency with 10, 1,000 and 100,000 keys; then
//! 10,000 acquirers waiting at once for 10 leased keys: the server's peak memory, and whether
//! they were served in the order they arrived (read from the server's own grant events).

use crate::overhead::{Pace, cycle, measure};
use crate::procs::{self, percentile};
use crate::roles::now;
use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;

const MODEL: &str = "bench-model";

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    println!("\n### Scale\n");
    println!(
        "`cargo run --release -p keylease-bench -- scale`; acquire latency from one client, sequential cycles.\n"
    );
    println!("| keys | acquire p50 | p99 | server start | server peak memory |");
    println!("|---|---|---|---|---|");
    let sizes: &[usize] = if smoke {
        &[10, 1_000]
    } else {
        &[10, 1_000, 100_000]
    };
    let mut p50s = Vec::new();
    for &count in sizes {
        let dir = procs::scratch(&format!("scale-{count}"))?;
        let config = procs::keylease_config(&dir, &procs::fake_keys(count, count), MODEL, "", "")?;
        let started = now();
        let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
        let start_time = started.elapsed();
        let cycles = if smoke { 200 } else { 5_000 };
        let latencies = acquire_latencies(&server, cycles).await?;
        p50s.push(percentile(&latencies, 0.5));
        println!(
            "| {count} | {} µs | {} µs | {:.0} ms | {:.0} MiB |",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            start_time.as_secs_f64() * 1000.0,
            server.peak_memory_mib().unwrap_or(0.0)
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    if let (Some(first), Some(last)) = (p50s.first(), p50s.last()) {
        println!(
            "\nLargest over smallest, p50: {:.2}",
            *last as f64 / (*first).max(1) as f64
        );
    }
    waiters(if smoke { 500 } else { 10_000 }).await
}

/// Latency of AcquireKey alone (the release is not timed), sorted, in microseconds.
async fn acquire_latencies(server: &procs::Child, cycles: usize) -> anyhow::Result<Vec<u64>> {
    let channel = Channel::from_shared(server.address.clone())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = KeyLeaseClient::new(channel);
    // Warm up the connection and the allocator.
    measure(server, 1, Duration::from_millis(300), Pace::Closed, cycle).await?;
    let mut latencies = Vec::with_capacity(cycles);
    for i in 0..cycles {
        let request = pb::AcquireKeyRequest {
            task_id: format!("scale-{i}"),
            model: MODEL.into(),
            ..Default::default()
        };
        let began = now();
        let lease = client.acquire_key(request).await?.into_inner();
        latencies.push(began.elapsed().as_micros() as u64);
        let release = pb::ReleaseRequest {
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            ..Default::default()
        };
        client.release(release).await?;
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// `count` acquirers wait for 10 leased keys; each, once served, releases at once.
async fn waiters(count: usize) -> anyhow::Result<()> {
    const KEYS: usize = 10;
    const BATCH: usize = 500;
    let dir = procs::scratch("waiters")?;
    let config = procs::keylease_config(
        &dir,
        &procs::fake_keys(KEYS, KEYS),
        MODEL,
        "",
        "[leases]\nmax_wait = \"10m\"",
    )?;
    let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let mut channels = Vec::new();
    // Under hyper's default of 200 concurrent streams per connection.
    for _ in 0..count.div_ceil(150).max(1) {
        channels.push(
            Channel::from_shared(server.address.clone())?
                .connect()
                .await?,
        );
    }
    let mut admin = KeyLeaseClient::new(channels[0].clone());
    let mut held = Vec::new();
    for i in 0..KEYS {
        let request = pb::AcquireKeyRequest {
            task_id: format!("holder-{i}"),
            model: MODEL.into(),
            ..Default::default()
        };
        held.push(admin.acquire_key(request).await?.into_inner());
    }
    let mut events = admin
        .watch_events(pb::WatchEventsRequest {})
        .await?
        .into_inner();
    let queued_started = now();
    let mut waiting = Vec::new();
    // In batches, each queued before the next is sent: arrival order is known batch by batch.
    for batch in 0..count.div_ceil(BATCH) {
        for i in batch * BATCH..((batch + 1) * BATCH).min(count) {
            let mut client = KeyLeaseClient::new(channels[i % channels.len()].clone());
            waiting.push(tokio::spawn(async move {
                let request = pb::AcquireKeyRequest {
                    task_id: format!("waiter-{i}"),
                    model: MODEL.into(),
                    wait: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    ..Default::default()
                };
                let lease = client.acquire_key(request).await?.into_inner();
                let release = pb::ReleaseRequest {
                    lease_id: lease.lease_id,
                    fencing_token: lease.fencing_token,
                    ..Default::default()
                };
                client.release(release).await?;
                anyhow::Ok(())
            }));
        }
        let target = ((batch + 1) * BATCH).min(count) as u32;
        while waiting_now(&mut admin).await? < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let queued_in = queued_started.elapsed();
    let memory = server.peak_memory_mib().unwrap_or(0.0);
    let serving_started = now();
    for lease in held {
        let release = pb::ReleaseRequest {
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            ..Default::default()
        };
        admin.release(release).await?;
    }
    let mut order: Vec<usize> = Vec::with_capacity(count);
    let mut missed = 0;
    while order.len() < count {
        let Some(event) = events.message().await? else {
            break;
        };
        match event.kind {
            Some(pb::event::Kind::Granted(granted)) => {
                let task = granted.lease.map(|l| l.task_id).unwrap_or_default();
                if let Some(i) = task.strip_prefix("waiter-").and_then(|i| i.parse().ok()) {
                    order.push(i);
                }
            }
            Some(pb::event::Kind::Missed(n)) => missed += n,
            _ => {}
        }
    }
    for handle in waiting {
        handle.await??;
    }
    let served_in = serving_started.elapsed();
    // Served in order: the batches' numbers never go down along the server's grants.
    let batches: Vec<usize> = order.iter().map(|i| i / BATCH).collect();
    let in_order = batches.windows(2).all(|w| w[0] <= w[1]);
    let mut per_batch: HashMap<usize, usize> = HashMap::new();
    for b in &batches {
        *per_batch.entry(*b).or_default() += 1;
    }
    println!(
        "\n| waiters | queued in | server peak memory | all served in | grants seen | in arrival order (by batch of {BATCH}) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {count} | {:.2} s | {memory:.0} MiB | {:.2} s | {}{} | {} |",
        queued_in.as_secs_f64(),
        served_in.as_secs_f64(),
        order.len(),
        if missed > 0 {
            format!(" ({missed} missed by the stream)")
        } else {
            String::new()
        },
        if in_order { "yes" } else { "no" }
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

async fn waiting_now(admin: &mut KeyLeaseClient<Channel>) -> anyhow::Result<u32> {
    let status = admin
        .get_status(pb::GetStatusRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(status.waiting.iter().map(|w| w.waiters).sum())
}
