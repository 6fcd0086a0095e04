//! What the engine remembers of failures and of clients: each task's exclusions of keys it
//! failed on, each project's run of rate-limit cooldowns (the backoff), and the lease each client
//! request id was granted. Tasks and request ids are bounded, the least recently touched
//! forgotten first, so that no client can grow the server without limit.

use super::ids::Token;
use super::ids::{KeyIdx, PoolIdx, ProjectIdx};
use foldhash::{HashMap, HashMapExt, HashSet};
use lru::LruCache;
use std::num::NonZeroUsize;

/// Keys a task failed on, with when each exclusion ends.
pub(super) type TaskExclusions = Vec<(KeyIdx, u64)>;

#[derive(Debug)]
pub(super) struct Memory {
    exclusions: LruCache<String, TaskExclusions>,
    /// Consecutive rate-limit cooldowns without a provider delay, per (pool, project).
    backoff: HashMap<(PoolIdx, ProjectIdx), u32>,
    request_ids: LruCache<String, Token>,
}

impl Memory {
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            exclusions: LruCache::new(capacity),
            backoff: HashMap::new(),
            request_ids: LruCache::new(capacity),
        }
    }

    /// Whether `task` keeps off `key` at `now`.
    pub fn excludes(&self, task: &str, key: KeyIdx, now: u64) -> bool {
        self.exclusions
            .peek(task)
            .is_some_and(|list| list.iter().any(|&(k, until)| k == key && until > now))
    }

    /// The keys `task` keeps off at `now`.
    pub fn excluded_keys(&self, task: &str, now: u64) -> Vec<KeyIdx> {
        self.running(task, now).map(|(key, _)| key).collect()
    }

    /// When each of `task`'s exclusions running at `now` ends.
    pub fn exclusion_ends(&self, task: &str, now: u64) -> Vec<u64> {
        self.running(task, now).map(|(_, until)| until).collect()
    }

    /// The first end of `task`'s exclusions at `now`, of keys it did not itself ask to exclude.
    pub fn first_exclusion_end(
        &self,
        task: &str,
        asked: &HashSet<KeyIdx>,
        now: u64,
    ) -> Option<u64> {
        self.running(task, now)
            .filter(|(key, _)| !asked.contains(key))
            .map(|(_, until)| until)
            .min()
    }

    fn running(&self, task: &str, now: u64) -> impl Iterator<Item = (KeyIdx, u64)> + '_ {
        self.exclusions
            .peek(task)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |&(_, until)| until > now)
    }

    /// `task` keeps off `key` until `until`.
    pub fn exclude(&mut self, task: &str, key: KeyIdx, until: u64, now: u64) {
        let list = self
            .exclusions
            .get_or_insert_mut(task.to_string(), Vec::new);
        list.retain(|&(k, u)| k != key && u > now);
        list.push((key, until));
    }

    /// Counts one more rate-limit cooldown of the project; how many came before it.
    pub fn back_off(&mut self, pool: PoolIdx, project: ProjectIdx) -> u32 {
        let count = self.backoff.entry((pool, project)).or_insert(0);
        let before = *count;
        *count = count.saturating_add(1);
        before
    }

    /// A call went through: the project's backoff starts over.
    pub fn reset_backoff(&mut self, pool: PoolIdx, project: ProjectIdx) {
        self.backoff.remove(&(pool, project));
    }

    /// The lease a client request id was granted, if remembered.
    pub fn request(&self, id: &str) -> Option<Token> {
        self.request_ids.peek(id).copied()
    }

    pub fn remember_request(&mut self, id: String, token: Token) {
        self.request_ids.put(id, token);
    }

    // For images: each list in the order a restore puts it back.

    /// (task, exclusions), least recently touched first.
    pub fn exclusions_oldest_first(&self) -> impl Iterator<Item = (&String, &TaskExclusions)> {
        self.exclusions.iter().rev()
    }

    pub fn restore_exclusions(&mut self, task: String, list: TaskExclusions) {
        self.exclusions.put(task, list);
    }

    pub fn backoffs(&self) -> impl Iterator<Item = ((PoolIdx, ProjectIdx), u32)> + '_ {
        self.backoff.iter().map(|(&group, &count)| (group, count))
    }

    pub fn restore_backoff(&mut self, pool: PoolIdx, project: ProjectIdx, count: u32) {
        self.backoff.insert((pool, project), count);
    }

    /// (request id, token), least recently touched first.
    pub fn requests_oldest_first(&self) -> impl Iterator<Item = (&String, Token)> {
        self.request_ids
            .iter()
            .rev()
            .map(|(id, &token)| (id, token))
    }
}
