//! Sparse mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE): a router scores every
//! expert for each row, the row goes through its `top_k` best experts (gated MLPs), and their
//! outputs are summed weighted by the router's softmax probabilities (renormalized over the
//! chosen experts when the model asks). Rows are grouped by expert so each expert runs once
//! per step over all the rows that chose it.

use super::linear::{project, Linear, Projection};
use super::mlp::GatedMlp;
use super::Compute;
use crate::error::Result;
use crate::models::scratch::LayerScratch;

pub struct MoeMlp {
    /// `[num_experts, hidden]`.
    pub router: Linear,
    pub experts: Vec<GatedMlp>,
    pub top_k: usize,
    /// Divide the chosen experts' probabilities by their sum.
    pub renormalize: bool,
}

/// The `k` experts with the highest probability (lower index first among equals) and their
/// weights.
pub fn route(logits: &[f32], k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exps: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
    let mut chosen: Vec<(usize, f32)> = order.into_iter().take(k).map(|e| (e, exps[e] / sum)).collect();
    if renormalize {
        let total: f32 = chosen.iter().map(|c| c.1).sum();
        for c in &mut chosen {
            c.1 /= total;
        }
    }
    chosen
}

impl MoeMlp {
    /// `x` is `[rows, hidden]`; the result goes to `out` `[rows, hidden]`.
    pub fn forward(&self, compute: &Compute, x: &[f32], rows: usize, s: &mut LayerScratch, out: &mut [f32]) -> Result<()> {
        let hidden = self.router.cols();
        let n_experts = self.experts.len();
        let mut logits = vec![0.0; rows * n_experts];
        project(compute, x, rows, &mut s.acts, &mut [Projection { linear: &self.router, out: &mut logits }])?;
        // Per expert: the rows that chose it and with what weight.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
        for r in 0..rows {
            for (e, w) in route(&logits[r * n_experts..(r + 1) * n_experts], self.top_k, self.renormalize) {
                assigned[e].push((r, w));
            }
        }
        out[..rows * hidden].fill(0.0);
        let (mut input, mut result) = (Vec::new(), Vec::new());
        for (e, chosen) in assigned.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
            input.clear();
            for &(r, _) in chosen {
                input.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
            }
            result.resize(chosen.len() * hidden, 0.0);
            self.experts[e].forward(compute, &input, chosen.len(), s, &mut result)?;
            for (i, &(r, w)) in chosen.iter().enumerate() {
                for (o, &y) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(&result[i * hidden..(i + 1) * hidden]) {
                    *o += y * w;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routing_picks_the_likeliest_experts() {
        let chosen = route(&[0.0, 2.0, 1.0, 2.0], 2, false);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3], "ties go to the lower index");
        let total: f32 = [0.0f32, 2.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((chosen[0].1 - 2f32.exp() / total).abs() < 1e-6);
        let renormalized = route(&[0.0, 2.0, 1.0, 2.0], 2, true);
        assert!((renormalized[0].1 - 0.5).abs() < 1e-6 && (renormalized[1].1 - 0.5).abs() < 1e-6);
    }
}
