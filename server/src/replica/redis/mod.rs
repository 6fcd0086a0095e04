//! The shared log in Redis, and who may write it. Keys live under one hash tag, `{NAMESPACE}`:
//!
//! - `meta`: a hash with the log's `id` (new for every log, so a replica can tell another log
//!   from the one it followed) and `reset_ms` when an operator confirmed a reset.
//! - `leader`: `EPOCH ID ADDRESS` of the replica that leads, with a TTL it renews.
//! - `epoch`: the highest epoch ever granted; each leadership takes one above it.
//! - `last`: the log's [`Position`]: `SEQ CHAIN`, its last record and chain value.
//! - `log`: a stream of the records, one entry per batch the leader appended: entry id
//!   `SEQ-0` (its last record), field `r` holding the batch's chain value and its records with
//!   their numbers. The chain value hashes the one before with the batch, so two logs that
//!   differ anywhere differ in every chain value after: a replica that applied records Redis
//!   has since lost notices the log that grew in their place.
//! - `snapshot`: a hash with `seq`, `data` (the whole state after record `seq`) and `chain` (the
//!   chain value before the first entry not wholly covered); the stream holds only the entries
//!   after it.
//! - `replicas`: a hash of every replica's address and keys (ids and fingerprints, never a
//!   secret), for spotting replicas whose key sets differ.
//!
//! Every write a leader makes goes through a script that first checks that `leader` still holds
//! its own value and `meta` its log's id: a replica that lost the leadership (paused,
//! partitioned, slow) can never write, and an append also checks the last record number, so a
//! retried batch can never land twice. Nothing here decides a lease: the rules stay in the
//! engine, and Redis only orders and keeps what the leader decided.

use crate::store::{Log, RecordVisitor, Store, StoreError, decode_batch, encode_batch};
use redis::{Commands, Connection, Script};
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

mod writer;
pub use writer::{PAUSE_BEFORE_APPEND, RedisStore, frozen};

/// Longest a Redis call may take before it counts as failed: callers then get `UNAVAILABLE`
/// quickly rather than hang, and a leader whose append timed out steps down.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries read from the stream at once.
const READ_BATCH: usize = 2_000;

/// Takes the leadership when no one holds it, for a log with the expected id, with an epoch
/// above any granted before and above the floor the replica brings (the highest it has seen).
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('HGET', KEYS[3], 'id') ~= ARGV[5] then return redis.error_reply('KEYLEASE_LOG_CHANGED the log in Redis is not the one this replica follows') end
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
local floor = tonumber(ARGV[4])
if floor > epoch then epoch = floor end
epoch = epoch + 1
redis.call('SET', KEYS[2], epoch)
local value = epoch .. ' ' .. ARGV[1] .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
",
    )
});

/// Extends the leadership only while it is still this replica's.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Gives the leadership up at a clean shutdown, only if it is still this replica's.
static RESIGN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
",
    )
});

/// Appends a batch ending at record `ARGV[4]` (the entry `ARGV[6]`) after the position
/// `ARGV[3]`, as the leader `ARGV[1]` of log `ARGV[2]`, making `ARGV[5]` the position; with no
/// batch, only checks that it still may.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('KEYLEASE_NOT_LEADER this replica no longer leads') end
if redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then return redis.error_reply('KEYLEASE_LOG_CHANGED the log in Redis was replaced') end
local last = redis.call('GET', KEYS[3]) or '0 0'
if last ~= ARGV[3] then return redis.error_reply('KEYLEASE_LOG_MOVED the log ends at ' .. last .. ', not ' .. ARGV[3]) end
if #ARGV < 6 then return 0 end
redis.call('XADD', KEYS[4], ARGV[4] .. '-0', 'r', ARGV[6])
redis.call('SET', KEYS[3], ARGV[5])
return 1
",
    )
});

/// Keeps a snapshot after record `ARGV[3]` (chain value `ARGV[5]`) and trims the entries it
/// covers, as the leader.
static SNAPSHOT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('KEYLEASE_NOT_LEADER this replica no longer leads') end
if redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then return redis.error_reply('KEYLEASE_LOG_CHANGED the log in Redis was replaced') end
redis.call('HSET', KEYS[3], 'seq', ARGV[3], 'data', ARGV[4], 'chain', ARGV[5])
redis.call('XTRIM', KEYS[4], 'MINID', (tonumber(ARGV[3]) + 1) .. '-0')
return 1
",
    )
});

/// The names of a namespace's keys.
#[derive(Debug, Clone)]
pub struct Keys {
    pub meta: String,
    pub leader: String,
    pub epoch: String,
    pub last: String,
    pub log: String,
    pub snapshot: String,
    pub replicas: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        let key = |name: &str| format!("{{{namespace}}}:{name}");
        Self {
            meta: key("meta"),
            leader: key("leader"),
            epoch: key("epoch"),
            last: key("last"),
            log: key("log"),
            snapshot: key("snapshot"),
            replicas: key("replicas"),
        }
    }
}

/// One Redis and a namespace in it: how to connect, and where things are.
#[derive(Debug, Clone)]
pub struct Redis {
    client: redis::Client,
    pub keys: Keys,
    /// `redis://HOST:PORT/DB {NAMESPACE}`, without credentials: for messages.
    pub location: String,
}

impl Redis {
    /// `url` was checked when the configuration was read (see [`crate::config`]).
    pub fn new(url: &str, namespace: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let info = client.get_connection_info();
        let location = format!(
            "redis://{}/{} {{{namespace}}}",
            info.addr(),
            info.redis_settings().db()
        );
        Ok(Self {
            client,
            keys: Keys::new(namespace),
            location,
        })
    }

    /// A connection whose calls fail after [`CALL_TIMEOUT`].
    pub fn connect(&self) -> Result<Connection, StoreError> {
        let connection = self
            .client
            .get_connection_with_timeout(CALL_TIMEOUT)
            .map_err(|e| self.io(&e))?;
        connection
            .set_read_timeout(Some(CALL_TIMEOUT))
            .and_then(|()| connection.set_write_timeout(Some(CALL_TIMEOUT)))
            .map_err(|e| self.io(&e))?;
        Ok(connection)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.location)
    }

    /// A failure to reach or read Redis.
    pub fn io(&self, error: &redis::RedisError) -> StoreError {
        StoreError::Io {
            path: self.path(),
            reason: describe(error),
        }
    }

    /// A failure to write: what was not written was never acknowledged.
    fn write_error(&self, error: &redis::RedisError) -> StoreError {
        StoreError::Write {
            path: self.path(),
            reason: describe(error),
        }
    }
}

/// A Redis error in words: our scripts' refusals without their code, the rest as Redis said it.
fn describe(error: &redis::RedisError) -> String {
    match (error.code(), error.detail()) {
        (Some(code), Some(detail)) if code.starts_with("KEYLEASE_") => detail.to_string(),
        _ if error.is_timeout() => format!("no answer within {CALL_TIMEOUT:?}"),
        _ => error.to_string(),
    }
}

/// Where a log ends: its last record, and the chain value of the entry that holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub chain: u64,
}

impl Position {
    pub fn parse(text: &str) -> Option<Self> {
        let (seq, chain) = text.split_once(' ')?;
        Some(Self {
            seq: seq.parse().ok()?,
            chain: chain.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.seq, self.chain)
    }
}

/// The chain value after an entry whose records encode to `body`, following `before`.
pub fn chain_after(before: u64, body: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(before.to_le_bytes())
        .chain_update(body)
        .finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// One stream entry: a batch ending at record `last`, its chain value, and its records.
pub struct Entry<'a> {
    pub last: u64,
    pub chain: u64,
    /// The records, encoded: what the chain value hashes.
    pub body: &'a [u8],
}

impl Entry<'_> {
    /// Its records with their numbers.
    pub fn records(&self) -> Result<Vec<(u64, &[u8])>, postcard::Error> {
        decode_batch(self.body)
    }
}

/// What a replica finds in Redis about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHead {
    /// `None`: no log at all (a new Redis, or one that lost everything).
    pub id: Option<String>,
    /// When an operator last confirmed a reset of this log (wall ms).
    pub reset_ms: Option<u64>,
    pub last: Position,
    /// The leadership: `(epoch, replica id, address)`.
    pub leader: Option<Leader>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub epoch: u64,
    pub id: String,
    pub address: String,
    /// The value as stored, which only its holder's scripts match.
    pub value: String,
}

impl Leader {
    fn parse(value: String) -> Option<Self> {
        let mut parts = value.splitn(3, ' ');
        let epoch = parts.next()?.parse().ok()?;
        let id = parts.next()?.to_string();
        let address = parts.next()?.to_string();
        Some(Self {
            epoch,
            id,
            address,
            value,
        })
    }
}

/// Reads the log's id, its end and its leader, in one round trip.
pub fn head(redis: &Redis, connection: &mut Connection) -> Result<LogHead, StoreError> {
    let keys = &redis.keys;
    let (id, reset_ms, last, leader): (
        Option<String>,
        Option<u64>,
        Option<String>,
        Option<String>,
    ) = redis::pipe()
        .hget(&keys.meta, "id")
        .hget(&keys.meta, "reset_ms")
        .get(&keys.last)
        .get(&keys.leader)
        .query(connection)
        .map_err(|e| redis.io(&e))?;
    Ok(LogHead {
        id,
        reset_ms,
        last: match last {
            None => Position::default(),
            Some(text) => Position::parse(&text).ok_or_else(|| StoreError::Unreadable {
                path: redis.path(),
                reason: format!("{}: {text:?} is not a log position", keys.last),
            })?,
        },
        leader: leader.and_then(Leader::parse),
    })
}

/// Starts a new log when Redis has none; `reset_ms`: an operator confirmed it. Returns the id
/// of the log Redis now has (another replica's, if it was quicker).
pub fn create_log(
    redis: &Redis,
    connection: &mut Connection,
    new_id: &str,
    reset_ms: Option<u64>,
) -> Result<String, StoreError> {
    let keys = &redis.keys;
    let created: bool = connection
        .hset_nx(&keys.meta, "id", new_id)
        .map_err(|e| redis.io(&e))?;
    if created {
        // Whatever a lost log left behind belongs to no log now.
        let _: () = redis::pipe()
            .del(&keys.last)
            .del(&keys.log)
            .del(&keys.snapshot)
            .query(connection)
            .map_err(|e| redis.io(&e))?;
    }
    if let Some(reset_ms) = reset_ms {
        confirm_reset(redis, connection, reset_ms)?;
    }
    let id: Option<String> = connection
        .hget(&keys.meta, "id")
        .map_err(|e| redis.io(&e))?;
    id.ok_or_else(|| StoreError::Io {
        path: redis.path(),
        reason: "the log's id vanished as it was created".into(),
    })
}

/// Marks the log as confirmed by an operator: replicas that refused to follow it adopt it.
pub fn confirm_reset(
    redis: &Redis,
    connection: &mut Connection,
    reset_ms: u64,
) -> Result<(), StoreError> {
    connection
        .hset(&redis.keys.meta, "reset_ms", reset_ms)
        .map_err(|e| redis.io(&e))
}

/// Takes the leadership of log `log_id` if no one holds it: `None` when someone does.
pub fn take_leadership(
    redis: &Redis,
    connection: &mut Connection,
    identity: &str,
    address: &str,
    ttl: Duration,
    epoch_floor: u64,
    log_id: &str,
) -> Result<Option<Leader>, StoreError> {
    let keys = &redis.keys;
    let taken: Option<String> = TAKE
        .key(&keys.leader)
        .key(&keys.epoch)
        .key(&keys.meta)
        .arg(identity)
        .arg(address)
        .arg(ttl.as_millis() as u64)
        .arg(epoch_floor)
        .arg(log_id)
        .invoke(connection)
        .map_err(|e| redis.io(&e))?;
    Ok(taken.and_then(Leader::parse))
}

/// Extends the leadership `value` by `ttl`: `false` when it is no longer held.
pub fn renew_leadership(
    redis: &Redis,
    connection: &mut Connection,
    value: &str,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let renewed: i64 = RENEW
        .key(&redis.keys.leader)
        .arg(value)
        .arg(ttl.as_millis() as u64)
        .invoke(connection)
        .map_err(|e| redis.io(&e))?;
    Ok(renewed == 1)
}

pub fn resign_leadership(
    redis: &Redis,
    connection: &mut Connection,
    value: &str,
) -> Result<(), StoreError> {
    let _: i64 = RESIGN
        .key(&redis.keys.leader)
        .arg(value)
        .invoke(connection)
        .map_err(|e| redis.io(&e))?;
    Ok(())
}

/// Reads the log as any replica may: the snapshot and the records after it.
pub struct RedisLog {
    redis: Redis,
    connection: RefCell<Connection>,
}

impl RedisLog {
    pub fn open(redis: Redis) -> Result<Self, StoreError> {
        let connection = RefCell::new(redis.connect()?);
        Ok(Self { redis, connection })
    }
}

impl Log for RedisLog {
    fn snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.snapshot_and_chain()?.map(|(bytes, _)| bytes))
    }

    fn records(&self, after: u64, visit: &mut RecordVisitor<'_>) -> Result<(), StoreError> {
        self.entries(after, &mut |entry: Entry<'_>| -> Result<(), StoreError> {
            let records = entry
                .records()
                .map_err(|_| self.unreadable(&format!("{}-0", entry.last)))?;
            for (seq, record) in records {
                // A snapshot may have been taken amid a batch: what it covers is skipped.
                if seq > after {
                    visit(seq, record)?;
                }
            }
            Ok(())
        })
    }

    fn location(&self) -> PathBuf {
        self.redis.path()
    }
}

impl RedisLog {
    /// The snapshot, with the chain value the entries after it follow.
    pub fn snapshot_and_chain(&self) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let (data, chain): (Option<Vec<u8>>, Option<u64>) = ::redis::cmd("HMGET")
            .arg(&self.redis.keys.snapshot)
            .arg("data")
            .arg("chain")
            .query(&mut *self.connection.borrow_mut())
            .map_err(|e| self.redis.io(&e))?;
        Ok(data.map(|data| (data, chain.unwrap_or(0))))
    }

    /// The entries that end after record `after`, in order.
    pub fn entries<E: From<StoreError>>(
        &self,
        after: u64,
        visit: &mut dyn FnMut(Entry<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut connection = self.connection.borrow_mut();
        let mut from = after;
        loop {
            let entries: Vec<(String, Vec<Vec<u8>>)> = ::redis::cmd("XRANGE")
                .arg(&self.redis.keys.log)
                .arg(format!("({from}-0"))
                .arg("+")
                .arg("COUNT")
                .arg(READ_BATCH)
                .query(&mut *connection)
                .map_err(|e| self.redis.io(&e))?;
            let done = entries.len() < READ_BATCH;
            for (id, fields) in &entries {
                let entry = self.entry(id, fields)?;
                from = entry.last;
                visit(entry)?;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// The entries that end after record `after`, as soon as there are some, waiting up to
    /// `timeout`.
    pub fn read_after<E: From<StoreError>>(
        &self,
        after: u64,
        timeout: Duration,
        visit: &mut dyn FnMut(Entry<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        type Streams = Option<Vec<(String, Vec<(String, Vec<Vec<u8>>)>)>>;
        let streams: Streams = ::redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(timeout.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.redis.keys.log)
            .arg(format!("{after}-0"))
            .query(&mut *self.connection.borrow_mut())
            .map_err(|e| self.redis.io(&e))?;
        for (_, entries) in streams.into_iter().flatten() {
            for (id, fields) in &entries {
                visit(self.entry(id, fields)?)?;
            }
        }
        Ok(())
    }

    /// `r` holds the chain value (8 bytes, little-endian) and then the records.
    fn entry<'b>(&self, id: &str, fields: &'b [Vec<u8>]) -> Result<Entry<'b>, StoreError> {
        let last = entry_seq(id).ok_or_else(|| self.unreadable(id))?;
        match fields {
            [name, value] if name == b"r" && value.len() >= 8 => {
                let (chain, body) = value.split_at(8);
                let mut bytes = [0; 8];
                bytes.copy_from_slice(chain);
                Ok(Entry {
                    last,
                    chain: u64::from_le_bytes(bytes),
                    body,
                })
            }
            _ => Err(self.unreadable(id)),
        }
    }

    fn unreadable(&self, id: &str) -> StoreError {
        StoreError::Unreadable {
            path: self.redis.path(),
            reason: format!("stream entry {id} is not a keylease record"),
        }
    }
}

/// `SEQ-0` → `SEQ`.
fn entry_seq(id: &str) -> Option<u64> {
    id.strip_suffix("-0")?.parse().ok()
}
