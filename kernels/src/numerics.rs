//! Reduction orders and the exponential that kiln shares with llama.cpp's CPU backend.
//!
//! Quantizing activations to 8 bits at every matrix product makes a transformer's logits
//! sensitive to the last bit of every sum: a one-ulp difference occasionally flips a
//! rounding decision, and the flip propagates. To reproduce llama.cpp token for token,
//! kiln sums in the same order it does:
//!
//! - dot products of half-precision vectors (attention scores and the weighting of values)
//!   accumulate element `i` into lane `i % 16` of accumulator `(i % 64) / 16`, four
//!   accumulators folded as `(a0 + a2) + (a1 + a3)`, then 16 lanes reduced pairwise
//!   (`tree16`); elements past the last multiple of 64 are added in f64;
//! - softmax exponentials use a degree-5 polynomial after range reduction by ln 2
//!   (`exp_poly`), summed 16 at a time with `tree16` into an f64 total;
//! - SiLU uses the same exponential for whole groups of 16 and the C library's for the rest.

/// Pairwise sum of 16 lanes: halves, then quarters, then (0+2)+(1+3).
#[inline]
pub fn tree16(v: &[f32; 16]) -> f32 {
    let mut b = [0f32; 8];
    for i in 0..8 {
        b[i] = v[i + 8] + v[i];
    }
    let c = [b[4] + b[0], b[5] + b[1], b[6] + b[2], b[7] + b[3]];
    (c[0] + c[2]) + (c[1] + c[3])
}

/// e^x with at most ~2 ulp error: x = n ln2 + r, e^r by a minimax polynomial, scaled by 2^n.
#[inline]
pub fn exp_poly(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B);
    const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
    const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
    const C: [f32; 6] = [
        1.0,
        f32::from_bits(0x3F7F_FFF6),
        f32::from_bits(0x3EFF_FEDB),
        f32::from_bits(0x3E2A_AF33),
        f32::from_bits(0x3D2B_9F17),
        f32::from_bits(0x3C07_2010),
    ];
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let r2 = r * r;
    let p = C[5].mul_add(r, C[4]).mul_add(r2, C[3].mul_add(r, C[2])).mul_add(r2, C[1].mul_add(r, C[0]));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scale_by_pow2(p, n)
}

/// `p * 2^n` for integral `n` in [-192, 192], rounded once.
#[inline]
pub fn scale_by_pow2(p: f32, n: f32) -> f32 {
    let n = n as i32;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    if (-126..=127).contains(&n) {
        p * pow2(n)
    } else if n < -126 {
        // The first product is exact; only the second (into the subnormal range) rounds.
        (p * pow2(n + 126)) * pow2(-126)
    } else {
        (p * pow2(127)) * pow2(n - 127)
    }
}

/// Dot product of two half-precision vectors in the accumulation order described above.
pub fn dot_f16(x: &[u16], y: &[u16]) -> f32 {
    use crate::blocks::f16_bits_to_f32 as h;
    let n = x.len().min(y.len());
    let main = n & !63;
    let mut acc = [[0f32; 16]; 4];
    for base in (0..main).step_by(64) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (lane, slot) in a.iter_mut().enumerate() {
                let i = base + 16 * j + lane;
                *slot = h(x[i]).mul_add(h(y[i]), *slot);
            }
        }
    }
    let mut folded = [0f32; 16];
    for lane in 0..16 {
        folded[lane] = (acc[0][lane] + acc[2][lane]) + (acc[1][lane] + acc[3][lane]);
    }
    let mut sum = tree16(&folded) as f64;
    for i in main..n {
        sum += (h(x[i]) * h(y[i])) as f64;
    }
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_poly_is_close_to_exp_everywhere_it_matters() {
        let mut x = -110.0f32;
        while x < 88.0 {
            let (a, b) = (exp_poly(x), (x as f64).exp());
            let rel = ((a as f64 - b) / b).abs();
            assert!(rel < 4e-7 || (b < 1e-37 && (a as f64 - b).abs() < 1e-44), "x={x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(exp_poly(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_poly(0.0), 1.0);
        assert_eq!(exp_poly(200.0), f32::INFINITY);
    }

    #[test]
    fn tree16_adds_all_lanes() {
        let v: [f32; 16] = std::array::from_fn(|i| i as f32);
        assert_eq!(tree16(&v), 120.0);
    }

    #[test]
    fn dot_f16_matches_plain_sum() {
        use crate::blocks::f32_to_f16_bits as f;
        for n in [1usize, 15, 64, 100, 256, 300] {
            let x: Vec<u16> = (0..n).map(|i| f((i as f32 * 0.37).sin())).collect();
            let y: Vec<u16> = (0..n).map(|i| f((i as f32 * 0.11).cos())).collect();
            let plain: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| crate::blocks::f16_bits_to_f32(a) as f64 * crate::blocks::f16_bits_to_f32(b) as f64)
                .sum();
            assert!((dot_f16(&x, &y) as f64 - plain).abs() < 1e-4, "n={n}");
        }
    }
}
