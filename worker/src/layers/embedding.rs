//! Token embeddings, looked up row by row from a (possibly quantized) table. The same table
//! serves as the output head when a model ties them.

use super::linear::Linear;
use crate::error::{Error, Result};

pub struct Embedding {
    pub table: Linear,
    /// Gemma multiplies embeddings by sqrt(hidden_size).
    pub scale: Option<f32>,
}

impl Embedding {
    /// Writes the embeddings of `tokens` into `out` (`[tokens.len(), hidden]`).
    pub fn forward(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let w = &self.table.weight;
        let hidden = w.cols;
        let row_bytes = w.bytes().len() / w.rows;
        for (&t, dst) in tokens.iter().zip(out.chunks_exact_mut(hidden)) {
            let t = t as usize;
            if t >= w.rows {
                return Err(Error::InvalidRequest(format!("token id {t} is outside the vocabulary of {}", w.rows)));
            }
            kiln_kernels::dequant::dequantize_row(w.dtype, &w.bytes()[t * row_bytes..(t + 1) * row_bytes], dst)?;
            if let Some(s) = self.scale {
                kiln_kernels::ops::scale_in_place(dst, s);
            }
        }
        Ok(())
    }
}
