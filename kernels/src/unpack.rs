//! Scalar unpacking of every weight format into small integers and block scales.
//!
//! These are the definitions the rest of the crate is tested against: dequantization and
//! the reference dot products are both written in terms of them, and every SIMD kernel
//! must agree with the reference built here.

use crate::blocks::*;
use crate::dtype::QK_K;

/// Signed quants of a Q4_0 block (value = d * q).
pub fn q4_0(b: &BlockQ4_0) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = (b.qs[j] & 0xF) as i8 - 8;
        q[j + 16] = (b.qs[j] >> 4) as i8 - 8;
    }
    q
}

/// Unsigned quants of a Q4_1 block (value = d * q + m).
pub fn q4_1(b: &BlockQ4_1) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = b.qs[j] & 0xF;
        q[j + 16] = b.qs[j] >> 4;
    }
    q
}

fn five_bit(qs: &[u8; 16], qh: &[u8; 4]) -> [u8; 32] {
    let high = u32::from_le_bytes(*qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | ((((high >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((high >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// Signed quants of a Q5_0 block (value = d * q).
pub fn q5_0(b: &BlockQ5_0) -> [i8; 32] {
    five_bit(&b.qs, &b.qh).map(|v| v as i8 - 16)
}

/// Unsigned quants of a Q5_1 block (value = d * q + m).
pub fn q5_1(b: &BlockQ5_1) -> [u8; 32] {
    five_bit(&b.qs, &b.qh)
}

/// A k-quant super-block as sixteen sub-blocks of 16: value = d * scale[s] * q - dmin * min[s].
pub struct KBlock {
    pub d: f32,
    pub dmin: f32,
    pub scales: [i32; 16],
    pub mins: [i32; 16],
    pub q: [i8; QK_K],
}

pub fn q2k(b: &BlockQ2K) -> KBlock {
    let mut out = KBlock {
        d: f16_bits_to_f32(b.d),
        dmin: f16_bits_to_f32(b.dmin),
        scales: [0; 16],
        mins: [0; 16],
        q: [0; QK_K],
    };
    for s in 0..16 {
        out.scales[s] = (b.scales[s] & 0xF) as i32;
        out.mins[s] = (b.scales[s] >> 4) as i32;
    }
    // Each 128-value half reads 32 bytes of qs four times, two bits at a time.
    for half in 0..2 {
        for shift_step in 0..4 {
            for l in 0..32 {
                let byte = b.qs[half * 32 + l];
                out.q[half * 128 + shift_step * 32 + l] = ((byte >> (2 * shift_step)) & 3) as i8;
            }
        }
    }
    out
}

pub fn q3k(b: &BlockQ3K) -> KBlock {
    let scales = q3k_scales(&b.scales);
    let mut out = KBlock {
        d: f16_bits_to_f32(b.d),
        dmin: 0.0,
        scales: scales.map(|s| s as i32),
        mins: [0; 16],
        q: [0; QK_K],
    };
    for half in 0..2 {
        for shift_step in 0..4 {
            let mask_bit = 1u8 << (half * 4 + shift_step);
            for l in 0..32 {
                let low = ((b.qs[half * 32 + l] >> (2 * shift_step)) & 3) as i8;
                let high_missing = b.hmask[l] & mask_bit == 0;
                out.q[half * 128 + shift_step * 32 + l] = low - if high_missing { 4 } else { 0 };
            }
        }
    }
    out
}

fn k4_scales(scales: &[u8; 12]) -> ([i32; 16], [i32; 16]) {
    let mut sc = [0i32; 16];
    let mut mn = [0i32; 16];
    for j in 0..8 {
        let (s, m) = k4_scale_min(j, scales);
        sc[2 * j] = s as i32;
        sc[2 * j + 1] = s as i32;
        mn[2 * j] = m as i32;
        mn[2 * j + 1] = m as i32;
    }
    (sc, mn)
}

pub fn q4k(b: &BlockQ4K) -> KBlock {
    let (scales, mins) = k4_scales(&b.scales);
    let mut q = [0i8; QK_K];
    for chunk in 0..4 {
        for l in 0..32 {
            let byte = b.qs[chunk * 32 + l];
            q[chunk * 64 + l] = (byte & 0xF) as i8;
            q[chunk * 64 + 32 + l] = (byte >> 4) as i8;
        }
    }
    KBlock { d: f16_bits_to_f32(b.d), dmin: f16_bits_to_f32(b.dmin), scales, mins, q }
}

pub fn q5k(b: &BlockQ5K) -> KBlock {
    let (scales, mins) = k4_scales(&b.scales);
    let mut q = [0i8; QK_K];
    for chunk in 0..4 {
        for l in 0..32 {
            let byte = b.qs[chunk * 32 + l];
            let h = b.qh[l];
            q[chunk * 64 + l] = ((byte & 0xF) | (((h >> (2 * chunk)) & 1) << 4)) as i8;
            q[chunk * 64 + 32 + l] = ((byte >> 4) | (((h >> (2 * chunk + 1)) & 1) << 4)) as i8;
        }
    }
    KBlock { d: f16_bits_to_f32(b.d), dmin: f16_bits_to_f32(b.dmin), scales, mins, q }
}

pub fn q6k(b: &BlockQ6K) -> KBlock {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let ql = &b.ql[half * 64..half * 64 + 64];
        let qh = &b.qh[half * 32..half * 32 + 32];
        let base = half * 128;
        for l in 0..32 {
            q[base + l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            q[base + 32 + l] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            q[base + 64 + l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            q[base + 96 + l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    KBlock { d: f16_bits_to_f32(b.d), dmin: 0.0, scales: b.scales.map(|s| s as i32), mins: [0; 16], q }
}
