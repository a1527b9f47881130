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
use crate::parallel::Combine;

pub struct MoeMlp {
    /// `[num_experts, hidden]`.
    pub router: Linear,
    /// The experts this rank computes (all of them unless the model is split).
    pub experts: Vec<GatedMlp>,
    /// The index of `experts[0]` among all the model's experts.
    pub first_expert: usize,
    /// How the ranks' expert outputs reach every rank of a split model.
    pub combine: Combine,
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

/// Adds each chosen row's expert output, times its weight, to `out`.
fn accumulate(out: &mut [f32], chosen: &[(usize, f32)], result: &[f32], hidden: usize) {
    for (i, &(r, w)) in chosen.iter().enumerate() {
        for (o, &y) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(&result[i * hidden..(i + 1) * hidden]) {
            *o += y * w;
        }
    }
}

impl MoeMlp {
    /// `x` is `[rows, hidden]`; the result goes to `out` `[rows, hidden]`.
    pub fn forward(&self, compute: &Compute, x: &[f32], rows: usize, s: &mut LayerScratch, out: &mut [f32]) -> Result<()> {
        let hidden = self.router.cols();
        let n_experts = self.router.rows();
        let mine = self.first_expert..self.first_expert + self.experts.len();
        let mut logits = vec![0.0; rows * n_experts];
        project(compute, x, rows, &mut s.acts, &mut [Projection { linear: &self.router, out: &mut logits }])?;
        // Per expert: the rows that chose it and with what weight. Every rank routes every
        // row alike (the router is whole on each), so each knows what the others compute.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
        for r in 0..rows {
            for (e, w) in route(&logits[r * n_experts..(r + 1) * n_experts], self.top_k, self.renormalize) {
                assigned[e].push((r, w));
            }
        }
        let out = &mut out[..rows * hidden];
        out.fill(0.0);
        // This rank's experts' outputs, one after the other in expert order.
        let (mut input, mut results) = (Vec::new(), Vec::new());
        for e in mine.clone().filter(|&e| !assigned[e].is_empty()) {
            input.clear();
            for &(r, _) in &assigned[e] {
                input.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
            }
            let at = results.len();
            results.resize(at + assigned[e].len() * hidden, 0.0);
            self.experts[e - mine.start].forward(compute, &input, assigned[e].len(), s, &mut results[at..])?;
        }
        let add_mine = |out: &mut [f32]| {
            let mut at = 0;
            for e in mine.clone() {
                accumulate(out, &assigned[e], &results[at..], hidden);
                at += assigned[e].len() * hidden;
            }
        };
        match &self.combine {
            Combine::Whole => add_mine(out),
            Combine::Sum(c) => {
                add_mine(out);
                c.all_reduce_sum(out)?;
            }
            // Every expert's outputs on every rank, added in expert order as one worker adds them.
            Combine::Gather(c) => {
                let parts = c.all_gather(&results)?;
                for (rank, part) in parts.iter().enumerate() {
                    let mut at = 0;
                    for e in crate::parallel::split_even(n_experts, rank, c.size()) {
                        let len = assigned[e].len() * hidden;
                        let values = part.get(at..at + len).ok_or_else(|| {
                            crate::parallel::CollectiveError::Peer { rank, what: format!("sent {} expert outputs where routing expects more", part.len() / hidden.max(1)) }
                        })?;
                        accumulate(out, &assigned[e], values, hidden);
                        at += len;
                    }
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
