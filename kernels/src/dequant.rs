//! Scalar dequantization of whole rows to f32: the reference every other path must match.

use crate::blocks::*;
use crate::dtype::{DType, QK_K};
use crate::unpack;
use crate::KernelError;

fn blocks<B: Block>(bytes: &[u8]) -> Result<&[B], KernelError> {
    cast_blocks(bytes).ok_or(KernelError::Layout("row bytes are not whole, aligned blocks"))
}

fn write_kblock(k: &unpack::KBlock, out: &mut [f32]) {
    for (s, chunk) in out.chunks_exact_mut(16).enumerate() {
        let scale = k.d * k.scales[s] as f32;
        let min = k.dmin * k.mins[s] as f32;
        for (l, o) in chunk.iter_mut().enumerate() {
            *o = scale * k.q[s * 16 + l] as f32 - min;
        }
    }
}

/// Converts `out.len()` values stored as `dtype` in `bytes` to f32.
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let expected = dtype.row_bytes(out.len()).ok_or(KernelError::Layout("length is not a whole number of blocks"))?;
    if bytes.len() != expected {
        return Err(KernelError::Layout("byte length does not match the row length"));
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::Q4_0 => {
            for (b, o) in blocks::<BlockQ4_0>(bytes)?.iter().zip(out.chunks_exact_mut(32)) {
                let d = f16_bits_to_f32(b.d);
                for (x, q) in o.iter_mut().zip(unpack::q4_0(b)) {
                    *x = d * q as f32;
                }
            }
        }
        DType::Q4_1 => {
            for (b, o) in blocks::<BlockQ4_1>(bytes)?.iter().zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_bits_to_f32(b.d), f16_bits_to_f32(b.m));
                for (x, q) in o.iter_mut().zip(unpack::q4_1(b)) {
                    *x = d * q as f32 + m;
                }
            }
        }
        DType::Q5_0 => {
            for (b, o) in blocks::<BlockQ5_0>(bytes)?.iter().zip(out.chunks_exact_mut(32)) {
                let d = f16_bits_to_f32(b.d);
                for (x, q) in o.iter_mut().zip(unpack::q5_0(b)) {
                    *x = d * q as f32;
                }
            }
        }
        DType::Q5_1 => {
            for (b, o) in blocks::<BlockQ5_1>(bytes)?.iter().zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_bits_to_f32(b.d), f16_bits_to_f32(b.m));
                for (x, q) in o.iter_mut().zip(unpack::q5_1(b)) {
                    *x = d * q as f32 + m;
                }
            }
        }
        DType::Q8_0 => {
            for (b, o) in blocks::<BlockQ8_0>(bytes)?.iter().zip(out.chunks_exact_mut(32)) {
                let d = f16_bits_to_f32(b.d);
                for (x, q) in o.iter_mut().zip(b.qs) {
                    *x = d * q as f32;
                }
            }
        }
        DType::Q8_1 => {
            for (b, o) in blocks::<BlockQ8_1>(bytes)?.iter().zip(out.chunks_exact_mut(32)) {
                let d = f16_bits_to_f32(b.d);
                for (x, q) in o.iter_mut().zip(b.qs) {
                    *x = d * q as f32;
                }
            }
        }
        DType::Q8K => {
            for (b, o) in blocks::<BlockQ8K>(bytes)?.iter().zip(out.chunks_exact_mut(QK_K)) {
                for (x, q) in o.iter_mut().zip(b.qs) {
                    *x = b.d * q as f32;
                }
            }
        }
        DType::Q2K => kblocks::<BlockQ2K>(bytes, out, unpack::q2k)?,
        DType::Q3K => kblocks::<BlockQ3K>(bytes, out, unpack::q3k)?,
        DType::Q4K => kblocks::<BlockQ4K>(bytes, out, unpack::q4k)?,
        DType::Q5K => kblocks::<BlockQ5K>(bytes, out, unpack::q5k)?,
        DType::Q6K => kblocks::<BlockQ6K>(bytes, out, unpack::q6k)?,
    }
    Ok(())
}

fn kblocks<B: Block>(bytes: &[u8], out: &mut [f32], unpack: fn(&B) -> unpack::KBlock) -> Result<(), KernelError> {
    for (b, o) in blocks::<B>(bytes)?.iter().zip(out.chunks_exact_mut(QK_K)) {
        write_kblock(&unpack(b), o);
    }
    Ok(())
}
