//! Run-time choice of dot-product kernels for each weight format.

use crate::dtype::DType;
use std::sync::OnceLock;

/// Dot product of one weight row with one activation row of `n` values.
///
/// # Safety
/// `w` must point to a row of `n` values in the weight format the function was chosen for,
/// and `a` to `n` values in that format's `activation_type()`, both valid for reads.
pub type DotFn = unsafe fn(w: *const u8, a: *const u8, n: usize) -> f32;

/// Side tables of N activation rows for the many-row kernels. Block scales in single
/// precision, four rows interleaved: the scale of block `i` of row `4c + k` is at
/// `d[c * stride + 4 * i + k]`; `s` likewise holds block sums (Q8_1 rows only, else null).
/// `pairs` holds the quants of rows `2j` and `2j + 1` side by side, 64 bytes per block:
/// block `i` of pair `j` at `pairs[(j * blocks + i) * 64]`.
pub struct ActScales<const N: usize> {
    pub d: *const f32,
    pub s: *const f32,
    pub stride: usize,
    pub pairs: *const i8,
    /// For `pairs`: -128 times the sum of each 4-byte group, 16 per block (Q8_0 rows only).
    pub pair_corr: *const i32,
    pub blocks: usize,
}

/// Dot products of one weight row with N activation rows; each result equals the
/// corresponding single-row `DotFn` result bit for bit.
///
/// # Safety
/// As for `DotFn`, for every one of the N activation rows, and `scales` must point at that
/// many block scales (and sums, for Q8_1 activations) of the same rows.
pub type DotManyFn<const N: usize> = unsafe fn(w: *const u8, a: &[*const u8; N], scales: &ActScales<N>, n: usize, out: &mut [f32; N]);

/// The N-row kernel (N = 4 or 8) for rows of `wt`, where one exists.
pub fn kernel_xn<const N: usize>(wt: DType, isa: Isa) -> Option<DotManyFn<N>> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::x86::{avx2, vnni};
        let vnni = isa.vnni();
        if vnni && N == 8 && matches!(wt, DType::Q4_1 | DType::Q8_0) {
            let f: DotManyFn<8> = if wt == DType::Q4_1 { crate::x86::q4_1_x8_zmm } else { crate::x86::q8_0_x8_zmm };
            // SAFETY: N == 8, so both are the same function pointer type.
            return Some(unsafe { std::mem::transmute::<DotManyFn<8>, DotManyFn<N>>(f) });
        }
        // Four rows at once keep the f32 kernel's accumulators in registers (eight would not).
        if isa.avx2() && wt == DType::F32 {
            if N != 4 {
                return None;
            }
            if vnni {
                let f: DotManyFn<4> = crate::x86::f32_x4_zmm;
                // SAFETY: N == 4, so both are the same function pointer type.
                return Some(unsafe { std::mem::transmute::<DotManyFn<4>, DotManyFn<N>>(f) });
            }
            return Some(avx2::f32_xn::<N>);
        }
        if isa.avx2() {
            return Some(match (wt, vnni) {
                (DType::Q4_0, true) => vnni::q4_0_xn::<N>,
                (DType::Q4_0, false) => avx2::q4_0_xn::<N>,
                (DType::Q4_1, true) => vnni::q4_1_xn::<N>,
                (DType::Q4_1, false) => avx2::q4_1_xn::<N>,
                (DType::Q5_0, true) => vnni::q5_0_xn::<N>,
                (DType::Q5_0, false) => avx2::q5_0_xn::<N>,
                (DType::Q8_0, true) => vnni::q8_0_xn::<N>,
                (DType::Q8_0, false) => avx2::q8_0_xn::<N>,
                (DType::Q2K, true) => vnni::q2k_xn::<N>,
                (DType::Q2K, false) => avx2::q2k_xn::<N>,
                (DType::Q3K, true) => vnni::q3k_xn::<N>,
                (DType::Q3K, false) => avx2::q3k_xn::<N>,
                _ => return None,
            });
        }
    }
    let _ = (wt, isa);
    None
}

/// The N-row kernel for a `rows`-row matrix of `wt`: `kernel_xn`, or the many-row form of
/// the interleaved order `kernel_for_matrix` picks (None where there is none).
pub fn kernel_xn_for_matrix<const N: usize>(wt: DType, rows: usize, isa: Isa) -> Option<DotManyFn<N>> {
    if !interleaved_order(wt, rows, isa) {
        return kernel_xn::<N>(wt, isa);
    }
    #[cfg(target_arch = "x86_64")]
    if wt == DType::Q2K {
        return Some(if isa.vnni() { crate::x86::vnni::q2k_interleaved_xn::<N> } else { crate::x86::avx2::q2k_interleaved_xn::<N> });
    }
    None
}

/// An instruction set kiln has kernels for, obtainable only for one this CPU runs: safe code
/// holding an `Isa` may call the kernels written for it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Isa(Level);

/// The levels, best last; each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Level {
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI, on top of `Avx2`.
    Avx512Vnni,
}

const LEVELS: [(Level, &str); 3] = [(Level::Scalar, "scalar"), (Level::Avx2, "avx2"), (Level::Avx512Vnni, "avx512-vnni")];

impl Isa {
    /// The instruction set kernels use: the best this CPU runs, or a lower one named by
    /// `KILN_ISA` (`scalar`, `avx2`; to measure or test those paths on a newer CPU).
    pub fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::hardware();
            match std::env::var("KILN_ISA") {
                Ok(name) => match Isa::named(&name) {
                    Some(isa) => isa,
                    None => {
                        eprintln!("kiln: KILN_ISA={name} is not an instruction set this CPU runs (it runs: {:?}); using {}", Isa::available(), best.name());
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// The best instruction set this CPU runs.
    fn hardware() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
                let vnni = is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni");
                if avx2 && vnni {
                    return Isa(Level::Avx512Vnni);
                }
                if avx2 {
                    return Isa(Level::Avx2);
                }
            }
            Isa(Level::Scalar)
        })
    }

    /// Plain Rust, on every CPU.
    pub fn scalar() -> Isa {
        Isa(Level::Scalar)
    }

    /// All instruction sets this CPU can run, for tests that compare them.
    pub fn available() -> Vec<Isa> {
        let best = Isa::hardware();
        LEVELS.iter().map(|&(l, _)| Isa(l)).filter(|&i| i <= best).collect()
    }

    /// The instruction set called `name` (`scalar`, `avx2`, `avx512-vnni`), if this CPU runs it.
    pub fn named(name: &str) -> Option<Isa> {
        let level = LEVELS.iter().find(|(_, n)| *n == name)?.0;
        Some(Isa(level)).filter(|&i| i <= Isa::hardware())
    }

    pub fn name(self) -> &'static str {
        LEVELS.iter().find(|(l, _)| *l == self.0).map_or("scalar", |(_, n)| n)
    }

    /// AVX2, FMA and F16C kernels may run.
    pub fn avx2(self) -> bool {
        self.0 >= Level::Avx2
    }

    /// AVX-512 VNNI kernels may run.
    pub fn vnni(self) -> bool {
        self.0 == Level::Avx512Vnni
    }
}

impl std::fmt::Debug for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

unsafe fn scalar_dot<const ID: u32>(w: *const u8, a: *const u8, n: usize) -> f32 {
    let wt = DType::from_ggml_id(ID).expect("kernel table only holds known ids");
    let at = wt.activation_type();
    let w_len = wt.row_bytes(n).expect("row length validated by caller");
    let a_len = at.row_bytes(n).expect("row length validated by caller");
    // SAFETY: the caller guarantees both rows are readable for their full length.
    let (w, a) = unsafe { (std::slice::from_raw_parts(w, w_len), std::slice::from_raw_parts(a, a_len)) };
    crate::dot_ref::dot(wt, w, a)
}

/// The kernel for a `rows`-row matrix of `wt`: as `kernel`, except that Q4_K matrices whose
/// row count is a multiple of 8 sum their blocks in the order of llama.cpp's interleaved
/// 8-row kernels, which it uses for exactly those matrices on AVX2 machines.
pub fn kernel_for_matrix(wt: DType, rows: usize, isa: Isa) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if interleaved_order(wt, rows, isa) {
        use crate::x86::{avx2, vnni};
        let vnni = isa.vnni();
        return match (wt, vnni) {
            (DType::Q4K, true) => vnni::q4k_interleaved,
            (DType::Q4K, false) => avx2::q4k_interleaved,
            (DType::Q2K, true) => vnni::q2k_interleaved,
            (DType::Q2K, false) => avx2::q2k_interleaved,
            (_, true) => vnni::q4_0_interleaved,
            (_, false) => avx2::q4_0_interleaved,
        };
    }
    kernel(wt, isa)
}

/// Whether a `rows`-row matrix of `wt` is summed in the order of ggml's 8-row interleaved
/// kernels: llama.cpp repacks Q4_0 and Q4_K matrices whose row count is a multiple of 8 on
/// AVX2 machines (Q2_K on AVX-512 ones) and sums them block by block, so kiln does the same
/// there.
pub fn interleaved_order(wt: DType, rows: usize, isa: Isa) -> bool {
    if !rows.is_multiple_of(8) || !isa.avx2() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    return match wt {
        DType::Q4_0 | DType::Q4K => true,
        DType::Q2K => isa.vnni(),
        _ => false,
    };
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The dot-product kernel for rows of `wt` on `isa`. `isa` must be one of `Isa::available()`.
pub fn kernel(wt: DType, isa: Isa) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::x86::{avx2, vnni};
        macro_rules! pick {
            ($f:ident) => {
                if isa.vnni() {
                    vnni::$f as DotFn
                } else {
                    avx2::$f as DotFn
                }
            };
        }
        if isa.avx2() {
            return match wt {
                DType::F32 if isa.vnni() => crate::x86::f32_zmm as DotFn,
                DType::F32 => avx2::f32 as DotFn,
                DType::F16 => pick!(f16),
                DType::BF16 => pick!(bf16),
                DType::Q4_0 => pick!(q4_0),
                DType::Q4_1 => pick!(q4_1),
                DType::Q5_0 => pick!(q5_0),
                DType::Q5_1 => pick!(q5_1),
                DType::Q8_0 => pick!(q8_0),
                DType::Q2K => pick!(q2k),
                DType::Q3K => pick!(q3k),
                DType::Q4K => pick!(q4k),
                DType::Q5K => pick!(q5k),
                DType::Q6K => pick!(q6k),
                DType::Q8_1 | DType::Q8K => panic!("{wt} is an activation format"),
            };
        }
    }
    let _ = isa;
    match wt {
        DType::F32 => scalar_dot::<0>,
        DType::F16 => scalar_dot::<1>,
        DType::Q4_0 => scalar_dot::<2>,
        DType::Q4_1 => scalar_dot::<3>,
        DType::Q5_0 => scalar_dot::<6>,
        DType::Q5_1 => scalar_dot::<7>,
        DType::Q8_0 => scalar_dot::<8>,
        DType::Q2K => scalar_dot::<10>,
        DType::Q3K => scalar_dot::<11>,
        DType::Q4K => scalar_dot::<12>,
        DType::Q5K => scalar_dot::<13>,
        DType::Q6K => scalar_dot::<14>,
        DType::BF16 => scalar_dot::<30>,
        DType::Q8_1 | DType::Q8K => panic!("{wt} is an activation format"),
    }
}
