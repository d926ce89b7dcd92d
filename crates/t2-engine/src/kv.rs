//! The one owner of KV blocks: allocation, reference counts, and the budget.
//!
//! Storage lives with the model runner ([`t2_model::KvPool`]); this manager only decides which block ids a
//! sequence may use. A [`KvLease`] holds one reference on each of its blocks and gives them back when
//! dropped, so a cancelled, failed or finished sequence can never leak KV. Sequences that start with the
//! same tokens under the same weights (a scoring fork and its parent, pass-1 prompts after their shared
//! instructions) share the full blocks of that prefix: shared blocks are only read, because a sharer
//! writes positions past the shared ones, which fall in blocks of its own.

use std::sync::{Arc, Mutex};

use t2_model::kv::blocks_for;
use t2_model::{SeqKv, BLOCK_SIZE};

#[derive(Debug)]
struct Blocks {
    refs: Vec<u32>,
    free: Vec<u32>,
}

impl Blocks {
    fn release(&mut self, ids: &[u32]) {
        for &b in ids {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r == 0 {
                self.free.push(b);
            }
        }
    }
}

/// Hands out the blocks of one pool.
#[derive(Debug, Clone)]
pub struct BlockKvManager {
    blocks: Arc<Mutex<Blocks>>,
    total: usize,
}

/// A sequence's KV: its blocks (one reference held on each) and how many positions hold data.
#[derive(Debug)]
pub struct KvLease {
    kv: SeqKv,
    blocks: Arc<Mutex<Blocks>>,
}

impl BlockKvManager {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            blocks: Arc::new(Mutex::new(Blocks {
                refs: vec![0; num_blocks],
                // Popped from the end: low ids first, which keeps a fresh pool's early sequences compact.
                free: (0..num_blocks as u32).rev().collect(),
            })),
            total: num_blocks,
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.blocks.lock().unwrap().free.len()
    }

    /// Blocks some lease holds.
    pub fn used(&self) -> usize {
        self.total - self.free()
    }

    /// Fresh blocks for `positions` positions, or None when the pool has too few free.
    pub fn allocate(&self, positions: usize) -> Option<KvLease> {
        self.allocate_blocks(blocks_for(positions))
    }

    /// `n` fresh blocks, or None when the pool has too few free.
    pub fn allocate_blocks(&self, n: usize) -> Option<KvLease> {
        let mut b = self.blocks.lock().unwrap();
        if b.free.len() < n {
            return None;
        }
        let at = b.free.len() - n;
        let ids: Vec<u32> = b.free.drain(at..).rev().collect();
        for &id in &ids {
            b.refs[id as usize] = 1;
        }
        Some(KvLease {
            kv: SeqKv::new(ids),
            blocks: self.blocks.clone(),
        })
    }

    /// KV for a sequence of `positions` positions whose first `shared` positions are those of `prefix`:
    /// the prefix's full blocks among them are shared (never the block of the last position), the rest is
    /// fresh. The lease's length is the number of positions it starts with. None when the pool
    /// has too few free blocks.
    pub fn with_prefix(
        &self,
        prefix: &KvLease,
        shared: usize,
        positions: usize,
    ) -> Option<KvLease> {
        let full = Self::shareable(prefix.kv.len, shared, positions);
        let fresh = self.allocate_blocks(blocks_for(positions) - full)?;
        Some(prefix.share(full).join(fresh))
    }

    /// How many blocks [`Self::with_prefix`] would allocate.
    pub fn blocks_with_prefix(prefix_len: usize, shared: usize, positions: usize) -> usize {
        blocks_for(positions) - Self::shareable(prefix_len, shared, positions)
    }

    /// Full prefix blocks a sequence can share: at least its last position is always its own to feed, so
    /// that its first step yields logits.
    fn shareable(prefix_len: usize, shared: usize, positions: usize) -> usize {
        shared.min(prefix_len).min(positions.saturating_sub(1)) / BLOCK_SIZE
    }
}

impl KvLease {
    pub fn kv(&self) -> &SeqKv {
        &self.kv
    }

    pub fn kv_mut(&mut self) -> &mut SeqKv {
        &mut self.kv
    }

    pub fn len(&self) -> usize {
        self.kv.len
    }

    pub fn is_empty(&self) -> bool {
        self.kv.len == 0
    }

    /// The first `n` blocks, shared (filled positions: all of theirs that this lease has).
    pub fn share(&self, n: usize) -> KvLease {
        let ids = self.kv.blocks[..n].to_vec();
        let mut b = self.blocks.lock().unwrap();
        for &id in &ids {
            b.refs[id as usize] += 1;
        }
        KvLease {
            kv: SeqKv {
                blocks: ids,
                len: self.kv.len.min(n * BLOCK_SIZE),
            },
            blocks: self.blocks.clone(),
        }
    }

    /// Block `i` alone, shared (no positions filled: a cache keeps it, a sharer sets its length).
    pub fn share_block(&self, i: usize) -> KvLease {
        let id = self.kv.blocks[i];
        self.blocks.lock().unwrap().refs[id as usize] += 1;
        KvLease {
            kv: SeqKv {
                blocks: vec![id],
                len: 0,
            },
            blocks: self.blocks.clone(),
        }
    }

    /// Whether no other lease holds any of this lease's blocks.
    pub fn is_sole_holder(&self) -> bool {
        let b = self.blocks.lock().unwrap();
        self.kv.blocks.iter().all(|&id| b.refs[id as usize] == 1)
    }

    /// Shared blocks that hold a sequence's first positions, followed by fresh ones: one lease whose
    /// filled length is the shared blocks' positions.
    pub fn concat(shared: Vec<KvLease>, fresh: KvLease) -> KvLease {
        let len = shared.len() * BLOCK_SIZE;
        let mut leases = shared.into_iter();
        let Some(first) = leases.next() else {
            return fresh;
        };
        let mut joined = leases.fold(first, KvLease::join).join(fresh);
        joined.kv.len = len;
        joined
    }

    /// This lease's blocks followed by `more`'s (its positions are not filled).
    pub fn join(mut self, mut more: KvLease) -> KvLease {
        self.kv.blocks.append(&mut more.kv.blocks);
        self
    }
}

impl Drop for KvLease {
    fn drop(&mut self) {
        self.blocks.lock().unwrap().release(&self.kv.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_when_every_lease_is_dropped() {
        let m = BlockKvManager::new(10);
        let mut a = m.allocate(3 * BLOCK_SIZE + 1).unwrap();
        assert_eq!((a.kv().blocks.len(), m.used()), (4, 4));
        a.kv_mut().len = 3 * BLOCK_SIZE + 1;
        // A sharer of a's first 2*BS + 5 positions shares 2 full blocks and needs 2 fresh ones for 60.
        let b = m.with_prefix(&a, 2 * BLOCK_SIZE + 5, 60).unwrap();
        assert_eq!(b.kv().blocks[..2], a.kv().blocks[..2]);
        assert_eq!(b.len(), 2 * BLOCK_SIZE);
        assert_eq!(b.kv().blocks.len(), blocks_for(60));
        assert_eq!(m.used(), 4 + blocks_for(60) - 2);
        assert_eq!(
            BlockKvManager::blocks_with_prefix(a.len(), 2 * BLOCK_SIZE + 5, 60),
            blocks_for(60) - 2
        );
        drop(a);
        // b still holds the shared blocks
        assert_eq!(m.used(), blocks_for(60));
        drop(b);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn allocation_stops_at_the_budget() {
        let m = BlockKvManager::new(3);
        let a = m.allocate(2 * BLOCK_SIZE).unwrap();
        assert!(m.allocate(2 * BLOCK_SIZE).is_none(), "only one block left");
        let b = m.allocate(BLOCK_SIZE).unwrap();
        assert_eq!(m.free(), 0);
        let ids: std::collections::BTreeSet<u32> = a
            .kv()
            .blocks
            .iter()
            .chain(&b.kv().blocks)
            .copied()
            .collect();
        assert_eq!(ids.len(), 3, "blocks are never handed out twice");
        drop((a, b));
        assert_eq!(m.free(), 3);
    }
}
