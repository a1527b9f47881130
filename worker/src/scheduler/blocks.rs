//! How the scheduler moves blocks: growing a sequence's block tables, reusing cached
//! prefix blocks, registering full blocks, and releasing blocks that left a sliding window.

use super::{Scheduler, SeqState};
use crate::kv_cache::prefix::{block_hash, chain, ROOT};
use crate::kv_cache::NO_BLOCK;

impl Scheduler {
    /// First block index a query at position `pos` still reads in a group with window `w`.
    fn first_needed_block(&self, pos: usize, window: Option<usize>) -> usize {
        match window {
            Some(w) => (pos + 1).saturating_sub(w) / self.cfg.block_size,
            None => 0,
        }
    }

    /// Extends the block tables to cover `target` tokens; all or nothing.
    pub(super) fn grow(&mut self, seq: &mut SeqState, target: usize) -> bool {
        let wanted = target.div_ceil(self.cfg.block_size);
        let mut plan = Vec::with_capacity(self.pools.len());
        for (g, table) in seq.block_tables.iter().enumerate() {
            let first = self.first_needed_block(seq.num_computed, self.windows[g]);
            let allocate: Vec<bool> = (table.len()..wanted).map(|b| b >= first).collect();
            if allocate.iter().filter(|&&a| a).count() > self.pools[g].available() {
                return false;
            }
            plan.push(allocate);
        }
        for (g, allocate) in plan.into_iter().enumerate() {
            for a in allocate {
                let id = if a { self.pools[g].allocate().expect("availability checked above") } else { NO_BLOCK };
                seq.block_tables[g].push(id);
            }
        }
        true
    }

    /// Looks the sequence's tokens up in the prefix cache and takes the longest usable hit:
    /// every block of full-attention groups, and the blocks within the window for sliding
    /// groups. At least one token is always left to compute.
    pub(super) fn reuse_prefix(&mut self, seq: &mut SeqState) {
        let bs = self.cfg.block_size;
        // Positions whose logits score the prompt must be computed.
        let max_blocks = ((seq.tokens.len() - 1) / bs).min(seq.score_from.map_or(usize::MAX, |from| from / bs));
        let keys = seq.cache_keys(0..max_blocks * bs).into_owned();
        let hashes = chain(&keys, bs);
        self.stats.prefix_query_tokens += seq.tokens.len() as u64;
        let found = |s: &Scheduler, g: usize, b: usize| {
            let (h, parent) = hashes[b];
            s.pools[g].lookup(h, parent, &keys[b * bs..(b + 1) * bs])
        };
        let mut k = max_blocks;
        'search: while k > 0 {
            for g in 0..self.pools.len() {
                let first = self.first_needed_block(k * bs, self.windows[g]);
                if let Some(missing) = (first..k).rev().find(|&b| found(self, g, b).is_none()) {
                    // No hit can reach past a missing block that a full-attention group needs.
                    k = if self.windows[g].is_none() { missing } else { k - 1 };
                    continue 'search;
                }
            }
            break;
        }
        if k == 0 {
            return;
        }
        for g in 0..self.pools.len() {
            let first = self.first_needed_block(k * bs, self.windows[g]);
            for b in 0..k {
                let id = if b >= first { found(self, g, b).expect("checked present above") } else { NO_BLOCK };
                if id != NO_BLOCK {
                    self.pools[g].retain(id);
                }
                seq.block_tables[g].push(id);
            }
        }
        seq.num_computed = k * bs;
        seq.registered = k;
        seq.last_hash = hashes[k - 1].0;
        if seq.preemptions == 0 {
            seq.num_cached_prompt = (k * bs).min(seq.prompt_len);
        }
        self.stats.prefix_hit_tokens += (k * bs) as u64;
    }

    /// Registers blocks that became full in the prefix cache.
    pub(super) fn register_full_blocks(&mut self, seq: &mut SeqState) {
        let bs = self.cfg.block_size;
        let full = seq.num_computed / bs;
        for b in seq.registered..full {
            let parent = if b == 0 { ROOT } else { seq.last_hash };
            let tokens = seq.cache_keys(b * bs..(b + 1) * bs);
            let h = block_hash(parent, &tokens);
            for (pool, table) in self.pools.iter_mut().zip(&seq.block_tables) {
                if table[b] != NO_BLOCK {
                    pool.register(table[b], h, parent, &tokens);
                }
            }
            seq.last_hash = h;
        }
        seq.registered = seq.registered.max(full);
    }

    /// Releases sliding-window blocks that no later query can read.
    pub(super) fn release_out_of_window(&mut self, seq: &mut SeqState) {
        for g in 0..self.pools.len() {
            if self.windows[g].is_none() {
                continue;
            }
            let first = self.first_needed_block(seq.num_computed, self.windows[g]);
            for b in 0..first.min(seq.block_tables[g].len()) {
                let id = seq.block_tables[g][b];
                if id != NO_BLOCK {
                    self.pools[g].release(id);
                    seq.block_tables[g][b] = NO_BLOCK;
                }
            }
        }
    }
}
