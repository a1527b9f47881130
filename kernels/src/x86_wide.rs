//! 512-bit versions of attention helpers in `x86`, for CPUs with AVX-512. Each lane does
//! exactly the arithmetic of the corresponding lane of the 256-bit code, so results are
//! identical; there are just half as many instructions.
//!
//! # Safety
//! Every function here requires AVX-512 F with AVX2, FMA and F16C, and pointers valid for
//! the lengths given.

#![allow(unsafe_op_in_unsafe_fn, clippy::missing_safety_doc)]

use std::arch::x86_64::*;

/// `x86::axpy_f16`: `acc = fma(w, v, acc)` (or `fma(w, v, 0)` with `start`), `v` in half
/// precision.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub unsafe fn axpy_f16(acc: &mut [f32], w: f32, v: &[u16], start: bool) {
    let n = acc.len().min(v.len());
    let wv = _mm512_set1_ps(w);
    let mut i = 0;
    while i + 16 <= n {
        let a = if start { _mm512_setzero_ps() } else { _mm512_loadu_ps(acc.as_ptr().add(i)) };
        let x = _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i) as *const __m256i));
        _mm512_storeu_ps(acc.as_mut_ptr().add(i), _mm512_fmadd_ps(wv, x, a));
        i += 16;
    }
    if i < n {
        crate::x86::axpy_f16(&mut acc[i..n], w, &v[i..n], start);
    }
}

/// `x86::fold64`: four 16-lane accumulators over the first `n & !63` products of `x` and
/// `y` (half precision), folded `(a0 + a2) + (a1 + a3)`, returned as lanes 0-7 and 8-15.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub unsafe fn fold64(x: *const f32, y: *const u16, n: usize) -> (__m256, __m256) {
    fold64_queries(&[x], y, n)[0]
}

/// `fold64` for `Q` queries against the same `y`: each chunk of `y` is widened once and used
/// by every query, whose lanes get exactly the arithmetic of the single-query fold.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn fold64_queries<const Q: usize>(xs: &[*const f32; Q], y: *const u16, n: usize) -> [(__m256, __m256); Q] {
    let halves = |s: __m512| (_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    if (64..128).contains(&n) {
        // One product per lane: `a0 + a2` and `a1 + a3` as fused multiply-adds of exact
        // products of half-precision values, as in `x86::fold64_once_queries`.
        let ys: [__m512; 4] = std::array::from_fn(|c| _mm512_cvtph_ps(_mm256_loadu_si256(y.add(16 * c) as *const __m256i)));
        return xs.map(|x| {
            let pair = |c: usize| _mm512_fmadd_ps(_mm512_loadu_ps(x.add(16 * (c + 2))), ys[c + 2], _mm512_mul_ps(_mm512_loadu_ps(x.add(16 * c)), ys[c]));
            halves(_mm512_add_ps(pair(0), pair(1)))
        });
    }
    let mut acc = [[_mm512_setzero_ps(); 4]; Q];
    let mut i = 0;
    while i + 64 <= n {
        for c in 0..4 {
            let yv = _mm512_cvtph_ps(_mm256_loadu_si256(y.add(i + 16 * c) as *const __m256i));
            for (a, &x) in acc.iter_mut().zip(xs) {
                a[c] = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(i + 16 * c)), yv, a[c]);
            }
        }
        i += 64;
    }
    acc.map(|a| halves(_mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]))))
}

/// `x86::dot8_f32_f16_ordered` for `Q` queries against the same eight keys: each key chunk
/// is widened once and used by every query, and each query's lanes get exactly the
/// arithmetic of the single-query kernel.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub unsafe fn dot8_queries<const Q: usize>(xs: &[*const f32; Q], keys: &[*const u16; 8], n: usize) -> [[f32; 8]; Q] {
    let mut folded = [[_mm256_setzero_ps(); 8]; Q];
    for (k, &key) in keys.iter().enumerate() {
        for (f, (lo, hi)) in folded.iter_mut().zip(fold64_queries(xs, key, n)) {
            // tree16's first step: lanes 8..16 onto lanes 0..8.
            f[k] = _mm256_add_ps(hi, lo);
        }
    }
    folded.map(|f| crate::x86::finish_tree16x8(f))
}

/// Dimensions `dim..dim + 64` of `Σ fma(w[j], values[at[j]..], acc)` over keys `j = j0, j0 +
/// 64, ...` in that order, starting from zero, for `Q` queries sharing the same values (one
/// weight vector `w` per query, each as long as `at`): each value chunk is widened once;
/// `outs[q]` receives 64 floats (zeros when there is no key).
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub unsafe fn bucket_sum_queries<const Q: usize>(ws: &[&[f32]; Q], at: &[usize], j0: usize, values: &[u16], dim: usize, outs: [*mut f32; Q]) {
    let mut acc = [[_mm512_setzero_ps(); 4]; Q];
    let mut j = j0;
    while j < at.len() {
        let v = values[at[j] + dim..at[j] + dim + 64].as_ptr();
        let x: [__m512; 4] = std::array::from_fn(|c| _mm512_cvtph_ps(_mm256_loadu_si256(v.add(16 * c) as *const __m256i)));
        for (a, w) in acc.iter_mut().zip(ws) {
            let wv = _mm512_set1_ps(w[j]);
            for c in 0..4 {
                a[c] = _mm512_fmadd_ps(wv, x[c], a[c]);
            }
        }
        j += 64;
    }
    for (a, &o) in acc.iter().zip(&outs) {
        for (c, v) in a.iter().enumerate() {
            _mm512_storeu_ps(o.add(16 * c), *v);
        }
    }
}

/// `activation::quantize_q8k` for one super-block: the first value of largest magnitude
/// sets the scale, quants are rounded half to even, sums taken per 16. Returns d, or None
/// (writing nothing) when the block holds a NaN, which the scalar code handles.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn q8k_block(x: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> Option<f32> {
    let v: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(x.as_ptr().add(16 * k)));
    let mut amax = _mm512_setzero_ps();
    let mut nan = 0u16;
    for &r in &v {
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(r, r);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(r));
    }
    if nan != 0 {
        return None;
    }
    let amax = _mm512_reduce_max_ps(amax);
    if amax == 0.0 {
        qs.fill(0);
        bsums.fill(0);
        return Some(0.0);
    }
    // The first value whose magnitude is the largest, as the scalar scan finds it.
    let target = _mm512_set1_ps(amax);
    let mut max = 0.0f32;
    for (k, &r) in v.iter().enumerate() {
        let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(r), target);
        if hit != 0 {
            max = x[16 * k + hit.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127.0 / max;
    let s = _mm512_set1_ps(iscale);
    for (k, &r) in v.iter().enumerate() {
        let q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(s, r)), _mm512_set1_epi32(127));
        _mm_storeu_si128(qs.as_mut_ptr().add(16 * k) as *mut __m128i, _mm512_cvtepi32_epi8(q));
        bsums[k] = _mm512_reduce_add_epi32(q) as i16;
    }
    Some(1.0 / iscale)
}

/// `activation::q8_block` for 32 values: scale from the largest magnitude, quants rounded
/// half to even. Returns d, or None (writing nothing) when a value is NaN.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn q8_block(x: &[f32], qs: &mut [i8; 32]) -> Option<f32> {
    let (a, b) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
    if _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b) != 0 {
        return None;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(qs.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(qs.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(qb));
    Some(d)
}
