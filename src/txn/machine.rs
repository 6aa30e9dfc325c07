//! The transaction coordinator's decisions for one transactional id, as plain
//! functions of its stored record: Kafka's `TransactionCoordinator` state machine
//! (transaction version 1: the producer names every partition it writes).
//!
//! A decision is a [`Step`]: the record to store (if anything changes) and the answer
//! the client gets once it is stored. The coordinator task stores the record (fenced by
//! its lease on the id's slot), answers, and for a `PrepareCommit` or `PrepareAbort`
//! record writes the markers and then stores [`completed`]. Nothing here does I/O or
//! reads a clock.
//!
//! States: `Empty` (no transaction), `Ongoing` (partitions or groups added),
//! `PrepareCommit`/`PrepareAbort` (decided; markers being written), and
//! `CompleteCommit`/`CompleteAbort` (markers written). While a decision's markers are
//! being written every request but a retry of the same end gets
//! CONCURRENT_TRANSACTIONS, and the client retries.

use crate::metadata::{TxnRecord, TxnState};

/// The highest epoch a producer id may reach; one more and it gets a new id.
pub(crate) const MAX_EPOCH: i16 = i16::MAX - 1;

/// Why a request was refused; each is one Kafka error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TxnError {
    #[error("the transaction is changing state; retry")]
    ConcurrentTransactions,
    #[error("a newer producer with the same transactional id fenced this one")]
    ProducerFenced,
    #[error("the producer id does not belong to the transactional id")]
    InvalidProducerIdMapping,
    #[error("the request does not fit the transaction's state")]
    InvalidTxnState,
    #[error("the transaction timeout is not within 1 ms and transaction.max.timeout.ms")]
    InvalidTransactionTimeout,
}

/// What the client gets: the producer id and epoch (InitProducerId; the others ignore
/// them), or why not.
pub(crate) type Answer = Result<(i64, i16), TxnError>;

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Store `record` (when given), then answer.
    Decided {
        record: Option<TxnRecord>,
        answer: Answer,
    },
    /// A new producer id is needed first: decide again with it.
    NeedProducerId,
}

fn answer(answer: Answer) -> Step {
    Step::Decided {
        record: None,
        answer,
    }
}

fn store(record: TxnRecord, answer: Answer) -> Step {
    Step::Decided {
        record: Some(record),
        answer,
    }
}

/// The producer's identity as a request states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Producer {
    pub producer_id: i64,
    pub epoch: i16,
}

/// InitProducerId with a transactional id. `expected` is the producer the client had
/// (KIP-360, InitProducerId v3+), if it names one; `fresh_id` a new producer id when a
/// previous decision asked for one.
pub(crate) fn init_producer_id(
    current: Option<&TxnRecord>,
    transactional_id: &str,
    expected: Option<Producer>,
    timeout_ms: i32,
    max_timeout_ms: i32,
    fresh_id: Option<i64>,
    now_ms: i64,
) -> Step {
    if timeout_ms <= 0 || timeout_ms > max_timeout_ms {
        return answer(Err(TxnError::InvalidTransactionTimeout));
    }
    let Some(current) = current else {
        let Some(producer_id) = fresh_id else {
            return Step::NeedProducerId;
        };
        let record = ready(transactional_id, (producer_id, 0, -1), timeout_ms, now_ms);
        return store(record, Ok((producer_id, 0)));
    };
    match current.state {
        TxnState::PrepareCommit | TxnState::PrepareAbort => {
            answer(Err(TxnError::ConcurrentTransactions))
        }
        // A new instance of the producer while the old one's transaction is open: the
        // old one is fenced (a higher epoch) and its transaction aborted; the new one
        // retries once the abort is complete.
        TxnState::Ongoing => store(
            fence_and_abort(current, now_ms),
            Err(TxnError::ConcurrentTransactions),
        ),
        TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
            if let Some(e) = expected {
                if e.producer_id != current.producer_id {
                    return answer(Err(TxnError::ProducerFenced));
                }
            }
            let (producer_id, epoch, last) = match expected.map(|e| e.epoch) {
                // A retry of a bump whose answer was lost: the same answer again.
                Some(e) if e == current.last_producer_epoch && e >= 0 => {
                    return answer(Ok((current.producer_id, current.producer_epoch)));
                }
                Some(e) if e != current.producer_epoch => {
                    return answer(Err(TxnError::ProducerFenced));
                }
                _ if current.producer_epoch >= MAX_EPOCH => match fresh_id {
                    Some(id) => (id, 0, -1),
                    None => return Step::NeedProducerId,
                },
                Some(e) => (current.producer_id, e + 1, e),
                None => (current.producer_id, current.producer_epoch + 1, -1),
            };
            let record = ready(
                &current.transactional_id,
                (producer_id, epoch, last),
                timeout_ms,
                now_ms,
            );
            store(record, Ok((producer_id, epoch)))
        }
    }
}

/// A producer's record after InitProducerId: (producer id, epoch, previous epoch), no
/// transaction.
fn ready(
    transactional_id: &str,
    (producer_id, epoch, last): (i64, i16, i16),
    timeout_ms: i32,
    now_ms: i64,
) -> TxnRecord {
    TxnRecord {
        transactional_id: transactional_id.to_owned(),
        producer_id,
        producer_epoch: epoch,
        last_producer_epoch: last,
        timeout_ms,
        state: TxnState::Empty,
        partitions: Vec::new(),
        groups: Vec::new(),
        start_ms: -1,
        updated_ms: now_ms,
    }
}

/// The producer's record, checked against the request's producer: INVALID_PRODUCER_ID_
/// MAPPING for an unknown id or another producer, PRODUCER_FENCED for another epoch.
fn owned(current: Option<&TxnRecord>, p: Producer) -> Result<&TxnRecord, TxnError> {
    let current = current.ok_or(TxnError::InvalidProducerIdMapping)?;
    if current.producer_id != p.producer_id {
        return Err(TxnError::InvalidProducerIdMapping);
    }
    if current.producer_epoch != p.epoch {
        return Err(TxnError::ProducerFenced);
    }
    Ok(current)
}

/// AddPartitionsToTxn and AddOffsetsToTxn: the partitions and groups join the
/// transaction (starting it if none is open).
pub(crate) fn add(
    current: Option<&TxnRecord>,
    p: Producer,
    partitions: &[(String, i32)],
    groups: &[String],
    now_ms: i64,
) -> Step {
    let current = match owned(current, p) {
        Ok(c) => c,
        Err(e) => return answer(Err(e)),
    };
    let mut record = match current.state {
        TxnState::PrepareCommit | TxnState::PrepareAbort => {
            return answer(Err(TxnError::ConcurrentTransactions))
        }
        TxnState::Ongoing => {
            let has_all = partitions.iter().all(|x| current.partitions.contains(x))
                && groups.iter().all(|g| current.groups.contains(g));
            if has_all {
                return answer(Ok((current.producer_id, current.producer_epoch)));
            }
            current.clone()
        }
        TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => TxnRecord {
            state: TxnState::Ongoing,
            partitions: Vec::new(),
            groups: Vec::new(),
            start_ms: now_ms,
            ..current.clone()
        },
    };
    record.partitions.extend(partitions.iter().cloned());
    record.partitions.sort();
    record.partitions.dedup();
    record.groups.extend(groups.iter().cloned());
    record.groups.sort();
    record.groups.dedup();
    record.updated_ms = now_ms;
    let ok = Ok((record.producer_id, record.producer_epoch));
    store(record, ok)
}

/// The verify-only form of AddPartitionsToTxn (KIP-890 part 1), asked by a partition's
/// owner before it takes a producer's first transactional batch: for each partition,
/// whether the producer's open transaction includes it.
pub(crate) fn verify(
    current: Option<&TxnRecord>,
    p: Producer,
    partitions: &[(String, i32)],
) -> Result<Vec<bool>, TxnError> {
    let current = owned(current, p)?;
    match current.state {
        TxnState::PrepareCommit | TxnState::PrepareAbort => Err(TxnError::ConcurrentTransactions),
        TxnState::Ongoing => Ok(partitions
            .iter()
            .map(|x| current.partitions.contains(x))
            .collect()),
        _ => Ok(vec![false; partitions.len()]),
    }
}

/// EndTxn: commit or abort the open transaction (transaction version 1: the epoch
/// stays). A retry of an end already made answers as the first did.
pub(crate) fn end(current: Option<&TxnRecord>, p: Producer, commit: bool, now_ms: i64) -> Step {
    let current = match owned(current, p) {
        Ok(c) => c,
        Err(e) => return answer(Err(e)),
    };
    let ok = Ok((current.producer_id, current.producer_epoch));
    match (current.state, commit) {
        (TxnState::Ongoing, _) => store(
            TxnRecord {
                state: if commit {
                    TxnState::PrepareCommit
                } else {
                    TxnState::PrepareAbort
                },
                updated_ms: now_ms,
                ..current.clone()
            },
            ok,
        ),
        (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => answer(ok),
        (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
            answer(Err(TxnError::ConcurrentTransactions))
        }
        _ => answer(Err(TxnError::InvalidTxnState)),
    }
}

/// The coordinator's own abort of a transaction open past its timeout: the producer is
/// fenced (a higher epoch, which the markers carry) so it cannot go on writing into an
/// aborted transaction. `None` when the transaction has not timed out.
pub(crate) fn expire(current: &TxnRecord, now_ms: i64) -> Option<TxnRecord> {
    let due = current.state == TxnState::Ongoing
        && current.start_ms >= 0
        && now_ms > current.start_ms + i64::from(current.timeout_ms);
    due.then(|| fence_and_abort(current, now_ms))
}

/// An abort under a bumped epoch (as far as it goes): `PrepareAbort`, the former
/// producer fenced.
fn fence_and_abort(current: &TxnRecord, now_ms: i64) -> TxnRecord {
    TxnRecord {
        producer_epoch: (current.producer_epoch + 1).min(MAX_EPOCH),
        last_producer_epoch: -1,
        state: TxnState::PrepareAbort,
        updated_ms: now_ms,
        ..current.clone()
    }
}

/// The record once a decision's markers are all written: `CompleteCommit` or
/// `CompleteAbort`, the partitions cleared (the groups stay, so storing it settles
/// their offsets). `None` unless the record is a decision.
pub(crate) fn completed(current: &TxnRecord, now_ms: i64) -> Option<TxnRecord> {
    let state = match current.state {
        TxnState::PrepareCommit => TxnState::CompleteCommit,
        TxnState::PrepareAbort => TxnState::CompleteAbort,
        _ => return None,
    };
    Some(TxnRecord {
        state,
        partitions: Vec::new(),
        start_ms: -1,
        updated_ms: now_ms,
        ..current.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: i32 = 900_000;

    fn stored(step: Step) -> (TxnRecord, Answer) {
        match step {
            Step::Decided {
                record: Some(r),
                answer,
            } => (r, answer),
            other => panic!("expected a record to store, got {other:?}"),
        }
    }

    fn answered(step: Step) -> Answer {
        match step {
            Step::Decided {
                record: None,
                answer,
            } => answer,
            other => panic!("expected an answer only, got {other:?}"),
        }
    }

    fn parts(list: &[i32]) -> Vec<(String, i32)> {
        list.iter().map(|p| ("t".to_owned(), *p)).collect()
    }

    /// A commit from the first InitProducerId to CompleteCommit, and the retries and
    /// fencings around it.
    #[test]
    fn a_transaction_commits_and_a_zombie_is_fenced() {
        assert_eq!(
            init_producer_id(None, "tx", None, 60_000, MAX, None, 0),
            Step::NeedProducerId
        );
        let (r, a) = stored(init_producer_id(None, "tx", None, 60_000, MAX, Some(7), 0));
        assert_eq!(a, Ok((7, 0)));
        let zombie = Producer {
            producer_id: 7,
            epoch: 0,
        };
        // A second instance bumps the epoch: the first is fenced.
        let (r, a) = stored(init_producer_id(Some(&r), "tx", None, 60_000, MAX, None, 1));
        assert_eq!(a, Ok((7, 1)));
        let p = Producer {
            producer_id: 7,
            epoch: 1,
        };
        assert_eq!(
            answered(add(Some(&r), zombie, &parts(&[0]), &[], 2)),
            Err(TxnError::ProducerFenced)
        );
        let (r, _) = stored(add(Some(&r), p, &parts(&[1, 0]), &[], 2));
        assert_eq!((r.state, r.start_ms), (TxnState::Ongoing, 2));
        assert_eq!(answered(add(Some(&r), p, &parts(&[0]), &[], 3)), Ok((7, 1)));
        let (r, _) = stored(add(Some(&r), p, &[], &["g".to_owned()], 3));
        assert_eq!(r.partitions, parts(&[0, 1]));
        assert_eq!(verify(Some(&r), p, &parts(&[1, 2])), Ok(vec![true, false]));
        assert_eq!(
            answered(end(Some(&r), zombie, true, 4)),
            Err(TxnError::ProducerFenced)
        );
        let (r, _) = stored(end(Some(&r), p, true, 4));
        assert_eq!(r.state, TxnState::PrepareCommit);
        assert_eq!(
            answered(end(Some(&r), p, true, 5)),
            Err(TxnError::ConcurrentTransactions)
        );
        assert_eq!(
            answered(add(Some(&r), p, &parts(&[3]), &[], 5)),
            Err(TxnError::ConcurrentTransactions)
        );
        let r = completed(&r, 6).expect("a decision completes");
        assert_eq!(r.state, TxnState::CompleteCommit);
        assert!(r.partitions.is_empty() && r.groups == ["g"]);
        assert_eq!(answered(end(Some(&r), p, true, 7)), Ok((7, 1)), "a retry");
        assert_eq!(
            answered(end(Some(&r), p, false, 7)),
            Err(TxnError::InvalidTxnState)
        );
        // The next transaction starts afresh.
        let (r, _) = stored(add(Some(&r), p, &parts(&[5]), &[], 8));
        assert_eq!((r.partitions.clone(), r.groups.len()), (parts(&[5]), 0));
    }

    /// KIP-360: a producer re-initialising with its own id and epoch gets the next
    /// epoch, a retry of that gets the same answer, and an older epoch is fenced; an
    /// exhausted epoch takes a new producer id.
    #[test]
    fn init_with_a_known_producer_bumps_once() {
        let (r, _) = stored(init_producer_id(None, "tx", None, 1000, MAX, Some(7), 0));
        let me = Some(Producer {
            producer_id: 7,
            epoch: 0,
        });
        let (r, a) = stored(init_producer_id(Some(&r), "tx", me, 1000, MAX, None, 1));
        assert_eq!((a, r.last_producer_epoch), (Ok((7, 1)), 0));
        assert_eq!(
            answered(init_producer_id(Some(&r), "tx", me, 1000, MAX, None, 2)),
            Ok((7, 1)),
            "a retry whose answer was lost"
        );
        let other = Some(Producer {
            producer_id: 8,
            epoch: 1,
        });
        assert_eq!(
            answered(init_producer_id(Some(&r), "tx", other, 1000, MAX, None, 2)),
            Err(TxnError::ProducerFenced)
        );
        let worn = TxnRecord {
            producer_epoch: MAX_EPOCH,
            ..r
        };
        assert_eq!(
            init_producer_id(Some(&worn), "tx", None, 1000, MAX, None, 3),
            Step::NeedProducerId
        );
        let (_, a) = stored(init_producer_id(
            Some(&worn),
            "tx",
            None,
            1000,
            MAX,
            Some(9),
            3,
        ));
        assert_eq!(a, Ok((9, 0)));
        assert_eq!(
            answered(init_producer_id(None, "tx", None, MAX + 1, MAX, Some(1), 0)),
            Err(TxnError::InvalidTransactionTimeout)
        );
    }

    /// An open transaction past its timeout, or met by a new instance, is aborted under
    /// a bumped epoch.
    #[test]
    fn timeouts_and_new_instances_fence_and_abort() {
        let (r, _) = stored(init_producer_id(None, "tx", None, 1000, MAX, Some(7), 0));
        let p = Producer {
            producer_id: 7,
            epoch: 0,
        };
        let (r, _) = stored(add(Some(&r), p, &parts(&[0]), &[], 10));
        assert_eq!(expire(&r, 1010), None);
        let aborted = expire(&r, 1011).expect("timed out");
        assert_eq!(
            (aborted.state, aborted.producer_epoch),
            (TxnState::PrepareAbort, 1)
        );
        assert_eq!(
            answered(end(Some(&aborted), p, true, 1012)),
            Err(TxnError::ProducerFenced)
        );
        let (fenced, a) = stored(init_producer_id(Some(&r), "tx", None, 1000, MAX, None, 20));
        assert_eq!(a, Err(TxnError::ConcurrentTransactions));
        assert_eq!(
            (fenced.state, fenced.producer_epoch),
            (TxnState::PrepareAbort, 1)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// InitProducerId by producer instance n (each instance remembers its answer).
        Init(usize),
        Add(usize, Vec<i32>),
        End(usize, bool),
        /// The markers of a decision are all written.
        MarkersDone,
        Tick(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..3usize).prop_map(Op::Init),
            3 => ((0..3usize), proptest::collection::vec(0..4i32, 1..3)).prop_map(|(i, p)| Op::Add(i, p)),
            2 => ((0..3usize), any::<bool>()).prop_map(|(i, c)| Op::End(i, c)),
            2 => Just(Op::MarkersDone),
            1 => (0..3000i64).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever instances of a producer do: the epoch never goes down; only the
        /// newest instance's requests succeed; a transaction is decided only from
        /// Ongoing, completed only from its decision; a commit is never decided for a
        /// transaction the coordinator aborted; records outside a transaction hold no
        /// partitions.
        #[test]
        fn the_state_machine_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..80)) {
            let mut record: Option<TxnRecord> = None;
            let mut instances: Vec<Option<Producer>> = vec![None; 3];
            let mut next_id = 100;
            let mut now = 0i64;
            for op in ops {
                now += 1;
                let before = record.clone();
                let step = match &op {
                    Op::Init(i) => {
                        let mut s = init_producer_id(record.as_ref(), "tx", instances[*i], 1000, MAX, None, now);
                        if s == Step::NeedProducerId {
                            next_id += 1;
                            s = init_producer_id(record.as_ref(), "tx", instances[*i], 1000, MAX, Some(next_id), now);
                        }
                        Some(s)
                    }
                    Op::Add(i, ps) => instances[*i].map(|p| add(record.as_ref(), p, &parts(ps), &[], now)),
                    Op::End(i, c) => instances[*i].map(|p| end(record.as_ref(), p, *c, now)),
                    Op::MarkersDone => record.as_ref().and_then(|r| completed(r, now)).map(|r| Step::Decided { record: Some(r), answer: Ok((0, 0)) }),
                    Op::Tick(t) => {
                        now += t;
                        record.as_ref().and_then(|r| expire(r, now)).map(|r| Step::Decided { record: Some(r), answer: Ok((0, 0)) })
                    }
                };
                let Some(Step::Decided { record: new, answer }) = step else { continue };
                if let (Op::Init(i), Ok((id, epoch))) = (&op, answer) {
                    instances[*i] = Some(Producer { producer_id: id, epoch });
                }
                // Only the newest instance gets anything done.
                if let (Op::Add(i, _) | Op::End(i, _), Ok(_)) = (&op, answer) {
                    let r = before.as_ref().expect("a record");
                    prop_assert_eq!(instances[*i], Some(Producer { producer_id: r.producer_id, epoch: r.producer_epoch }));
                }
                if let Some(new) = new {
                    if let Some(old) = &before {
                        if old.producer_id == new.producer_id {
                            prop_assert!(new.producer_epoch >= old.producer_epoch, "epoch went down");
                        }
                        match new.state {
                            TxnState::PrepareCommit => prop_assert_eq!(old.state, TxnState::Ongoing),
                            TxnState::PrepareAbort => prop_assert_eq!(old.state, TxnState::Ongoing),
                            TxnState::CompleteCommit => prop_assert_eq!(old.state, TxnState::PrepareCommit),
                            TxnState::CompleteAbort => prop_assert_eq!(old.state, TxnState::PrepareAbort),
                            TxnState::Ongoing => prop_assert!(old.state != TxnState::PrepareCommit && old.state != TxnState::PrepareAbort),
                            TxnState::Empty => prop_assert!(old.state != TxnState::Ongoing && old.state != TxnState::PrepareCommit && old.state != TxnState::PrepareAbort),
                        }
                    }
                    if matches!(new.state, TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort) {
                        prop_assert!(new.partitions.is_empty());
                    }
                    record = Some(new);
                }
            }
        }
    }
}
