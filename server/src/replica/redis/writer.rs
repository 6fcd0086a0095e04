//! The log as its leader writes it: appends and snapshots, each through a script that checks
//! in Redis that this replica still leads this log; and the test-only failpoint that pauses a
//! leader before it appends.

use super::*;

/// The log as its leader writes it: every write checks, in Redis, that this replica still
/// leads this log (see the module's header).
pub struct RedisStore {
    log: RedisLog,
    /// The leadership's value in Redis.
    leader_value: String,
    log_id: String,
    /// Where the log ends, as this store appended or found it: the next append must follow it.
    position: Position,
    /// The chain value before the last batch appended, and that batch's first record: what a
    /// snapshot taken amid it follows.
    before_last_batch: (u64, u64),
    /// The position, shared with the replica that leads, which remembers it.
    appended: Arc<Mutex<Position>>,
    /// Test-only failpoint (see [`PAUSE_BEFORE_APPEND`]).
    pause_before_append: Option<PathBuf>,
}

/// A test-only failpoint, named by this environment variable: when the file it names exists,
/// the next append with records removes it and holds the leader there, between applying
/// commands and appending them, as a long pause would: the append waits and the leadership is
/// not renewed ([`frozen`]) until a file of the same name plus `.resume` appears. This is how
/// the split-brain test makes a leader lose its leadership with replies pending.
pub const PAUSE_BEFORE_APPEND: &str = "KEYLEASE_FAILPOINT_PAUSE_BEFORE_APPEND";

/// Set while the failpoint holds this process's leader.
static FROZEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the failpoint holds this process's leader: its leadership is then not renewed.
pub fn frozen() -> bool {
    FROZEN.load(std::sync::atomic::Ordering::Acquire)
}

impl RedisStore {
    /// The store of the leader `leader` of log `log_id`, which ends at `position`.
    pub fn new(log: RedisLog, leader: &Leader, log_id: String, position: Position) -> Self {
        Self {
            log,
            leader_value: leader.value.clone(),
            log_id,
            position,
            before_last_batch: (position.chain, position.seq + 1),
            appended: Arc::new(Mutex::new(position)),
            pause_before_append: std::env::var_os(PAUSE_BEFORE_APPEND).map(PathBuf::from),
        }
    }

    /// Where the log ends as this store last appended it, kept up to date.
    pub fn appended(&self) -> Arc<Mutex<Position>> {
        self.appended.clone()
    }

    fn failpoint(&self) {
        if let Some(trigger) = &self.pause_before_append
            && std::fs::remove_file(trigger).is_ok()
        {
            tracing::warn!("failpoint: holding the leader before an append");
            FROZEN.store(true, std::sync::atomic::Ordering::Release);
            let mut resume = trigger.as_os_str().to_owned();
            resume.push(".resume");
            while std::fs::remove_file(&resume).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
            FROZEN.store(false, std::sync::atomic::Ordering::Release);
            tracing::warn!("failpoint: the leader goes on");
        }
    }
}

impl Log for RedisStore {
    fn snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.log.snapshot()
    }

    fn records(&self, after: u64, visit: &mut RecordVisitor<'_>) -> Result<(), StoreError> {
        self.log.records(after, visit)
    }

    fn location(&self) -> PathBuf {
        self.log.location()
    }
}

impl Store for RedisStore {
    fn append(&mut self, records: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        if !records.is_empty() {
            self.failpoint();
        }
        let redis = &self.log.redis;
        let keys = &redis.keys;
        let mut append = APPEND.prepare_invoke();
        append
            .key(&keys.leader)
            .key(&keys.meta)
            .key(&keys.last)
            .key(&keys.log)
            .arg(&self.leader_value)
            .arg(&self.log_id)
            .arg(self.position.to_string());
        let mut appended = None;
        if let (Some(&(first, _)), Some(&(last, _))) = (records.first(), records.last()) {
            // One entry per batch: a follower reads and parses one entry, not one per record.
            let body = encode_batch(records);
            let chain = chain_after(self.position.chain, &body);
            let mut entry = chain.to_le_bytes().to_vec();
            entry.extend_from_slice(&body);
            let position = Position { seq: last, chain };
            append.arg(last).arg(position.to_string()).arg(entry);
            appended = Some((first, position));
        }
        let _: i64 = append
            .invoke(&mut *self.log.connection.borrow_mut())
            .map_err(|e| redis.write_error(&e))?;
        if let Some((first, position)) = appended {
            self.before_last_batch = (self.position.chain, first);
            self.position = position;
            *self.appended.lock().unwrap_or_else(PoisonError::into_inner) = position;
        }
        Ok(())
    }

    fn save_snapshot(&mut self, seq: u64, snapshot: &[u8]) -> Result<(), StoreError> {
        let redis = &self.log.redis;
        let keys = &redis.keys;
        // The journal writes a snapshot right after the batch it was taken amid, or at the end
        // of the log: the entries after it follow the chain value before that batch, or the last.
        let (chain_before, first) = self.before_last_batch;
        let chain = if seq >= self.position.seq {
            self.position.chain
        } else if seq + 1 >= first {
            chain_before
        } else {
            return Err(StoreError::Write {
                path: redis.path(),
                reason: format!(
                    "a snapshot after record {seq} is older than the last batch (records {first} to {})",
                    self.position.seq
                ),
            });
        };
        let _: i64 = SNAPSHOT
            .key(&keys.leader)
            .key(&keys.meta)
            .key(&keys.snapshot)
            .key(&keys.log)
            .arg(&self.leader_value)
            .arg(&self.log_id)
            .arg(seq)
            .arg(snapshot)
            .arg(chain)
            .invoke(&mut *self.log.connection.borrow_mut())
            .map_err(|e| redis.write_error(&e))?;
        Ok(())
    }

    fn confirm(&mut self) -> Result<(), StoreError> {
        self.append(&[])
    }
}
