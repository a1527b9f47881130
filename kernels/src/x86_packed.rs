//! AVX-512 VNNI products over `packed` weights: sixteen weight rows per register, any number
//! of activation rows, every output computed with `packed::reference`'s arithmetic exactly.
//!
//! # Safety
//! Every function here requires AVX-512 F/BW/VL/VNNI with AVX2, FMA and F16C, and pointers
//! valid for the packed group and activation rows described by its arguments.

#![allow(unsafe_op_in_unsafe_fn, clippy::missing_safety_doc)]

use crate::dtype::DType;
use crate::packed::{block_bytes, has_min, zero_point, zero_point_index, BlockTable, Q2K_QUANTS, Q3K_HIGHS, Q3K_QUANTS, Q4K_QUANTS, Q5K_HIGHS, Q6K_HIGHS, Q6K_LOWS, ZERO_POINTS};
use std::arch::x86_64::*;

/// A packed product: rows `t0..t0 + count` of the activations against one packed group,
/// output row `t` written to `out[t * stride..t * stride + 16]`.
pub type PackedFn = unsafe fn(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize);

/// Prepared activation rows as the packed kernels read them (Q8_0, Q8_1 or Q8_K; `table` is
/// empty for Q8_K, whose blocks carry their scale in f32 and their sums).
pub struct PackedActs<'a> {
    /// Row 0's first block; rows are `row_bytes` apart, blocks `block_bytes` apart.
    pub base: *const u8,
    pub row_bytes: usize,
    pub block_bytes: usize,
    /// Offset of the 32 quants inside an activation block (after its header).
    pub quants_at: usize,
    pub blocks: usize,
    pub table: &'a BlockTable,
}

// SAFETY: the rows are only read, and outlive every product that reads them.
unsafe impl Sync for PackedActs<'_> {}

/// Asks for the block `ahead` bytes past the `len` bytes at `p` (the same block of the next
/// group, which the same thread computes next) to be brought into cache, so that memory
/// keeps streaming while this group computes. A prefetch never faults, so the address may
/// lie past the matrix.
#[inline(always)]
pub(crate) unsafe fn prefetch_next_group(p: *const u8, ahead: usize, len: usize) {
    for line in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead + line) as *const i8);
    }
}

/// ggml's horizontal sum of eight lanes (`hsum_float_8`), for sixteen rows at once.
#[inline(always)]
unsafe fn fold_lanes(a: [__m512; 8]) -> __m512 {
    _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
        _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
    )
}

/// Rows `t0..t0 + count` in tiles of `$max` rows, then one tile of the remaining rows:
/// `$tile::<rows>$args`, with `$t` in `$args` naming each tile's first row.
macro_rules! in_tiles {
    ($t:ident from $t0:expr, $count:expr; $max:literal => $($rest:literal),*; $tile:ident $args:tt) => {{
        let (mut $t, end) = ($t0, $t0 + $count);
        while $t + $max <= end {
            $tile::<$max> $args;
            $t += $max;
        }
        match end - $t {
            $($rest => $tile::<$rest> $args,)*
            _ => {}
        }
    }};
}

macro_rules! kind_kernels {
    ($($fname:ident => $dtype:expr;)*) => {$(
        /// A `PackedFn` for one format.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn $fname(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
            in_tiles!(t from t0, count; 3 => 2, 1; tile($dtype, group, acts, t, out, stride));
        }
    )*};
}

kind_kernels! {
    q4_1 => DType::Q4_1;
    q5_0 => DType::Q5_0;
    q5_1 => DType::Q5_1;
    q8_0 => DType::Q8_0;
}

/// `PackedFn` for Q4_0 against Q8_0 activations, in the order of ggml's 8-row interleaved
/// kernels: each block's integer sum (zero point taken back with the block's activation sum)
/// scaled and accumulated on its own.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4_0(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    in_tiles!(t from t0, count; 8 => 7, 6, 5, 4, 3, 2, 1; q4_0_tile(group, acts, t, out, stride));
}

#[inline(always)]
unsafe fn q4_0_tile<const N: usize>(group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let bb = block_bytes(DType::Q4_0);
    let mut acc = [_mm512_setzero_ps(); N];
    let table = acts.table;
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let w = weights(DType::Q4_0, p.add(32));
        for (t, acc) in acc.iter_mut().enumerate() {
            let at = (t0 + t) * acts.blocks + b;
            let a = acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes + acts.quants_at) as *const i32;
            let mut total = _mm512_set1_epi32(-zero_point(DType::Q4_0) * *table.sums.get_unchecked(at));
            for (l, w) in w.iter().enumerate() {
                total = _mm512_dpbusd_epi32(total, *w, _mm512_set1_epi32(std::ptr::read_unaligned(a.add(l))));
            }
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(*table.d.get_unchecked(at)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), d, *acc);
        }
    }
    for (t, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add((t0 + t) * stride), *a);
    }
}

/// `PackedFn` for Q4_K against Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    in_tiles!(t from t0, count; 4 => 3, 2, 1; q4k_tile(group, acts, t, out, stride));
}

#[inline(always)]
unsafe fn q4k_tile<const N: usize>(group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let bb = block_bytes(DType::Q4K);
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut acc_min = [_mm512_setzero_ps(); N];
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let a: [*const u8; N] = std::array::from_fn(|t| acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes));
        let mut total = [_mm512_setzero_si512(); N];
        let mut total_min = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let mut lo_sum = [_mm512_setzero_si512(); N];
            let mut hi_sum = [_mm512_setzero_si512(); N];
            for k in 0..8 {
                let r = _mm512_loadu_si512(p.add(Q4K_QUANTS + 64 * (8 * c + k)) as *const __m512i);
                let lo = _mm512_and_si512(r, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(r, 4), low);
                for t in 0..N {
                    let q = a[t].add(4 + 64 * c + 4 * k);
                    lo_sum[t] = _mm512_dpbusd_epi32(lo_sum[t], lo, _mm512_set1_epi32(std::ptr::read_unaligned(q as *const i32)));
                    hi_sum[t] = _mm512_dpbusd_epi32(hi_sum[t], hi, _mm512_set1_epi32(std::ptr::read_unaligned(q.add(32) as *const i32)));
                }
            }
            let scale = |sub: usize| _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(64 + 16 * sub) as *const __m128i));
            let (s_lo, s_hi) = (scale(2 * c), scale(2 * c + 1));
            for t in 0..N {
                total[t] = _mm512_add_epi32(total[t], _mm512_mullo_epi32(lo_sum[t], s_lo));
                total[t] = _mm512_add_epi32(total[t], _mm512_mullo_epi32(hi_sum[t], s_hi));
            }
        }
        for sub in 0..8 {
            let mins = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(192 + 16 * sub) as *const __m128i));
            for t in 0..N {
                let bsums = a[t].add(4 + 256) as *const i16;
                let pair = std::ptr::read_unaligned(bsums.add(2 * sub)) as i32 + std::ptr::read_unaligned(bsums.add(2 * sub + 1)) as i32;
                total_min[t] = _mm512_add_epi32(total_min[t], _mm512_mullo_epi32(mins, _mm512_set1_epi32(pair)));
            }
        }
        accumulate_with_minima(p, &a, &total, &total_min, &mut acc, &mut acc_min);
    }
    for t in 0..N {
        _mm512_storeu_ps(out.add((t0 + t) * stride), _mm512_sub_ps(acc[t], acc_min[t]));
    }
}

/// The whole-super-block order of Q4_K and interleaved Q2_K: the products' and the minima's
/// integer sums of each input row scaled by `d · dy` and `dmin · dy` (`d`, `dmin` at the
/// start of the packed super-block `p`) and accumulated apart.
#[inline(always)]
unsafe fn accumulate_with_minima<const N: usize>(p: *const u8, a: &[*const u8; N], total: &[__m512i; N], total_min: &[__m512i; N], acc: &mut [__m512; N], acc_min: &mut [__m512; N]) {
    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
    let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i));
    for t in 0..N {
        let dy = _mm512_set1_ps(std::ptr::read_unaligned(a[t] as *const f32));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[t]), _mm512_mul_ps(dw, dy), acc[t]);
        acc_min[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total_min[t]), _mm512_mul_ps(dmin, dy), acc_min[t]);
    }
}

/// `PackedFn` for Q5_K against Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q5k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    in_tiles!(t from t0, count; 3 => 2, 1; q5k_tile(group, acts, t, out, stride));
}

#[inline(always)]
unsafe fn q5k_tile<const N: usize>(group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let bb = block_bytes(DType::Q5K);
    let low = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    // acc[l][t]: lane l of ggml's eight for input row t, sixteen weight rows wide.
    let mut acc = [[_mm512_setzero_ps(); N]; 8];
    let mut mins = [_mm512_setzero_ps(); N];
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let a: [*const u8; N] = std::array::from_fn(|t| acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes));
        let per_row = |at: usize| _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(at) as *const __m128i));
        // Each sub-block's scale of the sixteen rows in both i16 halves of a 32-bit lane.
        let scales: [__m512i; 8] = std::array::from_fn(|sub| {
            let s = per_row(64 + 16 * sub);
            _mm512_or_si512(s, _mm512_slli_epi32(s, 16))
        });
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i));
        for t in 0..N {
            let dy = std::ptr::read_unaligned(a[t] as *const f32);
            let bsums = a[t].add(4 + 256) as *const i16;
            let mut total_min = _mm512_setzero_si512();
            for sub in 0..8 {
                let pair = std::ptr::read_unaligned(bsums.add(2 * sub)) as i32 + std::ptr::read_unaligned(bsums.add(2 * sub + 1)) as i32;
                total_min = _mm512_add_epi32(total_min, _mm512_mullo_epi32(per_row(192 + 16 * sub), _mm512_set1_epi32(pair)));
            }
            mins[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(-dy), dmin), _mm512_cvtepi32_ps(total_min), mins[t]);
        }
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut lane = [_mm512_setzero_si512(); N];
            for c in 0..4 {
                let reg = 8 * c + l;
                let r = _mm512_loadu_si512(p.add(Q4K_QUANTS + 64 * reg) as *const __m512i);
                let masks = p.add(Q5K_HIGHS + 16 * reg) as *const u64;
                let lo = _mm512_and_si512(r, low);
                let lo = _mm512_mask_add_epi8(lo, std::ptr::read_unaligned(masks), lo, sixteen);
                let hi = _mm512_and_si512(_mm512_srli_epi16(r, 4), low);
                let hi = _mm512_mask_add_epi8(hi, std::ptr::read_unaligned(masks.add(1)), hi, sixteen);
                for t in 0..N {
                    let q = a[t].add(4 + 64 * c + 4 * l);
                    let y_lo = _mm512_set1_epi32(std::ptr::read_unaligned(q as *const i32));
                    let y_hi = _mm512_set1_epi32(std::ptr::read_unaligned(q.add(32) as *const i32));
                    lane[t] = _mm512_dpwssd_epi32(lane[t], _mm512_maddubs_epi16(lo, y_lo), scales[2 * c]);
                    lane[t] = _mm512_dpwssd_epi32(lane[t], _mm512_maddubs_epi16(hi, y_hi), scales[2 * c + 1]);
                }
            }
            for t in 0..N {
                let d = _mm512_mul_ps(_mm512_set1_ps(std::ptr::read_unaligned(a[t] as *const f32)), dw);
                acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane[t]), acc[t]);
            }
        }
    }
    for (t, m) in mins.iter().enumerate() {
        let sum = fold_lanes(std::array::from_fn(|l| acc[l][t]));
        _mm512_storeu_ps(out.add((t0 + t) * stride), _mm512_add_ps(sum, *m));
    }
}

/// `PackedFn` for Q6_K against Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q6k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    in_tiles!(t from t0, count; 3 => 2, 1; q6k_tile(group, acts, t, out, stride));
}

/// Quants of 32-value chunk `chunk`, lane `l`, of a packed Q6_K super-block at `p`.
#[inline(always)]
unsafe fn q6k_quants(p: *const u8, chunk: usize, l: usize) -> __m512i {
    let lows = _mm512_loadu_si512(p.add(Q6K_LOWS + 64 * (8 * (chunk / 2) + l)) as *const __m512i);
    let highs = _mm512_loadu_si512(p.add(Q6K_HIGHS + 64 * (8 * (chunk / 4) + l)) as *const __m512i);
    let lo = if chunk.is_multiple_of(2) { lows } else { _mm512_srli_epi16(lows, 4) };
    // Bits 2u..2u + 2 of each byte to bits 4..6; what crosses into a neighbouring byte lands
    // outside those bits and is masked off.
    let hi = match chunk % 4 {
        0 => _mm512_slli_epi16(highs, 4),
        1 => _mm512_slli_epi16(highs, 2),
        2 => highs,
        _ => _mm512_srli_epi16(highs, 2),
    };
    _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi8(0x0F)), _mm512_and_si512(hi, _mm512_set1_epi8(0x30)))
}

#[inline(always)]
unsafe fn q6k_tile<const N: usize>(group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let bb = block_bytes(DType::Q6K);
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    // Byte shuffles (indices within each 128-bit lane) that copy the first (second) i16 of
    // each 32-bit lane into both its halves.
    let dup_first = _mm512_broadcast_i32x4(_mm_setr_epi32(0x0100_0100, 0x0504_0504, 0x0908_0908, 0x0D0C_0D0C));
    let dup_second = _mm512_broadcast_i32x4(_mm_setr_epi32(0x0302_0302, 0x0706_0706, 0x0B0A_0B0A, 0x0F0E_0F0E));
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let a: [*const u8; N] = std::array::from_fn(|t| acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes));
        // Scale pairs (s[2k], s[2k + 1]) of the sixteen rows as i16.
        let pairs: [__m512i; 8] = std::array::from_fn(|k| _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(32 + 32 * k) as *const __m256i)));
        for l in 0..8 {
            // ggml's offset for lane l: 32 x (bsums[2l] s[2l] + bsums[2l + 1] s[2l + 1]).
            let mut lane: [__m512i; N] = std::array::from_fn(|t| {
                let bsums = std::ptr::read_unaligned(a[t].add(260 + 4 * l) as *const i32);
                let offset = _mm512_dpwssd_epi32(_mm512_setzero_si512(), pairs[l], _mm512_set1_epi32(bsums));
                _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(offset, 5))
            });
            for (chunk, &pair) in pairs.iter().enumerate() {
                let q = q6k_quants(p, chunk, l);
                let scale = _mm512_shuffle_epi8(pair, if l < 4 { dup_first } else { dup_second });
                for t in 0..N {
                    let y = _mm512_set1_epi32(std::ptr::read_unaligned(a[t].add(4 + 32 * chunk + 4 * l) as *const i32));
                    lane[t] = _mm512_dpwssd_epi32(lane[t], _mm512_maddubs_epi16(q, y), scale);
                }
            }
            for t in 0..N {
                let dy = _mm512_set1_ps(std::ptr::read_unaligned(a[t] as *const f32));
                let d = _mm512_mul_ps(dy, _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)));
                acc[t][l] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane[t]), acc[t][l]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add((t0 + t) * stride), fold_lanes(*a));
    }
}

/// The low two bits of chunk `c`, lane `l` of a packed Q2_K or Q3_K super-block whose quants
/// start at `quants`.
#[inline(always)]
unsafe fn k2_low_bits(quants: *const u8, c: usize, l: usize) -> __m512i {
    let r = _mm512_loadu_si512(quants.add(64 * (8 * (c / 4) + l)) as *const __m512i);
    // Shifting 16-bit lanes drags the upper byte's bits down, but only above bit 1.
    _mm512_and_si512(_mm512_srl_epi16(r, _mm_cvtsi32_si128(2 * (c % 4) as i32)), _mm512_set1_epi8(3))
}

/// A sub-block's byte per row (sixteen at `p`) in both i16 halves of each lane, unsigned or
/// signed.
#[inline(always)]
unsafe fn scale_pairs(p: *const u8, signed: bool) -> __m512i {
    let b = _mm_loadu_si128(p as *const __m128i);
    let s = if signed { _mm512_and_si512(_mm512_cvtepi8_epi32(b), _mm512_set1_epi32(0xFFFF)) } else { _mm512_cvtepu8_epi32(b) };
    _mm512_or_si512(s, _mm512_slli_epi32(s, 16))
}

/// `PackedFn` for Q2_K against Q8_K activations, in the order of llama.cpp's 8-row
/// interleaved Q2_K kernels, which it uses on AVX-512 CPUs (`x86::*::q2k_interleaved`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q2k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    in_tiles!(t from t0, count; 3 => 2, 1; q2k_tile(group, acts, t, out, stride));
}

#[inline(always)]
unsafe fn q2k_tile<const N: usize>(group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let bb = block_bytes(DType::Q2K);
    let (mut acc, mut acc_min) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let a: [*const u8; N] = std::array::from_fn(|t| acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes));
        let (mut total, mut total_min) = ([_mm512_setzero_si512(); N], [_mm512_setzero_si512(); N]);
        for sub in 0..16 {
            // A 16-value sub-block's products: four lanes of one chunk, at most 4 x 2 x 3 x
            // 128 per i16.
            let (c, first) = (sub / 2, 4 * (sub % 2));
            let mut pairs = [_mm512_setzero_si512(); N];
            for l in first..first + 4 {
                let q = k2_low_bits(p.add(Q2K_QUANTS), c, l);
                for t in 0..N {
                    let y = _mm512_set1_epi32(std::ptr::read_unaligned(a[t].add(4 + 32 * c + 4 * l) as *const i32));
                    pairs[t] = _mm512_add_epi16(pairs[t], _mm512_maddubs_epi16(q, y));
                }
            }
            let scale = scale_pairs(p.add(64 + 16 * sub), false);
            for t in 0..N {
                total[t] = _mm512_dpwssd_epi32(total[t], pairs[t], scale);
            }
        }
        for k in 0..8 {
            let mins = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(320 + 16 * (2 * k)) as *const __m128i)), _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(320 + 16 * (2 * k + 1)) as *const __m128i)), 16));
            for t in 0..N {
                let bsums = std::ptr::read_unaligned(a[t].add(260 + 4 * k) as *const i32);
                total_min[t] = _mm512_dpwssd_epi32(total_min[t], mins, _mm512_set1_epi32(bsums));
            }
        }
        accumulate_with_minima(p, &a, &total, &total_min, &mut acc, &mut acc_min);
    }
    for t in 0..N {
        _mm512_storeu_ps(out.add((t0 + t) * stride), _mm512_sub_ps(acc[t], acc_min[t]));
    }
}

/// `PackedFn` for Q3_K against Q8_K activations, in ggml's single-row order
/// (`x86::*::q3k`): eight lanes, each scaled once per super-block.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q3k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    in_tiles!(t from t0, count; 3 => 2, 1; q3k_tile(group, acts, t, out, stride));
}

#[inline(always)]
unsafe fn q3k_tile<const N: usize>(group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let bb = block_bytes(DType::Q3K);
    // acc[l][t]: lane l of ggml's eight for input row t, sixteen weight rows wide.
    let mut acc = [[_mm512_setzero_ps(); N]; 8];
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let a: [*const u8; N] = std::array::from_fn(|t| acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes));
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut lane = [_mm512_setzero_si512(); N];
            for c in 0..8 {
                let third = std::ptr::read_unaligned(p.add(Q3K_HIGHS + 8 * (8 * c + l)) as *const u64);
                let low = k2_low_bits(p.add(Q3K_QUANTS), c, l);
                let q = _mm512_sub_epi8(_mm512_mask_add_epi8(low, third, low, _mm512_set1_epi8(4)), _mm512_set1_epi8(4));
                // The sign trick: |q| against the activations negated where q < 0 (they are
                // -127..127, so negation cannot overflow).
                let (magnitude, negative) = (_mm512_abs_epi8(q), _mm512_movepi8_mask(q));
                let scale = scale_pairs(p.add(32 + 16 * (2 * c + usize::from(l >= 4))), true);
                for t in 0..N {
                    let y = _mm512_set1_epi32(std::ptr::read_unaligned(a[t].add(4 + 32 * c + 4 * l) as *const i32));
                    let y = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
                    lane[t] = _mm512_dpwssd_epi32(lane[t], _mm512_maddubs_epi16(magnitude, y), scale);
                }
            }
            for t in 0..N {
                let d = _mm512_mul_ps(_mm512_set1_ps(std::ptr::read_unaligned(a[t] as *const f32)), dw);
                acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane[t]), acc[t]);
            }
        }
    }
    for (t, row) in (t0..t0 + N).enumerate() {
        _mm512_storeu_ps(out.add(row * stride), fold_lanes(std::array::from_fn(|l| acc[l][t])));
    }
}

/// The eight registers of unsigned quants of one group's block: register `k` pairs with
/// activation bytes `4k..4k + 4`.
#[inline(always)]
unsafe fn weights(dtype: DType, q: *const u8) -> [__m512i; 8] {
    if dtype == DType::Q8_0 {
        return std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k) as *const __m512i));
    }
    let low = _mm512_set1_epi8(0x0F);
    let packed: [__m512i; 4] = std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k) as *const __m512i));
    let mut w: [__m512i; 8] = std::array::from_fn(|k| {
        if k < 4 {
            _mm512_and_si512(packed[k], low)
        } else {
            _mm512_and_si512(_mm512_srli_epi16(packed[k - 4], 4), low)
        }
    });
    if matches!(dtype, DType::Q5_0 | DType::Q5_1) {
        let sixteen = _mm512_set1_epi8(16);
        let masks = q.add(256) as *const u64;
        for (k, v) in w.iter_mut().enumerate() {
            *v = _mm512_mask_add_epi8(*v, std::ptr::read_unaligned(masks.add(k)), *v, sixteen);
        }
    }
    w
}

#[inline(always)]
unsafe fn tile<const N: usize>(dtype: DType, group: *const u8, acts: &PackedActs, t0: usize, out: *mut f32, stride: usize) {
    let with_min = has_min(dtype);
    let header = if with_min { 64 } else { 32 };
    let bb = block_bytes(dtype);
    let zero_point = zero_point_index(dtype);
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let mut off = [_mm512_setzero_ps(); N];
    let table = acts.table;
    for b in 0..acts.blocks {
        let p = group.add(b * bb);
        prefetch_next_group(p, acts.blocks * bb, bb);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let w = weights(dtype, p.add(header));
        for (t, acc) in acc.iter_mut().enumerate() {
            let at = (t0 + t) * acts.blocks + b;
            let a = acts.base.add((t0 + t) * acts.row_bytes + b * acts.block_bytes + acts.quants_at) as *const i32;
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(*table.d.get_unchecked(at)));
            let corrections = zero_point.map(|z| table.corrections.as_ptr().add((at * ZERO_POINTS.len() + z) * 8));
            for (l, acc) in acc.iter_mut().enumerate() {
                // Lane l of ggml's dot product for all sixteen rows: the zero point times the
                // four activation quants' sum, taken back before the products are added.
                let start = match corrections {
                    Some(c) => _mm512_set1_epi32(*c.add(l)),
                    None => _mm512_setzero_si512(),
                };
                let lane = _mm512_dpbusd_epi32(start, w[l], _mm512_set1_epi32(std::ptr::read_unaligned(a.add(l))));
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane), *acc);
            }
            if with_min {
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i));
                off[t] = _mm512_add_ps(off[t], _mm512_mul_ps(m, _mm512_set1_ps(*table.s.get_unchecked(at))));
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        let sum = fold_lanes(*a);
        let r = if with_min { _mm512_add_ps(sum, off[t]) } else { sum };
        _mm512_storeu_ps(out.add((t0 + t) * stride), r);
    }
}
