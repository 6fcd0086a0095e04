//! The lease table: live leases by fencing token, their expiries in deadline order, each task's
//! live leases, the fencing counter, and ended leases remembered for late reports. Tokens only
//! grow, and a lease id names its token, so an id alone says whether a lease could exist.

use super::ids::{KeyIdx, ModelIdx, Token};
use super::quota::Amount;
use super::{EngineError, Usage};
use foldhash::{HashMap, HashMapExt};
use keylease_core::MAX_INPUT_TOKENS;
use lru::LruCache;
use std::collections::BTreeSet;
use std::num::NonZeroUsize;

const LEASE_ID_PREFIX: &str = "lease-";

pub fn lease_id(token: Token) -> String {
    format!("{LEASE_ID_PREFIX}{token}")
}

#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub key: KeyIdx,
    pub task_id: String,
    pub model: ModelIdx,
    pub requests: u64,
    pub tokens: u64,
    pub ttl_ms: u64,
    pub expires_ms: u64,
}

impl Lease {
    /// What the lease holds on its group's books.
    pub fn reserved(&self) -> Amount {
        Amount {
            requests: self.requests,
            tokens: self.tokens,
        }
    }

    /// What its holder says it used, as the books take it: requests at most those granted,
    /// tokens at most [`MAX_INPUT_TOKENS`]; what is not said, as reserved.
    pub fn used(&self, usage: Usage) -> Amount {
        Amount {
            requests: usage
                .requests_sent
                .map_or(self.requests, |sent| u64::from(sent).min(self.requests)),
            tokens: usage
                .input_tokens
                .map_or(self.tokens, |tokens| tokens.min(MAX_INPUT_TOKENS)),
        }
    }
}

#[derive(Debug)]
pub(super) struct LeaseTable {
    live: HashMap<Token, Lease>,
    /// (expires, token) of every live lease.
    expiries: BTreeSet<(u64, Token)>,
    /// Live leases of each task, oldest first.
    by_task: HashMap<String, Vec<Token>>,
    next_token: Token,
    /// Leases that ended, as they last were: to act on late evidence of a bad key. Bounded,
    /// the least recently touched forgotten first.
    ended: LruCache<Token, Lease>,
}

impl LeaseTable {
    pub fn new(first_token: Token, memory_capacity: usize) -> Self {
        Self {
            live: HashMap::new(),
            expiries: BTreeSet::new(),
            by_task: HashMap::new(),
            next_token: first_token.max(1),
            ended: LruCache::new(NonZeroUsize::new(memory_capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// Grants `lease` the next fencing token.
    pub fn issue(&mut self, lease: Lease) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        self.insert(token, lease);
        token
    }

    /// Puts a live lease back under its own token (recovery).
    pub fn insert(&mut self, token: Token, lease: Lease) {
        self.expiries.insert((lease.expires_ms, token));
        self.by_task
            .entry(lease.task_id.clone())
            .or_default()
            .push(token);
        self.live.insert(token, lease);
    }

    /// Ends a live lease; it is remembered as it ended.
    pub fn end(&mut self, token: Token) -> Lease {
        let lease = self.live.remove(&token).expect("a live lease");
        self.expiries.remove(&(lease.expires_ms, token));
        if let Some(tokens) = self.by_task.get_mut(&lease.task_id) {
            tokens.retain(|&t| t != token);
            if tokens.is_empty() {
                self.by_task.remove(&lease.task_id);
            }
        }
        self.ended.put(token, lease.clone());
        lease
    }

    /// Remembers an ended lease (recovery), as the most recently touched.
    pub fn remember_ended(&mut self, token: Token, lease: Lease) {
        self.ended.put(token, lease);
    }

    pub fn get(&self, token: Token) -> Option<&Lease> {
        self.live.get(&token)
    }

    pub fn is_live(&self, token: Token) -> bool {
        self.live.contains_key(&token)
    }

    /// Gives a live lease a new TTL from `now_ms`.
    pub fn extend(&mut self, token: Token, ttl_ms: u64, now_ms: u64) {
        let lease = self.live.get_mut(&token).expect("a live lease");
        self.expiries.remove(&(lease.expires_ms, token));
        lease.ttl_ms = ttl_ms;
        lease.expires_ms = now_ms + ttl_ms;
        self.expiries.insert((lease.expires_ms, token));
    }

    /// Adds to what a live lease holds on its group's books.
    pub fn add_reservation(&mut self, token: Token, requests: u64, tokens: u64) {
        let lease = self.live.get_mut(&token).expect("a live lease");
        lease.requests += requests;
        lease.tokens += tokens;
    }

    /// The live lease that expires first, and when.
    pub fn first_expiry(&self) -> Option<(u64, Token)> {
        self.expiries.first().copied()
    }

    /// The task's live leases, oldest first.
    pub fn of_task(&self, task: &str) -> &[Token] {
        self.by_task.get(task).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Token, &Lease)> {
        self.live.iter().map(|(&token, lease)| (token, lease))
    }

    /// Ended leases remembered, least recently touched first.
    pub fn ended_oldest_first(&self) -> impl Iterator<Item = (Token, &Lease)> {
        self.ended
            .iter()
            .rev()
            .map(|(&token, lease)| (token, lease))
    }

    pub fn ended(&self, token: Token) -> Option<&Lease> {
        self.ended.peek(&token)
    }

    pub fn next_token(&self) -> Token {
        self.next_token
    }

    /// Moves the counter up to `token` (recovery); never down.
    pub fn raise_next_token(&mut self, token: Token) {
        self.next_token = self.next_token.max(token);
    }

    /// The token a lease id names, if such a lease can have been granted.
    pub fn known_token(&self, lease_id: &str) -> Result<Token, EngineError> {
        lease_id
            .strip_prefix(LEASE_ID_PREFIX)
            .and_then(|t| t.parse::<Token>().ok())
            .filter(|&t| t > 0 && t < self.next_token)
            .ok_or_else(|| EngineError::LeaseNotFound(lease_id.to_string()))
    }

    /// The live lease `lease_id` if `fencing_token` is its own.
    pub fn live_token(&self, lease_id: &str, fencing_token: u64) -> Result<Token, EngineError> {
        let token = self.known_token(lease_id)?;
        if !self.live.contains_key(&token) {
            return Err(EngineError::StaleLease {
                lease_id: lease_id.to_string(),
                reason: "it has ended".into(),
            });
        }
        if token != fencing_token {
            return Err(EngineError::StaleLease {
                lease_id: lease_id.to_string(),
                reason: format!("fencing token {fencing_token} is not the lease's"),
            });
        }
        Ok(token)
    }
}
