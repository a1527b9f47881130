//! Attention of every query of a sequence to all of its keys (no mask, no cache): what
//! encoders over whole inputs compute (vision towers over thousands of patches, BERT).
//!
//! Per head, keys are transposed once so that scores come from a register tile of 4 queries
//! by 32 keys accumulating over the head dimension (no horizontal sums), and the weighted
//! values from a tile of 4 queries by 16 value dimensions accumulating over the keys
//! (AVX-512 registers; AVX2 holds half of either tile per register set, and `tile_body` is
//! the portable form). Every form sums in the same order, so their results are identical.

use crate::pool::SharedMut;
use crate::{Compute, Isa};
use std::ops::Range;

/// Queries per tile.
const QT: usize = 4;
/// Keys per score tile.
const KT: usize = 32;
/// Value dimensions per output tile.
const DT: usize = 16;

/// The shape of one attention call: `heads` heads of `head_dim` values per row, scores scaled
/// by `scale` before the softmax.
#[derive(Clone, Copy, Debug)]
pub struct DenseShape {
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// `out[r] = softmax(q[r]·k[s]ᵀ · scale) v[s]` per head, `s` ranging over the rows of the
/// sequence holding `r`. `q`, `k`, `v` and `out` are `[rows, heads * head_dim]`; `seqs` are
/// the sequences' row ranges, in order, not overlapping, within the rows. A row's result
/// depends only on its own sequence (tiles start at each sequence's first row).
pub fn dense_attention(compute: &Compute, q: &[f32], k: &[f32], v: &[f32], seqs: &[Range<usize>], shape: DenseShape, out: &mut [f32]) {
    let (heads, d) = (shape.heads, shape.head_dim);
    let width = heads * d;
    let rows = seqs.last().map_or(0, |s| s.end);
    assert!(q.len() >= rows * width && k.len() >= rows * width && v.len() >= rows * width && out.len() >= rows * width, "attention inputs shorter than their rows");
    assert!(seqs.windows(2).all(|w| w[0].end <= w[1].start) && seqs.iter().all(|s| s.start <= s.end), "sequences overlap or run backwards");
    // Keys transposed per (sequence, head): `[head_dim, padded len]`, zero past the sequence.
    let padded: Vec<usize> = seqs.iter().map(|s| s.len().div_ceil(KT) * KT).collect();
    let mut offsets = Vec::with_capacity(seqs.len() * heads);
    let mut total = 0;
    for &p in &padded {
        for _ in 0..heads {
            offsets.push(total);
            total += p * d;
        }
    }
    let mut kt = vec![0.0f32; total];
    for (si, s) in seqs.iter().enumerate() {
        for h in 0..heads {
            let base = offsets[si * heads + h];
            for (i, r) in s.clone().enumerate() {
                for j in 0..d {
                    kt[base + j * padded[si] + i] = k[r * width + h * d + j];
                }
            }
        }
    }
    // Work items: (sequence, head, tile of up to 4 queries).
    let mut items = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for h in 0..heads {
            let mut r = s.start;
            while r < s.end {
                items.push((si, h, r..(r + QT).min(s.end)));
                r += QT;
            }
        }
    }
    let dst = SharedMut::new(out);
    let isa = compute.isa;
    compute.pool.for_ranges(items.len(), 1, &|range| {
        let mut scores = Vec::new();
        for (si, h, tile) in &items[range] {
            let s = &seqs[*si];
            let task = Task { kt: &kt[offsets[si * heads + h]..], padded: padded[*si], len: s.len(), keys: s.start, q, v, width, col: h * d, d, scale: shape.scale };
            scores.resize(QT * task.padded, 0.0);
            // SAFETY: each (row, head) pair of `out` belongs to exactly one work item.
            let outs: Vec<&mut [f32]> = tile.clone().map(|r| unsafe { dst.slice(r * width + h * d..r * width + (h + 1) * d) }).collect();
            run(isa, &task, tile.clone(), &mut scores, outs);
        }
    });
}

/// One (sequence, head): its transposed keys, where its rows are, and the head's columns.
struct Task<'a> {
    kt: &'a [f32],
    padded: usize,
    len: usize,
    /// First row of the sequence.
    keys: usize,
    q: &'a [f32],
    v: &'a [f32],
    width: usize,
    col: usize,
    d: usize,
    scale: f32,
}

impl Task<'_> {
    /// The queries of `tile`, scaled, `[head_dim][4]` (missing queries zero).
    fn queries(&self, tile: &Range<usize>) -> Vec<[f32; QT]> {
        let mut qs = vec![[0.0f32; QT]; self.d];
        for (i, r) in tile.clone().enumerate() {
            for (j, slot) in qs.iter_mut().enumerate() {
                slot[i] = self.q[r * self.width + self.col + j] * self.scale;
            }
        }
        qs
    }
}

fn run(isa: Isa, t: &Task, tile: Range<usize>, scores: &mut [f32], outs: Vec<&mut [f32]>) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa.vnni() {
            // SAFETY: AVX-512 F/VL are part of the VNNI level `Isa` detected.
            return unsafe { tile_avx512(t, tile, scores, outs) };
        }
        if isa.avx2() {
            // SAFETY: AVX2 and FMA are part of the level `Isa` detected.
            return unsafe { tile_avx2(t, tile, scores, outs) };
        }
    }
    let _ = isa;
    tile_body(t, tile, scores, outs)
}

/// The AVX-512 tiles: 4 queries x 32 keys in 8 registers for the scores, 4 queries x 16
/// value dimensions in 4 registers for the weighted values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tile_avx512(t: &Task, tile: Range<usize>, scores: &mut [f32], mut outs: Vec<&mut [f32]>) {
    use std::arch::x86_64::*;
    let (d, n, p) = (t.d, t.len, t.padded);
    let nq = tile.len();
    let qs = t.queries(&tile);
    assert!(t.kt.len() >= d * p && scores.len() >= QT * p, "tile buffers too short");
    for kb in (0..p).step_by(KT) {
        // SAFETY: kt holds d rows of p >= kb + 32 values; scores holds 4 rows of p.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 2 * QT];
            for (j, qj) in qs.iter().enumerate() {
                let row = t.kt.as_ptr().add(j * p + kb);
                let (k0, k1) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)));
                for i in 0..QT {
                    let a = _mm512_set1_ps(qj[i]);
                    acc[2 * i] = _mm512_fmadd_ps(a, k0, acc[2 * i]);
                    acc[2 * i + 1] = _mm512_fmadd_ps(a, k1, acc[2 * i + 1]);
                }
            }
            for i in 0..QT {
                let dst = scores.as_mut_ptr().add(i * p + kb);
                _mm512_storeu_ps(dst, acc[2 * i]);
                _mm512_storeu_ps(dst.add(16), acc[2 * i + 1]);
            }
        }
    }
    // SAFETY: AVX2 and FMA come with both vector tiles' instruction sets.
    unsafe { softmax_rows_x86(scores, nq, n, p) };
    // Weighted values: up to 5 tiles of 16 dimensions (80) in one pass over the keys, so each
    // probability is broadcast once for all of them.
    let mut col = 0;
    while col < d {
        let tiles = (d - col).div_ceil(DT).min(5);
        let w = (d - col).min(tiles * DT);
        // SAFETY: each value row holds `width` >= col + w values past the head's start (the
        // masked loads read only those); scores holds 4 rows of p >= n; AVX-512 is enabled.
        unsafe {
            match tiles {
                1 => weigh_values::<1>(t, col, w, scores, nq, &mut outs),
                2 => weigh_values::<2>(t, col, w, scores, nq, &mut outs),
                3 => weigh_values::<3>(t, col, w, scores, nq, &mut outs),
                4 => weigh_values::<4>(t, col, w, scores, nq, &mut outs),
                _ => weigh_values::<5>(t, col, w, scores, nq, &mut outs),
            }
        }
        col += w;
    }
}

/// `out[i][col..col + w] = Σ_key p[i][key] v[key][col..col + w]` for `T` tiles of 16
/// dimensions (`w <= 16 T`), every probability broadcast once for all tiles.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weigh_values<const T: usize>(t: &Task, col: usize, w: usize, scores: &[f32], nq: usize, outs: &mut [&mut [f32]]) {
    use std::arch::x86_64::*;
    let p = t.padded;
    let masks: [__mmask16; T] = std::array::from_fn(|ti| {
        let left = w.saturating_sub(ti * DT).min(DT);
        if left == DT { 0xffff } else { ((1u32 << left) - 1) as u16 }
    });
    // SAFETY: as the caller promises.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); T]; QT];
        for key in 0..t.len {
            let row = t.v.as_ptr().add((t.keys + key) * t.width + t.col + col);
            let vals: [__m512; T] = std::array::from_fn(|ti| _mm512_maskz_loadu_ps(masks[ti], row.add(ti * DT)));
            for (i, a) in acc.iter_mut().enumerate() {
                let pk = _mm512_set1_ps(if i < nq { *scores.get_unchecked(i * p + key) } else { 0.0 });
                for ti in 0..T {
                    a[ti] = _mm512_fmadd_ps(pk, vals[ti], a[ti]);
                }
            }
        }
        for (i, o) in outs.iter_mut().enumerate() {
            let mut lanes = [0.0f32; 5 * DT];
            for (ti, tile) in acc[i].iter().enumerate() {
                _mm512_storeu_ps(lanes.as_mut_ptr().add(ti * DT), *tile);
            }
            o[col..col + w].copy_from_slice(&lanes[..w]);
        }
    }
}

/// Softmax over the first `n` (real) keys of each of `nq` score rows of stride `p`:
/// exponentials by `numerics::exp_poly`, key `i` summed into lane `i % 16` in key order and the
/// lanes folded by `tree16`, each value then multiplied by the sum's reciprocal. The vector
/// form (`softmax_rows_x86`) computes the same operations, so every ISA gets the same bits.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], nq: usize, n: usize, p: usize) {
    use crate::numerics::{exp_poly, tree16};
    for i in 0..nq {
        let row = &mut scores[i * p..i * p + n];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut lanes = [0.0f32; 16];
        for (key, v) in row.iter_mut().enumerate() {
            *v = exp_poly(*v - max);
            lanes[key % 16] += *v;
        }
        let inv = 1.0 / tree16(&lanes);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `softmax_rows` sixteen keys at a time (two eight-lane halves, for AVX2 and AVX-512 tiles
/// alike: the exponentials, not the width, are the cost).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_rows_x86(scores: &mut [f32], nq: usize, n: usize, p: usize) {
    use crate::numerics::{exp_poly, tree16};
    use crate::x86::exp_poly8;
    use std::arch::x86_64::*;
    let whole = n & !15;
    for i in 0..nq {
        let row = &mut scores[i * p..i * p + n];
        // The maximum does not depend on the order of comparisons (`max_ps` keeps the running
        // value when a score is NaN, as `f32::max` does).
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in (0..whole).step_by(8) {
            m = _mm256_max_ps(_mm256_loadu_ps(row.as_ptr().add(c)), m);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let max = lanes.iter().chain(&row[whole..]).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let shift = _mm256_set1_ps(max);
        for c in (0..whole).step_by(16) {
            let at = row.as_mut_ptr().add(c);
            let e0 = exp_poly8(_mm256_sub_ps(_mm256_loadu_ps(at), shift));
            let e1 = exp_poly8(_mm256_sub_ps(_mm256_loadu_ps(at.add(8)), shift));
            _mm256_storeu_ps(at, e0);
            _mm256_storeu_ps(at.add(8), e1);
            lo = _mm256_add_ps(lo, e0);
            hi = _mm256_add_ps(hi, e1);
        }
        let mut sums = [0.0f32; 16];
        _mm256_storeu_ps(sums.as_mut_ptr(), lo);
        _mm256_storeu_ps(sums.as_mut_ptr().add(8), hi);
        for (key, v) in row.iter_mut().enumerate().skip(whole) {
            *v = exp_poly(*v - max);
            sums[key % 16] += *v;
        }
        let inv = 1.0 / tree16(&sums);
        let inv8 = _mm256_set1_ps(inv);
        for c in (0..whole).step_by(8) {
            let at = row.as_mut_ptr().add(c);
            _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), inv8));
        }
        for v in &mut row[whole..] {
            *v *= inv;
        }
    }
}

/// The AVX2 tiles: 4 queries x 16 keys in 8 registers for the scores (twice per 32 keys),
/// 4 queries x 8 value dimensions per register, up to 3 registers per query, for the weighted
/// values. Sums run in the order of `tile_body`, so the results are its bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(t: &Task, tile: Range<usize>, scores: &mut [f32], mut outs: Vec<&mut [f32]>) {
    use std::arch::x86_64::*;
    let (d, n, p) = (t.d, t.len, t.padded);
    let nq = tile.len();
    let qs = t.queries(&tile);
    assert!(t.kt.len() >= d * p && scores.len() >= QT * p, "tile buffers too short");
    for kb in (0..p).step_by(KT / 2) {
        // SAFETY: kt holds d rows of p >= kb + 16 values (p is a multiple of 32); scores holds
        // 4 rows of p.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 2 * QT];
            for (j, qj) in qs.iter().enumerate() {
                let row = t.kt.as_ptr().add(j * p + kb);
                let (k0, k1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                for i in 0..QT {
                    let a = _mm256_set1_ps(qj[i]);
                    acc[2 * i] = _mm256_fmadd_ps(a, k0, acc[2 * i]);
                    acc[2 * i + 1] = _mm256_fmadd_ps(a, k1, acc[2 * i + 1]);
                }
            }
            for i in 0..QT {
                let dst = scores.as_mut_ptr().add(i * p + kb);
                _mm256_storeu_ps(dst, acc[2 * i]);
                _mm256_storeu_ps(dst.add(8), acc[2 * i + 1]);
            }
        }
    }
    // SAFETY: AVX2 and FMA are enabled in this function.
    unsafe { softmax_rows_x86(scores, nq, n, p) };
    let mut col = 0;
    while col < d {
        let tiles = (d - col).div_ceil(8).min(3);
        let w = (d - col).min(tiles * 8);
        // SAFETY: each value row holds `width` >= col + w values past the head's start (the
        // masked loads read only those); scores holds 4 rows of p >= n; AVX2 is enabled.
        unsafe {
            match tiles {
                1 => weigh_values_avx2::<1>(t, col, w, scores, nq, &mut outs),
                2 => weigh_values_avx2::<2>(t, col, w, scores, nq, &mut outs),
                _ => weigh_values_avx2::<3>(t, col, w, scores, nq, &mut outs),
            }
        }
        col += w;
    }
}

/// `weigh_values` with `T` registers of 8 dimensions (`w <= 8 T`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weigh_values_avx2<const T: usize>(t: &Task, col: usize, w: usize, scores: &[f32], nq: usize, outs: &mut [&mut [f32]]) {
    use std::arch::x86_64::*;
    let p = t.padded;
    // SAFETY: as the caller promises.
    unsafe {
        let masks: [__m256i; T] = std::array::from_fn(|ti| {
            let left = w.saturating_sub(ti * 8).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        });
        let mut acc = [[_mm256_setzero_ps(); T]; QT];
        for key in 0..t.len {
            let row = t.v.as_ptr().add((t.keys + key) * t.width + t.col + col);
            let vals: [__m256; T] = std::array::from_fn(|ti| _mm256_maskload_ps(row.add(ti * 8), masks[ti]));
            for (i, a) in acc.iter_mut().enumerate() {
                let pk = _mm256_set1_ps(if i < nq { *scores.get_unchecked(i * p + key) } else { 0.0 });
                for ti in 0..T {
                    a[ti] = _mm256_fmadd_ps(pk, vals[ti], a[ti]);
                }
            }
        }
        for (i, o) in outs.iter_mut().enumerate() {
            let mut lanes = [0.0f32; 3 * 8];
            for (ti, tile) in acc[i].iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(ti * 8), *tile);
            }
            o[col..col + w].copy_from_slice(&lanes[..w]);
        }
    }
}

/// Scores, softmax and weighted values of up to 4 queries; `scores` is `[4, padded]`.
#[inline(always)]
fn tile_body(t: &Task, tile: Range<usize>, scores: &mut [f32], mut outs: Vec<&mut [f32]>) {
    let (d, n, p) = (t.d, t.len, t.padded);
    let nq = tile.len();
    let qs = t.queries(&tile);
    for kb in (0..p).step_by(KT) {
        let mut acc = [[0.0f32; KT]; QT];
        for (j, qj) in qs.iter().enumerate() {
            let krow: &[f32; KT] = t.kt[j * p + kb..j * p + kb + KT].try_into().expect("tile of KT keys");
            for i in 0..QT {
                let a = qj[i];
                for x in 0..KT {
                    acc[i][x] = a.mul_add(krow[x], acc[i][x]);
                }
            }
        }
        for i in 0..QT {
            scores[i * p + kb..i * p + kb + KT].copy_from_slice(&acc[i]);
        }
    }
    // Softmax over the real keys of each query (padding is never read).
    softmax_rows(scores, nq, n, p);
    // Weighted values, 16 dimensions at a time (a shorter last tile).
    let mut col = 0;
    while col < d {
        let w = (d - col).min(DT);
        let mut acc = [[0.0f32; DT]; QT];
        for key in 0..n {
            let vrow = &t.v[(t.keys + key) * t.width + t.col + col..];
            let mut vals = [0.0f32; DT];
            vals[..w].copy_from_slice(&vrow[..w]);
            for i in 0..QT {
                let pk = if i < nq { scores[i * p + key] } else { 0.0 };
                for x in 0..DT {
                    acc[i][x] = pk.mul_add(vals[x], acc[i][x]);
                }
            }
        }
        for (i, o) in outs.iter_mut().enumerate() {
            o[col..col + w].copy_from_slice(&acc[i][..w]);
        }
        col += w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention in f64, one (row, head) at a time.
    fn reference(q: &[f32], k: &[f32], v: &[f32], seqs: &[Range<usize>], shape: DenseShape) -> Vec<f32> {
        let (h, d) = (shape.heads, shape.head_dim);
        let width = h * d;
        let mut out = vec![0.0f32; q.len()];
        for s in seqs {
            for r in s.clone() {
                for head in 0..h {
                    let col = head * d;
                    let scores: Vec<f64> = s.clone().map(|c| (0..d).map(|j| f64::from(q[r * width + col + j]) * f64::from(k[c * width + col + j])).sum::<f64>() * f64::from(shape.scale)).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for j in 0..d {
                        let o: f64 = s.clone().zip(&e).map(|(c, w)| w / sum * f64::from(v[c * width + col + j])).sum();
                        out[r * width + col + j] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_isa_matches_the_reference_and_sequences_stay_apart() {
        // Head sizes that fill, and fall short of, the 16-value tiles; sequences that are not
        // multiples of 4 queries or 32 keys.
        for (heads, d) in [(2, 72), (3, 16), (1, 80), (2, 8)] {
            let shape = DenseShape { heads, head_dim: d, scale: 1.0 / (d as f32).sqrt() };
            let width = heads * d;
            let seqs = [0..37, 37..38, 38..105];
            let rows = 105;
            let val = |i: usize, salt: usize| (((i * 2654435761 + salt) % 1000) as f32 / 500.0 - 1.0) * 1.5;
            let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) =
                ((0..rows * width).map(|i| val(i, 1)).collect(), (0..rows * width).map(|i| val(i, 7)).collect(), (0..rows * width).map(|i| val(i, 13)).collect());
            let want = reference(&q, &k, &v, &seqs, shape);
            let mut first: Option<(Isa, Vec<f32>)> = None;
            for isa in Isa::available() {
                let compute = Compute { pool: crate::pool::ThreadPool::new(2), isa };
                let mut out = vec![0.0f32; rows * width];
                dense_attention(&compute, &q, &k, &v, &seqs, shape, &mut out);
                let worst = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 2e-5, "{isa:?}, {heads}x{d}: differs from the reference by {worst}");
                // The last sequence alone gives the same bits.
                let mut alone = vec![0.0f32; 67 * width];
                dense_attention(&compute, &q[38 * width..], &k[38 * width..], &v[38 * width..], std::slice::from_ref(&(0..67)), shape, &mut alone);
                assert_eq!(&out[38 * width..], &alone[..], "{isa:?}: a sequence's result depends on its neighbours");
                // Every instruction set sums in the same order.
                match &first {
                    Some((other, bits)) => assert!(out == *bits, "{isa:?} and {other:?} differ, {heads}x{d}"),
                    None => first = Some((isa, out)),
                }
            }
        }
    }
}
