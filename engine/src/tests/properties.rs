//! Random interleavings of acquire, renew (at once or waiting in line), release, report,
//! cancel, operator toggles, checks of keys with the provider, keys removed from and added
//! back to the configuration (to wait for their first check), cooldown resets and clock
//! advances, checked after every step against a model of what the provider
//! would see: each request sent on a lease arrives at some moment of that lease chosen
//! adversarially (at its grant, at its end, or between), and no provider window nor Pacific day
//! may exceed its limit.
//! Every number a client sends is drawn with extremes (0, the bounds, `u32::MAX`, `u64::MAX`):
//! the engine refuses exactly what it should, books at most what was granted, and no grant is
//! admitted over the tokens-per-minute books as an independent model keeps them. Every history
//! goes through [`Engine::apply`] and is replayed into a fresh engine, whole and from a snapshot
//! at a random point through the store's encoding: both must reach the same state.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const RPM: usize = 4;
const RPD: usize = 30;
/// 23:40 in Los Angeles, so that runs cross the daily reset.
const START: u64 = T0 + 10 * 60 * MINUTE + 40 * MINUTE;
const KEYS: [(&str, &str); 5] = [
    ("k1", "p1"),
    ("k2", "p1"),
    ("k3", "p2"),
    ("k4", "p3"),
    ("k5", "p3"),
];
const TASKS: u8 = 6;
/// The tokens per minute of `limits()`.
const TPM: u128 = 100_000;
/// Short, so that exclusions end while tasks still wait.
const EXCLUSION: u64 = 30 * SECOND;

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        task: u8,
        requests: u32,
        tokens: u64,
        ttl_ms: Option<u64>,
        wait: bool,
        exclude: Option<u8>,
    },
    Release {
        pick: u16,
        sent: Option<u32>,
        tokens: Option<u64>,
    },
    Renew {
        pick: u16,
        add: u32,
        tokens: u64,
        ttl_ms: Option<u64>,
        /// Waits in line for what it asks for more.
        wait: bool,
    },
    Report {
        pick: u16,
        kind: u8,
        retry_after_ms: Option<u64>,
        sent: Option<u32>,
        rotate: bool,
        /// A quota violation naming (limit kind, figure), the figure sometimes 0.
        named: Option<(u8, u64)>,
    },
    Cancel {
        pick: u16,
    },
    Toggle {
        key: u8,
    },
    /// A check of the key answered: fine, refused (for a problem that may heal, or not), or
    /// no answer.
    Check {
        key: u8,
        outcome: u8,
    },
    /// A new configuration with every key but `without`.
    Reconfigure {
        without: Option<u8>,
    },
    ResetCooldown {
        project: u8,
    },
    Advance {
        ms: u32,
    },
}

/// Mostly small counts, often the extremes a hostile or buggy client sends.
fn count_u32(small: u32) -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 0..=small,
        1 => Just(u32::MAX),
        1 => Just(u32::MAX - 1),
        1 => any::<u32>(),
    ]
}

fn count_u64(small: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..=small,
        1 => Just(MAX_INPUT_TOKENS),
        1 => Just(MAX_INPUT_TOKENS + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

/// Durations in ms: mostly sensible, sometimes zero or absurd.
fn duration_ms(small: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1..=small,
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TASKS, count_u32(3), count_u64(40_000), proptest::option::weighted(0.2, duration_ms(60_000)), any::<bool>(), proptest::option::weighted(0.2, 0..5u8))
            .prop_map(|(task, requests, tokens, ttl_ms, wait, exclude)| Op::Acquire { task, requests, tokens, ttl_ms, wait, exclude }),
        3 => (any::<u16>(), proptest::option::weighted(0.8, count_u32(3)), proptest::option::weighted(0.8, count_u64(60_000)))
            .prop_map(|(pick, sent, tokens)| Op::Release { pick, sent, tokens }),
        3 => (any::<u16>(), count_u32(2), count_u64(20_000), proptest::option::weighted(0.2, duration_ms(60_000)), proptest::bool::weighted(0.7))
            .prop_map(|(pick, add, tokens, ttl_ms, wait)| Op::Renew { pick, add, tokens, ttl_ms, wait }),
        2 => (any::<u16>(), 0..7u8, proptest::option::of(duration_ms(90_000)), proptest::option::weighted(0.8, count_u32(3)), any::<bool>(), proptest::option::weighted(0.3, (0..3u8, 0..8u64)))
            .prop_map(|(pick, kind, retry_after_ms, sent, rotate, named)| Op::Report { pick, kind, retry_after_ms, sent, rotate, named }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        1 => (0..5u8).prop_map(|key| Op::Toggle { key }),
        1 => (0..5u8, 0..4u8).prop_map(|(key, outcome)| Op::Check { key, outcome }),
        1 => proptest::option::weighted(0.7, 0..5u8).prop_map(|without| Op::Reconfigure { without }),
        1 => (0..3u8).prop_map(|project| Op::ResetCooldown { project }),
        3 => (0..40_000u32).prop_map(|ms| Op::Advance { ms }),
    ]
}

const KINDS: [FailureKind; 8] = FailureKind::ALL;

/// A live lease as the provider model tracks it.
#[derive(Debug)]
struct Tracked {
    key_id: String,
    project: String,
    /// (granted at, requests): the first grant and each renewal that added requests.
    batches: Vec<(u64, u64)>,
    /// Input tokens reserved: the estimate and what renewals added.
    tokens: u64,
}

#[derive(Debug, Clone)]
struct WaitingTask {
    id: WaiterId,
    task: String,
    excluded: Option<String>,
    tokens: u64,
}

#[derive(Default)]
struct Model {
    now: u64,
    live: BTreeMap<u64, Tracked>,
    /// Every lease ever granted: (lease id, token), to exercise late calls too.
    all: Vec<(String, u64)>,
    arrivals: HashMap<String, Vec<u64>>,
    last_token: HashMap<String, u64>,
    disabled: HashMap<String, bool>,
    /// Who disabled each disabled key.
    disabled_by: HashMap<String, Decider>,
    /// Keys added while keys are checked, before their first check.
    awaiting_check: std::collections::HashSet<String>,
    /// Keys the configuration no longer has (draining or gone).
    unconfigured: std::collections::HashSet<String>,
    cooling_until: HashMap<String, u64>,
    waiting: Vec<WaitingTask>,
    /// Renewals in line: their lease's token and the tokens they ask for more.
    renewing: BTreeMap<WaiterId, (u64, u64)>,
    /// (task, key) -> excluded until.
    exclusions: HashMap<(String, String), u64>,
    /// (requests, tokens) used, as the model expects them booked, per lease id about to be
    /// ended by a release or a report.
    reported_use: HashMap<String, (u64, u64)>,
    /// Estimates of acquires about to be granted at once, by task.
    asked_tokens: HashMap<String, u64>,
    /// Per project: (steady time the tokens leave the books, tokens) of ended leases.
    ended_tokens: HashMap<String, Vec<(u64, u64)>>,
}

fn max_leases(key_id: &str) -> usize {
    if key_id == "k1" { 2 } else { 1 }
}

impl Model {
    fn excludes(&self, waiter: &WaitingTask, key_id: &str, at: u64) -> bool {
        waiter.excluded.as_deref() == Some(key_id)
            || self
                .exclusions
                .get(&(waiter.task.clone(), key_id.to_string()))
                .is_some_and(|&until| until > at)
    }

    /// A grant of `key_id` at `at` to someone other than the waiters still in line.
    fn check_no_overtaking(
        &self,
        key_id: &str,
        at: u64,
        granted_waiter: Option<WaiterId>,
    ) -> Result<(), TestCaseError> {
        for earlier in &self.waiting {
            if Some(earlier.id) == granted_waiter {
                break;
            }
            prop_assert!(
                self.excludes(earlier, key_id, at),
                "{key_id} went past waiter {} ({}) that could use it",
                earlier.id,
                earlier.task
            );
        }
        Ok(())
    }

    /// Ends a live lease at `end_ms`, with `sent` requests and `tokens` used (`None`: its
    /// reservation).
    fn end(&mut self, token: u64, end_ms: u64, sent: u64, tokens: Option<u64>) {
        let Some(tracked) = self.live.remove(&token) else {
            return;
        };
        self.ended_tokens
            .entry(tracked.project.clone())
            .or_default()
            .push((end_ms + MINUTE, tokens.unwrap_or(tracked.tokens)));
        let mut left = sent;
        let mut index = 0u64;
        for &(granted_ms, requests) in &tracked.batches {
            for _ in 0..requests.min(left) {
                // Adversarial arrival: at the grant, at the end, or midway.
                let arrival = match (token + index) % 3 {
                    0 => granted_ms,
                    1 => end_ms,
                    _ => granted_ms + (end_ms - granted_ms) / 2,
                };
                self.arrivals
                    .entry(tracked.project.clone())
                    .or_default()
                    .push(arrival);
                index += 1;
            }
            left -= requests.min(left);
        }
    }

    fn absorb(&mut self, notices: Notices, daily: DailyReset) -> Result<(), TestCaseError> {
        let granted_waiters: HashMap<String, WaiterId> = notices
            .waiter_grants
            .iter()
            .map(|(id, lease)| (lease.lease_id.clone(), *id))
            .collect();
        for event in notices.events {
            let at = event.at.steady_ms;
            match event.kind {
                EventKind::Granted(le) => {
                    let key = le.key_id.clone();
                    let token = le.lease.fencing_token;
                    prop_assert!(
                        token > *self.last_token.get(&key).unwrap_or(&0),
                        "token {token} not above the last on {key}"
                    );
                    self.last_token.insert(key.clone(), token);
                    prop_assert!(
                        !self.disabled.get(&key).copied().unwrap_or(false),
                        "lease on disabled {key}"
                    );
                    prop_assert!(
                        !self.awaiting_check.contains(&key),
                        "lease on {key} before its first check"
                    );
                    prop_assert!(
                        !self.unconfigured.contains(&key),
                        "lease on {key}, no longer configured"
                    );
                    let cooling = self.cooling_until.get(&le.project).copied().unwrap_or(0);
                    prop_assert!(
                        cooling <= at,
                        "lease on {key} while {} cools until {cooling}",
                        le.project
                    );
                    let waiter = granted_waiters.get(&le.lease.lease_id).copied();
                    self.check_no_overtaking(&key, at, waiter)?;
                    let tokens = match waiter {
                        Some(id) => {
                            let tokens = self
                                .waiting
                                .iter()
                                .find(|w| w.id == id)
                                .map_or(0, |w| w.tokens);
                            self.waiting.retain(|w| w.id != id);
                            tokens
                        }
                        None => self.asked_tokens.remove(&le.lease.task_id).unwrap_or(0),
                    };
                    self.check_token_books(&le.project, at, u128::from(tokens))?;
                    self.all.push((le.lease.lease_id.clone(), token));
                    self.live.insert(
                        token,
                        Tracked {
                            key_id: key.clone(),
                            project: le.project,
                            batches: vec![(at, u64::from(le.lease.requests_granted))],
                            tokens,
                        },
                    );
                    let holders = self.live.values().filter(|t| t.key_id == key).count();
                    prop_assert!(
                        holders <= max_leases(&key),
                        "{holders} live leases on {key}"
                    );
                }
                EventKind::Renewed(le) => {
                    let tracked = self
                        .live
                        .get_mut(&le.lease.fencing_token)
                        .expect("renewed lease is live");
                    let held: u64 = tracked.batches.iter().map(|b| b.1).sum();
                    let added = u64::from(le.lease.requests_granted) - held;
                    prop_assert!(
                        added == 0 || !self.unconfigured.contains(&le.key_id),
                        "{added} requests added on draining {}",
                        le.key_id
                    );
                    if added > 0 {
                        tracked.batches.push((at, added));
                    }
                }
                EventKind::Released {
                    lease,
                    requests_sent,
                } => {
                    // A release reported by a client, or a disable ending the lease in full.
                    let all = u64::from(lease.lease.requests_granted);
                    let (sent, tokens) = match self.reported_use.remove(&lease.lease.lease_id) {
                        Some((sent, tokens)) => (sent, Some(tokens)),
                        None => (all, None),
                    };
                    prop_assert_eq!(
                        requests_sent,
                        sent,
                        "requests booked for {}",
                        lease.lease.lease_id
                    );
                    self.end(lease.lease.fencing_token, at, sent, tokens);
                }
                EventKind::Expired(lease) => {
                    let all = u64::from(lease.lease.requests_granted);
                    self.end(lease.lease.fencing_token, at, all, None);
                }
                EventKind::Failed { lease, kind, .. } => {
                    let (sent, tokens) = self
                        .reported_use
                        .remove(&lease.lease.lease_id)
                        .map_or((0, None), |(sent, tokens)| (sent, Some(tokens)));
                    self.end(lease.lease.fencing_token, at, sent, tokens);
                    if kind.blames_key() {
                        self.exclusions
                            .insert((lease.lease.task_id, lease.key_id), at + EXCLUSION);
                    }
                }
                EventKind::CooledDown {
                    project, until_ms, ..
                } => {
                    let until = self.cooling_until.entry(project).or_insert(0);
                    *until = (*until).max(until_ms);
                }
                EventKind::KeyDisabled { key_id, by, .. } => {
                    self.disabled.insert(key_id.clone(), true);
                    self.disabled_by.insert(key_id, by);
                }
                EventKind::KeyEnabled { key_id, by } => {
                    let was = self.disabled_by.remove(&key_id);
                    prop_assert!(
                        by == Decider::Operator || was != Some(Decider::Operator),
                        "a check enabled {key_id}, which an operator disabled"
                    );
                    self.disabled.insert(key_id, false);
                }
                EventKind::KeyChecked { key_id, .. } => {
                    self.awaiting_check.remove(&key_id);
                }
                EventKind::KeyDraining { key_id, leases } => {
                    let live = self.live.values().filter(|t| t.key_id == key_id).count();
                    prop_assert!(
                        leases > 0 && leases == live,
                        "{key_id} drains {leases}, holds {live}"
                    );
                }
                EventKind::KeyRemoved { key_id } => {
                    let live = self.live.values().filter(|t| t.key_id == key_id).count();
                    prop_assert_eq!(live, 0, "{} removed with live leases", key_id);
                    // Gone: it comes back enabled, and waits for its first check.
                    self.disabled.remove(&key_id);
                    self.disabled_by.remove(&key_id);
                }
                EventKind::KeyAdded { key_id } => {
                    self.awaiting_check.insert(key_id);
                }
                EventKind::CooldownReset { project, .. } => {
                    self.cooling_until.insert(project, at);
                }
                EventKind::Reloaded { .. } => prop_assert!(false, "the engine never reloads"),
                EventKind::LimitLearned { .. } => {}
            }
        }
        for (id, lease) in notices.waiter_renewals {
            let (token, tokens) = self.renewing.remove(&id).expect("a renewal in line");
            prop_assert_eq!(
                token,
                lease.fencing_token,
                "renewal {} served another lease",
                id
            );
            let tracked = self
                .live
                .get_mut(&token)
                .expect("a renewal's lease is live");
            tracked.tokens += tokens;
            prop_assert!(
                u128::from(tracked.tokens) <= TPM,
                "a renewal in line reserved {} tokens",
                tracked.tokens
            );
        }
        for (id, _) in notices.waiter_failures {
            self.waiting.retain(|w| w.id != id);
            self.renewing.remove(&id);
        }
        // A renewal never waits on a lease that ended.
        for (id, (token, _)) in &self.renewing {
            prop_assert!(
                self.live.contains_key(token),
                "renewal {id} waits on an ended lease"
            );
        }
        self.check_provider_windows(daily)
    }

    /// A grant of `tokens` to `project` at `at` fits the tokens per minute on top of the live
    /// leases' reservations and what ended leases used within the last window.
    fn check_token_books(&self, project: &str, at: u64, tokens: u128) -> Result<(), TestCaseError> {
        let live: u128 = self
            .live
            .values()
            .filter(|t| t.project == project)
            .map(|t| u128::from(t.tokens))
            .sum();
        let ended: u128 = self
            .ended_tokens
            .get(project)
            .into_iter()
            .flatten()
            .filter(|&&(until, _)| until > at)
            .map(|&(_, t)| u128::from(t))
            .sum();
        prop_assert!(
            live + ended + tokens <= TPM,
            "{project}: a grant of {tokens} tokens on top of {live} live and {ended} ended"
        );
        Ok(())
    }

    /// What the provider would count: no sliding window over RPM, no Pacific day over RPD.
    fn check_provider_windows(&self, daily: DailyReset) -> Result<(), TestCaseError> {
        for (project, arrivals) in &self.arrivals {
            let mut sorted = arrivals.clone();
            sorted.sort_unstable();
            for (i, &start) in sorted.iter().enumerate() {
                let in_window = sorted[i..]
                    .iter()
                    .take_while(|&&a| a < start + MINUTE)
                    .count();
                prop_assert!(
                    in_window <= RPM,
                    "{project}: {in_window} requests in the minute from {start}"
                );
            }
            let mut per_day: HashMap<i64, usize> = HashMap::new();
            for &a in &sorted {
                *per_day.entry(daily.day_of(a)).or_default() += 1;
            }
            for (day, count) in per_day {
                prop_assert!(count <= RPD, "{project}: {count} requests on day {day}");
            }
        }
        Ok(())
    }
}

fn property_engine() -> Engine {
    Engine::new(property_setup(None), Time::at(START)).unwrap()
}

/// The configuration of the runs: every key but `without`.
fn property_setup(without: Option<usize>) -> Setup {
    let mut cfg = config(RPM as u64, RPD as u64);
    cfg.safety_margin_ms = 0;
    cfg.cooldown_base_ms = 5 * SECOND;
    cfg.exclusion_ttl_ms = EXCLUSION;
    cfg.default_ttl_ms = 20 * SECOND;
    let mut specs = key_specs(&KEYS);
    specs[0].max_leases = Some(2);
    let specs = specs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != without)
        .map(|(_, spec)| spec)
        .collect();
    Setup::new(cfg, specs, 0)
}

/// The engine under test, with every command it applied recorded for replay.
struct Recorded {
    engine: Engine,
    log: Vec<(Time, Command)>,
    notices: Notices,
}

impl Recorded {
    fn apply(&mut self, now: u64, command: Command) -> Reply {
        let time = Time::at(now);
        self.log.push((time, command.clone()));
        let (reply, notices) = self.engine.apply(time, command);
        self.notices.extend(notices);
        reply
    }

    fn drain(&mut self) -> Notices {
        std::mem::take(&mut self.notices)
    }

    /// Replays the log into a fresh engine (other hash seeds), whole and from a snapshot taken
    /// at `cut` through the store's encoding, and checks both reach the state recorded.
    fn check_replay(&self, cut: usize) -> Result<(), TestCaseError> {
        let recorded = self.engine.image();
        let through_the_store = |time: Time, command: &Command| -> crate::layout::Record {
            crate::layout::decode(&crate::layout::encode_record(time, command)).unwrap()
        };
        let mut whole = property_engine();
        for (time, command) in &self.log {
            let record = through_the_store(*time, command);
            whole.apply(record.time, record.command);
        }
        prop_assert_eq!(&whole.image(), &recorded, "replay of the whole log differs");

        let mut head = property_engine();
        let cut = cut % (self.log.len() + 1);
        for (time, command) in &self.log[..cut] {
            head.apply(*time, command.clone());
        }
        let snapshot: crate::layout::Snapshot =
            crate::layout::Snapshot::decode(&crate::layout::Snapshot::of(&head, 0).encode())
                .unwrap();
        prop_assert_eq!(
            &snapshot.image,
            &head.image(),
            "the snapshot's encoding loses state"
        );
        let (mut tail, _) =
            Engine::restore(snapshot.setup, snapshot.draining, snapshot.image).unwrap();
        for (time, command) in &self.log[cut..] {
            tail.apply(*time, command.clone());
        }
        prop_assert_eq!(
            &tail.image(),
            &recorded,
            "snapshot at {} + tail differs",
            cut
        );
        Ok(())
    }
}

fn run(ops: Vec<Op>, cut: usize) -> Result<(), TestCaseError> {
    let mut engine = Recorded {
        engine: property_engine(),
        log: Vec::new(),
        notices: Notices::default(),
    };
    let daily = engine.engine.config().daily;
    let mut model = Model {
        now: START,
        ..Default::default()
    };
    for op in ops {
        let now = model.now;
        match op {
            Op::Acquire {
                task,
                requests,
                tokens,
                ttl_ms,
                wait,
                exclude,
            } => {
                let excluded = exclude.map(|k| KEYS[k as usize].0.to_string());
                let task = format!("t{task}");
                let request = AcquireRequest {
                    task_id: task.clone(),
                    model: MODEL.into(),
                    requests,
                    estimated_tokens: tokens,
                    ttl_ms,
                    wait,
                    exclude_key_ids: excluded.iter().cloned().collect(),
                    ..Default::default()
                };
                // Refused: more requests than a minute or a lease allows, more tokens than a
                // minute allows, or a TTL of zero or above the maximum.
                let refused = requests.max(1) as usize > RPM
                    || u128::from(tokens) > TPM
                    || ttl_ms.is_some_and(|ttl| ttl == 0 || ttl > 10 * MINUTE);
                model.asked_tokens.insert(task.clone(), tokens);
                let mut acquire = Command::Acquire(request);
                if requests % 2 == 1 {
                    // Made for the one tenant there is (the one every other command is made
                    // for), of some share: it waits first come, first served all the same.
                    acquire = acquire.for_caller(crate::tenants::Caller {
                        tenant: String::new(),
                        priority: crate::tenants::Priority::Normal,
                        share: tokens as u32,
                    });
                }
                let outcome = engine.apply(now, acquire).into_acquired();
                prop_assert_eq!(outcome.is_err(), refused, "acquire: {:?}", outcome);
                if let Ok(Acquired::Queued(id)) = outcome {
                    model.waiting.push(WaitingTask {
                        id,
                        task,
                        excluded,
                        tokens,
                    })
                }
            }
            Op::Release { pick, sent, tokens } => {
                if let Some((id, token)) = pick_lease(&model, pick) {
                    if let Some(tracked) = model.live.get(&token) {
                        let granted = tracked.batches.iter().map(|b| b.1).sum::<u64>();
                        let booked_sent = sent.map_or(granted, |s| u64::from(s).min(granted));
                        let booked_tokens =
                            tokens.map_or(tracked.tokens, |t| t.min(MAX_INPUT_TOKENS));
                        model
                            .reported_use
                            .insert(id.clone(), (booked_sent, booked_tokens));
                    }
                    let usage = Usage {
                        requests_sent: sent,
                        input_tokens: tokens,
                    };
                    let mut release = Command::Release {
                        lease_id: id.clone(),
                        fencing_token: token,
                        usage,
                    };
                    if pick % 3 == 0 {
                        // Some holders say how long their call took.
                        release = Command::Timed {
                            call_ms: u64::from(pick),
                            command: Box::new(release),
                        };
                    }
                    let released = engine.apply(now, release).into_released();
                    prop_assert!(released.is_ok(), "release of {id}: {released:?}");
                }
            }
            Op::Renew {
                pick,
                add,
                tokens,
                ttl_ms,
                wait,
            } => {
                if let Some((id, token)) = pick_lease(&model, pick) {
                    let renewal = Renewal {
                        lease_id: id.clone(),
                        fencing_token: token,
                        ttl_ms,
                        additional_requests: add,
                        additional_tokens: tokens,
                    };
                    let renew = if wait {
                        Command::RenewWaiting(renewal)
                    } else {
                        Command::Renew(renewal)
                    };
                    let renewed = engine.apply(now, renew).into_renewed();
                    if let Ok(Renewed::Queued(_, waiter)) = renewed {
                        prop_assert!(wait, "a renewal that may not wait queued");
                        model.renewing.insert(waiter, (token, tokens));
                    }
                    if let Ok(Renewed::Done(_)) = renewed
                        && let Some(tracked) = model.live.get_mut(&token)
                    {
                        tracked.tokens += tokens;
                        prop_assert!(
                            u128::from(tracked.tokens) <= TPM,
                            "a renewal reserved {} tokens",
                            tracked.tokens
                        );
                    }
                }
            }
            Op::Report {
                pick,
                kind,
                retry_after_ms,
                sent,
                rotate,
                named,
            } => {
                if let Some((id, token)) = pick_lease(&model, pick) {
                    if let Some(tracked) = model.live.get(&token) {
                        let granted = tracked.batches.iter().map(|b| b.1).sum::<u64>();
                        let mut booked = (
                            sent.map_or(granted, |s| u64::from(s).min(granted)),
                            tracked.tokens,
                        );
                        // The provider counts no call it refused: the last one sent.
                        if KINDS[kind as usize].refused_by_provider() && booked.0 > 0 {
                            booked.0 -= 1;
                            if booked.0 == 0 {
                                booked.1 = 0;
                            }
                        }
                        model.reported_use.insert(id.clone(), booked);
                    }
                    let violations = named
                        .map(|(kind, value)| violation(LimitKind::ALL[kind as usize], Some(value)))
                        .into_iter()
                        .collect();
                    let report = FailureReport {
                        violations,
                        kind: KINDS[kind as usize],
                        retry_after_ms,
                        detail: String::new(),
                        requests_sent: sent,
                    };
                    let report = Command::ReportFailure {
                        lease_id: id.clone(),
                        fencing_token: token,
                        report,
                    };
                    let outcome = engine.apply(now, report).into_reported();
                    if retry_after_ms.is_some_and(|ms| ms > 24 * 60 * MINUTE) {
                        prop_assert!(outcome.is_err(), "a retry delay over a day was taken");
                        model.reported_use.remove(&id);
                    }
                    if let Ok(reported) = outcome
                        && rotate
                    {
                        model.absorb(engine.drain(), daily)?;
                        model.asked_tokens.insert(
                            reported.replacement.task_id.clone(),
                            reported.replacement.estimated_tokens,
                        );
                        engine.apply(now, Command::Acquire(reported.replacement));
                    }
                }
            }
            Op::Cancel { pick } => {
                let ids: Vec<WaiterId> = model
                    .waiting
                    .iter()
                    .map(|w| w.id)
                    .chain(model.renewing.keys().copied())
                    .collect();
                if !ids.is_empty() {
                    let waiter = ids[pick as usize % ids.len()];
                    let cancel = Command::CancelWaiter(waiter);
                    if engine.apply(now, cancel).into_waiter_cancelled().is_some() {
                        model.waiting.retain(|w| w.id != waiter);
                        model.renewing.remove(&waiter);
                    }
                }
            }
            Op::Toggle { key } if model.unconfigured.contains(KEYS[key as usize].0) => {}
            Op::Toggle { key } => {
                let key_id = KEYS[key as usize].0;
                let enable = model.disabled.get(key_id).copied().unwrap_or(false);
                let toggle = Command::SetKeyEnabled {
                    key_id: key_id.into(),
                    enabled: enable,
                    reason: String::new(),
                };
                engine.apply(now, toggle).into_key_set().unwrap();
            }
            Op::Check { key, .. } if model.unconfigured.contains(KEYS[key as usize].0) => {}
            Op::Check { key, outcome } => {
                let outcome = match outcome {
                    0 => CheckOutcome::Fine,
                    1 => CheckOutcome::Refused {
                        problem: KeyProblem::Suspended,
                        detail: "CONSUMER_SUSPENDED".into(),
                    },
                    2 => CheckOutcome::Refused {
                        problem: KeyProblem::Leaked,
                        detail: String::new(),
                    },
                    _ => CheckOutcome::NoAnswer {
                        detail: "timed out".into(),
                    },
                };
                let check = Command::KeyChecked {
                    identity: format!("fp-{}", KEYS[key as usize].0),
                    outcome,
                };
                engine.apply(now, check).into_key_checked().unwrap();
            }
            Op::Reconfigure { without } => {
                // Keys are checked from the first new configuration on: those it adds back
                // wait for their first check.
                let mut setup = property_setup(without.map(usize::from));
                setup.config.check_keys = true;
                let configured = engine
                    .apply(now, Command::Configure(setup))
                    .into_configured();
                prop_assert!(configured.is_ok(), "{configured:?}");
                model.unconfigured = without
                    .map(|k| KEYS[k as usize].0.to_string())
                    .into_iter()
                    .collect();
            }
            Op::ResetCooldown { project } => {
                let reset = Command::ResetCooldown {
                    pool: DEFAULT_POOL.into(),
                    project: format!("p{}", project + 1),
                    model: MODEL.into(),
                    forget_learned: false,
                };
                // A project whose only key is gone is refused.
                let _ = engine.apply(now, reset).into_cooldown_reset();
            }
            Op::Advance { ms } => {
                model.now += u64::from(ms);
                engine.apply(model.now, Command::Tick);
            }
        }
        model.absorb(engine.drain(), daily)?;
    }
    // Whatever is still live may yet send everything it holds before it ends.
    let end = model.now + 10 * MINUTE;
    for token in model.live.keys().copied().collect::<Vec<_>>() {
        let held = model.live[&token].batches.iter().map(|b| b.1).sum();
        model.end(token, end, held, None);
    }
    model.check_provider_windows(daily)?;
    engine.check_replay(cut)
}

/// Mostly live leases, sometimes one that has ended.
fn pick_lease(model: &Model, pick: u16) -> Option<(String, u64)> {
    if pick.is_multiple_of(5) && !model.all.is_empty() {
        return Some(model.all[pick as usize % model.all.len()].clone());
    }
    let live: Vec<u64> = model.live.keys().copied().collect();
    if live.is_empty() {
        return None;
    }
    let token = live[pick as usize % live.len()];
    let id = model
        .all
        .iter()
        .find(|(_, t)| *t == token)
        .expect("granted")
        .0
        .clone();
    Some((id, token))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_interleaving_breaks_the_leasing_rules(
        ops in proptest::collection::vec(op(), 1..120),
        cut in any::<usize>(),
    ) {
        run(ops, cut)?;
    }
}
