//! RMSNorm over rows (Gemma's `1 + weight` convention is already folded into GGUF weights),
//! and LayerNorm for encoders.

use kiln_kernels::ops;
use kiln_kernels::pool::SharedMut;
use kiln_kernels::Compute;

pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    /// Normalizes each row of `x` (`[rows, dim]`) into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let dim = self.weight.len();
        for (src, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            ops::rms_norm(src, &self.weight, self.eps, dst);
        }
    }

    /// `forward`, with the rows split across `compute`'s threads.
    pub fn forward_on(&self, compute: &Compute, x: &[f32], out: &mut [f32]) {
        let dim = self.weight.len();
        let rows = x.len() / dim;
        let dst = SharedMut::new(out);
        compute.pool.for_ranges(rows, 4, &|r| {
            // SAFETY: each range of rows is written by one thread only.
            let out = unsafe { dst.slice(r.start * dim..r.end * dim) };
            self.forward(&x[r.start * dim..r.end * dim], out);
        });
    }

    /// Normalizes each `dim`-long piece of `x` in place (per-head q/k norms).
    pub fn forward_in_place(&self, x: &mut [f32]) {
        for piece in x.chunks_exact_mut(self.weight.len()) {
            ops::rms_norm_in_place(piece, &self.weight, self.eps);
        }
    }
}

/// LayerNorm over rows: `(x - mean) / sqrt(var + eps) * weight + bias`, the statistics in f64.
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    fn row(&self, row: &mut [f32]) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + f64::from(self.eps)).sqrt();
        for ((v, &w), &b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
            *v = ((f64::from(*v) - mean) * inv) as f32 * w + b;
        }
    }

    /// Normalizes each row of `x` (`[rows, dim]`) in place, rows split across threads.
    pub fn forward_in_place_on(&self, compute: &Compute, x: &mut [f32]) {
        let dim = self.weight.len();
        let rows = x.len() / dim;
        let dst = SharedMut::new(x);
        compute.pool.for_ranges(rows, 4, &|r| {
            // SAFETY: each range of rows is written by one thread only.
            let rows = unsafe { dst.slice(r.start * dim..r.end * dim) };
            rows.chunks_exact_mut(dim).for_each(|row| self.row(row));
        });
    }
}
