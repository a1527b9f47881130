//! One-token matrix products equal llama.cpp's bit for bit where it repacks the weights into
//! its 8-row interleaved layouts (Q4_0 and Q4_K on AVX2 CPUs, Q2_K on AVX-512 ones) and sums
//! them block by block: the fixture comes from its CPU backend running a ggml graph with the
//! weights in its repacking buffer (scripts/goldens/ggml_matmul.c, on an AVX-512 VNNI CPU).

use kiln_kernels::matmul::{matmul_packed, Activations, AlignedBuf, WeightView};
use kiln_kernels::packed::{self, PackedMatrix};
use kiln_kernels::pool::ThreadPool;
use kiln_kernels::{Compute, DType, Isa};

mod common;

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex byte")).collect()
}

struct Case {
    dtype: DType,
    rows: usize,
    cols: usize,
    weights: AlignedBuf,
    input: Vec<f32>,
    outputs: Vec<u32>,
}

fn cases() -> Vec<Case> {
    common::fixture_records(include_str!("fixtures/ggml_matmul.txt"), ["weights", "input", "outputs"])
        .into_iter()
        .map(|(head, [weights, input, outputs])| {
            let raw = bytes(weights);
            let mut buf = AlignedBuf::default();
            buf.resize(raw.len());
            buf.bytes_mut().copy_from_slice(&raw);
            Case {
                dtype: common::fixture_dtype(head[1]),
                rows: head[3].parse().expect("rows"),
                cols: head[4].parse().expect("cols"),
                weights: buf,
                input: bytes(input).chunks(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
                outputs: outputs.split_whitespace().map(|v| v.parse().expect("f32 bits")).collect(),
            }
        })
        .collect()
}

/// Whether llama.cpp on a CPU with `isa` uses the interleaved order the fixture holds.
fn repacked_there(dtype: DType, isa: Isa) -> bool {
    match dtype {
        DType::Q2K => isa.vnni(),
        _ => isa.avx2(),
    }
}

#[test]
fn repacked_products_equal_llama_cpp_bit_for_bit() {
    let cases = cases();
    assert!(cases.len() >= 6, "the fixture lost cases");
    let mut run_on = Vec::new();
    for isa in Isa::available() {
        let compute = Compute { pool: ThreadPool::new(2), isa };
        for case in &cases {
            if !repacked_there(case.dtype, isa) {
                continue;
            }
            let view = WeightView::new(case.dtype, case.rows, case.cols, case.weights.bytes()).unwrap();
            // As the worker runs them: packed at load on CPUs that use packed kernels.
            let packed = (isa.avx2() && packed::supports(case.dtype) && case.rows.is_multiple_of(packed::GROUP)).then(|| PackedMatrix::pack(&view).unwrap());
            let mut out = vec![0.0f32; case.rows];
            matmul_packed(&compute, view, packed.as_ref(), &case.input, 1, &mut Activations::default(), &mut out).unwrap();
            for (r, (&got, &want)) in out.iter().zip(&case.outputs).enumerate() {
                assert_eq!(got.to_bits(), want, "{} {}x{} row {r} on {isa:?} (packed: {}): {got} vs llama.cpp {}", case.dtype, case.rows, case.cols, packed.is_some(), f32::from_bits(want));
            }
            if !run_on.contains(&isa) {
                run_on.push(isa);
            }
        }
    }
    let names: Vec<&str> = run_on.iter().map(|i| i.name()).collect();
    eprintln!("repacked_products_equal_llama_cpp_bit_for_bit: covered {} (scalar has no repacked order to match)", names.join(", "));
    for level in ["avx2", "avx512-vnni"] {
        if !names.contains(&level) {
            common::skip("repacked_products_equal_llama_cpp_bit_for_bit", &format!("{level} not run: this CPU lacks it"));
        }
    }
}
