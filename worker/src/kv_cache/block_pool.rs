//! Block allocation for one group of the KV cache, with reference counts and the prefix
//! cache's index.
//!
//! Invariants: a block is in exactly one of three states. *In use* (ref count > 0), *cached*
//! (ref count 0, holding the keys and values of a known token prefix, findable by its hash,
//! evicted least recently released first), or *free*. Allocation takes a free block, or
//! evicts the least recently released cached one. A block is never handed out twice.

use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

/// Marks a block-table entry whose block was released (out of a sliding window).
pub const NO_BLOCK: BlockId = u32::MAX;

/// What a cached block holds: its position in a prefix chain and its tokens, checked on
/// lookup so that a hash collision can never hand out wrong keys and values.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CachedContent {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub num_blocks: usize,
    pub in_use: usize,
    pub cached: usize,
    pub free: usize,
    /// Blocks written at least once since the pool was made: the cache's memory pages
    /// become resident as blocks are first written, so this is how much of it is.
    pub written: usize,
    pub evictions: u64,
}

pub struct BlockPool {
    ref_counts: Vec<u32>,
    content: Vec<Option<CachedContent>>,
    free: Vec<BlockId>,
    /// The bottom `never_used` entries of `free` were never handed out: released blocks are
    /// pushed on top, so the stack only reaches into them when more blocks are needed at once
    /// than ever before.
    never_used: usize,
    /// Cached blocks with no references, by release time.
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    by_hash: HashMap<u64, BlockId>,
    clock: u64,
    evictions: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> BlockPool {
        BlockPool {
            ref_counts: vec![0; num_blocks],
            content: vec![None; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            never_used: num_blocks,
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            by_hash: HashMap::new(),
            clock: 0,
            evictions: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that an allocation could return now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.ref_counts[id as usize]
    }

    /// A block for new content, with one reference; None when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => {
                self.never_used = self.never_used.min(self.free.len());
                id
            }
            None => {
                let (&stamp, &id) = self.evictable.iter().next()?;
                self.evictable.remove(&stamp);
                if let Some(c) = self.content[id as usize].take() {
                    self.by_hash.remove(&c.hash);
                }
                self.evictions += 1;
                id
            }
        };
        debug_assert_eq!(self.ref_counts[id as usize], 0, "allocated block {id} was in use");
        self.ref_counts[id as usize] = 1;
        Some(id)
    }

    /// Adds a reference to a block (in use, or cached and about to be reused).
    pub fn retain(&mut self, id: BlockId) {
        let i = id as usize;
        if self.ref_counts[i] == 0 {
            let removed = self.evictable.remove(&self.released_at[i]);
            debug_assert_eq!(removed, Some(id), "a block without references must be evictable when retained");
        }
        self.ref_counts[i] += 1;
    }

    /// Drops a reference; at zero the block becomes cached if it holds a known prefix block,
    /// else free.
    pub fn release(&mut self, id: BlockId) {
        let i = id as usize;
        assert!(self.ref_counts[i] > 0, "block {id} released more often than retained");
        self.ref_counts[i] -= 1;
        if self.ref_counts[i] == 0 {
            if self.content[i].is_some() {
                self.clock += 1;
                self.released_at[i] = self.clock;
                self.evictable.insert(self.clock, id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Records that in-use block `id` now holds the full block `tokens` whose chain hash is
    /// `hash` (following `parent`). The first block registered for a hash stays its owner.
    pub fn register(&mut self, id: BlockId, hash: u64, parent: u64, tokens: &[u32]) {
        let i = id as usize;
        if self.content[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.content[i] = Some(CachedContent { hash, parent, tokens: tokens.to_vec() });
        self.by_hash.insert(hash, id);
    }

    /// The cached block holding exactly `tokens` after `parent`, if any.
    pub fn lookup(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<BlockId> {
        let &id = self.by_hash.get(&hash)?;
        let c = self.content[id as usize].as_ref()?;
        (c.parent == parent && c.tokens == tokens).then_some(id)
    }

    pub fn stats(&self) -> PoolStats {
        let in_use = self.ref_counts.iter().filter(|&&r| r > 0).count();
        PoolStats {
            num_blocks: self.num_blocks(),
            in_use,
            cached: self.evictable.len(),
            free: self.free.len(),
            written: self.num_blocks() - self.never_used,
            evictions: self.evictions,
        }
    }

    /// Checks the state invariants; for tests.
    pub fn check(&self) -> Result<(), String> {
        let n = self.num_blocks();
        let mut seen = vec![0u8; n];
        for &id in &self.free {
            seen[id as usize] += 1;
            if self.ref_counts[id as usize] != 0 || self.content[id as usize].is_some() {
                return Err(format!("free block {id} is referenced or holds content"));
            }
        }
        for &id in self.evictable.values() {
            seen[id as usize] += 1;
            if self.ref_counts[id as usize] != 0 || self.content[id as usize].is_none() {
                return Err(format!("evictable block {id} is referenced or empty"));
            }
        }
        for (id, count) in seen.iter_mut().enumerate() {
            if self.ref_counts[id] > 0 {
                *count += 1;
            }
            if *count != 1 {
                return Err(format!("block {id} is in {count} states"));
            }
        }
        for (&h, &id) in &self.by_hash {
            if self.content[id as usize].as_ref().map(|c| c.hash) != Some(h) {
                return Err(format!("hash index points at block {id} with other content"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_counts_the_most_blocks_ever_held_at_once() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.stats().written, 0);
        // One block taken and given back, over and over, writes one block.
        for _ in 0..5 {
            let a = p.allocate().unwrap();
            p.release(a);
        }
        assert_eq!(p.stats().written, 1);
        let (a, b) = (p.allocate().unwrap(), p.allocate().unwrap());
        assert_eq!(p.stats().written, 2);
        // A cached block counts as written; a later allocation takes a fresh one.
        p.register(a, 7, 0, &[1]);
        p.release(a);
        p.release(b);
        let _ = (p.allocate(), p.allocate());
        assert_eq!(p.stats().written, 3);
        let _ = p.allocate();
        assert_eq!(p.stats().written, 4);
    }

    #[test]
    fn allocate_release_and_reuse_through_the_cache() {
        let mut p = BlockPool::new(3);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let c = p.allocate().unwrap();
        assert!(p.allocate().is_none());
        assert_ne!(a, b);
        p.register(a, 11, 0, &[1, 2]);
        p.release(a);
        p.release(b);
        p.check().unwrap();
        assert_eq!(p.lookup(11, 0, &[1, 2]), Some(a));
        assert_eq!(p.lookup(11, 0, &[1, 3]), None, "a hash match with other tokens is not a hit");
        // The free block is preferred over evicting the cached one.
        assert_eq!(p.allocate(), Some(b));
        p.retain(a);
        assert_eq!(p.ref_count(a), 1);
        p.release(a);
        p.release(c);
        assert_eq!(p.allocate(), Some(c));
        // Only the cached block is left: allocation evicts it.
        assert_eq!(p.allocate(), Some(a));
        assert_eq!(p.lookup(11, 0, &[1, 2]), None);
        assert_eq!(p.stats().evictions, 1);
        p.check().unwrap();
    }

    #[test]
    fn eviction_takes_the_least_recently_released() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 1, 0, &[1]);
        p.register(b, 2, 1, &[2]);
        p.release(b);
        p.release(a);
        assert_eq!(p.allocate(), Some(b));
        p.check().unwrap();
    }
}
