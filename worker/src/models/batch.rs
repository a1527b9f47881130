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
    /// None until a step first computes one of the image's rows: an image whose tokens the
    /// prefix cache already holds is never encoded.
    pub embeddings: Option<Arc<[f32]>>,
    pub key: u64,
    /// Rows and columns of the image's token grid, for models whose rotary positions follow
    /// it (Qwen2.5-VL's M-RoPE); None where image tokens take plain positions.
    pub grid: Option<(usize, usize)>,
    /// Whether the image's tokens attend to each other both ways (Gemma 3).
    pub bidirectional: bool,
}

impl ImageSpan {
    pub fn positions(&self) -> Range<usize> {
        self.start..self.start + self.len
    }

    /// Whether computing positions `rows` needs this image's embeddings.
    pub fn needed_by(&self, rows: Range<usize>) -> bool {
        self.start < rows.end && rows.start < self.start + self.len
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
    /// Multimodal rotary positions (temporal, height, width) of rows of sequences holding
    /// grid-positioned images; other rows use `[position; 3]`.
    pub rope3: Vec<(usize, [usize; 3])>,
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
            Logits::From(first) => self.logit_rows.extend((start + first).min(end)..end),
            _ => {}
        }
        self.seqs.push(SeqBatch { rows: start..end, first_pos, block_tables, bidirectional: Vec::new() });
    }

    /// Places the images of the sequence pushed last: rows at image positions take the
    /// image's embeddings, and the image's positions attend both ways. An image must lie
    /// wholly inside the new rows or wholly before them (its keys are then in the cache).
    pub fn place_images(&mut self, images: &[ImageSpan]) {
        self.place_grid_positions(images);
        let Some(seq) = self.seqs.last_mut() else { return };
        let computed = seq.first_pos..seq.first_pos + seq.rows.len();
        for image in images {
            if !image.needed_by(computed.clone()) {
                continue;
            }
            let p = image.positions();
            if image.bidirectional {
                seq.bidirectional.push(p.start.max(computed.start)..p.end);
            }
            for pos in p.start.max(computed.start)..p.end.min(computed.end) {
                self.placed.push(PlacedRow { row: seq.rows.start + pos - computed.start, image: image.clone(), index: pos - p.start });
            }
        }
    }

    /// The multimodal rotary positions of every row: M-RoPE gives an image's tokens the
    /// position where the image starts plus their row and column on its grid, and moves
    /// everything after the image on by the larger of its sides rather than its token count.
    pub fn rope3_positions(&self) -> Vec<[usize; 3]> {
        let mut out: Vec<[usize; 3]> = self.positions.iter().map(|&p| [p; 3]).collect();
        for &(row, p) in &self.rope3 {
            out[row] = p;
        }
        out
    }

    /// Records M-RoPE positions for the rows of the sequence pushed last, given all its images.
    fn place_grid_positions(&mut self, images: &[ImageSpan]) {
        let Some(seq) = self.seqs.last() else { return };
        if !images.iter().any(|i| i.grid.is_some()) {
            return;
        }
        for (i, row) in seq.rows.clone().enumerate() {
            let pos = seq.first_pos + i;
            // Shift of text positions from the images wholly before `pos`.
            let mut shift: isize = 0;
            let mut at = [0usize; 3];
            let mut inside = false;
            for img in images {
                let (gh, gw) = img.grid.unwrap_or((1, img.len));
                if pos >= img.start + img.len {
                    shift += gh.max(gw) as isize - img.len as isize;
                } else if pos >= img.start {
                    let base = (img.start as isize + shift) as usize;
                    let k = pos - img.start;
                    at = [base, base + k / gw.max(1), base + k % gw.max(1)];
                    inside = true;
                    break;
                }
            }
            if !inside {
                let p = (pos as isize + shift).max(0) as usize;
                at = [p; 3];
            }
            self.rope3.push((row, at));
        }
    }

    /// Overwrites the input rows of placed images in `x` (`[rows, hidden]`).
    pub fn apply_placed(&self, x: &mut [f32], hidden: usize) -> crate::error::Result<()> {
        for p in &self.placed {
            let Some(embeddings) = &p.image.embeddings else {
                return Err(crate::error::Error::InvalidRequest(format!("the image at positions {:?} was not encoded", p.image.positions())));
            };
            let src = embeddings.get(p.index * hidden..(p.index + 1) * hidden);
            let dst = x.get_mut(p.row * hidden..(p.row + 1) * hidden);
            match (src, dst) {
                (Some(src), Some(dst)) => dst.copy_from_slice(src),
                _ => return Err(crate::error::Error::InvalidRequest(format!("image embeddings of width {} do not fit row {} of width {hidden}", embeddings.len() / p.image.len.max(1), p.row))),
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
    /// The rows from this one (counted from the sequence's first new row) to the last.
    From(usize),
}
