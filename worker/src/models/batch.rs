//! What one forward pass computes: new tokens of one or more sequences, where their keys
//! and values go in the cache, and which rows need logits.

use std::ops::Range;

pub struct SeqBatch {
    /// Rows of the batch holding this sequence's new tokens.
    pub rows: Range<usize>,
    /// Position of the first new token; positions are consecutive.
    pub first_pos: usize,
    /// One block table per cache group, covering positions `0..first_pos + rows.len()`
    /// (entries out of a group's window may be `NO_BLOCK`).
    pub block_tables: Vec<Vec<u32>>,
}

#[derive(Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Per cache group, the slot each row's key and value are written to.
    pub slots: Vec<Vec<u32>>,
    pub seqs: Vec<SeqBatch>,
    /// Rows whose logits are wanted, in the order they are returned.
    pub logit_rows: Vec<usize>,
    pub block_size: usize,
}

impl Batch {
    pub fn new(block_size: usize) -> Batch {
        Batch { block_size, ..Batch::default() }
    }

    pub fn num_rows(&self) -> usize {
        self.tokens.len()
    }

    /// Appends `tokens` of a sequence starting at position `first_pos`. With `all_logits`
    /// every row gets logits, with `last_logits` only the last, otherwise none.
    pub fn push_seq(&mut self, tokens: &[u32], first_pos: usize, block_tables: Vec<Vec<u32>>, logits: Logits) {
        let start = self.tokens.len();
        self.slots.resize_with(block_tables.len(), Vec::new);
        for (i, &t) in tokens.iter().enumerate() {
            let pos = first_pos + i;
            self.tokens.push(t);
            self.positions.push(pos);
            for (slots, table) in self.slots.iter_mut().zip(&block_tables) {
                let block = table[pos / self.block_size];
                slots.push(block * self.block_size as u32 + (pos % self.block_size) as u32);
            }
        }
        let end = self.tokens.len();
        match logits {
            Logits::All => self.logit_rows.extend(start..end),
            Logits::Last if end > start => self.logit_rows.push(end - 1),
            _ => {}
        }
        self.seqs.push(SeqBatch { rows: start..end, first_pos, block_tables });
    }
}

/// Which rows of a sequence need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}
