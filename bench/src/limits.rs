//! Scenario 4: what hostile or careless clients cost the server. Memory while 300 `WatchEvents`
//! streams never read, from a client that grants a 2 GB HTTP/2 window and then stops reading
//! its socket, while events flow; and again after they close. Then the time to take 1,000,
//! 10,000 and 100,000 waiters on a spent quota out of line, and a `GetStatus` meanwhile.

use crate::overhead::cycle;
use crate::procs;
use crate::roles::now;
use hyper_util::rt::TokioIo;
use keylease::pb;
use keylease::pb::key_lease_client::KeyLeaseClient;
use keylease_engine::AcquireRequest;
use keylease_server::clock::Clock;
use keylease_server::config::{self, Overrides};
use keylease_server::shell::State;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

const MODEL: &str = "bench-model";
/// The largest HTTP/2 window there is.
const HUGE_WINDOW: u32 = (1 << 31) - 1;
/// Rounds of opening and closing the streams on one server.
const ROUNDS: usize = 3;

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    println!("\n### Hostile clients\n");
    println!("`cargo run --release -p keylease-bench -- limits`\n");
    let streams = if smoke { 20 } else { 300 };
    let cycles = if smoke { 500 } else { 20_000 };
    println!(
        "{streams} `WatchEvents` streams on connections that grant a 2 GB window and then stop reading their sockets, while another client runs {cycles} AcquireKey+Release cycles (two events each). Server resident memory (VmRSS):\n"
    );
    println!(
        "Each server takes {ROUNDS} rounds: a leak would show as memory after a round that grows from round to round.\n"
    );
    println!(
        "| server.max_watch_streams | round | streams open | refused | before | while they hang | after they close | growth while open |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for cap in [64, streams] {
        watchers(cap, streams, cycles).await?;
    }
    println!(
        "\nWaiters on a spent quota, taken out of line at once (their callers gone), in one process on its State, as the server's own tasks do:\n"
    );
    println!("| waiters | all out of line in | per waiter | GetStatus meanwhile |");
    println!("|---|---|---|---|");
    let sizes: &[usize] = if smoke {
        &[1_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    for &count in sizes {
        cancels(count).await?;
    }
    Ok(())
}

async fn watchers(cap: usize, streams: usize, cycles: usize) -> anyhow::Result<()> {
    let dir = procs::scratch(&format!("watchers-{cap}"))?;
    // The engine remembers ended leases up to leases.memory_capacity (100,000 by default),
    // which the cycles here would fill round by round: kept small, the rounds measure
    // connections and streams alone.
    let extra =
        format!("[server]\nmax_watch_streams = {cap}\n\n[leases]\nmemory_capacity = 1000\n");
    let config = procs::keylease_config(&dir, &procs::fake_keys(4, 4), MODEL, "", &extra)?;
    let server = procs::spawn(&["serve".into(), config.display().to_string()], true)?;
    let busy = Channel::from_shared(server.address.clone())?
        .connect()
        .await?;
    // Warm up: the allocator and the connection, as a steady server would be.
    for _ in 0..200 {
        cycle(busy.clone(), 0).await?;
    }
    let before = server.memory_mib().unwrap_or(0.0);
    for number in 1..=ROUNDS {
        let round = Round {
            cap,
            number,
            streams,
            cycles,
        };
        hang(&server, &busy, round, before).await?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A round of stalled streams on a server with a watch-stream cap.
struct Round {
    cap: usize,
    number: usize,
    streams: usize,
    cycles: usize,
}

/// One round: the streams open and stall while the cycles run, then close.
async fn hang(
    server: &procs::Child,
    busy: &Channel,
    round: Round,
    before: f64,
) -> anyhow::Result<()> {
    let Round {
        cap,
        number: round,
        streams,
        cycles,
    } = round;
    let mut sockets = Vec::new();
    let mut open = Vec::new();
    let mut refused = 0;
    for chunk in 0..streams.div_ceil(100) {
        let (channel, paused) = stalling_channel(&server.address).await?;
        sockets.push(paused);
        for _ in chunk * 100..((chunk + 1) * 100).min(streams) {
            match KeyLeaseClient::new(channel.clone())
                .watch_events(pb::WatchEventsRequest {})
                .await
            {
                Ok(stream) => open.push(stream),
                Err(_) => refused += 1,
            }
        }
    }
    // From now on those connections read nothing: what the server sends them piles up.
    for socket in &sockets {
        socket.stall();
    }
    let mut peak: f64 = 0.0;
    for i in 0..cycles {
        cycle(busy.clone(), 1).await?;
        if i % 500 == 0 {
            peak = peak.max(server.memory_mib().unwrap_or(0.0));
        }
    }
    peak = peak.max(server.memory_mib().unwrap_or(0.0));
    let opened = open.len();
    drop(open);
    // The clients go away: their sockets fail, and the server sees the connections end.
    for socket in &sockets {
        socket.cut();
    }
    drop(sockets);
    // The server notices closed connections when it next writes to them: a few more events.
    let mut after = f64::MAX;
    for _ in 0..20 {
        for _ in 0..50 {
            cycle(busy.clone(), 2).await?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = after.min(server.memory_mib().unwrap_or(0.0));
    }
    println!(
        "| {cap} | {round} | {opened} | {refused} | {before:.0} MiB | {peak:.0} MiB | {after:.0} MiB | {:.0} MiB |",
        peak - before
    );
    Ok(())
}

/// A channel on one connection that grants a 2 GB window, and the switches of its socket.
async fn stalling_channel(address: &str) -> anyhow::Result<(Channel, Arc<Switches>)> {
    let switches = Arc::new(Switches::default());
    let target = address.trim_start_matches("http://").to_string();
    let shared = switches.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let (target, switches) = (target.clone(), shared.clone());
        async move {
            let stream = TcpStream::connect(target).await?;
            Ok::<_, std::io::Error>(TokioIo::new(Stalling { stream, switches }))
        }
    });
    let channel = Endpoint::from_shared(address.to_string())?
        .initial_stream_window_size(HUGE_WINDOW)
        .initial_connection_window_size(HUGE_WINDOW)
        .connect_with_connector(connector)
        .await?;
    Ok((channel, switches))
}

/// What a stalling socket does: read, read nothing (the connection stays open), or fail as a
/// socket whose client went away.
#[derive(Default)]
struct Switches {
    stalled: AtomicBool,
    cut: AtomicBool,
    /// The reader waiting while stalled, woken when the socket is cut.
    reader: Mutex<Option<Waker>>,
}

impl Switches {
    fn stall(&self) {
        self.stalled.store(true, Ordering::Release);
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        if let Some(reader) = self.reader.lock().unwrap().take() {
            reader.wake();
        }
    }

    fn gone() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, "the client went away")
    }
}

/// A socket that stops reading when told to, as a client that never drains its streams does.
struct Stalling {
    stream: TcpStream,
    switches: Arc<Switches>,
}

impl AsyncRead for Stalling {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.switches.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(Switches::gone()));
        }
        if self.switches.stalled.load(Ordering::Acquire) {
            *self.switches.reader.lock().unwrap() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stalling {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.switches.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(Switches::gone()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// `count` acquires wait on a spent quota; then all their callers go at once.
async fn cancels(count: usize) -> anyhow::Result<()> {
    let dir = procs::scratch(&format!("cancels-{count}"))?;
    let config = procs::keylease_config(
        &dir,
        &procs::fake_keys(4, 1),
        MODEL,
        "requests_per_minute = 1",
        "[leases]\nmax_wait = \"1h\"",
    )?;
    let settings = config::load(Some(&config), &Default::default(), &Overrides::default())?;
    let (state, _) = State::open(&settings, Clock::system(), false)?;
    let ask = |task: String| AcquireRequest {
        task_id: task,
        model: MODEL.into(),
        ..Default::default()
    };
    // One request spends the minute's quota for the only project.
    state
        .acquire(None, ask("spender".into()), Duration::ZERO, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut waiting = Vec::with_capacity(count);
    for i in 0..count {
        let state = state.clone();
        let request = ask(format!("waiter-{i}"));
        waiting.push(tokio::spawn(async move {
            let _ = state
                .acquire(None, request, Duration::from_secs(3600), None)
                .await;
        }));
    }
    while waiting_now(&state).await < count {
        tokio::task::yield_now().await;
    }
    let began = now();
    for task in &waiting {
        task.abort();
    }
    // A GetStatus as an operator would send it while the line empties.
    let status_began = now();
    state
        .read(|engine, now| engine.status(now, None, None, 10).map(drop))
        .await??;
    let status_took = status_began.elapsed();
    for task in waiting {
        let _ = task.await;
    }
    let took = began.elapsed();
    anyhow::ensure!(waiting_now(&state).await == 0, "waiters left in line");
    println!(
        "| {count} | {:.1} ms | {:.2} µs | {:.2} ms |",
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / count as f64,
        status_took.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

async fn waiting_now(state: &State) -> usize {
    match state
        .read(|engine, now| engine.status(now, None, None, 1))
        .await
    {
        Ok(Ok(status)) => status.waiting.iter().map(|w| w.2).sum(),
        _ => 0,
    }
}
