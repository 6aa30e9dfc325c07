//! Store reachability: whether this broker still reaches the object store and the
//! metadata store, and when it must step down from its partitions because it does not.
//!
//! A broker cut off from the object store can renew its leases (it reaches the
//! metadata store) yet commit nothing; one cut off from the metadata store can commit
//! nothing either. Either way its partitions would stall for the whole cut while other
//! brokers could serve them. So a broker that has had no answer from one of the stores
//! for `store.unreachable.timeout.ms` steps down: it registers as draining and gives up
//! every partition and coordinator slot, and the others take them over (at once when
//! it could release them, after its lease otherwise). It comes back only once it has
//! reached both stores for `ownership.hold.down.ms`, so a flapping link does not move
//! partitions back and forth; the others see it draining until then.
//!
//! Stepping down only helps when someone else can take over: a broker that sees no
//! other live broker serving stays (a lone broker, or the last one standing in an
//! outage of the store itself), and one whose peers are all stepped down comes back as
//! soon as it reaches both stores again.
//!
//! [`Health`] is the decision, a plain state machine over the times the stores last
//! answered; [`StoreWatch`] is the loop around it: it asks quiet stores, feeds the
//! decision once a second and acts on its output (the controller steps down, the
//! membership record says whether this broker serves).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::controller::ControllerHandle;
use crate::membership::Membership;

/// What one look at the stores found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observation {
    pub now: Instant,
    /// When the object store last answered (`None`: not yet).
    pub object_answered: Option<Instant>,
    /// When the metadata store last answered (`None`: not yet).
    pub metadata_answered: Option<Instant>,
    /// Whether another live broker serves (is registered and not draining), so that
    /// stepping down hands this broker's partitions to someone.
    pub others_serving: bool,
}

/// What the broker must do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Give up every partition and slot and register as draining.
    StepDown { object: bool, metadata: bool },
    /// Take partitions again: register as serving.
    Return,
}

#[derive(Debug, Clone)]
pub(crate) struct Health {
    deadline: Duration,
    hold_down: Duration,
    /// Counts as the last answer of a store that has not answered yet.
    started: Instant,
    stepped_down: bool,
    /// Since when both stores have answered within the deadline, while stepped down.
    reachable_since: Option<Instant>,
    object_reachable: bool,
    metadata_reachable: bool,
}

impl Health {
    pub(crate) fn new(deadline: Duration, hold_down: Duration, started: Instant) -> Health {
        Health {
            deadline,
            hold_down,
            started,
            stepped_down: false,
            reachable_since: None,
            object_reachable: true,
            metadata_reachable: true,
        }
    }

    pub(crate) fn stepped_down(&self) -> bool {
        self.stepped_down
    }

    pub(crate) fn object_reachable(&self) -> bool {
        self.object_reachable
    }

    pub(crate) fn metadata_reachable(&self) -> bool {
        self.metadata_reachable
    }

    fn reachable(&self, now: Instant, answered: Option<Instant>) -> bool {
        let last = answered.unwrap_or(self.started).max(self.started);
        now.saturating_duration_since(last) < self.deadline
    }

    /// Takes in one observation; returns what the broker must do, if anything.
    pub(crate) fn step(&mut self, o: &Observation) -> Option<Change> {
        self.object_reachable = self.reachable(o.now, o.object_answered);
        self.metadata_reachable = self.reachable(o.now, o.metadata_answered);
        let both = self.object_reachable && self.metadata_reachable;
        if !self.stepped_down {
            if both || !o.others_serving {
                return None;
            }
            self.stepped_down = true;
            self.reachable_since = None;
            return Some(Change::StepDown {
                object: !self.object_reachable,
                metadata: !self.metadata_reachable,
            });
        }
        if !both {
            self.reachable_since = None;
            return None;
        }
        let since = *self.reachable_since.get_or_insert(o.now);
        if o.now.saturating_duration_since(since) >= self.hold_down || !o.others_serving {
            self.stepped_down = false;
            self.reachable_since = None;
            return Some(Change::Return);
        }
        None
    }
}

/// The broker's store watch: the I/O around [`Health`].
#[derive(Debug)]
pub(crate) struct StoreWatch {
    health: Mutex<Health>,
    store: Arc<tiering::Store>,
    membership: Arc<Membership>,
    controller: ControllerHandle,
    /// A store quiet for this long is asked (so an idle broker is never taken for one
    /// cut off); also the bound on each question.
    probe_every: Duration,
}

impl StoreWatch {
    pub(crate) fn new(
        deadline: Duration,
        hold_down: Duration,
        store: Arc<tiering::Store>,
        membership: Arc<Membership>,
        controller: ControllerHandle,
    ) -> StoreWatch {
        StoreWatch {
            health: Mutex::new(Health::new(deadline, hold_down, crate::clock::instant())),
            store,
            membership,
            controller,
            // An idle store is probed often enough to notice a cut well within the deadline.
            probe_every: (deadline / 4).max(Duration::from_millis(100)),
        }
    }

    /// How often [`check`](Self::check) should run.
    pub(crate) fn period(&self) -> Duration {
        Duration::from_secs(1).min(self.probe_every)
    }

    /// One look at the stores, and stepping down or back accordingly.
    pub(crate) async fn check(&self) {
        let probe_every = self.probe_every;
        let now = crate::clock::instant();
        let quiet = |t: Option<Instant>| t.is_none_or(|t| now - t >= probe_every);
        if quiet(self.store.last_answer()) {
            self.store.probe(probe_every).await;
        }
        if quiet(crate::metadata::instrumented::last_answer()) {
            let _ = tokio::time::timeout(probe_every, self.membership.refresh()).await;
        }
        let observation = Observation {
            now: crate::clock::instant(),
            object_answered: self.store.last_answer(),
            metadata_answered: crate::metadata::instrumented::last_answer(),
            others_serving: self.membership.others_serving(),
        };
        let (change, object, metadata) = {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            let change = health.step(&observation);
            (
                change,
                health.object_reachable(),
                health.metadata_reachable(),
            )
        };
        let m = crate::metrics::metrics();
        m.store_reachable
            .with_label_values(&["object"])
            .set(i64::from(object));
        m.store_reachable
            .with_label_values(&["metadata"])
            .set(i64::from(metadata));
        match change {
            Some(Change::StepDown { object, metadata }) => {
                self.controller.step_down(object, metadata).await
            }
            Some(Change::Return) => {
                m.stepped_down.set(0);
                info!("both stores answer again: taking partitions again");
                let back = self.membership.set_stepped_down(false);
                if !matches!(tokio::time::timeout(probe_every, back).await, Ok(Ok(()))) {
                    warn!("could not register as serving again yet; the next heartbeat will");
                }
            }
            None => {}
        }
    }

    /// Whether this broker has stepped down for lack of a store; `Some(reason)` if so.
    pub(crate) fn stepped_down(&self) -> Option<&'static str> {
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if !health.stepped_down() {
            return None;
        }
        Some(
            match (health.object_reachable(), health.metadata_reachable()) {
                (false, _) => "stepped down: the object store is unreachable\n",
                (true, false) => "stepped down: the metadata store is unreachable\n",
                (true, true) => {
                    "stepped down: waiting out the hold-down after the stores came back\n"
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEADLINE: Duration = Duration::from_secs(5);
    const HOLD: Duration = Duration::from_secs(30);

    fn look(now: Instant, object: Instant, metadata: Instant, others: bool) -> Observation {
        Observation {
            now,
            object_answered: Some(object),
            metadata_answered: Some(metadata),
            others_serving: others,
        }
    }

    #[test]
    fn steps_down_after_the_deadline_and_returns_after_the_hold_down() {
        let t0 = crate::clock::instant();
        let mut h = Health::new(DEADLINE, HOLD, t0);
        let s = Duration::from_secs;
        // The object store stops answering at t0; the metadata store keeps answering.
        assert_eq!(h.step(&look(t0 + s(4), t0, t0 + s(4), true)), None);
        assert_eq!(
            h.step(&look(t0 + s(5), t0, t0 + s(5), true)),
            Some(Change::StepDown {
                object: true,
                metadata: false
            })
        );
        assert!(!h.object_reachable() && h.metadata_reachable());
        // Healed at t0+20s: nothing for the hold-down, then back.
        assert_eq!(
            h.step(&look(t0 + s(20), t0 + s(20), t0 + s(20), true)),
            None
        );
        assert_eq!(
            h.step(&look(t0 + s(49), t0 + s(49), t0 + s(49), true)),
            None
        );
        assert_eq!(
            h.step(&look(t0 + s(50), t0 + s(50), t0 + s(50), true)),
            Some(Change::Return)
        );
    }

    #[test]
    fn a_lone_broker_never_steps_down_and_the_last_one_comes_back_at_once() {
        let t0 = crate::clock::instant();
        let s = Duration::from_secs;
        let mut h = Health::new(DEADLINE, HOLD, t0);
        assert_eq!(h.step(&look(t0 + s(60), t0, t0, false)), None);
        assert!(!h.stepped_down());
        let mut h = Health::new(DEADLINE, HOLD, t0);
        assert!(h.step(&look(t0 + s(6), t0, t0 + s(6), true)).is_some());
        // Its peers stepped down too: back as soon as both stores answer.
        assert_eq!(h.step(&look(t0 + s(7), t0, t0 + s(7), false)), None);
        assert_eq!(
            h.step(&look(t0 + s(8), t0 + s(8), t0 + s(8), false)),
            Some(Change::Return)
        );
    }

    proptest! {
        /// Over any history of answers: a broker steps down only when a store has been
        /// silent for the deadline and another broker serves; it returns only after
        /// both stores answered throughout the hold-down (or no one else serves); and
        /// changes alternate.
        #[test]
        fn decisions_follow_the_rules(
            events in prop::collection::vec((0u64..3000, any::<bool>(), any::<bool>(), any::<bool>()), 1..200),
        ) {
            let t0 = crate::clock::instant();
            let mut h = Health::new(DEADLINE, HOLD, t0);
            let (mut now, mut object, mut metadata) = (t0, t0, t0);
            let mut healthy_since: Option<Instant> = Some(t0);
            for (advance_ms, object_ok, metadata_ok, others) in events {
                now += Duration::from_millis(advance_ms);
                if object_ok { object = now; }
                if metadata_ok { metadata = now; }
                let both = now - object < DEADLINE && now - metadata < DEADLINE;
                let was_down = h.stepped_down();
                let change = h.step(&look(now, object, metadata, others));
                match change {
                    Some(Change::StepDown { .. }) => {
                        prop_assert!(!was_down && !both && others);
                    }
                    Some(Change::Return) => {
                        prop_assert!(was_down && both);
                        let held = healthy_since.is_some_and(|t| now - t >= HOLD);
                        prop_assert!(held || !others);
                    }
                    None => prop_assert_eq!(was_down, h.stepped_down()),
                }
                if both { healthy_since.get_or_insert(now); } else { healthy_since = None; }
                if matches!(change, Some(Change::StepDown { .. })) { healthy_since = None; }
            }
        }
    }
}
