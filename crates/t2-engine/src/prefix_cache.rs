//! Automatic prefix caching: the full KV blocks of prompts stay in the pool after their sequence ends, so
//! that a later prompt that starts with the same tokens under the same weights reads them instead of
//! computing them again (a shared system prompt, a few-shot preamble, a conversation's earlier turns, the
//! pass-1 instructions).
//!
//! A block is found by the chain of every token before it plus the weights' identity ([`MixKey`], which
//! names each expert with its content digest), so a block is never shared across mixes, nor with a
//! re-uploaded expert of the same name. The cache holds one reference on each block it keeps: those blocks
//! count against the KV budget like any other, and when a new sequence needs room, blocks that only the
//! cache holds are given back, least recently used first (the end of a chain before its start).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use t2_model::BLOCK_SIZE;
use t2_svf::MixKey;

use crate::kv::{BlockKvManager, KvLease};

struct Entry {
    /// The chain hash of the block before (or of the weights, for a prompt's first block).
    parent: u64,
    tokens: Vec<u32>,
    block: KvLease,
    last_used: u64,
    depth: usize,
}

#[derive(Default)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    clock: u64,
}

fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

fn root(key: &MixKey) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// The cached blocks that begin `prompt` under `key`, at most `max_blocks` of them, each with a
    /// reference of its own (the caller's new sequence reads them).
    pub fn lookup(&mut self, key: &MixKey, prompt: &[u32], max_blocks: usize) -> Vec<KvLease> {
        self.clock += 1;
        let mut parent = root(key);
        let mut found = Vec::new();
        for tokens in prompt.chunks_exact(BLOCK_SIZE).take(max_blocks) {
            let h = chain(parent, tokens);
            match self.entries.get_mut(&h) {
                Some(e) if e.parent == parent && e.tokens == tokens => {
                    e.last_used = self.clock;
                    found.push(e.block.share(1));
                }
                _ => break,
            }
            parent = h;
        }
        found
    }

    /// Keeps the full blocks of `prompt` that `lease` has filled (computed under `key`).
    pub fn insert(&mut self, key: &MixKey, prompt: &[u32], lease: &KvLease) {
        self.clock += 1;
        let filled = lease.len().min(prompt.len()) / BLOCK_SIZE;
        let mut parent = root(key);
        for (i, tokens) in prompt.chunks_exact(BLOCK_SIZE).take(filled).enumerate() {
            let h = chain(parent, tokens);
            let clock = self.clock;
            let e = self.entries.entry(h).or_insert_with(|| Entry {
                parent,
                tokens: tokens.to_vec(),
                block: lease.share_block(i),
                last_used: clock,
                depth: i,
            });
            e.last_used = clock;
            parent = h;
        }
    }

    /// Gives back blocks only the cache holds until `kv` has `free` free blocks (or nothing is left to
    /// give). Returns whether it has.
    pub fn make_room(&mut self, kv: &BlockKvManager, free: usize) -> bool {
        if kv.free() >= free {
            return true;
        }
        let mut idle: Vec<(u64, usize, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.block.is_sole_holder())
            .map(|(&h, e)| (e.last_used, e.depth, h))
            .collect();
        // Oldest first; within one use, the end of a chain before its start.
        idle.sort_by_key(|&(used, depth, _)| (used, std::cmp::Reverse(depth)));
        for (_, _, h) in idle {
            if kv.free() >= free {
                break;
            }
            self.entries.remove(&h);
        }
        kv.free() >= free
    }

    /// Blocks kept.
    pub fn blocks(&self) -> usize {
        self.entries.len()
    }

    /// Blocks kept that no sequence reads now (free for the taking).
    pub fn idle_blocks(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.block.is_sole_holder())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    fn filled(kv: &BlockKvManager, positions: usize) -> KvLease {
        let mut l = kv.allocate(positions).unwrap();
        l.kv_mut().len = positions;
        l
    }

    #[test]
    fn a_prefix_is_found_by_its_tokens_and_weights_only() {
        let kv = BlockKvManager::new(32);
        let mut cache = PrefixCache::default();
        let base = MixKey::base();
        let other = MixKey::of_mix(&t2_svf::Mix::expert("x"), |_| Ok("d1")).unwrap();
        let p = prompt(3 * BLOCK_SIZE + 5, 1);
        let a = filled(&kv, p.len());
        cache.insert(&base, &p, &a);
        assert_eq!(cache.blocks(), 3);
        // The same tokens: all three full blocks, the very blocks of a.
        let hit = cache.lookup(&base, &p, 10);
        assert_eq!(hit.len(), 3);
        assert_eq!(hit[1].kv().blocks, a.kv().blocks[1..2]);
        // At most what the caller allows (it always computes the last prompt position itself).
        assert_eq!(cache.lookup(&base, &p, 2).len(), 2);
        // Another mix never shares.
        assert!(cache.lookup(&other, &p, 10).is_empty());
        // A prompt that differs in its second block shares only the first.
        let mut q = p.clone();
        q[BLOCK_SIZE + 3] += 1;
        assert_eq!(cache.lookup(&base, &q, 10).len(), 1);
        // A different start shares nothing, even with equal later blocks.
        let mut r = p.clone();
        r[0] += 1;
        assert!(cache.lookup(&base, &r, 10).is_empty());
    }

    #[test]
    fn cached_blocks_count_until_room_is_needed_then_go_oldest_first() {
        let kv = BlockKvManager::new(8);
        let mut cache = PrefixCache::default();
        let key = MixKey::base();
        let (p, q) = (prompt(2 * BLOCK_SIZE, 1), prompt(2 * BLOCK_SIZE, 2));
        for x in [&p, &q] {
            let l = filled(&kv, x.len());
            cache.insert(&key, x, &l);
        }
        // Both sequences ended; the cache keeps their 4 blocks.
        assert_eq!((kv.used(), cache.idle_blocks()), (4, 4));
        // q is used again, so p is older.
        let reading = cache.lookup(&key, &q, 2);
        assert_eq!(cache.idle_blocks(), 2);
        assert!(cache.make_room(&kv, 6));
        assert_eq!(cache.blocks(), 2, "p's blocks went, q's stay");
        assert_eq!(cache.lookup(&key, &q, 2).len(), 2);
        assert!(cache.lookup(&key, &p, 2).is_empty());
        // Blocks a sequence reads cannot be taken.
        assert!(!cache.make_room(&kv, 8));
        drop(reading);
        assert!(cache.make_room(&kv, 8));
        assert_eq!((cache.blocks(), kv.used()), (0, 0));
    }
}
