//! Attention in both directions within each sequence of a ragged batch, without a cache:
//! what an encoder (BERT) computes over its whole input at once. Sequences are laid end to
//! end with no padding; each row attends only to the rows of its own sequence, so a
//! sequence's result does not depend on what it is batched with.

use super::Compute;
use std::ops::Range;

/// The shape of one attention: `heads` heads of `head_dim`, scores scaled by `scale`.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// `out[r] = softmax(q[r]·k[s]ᵀ · scale) v[s]` per head, `s` ranging over the rows of `r`'s
/// sequence. `q`, `k`, `v` and `out` are `[rows, heads * head_dim]`; `seqs` are the row
/// ranges of the sequences, in order and covering every row.
pub fn attend(compute: &Compute, q: &[f32], k: &[f32], v: &[f32], seqs: &[Range<usize>], shape: Heads, out: &mut [f32]) {
    let dense = kiln_kernels::dense_attention::DenseShape { heads: shape.heads, head_dim: shape.head_dim, scale: shape.scale };
    kiln_kernels::dense_attention::dense_attention(compute, q, k, v, seqs, dense, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_attends_only_to_itself() {
        let compute = Compute::new(2);
        let shape = Heads { heads: 2, head_dim: 3, scale: 0.5 };
        let width = 6;
        let rows = 5;
        let val = |i: usize| ((i * 37 % 11) as f32 - 5.0) / 7.0;
        let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) =
            ((0..rows * width).map(val).collect(), (0..rows * width).map(|i| val(i + 3)).collect(), (0..rows * width).map(|i| val(i + 7)).collect());
        let mut together = vec![0.0; rows * width];
        attend(&compute, &q, &k, &v, &[0..2, 2..5], shape, &mut together);
        // The second sequence alone gives the same rows, bit for bit.
        let mut alone = vec![0.0; 3 * width];
        attend(&compute, &q[2 * width..], &k[2 * width..], &v[2 * width..], std::slice::from_ref(&(0..3)), shape, &mut alone);
        assert_eq!(&together[2 * width..], &alone[..]);
        // Row 0, head 0 by hand: softmax over rows 0 and 1 of its sequence only.
        let s: Vec<f32> = (0..2).map(|j| (0..3).map(|d| q[d] * k[j * width + d]).sum::<f32>() * 0.5).collect();
        // (kiln's dot kernels sum in another order than this loop: compare within rounding.)
        let m = s[0].max(s[1]);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let p: Vec<f32> = e.iter().map(|x| x / (e[0] + e[1])).collect();
        for d in 0..3 {
            let want = p[0] * v[d] + p[1] * v[width + d];
            assert!((together[d] - want).abs() < 1e-6, "{} vs {want}", together[d]);
        }
    }
}
