//! Group commit. Records are queued under the engine's lock, in apply order; one committer
//! thread writes whatever is queued in one durable commit, then publishes how far the log is
//! durable. Replies, waiter grants and streamed events wait for the record they show, so
//! nothing is acknowledged before it would survive a crash, and the lock is never held across
//! I/O. Each commit wakes exactly the calls it makes durable. A write that fails stops the
//! journal: nothing after it is ever acknowledged.

use super::{Store, StoreError};
use keylease_engine::layout::Snapshot;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// How many times the committer lets other threads run before a commit, while they add records.
const GATHER_YIELDS: usize = 8;

/// How far the log is durable, or why it stopped, and who waits for which record.
#[derive(Default)]
struct Durable {
    seq: u64,
    failure: Option<Arc<str>>,
    /// Calls waiting for a record, by its number: woken by the commit that covers it.
    waiting: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Durable {
    /// Whether record `seq` is durable, or can never be.
    fn outcome(&self, seq: u64) -> Option<Result<(), StoreFailed>> {
        if self.seq >= seq {
            return Some(Ok(()));
        }
        self.failure
            .as_ref()
            .map(|failure| Err(StoreFailed(failure.clone())))
    }
}

/// The store stopped writing: the server can acknowledge nothing more.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the state store failed: {0}")]
pub struct StoreFailed(pub Arc<str>);

#[derive(Default)]
struct Queue {
    records: Vec<(u64, Vec<u8>)>,
    snapshot: Option<Snapshot>,
    /// Calls waiting for the store to confirm it may still write.
    confirms: Vec<oneshot::Sender<()>>,
    closing: bool,
}

/// Counters for benchmarks and the start-up log.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Durable commits (each one fsync'd batch).
    pub commits: AtomicU64,
    pub records: AtomicU64,
    /// Time spent in commits, in microseconds (writing and fsync'ing).
    pub commit_micros: AtomicU64,
    pub snapshots: AtomicU64,
    /// Where each commit's duration is counted.
    pub observer: std::sync::OnceLock<Arc<dyn CommitObserver>>,
}

/// Told how long each durable commit took (the server's metrics are).
pub trait CommitObserver: Send + Sync + std::fmt::Debug {
    fn committed(&self, seconds: f64);
}

pub struct Journal {
    queue: Mutex<Queue>,
    queued: Condvar,
    durable: Mutex<Durable>,
    /// Turns true when the store stops writing.
    stopped: watch::Sender<bool>,
    committer: Mutex<Option<JoinHandle<()>>>,
    pub stats: JournalStats,
}

impl Journal {
    /// Starts the committer on `store`, whose log ends at `last_seq`.
    pub fn start(store: Box<dyn Store>, last_seq: u64) -> Arc<Self> {
        let journal = Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            durable: Mutex::new(Durable {
                seq: last_seq,
                ..Durable::default()
            }),
            stopped: watch::Sender::new(false),
            committer: Mutex::new(None),
            stats: JournalStats::default(),
        });
        let committer = {
            let journal = journal.clone();
            std::thread::Builder::new()
                .name("keylease-committer".into())
                .spawn(move || journal.commit_loop(store))
                .expect("the committer thread starts")
        };
        *journal.lock_committer() = Some(committer);
        journal
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_durable(&self) -> MutexGuard<'_, Durable> {
        self.durable.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_committer(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.committer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues record `seq` (called under the engine's lock, so the log keeps apply order).
    pub fn push(&self, seq: u64, record: Vec<u8>) {
        let mut queue = self.lock_queue();
        queue.records.push((seq, record));
        // The committer only sleeps on an empty queue; otherwise it takes this record with the
        // others once its commit is done. So only the first record after a take wakes it.
        if queue.records.len() == 1 {
            self.queued.notify_one();
        }
    }

    /// Queues a snapshot, written once the records it covers are.
    pub fn push_snapshot(&self, snapshot: Snapshot) {
        self.lock_queue().snapshot = Some(snapshot);
        self.queued.notify_one();
    }

    /// Resolves once record `seq` is durable.
    pub async fn wait(&self, seq: u64) -> Result<(), StoreFailed> {
        let woken = {
            let mut durable = self.lock_durable();
            if let Some(outcome) = durable.outcome(seq) {
                return outcome;
            }
            let (wake, woken) = oneshot::channel();
            durable.waiting.entry(seq).or_default().push(wake);
            woken
        };
        let _ = woken.await;
        self.lock_durable()
            .outcome(seq)
            .unwrap_or_else(|| Err(StoreFailed("the committer stopped".into())))
    }

    /// Resolves once the store confirmed, after this call, that it may still write (see
    /// [`Store::confirm`]): what was read before may then be asserted.
    pub async fn confirm(&self) -> Result<(), StoreFailed> {
        let confirmed = {
            let mut queue = self.lock_queue();
            if let Some(failure) = self.failure() {
                return Err(failure);
            }
            let (confirm, confirmed) = oneshot::channel();
            queue.confirms.push(confirm);
            self.queued.notify_one();
            confirmed
        };
        match confirmed.await {
            Ok(()) => Ok(()),
            Err(_) => Err(self
                .failure()
                .unwrap_or_else(|| StoreFailed("the committer stopped".into()))),
        }
    }

    /// Resolves when the store stops writing.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.subscribe();
        let _ = stopped.wait_for(|&stopped| stopped).await;
    }

    /// The last record known durable.
    pub fn durable_seq(&self) -> u64 {
        self.lock_durable().seq
    }

    /// Why the store stopped writing, if it did.
    pub fn failure(&self) -> Option<StoreFailed> {
        self.lock_durable().failure.clone().map(StoreFailed)
    }

    /// Record `seq` and all before it are durable: wakes the calls waiting for them.
    fn made_durable(&self, seq: u64) {
        let woken = {
            let mut durable = self.lock_durable();
            durable.seq = seq;
            let later = durable.waiting.split_off(&(seq + 1));
            std::mem::replace(&mut durable.waiting, later)
        };
        for wake in woken.into_values().flatten() {
            let _ = wake.send(());
        }
    }

    /// The store failed: every waiting call learns it, and so does the server.
    fn failed(&self, error: &StoreError) {
        let woken = {
            let mut durable = self.lock_durable();
            durable.failure = Some(error.to_string().into());
            std::mem::take(&mut durable.waiting)
        };
        for wake in woken.into_values().flatten() {
            let _ = wake.send(());
        }
        // Dropped unanswered: their callers learn the failure.
        drop(std::mem::take(&mut self.lock_queue().confirms));
        self.stopped.send_replace(true);
    }

    /// Writes what is queued, then stops the committer (at shutdown).
    pub fn close(&self) {
        self.lock_queue().closing = true;
        self.queued.notify_one();
        if let Some(committer) = self.lock_committer().take() {
            let _ = committer.join();
        }
    }

    fn commit_loop(&self, mut store: Box<dyn Store>) {
        loop {
            {
                let mut queue = self.lock_queue();
                while queue.records.is_empty()
                    && queue.snapshot.is_none()
                    && queue.confirms.is_empty()
                    && !queue.closing
                {
                    queue = self
                        .queued
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            // Calls being answered on other threads (on the same core, when the machine is
            // busy) may add their records in a moment: one commit then covers them too. Give
            // them that moment while the queue keeps growing, a few times at most.
            let mut queued = self.lock_queue().records.len();
            for _ in 0..GATHER_YIELDS {
                std::thread::yield_now();
                let now_queued = self.lock_queue().records.len();
                if now_queued == queued {
                    break;
                }
                queued = now_queued;
            }
            let (records, snapshot, confirms, closing) = {
                let mut queue = self.lock_queue();
                (
                    std::mem::take(&mut queue.records),
                    queue.snapshot.take(),
                    std::mem::take(&mut queue.confirms),
                    queue.closing,
                )
            };
            // An append confirms as it writes; with nothing to append, the store confirms alone.
            let confirmed = match (confirms.is_empty(), records.is_empty()) {
                (false, true) => store.confirm(),
                _ => Ok(()),
            };
            let written = confirmed.and_then(|()| self.write(&mut *store, &records, snapshot));
            if let Err(error) = written {
                tracing::error!(%error, "state store failed: nothing more is acknowledged");
                // The confirmations are dropped: their callers learn the failure.
                self.failed(&error);
                return;
            }
            for confirm in confirms {
                let _ = confirm.send(());
            }
            if closing && self.lock_queue().records.is_empty() {
                return;
            }
        }
    }

    fn write(
        &self,
        store: &mut dyn Store,
        records: &[(u64, Vec<u8>)],
        snapshot: Option<Snapshot>,
    ) -> Result<(), StoreError> {
        if let Some(&(last, _)) = records.last() {
            // A duration for the statistics, not a reading the engine decides by.
            #[allow(clippy::disallowed_methods)]
            let began = std::time::Instant::now();
            store.append(records)?;
            let took = began.elapsed();
            self.stats
                .commit_micros
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            if let Some(observer) = self.stats.observer.get() {
                observer.committed(took.as_secs_f64());
            }
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            self.stats
                .records
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            self.made_durable(last);
        }
        if let Some(snapshot) = snapshot {
            store.save_snapshot(snapshot.seq, &snapshot.encode())?;
            self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::HookedStore;

    #[tokio::test]
    async fn after_a_failed_write_nothing_more_is_acknowledged() {
        // The disk fails from the second commit on.
        let mut commits = 0;
        let store = HookedStore::new(move || {
            commits += 1;
            match commits {
                1 => Ok(()),
                _ => Err("No space left on device".into()),
            }
        });
        let journal = Journal::start(Box::new(store), 0);
        journal.push(1, vec![1]);
        journal.wait(1).await.expect("the first commit is durable");
        journal.push(2, vec![2]);
        let failed = journal.wait(2).await.expect_err("the second commit failed");
        assert!(
            failed.to_string().contains("No space left on device"),
            "{failed}"
        );
        journal.stopped().await;
        assert!(journal.failure().is_some());
        // What was durable before stays acknowledged; nothing after is.
        journal.wait(1).await.expect("durable before the failure");
        journal.push(3, vec![3]);
        assert!(journal.wait(3).await.is_err());
        journal.close();
    }
}
