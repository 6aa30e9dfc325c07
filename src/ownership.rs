//! Ownership: which live broker serves each partition and coordinates each group.
//!
//! Every broker computes the same assignment from the same inputs: rendezvous hashing
//! (highest random weight) of each partition over the live brokers that are not
//! draining. Adding a broker moves only the partitions that now score highest on it;
//! removing one moves only its own. Nothing is copied: a new owner claims the
//! partition in the metadata store (raising its leader epoch, which fences the former
//! owner's commits) and reads the manifest and write-ahead tail from object storage.
//!
//! Hand-off is cooperative when both brokers are alive: the former owner stops taking
//! writes, lets its in-flight flush commit (so no acknowledged or in-flight `acks=all`
//! produce fails), and releases the partition; the new owner claims it as soon as it
//! sees the release. It does not wait for an owner whose lease has expired, and waits at
//! most one lease for a live owner that does not let go.
//!
//! Group coordinators work the same way through coordinator slots: the partitions of
//! the internal topic `__consumer_offsets` (`offsets.topic.num.partitions`, as in
//! Kafka). A group belongs to slot `hash(group) % slots`; the slot's owner coordinates
//! it, and every offset commit is conditional on the slot's epoch, so a paused former
//! coordinator cannot move offsets after its successor took over.
//!
//! This module holds the assignment rule, the cached owners and the slots this broker
//! holds, and [`plan`], the pure decision of what to claim, release or give up. The
//! broker applies the plan (`Broker::reconcile`), since it owns the partition tasks.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::membership::Membership;
use crate::metadata::{BrokerRecord, Fence, PartitionKey, PartitionOwner};

/// The internal topic whose partitions are the group coordinator slots.
pub(crate) const COORDINATOR_TOPIC: &str = "__consumer_offsets";

/// 64-bit FNV-1a over the parts, finished with the splitmix64 mixer. Deliberately not
/// a std hasher: every broker, of every version in a rolling upgrade, must compute the
/// same assignment.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed(key: &PartitionKey) -> u64 {
    hash(&[key.topic_id.as_bytes(), &key.partition.to_be_bytes()])
}

/// The broker among `brokers` that scores highest for `key` (rendezvous hashing).
pub(crate) fn rendezvous(
    key: &PartitionKey,
    brokers: impl IntoIterator<Item = i32>,
) -> Option<i32> {
    let s = seed(key);
    brokers
        .into_iter()
        .max_by_key(|b| (mix(s ^ mix(*b as u32 as u64)), *b))
}

/// The broker that takes `key` over from `me`: the assignment rule's pick among the
/// other live brokers that are not draining.
fn successor(live: &[BrokerRecord], key: &PartitionKey, me: i32) -> Option<i32> {
    rendezvous(
        key,
        live.iter()
            .filter(|b| !b.draining && b.broker_id != me)
            .map(|b| b.broker_id),
    )
}

/// The coordinator slot of a transactional id: the same slots as groups, hashed apart
/// (a group and a transactional id of the same name may land on different slots).
pub(crate) fn txn_slot(transactional_id: &str, slots: i32) -> i32 {
    (hash(&[b"txn", transactional_id.as_bytes()]) % slots.max(1) as u64) as i32
}

/// The coordinator slot of a group.
pub(crate) fn group_slot(group: &str, slots: i32) -> i32 {
    (hash(&[group.as_bytes()]) % slots.max(1) as u64) as i32
}

/// What this broker holds of one key, as the plan needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub leader_epoch: i32,
    /// A newer owner fenced this one (a commit was refused).
    pub fenced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Take the key over (claim: a new epoch).
    Claim(PartitionKey),
    /// Hand it off: finish in-flight work, then release it.
    Release(PartitionKey),
    /// Someone else owns it now: stop at once, commit nothing more.
    StepDown(PartitionKey),
}

/// Inputs of one planning pass.
#[derive(Debug)]
pub(crate) struct PlanInput<'a> {
    pub me: i32,
    pub live: &'a [BrokerRecord],
    pub owners: &'a HashMap<PartitionKey, PartitionOwner>,
    pub held: &'a HashMap<PartitionKey, Held>,
    /// How long to wait for a live owner to release a key this broker should have.
    pub patience: Duration,
    /// Whether an owner missing from `live` may be taken as gone (see
    /// `Membership::settled`); if not, its keys wait like a live owner's.
    pub trust_expiry: bool,
    pub now: Instant,
}

/// Decides, for every key, whether this broker claims, releases or steps down from it.
/// `waiting` remembers since when this broker has wanted a key a live broker still
/// holds; entries are dropped when no longer needed.
pub(crate) fn plan(
    input: &PlanInput<'_>,
    keys: impl IntoIterator<Item = PartitionKey>,
    waiting: &mut HashMap<PartitionKey, Instant>,
) -> Vec<Action> {
    let eligible: Vec<i32> = input
        .live
        .iter()
        .filter(|b| !b.draining)
        .map(|b| b.broker_id)
        .collect();
    let is_live = |id: i32| input.live.iter().any(|b| b.broker_id == id);
    let mut actions = Vec::new();
    let mut still_waiting = HashMap::new();
    for key in keys {
        let target = rendezvous(&key, eligible.iter().copied());
        let owner = input.owners.get(&key);
        if let Some(held) = input.held.get(&key) {
            let superseded = owner.is_some_and(|o| o.leader_epoch > held.leader_epoch);
            if held.fenced || superseded {
                actions.push(Action::StepDown(key));
            } else if target != Some(input.me) {
                actions.push(Action::Release(key));
            }
            continue;
        }
        if target != Some(input.me) {
            continue;
        }
        let current = owner.and_then(|o| o.owner);
        let free = match current {
            None => true,
            Some(id) if id == input.me => true,
            Some(id) => input.trust_expiry && !is_live(id),
        };
        if free {
            actions.push(Action::Claim(key));
            continue;
        }
        let since = *waiting.get(&key).unwrap_or(&input.now);
        if input.now.duration_since(since) >= input.patience {
            actions.push(Action::Claim(key));
        } else {
            still_waiting.insert(key, since);
        }
    }
    *waiting = still_waiting;
    actions
}

/// The coordinator slots: the internal topic's id and partition count, and the slots
/// this broker holds with their epochs.
#[derive(Debug, Default)]
struct Slots {
    topic: Option<(Uuid, i32)>,
    /// Slot -> (epoch, since when).
    held: HashMap<i32, (i32, Instant)>,
}

/// The cluster's ownership as this broker knows it.
#[derive(Debug)]
pub(crate) struct Ownership {
    pub membership: Arc<Membership>,
    /// Every partition's and slot's last known owner and epoch (refreshed every pass).
    owners: RwLock<HashMap<PartitionKey, PartitionOwner>>,
    slots: RwLock<Slots>,
    /// Since when this broker has wanted each key a live broker still holds.
    waiting: std::sync::Mutex<HashMap<PartitionKey, Instant>>,
}

/// Where clients should go for a partition or a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leader {
    /// `None`: no live owner (clients retry).
    pub broker_id: Option<i32>,
    pub leader_epoch: i32,
}

impl Ownership {
    pub(crate) fn new(membership: Arc<Membership>) -> Ownership {
        Ownership {
            membership,
            owners: RwLock::new(HashMap::new()),
            slots: RwLock::new(Slots::default()),
            waiting: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The plan of one pass (see [`plan`]), remembering across passes which keys wait
    /// for a live owner to let go.
    pub(crate) fn decide(
        &self,
        input: &PlanInput<'_>,
        keys: impl IntoIterator<Item = PartitionKey>,
    ) -> Vec<Action> {
        let mut waiting = self.waiting.lock().expect("waiting lock poisoned");
        plan(input, keys, &mut waiting)
    }

    pub(crate) fn me(&self) -> i32 {
        self.membership.me().broker_id
    }

    pub(crate) fn set_owners(&self, owners: Vec<PartitionOwner>) {
        let map = owners.into_iter().map(|o| (o.key, o)).collect();
        *self.owners.write().expect("owners lock poisoned") = map;
    }

    pub(crate) fn owners(&self) -> HashMap<PartitionKey, PartitionOwner> {
        self.owners.read().expect("owners lock poisoned").clone()
    }

    /// Records a claim or release this broker made, ahead of the next refresh.
    pub(crate) fn note_owner(&self, key: PartitionKey, leader_epoch: i32, owner: Option<i32>) {
        self.owners.write().expect("owners lock poisoned").insert(
            key,
            PartitionOwner {
                key,
                leader_epoch,
                owner,
            },
        );
    }

    /// Who serves `key`: its recorded owner while that broker is live. Between owners
    /// (a new topic, a hand-off, an expired lease) there is none: clients get
    /// LEADER_NOT_AVAILABLE and ask again, as in Kafka during a leader election.
    /// `live` is the membership's live list, read once by callers that ask for many keys.
    ///
    /// A draining broker (drained, shutting down, or stepped down because it lost a
    /// store) names, for a key recorded as its own or as no one's, the broker the
    /// assignment rule gives the key to without it. Cut off from the metadata store,
    /// its view of the owners stops at the moment it stepped down, yet clients that
    /// still ask it must be sent where their partitions went, not told forever that
    /// there is no leader.
    pub(crate) fn leader(&self, live: &[BrokerRecord], key: &PartitionKey) -> Leader {
        let recorded = self
            .owners
            .read()
            .expect("owners lock poisoned")
            .get(key)
            .copied();
        let leader_epoch = recorded.map_or(0, |o| o.leader_epoch);
        let me = self.me();
        let broker_id = match recorded
            .and_then(|o| o.owner)
            .filter(|id| live.iter().any(|b| b.broker_id == *id))
        {
            Some(id) if id != me => Some(id),
            _ if self.membership.is_draining() => successor(live, key, me),
            owner => owner,
        };
        Leader {
            broker_id,
            leader_epoch,
        }
    }

    pub(crate) fn set_slot_topic(&self, id: Uuid, count: i32) {
        self.slots.write().expect("slots lock poisoned").topic = Some((id, count));
    }

    /// The coordinator slot keys (empty until the internal topic is known).
    pub(crate) fn slot_keys(&self) -> Vec<PartitionKey> {
        let slots = self.slots.read().expect("slots lock poisoned");
        slots.topic.map_or_else(Vec::new, |(topic_id, count)| {
            (0..count)
                .map(|partition| PartitionKey {
                    topic_id,
                    partition,
                })
                .collect()
        })
    }

    pub(crate) fn is_slot(&self, key: &PartitionKey) -> bool {
        let slots = self.slots.read().expect("slots lock poisoned");
        slots.topic.is_some_and(|(id, _)| id == key.topic_id)
    }

    /// The slot key of a group, once the internal topic is known.
    pub(crate) fn group_key(&self, group: &str) -> Option<PartitionKey> {
        let slots = self.slots.read().expect("slots lock poisoned");
        slots.topic.map(|(topic_id, count)| PartitionKey {
            topic_id,
            partition: group_slot(group, count),
        })
    }

    /// The held slots with their epochs.
    pub(crate) fn held_slots(&self) -> HashMap<PartitionKey, Held> {
        let slots = self.slots.read().expect("slots lock poisoned");
        let Some((topic_id, _)) = slots.topic else {
            return HashMap::new();
        };
        slots
            .held
            .iter()
            .map(|(partition, (epoch, _))| {
                (
                    PartitionKey {
                        topic_id,
                        partition: *partition,
                    },
                    Held {
                        leader_epoch: *epoch,
                        fenced: false,
                    },
                )
            })
            .collect()
    }

    pub(crate) fn hold_slot(&self, key: PartitionKey, leader_epoch: i32) {
        self.slots
            .write()
            .expect("slots lock poisoned")
            .held
            .insert(key.partition, (leader_epoch, crate::clock::instant()));
        self.note_owner(key, leader_epoch, Some(self.me()));
    }

    /// Stops coordinating a slot; returns the epoch it was held under.
    pub(crate) fn drop_slot(&self, key: &PartitionKey) -> Option<i32> {
        self.slots
            .write()
            .expect("slots lock poisoned")
            .held
            .remove(&key.partition)
            .map(|(epoch, _)| epoch)
    }

    /// The fence for a group's offset commits if this broker coordinates it.
    pub(crate) fn group_fence(&self, group: &str) -> Option<Fence> {
        self.held_fence(self.group_key(group)?)
    }

    /// The slot key of a transactional id, once the internal topic is known.
    pub(crate) fn txn_slot_of(&self, transactional_id: &str) -> Option<PartitionKey> {
        let slots = self.slots.read().expect("slots lock poisoned");
        slots.topic.map(|(topic_id, count)| PartitionKey {
            topic_id,
            partition: txn_slot(transactional_id, count),
        })
    }

    /// The fence for a transactional id's records if this broker coordinates it.
    pub(crate) fn txn_fence(&self, transactional_id: &str) -> Option<Fence> {
        self.held_fence(self.txn_slot_of(transactional_id)?)
    }

    /// The broker that coordinates a transactional id (FindCoordinator).
    pub(crate) fn txn_coordinator(&self, transactional_id: &str) -> Option<BrokerRecord> {
        self.slot_owner(self.txn_slot_of(transactional_id)?)
    }

    fn held_fence(&self, key: PartitionKey) -> Option<Fence> {
        let slots = self.slots.read().expect("slots lock poisoned");
        slots.held.get(&key.partition).map(|(epoch, _)| Fence {
            key,
            leader_epoch: *epoch,
        })
    }

    /// The broker serving a slot: this one while it holds it, otherwise the owner the
    /// ownership view names.
    fn slot_owner(&self, key: PartitionKey) -> Option<BrokerRecord> {
        if self.held_fence(key).is_some() {
            return Some(self.membership.me());
        }
        let live = self.membership.live();
        let id = self.leader(&live, &key).broker_id?;
        live.into_iter().find(|b| b.broker_id == id)
    }

    /// How long this broker has coordinated a group's slot (`None`: it does not).
    pub(crate) fn group_held_for(&self, group: &str) -> Option<Duration> {
        let key = self.group_key(group)?;
        let slots = self.slots.read().expect("slots lock poisoned");
        slots
            .held
            .get(&key.partition)
            .map(|(_, since)| since.elapsed())
    }

    /// The broker that coordinates a group (FindCoordinator).
    pub(crate) fn coordinator(&self, group: &str) -> Option<BrokerRecord> {
        self.slot_owner(self.group_key(group)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn key(p: i32) -> PartitionKey {
        PartitionKey {
            topic_id: Uuid::from_u128(42),
            partition: p,
        }
    }

    fn broker(id: i32, draining: bool) -> BrokerRecord {
        BrokerRecord {
            broker_id: id,
            session: 1,
            host: "h".into(),
            port: 1,
            zone: None,
            lease_expires_ms: i64::MAX,
            draining,
        }
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_new_brokers_share() {
        let keys: Vec<_> = (0..3000).map(key).collect();
        let before: Vec<_> = keys.iter().map(|k| rendezvous(k, [1, 2, 3])).collect();
        let after: Vec<_> = keys.iter().map(|k| rendezvous(k, [1, 2, 3, 4])).collect();
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*a, Some(4), "a key only ever moves to the new broker");
                moved += 1;
            }
        }
        // About a quarter moves; every broker gets a fair share.
        assert!((600..900).contains(&moved), "moved {moved}");
        for id in 1..=3 {
            let n = before.iter().filter(|b| **b == Some(id)).count();
            assert!((850..1150).contains(&n), "broker {id} got {n}");
        }
        // Order of the input does not matter.
        assert_eq!(
            rendezvous(&key(7), [3, 1, 2]),
            rendezvous(&key(7), [1, 2, 3])
        );
        assert_eq!(rendezvous(&key(7), []), None);
        // Pinned values: the rule is part of the cluster protocol.
        assert_eq!(group_slot("my-group", 50), group_slot("my-group", 50));
        assert_eq!(hash(&[b"a"]), mix(0xaf63_dc4c_8601_ec8c));
    }

    /// A broker that stepped down (here with its view of the store lost, so every
    /// peer's lease looks expired) sends clients of the keys it gave up to the broker
    /// the assignment rule picks among the others, and of other keys to their owner.
    #[tokio::test]
    async fn a_stepped_down_broker_names_its_successors() {
        use crate::metadata::{sqlite::SqliteStore, MetadataStore};
        let meta: Arc<dyn MetadataStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
        let soon = crate::clock::now_ms() + 200;
        for id in [2, 3] {
            let peer = BrokerRecord {
                lease_expires_ms: soon,
                ..broker(id, false)
            };
            meta.heartbeat_broker(&peer).await.unwrap();
        }
        let me = broker(1, false);
        let membership = Membership::join(meta, me, Duration::from_secs(10))
            .await
            .unwrap();
        let ownership = Ownership::new(membership.clone());
        let keys: Vec<_> = (0..40).map(key).collect();
        for k in &keys {
            ownership.note_owner(*k, 4, Some(1));
        }
        ownership.note_owner(key(99), 2, Some(3));
        let leaders = |ownership: &Ownership| -> Vec<Option<i32>> {
            let live = ownership.membership.live();
            keys.iter()
                .map(|k| ownership.leader(&live, k).broker_id)
                .collect()
        };
        // Serving, it names itself (the Metadata handler says "no leader" for a key it
        // does not hold yet).
        assert!(leaders(&ownership).iter().all(|l| *l == Some(1)));

        crate::clock::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            membership.live().len(),
            1,
            "read recently, their leases ran out"
        );
        membership.lose_store();
        membership.mark_stepped_down(true);
        let live = membership.live();
        assert_eq!(
            live.iter().map(|b| b.broker_id).collect::<Vec<_>>(),
            [1, 2, 3],
            "a lost store is no news of the peers' leases"
        );
        let named = leaders(&ownership);
        for (k, l) in keys.iter().zip(&named) {
            assert_eq!(*l, rendezvous(k, [2, 3]));
        }
        assert!(named.contains(&Some(2)) && named.contains(&Some(3)));
        assert_eq!(ownership.leader(&live, &key(99)).broker_id, Some(3));
        assert_eq!(ownership.leader(&live, &key(99)).leader_epoch, 2);
    }

    fn input<'a>(
        live: &'a [BrokerRecord],
        owners: &'a HashMap<PartitionKey, PartitionOwner>,
        held: &'a HashMap<PartitionKey, Held>,
        now: Instant,
    ) -> PlanInput<'a> {
        PlanInput {
            me: 1,
            live,
            owners,
            held,
            patience: Duration::from_secs(10),
            trust_expiry: true,
            now,
        }
    }

    #[test]
    fn plan_claims_free_keys_waits_for_live_owners_and_releases_moved_ones() {
        let live = [broker(1, false), broker(2, false)];
        let keys: Vec<_> = (0..200).map(key).collect();
        let mine: Vec<_> = keys
            .iter()
            .copied()
            .filter(|k| rendezvous(k, [1, 2]) == Some(1))
            .collect();
        let theirs: Vec<_> = keys
            .iter()
            .copied()
            .filter(|k| rendezvous(k, [1, 2]) == Some(2))
            .collect();
        let now = crate::clock::instant();
        let held = HashMap::new();
        // Nobody owns anything: claim exactly my share.
        let owners = HashMap::new();
        let mut waiting = HashMap::new();
        let actions = plan(
            &input(&live, &owners, &held, now),
            keys.clone(),
            &mut waiting,
        );
        assert_eq!(
            actions,
            mine.iter().map(|k| Action::Claim(*k)).collect::<Vec<_>>()
        );
        // Broker 2 (live) still owns my share: wait, then claim after the patience.
        let owners: HashMap<_, _> = mine
            .iter()
            .map(|k| {
                (
                    *k,
                    PartitionOwner {
                        key: *k,
                        leader_epoch: 3,
                        owner: Some(2),
                    },
                )
            })
            .collect();
        let actions = plan(
            &input(&live, &owners, &held, now),
            keys.clone(),
            &mut waiting,
        );
        assert!(actions.is_empty());
        assert_eq!(waiting.len(), mine.len());
        let later = now + Duration::from_secs(11);
        let actions = plan(
            &input(&live, &owners, &held, later),
            keys.clone(),
            &mut waiting,
        );
        assert_eq!(actions.len(), mine.len());
        // Broker 2's lease expired: claim at once.
        let alone = [broker(1, false)];
        let mut waiting = HashMap::new();
        let actions = plan(
            &input(&alone, &owners, &held, now),
            keys.clone(),
            &mut waiting,
        );
        assert_eq!(actions.len(), keys.len());
        // Holding everything with broker 2 live: release its share; step down where a
        // newer epoch exists.
        let held: HashMap<_, _> = keys
            .iter()
            .map(|k| {
                (
                    *k,
                    Held {
                        leader_epoch: 3,
                        fenced: false,
                    },
                )
            })
            .collect();
        let mut owners = HashMap::new();
        owners.insert(
            mine[0],
            PartitionOwner {
                key: mine[0],
                leader_epoch: 4,
                owner: Some(2),
            },
        );
        let actions = plan(
            &input(&live, &owners, &held, now),
            keys.clone(),
            &mut waiting,
        );
        let mut expected: Vec<_> = theirs.iter().map(|k| Action::Release(*k)).collect();
        expected.push(Action::StepDown(mine[0]));
        let mut got = actions.clone();
        got.sort_by_key(|a| format!("{a:?}"));
        expected.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(got, expected);
        // Draining: give everything away, take nothing.
        let draining = [broker(1, true), broker(2, false)];
        let owners = HashMap::new();
        let actions = plan(
            &input(&draining, &owners, &held, now),
            keys.clone(),
            &mut waiting,
        );
        assert_eq!(actions.len(), keys.len());
        assert!(actions.iter().all(|a| matches!(a, Action::Release(_))));
    }

    /// One broker of the simulated cluster: what it holds, with the epoch it claimed.
    #[derive(Default)]
    struct SimBroker {
        held: HashMap<PartitionKey, Held>,
        waiting: HashMap<PartitionKey, Instant>,
    }

    /// Runs one pass of every live broker's planner against a shared owner table and
    /// applies the actions as the broker and the metadata store would (a claim raises
    /// the epoch, a release clears the owner if the epoch is still the releaser's).
    fn pass(
        brokers: &mut BTreeMap<i32, SimBroker>,
        live: &[BrokerRecord],
        owners: &mut HashMap<PartitionKey, PartitionOwner>,
        keys: &[PartitionKey],
        now: Instant,
    ) {
        for b in live {
            let me = b.broker_id;
            let sim = brokers.entry(me).or_default();
            let input = PlanInput {
                me,
                live,
                owners,
                held: &sim.held,
                patience: Duration::ZERO,
                trust_expiry: true,
                now,
            };
            let eligible: Vec<i32> = live
                .iter()
                .filter(|b| !b.draining)
                .map(|b| b.broker_id)
                .collect();
            let actions = plan(&input, keys.iter().copied(), &mut sim.waiting);
            for action in actions {
                match action {
                    Action::Claim(k) => {
                        assert_eq!(
                            rendezvous(&k, eligible.iter().copied()),
                            Some(me),
                            "broker {me} claimed a key assigned elsewhere"
                        );
                        assert!(!b.draining, "a draining broker claimed a key");
                        let o = owners.entry(k).or_insert(PartitionOwner {
                            key: k,
                            leader_epoch: 0,
                            owner: None,
                        });
                        o.leader_epoch += 1;
                        o.owner = Some(me);
                        sim.held.insert(
                            k,
                            Held {
                                leader_epoch: o.leader_epoch,
                                fenced: false,
                            },
                        );
                    }
                    Action::Release(k) => {
                        let h = sim.held.remove(&k).expect("released a key it held");
                        if let Some(o) = owners.get_mut(&k) {
                            if o.leader_epoch == h.leader_epoch {
                                o.owner = None;
                            }
                        }
                    }
                    Action::StepDown(k) => {
                        sim.held
                            .remove(&k)
                            .expect("stepped down from a key it held");
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// A cluster of planners over one owner table, through any sequence of brokers
        /// joining, leaving (their lease expiring), pausing past their lease and
        /// resuming, and draining: at no point do two
        /// brokers hold one key under its current epoch, and once membership stops
        /// changing every key ends up held by exactly the broker the rule names, under
        /// the epoch the table records, and a draining broker holds nothing.
        #[test]
        fn planners_converge_and_never_share_an_epoch(
            changes in proptest::collection::vec((1i32..6, 0u8..4), 1..12),
        ) {
            let keys: Vec<PartitionKey> = (0..40).map(key).collect();
            // id -> 0 gone (its state lost), 1 live, 2 draining, 3 paused past its lease
            // (not live, but it keeps what it believes it holds).
            let mut state: BTreeMap<i32, u8> = BTreeMap::new();
            let mut brokers: BTreeMap<i32, SimBroker> = BTreeMap::new();
            let mut owners: HashMap<PartitionKey, PartitionOwner> = HashMap::new();
            let now = crate::clock::instant();
            let live_of = |state: &BTreeMap<i32, u8>| -> Vec<BrokerRecord> {
                state
                    .iter()
                    .filter(|(_, s)| **s == 1 || **s == 2)
                    .map(|(id, s)| broker(*id, *s == 2))
                    .collect()
            };
            let check_single_holder = |brokers: &BTreeMap<i32, SimBroker>, owners: &HashMap<PartitionKey, PartitionOwner>| {
                for k in &keys {
                    let current = owners.get(k).map(|o| o.leader_epoch);
                    let holders = brokers
                        .values()
                        .filter(|b| b.held.get(k).map(|h| h.leader_epoch) == current && current.is_some())
                        .count();
                    assert!(holders <= 1, "two brokers hold {k:?} under its current epoch");
                }
            };
            for (id, to) in changes {
                state.insert(id, to);
                if to == 0 {
                    // Gone (lease expired): its tasks die with it.
                    brokers.remove(&id);
                }
                let live = live_of(&state);
                pass(&mut brokers, &live, &mut owners, &keys, now);
                check_single_holder(&brokers, &owners);
            }
            // Stable membership (paused brokers resume, with what they believed they
            // held): a few passes settle everything.
            for s in state.values_mut() {
                if *s == 3 {
                    *s = 1;
                }
            }
            let live = live_of(&state);
            for _ in 0..4 {
                pass(&mut brokers, &live, &mut owners, &keys, now);
                check_single_holder(&brokers, &owners);
            }
            let eligible: Vec<i32> = live.iter().filter(|b| !b.draining).map(|b| b.broker_id).collect();
            for k in &keys {
                let target = rendezvous(k, eligible.iter().copied());
                let holders: Vec<i32> = brokers
                    .iter()
                    .filter(|(_, b)| b.held.contains_key(k))
                    .map(|(id, _)| *id)
                    .collect();
                match target {
                    Some(t) => {
                        proptest::prop_assert_eq!(&holders, &vec![t]);
                        let o = owners[k];
                        proptest::prop_assert_eq!(o.owner, Some(t));
                        proptest::prop_assert_eq!(brokers[&t].held[k].leader_epoch, o.leader_epoch);
                    }
                    None => proptest::prop_assert!(holders.is_empty(), "no eligible broker, yet {:?} hold {:?}", holders, k),
                }
            }
        }
    }
}
