//! The default store: a state directory holding a redb database (the log and the latest
//! snapshot), the key that fingerprints secrets, and a lock file naming the server that holds
//! it. redb gives ACID commits that are durable (fsync'd) when they return, in one file.

use super::{FORMAT_VERSION, Log, RecordVisitor, Store, StoreError, decode_batch, encode_batch};
use crate::lock_file::Locked;
use crate::secret::FingerprintKey;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Each commit's records as one entry, under the number of its last record: one B-tree insert
/// per commit, however many records it holds.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FORMAT: &str = "format";
const SNAPSHOT: &str = "snapshot";

const DATABASE_FILE: &str = "state.redb";
const FINGERPRINT_KEY_FILE: &str = "fingerprint.key";
const LOCK_FILE: &str = "lock";
/// Present while a server has the database open: found at start, the last run did not stop
/// cleanly, and redb may fall back to the commit before a torn last one (never acknowledged).
const RUNNING_MARK: &str = "running";

thread_local! {
    /// Set while this thread opens a database: a panic in redb on a damaged file is caught and
    /// reported as damage instead of aborting the process.
    static CONTAINING_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a panic on this thread now is contained (redb reading a damaged file at open): the
/// process's abort-on-panic hook lets it unwind, silently, to be reported as damage.
pub fn panic_is_contained() -> bool {
    CONTAINING_PANICS.get()
}

/// Progress redb reports to the repair callback when the last commit failed its checksums and
/// it is about to fall back to the one before (redb 4's repair reports 0.3 after that scan).
const FALLING_BACK: std::ops::Range<f64> = 0.3..0.6;

/// A state directory, locked for as long as this value lives.
pub struct StateDir {
    path: PathBuf,
    /// Held locked: a second server on the directory is refused.
    _lock: File,
    pub fingerprint_key: FingerprintKey,
}

impl StateDir {
    /// Opens (creating if needed) and locks `path`. With `reset_at` (the wall clock, in ms), an
    /// existing directory is first renamed aside (`<dir>.reset-<unix seconds>`), never deleted;
    /// the new name is returned.
    pub fn open(path: &Path, reset_at: Option<u64>) -> Result<(Self, Option<PathBuf>), StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::Io {
            path: path.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        let mut moved_to = None;
        if let Some(wall_ms) = reset_at
            && path.exists()
        {
            // Held while it is moved, so a running server's directory is never moved away.
            let _held = lock(path)?;
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".reset-{}", wall_ms / 1_000));
            let aside = PathBuf::from(aside);
            std::fs::rename(path, &aside).map_err(|e| io("cannot move it aside", e))?;
            moved_to = Some(aside);
        }
        std::fs::create_dir_all(path).map_err(|e| io("cannot create the directory", e))?;
        let lock = lock(path)?;
        let fingerprint_key = fingerprint_key(path)?;
        Ok((
            Self {
                path: path.to_path_buf(),
                _lock: lock,
                fingerprint_key,
            },
            moved_to,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Locks the directory's lock file, naming this process in it.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    match crate::lock_file::lock(&path) {
        Ok(Locked::Held(file)) => Ok(file),
        Ok(Locked::By(pid)) => Err(StoreError::Locked {
            path: dir.to_path_buf(),
            holder: crate::lock_file::holder("keylease server", pid.as_deref()),
        }),
        Err(e) => Err(StoreError::Io {
            path,
            reason: e.to_string(),
        }),
    }
}

/// The directory's fingerprint key, made on first use. A database without its key is refused:
/// the identities of the keys it holds could no longer be recognised.
fn fingerprint_key(dir: &Path) -> Result<FingerprintKey, StoreError> {
    let path = dir.join(FINGERPRINT_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes: [u8; FingerprintKey::LEN] =
                bytes
                    .try_into()
                    .map_err(|bytes: Vec<u8>| StoreError::Unreadable {
                        path: path.clone(),
                        reason: format!(
                            "{} bytes where a fingerprint key has {}",
                            bytes.len(),
                            FingerprintKey::LEN
                        ),
                    })?;
            Ok(FingerprintKey::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(DATABASE_FILE).exists() {
                return Err(StoreError::Unreadable {
                    path,
                    reason: "missing, though the state it fingerprints is there".into(),
                });
            }
            let io = |e: std::io::Error| StoreError::Io {
                path: path.clone(),
                reason: e.to_string(),
            };
            let key = FingerprintKey::random().map_err(|e| StoreError::Io {
                path: path.clone(),
                reason: format!("no random source: {e}"),
            })?;
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(io)?;
            file.write_all(key.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(StoreError::Io {
            path,
            reason: e.to_string(),
        }),
    }
}

/// The log and the latest snapshot in one redb database, in a state directory it keeps locked.
pub struct EmbeddedStore {
    path: PathBuf,
    database: Database,
    /// Removed once the database is closed (fields drop in order).
    _running: RunningMark,
    /// Released when the store is dropped.
    _dir: StateDir,
}

/// The [`RUNNING_MARK`] file, removed when dropped.
struct RunningMark(PathBuf);

impl Drop for RunningMark {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens `path` with every page of its committed trees checked against its checksums, so that a
/// file damaged outside redb is refused rather than trusted (redb may panic on one it trusts).
/// A repair that would fall back to an earlier commit is refused after a clean stop, when the
/// last commit was acknowledged; after a crash it is redb's recovery of a torn commit, which no
/// one was told had been made. A panic in redb is reported as damage.
fn open_checked(path: &Path, stopped_cleanly: bool) -> Result<Database, StoreError> {
    let damaged = |reason: String| StoreError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let mut builder = Database::builder();
    builder
        .set_check_integrity_on_open(true)
        .set_repair_callback(move |session| {
            if stopped_cleanly && FALLING_BACK.contains(&session.progress()) {
                session.abort();
            }
        });
    CONTAINING_PANICS.set(true);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.create(path)));
    CONTAINING_PANICS.set(false);
    match opened {
        Ok(Ok(database)) => Ok(database),
        Ok(Err(redb::DatabaseError::RepairAborted)) => Err(damaged(
            "damaged: its last commit fails its checksums, though the server that wrote it stopped cleanly; falling back to the commit before could lose what was acknowledged".into(),
        )),
        Ok(Err(error)) => Err(damaged(format!("damaged or not a keylease state database: {error}"))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(damaged(format!("damaged: reading it failed ({what})")))
        }
    }
}

impl EmbeddedStore {
    /// Opens the database of a state directory, checking it whole, or creates it in the
    /// current format.
    pub fn open(dir: StateDir) -> Result<Self, StoreError> {
        let path = dir.path().join(DATABASE_FILE);
        let mark = dir.path().join(RUNNING_MARK);
        let stopped_cleanly = !mark.exists();
        std::fs::write(&mark, std::process::id().to_string())
            .and_then(|()| File::open(dir.path())?.sync_all())
            .map_err(|e| StoreError::Io {
                path: mark.clone(),
                reason: e.to_string(),
            })?;
        let database = match open_checked(&path, stopped_cleanly) {
            Ok(database) => database,
            Err(error) => {
                // As it was: a crash's mark stays for the next try.
                if stopped_cleanly {
                    let _ = std::fs::remove_file(&mark);
                }
                return Err(error);
            }
        };
        let store = Self {
            path,
            database,
            _running: RunningMark(mark),
            _dir: dir,
        };
        let unreadable = |reason: String| StoreError::Unreadable {
            path: store.path.clone(),
            reason,
        };
        let write = |e: &dyn std::fmt::Display| store.write_error(e);
        let txn = store.database.begin_write().map_err(|e| write(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| write(&e))?;
            let found = meta
                .get(FORMAT)
                .map_err(|e| unreadable(e.to_string()))?
                .map(|v| v.value().try_into().map(u64::from_le_bytes));
            match found {
                None => {
                    meta.insert(FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                        .map_err(|e| write(&e))?;
                }
                Some(Ok(FORMAT_VERSION)) => {}
                Some(Ok(found)) if found > FORMAT_VERSION => {
                    return Err(StoreError::NewerFormat {
                        path: store.path.clone(),
                        found,
                    });
                }
                Some(Ok(found)) => {
                    return Err(unreadable(format!(
                        "state format {found} is older than this server's {FORMAT_VERSION} and no migration from it exists"
                    )));
                }
                Some(Err(_)) => return Err(unreadable("its format mark is damaged".into())),
            }
            txn.open_table(LOG).map_err(|e| write(&e))?;
        }
        txn.commit().map_err(|e| write(&e))?;
        Ok(store)
    }

    fn write_error(&self, error: &dyn std::fmt::Display) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            reason: error.to_string(),
        }
    }

    fn read_error(&self, error: &dyn std::fmt::Display) -> StoreError {
        StoreError::Unreadable {
            path: self.path.clone(),
            reason: error.to_string(),
        }
    }
}

impl Log for EmbeddedStore {
    fn snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self
            .database
            .begin_read()
            .map_err(|e| self.read_error(&e))?;
        let meta = txn.open_table(META).map_err(|e| self.read_error(&e))?;
        let snapshot = meta.get(SNAPSHOT).map_err(|e| self.read_error(&e))?;
        Ok(snapshot.map(|v| v.value().to_vec()))
    }

    fn records(&self, after: u64, visit: &mut RecordVisitor<'_>) -> Result<(), StoreError> {
        let txn = self
            .database
            .begin_read()
            .map_err(|e| self.read_error(&e))?;
        let log = txn.open_table(LOG).map_err(|e| self.read_error(&e))?;
        for entry in log
            .range(after.saturating_add(1)..)
            .map_err(|e| self.read_error(&e))?
        {
            let (last, bytes) = entry.map_err(|e| self.read_error(&e))?;
            let batch = decode_batch(bytes.value()).map_err(|e| {
                self.read_error(&format!(
                    "the commit ending at record {}: {e}",
                    last.value()
                ))
            })?;
            for (seq, record) in batch {
                // A snapshot may have been taken amid a commit: what it covers is skipped.
                if seq > after {
                    visit(seq, record)?;
                }
            }
        }
        Ok(())
    }

    fn location(&self) -> PathBuf {
        self.path.clone()
    }
}

impl Store for EmbeddedStore {
    fn append(&mut self, records: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let txn = self
            .database
            .begin_write()
            .map_err(|e| self.write_error(&e))?;
        {
            let mut log = txn.open_table(LOG).map_err(|e| self.write_error(&e))?;
            if let Some(&(last, _)) = records.last() {
                log.insert(last, encode_batch(records).as_slice())
                    .map_err(|e| self.write_error(&e))?;
            }
        }
        txn.commit().map_err(|e| self.write_error(&e))
    }

    fn save_snapshot(&mut self, seq: u64, snapshot: &[u8]) -> Result<(), StoreError> {
        let txn = self
            .database
            .begin_write()
            .map_err(|e| self.write_error(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.write_error(&e))?;
            meta.insert(SNAPSHOT, snapshot)
                .map_err(|e| self.write_error(&e))?;
            let mut log = txn.open_table(LOG).map_err(|e| self.write_error(&e))?;
            log.retain_in(..=seq, |_, _| false)
                .map_err(|e| self.write_error(&e))?;
        }
        txn.commit().map_err(|e| self.write_error(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::Reopen;

    /// A new state directory, opened again on each call.
    fn in_a_new_directory() -> Reopen {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "keylease-embedded-store-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Box::new(move || {
            let (state_dir, _) = StateDir::open(&dir, None).unwrap();
            let key = state_dir.fingerprint_key.clone();
            let store: Box<dyn Store> = Box::new(EmbeddedStore::open(state_dir).unwrap());
            (store, key)
        })
    }

    crate::conformance_tests!(in_a_new_directory());

    fn new_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keylease-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn open_store(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open(StateDir::open(dir, None)?.0)
    }

    #[test]
    fn a_second_server_on_the_directory_is_refused_naming_the_holder() {
        let dir = new_dir("locked");
        let _held = StateDir::open(&dir, None).unwrap();
        let error = StateDir::open(&dir, None).err().unwrap();
        let message = error.to_string();
        assert!(matches!(error, StoreError::Locked { .. }), "{message}");
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains(dir.to_str().unwrap()), "{message}");
    }

    #[test]
    fn a_damaged_database_names_its_path_and_the_way_out() {
        let dir = new_dir("damaged");
        drop(open_store(&dir).unwrap());
        std::fs::write(
            dir.join(DATABASE_FILE),
            b"not a database at all, not even close",
        )
        .unwrap();
        let message = open_store(&dir).err().unwrap().to_string();
        assert!(message.contains(DATABASE_FILE), "{message}");
        assert!(message.contains("--reset-state"), "{message}");
    }

    #[test]
    fn a_damaged_record_stops_recovery_naming_it() {
        let dir = new_dir("damaged-record");
        let mut store = open_store(&dir).unwrap();
        store.append(&[(1, vec![0xff; 3])]).unwrap();
        let message = crate::store::recover(&store).err().unwrap().to_string();
        assert!(message.contains("record 1"), "{message}");
        assert!(message.contains("--reset-state"), "{message}");
    }

    /// Records decided under other rules are not replayed by these: the message says how to
    /// let the build that wrote them snapshot them.
    #[test]
    fn records_of_older_rules_replay_and_newer_are_refused_with_the_way_out() {
        use keylease_engine::layout::encode_record;
        use keylease_engine::{AcquireRequest, Command, DailyReset, EngineConfig, Setup, Time};
        let config = EngineConfig {
            default_ttl_ms: 1_000,
            max_ttl_ms: 1_000,
            max_requests_per_lease: 1,
            window_ms: 60_000,
            safety_margin_ms: 0,
            exclusion_ttl_ms: 1_000,
            cooldown_base_ms: 1_000,
            cooldown_max_ms: 1_000,
            memory_capacity: 10,
            daily: DailyReset {
                zone: chrono_tz::UTC,
            },
            pools: Default::default(),
            relearn_after_windows: 10,
            check_keys: false,
        };
        let older = Command::Configure(Setup {
            rules: keylease_engine::RULES_VERSION - 1,
            ..Setup::new(config.clone(), Vec::new(), 0)
        });
        let current = Command::Configure(Setup::new(config.clone(), Vec::new(), 0));
        let time = Time::at(1_000);
        let log = |name: &str, commands: &[&Command]| {
            let mut store = open_store(&new_dir(name)).unwrap();
            let records: Vec<(u64, Vec<u8>)> = (1..)
                .zip(commands)
                .map(|(seq, command)| (seq, encode_record(time, command)))
                .collect();
            store.append(&records).unwrap();
            crate::store::recover(&store).map(|recovery| recovery.records_replayed)
        };

        let current_only = log("other-rules-current", &[&current, &Command::Tick]);
        assert_eq!(current_only.unwrap(), 2);
        // The previous rules' records are in this record format: the mechanical ones replay,
        // and so does what a newer server's setup decided after them (a restart after an
        // upgrade whose predecessor stopped cleanly).
        let restarted = log(
            "other-rules-restarted",
            &[&older, &Command::DropWaiters, &current, &Command::Tick],
        );
        assert_eq!(restarted.unwrap(), 4);

        // What the previous rules decided, this build decides as they did: it replays.
        let decided = log(
            "other-rules-decided",
            &[&older, &Command::Acquire(AcquireRequest::default())],
        );
        assert_eq!(decided.unwrap(), 2);
        // A newer build's rules this build does not know: refused, saying what to do.
        let newer = Command::Configure(Setup {
            rules: keylease_engine::RULES_VERSION + 1,
            ..Setup::new(config.clone(), Vec::new(), 0)
        });
        let decided = log(
            "newer-rules-decided",
            &[&newer, &Command::Acquire(AcquireRequest::default())],
        );
        let message = decided.err().unwrap().to_string();
        assert!(message.contains("records from 2 on"), "{message}");
        assert!(
            message.contains(&format!(
                "rules version {}",
                keylease_engine::RULES_VERSION + 1
            )),
            "{message}"
        );
        assert!(
            message.contains("run a keylease of that version"),
            "{message}"
        );
        assert!(message.contains("--reset-state"), "{message}");
        // A newer build's record laid out as this build cannot read: refused by its rules
        // too, not called unreadable.
        let mut store = open_store(&new_dir("newer-rules-layout")).unwrap();
        let records = vec![
            (1, encode_record(time, &newer)),
            (2, vec![0xff, 0xff, 0xff, 0xff]),
        ];
        store.append(&records).unwrap();
        let error = crate::store::recover(&store).err().unwrap();
        assert!(
            matches!(error, StoreError::OtherRules { seq: 2, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = new_dir("newer");
        let store = open_store(&dir).unwrap();
        let txn = store.database.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(FORMAT, (FORMAT_VERSION + 1).to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(store);
        let error = open_store(&dir).err().unwrap();
        assert!(
            matches!(error, StoreError::NewerFormat { found, .. } if found == FORMAT_VERSION + 1)
        );
    }

    #[test]
    fn a_database_without_its_fingerprint_key_is_refused() {
        let dir = new_dir("keyless");
        drop(open_store(&dir).unwrap());
        std::fs::remove_file(dir.join(FINGERPRINT_KEY_FILE)).unwrap();
        let message = open_store(&dir).err().unwrap().to_string();
        assert!(message.contains(FINGERPRINT_KEY_FILE), "{message}");
    }

    #[test]
    fn reset_moves_the_old_state_aside_and_keeps_it() {
        let dir = new_dir("reset");
        let mut store = open_store(&dir).unwrap();
        store.append(&[(1, vec![1, 2, 3])]).unwrap();
        drop(store);
        let (fresh, moved) = StateDir::open(&dir, Some(1_795_000_000_000)).unwrap();
        let moved = moved.expect("moved aside");
        assert!(moved.to_str().unwrap().ends_with(".reset-1795000000"));
        assert!(moved.join(DATABASE_FILE).exists());
        let fresh = EmbeddedStore::open(fresh).unwrap();
        let mut records = 0;
        fresh
            .records(0, &mut |_, _| {
                records += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(records, 0);
        let _ = std::fs::remove_dir_all(moved);
    }
}
