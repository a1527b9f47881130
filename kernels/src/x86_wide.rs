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
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let yv = _mm512_cvtph_ps(_mm256_loadu_si256(y.add(i + 16 * k) as *const __m256i));
            *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(i + 16 * k)), yv, *a);
        }
        i += 64;
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
    (_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)))
}

/// Dimensions `dim..dim + 64` of `Σ fma(w[j], values[at[j]..], acc)` over keys `j = j0, j0 + 64,
/// ...` in that order, starting from zero, written to `out` (zeros when there is no key).
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub unsafe fn bucket_sum(w: &[f32], at: &[usize], j0: usize, values: &[u16], dim: usize, out: &mut [f32]) {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut j = j0;
    while j < w.len() {
        let wv = _mm512_set1_ps(w[j]);
        let v = values[at[j] + dim..at[j] + dim + 64].as_ptr();
        for (k, a) in acc.iter_mut().enumerate() {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(16 * k) as *const __m256i));
            *a = _mm512_fmadd_ps(wv, x, *a);
        }
        j += 64;
    }
    for (k, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out[16 * k..16 * k + 16].as_mut_ptr(), *a);
    }
}
