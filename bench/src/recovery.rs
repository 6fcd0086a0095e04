//! Scenario: start-up after a long run. A state directory is filled as the journal fills it
//! (every command applied to an engine, its record appended in batches): 100,000 keys and
//! 2,000,000 logged commands (acquire and release cycles). The server's own start-up then
//! recovers it twice: replaying the whole log, and from the snapshot that first start-up wrote.

use crate::procs;
use crate::roles::now;
use keylease_engine::layout::{Snapshot, encode, encode_record};
use keylease_engine::{AcquireRequest, Acquired, Command, Engine, Reply, Setup, Time, Usage};
use keylease_server::clock::Clock;
use keylease_server::config::{self, Overrides, StateLocation};
use keylease_server::shell::{SNAPSHOT_EVERY, State, token_floor};
use keylease_server::store::Store;
use keylease_server::store::embedded::{EmbeddedStore, StateDir};
use std::time::Duration;

const MODEL: &str = "bench-model";
/// Records per commit while filling the log.
const BATCH: usize = 10_000;

pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let (keys, commands) = if smoke {
        (1_000, 20_000)
    } else {
        (100_000, 2_000_000)
    };
    let dir = procs::scratch("recovery")?;
    let config = procs::keylease_config(&dir, &procs::fake_keys(keys, keys / 10), MODEL, "", "")?;
    let settings = config::load(Some(&config), &Default::default(), &Overrides::default())?;
    let StateLocation::Directory(state_dir) = settings.state.clone() else {
        anyhow::bail!("the scenario needs a state directory");
    };

    let filled = now();
    let (capture, encoded_bytes, encode_time);
    {
        let (dir_lock, _) = StateDir::open(&state_dir, None)?;
        let fingerprint_key = dir_lock.fingerprint_key.clone();
        let mut store = EmbeddedStore::open(dir_lock)?;
        let clock = Clock::system();
        let mut keys = settings.keys.clone();
        for key in &mut keys {
            key.fingerprint = fingerprint_key.fingerprint(&key.secret);
        }
        let setup = Setup::new(
            settings.engine.clone(),
            keys,
            token_floor(clock.now().wall_ms),
        );
        let mut engine = Engine::new(setup.clone(), clock.now())?;
        let mut log = Log {
            seq: 1,
            batch: vec![(1, encode_record(clock.now(), &Command::Configure(setup)))],
        };
        for i in 0..commands / 2 {
            let acquire = Command::Acquire(AcquireRequest {
                task_id: format!("task-{}", i % 1_000),
                model: MODEL.into(),
                ..Default::default()
            });
            let reply = log.apply(&mut engine, clock.now(), acquire);
            let Acquired::Granted(lease) = reply.into_acquired()? else {
                anyhow::bail!("no key for cycle {i}");
            };
            let release = Command::Release {
                lease_id: lease.lease_id,
                fencing_token: lease.fencing_token,
                usage: Usage {
                    requests_sent: Some(1),
                    input_tokens: Some(100),
                },
            };
            log.apply(&mut engine, clock.now(), release)
                .into_released()?;
            if log.batch.len() >= BATCH {
                store.append(&std::mem::take(&mut log.batch))?;
            }
        }
        let batch = log.batch;
        store.append(&batch)?;
        // What a running server pauses for every SNAPSHOT_EVERY records: taking the image under
        // the engine's lock (encoding and writing it happen on the committer).
        let captured = now();
        let snapshot = Snapshot::of(&engine, log.seq);
        capture = captured.elapsed();
        let encoded = now();
        encoded_bytes = encode(&snapshot).len();
        encode_time = encoded.elapsed();
    }
    let filled = filled.elapsed();
    let log_bytes = std::fs::metadata(state_dir.join("state.redb"))?.len();

    // The first start replays the whole log (and then writes a snapshot, on closing at the
    // latest); the second starts from that snapshot.
    let (replayed, replay_time) = start(&settings)?;
    let snapshot_bytes = std::fs::metadata(state_dir.join("state.redb"))?.len();
    let (from_snapshot, snapshot_time) = start(&settings)?;

    println!("\n### Recovery\n");
    println!(
        "`cargo run --release -p keylease-bench -- recovery`: a state directory ({}) filled with {keys} keys and a log of {commands} commands (acquire and release cycles, appended {BATCH} to a commit: {:.1} s), then the server's own start-up on it, in this process: first replaying the log, then from the snapshot the first start-up wrote. Start-up covers opening the store, recovery, and applying the configuration.\n",
        procs::file_system_of(&state_dir),
        filled.as_secs_f64()
    );
    println!(
        "A running server takes a snapshot every {SNAPSHOT_EVERY} records: capturing the image under the engine's lock took {:.1} ms here, encoding it on the committer {:.1} ms ({:.1} MiB).\n",
        capture.as_secs_f64() * 1e3,
        encode_time.as_secs_f64() * 1e3,
        encoded_bytes as f64 / (1 << 20) as f64
    );
    println!("| start-up | records replayed | time | state file |");
    println!("|---|---|---|---|");
    println!(
        "| whole log | {} | {:.2} s | {:.0} MiB |",
        replayed,
        replay_time.as_secs_f64(),
        log_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "| from the snapshot | {} | {:.2} s | {:.0} MiB |",
        from_snapshot,
        snapshot_time.as_secs_f64(),
        snapshot_bytes as f64 / (1 << 20) as f64
    );
    // What the integrity check at start costs: the database file opened by redb alone, with
    // and without it, alternating.
    let database = state_dir.join("state.redb");
    let mut opened = [Vec::new(), Vec::new()];
    for checked in [false, true, false, true] {
        let began = now();
        let mut builder = redb::Database::builder();
        builder.set_check_integrity_on_open(checked);
        drop(builder.create(&database)?);
        opened[usize::from(checked)].push(began.elapsed().as_secs_f64() * 1e3);
    }
    let shown = |times: &[f64]| {
        times
            .iter()
            .map(|ms| format!("{ms:.0} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nOpening that {:.0} MiB state file alone (redb), alternating: without the integrity check {}; with it (as the server opens it) {}.",
        std::fs::metadata(&database)?.len() as f64 / (1 << 20) as f64,
        shown(&opened[0]),
        shown(&opened[1])
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Records of commands applied, waiting to be appended.
struct Log {
    seq: u64,
    batch: Vec<(u64, Vec<u8>)>,
}

impl Log {
    fn apply(&mut self, engine: &mut Engine, time: Time, command: Command) -> Reply {
        self.seq += 1;
        self.batch.push((self.seq, encode_record(time, &command)));
        engine.apply(time, command).0
    }
}

/// Opens the state as the server does and closes it again: (records replayed, time to open).
fn start(settings: &config::Settings) -> anyhow::Result<(u64, Duration)> {
    let began = now();
    let (state, recovered) = State::open(settings, Clock::system(), false)?;
    let took = began.elapsed();
    state.close();
    drop(state);
    Ok((recovered.records_replayed, took))
}
