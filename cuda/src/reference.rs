//! The kernels' contract in plain Rust: what attention.cu computes, in the plainest order.

use crate::{check_buffers, check_write, CacheSlots, CacheValue, KeyRanges, Result, Scoring};

fn round_half(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Attention of every query row over the keys its range gives it: `[rows, heads * head_dim]`.
pub fn attention<T: CacheValue>(ranges: &KeyRanges, scoring: &Scoring, q: &[f32], k: &[T], v: &[T]) -> Result<Vec<f32>> {
    check_buffers(ranges, q.len(), k.len(), v.len())?;
    let s = ranges.shape();
    let (hd, kv_width, group) = (s.head_dim, s.kv_width(), s.heads / s.kv_heads);
    let mut out = vec![0.0f32; q.len()];
    let mut query = vec![0.0f32; hd];
    let mut scores = Vec::with_capacity(ranges.longest());
    for row in 0..ranges.rows() {
        let seq = ranges.row_seq()[row] as usize;
        let keys = ranges.row_lo()[row] as usize..ranges.row_hi()[row] as usize;
        for head in 0..s.heads {
            let offset = head / group * hd;
            let q_row = &q[(row * s.heads + head) * hd..][..hd];
            for (dst, &x) in query.iter_mut().zip(q_row) {
                *dst = if scoring.half_rounding { round_half(x) } else { x };
            }
            scores.clear();
            for p in keys.clone() {
                let key = &k[ranges.slot(seq, p) * kv_width + offset..][..hd];
                let dot: f32 = query.iter().zip(key).fold(0.0, |acc, (&a, &b)| acc + a * b.to_f32());
                let mut score = dot * scoring.scale;
                if let Some(cap) = scoring.softcap {
                    score = cap * (score / cap).tanh();
                }
                scores.push(score);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|&x| (x - max).exp()).sum();
            let out_row = &mut out[(row * s.heads + head) * hd..][..hd];
            for (p, &score) in keys.clone().zip(&scores) {
                let mut prob = (score - max).exp() / sum;
                if scoring.half_rounding {
                    prob = round_half(prob);
                }
                let value = &v[ranges.slot(seq, p) * kv_width + offset..][..hd];
                for (o, &x) in out_row.iter_mut().zip(value) {
                    *o += prob * x.to_f32();
                }
            }
        }
    }
    Ok(out)
}

/// Row `r` of `src` (`width` values) into slot `slots[r]` of `cache`, converted to the
/// cache's type.
pub fn write_cache<T: CacheValue>(cache: &mut [T], width: usize, src: &[f32], slots: &CacheSlots) -> Result<()> {
    check_write(cache.len(), width, src.len(), slots)?;
    for (row, &slot) in src.chunks_exact(width).zip(slots.slots()) {
        for (dst, &x) in cache[slot as usize * width..][..width].iter_mut().zip(row) {
            *dst = T::from_f32(x);
        }
    }
    Ok(())
}
