//! Reference dot products between a weight row and an activation row.
//!
//! Each one sums integer products inside a block exactly and applies the block scales in
//! f32, the same arithmetic ggml uses, so the SIMD kernels can be checked to a tight
//! tolerance and the whole stack stays close to llama.cpp's numbers.

use crate::blocks::*;
use crate::dtype::DType;
use crate::unpack;

fn view<B: Block>(bytes: &[u8]) -> &[B] {
    cast_blocks(bytes).expect("dot operands are validated as whole, aligned blocks by the caller")
}

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

fn dot_u8_i8(a: &[u8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// `w` holds one row of `wt`; `a` holds the same number of values in `wt.activation_type()`.
pub fn dot(wt: DType, w: &[u8], a: &[u8]) -> f32 {
    match wt {
        DType::F32 => {
            let s: f64 = w
                .chunks_exact(4)
                .zip(a.chunks_exact(4))
                .map(|(x, y)| {
                    f32::from_le_bytes(x.try_into().unwrap()) as f64 * f32::from_le_bytes(y.try_into().unwrap()) as f64
                })
                .sum();
            s as f32
        }
        DType::F16 | DType::BF16 => {
            let conv = |c: &[u8]| -> f32 {
                let bits = u16::from_le_bytes([c[0], c[1]]);
                if wt == DType::F16 {
                    f16_bits_to_f32(bits)
                } else {
                    f32::from_bits((bits as u32) << 16)
                }
            };
            let s: f64 = w.chunks_exact(2).zip(a.chunks_exact(2)).map(|(x, y)| conv(x) as f64 * conv(y) as f64).sum();
            s as f32
        }
        DType::Q4_0 => view::<BlockQ4_0>(w)
            .iter()
            .zip(view::<BlockQ8_0>(a))
            .map(|(x, y)| f16_bits_to_f32(x.d) * f16_bits_to_f32(y.d) * dot_i8(&unpack::q4_0(x), &y.qs) as f32)
            .sum(),
        DType::Q5_0 => view::<BlockQ5_0>(w)
            .iter()
            .zip(view::<BlockQ8_0>(a))
            .map(|(x, y)| f16_bits_to_f32(x.d) * f16_bits_to_f32(y.d) * dot_i8(&unpack::q5_0(x), &y.qs) as f32)
            .sum(),
        DType::Q8_0 => view::<BlockQ8_0>(w)
            .iter()
            .zip(view::<BlockQ8_0>(a))
            .map(|(x, y)| f16_bits_to_f32(x.d) * f16_bits_to_f32(y.d) * dot_i8(&x.qs, &y.qs) as f32)
            .sum(),
        DType::Q4_1 => view::<BlockQ4_1>(w)
            .iter()
            .zip(view::<BlockQ8_1>(a))
            .map(|(x, y)| {
                f16_bits_to_f32(x.d) * f16_bits_to_f32(y.d) * dot_u8_i8(&unpack::q4_1(x), &y.qs) as f32
                    + f16_bits_to_f32(x.m) * f16_bits_to_f32(y.s)
            })
            .sum(),
        DType::Q5_1 => view::<BlockQ5_1>(w)
            .iter()
            .zip(view::<BlockQ8_1>(a))
            .map(|(x, y)| {
                f16_bits_to_f32(x.d) * f16_bits_to_f32(y.d) * dot_u8_i8(&unpack::q5_1(x), &y.qs) as f32
                    + f16_bits_to_f32(x.m) * f16_bits_to_f32(y.s)
            })
            .sum(),
        DType::Q2K => kdot(view::<BlockQ2K>(w), view(a), unpack::q2k),
        DType::Q3K => kdot(view::<BlockQ3K>(w), view(a), unpack::q3k),
        DType::Q4K => kdot(view::<BlockQ4K>(w), view(a), unpack::q4k),
        DType::Q5K => kdot(view::<BlockQ5K>(w), view(a), unpack::q5k),
        DType::Q6K => kdot(view::<BlockQ6K>(w), view(a), unpack::q6k),
        DType::Q8_1 | DType::Q8K => panic!("{wt} is an activation format, not a weight format"),
    }
}

fn kdot<B: Block>(w: &[B], a: &[BlockQ8K], unpack: fn(&B) -> unpack::KBlock) -> f32 {
    w.iter()
        .zip(a)
        .map(|(x, y)| {
            let k = unpack(x);
            let mut sumi = 0i32;
            let mut summ = 0i32;
            for s in 0..16 {
                sumi += k.scales[s] * dot_i8(&k.q[s * 16..s * 16 + 16], &y.qs[s * 16..s * 16 + 16]);
                summ += k.mins[s] * y.bsums[s] as i32;
            }
            y.d * k.d * sumi as f32 - y.d * k.dmin * summ as f32
        })
        .sum()
}
