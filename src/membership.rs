//! Membership: this broker's registration in the metadata store, kept alive by a
//! heartbeat lease, and the list of live brokers that Metadata and DescribeCluster
//! report to clients.
//!
//! A broker registers before it serves and renews its lease every third of
//! `broker.lease.ms`; a broker that stops heartbeating (killed, paused, cut off) leaves
//! the list once its lease expires, and one that shuts down gracefully deregisters at
//! once. The live list is refreshed with every heartbeat, so it is at most a third of a
//! lease old; this broker always lists itself.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tracing::{info, warn};

use crate::clock::now_ms;
use crate::metadata::{BrokerRecord, MetaError, MetadataStore};

#[derive(Debug)]
pub(crate) struct Membership {
    meta: Arc<dyn MetadataStore>,
    /// This broker's registration; `lease_expires_ms` is set at each heartbeat.
    me: BrokerRecord,
    lease: Duration,
    live: RwLock<Vec<BrokerRecord>>,
    /// Held for the whole of a read of the live list and its storing: the heartbeat,
    /// the controller and the health check all refresh, and reads one after another
    /// are the only order that is also the order in which the store answered them (a
    /// read numbered later may run its query earlier, while an older one waits for a
    /// connection), so a slow read never overwrites a newer one.
    reading: tokio::sync::Mutex<()>,
    /// Set by drain or shutdown: registered as draining from then on.
    draining: std::sync::atomic::AtomicBool,
    /// Set while stepped down for lack of a store (see the `health` module): registered as
    /// draining until it is cleared.
    stepped_down: std::sync::atomic::AtomicBool,
    /// Set once deregistered: heartbeats stop.
    left: std::sync::atomic::AtomicBool,
    /// Since when reads of the live list have kept succeeding (`None` after a failure).
    settled_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Membership {
    /// Registers this broker (failing if the metadata store refuses) and loads the list.
    pub(crate) async fn join(
        meta: Arc<dyn MetadataStore>,
        me: BrokerRecord,
        lease: Duration,
    ) -> anyhow::Result<Arc<Membership>> {
        let membership = Arc::new(Membership {
            meta,
            me,
            lease,
            live: RwLock::new(Vec::new()),
            reading: tokio::sync::Mutex::new(()),
            draining: std::sync::atomic::AtomicBool::new(false),
            stepped_down: std::sync::atomic::AtomicBool::new(false),
            left: std::sync::atomic::AtomicBool::new(false),
            settled_since: std::sync::Mutex::new(None),
        });
        membership.heartbeat().await?;
        info!(
            broker_id = membership.me.broker_id,
            session = membership.me.session,
            zone = ?membership.me.zone,
            live = membership.live().len(),
            "registered in the cluster"
        );
        Ok(membership)
    }

    /// Renews the lease and refreshes the live list.
    async fn heartbeat(&self) -> Result<(), MetaError> {
        if self.left.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = now_ms();
        let mut me = self.me();
        me.lease_expires_ms = now + self.lease.as_millis() as i64;
        self.meta.heartbeat_broker(&me).await?;
        self.refresh().await
    }

    /// Re-reads the live brokers (the ownership loop calls this every pass, more often
    /// than heartbeats, so a broker whose lease ran out is noticed promptly).
    /// A refresh returns a list at least as new as the store was when it was called.
    pub(crate) async fn refresh(&self) -> Result<(), MetaError> {
        let _reading = self.reading.lock().await;
        let result = self.meta.live_brokers(now_ms()).await;
        let mut settled = self.settled_since.lock().expect("membership lock poisoned");
        match result {
            Ok(live) => {
                *self.live.write().expect("membership lock poisoned") = live;
                settled.get_or_insert_with(crate::clock::instant);
                Ok(())
            }
            Err(e) => {
                *settled = None;
                Err(e)
            }
        }
    }

    /// Whether the live list can be trusted to say a broker is gone: reads have kept
    /// succeeding for half a lease, so every live broker has heartbeated since. After a
    /// metadata-store outage every lease looks expired until the brokers heartbeat
    /// again; taking partitions over in that window would only move them needlessly.
    pub(crate) fn settled(&self) -> bool {
        self.settled_since
            .lock()
            .expect("membership lock poisoned")
            .is_some_and(|t| t.elapsed() >= self.lease / 2)
    }

    /// This broker's registration as it is heartbeated now.
    pub(crate) fn me(&self) -> BrokerRecord {
        BrokerRecord {
            draining: self.is_draining(),
            ..self.me.clone()
        }
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether this broker takes no partitions: drained, shutting down, or stepped
    /// down for lack of a store.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.stepped_down.load(Ordering::Acquire)
    }

    /// Marks this broker stepped down (registered as draining) or back, and tells the
    /// metadata store if it can.
    pub(crate) async fn set_stepped_down(&self, stepped_down: bool) -> Result<(), MetaError> {
        self.mark_stepped_down(stepped_down);
        self.heartbeat().await
    }

    /// Marks this broker stepped down (or back) in its own view only; the next
    /// heartbeat tells the others.
    pub(crate) fn mark_stepped_down(&self, stepped_down: bool) {
        self.stepped_down.store(stepped_down, Ordering::Release);
    }

    /// Whether another broker was live and serving (not draining) at the last read of
    /// the list: someone who can take this broker's partitions over.
    pub(crate) fn others_serving(&self) -> bool {
        self.live
            .read()
            .expect("membership lock poisoned")
            .iter()
            .any(|b| b.broker_id != self.me.broker_id && !b.draining)
    }

    /// Registers this broker as draining: the others stop assigning it work, while it
    /// stays live (and its partitions served) until it has handed everything off.
    pub(crate) async fn drain(&self) -> Result<(), MetaError> {
        self.draining.store(true, Ordering::Release);
        self.heartbeat().await
    }

    /// Heartbeats every third of the lease until shutdown (or the membership is dropped).
    pub(crate) fn spawn(self: &Arc<Self>, tasks: &crate::tasks::Tasks) {
        let weak: Weak<Membership> = Arc::downgrade(self);
        let every = self.lease / 3;
        tasks.spawn_every(every, move || {
            let weak = weak.clone();
            async move {
                let Some(m) = weak.upgrade() else {
                    return false;
                };
                match m.heartbeat().await {
                    Ok(()) => {}
                    Err(MetaError::Superseded) => warn!(
                        broker_id = m.me.broker_id,
                        session = m.me.session,
                        "a newer session of this broker id is registered; this one is superseded"
                    ),
                    Err(e) => warn!(error = %e, "broker heartbeat failed; the lease runs on"),
                }
                true
            }
        });
    }

    /// Whether the last read of the live list failed: the store is out of reach, and
    /// the list is as it was before.
    fn view_stale(&self) -> bool {
        self.settled_since
            .lock()
            .expect("membership lock poisoned")
            .is_none()
    }

    /// Marks the last read of the live list failed, as a store outage does.
    #[cfg(test)]
    pub(crate) fn lose_store(&self) {
        *self.settled_since.lock().expect("membership lock poisoned") = None;
    }

    /// Live brokers by id as last seen, those whose lease ran out since dropped; this
    /// broker is always among them. While the store cannot be read, leases are not
    /// checked: each broker's lease ran on from the last read without news of its
    /// renewals, so an expired one says nothing, and a broker cut off from the store
    /// keeps naming its peers to clients (see `Ownership::leader`) rather than only
    /// itself.
    pub(crate) fn live(&self) -> Vec<BrokerRecord> {
        let now = if self.view_stale() {
            i64::MIN
        } else {
            now_ms()
        };
        let mut live: Vec<BrokerRecord> = self
            .live
            .read()
            .expect("membership lock poisoned")
            .iter()
            .filter(|b| b.lease_expires_ms > now && b.broker_id != self.me.broker_id)
            .cloned()
            .collect();
        if !self.left.load(Ordering::Acquire) {
            live.push(self.me());
        }
        live.sort_by_key(|b| b.broker_id);
        live
    }

    /// Deregisters (graceful shutdown), so the others need not wait out the lease.
    pub(crate) async fn leave(&self) {
        self.left.store(true, Ordering::Release);
        if let Err(e) = self
            .meta
            .deregister_broker(self.me.broker_id, self.me.session)
            .await
        {
            warn!(error = %e, "could not deregister; the lease will expire");
        }
    }
}
