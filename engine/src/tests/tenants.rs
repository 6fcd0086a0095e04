//! Waiters placed by class and by their tenants' shares (rules 9).

use super::*;
use crate::tenants::{Caller, Priority};

fn caller(tenant: &str, priority: Priority, share: u32) -> Caller {
    Caller {
        tenant: tenant.into(),
        priority,
        share,
    }
}

/// `task` waiting for a key, for `caller`.
fn wait_for(e: &mut Engine, now: u64, task: &str, caller: &Caller) -> Reply {
    let request = AcquireRequest {
        wait: true,
        ..ask(task)
    };
    e.apply(
        Time::at(now),
        Command::Acquire(request).for_caller(caller.clone()),
    )
    .0
}

fn waiting(reply: Reply) -> WaiterId {
    queued(reply.into_acquired())
}

/// The waiters a one-key pool serves, in order, as `lease` and each lease after it are
/// released a second apart, `rounds` times.
fn served_one_by_one(e: &mut Engine, mut lease: LeaseView, rounds: u64) -> Vec<WaiterId> {
    let mut order = Vec::new();
    for n in 1..=rounds {
        e.release(
            T0 + n * SECOND,
            &lease.lease_id,
            lease.fencing_token,
            used(1, 0),
        )
        .unwrap();
        let grants = e.drain().waiter_grants;
        assert_eq!(grants.len(), 1);
        order.push(grants[0].0);
        lease = grants[0].1.clone();
    }
    order
}

#[test]
fn an_interactive_waiter_is_served_before_batch_waiters_that_came_earlier() {
    let mut e = engine(&[("k1", "p1")]);
    let holder = granted(e.acquire(T0, ask("holder")));
    let batch = caller("nightly", Priority::Batch, 1);
    let interactive = caller("chat", Priority::Interactive, 1);
    let b1 = waiting(wait_for(&mut e, T0, "b1", &batch));
    let b2 = waiting(wait_for(&mut e, T0, "b2", &batch));
    let i1 = waiting(wait_for(&mut e, T0 + 1, "i1", &interactive));
    assert_eq!(served_one_by_one(&mut e, holder, 3), vec![i1, b1, b2]);
}

#[test]
fn under_rules_8_a_caller_changes_nothing() {
    let setup = Setup {
        rules: 8,
        ..Setup::new(config(10, 100), key_specs(&[("k1", "p1")]), 0)
    };
    let mut e = Engine::new(setup, Time::at(T0)).unwrap();
    let holder = granted(e.acquire(T0, ask("holder")));
    let b1 = waiting(wait_for(&mut e, T0, "b1", &caller("n", Priority::Batch, 1)));
    waiting(wait_for(
        &mut e,
        T0,
        "i1",
        &caller("c", Priority::Interactive, 1),
    ));
    e.release(
        T0 + SECOND,
        &holder.lease_id,
        holder.fencing_token,
        used(1, 0),
    )
    .unwrap();
    assert_eq!(e.drain().waiter_grants[0].0, b1);
}

/// The tenants' tasks of [`grants_per_window`], and what they were granted.
#[derive(Default)]
struct Fleet {
    tasks: u64,
    owner: BTreeMap<WaiterId, String>,
    granted_now: BTreeMap<String, u64>,
    /// Grants to waiters not yet used.
    pending: Vec<(WaiterId, LeaseView)>,
}

impl Fleet {
    /// A new task of `who` asks until it waits; each grant on the way is used and released at
    /// once.
    fn ask_until_waiting(&mut self, e: &mut Engine, now: u64, who: &Caller) {
        loop {
            self.tasks += 1;
            let request = AcquireRequest {
                wait: true,
                ..ask(&format!("t{}", self.tasks))
            };
            let command = Command::Acquire(request).for_caller(who.clone());
            let (reply, notices) = e.apply(Time::at(now), command);
            self.pending.extend(notices.waiter_grants);
            match reply.into_acquired() {
                Ok(Acquired::Queued(id)) => {
                    self.owner.insert(id, who.tenant.clone());
                    return;
                }
                Ok(Acquired::Granted(lease)) => self.use_and_release(e, now, &who.tenant, &lease),
                other => panic!("{other:?}"),
            }
        }
    }

    fn use_and_release(&mut self, e: &mut Engine, now: u64, tenant: &str, lease: &LeaseView) {
        *self.granted_now.entry(tenant.to_string()).or_default() += 1;
        e.release(now, &lease.lease_id, lease.fencing_token, used(1, 0))
            .unwrap();
        self.pending.extend(e.drain().waiter_grants);
    }
}

/// Requests each tenant of `tenants` (name, share, waiting from which minute) was granted in
/// each of `minutes` minutes of a project allowing 20 requests a minute, each tenant keeping
/// 8 tasks waiting from its minute on, every call released at once and its task replaced.
fn grants_per_window(tenants: &[(&str, u32, u64)], minutes: u64) -> Vec<BTreeMap<String, u64>> {
    let mut e = new_engine(
        config(20, 1_000_000),
        key_specs(&[("k1", "p1"), ("k2", "p1"), ("k3", "p1"), ("k4", "p1")]),
    )
    .unwrap();
    let callers: BTreeMap<String, Caller> = tenants
        .iter()
        .map(|&(tenant, share, _)| (tenant.to_string(), caller(tenant, Priority::Normal, share)))
        .collect();
    let mut fleet = Fleet::default();
    let mut windows = Vec::new();
    for second in 0..minutes * 60 {
        let now = T0 + second * SECOND;
        for &(tenant, _, from) in tenants {
            if second == from * 60 {
                for _ in 0..8 {
                    fleet.ask_until_waiting(&mut e, now, &callers[tenant]);
                }
            }
        }
        let (_, notices) = e.apply(Time::at(now), Command::Tick);
        fleet.pending.extend(notices.waiter_grants);
        while let Some((id, lease)) = fleet.pending.pop() {
            let tenant = fleet.owner.remove(&id).expect("a waiter of a tenant");
            fleet.use_and_release(&mut e, now, &tenant, &lease);
            fleet.ask_until_waiting(&mut e, now, &callers[&tenant]);
        }
        if second % 60 == 59 {
            windows.push(std::mem::take(&mut fleet.granted_now));
        }
    }
    windows
}

#[test]
fn two_saturating_tenants_of_shares_1_and_3_are_served_1_to_3() {
    // The first minute is taken by whoever asks first, before anyone waits: uncontended,
    // anyone may take everything. The ten after it are contended.
    let windows = grants_per_window(&[("small", 1, 0), ("large", 3, 0)], 11);
    let total = |tenant: &str| {
        windows[1..]
            .iter()
            .map(|w| w.get(tenant).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let (small, large) = (total("small"), total("large"));
    eprintln!("shares 1 and 3 over 10 contended minutes: {small} and {large} requests");
    // A request holds the window for a minute and the safety margin's second after it.
    assert!(
        small + large >= 190,
        "the project's requests are used: {windows:?}"
    );
    let ratio = large as f64 / small as f64;
    assert!((ratio / 3.0 - 1.0).abs() <= 0.05, "{small} : {large}");
}

#[test]
fn an_idle_tenants_share_goes_to_the_other_and_it_banks_nothing() {
    // Alone for five minutes, "small" takes everything; "large" arrives and gets its 3 of 4
    // at once: what "small" used alone is not held against it, nor banked by "large".
    let windows = grants_per_window(&[("small", 1, 0), ("large", 3, 5)], 10);
    for window in &windows[..5] {
        assert_eq!(window.get("small"), Some(&20), "{window:?}");
        assert_eq!(window.get("large"), None, "{window:?}");
    }
    for window in &windows[6..] {
        let small = window.get("small").copied().unwrap_or(0);
        let large = window.get("large").copied().unwrap_or(0);
        assert_eq!((small, large), (5, 15), "{window:?}");
    }
}

#[test]
fn one_tenant_is_served_first_come_first_served() {
    let mut e = engine(&[("k1", "p1")]);
    let holder = granted(e.acquire(T0, ask("holder")));
    let team = caller("team", Priority::Normal, 7);
    let ids: Vec<WaiterId> = (0..5)
        .map(|n| waiting(wait_for(&mut e, T0, &format!("w{n}"), &team)))
        .collect();
    assert_eq!(served_one_by_one(&mut e, holder, 5), ids);
}

#[test]
fn a_newcomer_keeps_off_groups_only_its_class_or_a_more_urgent_one_was_refused() {
    // p1 has room for one request more; a batch waiter asking for three is refused it and
    // keeps later batch arrivals off p1, not an interactive one.
    let mut e = new_engine(config(3, 100), key_specs(&[("k1", "p1"), ("k2", "p1")])).unwrap();
    let holder = granted(e.acquire(T0, ask_n("holder", 2)));
    let big = AcquireRequest {
        wait: true,
        ..ask_n("big", 3)
    };
    let batch = caller("nightly", Priority::Batch, 1);
    queued(
        e.apply(
            Time::at(T0),
            Command::Acquire(big).for_caller(batch.clone()),
        )
        .0
        .into_acquired(),
    );
    let small_batch = e
        .apply(
            Time::at(T0),
            Command::Acquire(ask("later-batch")).for_caller(batch),
        )
        .0;
    unavailable(small_batch.into_acquired());
    let interactive = caller("chat", Priority::Interactive, 1);
    let chat = e
        .apply(
            Time::at(T0),
            Command::Acquire(ask("chat")).for_caller(interactive),
        )
        .0;
    granted(chat.into_acquired());
    let _ = holder;
}

#[test]
fn places_survive_a_snapshot() {
    let mut e = engine(&[("k1", "p1")]);
    granted(e.acquire(T0, ask("holder")));
    waiting(wait_for(
        &mut e,
        T0,
        "b1",
        &caller("nightly", Priority::Batch, 1),
    ));
    waiting(wait_for(
        &mut e,
        T0,
        "n1",
        &caller("a", Priority::Normal, 1),
    ));
    waiting(wait_for(
        &mut e,
        T0,
        "n2",
        &caller("b", Priority::Normal, 3),
    ));
    waiting(wait_for(
        &mut e,
        T0,
        "n3",
        &caller("a", Priority::Normal, 1),
    ));
    let snapshot = layout::Snapshot::of(&e, 1);
    let read = layout::Snapshot::decode(&snapshot.encode()).unwrap();
    let (restored, _) = Engine::restore(read.setup, read.draining, read.image).unwrap();
    assert_eq!(restored.image(), e.image());
}

mod properties {
    //! Random joins of waiters of three tenants in three classes, releases, cancels and clock
    //! advances on a contended pool: every pass serves its line in the places the engine
    //! gave (no waiter is granted while one placed before it, which could have used the same
    //! key, stays in line), each place's class is its caller's, and when the callers stop
    //! coming and holders finish, every waiter is served.

    use super::*;
    use crate::image::LineImage;
    use crate::tenants::Place;
    use proptest::prelude::*;

    const TENANTS: [&str; 3] = ["a", "b", "c"];

    #[derive(Debug, Clone)]
    enum Op {
        Join { tenant: u8, class: u8, share: u32 },
        Release { pick: u16, sent: bool },
        Cancel { pick: u16 },
        Advance { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..3u8, 0..3u8, 1..5u32).prop_map(|(tenant, class, share)| Op::Join { tenant, class, share }),
            4 => (any::<u16>(), any::<bool>()).prop_map(|(pick, sent)| Op::Release { pick, sent }),
            1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
            2 => (0..30_000u64).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    /// Each waiter in line, and its place.
    fn places(line: Option<&LineImage>) -> BTreeMap<WaiterId, Place> {
        line.map(|line| line.waiters.iter().map(|w| (w.id, w.place)).collect())
            .unwrap_or_default()
    }

    /// Applies `command`, checking that the waiters it granted were first in line.
    fn served_in_place(
        e: &mut Engine,
        now: u64,
        command: Command,
        granted: &mut Vec<LeaseView>,
    ) -> Result<Reply, TestCaseError> {
        let before = places(e.image().lines.first());
        let (reply, mut notices) = e.apply(Time::at(now), command);
        notices.extend(e.drain());
        let after = places(e.image().lines.first());
        for (id, lease) in notices.waiter_grants {
            let Some(&place) = before.get(&id) else {
                // Joined by this very command and granted in it: nobody stood before it.
                granted.push(lease);
                continue;
            };
            // Spelled out rather than by `Place`'s order: class first, then start, then
            // arrival.
            let key = |p: Place, id: WaiterId| (p.priority, p.start, id);
            for (&other, &other_place) in &after {
                prop_assert!(
                    key(other_place, other) > key(place, id),
                    "waiter {id} at {place:?} was granted while {other} at {other_place:?} stays"
                );
            }
            granted.push(lease);
        }
        Ok(reply)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn lines_are_served_in_their_places_and_every_waiter_is_served(
            ops in prop::collection::vec(op(), 1..80)
        ) {
            let mut e = new_engine(
                config(6, 1_000_000),
                key_specs(&[("k1", "p1"), ("k2", "p1"), ("k3", "p1")]),
            )
            .unwrap();
            let mut now = T0;
            let mut live: Vec<LeaseView> = Vec::new();
            let mut tasks = 0u32;
            let mut classes: BTreeMap<WaiterId, Priority> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Join { tenant, class, share } => {
                        tasks += 1;
                        let who = caller(TENANTS[tenant as usize], Priority::ALL[class as usize], share);
                        let request = AcquireRequest { wait: true, ..ask(&format!("t{tasks}")) };
                        let command = Command::Acquire(request).for_caller(who.clone());
                        match served_in_place(&mut e, now, command, &mut live)?.into_acquired() {
                            Ok(Acquired::Queued(id)) => {
                                classes.insert(id, who.priority);
                            }
                            Ok(Acquired::Granted(lease)) => live.push(lease),
                            other => prop_assert!(false, "{other:?}"),
                        }
                    }
                    Op::Release { pick, sent } if !live.is_empty() => {
                        let lease = live.remove(pick as usize % live.len());
                        let release = Command::Release {
                            lease_id: lease.lease_id,
                            fencing_token: lease.fencing_token,
                            usage: used(u32::from(sent), 0),
                        };
                        served_in_place(&mut e, now, release, &mut live)?;
                    }
                    Op::Cancel { pick } => {
                        let waiting: Vec<WaiterId> = places(e.image().lines.first()).into_keys().collect();
                        if !waiting.is_empty() {
                            let id = waiting[pick as usize % waiting.len()];
                            served_in_place(&mut e, now, Command::CancelWaiter(id), &mut live)?;
                        }
                    }
                    Op::Advance { ms } => {
                        now += ms;
                        served_in_place(&mut e, now, Command::Tick, &mut live)?;
                    }
                    Op::Release { .. } => {}
                }
                for (id, place) in places(e.image().lines.first()) {
                    prop_assert_eq!(Some(&place.priority), classes.get(&id), "waiter {}", id);
                }
            }
            // Nobody comes any more; holders finish, and the clock moves on: every waiter is
            // served, however it was placed.
            for _ in 0..200 {
                if !e.has_waiters() {
                    break;
                }
                for lease in std::mem::take(&mut live) {
                    let release = Command::Release {
                        lease_id: lease.lease_id,
                        fencing_token: lease.fencing_token,
                        usage: used(1, 0),
                    };
                    served_in_place(&mut e, now, release, &mut live)?;
                }
                now += 20 * SECOND;
                served_in_place(&mut e, now, Command::Tick, &mut live)?;
            }
            prop_assert!(!e.has_waiters(), "waiters left: {:?}", e.image().lines);
        }
    }
}
