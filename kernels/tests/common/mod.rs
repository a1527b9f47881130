//! Random weights and inputs shared by the kernel tests.
#![allow(dead_code)]

use kiln_kernels::blocks::*;
use kiln_kernels::matmul::AlignedBuf;
use kiln_kernels::DType;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn scale(&mut self) -> u16 {
        f32_to_f16_bits(self.f32() * 0.05)
    }
}

/// Every format a weight may be stored in.
pub fn weight_types() -> Vec<DType> {
    DType::ALL.into_iter().filter(|d| d.is_weight_type()).collect()
}

/// A row of `n` random values of `dtype`: random quant bits, finite random scales.
pub fn random_row(dtype: DType, n: usize, rng: &mut Rng) -> AlignedBuf {
    let mut buf = AlignedBuf::default();
    buf.resize(dtype.row_bytes(n).unwrap());
    let bytes = buf.bytes_mut();
    match dtype {
        DType::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f32().to_le_bytes());
            }
            return buf;
        }
        DType::F16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&f32_to_f16_bits(rng.f32()).to_le_bytes());
            }
            return buf;
        }
        DType::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&((rng.f32().to_bits() >> 16) as u16).to_le_bytes());
            }
            return buf;
        }
        _ => {}
    }
    for b in bytes.iter_mut() {
        *b = rng.next() as u8;
    }
    macro_rules! fix {
        ($t:ty, |$b:ident| $body:expr) => {
            for $b in cast_blocks_mut::<$t>(bytes).unwrap() {
                $body;
            }
        };
    }
    match dtype {
        DType::Q4_0 => fix!(BlockQ4_0, |b| b.d = rng.scale()),
        DType::Q4_1 => fix!(BlockQ4_1, |b| {
            b.d = rng.scale();
            b.m = rng.scale()
        }),
        DType::Q5_0 => fix!(BlockQ5_0, |b| b.d = rng.scale()),
        DType::Q5_1 => fix!(BlockQ5_1, |b| {
            b.d = rng.scale();
            b.m = rng.scale()
        }),
        DType::Q8_0 => fix!(BlockQ8_0, |b| b.d = rng.scale()),
        DType::Q2K => fix!(BlockQ2K, |b| {
            b.d = rng.scale();
            b.dmin = rng.scale()
        }),
        DType::Q3K => fix!(BlockQ3K, |b| b.d = rng.scale()),
        DType::Q4K => fix!(BlockQ4K, |b| {
            b.d = rng.scale();
            b.dmin = rng.scale()
        }),
        DType::Q5K => fix!(BlockQ5K, |b| {
            b.d = rng.scale();
            b.dmin = rng.scale()
        }),
        DType::Q6K => fix!(BlockQ6K, |b| b.d = rng.scale()),
        _ => unreachable!(),
    }
    buf
}

pub fn random_f32(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.f32() * 3.0).collect()
}


/// Says which instruction sets a test ran its kernels on, and records those this CPU lacks
/// as skipped (see `skip`).
pub fn covered(test: &str, isas: &[kiln_kernels::Isa]) {
    let names: Vec<&str> = isas.iter().map(|i| i.name()).collect();
    eprintln!("{test}: covered {}", names.join(", "));
    for level in ["scalar", "avx2", "avx512-vnni"] {
        if !names.contains(&level) {
            skip(test, &format!("{level} not run: this CPU lacks it"));
        }
    }
}

/// A check that cannot run on this machine: said on stderr and appended to
/// `target/tmp/kiln-skipped.txt`, which `make test` counts and lists at the end.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    eprintln!("{test}: skipped: {reason}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-skipped.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        // One write per line: tests run on several threads, and `writeln!` on a file writes
        // each piece of the format separately, so lines written at once would interleave.
        let _ = f.write_all(format!("kernels: {test}: {reason}\n").as_bytes());
    }
}

/// Records of a plain-text ggml fixture: a `case TYPE LABEL ROWS COLS` line followed by three
/// `name VALUE` lines; returns, per record, the case line's words and the three values.
pub fn fixture_records<'a>(text: &'a str, names: [&str; 3]) -> Vec<(Vec<&'a str>, [&'a str; 3])> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(4)
        .map(|c| {
            let field = |i: usize| c[i + 1].strip_prefix(names[i]).expect("fixture field").trim();
            (c[0].split_whitespace().collect(), [field(0), field(1), field(2)])
        })
        .collect()
}

pub fn fixture_dtype(name: &str) -> DType {
    DType::ALL.into_iter().find(|d| d.name() == name).expect("known type")
}
