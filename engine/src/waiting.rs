//! The waiting lines: one per (pool, model), each served in its waiters' places (see
//! [`super::tenants`]: by class, then fair shares among tenants; first come, first served for
//! one tenant). Each waiter keeps its validated ask: a key, or (a renewal) more requests and
//! tokens on the lease it holds. Each line keeps the groups a waiter could not have at the last
//! pass, with the most urgent class that could not (later arrivals of that class or a lower one
//! keep off them), its waiters' exclusion ends, and when it must be looked at again though
//! nothing was freed.

use super::catalogue::GroupKey;
use super::ids::{KeyIdx, ModelIdx, PoolIdx, Token};
use super::tenants::{Caller, FairClock, Place, Priority};
use super::{Time, WaiterId};
use foldhash::{HashMap, HashMapExt, HashSet};
use std::collections::{BTreeMap, BTreeSet};

/// A validated acquire: what is asked for, of which pool and model, avoiding which keys.
#[derive(Debug, Clone)]
pub(super) struct Ask {
    pub pool: PoolIdx,
    pub model: ModelIdx,
    pub ttl_ms: u64,
    pub requests: u64,
    pub tokens: u64,
    /// Keys the caller asked to exclude.
    pub excluded: HashSet<KeyIdx>,
}

impl Ask {
    pub fn line(&self) -> Line {
        (self.pool, self.model)
    }
}

/// A line's (pool, model).
pub(super) type Line = (PoolIdx, ModelIdx);

#[derive(Debug, Clone)]
pub(super) struct Waiter {
    pub task_id: String,
    pub ask: Ask,
    pub client_request_id: Option<String>,
    /// When the task's exclusions that were running as it joined the line end.
    pub exclusion_ends: Vec<u64>,
    /// A renewal's: the live lease whose group must afford the ask's requests and tokens. It
    /// needs no free key, and leaves the line when the lease ends.
    pub renews: Option<Token>,
    /// Whom it waits for, and its place in line.
    pub tenant: String,
    pub place: Place,
}

/// Groups a waiter could not have at the last pass, with the most urgent class that could not.
pub(super) type Blocked = HashMap<GroupKey, Priority>;

/// The line for one (pool, model).
#[derive(Debug, Default)]
pub(super) struct WaitQueue {
    /// By id: ids only grow, so in arrival order. A map, so that a waiter leaves from anywhere
    /// in the line in O(log n).
    pub waiters: BTreeMap<WaiterId, Waiter>,
    /// The line's order: each waiter's place, then its id.
    order: BTreeSet<(Place, WaiterId)>,
    /// Where the line's fair queueing stands.
    pub clock: FairClock,
    /// Groups a waiter could not have at the last pass (spent or cooling): later arrivals of
    /// that class or a lower one keep off them.
    pub blocked: Blocked,
    /// (end, waiter) of the waiters' exclusions: the line is looked at again when one ends.
    exclusion_ends: BTreeSet<(u64, WaiterId)>,
    /// When the books next change by themselves, so the line is looked at again.
    pub wake_at_ms: Option<u64>,
    /// How many of its waiters are renewals: they may be served when no key is free.
    renewals: usize,
}

impl WaitQueue {
    pub fn push(&mut self, id: WaiterId, waiter: Waiter) {
        for &end in &waiter.exclusion_ends {
            self.exclusion_ends.insert((end, id));
        }
        self.renewals += usize::from(waiter.renews.is_some());
        self.order.insert((waiter.place, id));
        self.waiters.insert(id, waiter);
    }

    pub fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        self.order.remove(&(waiter.place, id));
        for &end in &waiter.exclusion_ends {
            self.exclusion_ends.remove(&(end, id));
        }
        self.renewals -= usize::from(waiter.renews.is_some());
        Some(waiter)
    }

    /// The first waiter in line order.
    pub fn first(&self) -> Option<(Place, WaiterId)> {
        self.order.first().copied()
    }

    /// The waiter after `at` in line order.
    pub fn after(&self, at: (Place, WaiterId)) -> Option<(Place, WaiterId)> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.order.range((Excluded(at), Unbounded)).next().copied()
    }

    /// The groups a new arrival of class `priority` keeps off.
    pub fn blocked_for(&self, priority: Priority) -> Blocked {
        self.blocked
            .iter()
            .filter(|&(_, &class)| class <= priority)
            .map(|(&group, &class)| (group, class))
            .collect()
    }

    pub fn has_renewals(&self) -> bool {
        self.renewals > 0
    }

    /// The first of its waiters' exclusions to end after `time`.
    pub fn next_exclusion_end(&self, time: Time) -> Option<u64> {
        self.exclusion_ends
            .range((time.steady_ms + 1, 0)..)
            .next()
            .map(|&(end, _)| end)
    }
}

#[derive(Debug)]
pub(super) struct Lines {
    queues: BTreeMap<Line, WaitQueue>,
    /// The line each waiter stands in.
    line_of: HashMap<WaiterId, Line>,
    /// (lease, waiter) of the renewals in line: they leave when their lease ends.
    renewals: BTreeSet<(Token, WaiterId)>,
    next_waiter: WaiterId,
}

impl Lines {
    pub fn new() -> Self {
        Self {
            queues: BTreeMap::new(),
            line_of: HashMap::new(),
            renewals: BTreeSet::new(),
            next_waiter: 1,
        }
    }

    pub fn has_waiters(&self) -> bool {
        !self.line_of.is_empty()
    }

    /// A new waiter's id: ids only grow.
    pub fn next_id(&mut self) -> WaiterId {
        let id = self.next_waiter;
        self.next_waiter += 1;
        id
    }

    pub fn next_waiter(&self) -> WaiterId {
        self.next_waiter
    }

    /// Puts waiter `id` in its line, placed for `caller` (rules 9 on; before, in arrival
    /// order), and the line's blocked groups grow by `blocked`.
    pub fn join(
        &mut self,
        id: WaiterId,
        mut waiter: Waiter,
        caller: Option<&Caller>,
        blocked: Vec<GroupKey>,
    ) {
        let line = waiter.ask.line();
        let queue = self.queues.entry(line).or_default();
        if let Some(caller) = caller {
            waiter.tenant.clone_from(&caller.tenant);
            waiter.place = queue.clock.place(caller, waiter.ask.requests);
        }
        let class = waiter.place.priority;
        for group in blocked {
            let most_urgent = queue.blocked.entry(group).or_insert(class);
            *most_urgent = (*most_urgent).min(class);
        }
        if let Some(token) = waiter.renews {
            self.renewals.insert((token, id));
        }
        queue.push(id, waiter);
        self.line_of.insert(id, line);
    }

    /// When the line must next be looked at though nothing was freed.
    pub fn set_wake(&mut self, line: Line, at_ms: Option<u64>) {
        if let Some(queue) = self.queues.get_mut(&line) {
            queue.wake_at_ms = at_ms;
        }
    }

    /// Takes waiter `id` out of its line. With it, whether those behind it may now get
    /// something (the line holds groups back).
    pub fn leave(&mut self, id: WaiterId) -> Option<(Waiter, bool)> {
        let line = self.line_of.remove(&id)?;
        let queue = self.queues.get_mut(&line).expect("a waiter's line exists");
        let waiter = queue.remove(id).expect("a waiter is in its line");
        if let Some(token) = waiter.renews {
            self.renewals.remove(&(token, id));
        }
        let unblocks = if queue.waiters.is_empty() {
            self.queues.remove(&line);
            false
        } else {
            !queue.blocked.is_empty()
        };
        Some((waiter, unblocks))
    }

    /// Every waiter leaves; how many there were.
    pub fn clear(&mut self) -> usize {
        let count = self.line_of.len();
        self.queues.clear();
        self.line_of.clear();
        self.renewals.clear();
        count
    }

    /// The renewals waiting on lease `token`.
    pub fn renewals_of(&self, token: Token) -> Vec<WaiterId> {
        self.renewals
            .range((token, 0)..=(token, WaiterId::MAX))
            .map(|&(_, id)| id)
            .collect()
    }

    pub fn lines(&self) -> Vec<Line> {
        self.queues.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Line, &WaitQueue)> {
        self.queues.iter().map(|(&line, queue)| (line, queue))
    }

    pub fn queue(&self, line: Line) -> Option<&WaitQueue> {
        self.queues.get(&line)
    }

    /// Takes a line out to serve it; [`Lines::put_back`] returns it.
    pub fn take(&mut self, line: Line) -> WaitQueue {
        std::mem::take(self.queues.get_mut(&line).expect("a listed line"))
    }

    /// Returns a line taken out, without the waiters `served` (granted or failed), each with
    /// the lease it renewed.
    pub fn put_back(&mut self, line: Line, queue: WaitQueue, served: &[(WaiterId, Option<Token>)]) {
        for &(id, renewed) in served {
            self.line_of.remove(&id);
            if let Some(token) = renewed {
                self.renewals.remove(&(token, id));
            }
        }
        if queue.waiters.is_empty() {
            self.queues.remove(&line);
        } else {
            self.queues.insert(line, queue);
        }
    }

    /// The earliest time a line must be looked at again.
    pub fn next_wake(&self) -> Option<u64> {
        self.queues.values().filter_map(|q| q.wake_at_ms).min()
    }

    pub fn wake_due(&self, now_ms: u64) -> bool {
        self.queues
            .values()
            .any(|q| q.wake_at_ms.is_some_and(|at| at <= now_ms))
    }

    /// Puts a whole line back (recovery).
    pub fn restore_line(&mut self, line: Line, queue: WaitQueue) {
        for (&id, waiter) in &queue.waiters {
            self.line_of.insert(id, line);
            if let Some(token) = waiter.renews {
                self.renewals.insert((token, id));
            }
        }
        self.queues.insert(line, queue);
    }

    /// Waiter ids continue from `next` (recovery).
    pub fn set_next_waiter(&mut self, next: WaiterId) {
        self.next_waiter = next;
    }
}
