//! AVX2 dot products, compiled twice: once with plain AVX2 byte multiplies and once with the
//! AVX-512 VNNI `vpdpbusd` instruction on 256-bit registers. Which copy runs is decided at
//! start-up from the CPU's features (see `dot::best`).
//!
//! Every kernel returns the same value as `dot_ref::dot` up to f32 summation order.

//!
//! # Safety
//! Every function here requires the CPU features named in its `target_feature` attribute
//! (callers choose them through `Isa::detect`), and pointer arguments valid for the number of
//! values given, in the formats the function's name says.

#![allow(unsafe_op_in_unsafe_fn, clippy::missing_safety_doc)]

use crate::blocks::*;
use crate::dot::ActScales;
use crate::dtype::QK_K;
use std::arch::x86_64::*;

/// Scales of block `i` of the N rows (N = 4 or 8) described by an `ActScales` table.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales_at<const N: usize>(base: *const f32, stride: usize, i: usize) -> __m256 {
    let lo = _mm_loadu_ps(base.add(4 * i));
    if N == 8 {
        _mm256_set_m128(_mm_loadu_ps(base.add(stride + 4 * i)), lo)
    } else {
        _mm256_castps128_ps256(lo)
    }
}

/// Lane `t` of `v` in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane(v: __m256, t: usize) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(t as i32))
}

/// Half to single precision with F16C, inlined into the kernels (same value as
/// `blocks::f16_bits_to_f32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn h2f(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// How a K-quant kernel without its own SIMD unpacking adds up a row, after the llama.cpp
/// kernel it follows.
#[derive(Clone, Copy)]
enum KOrder {
    /// ggml's single-row kernels: eight lanes, one multiply-add per super-block; minima
    /// summed in scalar code and subtracted at the end.
    Lanes,
    /// ggml's single-row Q2_K: the minima's eight lanes, then the products', in one accumulator.
    MinLanesFirst,
    /// ggml's 8-row interleaved kernels: whole super-block sums, minima apart.
    Interleaved,
}

macro_rules! x86_kernels {
    ($name:ident, $features:literal, $us8_dot:ident) => {
        pub mod $name {
            use super::*;

            /// u8 × i8 products summed in groups of four into eight i32 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn us8(ax: __m256i, sy: __m256i) -> __m256i {
                $us8_dot(ax, sy)
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn is8(x: __m256i, y: __m256i) -> __m256i {
                us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load(p: *const i8) -> __m256i {
                _mm256_loadu_si256(p as *const __m256i)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q4_0(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ4_0, a as *const BlockQ8_0);
                let mut acc = _mm256_setzero_ps();
                let eight = _mm256_set1_epi8(8);
                for i in 0..n / 32 {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let q = _mm256_sub_epi8(nibbles(x.qs.as_ptr()), eight);
                    let d = h2f(x.d) * h2f(y.d);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(is8(q, load(y.qs.as_ptr()))), acc);
                }
                hsum_f32(acc)
            }

            /// Q4_0 rows in the order of ggml's 8-row interleaved kernels, which llama.cpp
            /// uses on AVX2 machines for matrices whose row count is a multiple of 8: each
            /// block's integer sum scaled and accumulated on its own.
            #[target_feature(enable = $features)]
            pub unsafe fn q4_0_interleaved(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ4_0, a as *const BlockQ8_0);
                let eight = _mm256_set1_epi8(8);
                let mut acc = 0.0f32;
                for i in 0..n / 32 {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let q = _mm256_sub_epi8(nibbles(x.qs.as_ptr()), eight);
                    let total = hsum_i32(is8(q, load(y.qs.as_ptr())));
                    acc = (total as f32).mul_add(h2f(x.d) * h2f(y.d), acc);
                }
                acc
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q4_1(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ4_1, a as *const BlockQ8_1);
                let mut acc = _mm256_setzero_ps();
                let mut offsets = 0.0f32;
                for i in 0..n / 32 {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let d = h2f(x.d) * h2f(y.d);
                    offsets += h2f(x.m) * h2f(y.s);
                    let p = us8(nibbles(x.qs.as_ptr()), load(y.qs.as_ptr()));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
                }
                hsum_f32(acc) + offsets
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q5_0(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ5_0, a as *const BlockQ8_0);
                let mut acc = _mm256_setzero_ps();
                let sixteen = _mm256_set1_epi8(16);
                for i in 0..n / 32 {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let high = _mm256_and_si256(bytes_from_bits(u32::from_le_bytes(x.qh)), sixteen);
                    let q = _mm256_sub_epi8(_mm256_or_si256(nibbles(x.qs.as_ptr()), high), sixteen);
                    let d = h2f(x.d) * h2f(y.d);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(is8(q, load(y.qs.as_ptr()))), acc);
                }
                hsum_f32(acc)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q5_1(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ5_1, a as *const BlockQ8_1);
                let mut acc = _mm256_setzero_ps();
                let mut offsets = 0.0f32;
                let sixteen = _mm256_set1_epi8(16);
                for i in 0..n / 32 {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let high = _mm256_and_si256(bytes_from_bits(u32::from_le_bytes(x.qh)), sixteen);
                    let q = _mm256_or_si256(nibbles(x.qs.as_ptr()), high);
                    let d = h2f(x.d) * h2f(y.d);
                    offsets += h2f(x.m) * h2f(y.s);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(us8(q, load(y.qs.as_ptr()))), acc);
                }
                hsum_f32(acc) + offsets
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q8_0(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ8_0, a as *const BlockQ8_0);
                let mut acc = _mm256_setzero_ps();
                for i in 0..n / 32 {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let d = h2f(x.d) * h2f(y.d);
                    let p = is8(load(x.qs.as_ptr()), load(y.qs.as_ptr()));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
                }
                hsum_f32(acc)
            }

            /// Scales for two consecutive 16-value sub-blocks, one per half of a 32-byte vector.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn pair_scales(lo: i32, hi: i32) -> __m256i {
                _mm256_set_m128i(_mm_set1_epi32(hi), _mm_set1_epi32(lo))
            }

            /// Integer sums of one Q4_K super-block: eight lanes of scaled products, and the
            /// four pairwise sums of (min x activation block sum).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn q4k_block(x: &BlockQ4K, y: &BlockQ8K) -> (__m256i, [i32; 4]) {
                let low_mask = _mm256_set1_epi8(0xF);
                let mut sumi = _mm256_setzero_si256();
                let mut mins = [0i32; 4];
                for c in 0..4 {
                    let (sc_lo, m_lo) = k4_scale_min(2 * c, &x.scales);
                    let (sc_hi, m_hi) = k4_scale_min(2 * c + 1, &x.scales);
                    mins[c] = m_lo as i32 * (y.bsums[4 * c] as i32 + y.bsums[4 * c + 1] as i32)
                        + m_hi as i32 * (y.bsums[4 * c + 2] as i32 + y.bsums[4 * c + 3] as i32);
                    let q = _mm256_loadu_si256(x.qs.as_ptr().add(32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(q, low_mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low_mask);
                    let p_lo = us8(lo, load(y.qs.as_ptr().add(64 * c)));
                    let p_hi = us8(hi, load(y.qs.as_ptr().add(64 * c + 32)));
                    sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p_lo, _mm256_set1_epi32(sc_lo as i32)));
                    sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p_hi, _mm256_set1_epi32(sc_hi as i32)));
                }
                (sumi, mins)
            }

            /// Q4_K rows summed as ggml's `vec_dot_q4_K_q8_K` sums them: block results in eight
            /// lanes, the minimums in four lanes, each folded at the end.
            #[target_feature(enable = $features)]
            pub unsafe fn q4k(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ4K, a as *const BlockQ8K);
                let mut acc = _mm256_setzero_ps();
                let mut acc_m = _mm_setzero_ps();
                for i in 0..n / QK_K {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let (sumi, mins) = q4k_block(x, y);
                    let d = y.d * h2f(x.d);
                    let dmin = -y.d * h2f(x.dmin);
                    let prod = _mm_cvtepi32_ps(_mm_loadu_si128(mins.as_ptr() as *const __m128i));
                    acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), prod, acc_m);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
                }
                let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
                let m = _mm_add_ss(m, _mm_movehdup_ps(m));
                hsum_f32(acc) + _mm_cvtss_f32(m)
            }

            /// Q4_K rows summed in the order of ggml's 8-row interleaved kernels, which
            /// llama.cpp uses on AVX2 machines for matrices whose row count is a multiple of 8:
            /// whole-block integer sums scaled and accumulated one block at a time.
            #[target_feature(enable = $features)]
            pub unsafe fn q4k_interleaved(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ4K, a as *const BlockQ8K);
                let mut acc = 0.0f32;
                let mut acc_min = 0.0f32;
                for i in 0..n / QK_K {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let (sumi, mins) = q4k_block(x, y);
                    let total = hsum_i32(sumi);
                    let total_min: i32 = mins.iter().sum();
                    acc = (total as f32).mul_add(h2f(x.d) * y.d, acc);
                    acc_min = (total_min as f32).mul_add(h2f(x.dmin) * y.d, acc_min);
                }
                acc - acc_min
            }

            /// Q6_K as ggml sums it: the -32 offset of the stored quants is taken off the
            /// integer lanes (as 32 x scale x activation block sums) before scaling.
            #[target_feature(enable = $features)]
            pub unsafe fn q6k(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ6K, a as *const BlockQ8K);
                let mut acc = _mm256_setzero_ps();
                let low_mask = _mm256_set1_epi8(0xF);
                let two_bits = _mm256_set1_epi8(3);
                for i in 0..n / QK_K {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let mut sumi = _mm256_setzero_si256();
                    for h in 0..2 {
                        let ql0 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * h) as *const __m256i);
                        let ql1 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * h + 32) as *const __m256i);
                        let qh = _mm256_loadu_si256(x.qh.as_ptr().add(32 * h) as *const __m256i);
                        let high = [
                            _mm256_slli_epi16(_mm256_and_si256(qh, two_bits), 4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two_bits), 4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two_bits), 4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two_bits), 4),
                        ];
                        let quants = [
                            _mm256_or_si256(_mm256_and_si256(ql0, low_mask), high[0]),
                            _mm256_or_si256(_mm256_and_si256(ql1, low_mask), high[1]),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low_mask), high[2]),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low_mask), high[3]),
                        ];
                        for (k, q) in quants.into_iter().enumerate() {
                            let s = 8 * h + 2 * k;
                            let p = us8(q, load(y.qs.as_ptr().add(128 * h + 32 * k)));
                            let scales = pair_scales(x.scales[s] as i32, x.scales[s + 1] as i32);
                            sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, scales));
                        }
                    }
                    let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                    let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i));
                    let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5);
                    sumi = _mm256_sub_epi32(sumi, offset);
                    let d = y.d * h2f(x.d);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
                }
                hsum_f32(acc)
            }

            /// Eight lanes of one unpacked K-quant super-block against one activation block:
            /// quants `4l..4l + 4` of every 32 in lane `l`, times their 16-value scales.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn k_lanes(x: &crate::unpack::KBlock, y: &BlockQ8K) -> __m256i {
                let mut sumi = _mm256_setzero_si256();
                for s in (0..16).step_by(2) {
                    let p = is8(load(x.q.as_ptr().add(16 * s)), load(y.qs.as_ptr().add(16 * s)));
                    sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, pair_scales(x.scales[s], x.scales[s + 1])));
                }
                sumi
            }

            /// K-quants unpacked in scalar code against N activation rows, each super-block
            /// unpacked once for all of them; every row gets the arithmetic of `order`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn k_rows<B: Block, const N: usize>(w: *const u8, a: &[*const u8; N], n: usize, unpack: fn(&B) -> crate::unpack::KBlock, order: KOrder) -> [f32; N] {
                let w = w as *const B;
                let mut acc = [_mm256_setzero_ps(); N];
                let mut scalar = [(0.0f32, 0.0f32); N];
                for i in 0..n / QK_K {
                    let x = unpack(&*w.add(i));
                    for t in 0..N {
                        let y = &*(a[t] as *const BlockQ8K).add(i);
                        let sumi = k_lanes(&x, y);
                        let (acc, (total, mins)) = (&mut acc[t], &mut scalar[t]);
                        match order {
                            KOrder::Lanes => {
                                let summ: i32 = (0..16).map(|s| x.mins[s] * y.bsums[s] as i32).sum();
                                *acc = _mm256_fmadd_ps(_mm256_set1_ps(y.d * x.d), _mm256_cvtepi32_ps(sumi), *acc);
                                *mins += y.d * x.dmin * summ as f32;
                            }
                            KOrder::MinLanesFirst => {
                                let m: [i32; 8] = std::array::from_fn(|k| x.mins[2 * k] * y.bsums[2 * k] as i32 + x.mins[2 * k + 1] * y.bsums[2 * k + 1] as i32);
                                let m = _mm256_cvtepi32_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i));
                                *acc = _mm256_fmadd_ps(_mm256_set1_ps(-y.d * x.dmin), m, *acc);
                                *acc = _mm256_fmadd_ps(_mm256_set1_ps(y.d * x.d), _mm256_cvtepi32_ps(sumi), *acc);
                            }
                            KOrder::Interleaved => {
                                let summ: i32 = (0..16).map(|s| x.mins[s] * y.bsums[s] as i32).sum();
                                *total = (hsum_i32(sumi) as f32).mul_add(x.d * y.d, *total);
                                *mins = (summ as f32).mul_add(x.dmin * y.d, *mins);
                            }
                        }
                    }
                }
                std::array::from_fn(|t| match order {
                    KOrder::Lanes => hsum_f32(acc[t]) - scalar[t].1,
                    KOrder::MinLanesFirst => hsum_f32(acc[t]),
                    KOrder::Interleaved => scalar[t].0 - scalar[t].1,
                })
            }

            /// Q2_K as ggml's `vec_dot_q2_K_q8_K` sums it: per super-block, the minima's
            /// eight lanes (pairs of 16-value sums) and then the scaled products' eight lanes
            /// go into the same accumulator, each with one fused multiply-add.
            #[target_feature(enable = $features)]
            pub unsafe fn q2k(w: *const u8, a: *const u8, n: usize) -> f32 {
                k_rows::<BlockQ2K, 1>(w, &[a], n, crate::unpack::q2k, KOrder::MinLanesFirst)[0]
            }

            /// Q2_K rows in the order of ggml's 8-row interleaved Q2_K kernels, which
            /// llama.cpp uses on AVX-512 machines for matrices whose row count is a multiple
            /// of 8: whole super-block integer sums (products and minima apart), each scaled
            /// and accumulated on its own, the minima subtracted at the end.
            #[target_feature(enable = $features)]
            pub unsafe fn q2k_interleaved(w: *const u8, a: *const u8, n: usize) -> f32 {
                k_rows::<BlockQ2K, 1>(w, &[a], n, crate::unpack::q2k, KOrder::Interleaved)[0]
            }

            /// Q3_K as ggml sums it: eight lanes, one fused multiply-add per super-block.
            #[target_feature(enable = $features)]
            pub unsafe fn q3k(w: *const u8, a: *const u8, n: usize) -> f32 {
                k_rows::<BlockQ3K, 1>(w, &[a], n, crate::unpack::q3k, KOrder::Lanes)[0]
            }

            /// `q2k` for N activation rows.
            #[target_feature(enable = $features)]
            pub unsafe fn q2k_xn<const N: usize>(w: *const u8, a: &[*const u8; N], _sc: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                *out = k_rows::<BlockQ2K, N>(w, a, n, crate::unpack::q2k, KOrder::MinLanesFirst);
            }

            /// `q2k_interleaved` for N activation rows.
            #[target_feature(enable = $features)]
            pub unsafe fn q2k_interleaved_xn<const N: usize>(w: *const u8, a: &[*const u8; N], _sc: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                *out = k_rows::<BlockQ2K, N>(w, a, n, crate::unpack::q2k, KOrder::Interleaved);
            }

            /// `q3k` for N activation rows.
            #[target_feature(enable = $features)]
            pub unsafe fn q3k_xn<const N: usize>(w: *const u8, a: &[*const u8; N], _sc: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                *out = k_rows::<BlockQ3K, N>(w, a, n, crate::unpack::q3k, KOrder::Lanes);
            }

            /// Q5_K as ggml's `vec_dot_q5_K_q8_K` sums it: eight lanes of integer products
            /// scaled per 32 values, one fused multiply-add per super-block and lane; the
            /// minima's integer sum accumulated once per super-block and added last.
            #[target_feature(enable = $features)]
            pub unsafe fn q5k(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const BlockQ5K, a as *const BlockQ8K);
                let low_mask = _mm256_set1_epi8(0xF);
                let one = _mm256_set1_epi8(1);
                let mut acc = _mm256_setzero_ps();
                let mut mins = 0f32;
                for i in 0..n / QK_K {
                    let (x, y) = (&*w.add(i), &*a.add(i));
                    let high = _mm256_loadu_si256(x.qh.as_ptr() as *const __m256i);
                    // Bit `b` of every byte of qh, moved to bit 4.
                    let fifth = |b: i32| _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(b)), one), 4);
                    let mut sumi = _mm256_setzero_si256();
                    let mut total_min = 0i32;
                    for c in 0..4 {
                        let (sc_lo, m_lo) = k4_scale_min(2 * c, &x.scales);
                        let (sc_hi, m_hi) = k4_scale_min(2 * c + 1, &x.scales);
                        total_min += m_lo as i32 * (y.bsums[4 * c] as i32 + y.bsums[4 * c + 1] as i32)
                            + m_hi as i32 * (y.bsums[4 * c + 2] as i32 + y.bsums[4 * c + 3] as i32);
                        let q = _mm256_loadu_si256(x.qs.as_ptr().add(32 * c) as *const __m256i);
                        let lo = _mm256_or_si256(_mm256_and_si256(q, low_mask), fifth(2 * c as i32));
                        let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), low_mask), fifth(2 * c as i32 + 1));
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(y.qs.as_ptr().add(64 * c))), _mm256_set1_epi16(sc_lo as i16));
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(y.qs.as_ptr().add(64 * c + 32))), _mm256_set1_epi16(sc_hi as i16));
                        sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
                    }
                    let d = y.d * h2f(x.d);
                    let dmin = -y.d * h2f(x.dmin);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
                    mins = dmin.mul_add(total_min as f32, mins);
                }
                hsum_f32(acc) + mins
            }

            /// Weight blocks of signed quants (Q4_0, Q5_0) against N activation rows at once:
            /// each weight block is unpacked once, the activation scales come pre-converted
            /// (`ActScales`), and the per-row arithmetic is exactly that of the single-row
            /// kernel.
            macro_rules! signed_xn {
                ($fname:ident, $block:ty, |$x:ident| $quants:expr) => {
                    #[target_feature(enable = $features)]
                    pub unsafe fn $fname<const N: usize>(w: *const u8, a: &[*const u8; N], sc: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                        let w = w as *const $block;
                        let a = a.map(|p| p as *const BlockQ8_0);
                        let mut acc = [_mm256_setzero_ps(); N];
                        for i in 0..n / 32 {
                            let $x = &*w.add(i);
                            let q = $quants;
                            let d = _mm256_mul_ps(_mm256_set1_ps(h2f($x.d)), scales_at::<N>(sc.d, sc.stride, i));
                            for t in 0..N {
                                let p = _mm256_cvtepi32_ps(is8(q, load((*a[t].add(i)).qs.as_ptr())));
                                acc[t] = _mm256_fmadd_ps(lane(d, t), p, acc[t]);
                            }
                        }
                        for t in 0..N {
                            out[t] = hsum_f32(acc[t]);
                        }
                    }
                };
            }

            signed_xn!(q4_0_xn, BlockQ4_0, |x| _mm256_sub_epi8(nibbles(x.qs.as_ptr()), _mm256_set1_epi8(8)));
            signed_xn!(q5_0_xn, BlockQ5_0, |x| {
                let sixteen = _mm256_set1_epi8(16);
                let high = _mm256_and_si256(bytes_from_bits(u32::from_le_bytes(x.qh)), sixteen);
                _mm256_sub_epi8(_mm256_or_si256(nibbles(x.qs.as_ptr()), high), sixteen)
            });

            #[target_feature(enable = $features)]
            pub unsafe fn q4_1_xn<const N: usize>(w: *const u8, a: &[*const u8; N], sc: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                let w = w as *const BlockQ4_1;
                let a = a.map(|p| p as *const BlockQ8_1);
                let mut acc = [_mm256_setzero_ps(); N];
                // Lane t holds row t's running sum of (min x block sum), added in block order
                // with a separate multiply and add, as the single-row kernel does.
                let mut offsets = _mm256_setzero_ps();
                for i in 0..n / 32 {
                    let x = &*w.add(i);
                    let q = nibbles(x.qs.as_ptr());
                    let d = _mm256_mul_ps(_mm256_set1_ps(h2f(x.d)), scales_at::<N>(sc.d, sc.stride, i));
                    let m = _mm256_mul_ps(_mm256_set1_ps(h2f(x.m)), scales_at::<N>(sc.s, sc.stride, i));
                    offsets = _mm256_add_ps(offsets, m);
                    for t in 0..N {
                        let p = _mm256_cvtepi32_ps(us8(q, load((*a[t].add(i)).qs.as_ptr())));
                        acc[t] = _mm256_fmadd_ps(lane(d, t), p, acc[t]);
                    }
                }
                let mut off = [0f32; 8];
                _mm256_storeu_ps(off.as_mut_ptr(), offsets);
                for t in 0..N {
                    out[t] = hsum_f32(acc[t]) + off[t];
                }
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q8_0_xn<const N: usize>(w: *const u8, a: &[*const u8; N], sc: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                let w = w as *const BlockQ8_0;
                let a = a.map(|p| p as *const BlockQ8_0);
                let mut acc = [_mm256_setzero_ps(); N];
                for i in 0..n / 32 {
                    let x = &*w.add(i);
                    let q = load(x.qs.as_ptr());
                    // The sign trick of `is8`, hoisted: |x| once, its signs applied per row.
                    let ax = _mm256_sign_epi8(q, q);
                    let d = _mm256_mul_ps(_mm256_set1_ps(h2f(x.d)), scales_at::<N>(sc.d, sc.stride, i));
                    for t in 0..N {
                        let p = _mm256_cvtepi32_ps(us8(ax, _mm256_sign_epi8(load((*a[t].add(i)).qs.as_ptr()), q)));
                        acc[t] = _mm256_fmadd_ps(lane(d, t), p, acc[t]);
                    }
                }
                for t in 0..N {
                    out[t] = hsum_f32(acc[t]);
                }
            }

            #[target_feature(enable = $features)]
            pub unsafe fn f32(w: *const u8, a: *const u8, n: usize) -> f32 {
                f32_dot(w as *const f32, a as *const f32, n)
            }

            /// `f32` for N activation rows against one weight row: each weight vector is
            /// loaded once for all N rows, and each row's sums are those of `f32_dot` (four
            /// accumulators over 32-value steps, then eight-value steps, the tail, one
            /// horizontal sum), so the results are identical.
            #[target_feature(enable = $features)]
            pub unsafe fn f32_xn<const N: usize>(w: *const u8, a: &[*const u8; N], _: &ActScales<N>, n: usize, out: &mut [f32; N]) {
                let w = w as *const f32;
                let a = a.map(|p| p as *const f32);
                let mut acc = [[_mm256_setzero_ps(); 4]; N];
                let mut i = 0;
                while i + 32 <= n {
                    let wv = [0, 1, 2, 3].map(|k| _mm256_loadu_ps(w.add(i + 8 * k)));
                    for t in 0..N {
                        for k in 0..4 {
                            acc[t][k] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(a[t].add(i + 8 * k)), acc[t][k]);
                        }
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    let wv = _mm256_loadu_ps(w.add(i));
                    for t in 0..N {
                        acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a[t].add(i)), acc[t][0]);
                    }
                    i += 8;
                }
                for t in 0..N {
                    let mut tail = 0.0f32;
                    for j in i..n {
                        tail += *w.add(j) * *a[t].add(j);
                    }
                    let [a0, a1, a2, a3] = acc[t];
                    out[t] = hsum_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
                }
            }

            #[target_feature(enable = $features)]
            pub unsafe fn f16(w: *const u8, a: *const u8, n: usize) -> f32 {
                f16_dot(w as *const u16, a as *const u16, n)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn bf16(w: *const u8, a: *const u8, n: usize) -> f32 {
                let (w, a) = (w as *const u16, a as *const u16);
                let mut acc = _mm256_setzero_ps();
                let mut i = 0;
                while i + 8 <= n {
                    let x = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(i) as *const __m128i)), 16);
                    let y = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(a.add(i) as *const __m128i)), 16);
                    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y), acc);
                    i += 8;
                }
                let mut tail = 0.0f32;
                while i < n {
                    tail += f32::from_bits((*w.add(i) as u32) << 16) * f32::from_bits((*a.add(i) as u32) << 16);
                    i += 1;
                }
                hsum_f32(acc) + tail
            }
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn us8_dot_avx2(ax: __m256i, sy: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn us8_dot_vnni(ax: __m256i, sy: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
}

x86_kernels!(avx2, "avx2,fma,f16c", us8_dot_avx2);
x86_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", us8_dot_vnni);

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The 32 quants of a 16-byte nibble array: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let b = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// Byte i is 0xFF when bit i of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes_from_bits(bits: u32) -> __m256i {
    let spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
}

/// `acc[i] += p * x[i]` for i < n, each a fused multiply-add.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f32(acc: *mut f32, p: f32, x: *const f32, n: usize) {
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(acc.add(i), _mm256_fmadd_ps(pv, _mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(acc.add(i))));
        i += 8;
    }
    while i < n {
        *acc.add(i) = p.mul_add(*x.add(i), *acc.add(i));
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f32_dot(x: *const f32, y: *const f32, n: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i + 8 * k)), _mm256_loadu_ps(y.add(i + 8 * k)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i)), acc[0]);
        i += 8;
    }
    let mut tail = 0.0f32;
    while i < n {
        tail += *x.add(i) * *y.add(i);
        i += 1;
    }
    hsum_f32(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + tail
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f16_dot(x: *const u16, y: *const u16, n: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        acc[0] = _mm256_fmadd_ps(load_f16(x.add(i)), load_f16(y.add(i)), acc[0]);
        acc[1] = _mm256_fmadd_ps(load_f16(x.add(i + 8)), load_f16(y.add(i + 8)), acc[1]);
        i += 16;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load_f16(x.add(i)), load_f16(y.add(i)), acc[0]);
        i += 8;
    }
    let mut tail = 0.0f32;
    while i < n {
        tail += f16_bits_to_f32(*x.add(i)) * f16_bits_to_f32(*y.add(i));
        i += 1;
    }
    hsum_f32(_mm256_add_ps(acc[0], acc[1])) + tail
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn load_f16(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// `acc = fma(w, v, acc)` with `v` in half precision; with `start`, `acc = fma(w, v, 0)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f16(acc: &mut [f32], w: f32, v: &[u16], start: bool) {
    let n = acc.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        let a = if start { _mm256_setzero_ps() } else { _mm256_loadu_ps(acc.as_ptr().add(i)) };
        _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_fmadd_ps(wv, load_f16(v.as_ptr().add(i)), a));
        i += 8;
    }
    while i < n {
        let a = if start { 0.0 } else { acc[i] };
        acc[i] = w.mul_add(f16_bits_to_f32(v[i]), a);
        i += 1;
    }
}

/// Four accumulators of 16 lanes over the first `n & !63` products of `x` (single precision)
/// and `y` (half), folded `(a0 + a2) + (a1 + a3)`: lanes 0-7 and 8-15 of the result.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold64(x: *const f32, y: *const u16, n: usize) -> (__m256, __m256) {
    fold64_queries(&[x], y, n)[0]
}

/// `numerics::dot_f16`, bit for bit, with the first operand already widened to single
/// precision.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32_f16_ordered(x: *const f32, y: *const u16, n: usize, wide: bool) -> f32 {
    let (lo, hi) = if wide { crate::x86_wide::fold64(x, y, n) } else { fold64(x, y, n) };
    let mut sum = tree16(lo, hi) as f64;
    for i in n & !63..n {
        sum += (*x.add(i) * f16_bits_to_f32(*y.add(i))) as f64;
    }
    sum as f32
}

/// Eight lanes of `numerics::exp_poly`, bit for bit; lanes whose scaling leaves the normal
/// range are recomputed in scalar code.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn exp_poly8(x: __m256) -> __m256 {
    let shift = _mm256_set1_ps(12_582_912.0);
    let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3FB8_AA3B)), shift);
    let n = _mm256_sub_ps(z, shift);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(f32::from_bits(0x3F31_7200)), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(f32::from_bits(0x35BF_BE8E)), r);
    let r2 = _mm256_mul_ps(r, r);
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let p = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(c(0x3C07_2010), r, c(0x3D2B_9F17)), r2, _mm256_fmadd_ps(c(0x3E2A_AF33), r, c(0x3EFF_FEDB))),
        r2,
        _mm256_fmadd_ps(c(0x3F7F_FFF6), r, _mm256_set1_ps(1.0)),
    );
    // Lanes with n in [-126, 127] scale by building 2^n in the exponent field.
    let lo = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0), _CMP_GE_OQ);
    let hi = _mm256_cmp_ps(n, _mm256_set1_ps(127.0), _CMP_LE_OQ);
    let in_range = _mm256_and_ps(lo, hi);
    if _mm256_movemask_ps(in_range) == 0xFF {
        let e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    }
    let mut xs = [0f32; 8];
    _mm256_storeu_ps(xs.as_mut_ptr(), x);
    _mm256_loadu_ps(xs.map(crate::numerics::exp_poly).as_ptr())
}

/// `ops::gelu_erf` over the whole groups of 8 (16 with AVX-512) at the start of `x`; returns
/// how many values it did.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gelu_erf_groups(avx512: bool, x: &mut [f32]) -> usize {
    if avx512 {
        return gelu_erf_zmm(x);
    }
    let coeff = crate::ops::ERF_POLY.map(|c| _mm256_set1_ps(f32::from_bits(c)));
    let sign = _mm256_set1_ps(-0.0);
    let n = x.len() & !7;
    for i in (0..n).step_by(8) {
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        let z = _mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let t = _mm256_min_ps(_mm256_andnot_ps(sign, z), _mm256_set1_ps(4.0));
        let u = _mm256_fmadd_ps(t, _mm256_set1_ps(0.5), _mm256_set1_ps(-1.0));
        let mut erf = coeff[0];
        for c in &coeff[1..] {
            erf = _mm256_fmadd_ps(erf, u, *c);
        }
        let erf = _mm256_or_ps(_mm256_andnot_ps(sign, erf), _mm256_and_ps(sign, z));
        let half_x = _mm256_mul_ps(_mm256_set1_ps(0.5), v);
        _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm256_mul_ps(half_x, _mm256_add_ps(_mm256_set1_ps(1.0), erf)));
    }
    n
}

#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn gelu_erf_zmm(x: &mut [f32]) -> usize {
    let coeff = crate::ops::ERF_POLY.map(|c| _mm512_set1_ps(f32::from_bits(c)));
    let sign = _mm512_set1_epi32(i32::MIN);
    let n = x.len() & !15;
    for i in (0..n).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let z = _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let bits = _mm512_castps_si512(z);
        let t = _mm512_min_ps(_mm512_castsi512_ps(_mm512_andnot_si512(sign, bits)), _mm512_set1_ps(4.0));
        let u = _mm512_fmadd_ps(t, _mm512_set1_ps(0.5), _mm512_set1_ps(-1.0));
        let mut erf = coeff[0];
        for c in &coeff[1..] {
            erf = _mm512_fmadd_ps(erf, u, *c);
        }
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(erf)), _mm512_and_si512(sign, bits)));
        let half_x = _mm512_mul_ps(_mm512_set1_ps(0.5), v);
        _mm512_storeu_ps(x.as_mut_ptr().add(i), _mm512_mul_ps(half_x, _mm512_add_ps(_mm512_set1_ps(1.0), erf)));
    }
    n
}

/// Sum of 16 lanes held as (lanes 0-7, lanes 8-15), in `numerics::tree16` order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tree16(lo: __m256, hi: __m256) -> f32 {
    hsum_f32(_mm256_add_ps(hi, lo))
}

/// SwiGLU over whole groups of 16 with `exp_poly8`: `gate = gate / (1 + e^-gate) * up`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul_groups(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len()) & !15;
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let x = _mm256_loadu_ps(gate.as_ptr().add(i));
        let e = exp_poly8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
        i += 8;
    }
}

/// `attention::fold_buckets` for head dimensions that are multiples of 8.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn fold_buckets(buckets: &[f32], touched: &[bool; 64], d: usize, out: &mut [f32]) {
    let load = |b: usize, i: usize| if touched[b] { _mm256_loadu_ps(buckets.as_ptr().add(b * d + i)) } else { _mm256_setzero_ps() };
    let mut i = 0;
    while i < d {
        let mut f = [_mm256_setzero_ps(); 16];
        for (l, v) in f.iter_mut().enumerate() {
            *v = _mm256_add_ps(_mm256_add_ps(load(l, i), load(32 + l, i)), _mm256_add_ps(load(16 + l, i), load(48 + l, i)));
        }
        // tree16 across the 16 lane vectors, for 8 output dimensions at once.
        let b: [__m256; 8] = std::array::from_fn(|k| _mm256_add_ps(f[k + 8], f[k]));
        let c: [__m256; 4] = std::array::from_fn(|k| _mm256_add_ps(b[k + 4], b[k]));
        let r = _mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3]));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), r);
        i += 8;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// f32 dot product on AVX-512: four 16-lane accumulators over 64-value steps, then 16-value
/// steps, the tail in scalar order, and one horizontal sum (the layout of ggml's AVX-512 f32
/// dot product).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn f32_zmm(w: *const u8, a: *const u8, n: usize) -> f32 {
    let (w, a) = (w as *const f32, a as *const f32);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, c) in acc.iter_mut().enumerate() {
            *c = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(i + 16 * k)), _mm512_loadu_ps(a.add(i + 16 * k)), *c);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(i)), _mm512_loadu_ps(a.add(i)), acc[0]);
        i += 16;
    }
    let mut tail = 0.0f32;
    while i < n {
        tail += *w.add(i) * *a.add(i);
        i += 1;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) + tail
}

/// `f32_zmm` for four activation rows against one weight row: each weight vector is loaded
/// once for the four, and each row's arithmetic is exactly `f32_zmm`'s.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn f32_x4_zmm(w: *const u8, a: &[*const u8; 4], _: &ActScales<4>, n: usize, out: &mut [f32; 4]) {
    let w = w as *const f32;
    let a = a.map(|p| p as *const f32);
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i + 64 <= n {
        let wv = [0, 1, 2, 3].map(|k| _mm512_loadu_ps(w.add(i + 16 * k)));
        for t in 0..4 {
            for k in 0..4 {
                acc[t][k] = _mm512_fmadd_ps(wv[k], _mm512_loadu_ps(a[t].add(i + 16 * k)), acc[t][k]);
            }
        }
        i += 64;
    }
    while i + 16 <= n {
        let wv = _mm512_loadu_ps(w.add(i));
        for t in 0..4 {
            acc[t][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a[t].add(i)), acc[t][0]);
        }
        i += 16;
    }
    for t in 0..4 {
        let mut tail = 0.0f32;
        for j in i..n {
            tail += *w.add(j) * *a[t].add(j);
        }
        let [c0, c1, c2, c3] = acc[t];
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3))) + tail;
    }
}

/// `vnni::q4_1_xn::<8>` with two rows per 512-bit register: the weight block is duplicated
/// into both halves, and each half keeps exactly the lanes and operation order of the 256-bit
/// kernel, so results are identical bit for bit.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4_1_x8_zmm(w: *const u8, _a: &[*const u8; 8], sc: &ActScales<8>, n: usize, out: &mut [f32; 8]) {
    let w = w as *const BlockQ4_1;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut offsets = _mm256_setzero_ps();
    let pair_index: [__m512i; 4] = std::array::from_fn(|k| {
        let (x, y) = (2 * k as i32, 2 * k as i32 + 1);
        _mm512_set_epi32(y, y, y, y, y, y, y, y, x, x, x, x, x, x, x, x)
    });
    for i in 0..n / 32 {
        let x = &*w.add(i);
        let q = _mm512_broadcast_i64x4(nibbles(x.qs.as_ptr()));
        let d = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_set1_ps(h2f(x.d)), scales_at::<8>(sc.d, sc.stride, i)));
        let m = _mm256_mul_ps(_mm256_set1_ps(h2f(x.m)), scales_at::<8>(sc.s, sc.stride, i));
        offsets = _mm256_add_ps(offsets, m);
        for (k, acc) in acc.iter_mut().enumerate() {
            // Quants of rows 2k and 2k+1 for block i, side by side (`ActScales::pairs`).
            let y = _mm512_loadu_si512(sc.pairs.add((k * sc.blocks + i) * 64) as *const __m512i);
            let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, y));
            *acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair_index[k], d), p, *acc);
        }
    }
    let mut off = [0f32; 8];
    _mm256_storeu_ps(off.as_mut_ptr(), offsets);
    for (k, acc) in acc.iter().enumerate() {
        out[2 * k] = hsum_f32(_mm512_castps512_ps256(*acc)) + off[2 * k];
        out[2 * k + 1] = hsum_f32(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(*acc), 1))) + off[2 * k + 1];
    }
}

/// `vnni::q8_0_xn::<8>` with two rows per 512-bit register. AVX-512 has no byte sign
/// instruction, so the signed weights are offset by 128 to be unsigned and the offset is
/// taken back with precomputed activation sums (`ActScales::pair_corr`); the integer lanes
/// are exactly those of the 256-bit kernel, and so are the results.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q8_0_x8_zmm(w: *const u8, _a: &[*const u8; 8], sc: &ActScales<8>, n: usize, out: &mut [f32; 8]) {
    let w = w as *const BlockQ8_0;
    let mut acc = [_mm512_setzero_ps(); 4];
    let pair_index: [__m512i; 4] = std::array::from_fn(|k| {
        let (x, y) = (2 * k as i32, 2 * k as i32 + 1);
        _mm512_set_epi32(y, y, y, y, y, y, y, y, x, x, x, x, x, x, x, x)
    });
    let bias = _mm512_set1_epi8(-128);
    for i in 0..n / 32 {
        let x = &*w.add(i);
        // x + 128 as unsigned bytes: flipping the top bit adds 128 modulo 256.
        let q = _mm512_xor_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256(x.qs.as_ptr() as *const __m256i)), bias);
        let d = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_set1_ps(h2f(x.d)), scales_at::<8>(sc.d, sc.stride, i)));
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = k * sc.blocks + i;
            let y = _mm512_loadu_si512(sc.pairs.add(at * 64) as *const __m512i);
            let corr = _mm512_loadu_si512(sc.pair_corr.add(at * 16) as *const __m512i);
            let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, q, y));
            *acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair_index[k], d), p, *acc);
        }
    }
    for (k, acc) in acc.iter().enumerate() {
        out[2 * k] = hsum_f32(_mm512_castps512_ps256(*acc));
        out[2 * k + 1] = hsum_f32(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(*acc), 1)));
    }
}

/// `dot_f32_f16_ordered` for eight keys at once, for lengths that are multiples of 64. The
/// eight per-key 16-lane folds are transposed and reduced together; each lane sees exactly
/// the additions `tree16` performs for its key, so every result is bit-identical.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot8_f32_f16_ordered(x: *const f32, keys: &[*const u16; 8], n: usize, wide: bool) -> [f32; 8] {
    debug_assert_eq!(n % 64, 0);
    let mut folded = [_mm256_setzero_ps(); 8];
    for (f, &key) in folded.iter_mut().zip(keys) {
        let (lo, hi) = if wide { crate::x86_wide::fold64(x, key, n) } else { fold64(x, key, n) };
        // tree16's first step: lanes 8..16 onto lanes 0..8.
        *f = _mm256_add_ps(hi, lo);
    }
    finish_tree16x8(folded)
}

/// `dot8_f32_f16_ordered` for `Q` queries against the same eight keys (the AVX2 form of
/// `x86_wide::dot8_queries`): each key chunk is widened once for every query, and each
/// query's lanes get exactly the arithmetic of the single-query kernel.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot8_queries<const Q: usize>(xs: &[*const f32; Q], keys: &[*const u16; 8], n: usize) -> [[f32; 8]; Q] {
    let mut folded = [[_mm256_setzero_ps(); 8]; Q];
    for (k, &key) in keys.iter().enumerate() {
        for (f, (lo, hi)) in folded.iter_mut().zip(fold64_queries(xs, key, n)) {
            // tree16's first step: lanes 8..16 onto lanes 0..8.
            f[k] = _mm256_add_ps(hi, lo);
        }
    }
    // Loops rather than closures here and below: a closure does not inherit this function's
    // target features, so the intrinsics in it would not be inlined.
    let mut out = [[0f32; 8]; Q];
    for (o, f) in out.iter_mut().zip(folded) {
        *o = finish_tree16x8(f);
    }
    out
}

/// `fold64` for `Q` queries against the same `y`. One of the four 16-lane accumulators at a
/// time, so that every query's copy of it stays in registers; each accumulator still sees
/// its products in the same order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold64_queries<const Q: usize>(xs: &[*const f32; Q], y: *const u16, n: usize) -> [(__m256, __m256); Q] {
    if (64..128).contains(&n) {
        return fold64_once_queries(xs, y);
    }
    // sums[q][2c] holds lanes 0-7 of query q's accumulator c, sums[q][2c + 1] lanes 8-15.
    let mut sums = [[_mm256_setzero_ps(); 8]; Q];
    for c in 0..4 {
        let mut acc = [[_mm256_setzero_ps(); 2]; Q];
        let mut i = 0;
        while i + 64 <= n {
            let (lo, hi) = (load_f16(y.add(i + 16 * c)), load_f16(y.add(i + 16 * c + 8)));
            for (a, &x) in acc.iter_mut().zip(xs) {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i + 16 * c)), lo, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i + 16 * c + 8)), hi, a[1]);
            }
            i += 64;
        }
        for (s, a) in sums.iter_mut().zip(acc) {
            s[2 * c] = a[0];
            s[2 * c + 1] = a[1];
        }
    }
    let mut out = [(_mm256_setzero_ps(), _mm256_setzero_ps()); Q];
    for (o, a) in out.iter_mut().zip(sums) {
        let lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
        *o = (lo, hi);
    }
    out
}

/// `fold64_queries` when each accumulator lane receives one product (64 <= n < 128, e.g. a
/// head dimension of 64). The operands are half-precision values (queries are rounded to half
/// before attention), so every product is exact in f32 (11 + 11 significant bits), and the
/// fold's first additions `a0 + a2` and `a1 + a3` equal one fused multiply-add of a product
/// onto the other: the same single rounding of the same exact sum, with one instruction
/// fewer per pair.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold64_once_queries<const Q: usize>(xs: &[*const f32; Q], y: *const u16) -> [(__m256, __m256); Q] {
    let mut out = [(_mm256_setzero_ps(), _mm256_setzero_ps()); Q];
    // Half `h` (lanes 0-7 or 8-15) of accumulators c and c + 2, for c = 0 and 1.
    for h in 0..2 {
        let ys: [__m256; 4] = std::array::from_fn(|c| load_f16(y.add(16 * c + 8 * h)));
        for (o, &x) in out.iter_mut().zip(xs) {
            let pair = |c: usize| _mm256_fmadd_ps(_mm256_loadu_ps(x.add(16 * (c + 2) + 8 * h)), ys[c + 2], _mm256_mul_ps(_mm256_loadu_ps(x.add(16 * c + 8 * h)), ys[c]));
            let sum = _mm256_add_ps(pair(0), pair(1));
            if h == 0 {
                o.0 = sum;
            } else {
                o.1 = sum;
            }
        }
    }
    out
}

/// `x86_wide::bucket_sum_queries` on AVX2: dimensions `dim..dim + 64` of `Σ fma(w[j],
/// values[at[j]..], acc)` over keys `j = j0, j0 + 64, ...` in that order, starting from zero,
/// for `Q` queries sharing the values; sixteen dimensions at a time so that every query's
/// sums stay in registers.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn bucket_sum_queries<const Q: usize>(ws: &[&[f32]; Q], at: &[usize], j0: usize, values: &[u16], dim: usize, outs: [*mut f32; Q]) {
    for part in 0..4 {
        let mut acc = [[_mm256_setzero_ps(); 2]; Q];
        let mut j = j0;
        while j < at.len() {
            let v = values[at[j] + dim + 16 * part..at[j] + dim + 16 * part + 16].as_ptr();
            let (lo, hi) = (load_f16(v), load_f16(v.add(8)));
            for (a, w) in acc.iter_mut().zip(ws) {
                let wv = _mm256_set1_ps(w[j]);
                a[0] = _mm256_fmadd_ps(wv, lo, a[0]);
                a[1] = _mm256_fmadd_ps(wv, hi, a[1]);
            }
            j += 64;
        }
        for (a, &o) in acc.iter().zip(&outs) {
            _mm256_storeu_ps(o.add(16 * part), a[0]);
            _mm256_storeu_ps(o.add(16 * part + 8), a[1]);
        }
    }
}

/// The largest of eight lanes (exact in any order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax_f32(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// Whether any of `v` is NaN, and the largest magnitude among them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nan_and_amax(v: &[__m256]) -> (bool, f32) {
    let (mut nan, mut amax) = (0, _mm256_setzero_ps());
    for &r in v {
        nan |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(r, r));
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0), r));
    }
    (nan != 0, hmax_f32(amax))
}

/// `activation::q8_block` for 32 values (the AVX2 form of `x86_wide::q8_block`): scale from
/// the largest magnitude, quants rounded half to even. Returns d, or None (writing nothing)
/// when a value is NaN.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_block(x: &[f32], qs: &mut [i8; 32]) -> Option<f32> {
    assert!(x.len() >= 32, "a block is 32 values");
    let mut v = [_mm256_setzero_ps(); 4];
    for (k, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(x.as_ptr().add(8 * k));
    }
    let (nan, amax) = nan_and_amax(&v);
    if nan {
        return None;
    }
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, &v) in q.iter_mut().zip(&v) {
        *q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
    }
    // The packs work within 128-bit lanes: dwords come out as quants 0-3 of q[0], q[1],
    // q[2], q[3], then 4-7 of each; the permutation puts them back in order.
    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
    Some(d)
}

/// `activation::quantize_q8k` for one super-block (the AVX2 form of `x86_wide::q8k_block`):
/// the first value of largest magnitude sets the scale, quants are rounded half to even,
/// sums taken per 16. Returns d, or None (writing nothing) when the block holds a NaN.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8k_block(x: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> Option<f32> {
    assert!(x.len() >= 256 && qs.len() >= 256 && bsums.len() >= 16, "a super-block is 256 values");
    let mut v = [_mm256_setzero_ps(); 32];
    for (k, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(x.as_ptr().add(8 * k));
    }
    let (nan, amax) = nan_and_amax(&v);
    if nan {
        return None;
    }
    if amax == 0.0 {
        qs[..256].fill(0);
        bsums[..16].fill(0);
        return Some(0.0);
    }
    // The first value whose magnitude is the largest, as the scalar scan finds it.
    let target = _mm256_set1_ps(amax);
    let mut max = 0.0f32;
    for (k, &r) in v.iter().enumerate() {
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(_mm256_set1_ps(-0.0), r), target));
        if hit != 0 {
            max = x[8 * k + hit.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127.0 / max;
    let s = _mm256_set1_ps(iscale);
    for g in 0..16 {
        let a = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(s, v[2 * g])), _mm256_set1_epi32(127));
        let b = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(s, v[2 * g + 1])), _mm256_set1_epi32(127));
        bsums[g] = hsum_i32(_mm256_add_epi32(a, b)) as i16;
        // i16 lanes [a0..4, b0..4 | a4..8, b4..8], reordered to a0..8, b0..8 before narrowing.
        let words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0b11_01_10_00);
        let bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
        _mm_storeu_si128(qs.as_mut_ptr().add(16 * g) as *mut __m128i, bytes);
    }
    Some(1.0 / iscale)
}

/// The rest of `tree16` for eight dot products at once, each given as its eight lanes after
/// the first step (lanes 8..16 added onto 0..8).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn finish_tree16x8(folded: [__m256; 8]) -> [f32; 8] {
    // Transpose: t[i] holds lane i of every key's folded vector.
    let t = transpose8(folded);
    // tree16's remaining steps, lane-wise: (b4 + b0), (b6 + b2), (b5 + b1), (b7 + b3), ...
    let c0 = _mm256_add_ps(t[4], t[0]);
    let c1 = _mm256_add_ps(t[5], t[1]);
    let c2 = _mm256_add_ps(t[6], t[2]);
    let c3 = _mm256_add_ps(t[7], t[3]);
    let r = _mm256_add_ps(_mm256_add_ps(c0, c2), _mm256_add_ps(c1, c3));
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), r);
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps(t0, t2, 0x44);
    let s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    let s2 = _mm256_shuffle_ps(t1, t3, 0x44);
    let s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    let s4 = _mm256_shuffle_ps(t4, t6, 0x44);
    let s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    let s6 = _mm256_shuffle_ps(t5, t7, 0x44);
    let s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    [
        _mm256_permute2f128_ps(s0, s4, 0x20),
        _mm256_permute2f128_ps(s1, s5, 0x20),
        _mm256_permute2f128_ps(s2, s6, 0x20),
        _mm256_permute2f128_ps(s3, s7, 0x20),
        _mm256_permute2f128_ps(s0, s4, 0x31),
        _mm256_permute2f128_ps(s1, s5, 0x31),
        _mm256_permute2f128_ps(s2, s6, 0x31),
        _mm256_permute2f128_ps(s3, s7, 0x31),
    ]
}

/// Rounds each value to half precision (round to nearest even) and writes the bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f32_to_f16_slice(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm256_cvtps_ph(_mm256_loadu_ps(src.as_ptr().add(i)), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        i += 8;
    }
    while i < n {
        dst[i] = f32_to_f16_bits(src[i]);
        i += 1;
    }
}

/// Rounds each value to the nearest half-precision value, in place.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn round_to_f16(x: &mut [f32]) {
    let n = x.len();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm256_cvtps_ph(_mm256_loadu_ps(x.as_ptr().add(i)), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        x[i] = f16_bits_to_f32(f32_to_f16_bits(x[i]));
        i += 1;
    }
}

/// `ops::rope_apply`, bit for bit: the same fused products, eight values at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rope_apply(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) -> usize {
    let half = cos.len();
    let mut i = 0;
    if interleaved {
        // Pairs (x[2i], x[2i+1]); four pairs per vector.
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        while i + 4 <= half {
            let p = x.as_mut_ptr().add(2 * i);
            let v = _mm256_loadu_ps(p);
            let c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cos.as_ptr().add(i))), dup);
            let s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sin.as_ptr().add(i))), dup);
            let swapped = _mm256_permute_ps(v, 0xB1);
            let bc = _mm256_mul_ps(v, c);
            let bs = _mm256_mul_ps(swapped, s);
            let even = _mm256_fmsub_ps(v, c, bs);
            let odd = _mm256_fmadd_ps(swapped, s, bc);
            _mm256_storeu_ps(p, _mm256_blend_ps(even, odd, 0xAA));
            i += 4;
        }
    } else {
        while i + 8 <= half {
            let (pa, pb) = (x.as_mut_ptr().add(i), x.as_mut_ptr().add(i + half));
            let (a, b) = (_mm256_loadu_ps(pa), _mm256_loadu_ps(pb));
            let (c, s) = (_mm256_loadu_ps(cos.as_ptr().add(i)), _mm256_loadu_ps(sin.as_ptr().add(i)));
            let bs = _mm256_mul_ps(b, s);
            let bc = _mm256_mul_ps(b, c);
            _mm256_storeu_ps(pa, _mm256_fmsub_ps(a, c, bs));
            _mm256_storeu_ps(pb, _mm256_fmadd_ps(a, s, bc));
            i += 8;
        }
    }
    i
}
