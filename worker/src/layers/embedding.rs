//! Token embeddings, looked up row by row from a (possibly quantized) table. The same table
//! serves as the output head when a model ties them.

use super::linear::Linear;
use super::weights::{MatrixRef, WeightSource};
use crate::error::{Error, Result};
use crate::parallel::Combine;

pub struct Embedding {
    /// Rows `first_row..` of the table (all of it unless the model is split).
    pub table: Linear,
    /// Gemma multiplies embeddings by sqrt(hidden_size).
    pub scale: Option<f32>,
    pub first_row: usize,
    /// The whole vocabulary's size.
    pub vocab: usize,
    /// Adds up the ranks' rows when the vocabulary is split: the one rank that holds a token's
    /// row gives it, the others zeros, so the sum is exact.
    pub combine: Combine,
}

impl Embedding {
    /// A whole table.
    pub fn whole(weight: MatrixRef, scale: Option<f32>) -> Embedding {
        let vocab = weight.rows;
        Embedding { table: Linear { weight, bias: None }, scale, first_row: 0, vocab, combine: Combine::Whole }
    }

    /// Table `name` (`[vocab, hidden]`), this rank's rows of it when the model is split.
    pub fn load(w: &WeightSource, name: &str, vocab: usize, hidden: usize, scale: Option<f32>) -> Result<Embedding> {
        let rows = w.even_split(vocab);
        let first_row = rows.start;
        let weight = w.matrix_rows(name, vocab, hidden, rows)?;
        Ok(Embedding { table: Linear { weight, bias: None }, scale, first_row, vocab, combine: w.combine() })
    }

    /// Writes the embeddings of `tokens` into `out` (`[tokens.len(), hidden]`).
    pub fn forward(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let w = &self.table.weight;
        let hidden = w.cols;
        let row_bytes = w.bytes().len() / w.rows.max(1);
        let mine = self.first_row..self.first_row + w.rows;
        for (&t, dst) in tokens.iter().zip(out.chunks_exact_mut(hidden)) {
            let t = t as usize;
            if t >= self.vocab {
                return Err(Error::InvalidRequest(format!("token id {t} is outside the vocabulary of {}", self.vocab)));
            }
            if !mine.contains(&t) {
                dst.fill(0.0);
                continue;
            }
            let r = t - mine.start;
            kiln_kernels::dequant::dequantize_row(w.dtype, &w.bytes()[r * row_bytes..(r + 1) * row_bytes], dst)?;
            if let Some(s) = self.scale {
                kiln_kernels::ops::scale_in_place(dst, s);
            }
        }
        Ok(self.combine.all_reduce(&mut out[..tokens.len() * hidden])?)
    }
}
