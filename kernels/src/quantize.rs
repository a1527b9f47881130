//! Weight quantization: f32 rows into the ggml block formats kiln computes with, for
//! load-time quantization and for writing GGUF files. Each format is filled so that
//! `dequant::dequantize_row` (and llama.cpp) read back the nearest values the format can
//! express for a per-block scale chosen from the block's range; the layouts are the inverses
//! of `unpack`.

use crate::blocks::{f16_bits_to_f32, f32_to_f16_bits};
use crate::dtype::{DType, QK_K};
use crate::KernelError;

/// Formats `quantize_row` writes.
pub const QUANT_TYPES: [DType; 10] =
    [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K];

/// Quantizes `src` (a whole row, a multiple of the format's block length) into `dst`
/// (`dtype.row_bytes(src.len())` bytes).
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    let block = dtype.block_len();
    let bad = |what: String| KernelError::Shape(format!("quantize {}: {what}", dtype.name()));
    if !src.len().is_multiple_of(block) {
        return Err(bad(format!("row length {} is not a multiple of {block}", src.len())));
    }
    let need = dtype.row_bytes(src.len()).ok_or_else(|| bad("row too long".into()))?;
    if dst.len() != need {
        return Err(bad(format!("{} output bytes for {need}", dst.len())));
    }
    if let Some(i) = src.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("value {} at {i} is not finite", src[i])));
    }
    let size = need / (src.len() / block);
    let f: fn(&[f32], &mut [u8]) = match dtype {
        DType::Q4_0 => q4_0,
        DType::Q4_1 => q4_1,
        DType::Q5_0 => q5_0,
        DType::Q5_1 => q5_1,
        DType::Q8_0 => q8_0,
        DType::Q2K => q2k,
        DType::Q3K => q3k,
        DType::Q4K => q4k,
        DType::Q5K => q5k,
        DType::Q6K => q6k,
        _ => return Err(bad("not a quantized weight format kiln writes".into())),
    };
    for (x, out) in src.chunks_exact(block).zip(dst.chunks_exact_mut(size)) {
        f(x, out);
    }
    Ok(())
}

/// The value of largest magnitude, with its sign.
fn signed_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// `d` rounded through half precision, as the block will store it.
fn f16_round(d: f32) -> (u16, f32) {
    let bits = f32_to_f16_bits(d);
    (bits, f16_bits_to_f32(bits))
}

fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn put_u16(out: &mut [u8], at: usize, v: u16) {
    out[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Symmetric 32-value block: q in `-half..half`, value = d * q; d from the signed maximum so
/// the extreme value maps to `-half` exactly.
fn symmetric(x: &[f32], half: i32) -> (u16, [i32; 32]) {
    let (bits, d) = f16_round(signed_max(x) / -(half as f32));
    let id = inv(d);
    let q = std::array::from_fn(|i| ((x[i] * id).round() as i32).clamp(-half, half - 1));
    (bits, q)
}

/// Asymmetric 32-value block: q in `0..=levels`, value = d * q + m.
fn asymmetric(x: &[f32], levels: i32) -> (u16, u16, [i32; 32]) {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (d_bits, d) = f16_round((hi - lo) / levels as f32);
    let (m_bits, m) = f16_round(lo);
    let id = inv(d);
    let q = std::array::from_fn(|i| (((x[i] - m) * id).round() as i32).clamp(0, levels));
    (d_bits, m_bits, q)
}

fn nibbles(q: &[i32; 32], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = (q[j] & 0xF) as u8 | (((q[j + 16] & 0xF) as u8) << 4);
    }
}

fn high_bits(q: &[i32; 32]) -> [u8; 4] {
    let mut h = 0u32;
    for (j, &v) in q.iter().enumerate() {
        h |= (((v >> 4) & 1) as u32) << j;
    }
    h.to_le_bytes()
}

fn q4_0(x: &[f32], out: &mut [u8]) {
    let (d, q) = symmetric(x, 8);
    put_u16(out, 0, d);
    nibbles(&q.map(|v| v + 8), &mut out[2..18]);
}

fn q4_1(x: &[f32], out: &mut [u8]) {
    let (d, m, q) = asymmetric(x, 15);
    put_u16(out, 0, d);
    put_u16(out, 2, m);
    nibbles(&q, &mut out[4..20]);
}

fn q5_0(x: &[f32], out: &mut [u8]) {
    let (d, q) = symmetric(x, 16);
    let q = q.map(|v| v + 16);
    put_u16(out, 0, d);
    out[2..6].copy_from_slice(&high_bits(&q));
    nibbles(&q, &mut out[6..22]);
}

fn q5_1(x: &[f32], out: &mut [u8]) {
    let (d, m, q) = asymmetric(x, 31);
    put_u16(out, 0, d);
    put_u16(out, 2, m);
    out[4..8].copy_from_slice(&high_bits(&q));
    nibbles(&q, &mut out[8..24]);
}

fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let (bits, d) = f16_round(amax / 127.0);
    let id = inv(d);
    put_u16(out, 0, bits);
    for (o, &v) in out[2..34].iter_mut().zip(x) {
        *o = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
    }
}

/// Sub-block scales and minimums for `value = d * sc * q - dmin * mn` with q in
/// `0..=levels`, sc and mn quantized to `0..=scale_levels`.
struct MinScale {
    d: f32,
    dmin: f32,
    d_bits: u16,
    dmin_bits: u16,
    sc: Vec<i32>,
    mn: Vec<i32>,
}

/// Scales and minimums for a super-block, then quants: first from each sub-block's range,
/// then refined by least squares (each sub-block's best `scale * q - min` for the quants
/// chosen), keeping whichever reconstructs `x` more closely.
fn min_scale(x: &[f32], sub: usize, levels: i32, scale_levels: i32) -> (MinScale, Vec<i32>) {
    let n = x.len() / sub;
    let (mut scales, mut mins) = (vec![0.0f32; n], vec![0.0f32; n]);
    for (s, chunk) in x.chunks_exact(sub).enumerate() {
        let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
        let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scales[s] = (hi - lo) / levels as f32;
        mins[s] = -lo;
    }
    // Rounding minimums up keeps every value of the block reachable from below.
    let mut best = encode_scales(&scales, &mins, scale_levels, f32::ceil);
    let mut q = best.quants(x, sub, levels);
    let mut err = best.error(x, sub, &q);
    for _ in 0..2 {
        for (s, chunk) in x.chunks_exact(sub).enumerate() {
            let qs = &q[s * sub..(s + 1) * sub];
            let (mq, mx) = (qs.iter().sum::<i32>() as f32 / sub as f32, chunk.iter().sum::<f32>() / sub as f32);
            let var: f32 = qs.iter().map(|&v| (v as f32 - mq).powi(2)).sum();
            let cov: f32 = qs.iter().zip(chunk).map(|(&v, &y)| (v as f32 - mq) * (y - mx)).sum();
            let a = if var > 0.0 { (cov / var).max(0.0) } else { 0.0 };
            scales[s] = a;
            mins[s] = (a * mq - mx).max(0.0);
        }
        let candidate = encode_scales(&scales, &mins, scale_levels, f32::round);
        let cq = candidate.quants(x, sub, levels);
        let cerr = candidate.error(x, sub, &cq);
        if cerr >= err {
            break;
        }
        (best, q, err) = (candidate, cq, cerr);
    }
    (best, q)
}

fn encode_scales(scales: &[f32], mins: &[f32], scale_levels: i32, round_min: fn(f32) -> f32) -> MinScale {
    let max_scale = scales.iter().copied().fold(0.0, f32::max);
    let max_min = mins.iter().copied().fold(0.0, f32::max);
    let (d_bits, d) = f16_round(max_scale / scale_levels as f32);
    let (dmin_bits, dmin) = f16_round(max_min / scale_levels as f32);
    let sc = scales.iter().map(|&s| ((s * inv(d)).round() as i32).clamp(0, scale_levels)).collect();
    let mn = mins.iter().map(|&m| (round_min(m * inv(dmin)) as i32).clamp(0, scale_levels)).collect();
    MinScale { d, dmin, d_bits, dmin_bits, sc, mn }
}

impl MinScale {
    fn error(&self, x: &[f32], sub: usize, q: &[i32]) -> f32 {
        x.iter()
            .zip(q)
            .enumerate()
            .map(|(i, (&v, &k))| {
                let s = i / sub;
                (self.d * self.sc[s] as f32 * k as f32 - self.dmin * self.mn[s] as f32 - v).powi(2)
            })
            .sum()
    }

    fn quants(&self, x: &[f32], sub: usize, levels: i32) -> Vec<i32> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let s = i / sub;
                let step = self.d * self.sc[s] as f32;
                ((v + self.dmin * self.mn[s] as f32) * inv(step)).round().clamp(0.0, levels as f32) as i32
            })
            .collect()
    }
}

/// Six-bit scale and minimum pairs of Q4_K/Q5_K, packed as `blocks::k4_scale_min` reads them.
fn pack_k4_scales(sc: &[i32], mn: &[i32]) -> [u8; 12] {
    let mut p = [0u8; 12];
    for j in 0..8 {
        let (s, m) = (sc[j] as u8 & 63, mn[j] as u8 & 63);
        if j < 4 {
            p[j] |= s;
            p[j + 4] |= m;
        } else {
            p[j + 4] = (s & 0xF) | ((m & 0xF) << 4);
            p[j - 4] |= (s >> 4) << 6;
            p[j] |= (m >> 4) << 6;
        }
    }
    p
}

fn q4k(x: &[f32], out: &mut [u8]) {
    let (ms, q) = min_scale(x, 32, 15, 63);
    put_u16(out, 0, ms.d_bits);
    put_u16(out, 2, ms.dmin_bits);
    out[4..16].copy_from_slice(&pack_k4_scales(&ms.sc, &ms.mn));
    for c in 0..4 {
        for l in 0..32 {
            out[16 + c * 32 + l] = (q[c * 64 + l] as u8) | ((q[c * 64 + 32 + l] as u8) << 4);
        }
    }
}

fn q5k(x: &[f32], out: &mut [u8]) {
    let (ms, q) = min_scale(x, 32, 31, 63);
    put_u16(out, 0, ms.d_bits);
    put_u16(out, 2, ms.dmin_bits);
    out[4..16].copy_from_slice(&pack_k4_scales(&ms.sc, &ms.mn));
    let (qh, qs) = out[16..176].split_at_mut(QK_K / 8);
    qh.fill(0);
    for c in 0..4 {
        for l in 0..32 {
            let (a, b) = (q[c * 64 + l] as u8, q[c * 64 + 32 + l] as u8);
            qs[c * 32 + l] = (a & 0xF) | ((b & 0xF) << 4);
            qh[l] |= ((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1));
        }
    }
}

fn q2k(x: &[f32], out: &mut [u8]) {
    let (ms, q) = min_scale(x, 16, 3, 15);
    for (o, (&sc, &mn)) in out[..16].iter_mut().zip(ms.sc.iter().zip(&ms.mn)) {
        *o = (sc as u8) | ((mn as u8) << 4);
    }
    let qs = &mut out[16..80];
    qs.fill(0);
    for half in 0..2 {
        for shift in 0..4 {
            for l in 0..32 {
                qs[half * 32 + l] |= (q[half * 128 + shift * 32 + l] as u8) << (2 * shift);
            }
        }
    }
    put_u16(out, 80, ms.d_bits);
    put_u16(out, 82, ms.dmin_bits);
}

/// Sixteen signed scales for `value = d * sc * q`, q in `-half..half`, sc in `-limit..limit`.
fn signed_scales(x: &[f32], half: i32, limit: i32) -> (u16, f32, [i32; 16], Vec<i32>) {
    let subs: Vec<f32> = x.chunks_exact(16).map(|c| signed_max(c) / -(half as f32)).collect();
    let (bits, d) = f16_round(signed_max(&subs) / -(limit as f32));
    let sc: [i32; 16] = std::array::from_fn(|s| ((subs[s] * inv(d)).round() as i32).clamp(-limit, limit - 1));
    let q = x
        .iter()
        .enumerate()
        .map(|(i, &v)| ((v * inv(d * sc[i / 16] as f32)).round() as i32).clamp(-half, half - 1))
        .collect();
    (bits, d, sc, q)
}

fn q3k(x: &[f32], out: &mut [u8]) {
    let (d_bits, _, sc, q) = signed_scales(x, 4, 32);
    let (hmask, rest) = out.split_at_mut(QK_K / 8);
    let (qs, rest) = rest.split_at_mut(QK_K / 4);
    let (scales, d) = rest.split_at_mut(12);
    hmask.fill(0);
    qs.fill(0);
    for half in 0..2 {
        for shift in 0..4 {
            for l in 0..32 {
                let v = (q[half * 128 + shift * 32 + l] + 4) as u8;
                qs[half * 32 + l] |= (v & 3) << (2 * shift);
                if v >= 4 {
                    hmask[l] |= 1 << (half * 4 + shift);
                }
            }
        }
    }
    scales.fill(0);
    for (j, &s) in sc.iter().enumerate() {
        let v = (s + 32) as u8;
        if j < 8 {
            scales[j] |= v & 0xF;
        } else {
            scales[j - 8] |= (v & 0xF) << 4;
        }
        scales[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
    }
    d.copy_from_slice(&d_bits.to_le_bytes());
}

fn q6k(x: &[f32], out: &mut [u8]) {
    let (d_bits, _, sc, q) = signed_scales(x, 32, 128);
    let (ql, rest) = out.split_at_mut(QK_K / 2);
    let (qh, rest) = rest.split_at_mut(QK_K / 4);
    let (scales, d) = rest.split_at_mut(QK_K / 16);
    ql.fill(0);
    qh.fill(0);
    for half in 0..2 {
        let base = half * 128;
        for l in 0..32 {
            let v: [u8; 4] = std::array::from_fn(|k| (q[base + 32 * k + l] + 32) as u8);
            ql[half * 64 + l] = (v[0] & 0xF) | ((v[2] & 0xF) << 4);
            ql[half * 64 + l + 32] = (v[1] & 0xF) | ((v[3] & 0xF) << 4);
            qh[half * 32 + l] = (v[0] >> 4) | ((v[1] >> 4) << 2) | ((v[2] >> 4) << 4) | ((v[3] >> 4) << 6);
        }
    }
    for (o, &s) in scales.iter_mut().zip(&sc) {
        *o = s as i8 as u8;
    }
    d.copy_from_slice(&d_bits.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize_row;

    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Roughly normal: a sum of uniforms, with an occasional outlier.
                let u: f32 = (0..4).map(|k| ((s >> (16 * k)) & 0xFFFF) as f32 / 65536.0 - 0.5).sum();
                if s.is_multiple_of(97) {
                    u * 8.0
                } else {
                    u
                }
            })
            .collect()
    }

    /// Relative RMS error each format must stay under on such rows (measured worst of 20
    /// rows, plus a margin; a layout mistake gives errors near 1).
    fn bound(t: DType) -> f32 {
        match t {
            DType::Q8_0 => 0.012,
            DType::Q6K => 0.035,
            DType::Q5_1 | DType::Q5K => 0.06,
            DType::Q5_0 => 0.085,
            DType::Q4_1 | DType::Q4K => 0.125,
            DType::Q4_0 => 0.17,
            DType::Q3K => 0.24,
            _ => 0.46,
        }
    }

    #[test]
    fn every_format_reads_back_close_to_its_input() {
        for t in QUANT_TYPES {
            for seed in 0..20 {
                let x = row(512, seed);
                let mut q = vec![0u8; t.row_bytes(x.len()).unwrap()];
                quantize_row(t, &x, &mut q).unwrap();
                let mut back = vec![0.0; x.len()];
                dequantize_row(t, &q, &mut back).unwrap();
                let err: f32 = x.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                let norm: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
                if std::env::var_os("KILN_PRINT_QUANT_ERRORS").is_some() {
                    eprintln!("{} {seed} {}", t.name(), err / norm);
                }
                assert!(err / norm < bound(t), "{}: relative error {} (seed {seed})", t.name(), err / norm);
                // Quantizing what was read back changes nothing more than rounding.
                let mut again = vec![0u8; q.len()];
                quantize_row(t, &back, &mut again).unwrap();
                let mut back2 = vec![0.0; x.len()];
                dequantize_row(t, &again, &mut back2).unwrap();
                let drift: f32 = back.iter().zip(&back2).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                assert!(drift / norm < bound(t), "{}: requantizing drifts by {}", t.name(), drift / norm);
            }
        }
    }

    #[test]
    fn zero_rows_and_bad_input() {
        for t in QUANT_TYPES {
            let x = vec![0.0; 256];
            let mut q = vec![0u8; t.row_bytes(256).unwrap()];
            quantize_row(t, &x, &mut q).unwrap();
            let mut back = vec![1.0; 256];
            dequantize_row(t, &q, &mut back).unwrap();
            assert!(back.iter().all(|&v| v == 0.0), "{}: zeros stay zeros", t.name());
            let mut nan = x.clone();
            nan[3] = f32::NAN;
            assert!(quantize_row(t, &nan, &mut q).is_err());
            assert!(quantize_row(t, &x[..200], &mut q).is_err());
        }
    }
}
