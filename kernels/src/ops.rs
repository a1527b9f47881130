//! Element-wise and row-wise operations of a transformer layer.
//!
//! Where llama.cpp's arithmetic has a particular shape (a double-precision sum in RMSNorm,
//! GELU read from a table of half floats, RoPE angles built by repeated multiplication) the
//! same shape is kept here, so that kiln and llama.cpp agree token for token.

use crate::blocks::{f16_bits_to_f32, f32_to_f16_bits};
use std::sync::OnceLock;

/// `y = x / rms(x) * weight` over one row. The sum of squares runs in f64.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in y.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// In-place `rms_norm` for rows that are normalized where they live (per-head q/k norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

pub fn scale_in_place(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// `a · b` over the shorter of the two, with the widest f32 kernel `isa` has (the result's
/// rounding depends on `isa` only, never on where the slices sit).
pub fn dot_f32(isa: crate::Isa, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if isa.vnni() {
            // SAFETY: both slices hold at least n values; AVX-512 presence is implied by `isa`.
            return unsafe { crate::x86::f32_zmm(a.as_ptr() as *const u8, b.as_ptr() as *const u8, n) };
        }
        if isa.avx2() {
            // SAFETY: as above, for AVX2/FMA.
            return unsafe { crate::x86::f32_dot(a.as_ptr(), b.as_ptr(), n) };
        }
    }
    let _ = isa;
    a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum()
}

/// `acc += p · x`, element by element (each element one fused multiply-add where `isa` has
/// FMA, so the result does not depend on the vector width).
pub fn axpy_f32(isa: crate::Isa, acc: &mut [f32], p: f32, x: &[f32]) {
    let n = acc.len().min(x.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: both slices hold at least n values; AVX2/FMA presence is implied by `isa`.
        unsafe { crate::x86::axpy_f32(acc.as_mut_ptr(), p, x.as_ptr(), n) };
        return;
    }
    let _ = isa;
    for (a, &v) in acc[..n].iter_mut().zip(&x[..n]) {
        *a = p.mul_add(v, *a);
    }
}

/// SwiGLU: `gate = silu(gate) * up`, written into `gate`. Whole groups of 16 use the
/// polynomial exponential, the remainder the C library's, as llama.cpp does.
pub fn silu_mul(isa: crate::Isa, gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let groups = n & !15;
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2/FMA presence is implied by `isa`.
        unsafe { crate::x86::silu_mul_groups(&mut gate[..groups], &up[..groups]) };
    } else {
        silu_mul_scalar(&mut gate[..groups], &up[..groups]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        silu_mul_scalar(&mut gate[..groups], &up[..groups]);
    }
    for (g, &u) in gate[groups..n].iter_mut().zip(&up[groups..n]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + crate::numerics::exp_poly(0.0 - *g)) * u;
    }
}

/// The inner `1 + a·x·x` is one fused multiply-add, as llama.cpp's compiler emits it: summed
/// apart, the half-float input -1.999 tabulates one unit lower than llama.cpp's entry.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (COEF_A * x).mul_add(x, 1.0)).tanh())
}

/// GELU (tanh form) of every half-float input, rounded to half, as llama.cpp tabulates it.
fn gelu_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|bits| f32_to_f16_bits(gelu_tanh(f16_bits_to_f32(bits)))).collect())
}

/// GeGLU: `gate = gelu(gate) * up`, written into `gate`. Inputs are rounded to half floats
/// and looked up, except in the tails where GELU is 0 or the identity.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            f16_bits_to_f32(table[f32_to_f16_bits(x) as usize]) * u
        };
    }
}

/// erf(t) for t in [0, 4] as a polynomial in `t / 2 - 1`, highest degree first (made by
/// `scripts/numerics/erf_poly.py`): at most 2.9e-7 from erf there; past 4, erf rounds to 1 in
/// single precision, and the polynomial's value at 4 is exactly 1. Its value at 0 is -1.8e-7,
/// so its sign is dropped before erf's is applied.
pub(crate) const ERF_POLY: [u32; 17] = [
    0xBB85_43B2, 0x3C99_1C52, 0x3B7C_74C4, 0xBDC5_EAE9, 0x3D98_B907, 0x3E33_0065, 0xBE98_5ED1, 0xBBA2_ACA5, 0x3ED5_447E, 0xBEE0_AA42,
    0x3CE2_C46E, 0x3ED6_F7D2, 0xBF0D_0BA4, 0x3EC5_7BFB, 0xBE29_4F58, 0x3D29_4F63, 0x3F7E_CD71,
];

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`, in place, with `ERF_POLY` for erf: every
/// instruction set computes the same operations in the same order, so results are identical
/// on all of them (and about 20 times faster than a scalar erf on AVX2 and AVX-512).
pub fn gelu_erf(isa: crate::Isa, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: AVX2/FMA presence is implied by `isa`.
        let done = unsafe { crate::x86::gelu_erf_groups(isa.vnni(), x) };
        x[done..].iter_mut().for_each(|v| *v = gelu_erf_one(*v));
        return;
    }
    let _ = isa;
    x.iter_mut().for_each(|v| *v = gelu_erf_one(*v));
}

/// One value of `gelu_erf`, in the order the vector kernels keep.
#[inline]
pub fn gelu_erf_one(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let u = z.abs().min(4.0).mul_add(0.5, -1.0);
    let erf = ERF_POLY[1..].iter().fold(f32::from_bits(ERF_POLY[0]), |acc, &c| acc.mul_add(u, f32::from_bits(c)));
    0.5 * x * (1.0 + erf.copysign(z))
}

/// Softmax of `x` in place; returns nothing, `x` sums to 1 afterwards (unless all -inf).
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]); GGUF llama weights are permuted for this.
    Interleaved,
    /// Halves (x[i], x[i + d/2]), as in GPT-NeoX and Gemma.
    SplitHalf,
}

/// Cosines and sines of one position's rotation angles, `rotary_dims / 2` of each.
pub fn rope_angles(position: usize, rotary_dims: usize, freq_base: f32, cos: &mut [f32], sin: &mut [f32]) {
    // Repeated multiplication in f32 rather than powf per index: llama.cpp builds its angle
    // cache this way, and the rounding differences are visible in late positions.
    let theta_scale = freq_base.powf(-2.0 / rotary_dims as f32);
    let mut theta = position as f32;
    for i in 0..rotary_dims / 2 {
        cos[i] = theta.cos();
        sin[i] = theta.sin();
        theta *= theta_scale;
    }
}

/// Rotates one head vector by precomputed angles; dims past `2 * cos.len()` stay as they are.
/// The products are fused as a contracting C compiler fuses llama.cpp's expression.
pub fn rope_apply(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    // The vector kernel reads `half` angles from each table and 2 * half values of `x`.
    assert!(sin.len() == half && x.len() >= 2 * half, "rope over {} values with {} cosines and {} sines", x.len(), half, sin.len());
    let mut start = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect().avx2() {
        // SAFETY: AVX2/FMA presence checked just above; slices hold 2 * half values.
        start = unsafe { crate::x86::rope_apply(x, cos, sin, style == RopeStyle::Interleaved) };
    }
    match style {
        RopeStyle::Interleaved => {
            for i in start..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a.mul_add(cos[i], -(b * sin[i]));
                x[2 * i + 1] = a.mul_add(sin[i], b * cos[i]);
            }
        }
        RopeStyle::SplitHalf => {
            for i in start..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a.mul_add(cos[i], -(b * sin[i]));
                x[i + half] = a.mul_add(sin[i], b * cos[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut y = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut y);
        let rms = (y.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let mut x = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[3] == 0.0);
    }

    #[test]
    fn rope_preserves_norm_and_position_zero_is_identity() {
        let mut cos = [0.0; 4];
        let mut sin = [0.0; 4];
        let orig = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        for style in [RopeStyle::Interleaved, RopeStyle::SplitHalf] {
            rope_angles(0, 8, 10000.0, &mut cos, &mut sin);
            let mut x = orig;
            rope_apply(&mut x, &cos, &sin, style);
            assert_eq!(x, orig);
            rope_angles(17, 8, 10000.0, &mut cos, &mut sin);
            rope_apply(&mut x, &cos, &sin, style);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
        }
    }

    #[test]
    fn gelu_table_matches_formula_within_half_precision() {
        let mut g = [-3.0f32, -0.5, 0.0, 0.7, 2.0, 12.0, -12.0];
        let up = [1.0f32; 7];
        let expect: Vec<f32> = g.iter().map(|&x| if x <= -10.0 { 0.0 } else if x >= 10.0 { x } else { gelu_tanh(x) }).collect();
        gelu_mul(&mut g, &up);
        for (a, b) in g.iter().zip(expect) {
            assert!((a - b).abs() <= 2e-3 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
