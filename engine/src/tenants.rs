//! Who asks, and how urgently (rules 9 on): the tenant an acquire is made for, the class it
//! waits in, and the tenant's share of a contended line. A line serves its waiters by class
//! first (interactive, normal, batch), then, within a class, by start-time fair queueing
//! among tenants: each waiter's place is its tenant's virtual start, which advances by the
//! requests it asks for divided by the tenant's share, so that tenants waiting side by side
//! are served in proportion to their shares, and a tenant that was not waiting banks nothing
//! (its next start is the line's current one). One tenant alone is served first come, first
//! served: exactly the order before tenants. The shell decides a caller's tenant, class and
//! share (from its configuration) and sends them with the command ([`Caller`]), so that a
//! replay places waiters as the live engine did, whatever the configuration is by then.

use serde::{Deserialize, Serialize};

/// The rules from which waiters are placed by class and share.
pub(crate) const RULES_TENANTS: u32 = 9;

/// The largest share a tenant may have: weights above it tell nothing more.
pub const MAX_SHARE: u32 = 10_000;

/// How many units of virtual start one request of a tenant of share 1 takes: large enough that
/// a share of [`MAX_SHARE`] still advances it.
const TAG_PER_REQUEST: u64 = 1_000_000;

/// How urgently a caller waits: a higher class is served first among contending waiters.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Priority {
    Interactive,
    #[default]
    Normal,
    Batch,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Interactive, Priority::Normal, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Normal => "normal",
            Self::Batch => "batch",
        }
    }
}

/// Whom a command is for, as the shell decided it: the tenant, the class it waits in (already
/// lowered to what the tenant may use) and the tenant's share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub tenant: String,
    pub priority: Priority,
    /// 1 to [`MAX_SHARE`]; anything else is read as the nearest.
    pub share: u32,
}

impl Default for Caller {
    /// The caller of a command that names none: one tenant, normal, of share 1.
    fn default() -> Self {
        Self {
            tenant: String::new(),
            priority: Priority::Normal,
            share: 1,
        }
    }
}

/// A waiter's place in its line: class first, then virtual start, then arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Place {
    pub priority: Priority,
    pub start: u64,
}

impl Place {
    /// Where every waiter stood before rules 9: in arrival order alone.
    pub const ARRIVAL: Place = Place {
        priority: Priority::Normal,
        start: 0,
    };
}

/// One line's fair-queueing clock: where its virtual time stands and where each tenant
/// waiting in it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FairClock {
    /// The start of the last waiter granted.
    pub now: u64,
    /// Each tenant's virtual finish: where its next waiter starts, unless the clock is past it.
    pub finishes: foldhash::HashMap<String, u64>,
}

impl FairClock {
    /// The place of a new waiter of `caller` asking for `requests` (0 counts as 1: a place
    /// costs something), and the tenant's finish moves past it.
    pub fn place(&mut self, caller: &Caller, requests: u64) -> Place {
        let finish = self.finishes.entry(caller.tenant.clone()).or_default();
        let start = (*finish).max(self.now);
        let share = u64::from(caller.share.clamp(1, MAX_SHARE));
        let cost = requests
            .max(1)
            .saturating_mul(TAG_PER_REQUEST)
            .checked_div(share)
            .unwrap_or(TAG_PER_REQUEST);
        *finish = start.saturating_add(cost);
        Place {
            priority: caller.priority,
            start,
        }
    }

    /// A waiter placed at `start` was granted: the clock moves to it, and tenants whose
    /// finish it passed are forgotten (their next waiter starts at the clock anyway).
    pub fn granted(&mut self, start: u64) {
        if start > self.now {
            self.now = start;
            let now = self.now;
            self.finishes.retain(|_, finish| *finish > now);
        }
    }
}
