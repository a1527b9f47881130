//! Dot products against llama.cpp's own kernels, bit for bit, for formats that no golden
//! model exercises (fixture made by scripts/goldens/make_kernel_goldens.py).

use kiln_kernels::dot::{interleaved_order, kernel_for_matrix, Isa};
use kiln_kernels::matmul::AlignedBuf;
use kiln_kernels::packed;
use kiln_kernels::DType;

mod common;

struct Case {
    dtype: DType,
    label: String,
    rows: usize,
    cols: usize,
    weights: AlignedBuf,
    activations: AlignedBuf,
    dots: Vec<u32>,
}

fn aligned(hex: &str) -> AlignedBuf {
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex byte")).collect();
    let mut buf = AlignedBuf::default();
    buf.resize(bytes.len());
    buf.bytes_mut().copy_from_slice(&bytes);
    buf
}

fn cases() -> Vec<Case> {
    common::fixture_records(include_str!("fixtures/ggml_dots.txt"), ["weights", "activations", "dots"])
        .into_iter()
        .map(|(head, [weights, activations, dots])| Case {
            dtype: common::fixture_dtype(head[1]),
            label: head[2].to_string(),
            rows: head[3].parse().expect("rows"),
            cols: head[4].parse().expect("cols"),
            weights: aligned(weights),
            activations: aligned(activations),
            dots: dots.split_whitespace().map(|v| v.parse().expect("f32 bits")).collect(),
        })
        .collect()
}

#[test]
fn dot_products_equal_llama_cpp_bit_for_bit() {
    // The fixture holds llama.cpp's x86 SIMD results; the scalar kernels follow the portable
    // reference instead, so they are compared in kernels.rs.
    let vector: Vec<Isa> = Isa::available().into_iter().filter(|&i| i != Isa::scalar()).collect();
    common::covered("dot_products_equal_llama_cpp_bit_for_bit", &[&[Isa::scalar()], vector.as_slice()].concat());
    if vector.is_empty() {
        common::skip("dot_products_equal_llama_cpp_bit_for_bit", "no AVX2 here: nothing to hold to llama.cpp's x86 results");
    }
    let cases = cases();
    assert!(!cases.is_empty());
    for case in cases {
        let row_bytes = case.weights.bytes().len() / case.rows;
        assert_eq!(case.dots.len(), case.rows);
        for (r, &want) in case.dots.iter().enumerate() {
            let row = &case.weights.bytes()[r * row_bytes..(r + 1) * row_bytes];
            // Packed matrices have whole groups of 16 rows; where llama.cpp sums such matrices
            // in another order than its single-row kernels, so does the packed reference.
            if let Some(avx2) = Isa::named("avx2").filter(|&avx2| packed::supports(case.dtype) && !interleaved_order(case.dtype, packed::GROUP, avx2)) {
                let reference = packed::reference(avx2, case.dtype, row, case.activations.bytes(), case.cols);
                assert_eq!(reference.to_bits(), want, "{} {} row {r}: packed reference {reference} vs llama.cpp {}", case.dtype, case.label, f32::from_bits(want));
            }
            // The scalar kernels are the portable reference (`dot_ref`), not llama.cpp's x86
            // order; `kernels.rs` holds them to the SIMD kernels within rounding.
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::scalar()) {
                // SAFETY: the row and the activations hold `cols` values of their formats.
                let got = unsafe { kernel_for_matrix(case.dtype, case.rows, isa)(row.as_ptr(), case.activations.bytes().as_ptr(), case.cols) };
                assert_eq!(got.to_bits(), want, "{} {} row {r} on {isa:?}: {got} vs llama.cpp {}", case.dtype, case.label, f32::from_bits(want));
            }
        }
    }
}

/// kiln's GELU of a half-float input as half-float bits, where llama.cpp looks GELU up in
/// its table (inputs strictly between -10 and 10); 0 elsewhere.
fn kiln_gelu_bits(bits: u16) -> u16 {
    let x = kiln_kernels::blocks::f16_bits_to_f32(bits);
    if !(x.is_finite() && x > -10.0 && x < 10.0) {
        return 0;
    }
    let mut g = [x];
    kiln_kernels::ops::gelu_mul(&mut g, &[1.0]);
    kiln_kernels::blocks::f32_to_f16_bits(g[0])
}

#[test]
fn gelu_equals_llama_cpp_table() {
    let text = include_str!("fixtures/ggml_gelu.txt");
    let mut lines = text.lines();
    let hash_line = lines.next().and_then(|l| l.strip_prefix("fnv1a64 ")).expect("hash line");
    let want_hash = u64::from_str_radix(hash_line, 16).expect("hex hash");
    let entries = lines.next().and_then(|l| l.strip_prefix("entries ")).expect("entries line");
    for entry in entries.split_whitespace() {
        let (input, value) = entry.split_once(':').expect("input:value");
        let (input, value) = (u16::from_str_radix(input, 16).expect("hex"), u16::from_str_radix(value, 16).expect("hex"));
        assert_eq!(kiln_gelu_bits(input), value, "GELU of half {input:#06x}: kiln {:#06x}, llama.cpp {value:#06x}", kiln_gelu_bits(input));
    }
    let mut hash = 0xCBF2_9CE4_8422_2325u64;
    for bits in 0..=u16::MAX {
        for byte in kiln_gelu_bits(bits).to_le_bytes() {
            hash = (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    assert_eq!(hash, want_hash, "kiln's GELU differs from llama.cpp's table for some half-float input");
}
