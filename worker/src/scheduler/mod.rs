//! Continuous batching: which sequences run in the next step, and how many of their tokens.
//!
//! Every step runs the pending token of each decoding sequence and fills the rest of the
//! token budget with prompt chunks, oldest sequences first, then admits waiting sequences
//! while the budget, `max_seqs` and free blocks allow. A newly admitted sequence first looks
//! its prompt up in the prefix cache and skips the blocks found there. When a sequence needs
//! a block and none is free, the most recently admitted sequence is preempted: its blocks
//! are released (kept in the prefix cache while nobody needs them) and it waits to be
//! recomputed.

mod blocks;

use crate::kv_cache::{BlockPool, NO_BLOCK};
use std::collections::VecDeque;

pub type SeqId = u64;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most tokens computed in one step.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    pub block_size: usize,
    /// Most rows of one sequence whose logits score its prompt in a step (each row's logits
    /// are a vocabulary of floats, kept until the step ends).
    pub max_scored_rows: usize,
}

/// Scheduling state of one sequence.
#[derive(Clone, Debug)]
pub struct SeqState {
    pub id: SeqId,
    /// Prompt followed by generated tokens; the last one may not be computed yet.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub num_computed: usize,
    /// One block table per cache group.
    pub block_tables: Vec<Vec<u32>>,
    /// Prompt tokens found in the prefix cache at first admission.
    pub num_cached_prompt: usize,
    /// Full blocks registered in the prefix cache, and the chain hash of the last one.
    registered: usize,
    last_hash: u64,
    admitted: u64,
    pub preemptions: u32,
    /// Images placed in the prompt: a step never ends inside one (its tokens attend to each
    /// other), and the prefix cache tells them apart by content, not by their tokens.
    pub images: Vec<crate::models::batch::ImageSpan>,
    /// For a request reporting its prompt's log-probabilities: positions before this have
    /// had theirs reported. The logits at each position from here to the one before the
    /// prompt's last score the next prompt token, so those positions are computed, never
    /// taken from the prefix cache.
    pub score_from: Option<usize>,
}

impl SeqState {
    pub fn new(id: SeqId, prompt: Vec<u32>, num_groups: usize) -> SeqState {
        SeqState {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_tables: vec![Vec::new(); num_groups],
            num_cached_prompt: 0,
            registered: 0,
            last_hash: crate::kv_cache::prefix::ROOT,
            admitted: 0,
            preemptions: 0,
            images: Vec::new(),
            score_from: None,
        }
    }

    /// The positions in `start..end` whose logits score prompt tokens not yet reported.
    pub fn scored_rows(&self, start: usize, end: usize) -> std::ops::Range<usize> {
        let Some(from) = self.score_from else { return 0..0 };
        let lo = start.max(from);
        let hi = end.min(self.prompt_len.saturating_sub(1));
        if lo < hi {
            lo..hi
        } else {
            0..0
        }
    }

    /// Tokens to compute in a step with `budget` tokens left: a chunk scoring prompt tokens
    /// takes at most `max_scored` rows, and no image is cut.
    fn chunk_len(&self, budget: usize, max_scored: usize) -> usize {
        let mut n = self.pending().min(budget);
        if !self.scored_rows(self.num_computed, self.num_computed + n).is_empty() {
            n = n.min(max_scored.max(1));
        }
        self.image_safe_len(self.num_computed, n)
    }

    fn plan_entry(&self, len: usize) -> PlanEntry {
        let (start, end) = (self.num_computed, self.num_computed + len);
        PlanEntry { id: self.id, start, len, wants_logits: end == self.tokens.len(), scored: self.scored_rows(start, end) }
    }

    /// How many of `n` tokens from position `start` to compute in one step so that no image
    /// is cut: a step ending inside an image stops before it, or, when the image begins at or
    /// before `start`, takes the rest of it whatever the budget.
    fn image_safe_len(&self, start: usize, n: usize) -> usize {
        let mut end = start + n;
        while let Some(img) = self.images.iter().find(|i| i.start < end && end < i.start + i.len) {
            end = if img.start > start { img.start } else { img.start + img.len };
        }
        end - start
    }

    /// The tokens `range` as the prefix cache keys them: an image's positions carry values
    /// derived from its content key (above every token id), so different images differ.
    pub fn cache_keys(&self, range: std::ops::Range<usize>) -> std::borrow::Cow<'_, [u32]> {
        let tokens = &self.tokens[range.clone()];
        if !self.images.iter().any(|i| i.start < range.end && range.start < i.start + i.len) {
            return std::borrow::Cow::Borrowed(tokens);
        }
        let mut keys = tokens.to_vec();
        for img in &self.images {
            for pos in img.start.max(range.start)..(img.start + img.len).min(range.end) {
                let mixed = crate::kv_cache::prefix::mix(img.key, (pos - img.start) as u64);
                keys[pos - range.start] = 0x8000_0000 | (mixed as u32 & 0x7fff_ffff);
            }
        }
        std::borrow::Cow::Owned(keys)
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Forgets computed state after the blocks were released (preemption, failed admission).
    fn reset_progress(&mut self) {
        self.num_computed = 0;
        self.registered = 0;
        self.last_hash = crate::kv_cache::prefix::ROOT;
    }
}

/// Part of one sequence to compute in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    pub id: SeqId,
    /// Tokens `start..start + len` run at positions `start..`.
    pub start: usize,
    pub len: usize,
    /// True when the chunk ends at the sequence's last token, so its logits pick the next one.
    pub wants_logits: bool,
    /// Positions whose logits score the next prompt token (see `SeqState::score_from`);
    /// when not empty, every row from its start to the chunk's end gets logits.
    pub scored: std::ops::Range<usize>,
}

impl PlanEntry {
    /// Rows of logits the step returns for this entry: the scored rows first, and, when the
    /// entry samples, the last row last.
    pub fn logit_rows(&self) -> usize {
        if !self.scored.is_empty() {
            self.start + self.len - self.scored.start
        } else {
            usize::from(self.wants_logits)
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
    /// Sequences preempted while planning; they wait to be recomputed.
    pub preempted: Vec<SeqId>,
}

impl Plan {
    pub fn num_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.len).sum()
    }
}

#[derive(Clone, Debug, Default)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    pools: Vec<BlockPool>,
    windows: Vec<Option<usize>>,
    waiting: VecDeque<SeqState>,
    running: Vec<SeqState>,
    clock: u64,
    stats: SchedulerStats,
}

impl Scheduler {
    /// `groups` gives each cache group's block count and sliding window.
    pub fn new(cfg: SchedulerConfig, groups: &[(usize, Option<usize>)]) -> Scheduler {
        Scheduler {
            cfg,
            pools: groups.iter().map(|&(n, _)| BlockPool::new(n)).collect(),
            windows: groups.iter().map(|&(_, w)| w).collect(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            clock: 0,
            stats: SchedulerStats::default(),
        }
    }

    pub fn num_groups(&self) -> usize {
        self.pools.len()
    }

    pub fn pools(&self) -> &[BlockPool] {
        &self.pools
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats { running: self.running.len(), waiting: self.waiting.len(), ..self.stats.clone() }
    }

    /// Whether a sequence growing to `max_len` tokens fits in the cache at all, even alone.
    pub fn could_ever_fit(&self, max_len: usize) -> bool {
        self.pools.iter().zip(&self.windows).all(|(pool, w)| self.peak_blocks(max_len, *w) <= pool.num_blocks())
    }

    /// Most blocks a sequence of `len` tokens holds at once in a group with window `w`.
    fn peak_blocks(&self, len: usize, window: Option<usize>) -> usize {
        let bs = self.cfg.block_size;
        let full = len.div_ceil(bs);
        match window {
            // The window plus a step's worth of new tokens, rounded out to whole blocks.
            Some(w) => full.min((w + self.cfg.max_batch_tokens).div_ceil(bs) + 1),
            None => full,
        }
    }

    pub fn add(&mut self, seq: SeqState) {
        self.waiting.push_back(seq);
    }

    pub fn get(&self, id: SeqId) -> Option<&SeqState> {
        self.running.iter().chain(self.waiting.iter()).find(|s| s.id == id)
    }

    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut SeqState> {
        self.running.iter_mut().chain(self.waiting.iter_mut()).find(|s| s.id == id)
    }

    /// Appends a sampled token to a running sequence.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// Starts running sequence `child` as a copy of running sequence `parent`: same tokens,
    /// sharing every full block. A partly filled last block cannot be shared (both will
    /// write it), so the child gets a fresh block; the returned `(group, from, to)` block
    /// copies must be applied to the cache. None if the parent is not running or no block is
    /// free for the copy.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Option<Vec<(usize, u32, u32)>> {
        let p = self.running.iter().find(|s| s.id == parent)?.clone();
        let bs = self.cfg.block_size;
        let partial = !p.num_computed.is_multiple_of(bs);
        let last = p.num_computed.div_ceil(bs).checked_sub(1);
        if partial && self.pools.iter().any(|pool| pool.available() == 0) {
            return None;
        }
        let mut seq = SeqState { id: child, ..p };
        let mut copies = Vec::new();
        for (g, table) in seq.block_tables.iter_mut().enumerate() {
            for (b, id) in table.iter_mut().enumerate() {
                if *id == NO_BLOCK {
                    continue;
                }
                if partial && Some(b) == last {
                    let fresh = self.pools[g].allocate().expect("availability checked above");
                    copies.push((g, *id, fresh));
                    *id = fresh;
                } else {
                    self.pools[g].retain(*id);
                }
            }
        }
        self.clock += 1;
        seq.admitted = self.clock;
        self.running.push(seq);
        Some(copies)
    }

    /// Removes a sequence wherever it is and releases its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<SeqState> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.release_blocks(&mut seq);
        Some(seq)
    }

    fn release_blocks(&mut self, seq: &mut SeqState) {
        for (pool, table) in self.pools.iter_mut().zip(&mut seq.block_tables) {
            // Last block first: eviction then takes a prefix's tail before its head, which
            // other sequences are more likely to share.
            for &b in table.iter().rev().filter(|&&b| b != NO_BLOCK) {
                pool.release(b);
            }
            table.clear();
        }
    }

    /// Decides the next step.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_batch_tokens;
        self.running.sort_by_key(|s| s.admitted);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].chunk_len(budget, self.cfg.max_scored_rows);
            let target = self.running[i].num_computed + n;
            if !self.grow_with_preemption(i, target, &mut plan) {
                // The sequence preempted itself; nothing after it remains either.
                break;
            }
            plan.entries.push(self.running[i].plan_entry(n));
            budget = budget.saturating_sub(n);
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_seqs && plan.preempted.is_empty() {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if seq.num_computed == 0 {
                self.reuse_prefix(&mut seq);
            }
            let n = seq.chunk_len(budget, self.cfg.max_scored_rows);
            let target = seq.num_computed + n;
            if !self.grow(&mut seq, target) {
                self.release_blocks(&mut seq);
                seq.reset_progress();
                self.waiting.push_front(seq);
                break;
            }
            self.clock += 1;
            seq.admitted = self.clock;
            plan.entries.push(seq.plan_entry(n));
            budget = budget.saturating_sub(n);
            self.running.push(seq);
        }
        plan
    }

    /// Grows running sequence `i` to cover `target` tokens, preempting the most recently
    /// admitted sequences as needed. False if sequence `i` itself had to be preempted.
    fn grow_with_preemption(&mut self, i: usize, target: usize, plan: &mut Plan) -> bool {
        loop {
            let mut seq = std::mem::replace(&mut self.running[i], SeqState::new(0, vec![], 0));
            let grown = self.grow(&mut seq, target);
            self.running[i] = seq;
            if grown {
                return true;
            }
            let victim = self.running.len() - 1;
            let mut v = self.running.remove(victim);
            self.release_blocks(&mut v);
            v.reset_progress();
            v.preemptions += 1;
            self.stats.preemptions += 1;
            plan.preempted.push(v.id);
            self.waiting.push_front(v);
            if victim == i {
                return false;
            }
        }
    }

    /// Applies a finished step: advances computed counts, registers newly full blocks in the
    /// prefix cache and releases blocks that left a sliding window.
    pub fn complete(&mut self, plan: &Plan) {
        for e in &plan.entries {
            let Some(idx) = self.running.iter().position(|s| s.id == e.id) else { continue };
            let mut seq = std::mem::replace(&mut self.running[idx], SeqState::new(0, vec![], 0));
            seq.num_computed = e.start + e.len;
            self.register_full_blocks(&mut seq);
            self.release_out_of_window(&mut seq);
            self.running[idx] = seq;
        }
    }
}

#[cfg(test)]
mod tests;
