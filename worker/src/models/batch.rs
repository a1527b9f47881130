//! What one forward pass computes: new tokens of one or more sequences, where their keys
//! and values go in the cache, and which rows need logits.

use std::ops::Range;
use std::sync::Arc;

/// An image's place in a sequence: `len` token positions from `start` whose input rows are
/// the image's embeddings (`[len, hidden]`) instead of the token table's, attending to each
/// other in both directions. `key` identifies the image's content (for the prefix cache).
#[derive(Clone)]
pub struct ImageSpan {
    pub start: usize,
    pub len: usize,
    pub embeddings: Arc<[f32]>,
    pub key: u64,
}

impl ImageSpan {
    pub fn positions(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

impl std::fmt::Debug for ImageSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageSpan {{ positions: {:?}, key: {:016x} }}", self.positions(), self.key)
    }
}

pub struct SeqBatch {
    /// Rows of the batch holding this sequence's new tokens.
    pub rows: Range<usize>,
    /// Position of the first new token; positions are consecutive.
    pub first_pos: usize,
    /// One block table per cache group, covering positions `0..first_pos + rows.len()`
    /// (entries out of a group's window may be `NO_BLOCK`).
    pub block_tables: Vec<Vec<u32>>,
    /// Positions of images whose tokens attend to each other both ways.
    pub bidirectional: Vec<Range<usize>>,
}

/// An input row taken from an image's embeddings: batch row, the image, its row there.
#[derive(Clone, Debug)]
pub struct PlacedRow {
    pub row: usize,
    pub image: ImageSpan,
    pub index: usize,
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
    /// Rows whose input is an image embedding rather than their token's.
    pub placed: Vec<PlacedRow>,
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
        self.seqs.push(SeqBatch { rows: start..end, first_pos, block_tables, bidirectional: Vec::new() });
    }

    /// Places the images of the sequence pushed last: rows at image positions take the
    /// image's embeddings, and the image's positions attend both ways. An image must lie
    /// wholly inside the new rows or wholly before them (its keys are then in the cache).
    pub fn place_images(&mut self, images: &[ImageSpan]) {
        let Some(seq) = self.seqs.last_mut() else { return };
        let computed = seq.first_pos..seq.first_pos + seq.rows.len();
        for image in images {
            let p = image.positions();
            if p.end <= computed.start || p.start >= computed.end {
                continue;
            }
            seq.bidirectional.push(p.start.max(computed.start)..p.end);
            for pos in p.start.max(computed.start)..p.end.min(computed.end) {
                self.placed.push(PlacedRow { row: seq.rows.start + pos - computed.start, image: image.clone(), index: pos - p.start });
            }
        }
    }

    /// Overwrites the input rows of placed images in `x` (`[rows, hidden]`).
    pub fn apply_placed(&self, x: &mut [f32], hidden: usize) -> crate::error::Result<()> {
        for p in &self.placed {
            let src = p.image.embeddings.get(p.index * hidden..(p.index + 1) * hidden);
            let dst = x.get_mut(p.row * hidden..(p.row + 1) * hidden);
            match (src, dst) {
                (Some(src), Some(dst)) => dst.copy_from_slice(src),
                _ => return Err(crate::error::Error::InvalidRequest(format!("image embeddings of width {} do not fit row {} of width {hidden}", p.image.embeddings.len() / p.image.len.max(1), p.row))),
            }
        }
        Ok(())
    }
}

/// Which rows of a sequence need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}
