//! The audit of acknowledged leases, as their clients saw them (times are the clients' own):
//! every test that kills servers or replicas checks what was acknowledged with it.
// Client-side times, not the server's clock.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// One lease as its client saw it.
#[derive(Debug, Clone)]
pub struct Grant {
    pub key_id: String,
    pub project: String,
    pub token: u64,
    /// When the acquire (or the report that rotated to it) was sent, and answered.
    pub asked: Instant,
    pub answered: Instant,
    pub requests: u32,
    /// When its requests were "sent to the provider": between the answer and the release.
    pub used_at: Instant,
    /// The earliest the server can have ended it: its release or report sent, or its TTL out.
    pub ended_no_earlier_than: Instant,
}

/// Key slots (one lease per key): fencing tokens never repeat; no two leases on a key overlap
/// (a later grant was answered after the earlier lease had certainly ended); tokens go up on
/// each key in the order grants were answered.
pub fn check_slots(grants: &[Grant]) {
    let mut tokens = HashSet::new();
    for grant in grants {
        assert!(
            tokens.insert(grant.token),
            "token {} granted twice",
            grant.token
        );
    }
    let mut by_key: HashMap<&str, Vec<&Grant>> = HashMap::new();
    for grant in grants {
        by_key.entry(&grant.key_id).or_default().push(grant);
    }
    for (key, grants) in &mut by_key {
        grants.sort_by_key(|g| g.token);
        for pair in grants.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            assert!(
                later.answered >= earlier.ended_no_earlier_than,
                "{key}: token {} answered {:?} before token {} could have ended",
                later.token,
                earlier.ended_no_earlier_than - later.answered,
                earlier.token
            );
        }
        grants.sort_by_key(|g| g.answered);
        assert!(
            grants.windows(2).all(|p| p[0].token < p[1].token),
            "{key}: tokens went back in the order grants were answered"
        );
    }
}

/// No project's sliding window holds more than `limit` requests, whenever each lease sent.
pub fn check_windows(grants: &[Grant], window: Duration, limit: u32) {
    let mut by_project: BTreeMap<&str, Vec<(Instant, u32)>> = BTreeMap::new();
    for grant in grants {
        by_project
            .entry(&grant.project)
            .or_default()
            .push((grant.used_at, grant.requests));
    }
    for (project, mut uses) in by_project {
        uses.sort_by_key(|u| u.0);
        for (i, &(from, _)) in uses.iter().enumerate() {
            let in_window: u32 = uses[i..]
                .iter()
                .take_while(|u| u.0 < from + window)
                .map(|u| u.1)
                .sum();
            assert!(
                in_window <= limit,
                "{project}: {in_window} requests within one window, above {limit}"
            );
        }
    }
}
