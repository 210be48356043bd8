//! Block1 reassembly (RFC 7959 §2.5): request bodies larger than one datagram.
//!
//! A transfer is identified by the client endpoint, the request URI (path and query) and the
//! Request-Tag option if the client sends one (RFC 9175), not by the token, which may change
//! from block to block. Blocks must arrive in order — the client sends the next block only after
//! the 2.31 Continue for the previous one:
//!
//! * block 0 starts (or restarts) a transfer; a Size1 larger than the body limit is refused with
//!   4.13 before anything is stored;
//! * a block whose offset is not where the body ends, or a block for no transfer, is answered
//!   4.08 Request Entity Incomplete and the transfer is forgotten;
//! * a body growing past the limit is answered 4.13 and forgotten;
//! * the last block (M=0) hands the whole body on; it is processed like a single request and
//!   answered only after the outbox commit.
//!
//! Memory is bounded by at most [`MAX_TRANSFERS`] transfers of at most `max_body` bytes each,
//! and a transfer's body holds its bytes of the ingress budget (`gateway.max_ingress_bytes`)
//! until the request is answered: **a block that finds the budget spent is answered 5.03** with
//! Max-Age and not stored, and the transfer stays, so the client's retry of the same block
//! continues it.
//! **When the table is full a new transfer is refused** with 5.03 and Max-Age (existing
//! transfers are not evicted: a flood of new ones must not break uploads in progress). A
//! transfer idle for [`IDLE_TIMEOUT`] is forgotten.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;
use tokio::sync::OwnedSemaphorePermit;

use super::message::Block;
use crate::ingress::budget::IngressBudget;

/// Concurrent Block1 transfers.
pub const MAX_TRANSFERS: usize = 64;
/// A transfer with no block for this long is dropped: RFC 7252's MAX_TRANSMIT_WAIT (93 s), the
/// longest a client keeps retransmitting one block before giving up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(93);

/// Which transfer a block belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransferKey {
    pub peer: SocketAddr,
    /// Path and query as sent.
    pub uri: String,
    /// The Request-Tag option, empty if absent.
    pub tag: Vec<u8>,
}

/// The result of offering one block.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More blocks are expected: answer 2.31 Continue with this Block1 value.
    Continue(Block),
    /// The body is complete. Answer the final response with Block1 `last`; keep `held` until
    /// then.
    Complete {
        body: Vec<u8>,
        last: Block,
        held: Held,
    },
}

/// Bytes of the ingress budget a transfer's body holds (none without a budget).
#[derive(Debug, Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    fn add(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.0 {
            Some(held) => held.merge(permit),
            None => self.0 = Some(permit),
        }
    }

    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

/// Equal when they hold as many bytes.
impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Held {}

/// Why a block was refused; the transfer (if any) is forgotten.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockError {
    /// 4.08: out of order, or no transfer in progress.
    Incomplete(String),
    /// 4.13: the body would exceed the limit.
    TooLarge,
    /// 4.00: a non-final block whose payload is not exactly the block size.
    BadBlock(String),
    /// 5.03: too many transfers in progress.
    Busy,
    /// 5.03: the ingress byte budget is spent. The block was not stored; the transfer stays.
    BudgetSpent,
}

#[derive(Debug)]
struct Transfer {
    body: Vec<u8>,
    last_block: Instant,
    held: Held,
}

/// Transfers in progress, oldest started first.
#[derive(Debug)]
pub struct Transfers {
    map: LinkedHashMap<TransferKey, Transfer>,
    max_transfers: usize,
    max_body: usize,
    budget: Option<IngressBudget>,
}

impl Transfers {
    pub fn new(max_transfers: usize, max_body: usize, budget: Option<IngressBudget>) -> Self {
        Self {
            map: LinkedHashMap::new(),
            max_transfers,
            max_body,
            budget,
        }
    }

    /// The bytes of `payload` from the budget, or `None` when they are not free.
    fn reserve(&self, payload: &[u8]) -> Option<Held> {
        let mut held = Held::default();
        if let Some(budget) = &self.budget {
            held.add(budget.try_take(payload.len())?);
        }
        Some(held)
    }

    /// Takes one block of a request body. `size1` is the client's announced total size, if any.
    pub fn offer(
        &mut self,
        key: TransferKey,
        block: Block,
        payload: &[u8],
        size1: Option<u32>,
        now: Instant,
    ) -> Result<Step, BlockError> {
        if block.more && payload.len() != block.size() {
            self.map.remove(&key);
            return Err(BlockError::BadBlock(format!(
                "block {} has {} bytes, but a block of size {} that is not the last must be full",
                block.num,
                payload.len(),
                block.size()
            )));
        }
        if payload.len() > block.size() {
            self.map.remove(&key);
            return Err(BlockError::BadBlock(format!(
                "block {} has {} bytes, more than its size {}",
                block.num,
                payload.len(),
                block.size()
            )));
        }
        if block.num == 0 {
            self.map.remove(&key);
            if size1.is_some_and(|s| s as usize > self.max_body) || payload.len() > self.max_body {
                return Err(BlockError::TooLarge);
            }
            if !block.more {
                // A single datagram: the server holds its bytes of the budget.
                return Ok(Step::Complete {
                    body: payload.to_vec(),
                    last: block,
                    held: Held::default(),
                });
            }
            self.purge(now);
            if self.map.len() >= self.max_transfers {
                return Err(BlockError::Busy);
            }
            let held = self.reserve(payload).ok_or(BlockError::BudgetSpent)?;
            self.map.insert(
                key,
                Transfer {
                    body: payload.to_vec(),
                    last_block: now,
                    held,
                },
            );
            return Ok(Step::Continue(block));
        }
        let Some(transfer) = self.map.get_mut(&key) else {
            return Err(BlockError::Incomplete(format!(
                "block {} of a transfer that is not in progress: start again with block 0",
                block.num
            )));
        };
        if now.duration_since(transfer.last_block) >= IDLE_TIMEOUT {
            self.map.remove(&key);
            return Err(BlockError::Incomplete(format!(
                "block {} arrived after the transfer timed out: start again with block 0",
                block.num
            )));
        }
        if block.offset() != transfer.body.len() {
            let expected = transfer.body.len();
            self.map.remove(&key);
            return Err(BlockError::Incomplete(format!(
                "block {} starts at byte {}, expected the block starting at byte {expected}",
                block.num,
                block.offset()
            )));
        }
        if transfer.body.len() + payload.len() > self.max_body {
            self.map.remove(&key);
            return Err(BlockError::TooLarge);
        }
        let Some(more) = self.reserve(payload) else {
            return Err(BlockError::BudgetSpent);
        };
        let Some(transfer) = self.map.get_mut(&key) else {
            return Err(BlockError::BudgetSpent);
        };
        if let Some(permit) = more.0 {
            transfer.held.add(permit);
        }
        transfer.body.extend_from_slice(payload);
        transfer.last_block = now;
        if block.more {
            return Ok(Step::Continue(block));
        }
        let (body, held) = self
            .map
            .remove(&key)
            .map(|t| (t.body, t.held))
            .unwrap_or_default();
        Ok(Step::Complete {
            body,
            last: block,
            held,
        })
    }

    /// Forgets transfers idle for [`IDLE_TIMEOUT`]; returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        self.map
            .retain(|_, t| now.duration_since(t.last_block) < IDLE_TIMEOUT);
        before - self.map.len()
    }

    /// Transfers in progress.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes held by transfers in progress.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.map.values().map(|t| t.body.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str) -> TransferKey {
        TransferKey {
            peer: SocketAddr::from(([127, 0, 0, 1], 5000)),
            uri: uri.to_owned(),
            tag: Vec::new(),
        }
    }

    fn b(num: u32, more: bool) -> Block {
        Block { num, more, szx: 0 } // 16-byte blocks
    }

    #[test]
    fn reassembles_in_order() {
        let t = Instant::now();
        let mut x = Transfers::new(4, 1024, None);
        assert_eq!(
            x.offer(key("/t/a"), b(0, true), &[1; 16], Some(40), t),
            Ok(Step::Continue(b(0, true)))
        );
        assert_eq!(
            x.offer(key("/t/a"), b(1, true), &[2; 16], None, t),
            Ok(Step::Continue(b(1, true)))
        );
        let done = x.offer(key("/t/a"), b(2, false), &[3; 8], None, t).unwrap();
        let Step::Complete { body, last, .. } = done else {
            panic!("{done:?}")
        };
        assert_eq!(body.len(), 40);
        assert_eq!(&body[..16], &[1; 16]);
        assert_eq!(&body[32..], &[3; 8]);
        assert_eq!(last, b(2, false));
        assert_eq!(x.len(), 0);
    }

    #[test]
    fn a_single_final_block_needs_no_state() {
        let mut x = Transfers::new(0, 1024, None);
        let step = x
            .offer(key("/t/a"), b(0, false), b"hi", None, Instant::now())
            .unwrap();
        assert_eq!(
            step,
            Step::Complete {
                body: b"hi".to_vec(),
                last: b(0, false),
                held: Held::default(),
            }
        );
    }

    /// A transfer's body holds its bytes of the ingress budget until the request is answered;
    /// a block that finds the budget spent is refused without losing the transfer, and the
    /// client's retry of that block continues it.
    #[tokio::test]
    async fn a_transfer_holds_its_bytes_of_the_ingress_budget() {
        let t = Instant::now();
        let budget = IngressBudget::new(40);
        let mut x = Transfers::new(4, 1024, Some(budget.clone()));
        x.offer(key("/t/a"), b(0, true), &[1; 16], None, t).unwrap();
        x.offer(key("/t/a"), b(1, true), &[2; 16], None, t).unwrap();
        assert_eq!(budget.used(), 32);
        let other = budget.try_take(8).expect("8 bytes left");
        assert_eq!(
            x.offer(key("/t/a"), b(2, false), &[3; 8], None, t),
            Err(BlockError::BudgetSpent)
        );
        assert_eq!(x.len(), 1, "the transfer stays");
        assert_eq!(x.bytes(), 32, "the refused block was not stored");
        drop(other);
        let done = x.offer(key("/t/a"), b(2, false), &[3; 8], None, t).unwrap();
        let Step::Complete { body, held, .. } = done else {
            panic!("{done:?}")
        };
        assert_eq!((body.len(), held.bytes(), budget.used()), (40, 40, 40));
        drop(held);
        assert_eq!(budget.used(), 0, "released once the request is answered");
    }

    #[test]
    fn out_of_order_and_unknown_transfers_are_incomplete() {
        let t = Instant::now();
        let mut x = Transfers::new(4, 1024, None);
        assert!(matches!(
            x.offer(key("/t/a"), b(1, true), &[0; 16], None, t),
            Err(BlockError::Incomplete(_))
        ));
        x.offer(key("/t/a"), b(0, true), &[0; 16], None, t).unwrap();
        assert!(matches!(
            x.offer(key("/t/a"), b(2, true), &[0; 16], None, t),
            Err(BlockError::Incomplete(_))
        ));
        assert_eq!(x.len(), 0, "the broken transfer is forgotten");
        // A larger block size in the middle that does not land on the end is out of order too.
        x.offer(key("/t/a"), b(0, true), &[0; 16], None, t).unwrap();
        let big = Block {
            num: 1,
            more: true,
            szx: 1,
        }; // 32-byte blocks: offset 32
        assert!(matches!(
            x.offer(key("/t/a"), big, &[0; 32], None, t),
            Err(BlockError::Incomplete(_))
        ));
    }

    #[test]
    fn transfers_are_separate_per_uri_and_tag() {
        let t = Instant::now();
        let mut x = Transfers::new(4, 1024, None);
        x.offer(key("/t/a"), b(0, true), &[0; 16], None, t).unwrap();
        x.offer(key("/t/b"), b(0, true), &[0; 16], None, t).unwrap();
        let mut tagged = key("/t/a");
        tagged.tag = vec![7];
        x.offer(tagged.clone(), b(0, true), &[0; 16], None, t)
            .unwrap();
        assert_eq!(x.len(), 3);
        assert!(x.offer(key("/t/a"), b(1, false), &[0; 4], None, t).is_ok());
        assert!(x.offer(tagged, b(1, false), &[0; 4], None, t).is_ok());
        assert_eq!(x.len(), 1);
    }

    #[test]
    fn too_large_by_size1_or_by_growth() {
        let t = Instant::now();
        let mut x = Transfers::new(4, 40, None);
        assert_eq!(
            x.offer(key("/t/a"), b(0, true), &[0; 16], Some(41), t),
            Err(BlockError::TooLarge)
        );
        x.offer(key("/t/a"), b(0, true), &[0; 16], None, t).unwrap();
        x.offer(key("/t/a"), b(1, true), &[0; 16], None, t).unwrap();
        assert_eq!(
            x.offer(key("/t/a"), b(2, true), &[0; 16], None, t),
            Err(BlockError::TooLarge)
        );
        assert_eq!(x.len(), 0);
    }

    #[test]
    fn partial_non_final_block_is_bad() {
        let mut x = Transfers::new(4, 1024, None);
        assert!(matches!(
            x.offer(key("/t/a"), b(0, true), &[0; 15], None, Instant::now()),
            Err(BlockError::BadBlock(_))
        ));
        assert!(matches!(
            x.offer(key("/t/a"), b(0, false), &[0; 17], None, Instant::now()),
            Err(BlockError::BadBlock(_))
        ));
    }

    #[test]
    fn full_table_refuses_new_transfers_until_idle_ones_expire() {
        let t = Instant::now();
        let mut x = Transfers::new(2, 1024, None);
        x.offer(key("/t/a"), b(0, true), &[0; 16], None, t).unwrap();
        x.offer(key("/t/b"), b(0, true), &[0; 16], None, t).unwrap();
        assert_eq!(
            x.offer(key("/t/c"), b(0, true), &[0; 16], None, t),
            Err(BlockError::Busy)
        );
        // Restarting an existing transfer is always possible.
        assert!(x.offer(key("/t/a"), b(0, true), &[0; 16], None, t).is_ok());
        assert_eq!(x.bytes(), 32);
        let later = t + IDLE_TIMEOUT;
        assert!(
            x.offer(key("/t/c"), b(0, true), &[0; 16], None, later)
                .is_ok()
        );
        assert_eq!(x.len(), 1);
        assert!(matches!(
            x.offer(key("/t/a"), b(1, true), &[0; 16], None, later),
            Err(BlockError::Incomplete(_))
        ));
    }
}
