//! Model-based property test of the outbox: random sequences of append / read / ack / evict /
//! reopen against a plain in-memory model.
//!
//! Invariants checked after every step:
//! * every record whose append completed is present, unless it was acked or evicted;
//! * nothing acked is ever returned again; nothing is returned that was never appended;
//! * only `drop_oldest` routes lose records, always their oldest ones, and the drop counter
//!   equals the number lost;
//! * a refused append (`reject`) stores nothing and touches nothing already stored;
//! * reads come highest priority first, oldest first within a priority, and paging with
//!   [`ReadPosition`] visits every record exactly once;
//! * sequence numbers strictly increase, across reopen too;
//! * the byte total reported equals the sum of the stored records' sizes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use outpost_config::{Route, WhenFull};
use outpost_outbox::outbox::{self, RouteReason};
use outpost_outbox::{AppendError, Envelope, Outbox, OutboxOptions, ReadPosition, Source};
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

const ROUTES: [(&str, u8, WhenFull); 3] = [
    ("keep", 5, WhenFull::Reject),
    ("lossy", 0, WhenFull::DropOldest),
    ("lossy-hi", 9, WhenFull::DropOldest),
];

#[derive(Debug, Clone)]
enum Op {
    Append {
        route: usize,
        count: usize,
        payload: usize,
    },
    Ack {
        picks: Vec<prop::sample::Index>,
        stale: bool,
    },
    Page {
        size: usize,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 1..12usize, 0..400usize)
            .prop_map(|(route, count, payload)| Op::Append { route, count, payload }),
        2 => (prop::collection::vec(any::<prop::sample::Index>(), 0..8), any::<bool>())
            .prop_map(|(picks, stale)| Op::Ack { picks, stale }),
        1 => (1..20usize).prop_map(|size| Op::Page { size }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct ModelRecord {
    route: usize,
    payload: Vec<u8>,
}

struct Harness {
    options: OutboxOptions,
    outbox: Outbox,
    stop: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn open(options: OutboxOptions) -> Self {
        let (outbox, writer) = outbox::open(options.clone()).expect("open outbox");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let writer = tokio::spawn(async move { writer.run(token).await.expect("writer") });
        Self {
            options,
            outbox,
            stop,
            writer,
        }
    }

    async fn reopen(self) -> Self {
        let options = self.options.clone();
        self.stop.cancel();
        self.writer.await.expect("writer task");
        drop(self.outbox);
        Self::open(options)
    }
}

fn dropped(outbox: &Outbox, route: &str) -> u64 {
    ["byte_cap", "disk_floor"]
        .iter()
        .map(|reason| {
            outbox
                .metrics()
                .dropped_records
                .get_or_create(&RouteReason {
                    route: route.to_owned(),
                    reason,
                })
                .get()
        })
        .sum()
}

fn envelope(route: usize, payload: Vec<u8>) -> Envelope {
    Envelope {
        route: Arc::from(ROUTES[route].0),
        device_id: format!("dev-{route}"),
        source: Source::Http,
        topic: "t".into(),
        received_at_ms: 1,
        content_type: None,
        headers: vec![],
        payload: payload.into(),
        priority: None,
    }
}

async fn run_ops(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = OutboxOptions::with_path(dir.path().join("outbox.db"));
    options.max_bytes = 6 * 1024;
    options.min_free_disk = 0;
    options.routes = ROUTES
        .iter()
        .map(|&(name, priority, when_full)| Route {
            name: name.into(),
            priority,
            when_full,
        })
        .collect();
    let mut h = Harness::open(options);
    let mut model: BTreeMap<u64, ModelRecord> = BTreeMap::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut max_seq = 0u64;
    let mut unique = 0u64;

    for op in ops {
        let mut dropped_before: Vec<u64> = ROUTES.iter().map(|r| dropped(&h.outbox, r.0)).collect();
        match op {
            Op::Append {
                route,
                count,
                payload,
            } => {
                let batch: Vec<Envelope> = (0..count)
                    .map(|_| {
                        unique += 1;
                        let mut p = unique.to_be_bytes().to_vec();
                        p.resize(8 + payload, b'x');
                        envelope(route, p)
                    })
                    .collect();
                let need: u64 = batch.iter().map(Envelope::accounted_size).sum();
                let held = h.outbox.figures().1;
                match h.outbox.append_all(batch.clone()).await {
                    Ok(seqs) => {
                        assert_eq!(seqs.len(), count);
                        for (seq, e) in seqs.iter().zip(batch) {
                            assert!(*seq > max_seq, "sequence {seq} not above {max_seq}");
                            max_seq = *seq;
                            model.insert(
                                *seq,
                                ModelRecord {
                                    route,
                                    payload: e.payload.to_vec(),
                                },
                            );
                        }
                    }
                    Err(AppendError::Full { .. }) => {
                        // Refused only when it really did not fit.
                        if ROUTES[route].2 == WhenFull::Reject {
                            assert!(held + need > h.options.max_bytes, "refused though it fit");
                        }
                    }
                    Err(e) => panic!("unexpected append error {e}"),
                }
            }
            Op::Ack { picks, stale } => {
                let live: Vec<u64> = model.keys().copied().collect();
                let mut seqs: Vec<u64> = if live.is_empty() {
                    vec![]
                } else {
                    picks.iter().map(|i| live[i.index(live.len())]).collect()
                };
                seqs.sort_unstable();
                seqs.dedup();
                let expected = seqs.len() as u64;
                if stale {
                    // Acking what is already gone must be harmless.
                    seqs.extend(acked.iter().take(3).copied());
                    seqs.push(max_seq + 1000);
                }
                let deleted = h.outbox.ack(seqs.clone()).await.expect("ack");
                assert_eq!(deleted, expected);
                for seq in seqs {
                    if model.remove(&seq).is_some() {
                        acked.insert(seq);
                    }
                }
            }
            Op::Page { size } => {
                let mut reader = h.outbox.reader().unwrap();
                let all = reader.read_all().unwrap();
                let mut paged = Vec::new();
                let mut at = ReadPosition::START;
                loop {
                    let (page, next) = reader.read_page(at, size, u64::MAX).unwrap();
                    if page.is_empty() {
                        break;
                    }
                    assert!(page.len() <= size);
                    paged.extend(page);
                    at = next;
                }
                assert_eq!(paged, all, "paging must visit every record once, in order");
            }
            Op::Reopen => {
                h = h.reopen().await;
                // A reopened outbox has fresh counters; reopening itself evicts nothing.
                dropped_before = vec![0; ROUTES.len()];
            }
        }

        // Reconcile the model with what is stored.
        let stored = h.outbox.reader().unwrap().read_all().unwrap();
        let order: Vec<(std::cmp::Reverse<u8>, u64)> = stored
            .iter()
            .map(|r| (std::cmp::Reverse(r.priority), r.seq))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "read order: priority desc, seq asc");
        let stored_seqs: BTreeSet<u64> = stored.iter().map(|r| r.seq).collect();
        for r in &stored {
            assert!(!acked.contains(&r.seq), "acked record {} returned", r.seq);
            let m = model
                .get(&r.seq)
                .unwrap_or_else(|| panic!("unknown record {}", r.seq));
            assert_eq!(r.payload, m.payload);
            assert_eq!(r.route, ROUTES[m.route].0);
        }
        let evicted: Vec<(u64, usize)> = model
            .iter()
            .filter(|(seq, _)| !stored_seqs.contains(seq))
            .map(|(seq, m)| (*seq, m.route))
            .collect();
        for (i, route) in ROUTES.iter().enumerate() {
            let lost: Vec<u64> = evicted.iter().filter(|e| e.1 == i).map(|e| e.0).collect();
            let counted = dropped(&h.outbox, route.0) - dropped_before[i];
            assert_eq!(
                lost.len() as u64,
                counted,
                "drop counter of route {}",
                route.0
            );
            if route.2 == WhenFull::Reject {
                assert!(lost.is_empty(), "reject route lost {lost:?}");
            }
            if let Some(newest_lost) = lost.last() {
                let oldest_kept = stored
                    .iter()
                    .filter(|r| r.route == route.0)
                    .map(|r| r.seq)
                    .min();
                assert!(
                    oldest_kept.is_none_or(|k| k > *newest_lost),
                    "route {} evicted {newest_lost} but kept older {oldest_kept:?}",
                    route.0
                );
            }
        }
        for (seq, _) in evicted {
            model.remove(&seq);
        }
        let bytes: u64 = stored.iter().map(|r| r.size).sum();
        assert_eq!(h.outbox.figures().0, stored.len() as u64);
        assert_eq!(h.outbox.figures().1, bytes);
        assert!(bytes <= h.options.max_bytes);
    }
    h.stop.cancel();
    h.writer.await.unwrap();
    let report = outbox::inspect::verify(&dir.path().join("outbox.db")).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn outbox_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops));
    }
}
