//! What one forward pass computes: new tokens of one or more sequences, where their keys
//! and values go in the cache, and which rows need logits.

use std::ops::Range;

pub struct SeqBatch {
    /// Rows of the batch holding this sequence's new tokens.
    pub rows: Range<usize>,
    /// Position of the first new token; positions are consecutive.
    pub first_pos: usize,
    /// Cache blocks covering positions `0..first_pos + rows.len()`.
    pub block_table: Vec<u32>,
}

#[derive(Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Cache slot each row's key and value are written to.
    pub slots: Vec<u32>,
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
    /// every row gets logits, otherwise only the last.
    pub fn push_seq(&mut self, tokens: &[u32], first_pos: usize, block_table: Vec<u32>, all_logits: bool) {
        let start = self.tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = first_pos + i;
            self.tokens.push(t);
            self.positions.push(pos);
            let block = block_table[pos / self.block_size];
            self.slots.push(block * self.block_size as u32 + (pos % self.block_size) as u32);
        }
        let end = self.tokens.len();
        if all_logits {
            self.logit_rows.extend(start..end);
        } else if end > start {
            self.logit_rows.push(end - 1);
        }
        self.seqs.push(SeqBatch { rows: start..end, first_pos, block_table });
    }
}
