//! AVX2 products over `packed` weights, for CPUs without AVX-512 VNNI.
//!
//! The layout is the one the VNNI kernels read: a 64-byte packed register holds four quants
//! of each of sixteen rows, so its two 32-byte halves hold rows 0..8 and 8..16, and each half
//! is one AVX2 register. Every kernel here runs the VNNI kernel's arithmetic for one half at
//! a time: `vpdpbusd` becomes `vpmaddubsw` (pairs of u8 × i8 products into i16, which never
//! saturate for the quant ranges below) followed by `vpmaddwd` (into i32), so every integer
//! lane sum is the same exact integer, and the f32 operations are the same ones in the same
//! order. Outputs therefore equal the VNNI kernels' (and `packed::reference`) bit for bit.
//!
//! Two halves rather than one 16-row pass: ggml's order keeps eight f32 accumulators per
//! output (one per lane), and sixteen outputs of one input row already fill AVX2's sixteen
//! registers. The half's weights stay in L1 between the two passes.
//!
//! # Safety
//! Every function here requires AVX2, FMA and F16C, and pointers valid for the packed group
//! and activation rows described by its arguments.

#![allow(unsafe_op_in_unsafe_fn, clippy::missing_safety_doc)]

use crate::dtype::DType;
use crate::packed::{block_bytes, has_min, zero_point, zero_point_index, Q2K_QUANTS, Q3K_HIGHS, Q3K_QUANTS, Q4K_QUANTS, Q5K_HIGHS, Q6K_HIGHS, Q6K_LOWS, ZERO_POINTS};
use crate::x86_packed::{prefetch_next_group, PackedActs};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows per half: an AVX2 register holds four quants of eight rows.
const HALF: usize = 8;

/// ggml's horizontal sum of eight lanes (`hsum_float_8`), for eight rows at once.
#[inline(always)]
unsafe fn fold_lanes(a: [__m256; 8]) -> __m256 {
    _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
        _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])),
    )
}

/// `acc` plus the u8 × i8 products of `w` and `y` summed in groups of four: `vpdpbusd`.
/// Exact while no pair of products exceeds the i16 range: weights up to 63 against any i8.
#[inline(always)]
unsafe fn dot4(acc: __m256i, w: __m256i, y: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1)))
}

/// The eight rows' f16 values of half `h` from sixteen stored at `p`, in f32.
#[inline(always)]
unsafe fn half_f16(p: *const u8, h: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h) as *const __m128i))
}

/// Half `h` of the 64-byte packed register at `p`.
#[inline(always)]
unsafe fn half_reg(p: *const u8, h: usize) -> __m256i {
    _mm256_loadu_si256(p.add(32 * h) as *const __m256i)
}

/// One byte per row of half `h` from sixteen stored at `p`, as eight i32 lanes.
#[inline(always)]
unsafe fn half_bytes_u32(p: *const u8, h: usize) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8 * h) as *const __m128i))
}

/// 16 in each byte of half `h` of a register whose bit is set in the packed 64-bit `mask`
/// (bit `4j + t` for byte `4j + t`), else 0: the fifth bits of Q5 quants.
#[inline(always)]
unsafe fn fifth_bits(mask: *const u64, h: usize) -> __m256i {
    mask_bytes(mask, h, 16)
}

/// `value` in each byte of half `h` of a register whose bit is set in `mask`, else 0.
#[inline(always)]
unsafe fn mask_bytes(mask: *const u64, h: usize, value: i8) -> __m256i {
    let bits = std::ptr::read_unaligned((mask as *const u32).add(h));
    // Byte i of the result takes byte i / 8 of `bits`, then is all ones iff bit i % 8 is set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
    );
    let others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_and_si256(_mm256_cmpeq_epi8(others, _mm256_set1_epi8(-1)), _mm256_set1_epi8(value))
}

thread_local! {
    /// One group half's weights unpacked (a byte per quant, scales widened), reused by every
    /// input row of a product: unpacking costs as much as the products of one row.
    static UNPACKED: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// Registers one block (a super-block for the K formats) takes once unpacked.
const fn unpacked_regs(dtype: DType) -> usize {
    match dtype {
        DType::Q8_0 => 18,
        DType::Q4K | DType::Q5K => 82,
        DType::Q6K => 89,
        DType::Q2K => 90,
        DType::Q3K => 145,
        _ => 10,
    }
}

/// A buffer of `regs` registers for this thread's unpacked weights. Only `packed_product!`
/// uses it, and products do not nest, so the pointer stays valid (and unaliased) until the
/// product returns.
fn unpacked_buffer(regs: usize) -> *mut __m256i {
    UNPACKED.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < regs {
            buf.resize(regs, unsafe { _mm256_setzero_si256() });
        }
        buf.as_mut_ptr()
    })
}

/// A packed product, each half of the group in turn: `$unpack` writes block `$p`'s half `$h`
/// unpacked to `$u`; `$row` computes input row `$t` into `$o` reading block `b` unpacked at
/// `$blocks(b)`. One input row (decode) unpacks each block just before its products, where
/// it stays in registers; several rows unpack the whole half once into a per-thread buffer
/// that each of them reads, so the unpacking is paid once per group.
macro_rules! packed_product {
    ($dtype:expr, $group:expr, $acts:expr, ($t0:expr, $count:expr), ($out:expr, $stride:expr),
     |$p:ident, $h:ident, $u:ident| $unpack:expr, |$blocks:ident, $t:ident, $o:ident| $row:expr) => {{
        let (per_block, bb, group, acts, out, stride) = (unpacked_regs($dtype), block_bytes($dtype), $group, $acts, $out, $stride);
        let (t0, count): (usize, usize) = ($t0, $count);
        if count == 1 {
            for $h in 0..2 {
                let mut one = [_mm256_setzero_si256(); unpacked_regs($dtype)];
                let $blocks = |b: usize| {
                    let ($p, $u) = (group.add(b * bb), one.as_mut_ptr());
                    // The first half brings this group in from memory and the second reads
                    // it from cache: both ask for the next group meanwhile, which keeps
                    // memory busy while this one computes (the first half's requests add to
                    // the loads in flight; the second's retry any the first had dropped).
                    prefetch_next_group(group.add(b * bb), acts.blocks * bb, bb);
                    $unpack;
                    one.as_ptr()
                };
                let ($t, $o) = (t0, out.add(t0 * stride + HALF * $h));
                $row;
            }
        } else {
            let unpacked = unpacked_buffer(per_block * acts.blocks);
            for $h in 0..2 {
                for b in 0..acts.blocks {
                    let ($p, $u) = (group.add(b * bb), unpacked.add(b * per_block));
                    $unpack;
                }
                for $t in t0..t0 + count {
                    let $blocks = |b: usize| {
                        if $h == 1 && $t == t0 {
                            prefetch_next_group(group.add(b * bb), acts.blocks * bb, bb);
                        }
                        unpacked.add(b * per_block) as *const __m256i
                    };
                    let $o = out.add($t * stride + HALF * $h);
                    $row;
                }
            }
        }
    }};
}

/// `PackedFn`s for the 32-value formats. Unpacked block: `d` (f32), `m` (f32, Q4_1 and Q5_1),
/// then eight registers of quants, register `k` pairing with activation bytes `4k..4k + 4`:
/// unsigned as stored, except Q8_0's, whose absolute values come first and signed values
/// after (the stored offset of 128 would overflow `vpmaddubsw`; Q8_0 uses the sign trick).
macro_rules! block_kernels {
    ($($fname:ident => $dtype:expr;)*) => {$(
        /// A `PackedFn` for one format.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $fname(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
            packed_product!($dtype, group, acts, (t0, count), (out, stride), |p, h, u| unpack_block($dtype, p, h, u), |blocks, t, o| {
                if $dtype == DType::Q4_0 {
                    q4_0_row(blocks, acts, t, o)
                } else {
                    lanes_row($dtype, blocks, acts, t, o)
                }
            });
        }
    )*};
}

block_kernels! {
    q4_0 => DType::Q4_0;
    q4_1 => DType::Q4_1;
    q5_0 => DType::Q5_0;
    q5_1 => DType::Q5_1;
    q8_0 => DType::Q8_0;
}

#[inline(always)]
unsafe fn unpack_block(dtype: DType, p: *const u8, h: usize, u: *mut __m256i) {
    let header = if has_min(dtype) { 64 } else { 32 };
    let q = p.add(header);
    *u = _mm256_castps_si256(half_f16(p, h));
    if has_min(dtype) {
        *u.add(1) = _mm256_castps_si256(half_f16(p.add(32), h));
    }
    if dtype == DType::Q8_0 {
        let flip = _mm256_set1_epi8(-128);
        for k in 0..8 {
            let w = _mm256_xor_si256(half_reg(q.add(64 * k), h), flip);
            *u.add(2 + k) = _mm256_sign_epi8(w, w);
            *u.add(10 + k) = w;
        }
        return;
    }
    let low = _mm256_set1_epi8(0x0F);
    for k in 0..4 {
        let r = half_reg(q.add(64 * k), h);
        *u.add(2 + k) = _mm256_and_si256(r, low);
        *u.add(6 + k) = _mm256_and_si256(_mm256_srli_epi16(r, 4), low);
    }
    if matches!(dtype, DType::Q5_0 | DType::Q5_1) {
        let masks = q.add(256) as *const u64;
        for k in 0..8 {
            *u.add(2 + k) = _mm256_or_si256(*u.add(2 + k), fifth_bits(masks.add(k), h));
        }
    }
}

/// Q4_1, Q5_0, Q5_1 and Q8_0, one input row: eight lanes per output scaled and accumulated
/// per block, folded at the end, the minima's terms added last.
#[inline(always)]
unsafe fn lanes_row(dtype: DType, mut blocks: impl FnMut(usize) -> *const __m256i, acts: &PackedActs, t: usize, out: *mut f32) {
    let with_min = has_min(dtype);
    let zero_point = zero_point_index(dtype).filter(|_| dtype != DType::Q8_0);
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut off = _mm256_setzero_ps();
    let table = acts.table;
    for b in 0..acts.blocks {
        let u = blocks(b);
        let at = t * acts.blocks + b;
        let a = acts.base.add(t * acts.row_bytes + b * acts.block_bytes + acts.quants_at) as *const i32;
        let d = _mm256_mul_ps(_mm256_castsi256_ps(*u), _mm256_set1_ps(*table.d.get_unchecked(at)));
        let corrections = zero_point.map(|z| table.corrections.as_ptr().add((at * ZERO_POINTS.len() + z) * 8));
        for (l, acc) in acc.iter_mut().enumerate() {
            let y = _mm256_set1_epi32(std::ptr::read_unaligned(a.add(l)));
            let lane = if dtype == DType::Q8_0 {
                // |w| <= 128 against y (|y| <= 127) with w's sign: pairs stay within i16.
                _mm256_madd_epi16(_mm256_maddubs_epi16(*u.add(2 + l), _mm256_sign_epi8(y, *u.add(10 + l))), _mm256_set1_epi16(1))
            } else {
                let start = match corrections {
                    Some(c) => _mm256_set1_epi32(*c.add(l)),
                    None => _mm256_setzero_si256(),
                };
                dot4(start, *u.add(2 + l), y)
            };
            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane), *acc);
        }
        if with_min {
            off = _mm256_add_ps(off, _mm256_mul_ps(_mm256_castsi256_ps(*u.add(1)), _mm256_set1_ps(*table.s.get_unchecked(at))));
        }
    }
    let sum = fold_lanes(acc);
    _mm256_storeu_ps(out, if with_min { _mm256_add_ps(sum, off) } else { sum });
}

/// Q4_0, one input row: each block's integer sum scaled and accumulated on its own (ggml's
/// 8-row interleaved order).
#[inline(always)]
unsafe fn q4_0_row(mut blocks: impl FnMut(usize) -> *const __m256i, acts: &PackedActs, t: usize, out: *mut f32) {
    let mut acc = _mm256_setzero_ps();
    let table = acts.table;
    for b in 0..acts.blocks {
        let u = blocks(b);
        let at = t * acts.blocks + b;
        let a = acts.base.add(t * acts.row_bytes + b * acts.block_bytes + acts.quants_at) as *const i32;
        // Eight pairs of products of 4-bit weights and i8 activations, at most 8 x 2 x 15 x
        // 128 in magnitude: the whole block's sum fits each i16 lane before widening.
        let mut pairs = _mm256_setzero_si256();
        for l in 0..8 {
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(*u.add(2 + l), _mm256_set1_epi32(std::ptr::read_unaligned(a.add(l)))));
        }
        let start = _mm256_set1_epi32(-zero_point(DType::Q4_0) * *table.sums.get_unchecked(at));
        let total = _mm256_add_epi32(start, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        let d = _mm256_mul_ps(_mm256_castsi256_ps(*u), _mm256_set1_ps(*table.d.get_unchecked(at)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), d, acc);
    }
    _mm256_storeu_ps(out, acc);
}

/// A sub-block scale of half `h`'s rows (bytes at `p`) in both i16 halves of each lane, so
/// `vpmaddwd` with i16 pair sums yields scale × (sum of the pair).
#[inline(always)]
unsafe fn scale_pairs(p: *const u8, h: usize) -> __m256i {
    let s = half_bytes_u32(p, h);
    _mm256_or_si256(s, _mm256_slli_epi32(s, 16))
}

/// The K formats' header as unpacked for Q4_K and Q5_K: `d`, `dmin` (f32), the eight
/// sub-blocks' scales (`scale_pairs`), then their minima as i32 lanes whose upper i16 is zero
/// (`vpmaddwd` with a broadcast i16 yields minimum × that value).
#[inline(always)]
unsafe fn unpack_k_header(p: *const u8, h: usize, u: *mut __m256i) {
    *u = _mm256_castps_si256(half_f16(p, h));
    *u.add(1) = _mm256_castps_si256(half_f16(p.add(32), h));
    for sub in 0..8 {
        *u.add(2 + sub) = scale_pairs(p.add(64 + 16 * sub), h);
        *u.add(10 + sub) = half_bytes_u32(p.add(192 + 16 * sub), h);
    }
}

/// The minima's integer sum of one super-block: each sub-block's minimum times the sum of its
/// 32 activation quants (two `bsums`, each at most 16 x 128, so the pair fits an i16).
#[inline(always)]
unsafe fn k_minima(u: *const __m256i, a: *const u8) -> __m256i {
    let bsums = a.add(4 + 256) as *const i16;
    let mut total = _mm256_setzero_si256();
    for sub in 0..8 {
        let pair = std::ptr::read_unaligned(bsums.add(2 * sub)) as i32 + std::ptr::read_unaligned(bsums.add(2 * sub + 1)) as i32;
        total = _mm256_add_epi32(total, _mm256_madd_epi16(*u.add(10 + sub), _mm256_set1_epi32(pair)));
    }
    total
}

/// `PackedFn` for Q4_K against Q8_K activations. Unpacked super-block: `unpack_k_header`,
/// then for each of the 32 registers its low and high nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    packed_product!(DType::Q4K, group, acts, (t0, count), (out, stride), |p, h, u| unpack_k4(p, h, u, false), |blocks, t, o| q4k_row(blocks, acts, t, o));
}

/// The Q4_K layout shared by Q5_K: header and quants (with the fifth bits for Q5_K).
#[inline(always)]
unsafe fn unpack_k4(p: *const u8, h: usize, u: *mut __m256i, fifth: bool) {
    unpack_k_header(p, h, u);
    let low = _mm256_set1_epi8(0x0F);
    for reg in 0..32 {
        let r = half_reg(p.add(Q4K_QUANTS + 64 * reg), h);
        let (mut lo, mut hi) = (_mm256_and_si256(r, low), _mm256_and_si256(_mm256_srli_epi16(r, 4), low));
        if fifth {
            let masks = p.add(Q5K_HIGHS + 16 * reg) as *const u64;
            lo = _mm256_or_si256(lo, fifth_bits(masks, h));
            hi = _mm256_or_si256(hi, fifth_bits(masks.add(1), h));
        }
        *u.add(18 + 2 * reg) = lo;
        *u.add(19 + 2 * reg) = hi;
    }
}

#[inline(always)]
unsafe fn q4k_row(mut blocks: impl FnMut(usize) -> *const __m256i, acts: &PackedActs, t: usize, out: *mut f32) {
    let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..acts.blocks {
        let u = blocks(b);
        let a = acts.base.add(t * acts.row_bytes + b * acts.block_bytes);
        let mut total = _mm256_setzero_si256();
        for c in 0..4 {
            // A sub-block's products, at most 8 x 2 x 15 x 128: within each i16 lane.
            let (mut lo_pairs, mut hi_pairs) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in 0..8 {
                let q = a.add(4 + 64 * c + 4 * k);
                let reg = u.add(18 + 2 * (8 * c + k));
                lo_pairs = _mm256_add_epi16(lo_pairs, _mm256_maddubs_epi16(*reg, _mm256_set1_epi32(std::ptr::read_unaligned(q as *const i32))));
                hi_pairs = _mm256_add_epi16(hi_pairs, _mm256_maddubs_epi16(*reg.add(1), _mm256_set1_epi32(std::ptr::read_unaligned(q.add(32) as *const i32))));
            }
            total = _mm256_add_epi32(total, _mm256_madd_epi16(lo_pairs, *u.add(2 + 2 * c)));
            total = _mm256_add_epi32(total, _mm256_madd_epi16(hi_pairs, *u.add(3 + 2 * c)));
        }
        let total_min = k_minima(u, a);
        let dy = _mm256_set1_ps(std::ptr::read_unaligned(a as *const f32));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(_mm256_castsi256_ps(*u), dy), acc);
        acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total_min), _mm256_mul_ps(_mm256_castsi256_ps(*u.add(1)), dy), acc_min);
    }
    _mm256_storeu_ps(out, _mm256_sub_ps(acc, acc_min));
}

/// `PackedFn` for Q5_K against Q8_K activations; unpacked as Q4_K with the fifth bits added.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q5k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    packed_product!(DType::Q5K, group, acts, (t0, count), (out, stride), |p, h, u| unpack_k4(p, h, u, true), |blocks, t, o| q5k_row(blocks, acts, t, o));
}

#[inline(always)]
unsafe fn q5k_row(mut blocks: impl FnMut(usize) -> *const __m256i, acts: &PackedActs, t: usize, out: *mut f32) {
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut mins = _mm256_setzero_ps();
    for b in 0..acts.blocks {
        let u = blocks(b);
        let a = acts.base.add(t * acts.row_bytes + b * acts.block_bytes);
        let dy = std::ptr::read_unaligned(a as *const f32);
        let total_min = k_minima(u, a);
        mins = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(-dy), _mm256_castsi256_ps(*u.add(1))), _mm256_cvtepi32_ps(total_min), mins);
        let d = _mm256_mul_ps(_mm256_set1_ps(dy), _mm256_castsi256_ps(*u));
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut lane = _mm256_setzero_si256();
            for c in 0..4 {
                let reg = u.add(18 + 2 * (8 * c + l));
                let q = a.add(4 + 64 * c + 4 * l);
                let y_lo = _mm256_set1_epi32(std::ptr::read_unaligned(q as *const i32));
                let y_hi = _mm256_set1_epi32(std::ptr::read_unaligned(q.add(32) as *const i32));
                lane = _mm256_add_epi32(lane, _mm256_madd_epi16(_mm256_maddubs_epi16(*reg, y_lo), *u.add(2 + 2 * c)));
                lane = _mm256_add_epi32(lane, _mm256_madd_epi16(_mm256_maddubs_epi16(*reg.add(1), y_hi), *u.add(3 + 2 * c)));
            }
            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane), *acc);
        }
    }
    _mm256_storeu_ps(out, _mm256_add_ps(fold_lanes(acc), mins));
}

/// `PackedFn` for Q6_K against Q8_K activations. Unpacked super-block: `d` (f32), the eight
/// scale pairs `(s[2k], s[2k + 1])` as i16, for each 32-value chunk its pair's first and
/// second scale in both i16 halves of each lane, then the quants (0..64) of each chunk and
/// lane.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    packed_product!(DType::Q6K, group, acts, (t0, count), (out, stride), |p, h, u| unpack_q6k(p, h, u), |blocks, t, o| q6k_row(blocks, acts, t, o));
}

#[inline(always)]
unsafe fn unpack_q6k(p: *const u8, h: usize, u: *mut __m256i) {
    // Byte shuffles (within each 128-bit lane) copying the first (second) i16 of each 32-bit
    // lane into both its halves.
    let dup_first = _mm256_broadcastsi128_si256(_mm_setr_epi32(0x0100_0100, 0x0504_0504, 0x0908_0908, 0x0D0C_0D0C));
    let dup_second = _mm256_broadcastsi128_si256(_mm_setr_epi32(0x0302_0302, 0x0706_0706, 0x0B0A_0B0A, 0x0F0E_0F0E));
    *u = _mm256_castps_si256(half_f16(p, h));
    for k in 0..8 {
        let pair = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(32 + 32 * k + 16 * h) as *const __m128i));
        *u.add(1 + k) = pair;
        *u.add(9 + 2 * k) = _mm256_shuffle_epi8(pair, dup_first);
        *u.add(10 + 2 * k) = _mm256_shuffle_epi8(pair, dup_second);
    }
    for chunk in 0..8 {
        for l in 0..8 {
            let lows = half_reg(p.add(Q6K_LOWS + 64 * (8 * (chunk / 2) + l)), h);
            let highs = half_reg(p.add(Q6K_HIGHS + 64 * (8 * (chunk / 4) + l)), h);
            let lo = if chunk % 2 == 0 { lows } else { _mm256_srli_epi16(lows, 4) };
            // Bits 2u..2u + 2 of each byte to bits 4..6; what crosses into a neighbouring
            // byte lands outside those bits and is masked off.
            let hi = match chunk % 4 {
                0 => _mm256_slli_epi16(highs, 4),
                1 => _mm256_slli_epi16(highs, 2),
                2 => highs,
                _ => _mm256_srli_epi16(highs, 2),
            };
            *u.add(25 + 8 * chunk + l) = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(0x0F)), _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
        }
    }
}

#[inline(always)]
unsafe fn q6k_row(mut blocks: impl FnMut(usize) -> *const __m256i, acts: &PackedActs, t: usize, out: *mut f32) {
    let mut acc = [_mm256_setzero_ps(); 8];
    for b in 0..acts.blocks {
        let u = blocks(b);
        let a = acts.base.add(t * acts.row_bytes + b * acts.block_bytes);
        let d = _mm256_mul_ps(_mm256_set1_ps(std::ptr::read_unaligned(a as *const f32)), _mm256_castsi256_ps(*u));
        for (l, acc) in acc.iter_mut().enumerate() {
            // ggml's offset for lane l: 32 x (bsums[2l] s[2l] + bsums[2l + 1] s[2l + 1]).
            let bsums = std::ptr::read_unaligned(a.add(260 + 4 * l) as *const i32);
            let offset = _mm256_madd_epi16(*u.add(1 + l), _mm256_set1_epi32(bsums));
            let mut lane = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(offset, 5));
            for chunk in 0..8 {
                let scale = *u.add(9 + 2 * chunk + usize::from(l >= 4));
                let y = _mm256_set1_epi32(std::ptr::read_unaligned(a.add(4 + 32 * chunk + 4 * l) as *const i32));
                lane = _mm256_add_epi32(lane, _mm256_madd_epi16(_mm256_maddubs_epi16(*u.add(25 + 8 * chunk + l), y), scale));
            }
            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane), *acc);
        }
    }
    _mm256_storeu_ps(out, fold_lanes(acc));
}

/// Half `h` of the low two bits of chunk `c`, lane `l` of a packed Q2_K or Q3_K super-block
/// whose quants start at `quants`.
#[inline(always)]
unsafe fn k2_low_bits(quants: *const u8, c: usize, l: usize, h: usize) -> __m256i {
    let r = half_reg(quants.add(64 * (8 * (c / 4) + l)), h);
    // Shifting 16-bit lanes drags the upper byte's bits down, but only above bit 1.
    _mm256_and_si256(_mm256_srl_epi16(r, _mm_cvtsi32_si128(2 * (c % 4) as i32)), _mm256_set1_epi8(3))
}

/// `PackedFn` for Q2_K against Q8_K activations, in ggml's single-row order (`x86::*::q2k`).
/// Unpacked super-block: `d`, `dmin` (f32), the sixteen scales (`scale_pairs`), each lane's
/// minima pair `(min[2l], min[2l + 1])` as i16, then the quants (0..4) of each chunk and lane.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q2k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    packed_product!(DType::Q2K, group, acts, (t0, count), (out, stride), |p, h, u| unpack_q2k(p, h, u), |blocks, t, o| k2_row(DType::Q2K, blocks, acts, t, o));
}

#[inline(always)]
unsafe fn unpack_q2k(p: *const u8, h: usize, u: *mut __m256i) {
    *u = _mm256_castps_si256(half_f16(p, h));
    *u.add(1) = _mm256_castps_si256(half_f16(p.add(32), h));
    for sub in 0..16 {
        *u.add(2 + sub) = scale_pairs(p.add(64 + 16 * sub), h);
    }
    for l in 0..8 {
        let (lo, hi) = (half_bytes_u32(p.add(320 + 16 * (2 * l)), h), half_bytes_u32(p.add(320 + 16 * (2 * l + 1)), h));
        *u.add(18 + l) = _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16));
    }
    for c in 0..8 {
        for l in 0..8 {
            *u.add(26 + 8 * c + l) = k2_low_bits(p.add(Q2K_QUANTS), c, l, h);
        }
    }
}

/// `PackedFn` for Q3_K against Q8_K activations, in ggml's single-row order (`x86::*::q3k`).
/// Unpacked super-block: `d` (f32), the sixteen signed scales in both i16 halves of each
/// lane, then each chunk and lane's quants (-4..4) as absolute values and as signed values
/// (the sign trick: activations are -127..127, so negating them cannot overflow).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q3k(group: *const u8, acts: &PackedActs, t0: usize, count: usize, out: *mut f32, stride: usize) {
    packed_product!(DType::Q3K, group, acts, (t0, count), (out, stride), |p, h, u| unpack_q3k(p, h, u), |blocks, t, o| k2_row(DType::Q3K, blocks, acts, t, o));
}

#[inline(always)]
unsafe fn unpack_q3k(p: *const u8, h: usize, u: *mut __m256i) {
    *u = _mm256_castps_si256(half_f16(p, h));
    for sub in 0..16 {
        let s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(32 + 16 * sub + 8 * h) as *const __m128i));
        *u.add(1 + sub) = _mm256_or_si256(_mm256_and_si256(s, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(s, 16));
    }
    for c in 0..8 {
        for l in 0..8 {
            let third = mask_bytes(p.add(Q3K_HIGHS + 8 * (8 * c + l)) as *const u64, h, 4);
            let q = _mm256_sub_epi8(_mm256_or_si256(k2_low_bits(p.add(Q3K_QUANTS), c, l, h), third), _mm256_set1_epi8(4));
            *u.add(17 + 8 * c + l) = _mm256_abs_epi8(q);
            *u.add(81 + 8 * c + l) = q;
        }
    }
}

/// Q2_K or Q3_K, one input row: eight lanes per output, each scaled once per super-block
/// (Q2_K's minima lanes, scaled by -dmin, added before its products').
#[inline(always)]
unsafe fn k2_row(dtype: DType, mut blocks: impl FnMut(usize) -> *const __m256i, acts: &PackedActs, t: usize, out: *mut f32) {
    // Where the scales and quants sit in the unpacked super-block (`unpack_q2k`, `unpack_q3k`).
    let (scales, quants) = if dtype == DType::Q2K { (2, 26) } else { (1, 17) };
    let mut acc = [_mm256_setzero_ps(); 8];
    for b in 0..acts.blocks {
        let u = blocks(b);
        let a = acts.base.add(t * acts.row_bytes + b * acts.block_bytes);
        let dy = std::ptr::read_unaligned(a as *const f32);
        let d = _mm256_mul_ps(_mm256_set1_ps(dy), _mm256_castsi256_ps(*u));
        for (l, acc) in acc.iter_mut().enumerate() {
            if dtype == DType::Q2K {
                // The minima of sub-blocks 2l and 2l + 1 against their activation sums.
                let bsums = std::ptr::read_unaligned(a.add(260 + 4 * l) as *const i32);
                let m = _mm256_madd_epi16(*u.add(18 + l), _mm256_set1_epi32(bsums));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(-dy), _mm256_castsi256_ps(*u.add(1))), _mm256_cvtepi32_ps(m), *acc);
            }
            let mut lane = _mm256_setzero_si256();
            for c in 0..8 {
                let y = _mm256_set1_epi32(std::ptr::read_unaligned(a.add(4 + 32 * c + 4 * l) as *const i32));
                let q = *u.add(quants + 8 * c + l);
                let products = if dtype == DType::Q2K { _mm256_maddubs_epi16(q, y) } else { _mm256_maddubs_epi16(q, _mm256_sign_epi8(y, *u.add(quants + 64 + 8 * c + l))) };
                lane = _mm256_add_epi32(lane, _mm256_madd_epi16(products, *u.add(scales + 2 * c + usize::from(l >= 4))));
            }
            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane), *acc);
        }
    }
    _mm256_storeu_ps(out, fold_lanes(acc));
}
