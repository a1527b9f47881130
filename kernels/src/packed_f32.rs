//! Products of F32 weights in the column-order layout of `packed` (sixteen rows per group,
//! each column's sixteen values in one 64-byte line) with f32 input rows.
//!
//! The dot-product kernels (`x86::*::f32`) read one weight row and one input row at a time
//! and reduce eight or sixteen lanes at the end: about 1.25 loads per multiply-add, and the
//! order llama.cpp's F32 `vec_dot` uses. Here a weight column is loaded once and multiplied by
//! each of up to eight input values broadcast from their rows (on AVX-512, the columns of two
//! groups share the broadcasts), so each load feeds several multiply-adds and nothing is
//! reduced across lanes. The caller (`matmul`) hands input rows over in blocks that stay in
//! cache while the groups stream past. Every output is the sum over the columns
//! in order, one fused multiply-add at a time from zero (`reference`), whatever the number of
//! input rows and on every instruction set: results do not depend on the batch and are the
//! same on AVX2 and AVX-512 CPUs. That order is not llama.cpp's, so only models that ask for
//! it use it (encoders: `MatrixRef::in_column_order` in the worker).

use crate::packed::GROUP;

/// Rows `0..count` of the inputs (`x`, `cols` values each, one after the other) against
/// `groups` consecutive packed groups starting at `group` (each `16 * cols` values);
/// input row `t`'s outputs of group `g` go to `out[t * stride + 16 * g..][..16]`.
///
/// # Safety
/// `group` must hold `groups * 16 * cols` values, `x` `count` rows as described, and `out`
/// room for `count` rows of `stride` values with `16 * groups` at the start of each.
pub type PackedF32Fn = unsafe fn(group: *const f32, groups: usize, cols: usize, x: *const f32, count: usize, out: *mut f32, stride: usize);

/// The kernel for this instruction set (None below AVX2, where the dot-product kernels run).
pub fn kernel(isa: crate::Isa) -> Option<PackedF32Fn> {
    #[cfg(target_arch = "x86_64")]
    {
        if isa.vnni() {
            return Some(x86::rows_zmm);
        }
        if isa.avx2() {
            return Some(x86::rows_ymm);
        }
    }
    let _ = isa;
    None
}

/// The order every kernel keeps: for each output, one fused multiply-add per column.
pub fn reference(group: &[f32], cols: usize, x: &[f32], x_stride: usize, count: usize, out: &mut [f32], stride: usize) {
    for t in 0..count {
        let row = &x[t * x_stride..t * x_stride + cols];
        for j in 0..GROUP {
            let mut acc = 0.0f32;
            for (k, &v) in row.iter().enumerate() {
                acc = v.mul_add(group[k * GROUP + j], acc);
            }
            out[t * stride + j] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512: sixteen outputs per register; two groups by eight input rows at a time, so
    /// that two weight loads and eight broadcasts feed sixteen multiply-adds (a core with
    /// two 512-bit FMA units is then bound by its multiply-adds rather than its loads).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows_zmm(group: *const f32, groups: usize, cols: usize, x: *const f32, count: usize, out: *mut f32, stride: usize) {
        let mut g = 0;
        while g < groups {
            let (w, o) = (group.add(g * 16 * cols), out.add(16 * g));
            if g + 2 <= groups {
                rows_of::<2>(w, cols, x, count, o, stride);
                g += 2;
            } else {
                rows_of::<1>(w, cols, x, count, o, stride);
                g += 1;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn rows_of<const G: usize>(group: *const f32, cols: usize, x: *const f32, count: usize, out: *mut f32, stride: usize) {
        let mut t = 0;
        while t + 8 <= count {
            tile_zmm::<G, 8>(group, cols, x.add(t * cols), out.add(t * stride), stride);
            t += 8;
        }
        let (x, out) = (x.add(t * cols), out.add(t * stride));
        match count - t {
            0 => {}
            1 => tile_zmm::<G, 1>(group, cols, x, out, stride),
            2 => tile_zmm::<G, 2>(group, cols, x, out, stride),
            3 => tile_zmm::<G, 3>(group, cols, x, out, stride),
            4 => tile_zmm::<G, 4>(group, cols, x, out, stride),
            5 => tile_zmm::<G, 5>(group, cols, x, out, stride),
            6 => tile_zmm::<G, 6>(group, cols, x, out, stride),
            _ => tile_zmm::<G, 7>(group, cols, x, out, stride),
        }
    }

    /// `G` groups (consecutive, `16 * cols` values apart) by `M` input rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile_zmm<const G: usize, const M: usize>(group: *const f32, cols: usize, x: *const f32, out: *mut f32, stride: usize) {
        let rows: [*const f32; M] = std::array::from_fn(|t| x.add(t * cols));
        let lines: [*const f32; G] = std::array::from_fn(|g| group.add(g * 16 * cols));
        let mut acc = [[_mm512_setzero_ps(); M]; G];
        for k in 0..cols {
            let w: [__m512; G] = std::array::from_fn(|g| _mm512_loadu_ps(lines[g].add(16 * k)));
            for t in 0..M {
                let v = _mm512_set1_ps(*rows[t].add(k));
                for g in 0..G {
                    acc[g][t] = _mm512_fmadd_ps(v, w[g], acc[g][t]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (t, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(t * stride + 16 * g), *a);
            }
        }
    }

    /// AVX2: sixteen outputs in two registers, six input rows at a time (twelve accumulators,
    /// the two weight halves and a broadcast fill AVX2's sixteen registers).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_ymm(group: *const f32, groups: usize, cols: usize, x: *const f32, count: usize, out: *mut f32, stride: usize) {
        for g in 0..groups {
            group_ymm(group.add(g * 16 * cols), cols, x, count, out.add(16 * g), stride);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group_ymm(group: *const f32, cols: usize, x: *const f32, count: usize, out: *mut f32, stride: usize) {
        let mut t = 0;
        while t + 6 <= count {
            tile_ymm::<6>(group, cols, x.add(t * cols), out.add(t * stride), stride);
            t += 6;
        }
        let (x, out) = (x.add(t * cols), out.add(t * stride));
        match count - t {
            0 => {}
            1 => tile_ymm::<1>(group, cols, x, out, stride),
            2 => tile_ymm::<2>(group, cols, x, out, stride),
            3 => tile_ymm::<3>(group, cols, x, out, stride),
            4 => tile_ymm::<4>(group, cols, x, out, stride),
            _ => tile_ymm::<5>(group, cols, x, out, stride),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_ymm<const M: usize>(group: *const f32, cols: usize, x: *const f32, out: *mut f32, stride: usize) {
        let rows: [*const f32; M] = std::array::from_fn(|t| x.add(t * cols));
        let mut lo = [_mm256_setzero_ps(); M];
        let mut hi = [_mm256_setzero_ps(); M];
        for k in 0..cols {
            let (wl, wh) = (_mm256_loadu_ps(group.add(16 * k)), _mm256_loadu_ps(group.add(16 * k + 8)));
            for t in 0..M {
                let v = _mm256_broadcast_ss(&*rows[t].add(k));
                lo[t] = _mm256_fmadd_ps(v, wl, lo[t]);
                hi[t] = _mm256_fmadd_ps(v, wh, hi[t]);
            }
        }
        for t in 0..M {
            _mm256_storeu_ps(out.add(t * stride), lo[t]);
            _mm256_storeu_ps(out.add(t * stride + 8), hi[t]);
        }
    }
}
