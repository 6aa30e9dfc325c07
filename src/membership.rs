//! Membership: this broker's registration in the metadata store, kept alive by a
//! heartbeat lease, and the list of live brokers that Metadata and DescribeCluster
//! report to clients.
//!
//! A broker registers before it serves and renews its lease every third of
//! `broker.lease.ms`; a broker that stops heartbeating (killed, paused, cut off) leaves
//! the list once its lease expires, and one that shuts down gracefully deregisters at
//! once. The live list is refreshed with every heartbeat, so it is at most a third of a
//! lease old; this broker always lists itself.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tracing::{info, warn};

use crate::clock::now_ms;
use crate::metadata::{BrokerRecord, MetaError, MetadataStore};

#[derive(Debug)]
pub struct Membership {
    meta: Arc<dyn MetadataStore>,
    /// This broker's registration; `lease_expires_ms` is set at each heartbeat.
    me: BrokerRecord,
    lease: Duration,
    live: RwLock<Vec<BrokerRecord>>,
}

impl Membership {
    /// Registers this broker (failing if the metadata store refuses) and loads the list.
    pub async fn join(
        meta: Arc<dyn MetadataStore>,
        me: BrokerRecord,
        lease: Duration,
    ) -> anyhow::Result<Arc<Membership>> {
        let membership = Arc::new(Membership {
            meta,
            me,
            lease,
            live: RwLock::new(Vec::new()),
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
        let now = now_ms();
        let mut me = self.me.clone();
        me.lease_expires_ms = now + self.lease.as_millis() as i64;
        self.meta.heartbeat_broker(&me).await?;
        let live = self.meta.live_brokers(now).await?;
        *self.live.write().expect("membership lock poisoned") = live;
        Ok(())
    }

    /// Heartbeats every third of the lease until the membership is dropped.
    pub fn spawn(self: &Arc<Self>) {
        let weak: Weak<Membership> = Arc::downgrade(self);
        let every = self.lease / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(m) = weak.upgrade() else { return };
                match m.heartbeat().await {
                    Ok(()) => {}
                    Err(MetaError::Superseded) => warn!(
                        broker_id = m.me.broker_id,
                        session = m.me.session,
                        "a newer session of this broker id is registered; this one is superseded"
                    ),
                    Err(e) => warn!(error = %e, "broker heartbeat failed; the lease runs on"),
                }
            }
        });
    }

    /// Live brokers by id as last seen, those whose lease ran out since dropped; this
    /// broker is always among them.
    pub fn live(&self) -> Vec<BrokerRecord> {
        let now = now_ms();
        let mut live: Vec<BrokerRecord> = self
            .live
            .read()
            .expect("membership lock poisoned")
            .iter()
            .filter(|b| b.lease_expires_ms > now && b.broker_id != self.me.broker_id)
            .cloned()
            .collect();
        live.push(self.me.clone());
        live.sort_by_key(|b| b.broker_id);
        live
    }

    /// Deregisters (graceful shutdown), so the others need not wait out the lease.
    pub async fn leave(&self) {
        if let Err(e) = self
            .meta
            .deregister_broker(self.me.broker_id, self.me.session)
            .await
        {
            warn!(error = %e, "could not deregister; the lease will expire");
        }
    }
}
