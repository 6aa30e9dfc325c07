//! The transaction coordinator: the transactional ids whose coordinator slot this
//! broker holds, their state kept in the metadata store.
//!
//! A transactional id belongs to slot `hash(id) % slots` of the same coordinator slots
//! groups use (the partitions of `__consumer_offsets`): the slot's owner coordinates
//! it, FindCoordinator names that broker, and every write of the id's record is fenced
//! by the slot's epoch, so a paused former coordinator changes nothing after its
//! successor took over. The decisions are [`machine`]'s; this module runs them one
//! request at a time per id, stores each new record before answering, and writes a
//! decision's markers: to every partition in the transaction (through whichever
//! broker owns it), then stores the completed record, which also settles the offsets
//! the transaction committed. A coordinator that takes a slot over loads its ids and
//! finishes any decision whose markers were not all written.
//!
//! Open transactions past their timeout are aborted under a bumped epoch (the producer
//! is fenced), checked every `transaction.abort.timed.out.transaction.cleanup.interval.ms`.

pub(crate) mod machine;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::log::marker::Marker;
use crate::metadata::{Fence, MetaError, MetadataStore, TxnRecord, TxnState};
use crate::ownership::Ownership;
use machine::{Producer, Step, TxnError};

/// Settings of the coordinator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxnConfig {
    /// `transaction.max.timeout.ms`: the longest timeout a producer may ask for.
    pub max_timeout_ms: i32,
    /// `transactional.id.expiration.ms`: an id idle this long is forgotten.
    pub id_expiration_ms: i64,
    /// `transaction.max.open`: transactions open at once on this broker's coordinator.
    pub max_open: usize,
}

/// Why a request was not decided by this coordinator.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// This broker does not hold the id's slot.
    #[error("not the coordinator of this transactional id")]
    NotCoordinator,
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// The id's record could not be read or stored.
    #[error("transaction state store: {0}")]
    Store(#[from] MetaError),
    /// Too many transactions open on this coordinator.
    #[error("too many open transactions")]
    TooManyOpen,
}

/// What writing one marker came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MarkerOutcome {
    Written,
    /// Not now (no owner, an owner changing, a store unavailable): try again.
    Retry(String),
    /// Never (the topic is gone, or the partition refuses the marker as stale).
    Skip(String),
}

/// Writes a marker to a partition, wherever it is owned (the broker implements it).
#[async_trait]
pub(crate) trait MarkerWriter: Send + Sync + std::fmt::Debug {
    async fn write(&self, topic: &str, partition: i32, marker: Marker) -> MarkerOutcome;
}

/// One transactional id's record as this coordinator holds it.
#[derive(Debug, Default)]
struct Entry {
    /// The slot epoch the record was loaded or stored under (`None`: not loaded).
    loaded_under: Option<i32>,
    record: Option<TxnRecord>,
}

#[derive(Debug)]
pub(crate) struct TxnCoordinator {
    meta: Arc<dyn MetadataStore>,
    ownership: Arc<Ownership>,
    config: TxnConfig,
    markers: Arc<dyn MarkerWriter>,
    /// Ids by name, each behind its own lock: one request at a time per id.
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
    /// Slots whose ids are loaded, with the epoch they were loaded under.
    loaded: tokio::sync::Mutex<HashMap<i32, i32>>,
    /// The ids with a transaction open (`Ongoing`) now.
    open: Mutex<std::collections::HashSet<String>>,
    tasks: Arc<crate::tasks::Tasks>,
}

/// Base delay between marker attempts; doubled up to [`MARKER_RETRY_MAX`].
const MARKER_RETRY: Duration = Duration::from_millis(50);
const MARKER_RETRY_MAX: Duration = Duration::from_secs(2);

impl TxnCoordinator {
    pub(crate) fn new(
        meta: Arc<dyn MetadataStore>,
        ownership: Arc<Ownership>,
        config: TxnConfig,
        markers: Arc<dyn MarkerWriter>,
        tasks: Arc<crate::tasks::Tasks>,
    ) -> Arc<TxnCoordinator> {
        Arc::new(TxnCoordinator {
            meta,
            ownership,
            config,
            markers,
            entries: Mutex::new(HashMap::new()),
            loaded: tokio::sync::Mutex::new(HashMap::new()),
            open: Mutex::new(std::collections::HashSet::new()),
            tasks,
        })
    }

    fn entry(&self, id: &str) -> Arc<tokio::sync::Mutex<Entry>> {
        self.entries
            .lock()
            .expect("txn entries lock poisoned")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// The fence of the id's slot, loading the slot's ids first if this broker took it
    /// since the last request: `NotCoordinator` unless this broker holds it.
    async fn fence(self: &Arc<Self>, id: &str) -> Result<Fence, CallError> {
        let fence = self
            .ownership
            .txn_fence(id)
            .ok_or(CallError::NotCoordinator)?;
        let mut loaded = self.loaded.lock().await;
        if loaded.get(&fence.key.partition) != Some(&fence.leader_epoch) {
            self.load_slots(&[fence]).await?;
            loaded.insert(fence.key.partition, fence.leader_epoch);
        }
        Ok(fence)
    }

    /// Loads every held slot not loaded under its current epoch: a slot taken over
    /// holds decisions to finish and open transactions to time out, whether or not
    /// their producers ever come back.
    async fn load_held(self: &Arc<Self>) {
        let mut loaded = self.loaded.lock().await;
        let due: Vec<Fence> = self
            .ownership
            .held_slots()
            .into_iter()
            .filter(|(key, h)| loaded.get(&key.partition) != Some(&h.leader_epoch))
            .map(|(key, h)| Fence {
                key,
                leader_epoch: h.leader_epoch,
            })
            .collect();
        if due.is_empty() {
            return;
        }
        match self.load_slots(&due).await {
            Ok(()) => loaded.extend(due.iter().map(|f| (f.key.partition, f.leader_epoch))),
            Err(e) => debug!(error = %e, "coordinator slots not loaded yet"),
        }
    }

    /// Loads the ids of slots just taken, and finishes their decisions.
    async fn load_slots(self: &Arc<Self>, fences: &[Fence]) -> Result<(), CallError> {
        let records = self.meta.list_txns().await?;
        let mut resumed = 0;
        let mut count = 0;
        for record in records {
            let slot = self.ownership.txn_slot_of(&record.transactional_id);
            let Some(&fence) = fences.iter().find(|f| Some(f.key) == slot) else {
                continue;
            };
            count += 1;
            let entry = self.entry(&record.transactional_id);
            let mut e = entry.lock().await;
            let deciding = matches!(
                record.state,
                TxnState::PrepareCommit | TxnState::PrepareAbort
            );
            e.loaded_under = Some(fence.leader_epoch);
            self.note(&record);
            e.record = Some(record.clone());
            drop(e);
            if deciding {
                resumed += 1;
                self.spawn_completion(record, fence);
            }
        }
        info!(
            slots = fences.len(),
            ids = count,
            resumed,
            "transaction coordinator slots loaded"
        );
        Ok(())
    }

    /// Runs `decide` against the id's record, storing what it decides (asking for a
    /// new producer id when it needs one) and writing the markers of a decision.
    async fn run(
        self: &Arc<Self>,
        id: &str,
        mut decide: impl FnMut(Option<&TxnRecord>, Option<i64>) -> Step,
    ) -> Result<(i64, i16), CallError> {
        let fence = self.fence(id).await?;
        let entry = self.entry(id);
        let mut e = entry.lock().await;
        if e.loaded_under != Some(fence.leader_epoch) {
            // An id first seen under this epoch and not in the slot's listing.
            e.record = None;
            e.loaded_under = Some(fence.leader_epoch);
        }
        let mut step = decide(e.record.as_ref(), None);
        if step == Step::NeedProducerId {
            let id = self.meta.next_producer_id().await?;
            step = decide(e.record.as_ref(), Some(id));
        }
        let Step::Decided { record, answer } = step else {
            return Err(CallError::Txn(TxnError::ConcurrentTransactions));
        };
        if let Some(record) = record {
            let opens = record.state == TxnState::Ongoing
                && e.record
                    .as_ref()
                    .is_none_or(|r| r.state != TxnState::Ongoing);
            if opens && self.open_count() >= self.config.max_open {
                return Err(CallError::TooManyOpen);
            }
            self.meta.put_txn(&record, fence).await?;
            self.note(&record);
            let deciding = matches!(
                record.state,
                TxnState::PrepareCommit | TxnState::PrepareAbort
            );
            e.record = Some(record.clone());
            if deciding {
                self.spawn_completion(record, fence);
            }
        }
        Ok(answer?)
    }

    /// Transactions open now on this coordinator.
    pub(crate) fn open_count(&self) -> usize {
        self.open.lock().expect("txn open lock poisoned").len()
    }

    /// Notes whether an id's transaction is open after its record changed.
    fn note(&self, record: &TxnRecord) {
        let mut open = self.open.lock().expect("txn open lock poisoned");
        if record.state == TxnState::Ongoing {
            open.insert(record.transactional_id.clone());
        } else {
            open.remove(&record.transactional_id);
        }
    }

    pub(crate) async fn init_producer_id(
        self: &Arc<Self>,
        id: &str,
        expected: Option<Producer>,
        timeout_ms: i32,
    ) -> Result<(i64, i16), CallError> {
        let max = self.config.max_timeout_ms;
        self.run(id, |r, fresh| {
            machine::init_producer_id(r, id, expected, timeout_ms, max, fresh, now_ms())
        })
        .await
    }

    /// AddPartitionsToTxn (v0-3) and AddOffsetsToTxn.
    pub(crate) async fn add(
        self: &Arc<Self>,
        id: &str,
        p: Producer,
        partitions: &[(String, i32)],
        groups: &[String],
    ) -> Result<(), CallError> {
        self.run(id, |r, _| machine::add(r, p, partitions, groups, now_ms()))
            .await
            .map(|_| ())
    }

    /// The verify-only AddPartitionsToTxn: whether each partition is in the producer's
    /// open transaction.
    pub(crate) async fn verify(
        self: &Arc<Self>,
        id: &str,
        p: Producer,
        partitions: &[(String, i32)],
    ) -> Result<Vec<bool>, CallError> {
        let fence = self.fence(id).await?;
        let entry = self.entry(id);
        let e = entry.lock().await;
        let record = e
            .record
            .as_ref()
            .filter(|_| e.loaded_under == Some(fence.leader_epoch));
        Ok(machine::verify(record, p, partitions)?)
    }

    pub(crate) async fn end(
        self: &Arc<Self>,
        id: &str,
        p: Producer,
        commit: bool,
    ) -> Result<(), CallError> {
        self.run(id, |r, _| machine::end(r, p, commit, now_ms()))
            .await
            .map(|_| ())
    }

    /// The record of an id this broker coordinates (DescribeTransactions).
    pub(crate) async fn describe(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<Option<TxnRecord>, CallError> {
        let fence = self.fence(id).await?;
        let entry = self.entry(id);
        let e = entry.lock().await;
        Ok(e.record
            .clone()
            .filter(|_| e.loaded_under == Some(fence.leader_epoch)))
    }

    /// The records of every id this broker coordinates (ListTransactions, metrics).
    pub(crate) async fn list(self: &Arc<Self>) -> Vec<TxnRecord> {
        let held = self.ownership.held_slots();
        let entries: Vec<(String, Arc<tokio::sync::Mutex<Entry>>)> = self
            .entries
            .lock()
            .expect("txn entries lock poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, entry) in entries {
            let Some(fence) = self.ownership.txn_fence(&id) else {
                continue;
            };
            if !held.contains_key(&fence.key) {
                continue;
            }
            let e = entry.lock().await;
            if let Some(r) = e
                .record
                .clone()
                .filter(|_| e.loaded_under == Some(fence.leader_epoch))
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
        out
    }

    /// One timeout check: aborts every transaction open past its timeout, and forgets
    /// ids idle past `transactional.id.expiration.ms`.
    pub(crate) async fn check_timeouts(self: &Arc<Self>) {
        self.load_held().await;
        let now = now_ms();
        for record in self.list().await {
            let id = record.transactional_id.clone();
            if machine::expire(&record, now).is_some() {
                let result = self
                    .run(&id, |r, _| Step::Decided {
                        record: r.and_then(|r| machine::expire(r, now_ms())),
                        answer: Ok((-1, -1)),
                    })
                    .await;
                match result {
                    Ok(_) => {
                        crate::metrics::metrics()
                            .txn_outcomes
                            .with_label_values(&["timed_out"])
                            .inc();
                        info!(transactional_id = %id, timeout_ms = record.timeout_ms, "transaction timed out; aborted and its producer fenced");
                    }
                    Err(e) => {
                        debug!(transactional_id = %id, error = %e, "timed-out transaction not aborted yet")
                    }
                }
            } else if matches!(
                record.state,
                TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort
            ) && now - record.updated_ms > self.config.id_expiration_ms
            {
                self.expire_id(&id).await;
            }
        }
    }

    /// Forgets an idle transactional id.
    async fn expire_id(self: &Arc<Self>, id: &str) {
        let Ok(fence) = self.fence(id).await else {
            return;
        };
        let entry = self.entry(id);
        let mut e = entry.lock().await;
        let idle = e.record.as_ref().is_some_and(|r| {
            !matches!(
                r.state,
                TxnState::Ongoing | TxnState::PrepareCommit | TxnState::PrepareAbort
            ) && now_ms() - r.updated_ms > self.config.id_expiration_ms
        });
        if !idle {
            return;
        }
        match self.meta.delete_txn(id, fence).await {
            Ok(()) => {
                e.record = None;
                info!(transactional_id = %id, "transactional id expired");
            }
            Err(err) => {
                debug!(transactional_id = %id, error = %err, "transactional id not expired yet")
            }
        }
    }

    /// Forgets the ids of slots this broker no longer holds.
    pub(crate) async fn drop_unheld(&self) {
        let held = self.ownership.held_slots();
        let mut loaded = self.loaded.lock().await;
        loaded.retain(|slot, _| held.keys().any(|k| k.partition == *slot));
        let mut entries = self.entries.lock().expect("txn entries lock poisoned");
        let held_id = |id: &String| {
            self.ownership
                .txn_slot_of(id)
                .is_some_and(|k| held.contains_key(&k))
        };
        entries.retain(|id, _| held_id(id));
        self.open
            .lock()
            .expect("txn open lock poisoned")
            .retain(held_id);
    }

    /// Writes a decision's markers in the background, then stores the completed record.
    fn spawn_completion(self: &Arc<Self>, record: TxnRecord, fence: Fence) {
        let this = self.clone();
        self.tasks
            .spawn(async move { this.complete(record, fence).await });
    }

    /// Writes one marker, retrying until it is written or refused for good; `false`
    /// once this broker no longer holds the id's slot (the next coordinator finishes).
    async fn write_marker(
        &self,
        record: &TxnRecord,
        fence: Fence,
        topic: &str,
        partition: i32,
        marker: Marker,
    ) -> bool {
        let mut wait = MARKER_RETRY;
        loop {
            if self.ownership.txn_fence(&record.transactional_id) != Some(fence) {
                return false;
            }
            match self.markers.write(topic, partition, marker).await {
                MarkerOutcome::Written => return true,
                MarkerOutcome::Skip(why) => {
                    warn!(transactional_id = %record.transactional_id, topic, partition, reason = %why, "marker not written");
                    return true;
                }
                MarkerOutcome::Retry(why) => {
                    debug!(transactional_id = %record.transactional_id, topic, partition, reason = %why, "marker not written yet; retrying");
                    crate::clock::sleep(wait).await;
                    wait = (wait * 2).min(MARKER_RETRY_MAX);
                }
            }
        }
    }

    async fn complete(self: Arc<Self>, record: TxnRecord, fence: Fence) {
        let commit = record.state == TxnState::PrepareCommit;
        let marker = Marker {
            producer_id: record.producer_id,
            producer_epoch: record.producer_epoch,
            commit,
            coordinator_epoch: fence.leader_epoch,
        };
        let m = crate::metrics::metrics();
        // Every partition's marker at once: the owners' flushes carry them together.
        let written =
            futures::future::join_all(record.partitions.iter().map(|(topic, partition)| {
                self.write_marker(&record, fence, topic, *partition, marker)
            }))
            .await;
        if written.contains(&false) {
            debug!(transactional_id = %record.transactional_id, "slot lost; the next coordinator completes the transaction");
            return;
        }
        let entry = self.entry(&record.transactional_id);
        let mut wait = MARKER_RETRY;
        loop {
            let mut e = entry.lock().await;
            if e.record.as_ref() != Some(&record) || e.loaded_under != Some(fence.leader_epoch) {
                return;
            }
            let Some(done) = machine::completed(&record, now_ms()) else {
                return;
            };
            match self.meta.put_txn(&done, fence).await {
                Ok(()) => {
                    self.note(&done);
                    e.record = Some(done);
                    m.txn_outcomes
                        .with_label_values(&[if commit { "committed" } else { "aborted" }])
                        .inc();
                    return;
                }
                Err(err) if err.is_retriable() => {
                    drop(e);
                    debug!(transactional_id = %record.transactional_id, error = %err, "completing the transaction; retrying");
                    crate::clock::sleep(wait).await;
                    wait = (wait * 2).min(MARKER_RETRY_MAX);
                }
                Err(err) => {
                    warn!(transactional_id = %record.transactional_id, error = %err, "transaction not completed; the slot's next coordinator will");
                    return;
                }
            }
        }
    }
}
