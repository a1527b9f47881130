//! Quantization of f32 activations into the formats the dot products consume.
//!
//! The rounding follows ggml's x86 path exactly (scale from the block's largest magnitude,
//! round half to even), because a different rounding of the activations shifts logits enough
//! to flip near-tied greedy choices against llama.cpp.

use crate::blocks::*;
use crate::dtype::QK_K;
use crate::Isa;

/// Round half to even for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, so the
/// hardware's default rounding does the work (ggml's `nearest_int`), with no libm call.
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantizes one block of 32 values: returns (scale, quants). The vector forms agree with
/// the scalar code on every block without NaNs and leave blocks with NaNs to it.
#[inline]
fn q8_block(x: &[f32], isa: Isa) -> (f32, [i8; 32]) {
    let mut qs = [0i8; 32];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each form runs only where `isa` says its instructions are present; x holds
        // 32 values.
        let vector = unsafe {
            if isa.vnni() {
                crate::x86_wide::q8_block(x, &mut qs)
            } else if isa.avx2() {
                crate::x86::q8_block(x, &mut qs)
            } else {
                None
            }
        };
        if let Some(d) = vector {
            return (d, qs);
        }
    }
    let _ = isa;
    let amax = max_abs(x);
    let d = amax / 127.0;
    let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, v) in qs.iter_mut().zip(x) {
        *q = round_even(v * inv) as i8;
    }
    (d, qs)
}

/// `x.len()` must be a multiple of 32 and `out.len() == x.len() / 32`.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    quantize_q8_0_on(Isa::detect(), x, out)
}

/// `quantize_q8_0` in scalar code only (the vector path's test oracle).
pub fn quantize_q8_0_scalar(x: &[f32], out: &mut [BlockQ8_0]) {
    quantize_q8_0_on(Isa::scalar(), x, out)
}

/// `quantize_q8_0` with the kernels of `isa` (one of `Isa::available()`); every ISA gives
/// the same quants.
pub fn quantize_q8_0_on(isa: Isa, x: &[f32], out: &mut [BlockQ8_0]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (chunk, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, qs) = q8_block(chunk, isa);
        b.d = f32_to_f16_bits(d);
        b.qs = qs;
    }
}

/// `x.len()` must be a multiple of 32 and `out.len() == x.len() / 32`.
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    quantize_q8_1_on(Isa::detect(), x, out)
}

/// `quantize_q8_1` in scalar code only (the vector path's test oracle).
pub fn quantize_q8_1_scalar(x: &[f32], out: &mut [BlockQ8_1]) {
    quantize_q8_1_on(Isa::scalar(), x, out)
}

/// `quantize_q8_1` with the kernels of `isa` (one of `Isa::available()`); every ISA gives
/// the same quants.
pub fn quantize_q8_1_on(isa: Isa, x: &[f32], out: &mut [BlockQ8_1]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (chunk, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, qs) = q8_block(chunk, isa);
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        b.d = f32_to_f16_bits(d);
        b.s = f32_to_f16_bits(d * sum as f32);
        b.qs = qs;
    }
}

/// `x.len()` must be a multiple of 256 and `out.len() == x.len() / 256`.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    quantize_q8k_on(Isa::detect(), x, out)
}

/// `quantize_q8k` in scalar code only (the vector path's test oracle).
pub fn quantize_q8k_scalar(x: &[f32], out: &mut [BlockQ8K]) {
    quantize_q8k_on(Isa::scalar(), x, out)
}

/// `quantize_q8k` with the kernels of `isa` (one of `Isa::available()`); every ISA gives
/// the same quants.
pub fn quantize_q8k_on(isa: Isa, x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (chunk, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each form runs only where `isa` says its instructions are present; the
            // chunk holds QK_K values.
            let vector = unsafe {
                if isa.vnni() {
                    crate::x86_wide::q8k_block(chunk, &mut b.qs, &mut b.bsums)
                } else if isa.avx2() {
                    crate::x86::q8k_block(chunk, &mut b.qs, &mut b.bsums)
                } else {
                    None
                }
            };
            if let Some(d) = vector {
                b.d = d;
                continue;
            }
        }
        // The scale keeps the sign of the largest-magnitude value so that it maps to -127
        // exactly, as ggml does.
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in chunk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, v) in b.qs.iter_mut().zip(chunk) {
            *q = (round_even(iscale * v) as i32).min(127) as i8;
        }
        for (s, group) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = group.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// Round-to-nearest-even conversion to IEEE half, as F16C does it.
pub fn convert_f16(x: &[f32], out: &mut [u16]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = f32_to_f16_bits(*v);
    }
}

/// Round-to-nearest-even conversion to bfloat16; NaNs stay quiet NaNs.
pub fn convert_bf16(x: &[f32], out: &mut [u16]) {
    for (o, v) in out.iter_mut().zip(x) {
        let bits = v.to_bits();
        *o = if v.is_nan() {
            ((bits >> 16) | 64) as u16
        } else {
            ((bits + (0x7fff + ((bits >> 16) & 1))) >> 16) as u16
        };
    }
}
