//! Packed (16-row interleaved) products against their scalar reference, and batch invariance.

use kiln_kernels::dot::{kernel_for_matrix, Isa};
use kiln_kernels::matmul::{matmul_packed, Activations, AlignedBuf, WeightView};
use kiln_kernels::packed::{self, PackedMatrix};
use kiln_kernels::pool::ThreadPool;
use kiln_kernels::{Compute, DType};

mod common;
use common::{random_f32, random_row, Rng};

const TYPES: [DType; 10] = [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K];

fn random_matrix(dtype: DType, rows: usize, cols: usize, rng: &mut Rng) -> AlignedBuf {
    let mut w = AlignedBuf::default();
    let n = dtype.row_bytes(cols).unwrap();
    w.resize(n * rows);
    for r in 0..rows {
        w.bytes_mut()[r * n..(r + 1) * n].copy_from_slice(random_row(dtype, cols, rng).bytes());
    }
    w
}

/// Two threads on each instruction set with packed kernels (AVX2, AVX-512 VNNI) that this
/// CPU runs, each named explicitly rather than left to detection; those it lacks are
/// recorded as skipped.
fn packed_isas(test: &str) -> Vec<Compute> {
    let isas: Vec<Isa> = ["avx2", "avx512-vnni"]
        .into_iter()
        .filter_map(|name| {
            let isa = Isa::named(name);
            if isa.is_none() {
                common::skip(test, &format!("{name} not run: this CPU lacks it"));
            }
            isa
        })
        .collect();
    eprintln!("{test}: on {isas:?}");
    isas.into_iter().map(|isa| Compute { pool: ThreadPool::new(2), isa }).collect()
}

/// A random matrix, its packed copy, and a random input of `tokens` rows.
struct Case {
    dtype: DType,
    rows: usize,
    cols: usize,
    tokens: usize,
    w: AlignedBuf,
    packed: PackedMatrix,
    x: Vec<f32>,
}

impl Case {
    fn new(dtype: DType, rows: usize, cols: usize, tokens: usize, rng: &mut Rng) -> Case {
        let w = random_matrix(dtype, rows, cols, rng);
        let packed = PackedMatrix::pack(&WeightView::new(dtype, rows, cols, w.bytes()).unwrap()).unwrap();
        Case { dtype, rows, cols, tokens, w, packed, x: random_f32(cols * tokens, rng) }
    }

    fn view(&self) -> WeightView<'_> {
        WeightView::new(self.dtype, self.rows, self.cols, self.w.bytes()).unwrap()
    }

    /// Input rows `first..first + n` through the packed product: the output and the prepared
    /// activations.
    fn product(&self, compute: &Compute, first: usize, n: usize) -> (Vec<f32>, Activations) {
        let mut act = Activations::default();
        let mut out = vec![0.0; self.rows * n];
        let x = &self.x[first * self.cols..(first + n) * self.cols];
        matmul_packed(compute, self.view(), Some(&self.packed), x, n, &mut act, &mut out).unwrap();
        (out, act)
    }
}

#[test]
fn packed_products_equal_the_reference_bit_for_bit() {
    for compute in packed_isas("packed_products_equal_the_reference_bit_for_bit") {
        let mut rng = Rng(11);
        for (dtype, (rows, cols, tokens)) in TYPES.into_iter().flat_map(|d| [(16, 256, 1), (32, 256, 3), (48, 768, 5), (64, 1280, 9), (16, 512, 17), (192, 768, 257), (576, 1536, 40)].map(|s| (d, s))) {
            let case = Case::new(dtype, rows, cols, tokens, &mut rng);
            let view = case.view();
            let (out, act) = case.product(&compute, 0, tokens);
            for t in 0..tokens {
                for r in 0..rows {
                    let want = packed::reference(compute.isa, dtype, view.row(r), act.row(t), cols);
                    let got = out[t * rows + r];
                    let isa = compute.isa;
                    assert_eq!(want.to_bits(), got.to_bits(), "{dtype} {rows}x{cols} t{t} r{r} on {isa:?}: {want} vs {got}");
                    // SAFETY: the row and the activations hold `cols` values of their formats.
                    let single = unsafe { kernel_for_matrix(dtype, rows, isa)(view.row(r).as_ptr(), act.row(t).as_ptr(), cols) };
                    assert_eq!(single.to_bits(), got.to_bits(), "{dtype} {rows}x{cols} t{t} r{r} on {isa:?}: single-row kernel {single} vs {got}");
                }
            }
        }
    }
}

#[test]
fn packed_reference_matches_the_dequantized_product() {
    let mut rng = Rng(12);
    for dtype in TYPES {
        let cols = 256;
        let w = random_row(dtype, cols, &mut rng);
        let x = random_f32(cols, &mut rng);
        let mut act = Activations::default();
        act.prepare(&x, 1, cols, dtype).unwrap();
        let mut wf = vec![0f32; cols];
        kiln_kernels::dequant::dequantize_row(dtype, w.bytes(), &mut wf).unwrap();
        let mut af = vec![0f32; cols];
        kiln_kernels::dequant::dequantize_row(dtype.activation_type(), act.row(0), &mut af).unwrap();
        let exact: f64 = wf.iter().zip(&af).map(|(&a, &b)| a as f64 * b as f64).sum();
        let got = packed::reference(Isa::detect(), dtype, w.bytes(), act.row(0), cols) as f64;
        let scale: f64 = wf.iter().zip(&af).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        // Q8_1's stored block sum is rounded to half precision, hence the looser bound there.
        let tol = if packed::has_min(dtype) { 2e-3 } else { 1e-5 };
        let single = kiln_kernels::dot_ref::dot(dtype, w.bytes(), act.row(0)) as f64;
        assert!((single - got).abs() <= 1e-5 * scale, "{dtype}: reference {got} vs dot_ref {single}");
        assert!((exact - got).abs() <= tol * scale, "{dtype}: {exact} vs {got}");
    }
}

#[test]
fn a_rows_result_does_not_depend_on_the_batch() {
    for (compute, dtype) in packed_isas("a_rows_result_does_not_depend_on_the_batch").iter().flat_map(|c| TYPES.map(|d| (c, d))) {
        let mut rng = Rng(13);
        let case = Case::new(dtype, 32, 768, 11, &mut rng);
        let (all, _) = case.product(compute, 0, case.tokens);
        for t in 0..case.tokens {
            let (one, _) = case.product(compute, t, 1);
            assert_eq!(one, all[t * case.rows..(t + 1) * case.rows], "{dtype} on {:?}: row {t} alone differs from row {t} in a batch of {}", compute.isa, case.tokens);
        }
    }
}

#[test]
fn packing_refuses_what_it_cannot_lay_out() {
    let mut rng = Rng(14);
    let w = random_matrix(DType::Q4_1, 8, 64, &mut rng);
    let view = WeightView::new(DType::Q4_1, 8, 64, w.bytes()).unwrap();
    assert!(PackedMatrix::pack(&view).is_err(), "8 rows are not a whole group");
    let w = random_matrix(DType::F16, 16, 256, &mut rng);
    let view = WeightView::new(DType::F16, 16, 256, w.bytes()).unwrap();
    assert!(PackedMatrix::pack(&view).is_err(), "F16 has no packed layout");
    // A packed copy of another matrix is refused, not silently used or ignored.
    let compute = Compute { pool: ThreadPool::new(1), isa: Isa::detect() };
    let (a, b) = (random_matrix(DType::Q8_0, 32, 64, &mut rng), random_matrix(DType::Q8_0, 16, 64, &mut rng));
    let other = PackedMatrix::pack(&WeightView::new(DType::Q8_0, 16, 64, b.bytes()).unwrap()).unwrap();
    let view = WeightView::new(DType::Q8_0, 32, 64, a.bytes()).unwrap();
    let mut out = vec![0.0; 32];
    let err = matmul_packed(&compute, view, Some(&other), &random_f32(64, &mut rng), 1, &mut Activations::default(), &mut out).unwrap_err();
    assert!(err.to_string().contains("does not match its weight"), "{err}");
}

#[test]
fn grouped_products_use_each_matrix_packed_or_not() {
    for compute in packed_isas("grouped_products_use_each_matrix_packed_or_not") {
        grouped_products_on(&compute);
    }
}

fn grouped_products_on(compute: &Compute) {
    use kiln_kernels::matmul::{matmul_group, MatMulJob};
    let mut rng = Rng(15);
    let (cols, tokens) = (128, 6);
    // A matrix without a packed copy between two packed ones shifts the global row offsets.
    let shapes = [(DType::Q8_0, 48, true), (DType::Q8_0, 24, false), (DType::Q4_0, 32, true), (DType::Q5_0, 16, true)];
    let mats: Vec<AlignedBuf> = shapes.iter().map(|&(d, r, _)| random_matrix(d, r, cols, &mut rng)).collect();
    let views: Vec<WeightView> = shapes.iter().zip(&mats).map(|(&(d, r, _), m)| WeightView::new(d, r, cols, m.bytes()).unwrap()).collect();
    let packs: Vec<Option<PackedMatrix>> = shapes.iter().zip(&views).map(|(&(_, _, p), v)| p.then(|| PackedMatrix::pack(v).unwrap())).collect();
    let x = random_f32(cols * tokens, &mut rng);
    let mut act = Activations::default();
    act.prepare(&x, tokens, cols, DType::Q8_0).unwrap();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, r, _)| vec![0.0; r * tokens]).collect();
    let mut jobs: Vec<MatMulJob> =
        views.iter().zip(&packs).zip(outs.iter_mut()).map(|((v, p), out)| MatMulJob { weight: *v, packed: p.as_ref(), out }).collect();
    matmul_group(compute, &act, &mut jobs).unwrap();
    for ((view, p), out) in views.iter().zip(&packs).zip(&outs) {
        for t in 0..tokens {
            for r in 0..view.rows {
                let got = out[t * view.rows + r];
                let want = if p.is_some() {
                    packed::reference(compute.isa, view.dtype, view.row(r), act.row(t), cols)
                } else {
                    kiln_kernels::dot_ref::dot(view.dtype, view.row(r), act.row(t))
                };
                assert!((want - got).abs() <= 1e-4 * (1.0 + want.abs()), "{} {}x{cols} t{t} r{r} on {:?}: {want} vs {got}", view.dtype, view.rows, compute.isa);
            }
        }
    }
}

#[test]
fn vector_activation_quantizers_equal_the_scalar_ones() {
    use kiln_kernels::activation::*;
    use kiln_kernels::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1};
    let mut rng = Rng(16);
    let n = 1024;
    // Every instruction set this CPU runs, named explicitly (the scalar code is the oracle).
    let isas = Isa::available();
    common::covered("vector_activation_quantizers_equal_the_scalar_ones", &isas);
    for case in 0..40 {
        let mut x = random_f32(n, &mut rng);
        match case % 5 {
            // Ties for the largest magnitude, of both signs: the first one sets the sign.
            1 => {
                x[7] = 5.0;
                x[300] = -5.0;
                x[600] = 5.0;
            }
            // Values exactly halfway between quants after scaling.
            2 => x.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 255) as f32 - 127.0 + 0.5),
            // A zero block.
            3 => x[256..512].fill(0.0),
            // A NaN: that block goes to the scalar code, the others stay vectorized.
            4 => x[40] = f32::NAN,
            _ => {}
        }
        let zero8 = BlockQ8_0 { d: 0, qs: [0; 32] };
        let (mut a, mut b) = (vec![zero8; n / 32], vec![zero8; n / 32]);
        quantize_q8_0_scalar(&x, &mut b);
        for &isa in &isas {
            quantize_q8_0_on(isa, &x, &mut a);
            assert!(a.iter().zip(&b).all(|(p, q)| p.d == q.d && p.qs == q.qs), "Q8_0 case {case} on {isa:?}");
        }
        let zero81 = BlockQ8_1 { d: 0, s: 0, qs: [0; 32] };
        let (mut a, mut b) = (vec![zero81; n / 32], vec![zero81; n / 32]);
        quantize_q8_1_scalar(&x, &mut b);
        for &isa in &isas {
            quantize_q8_1_on(isa, &x, &mut a);
            assert!(a.iter().zip(&b).all(|(p, q)| p.d == q.d && p.s == q.s && p.qs == q.qs), "Q8_1 case {case} on {isa:?}");
        }
        let zerok = BlockQ8K { d: 0.0, qs: [0; 256], bsums: [0; 16] };
        let (mut a, mut b) = (vec![zerok; n / 256], vec![zerok; n / 256]);
        quantize_q8k_scalar(&x, &mut b);
        for &isa in &isas {
            quantize_q8k_on(isa, &x, &mut a);
            assert!(a.iter().zip(&b).all(|(p, q)| p.d.to_bits() == q.d.to_bits() && p.qs == q.qs && p.bsums == q.bsums), "Q8_K case {case} on {isa:?}");
        }
    }
}

/// F32 matrices packed for the column-order product: every output equals
/// `packed_f32::reference` bit for bit (so AVX2 and AVX-512 agree), whatever the batch, and
/// is within f32 rounding of the exact product.
#[test]
fn column_order_f32_products_equal_their_reference_on_every_isa_and_batch() {
    let isas = packed_isas("column_order_f32_products_equal_their_reference_on_every_isa_and_batch");
    assert!(!isas.is_empty() || !Isa::detect().avx2(), "an AVX2 CPU runs the column-order kernels");
    let mut rng = Rng(15);
    for (rows, cols, tokens) in [(16, 1, 1), (16, 7, 3), (32, 384, 1), (48, 384, 9), (16, 1536, 17), (80, 1536, 45), (384, 384, 130)] {
        let w = random_matrix(DType::F32, rows, cols, &mut rng);
        let view = WeightView::new(DType::F32, rows, cols, w.bytes()).unwrap();
        let packed = PackedMatrix::pack(&view).unwrap();
        let x = random_f32(cols * tokens, &mut rng);
        let mut want = vec![0f32; tokens * rows];
        for g in 0..rows / packed::GROUP {
            let group: Vec<f32> = packed.group(g).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            kiln_kernels::packed_f32::reference(&group, cols, &x, cols, tokens, &mut want[g * packed::GROUP..], rows);
        }
        for t in 0..tokens {
            for r in 0..rows {
                let (row, input) = (&view.row(r), &x[t * cols..(t + 1) * cols]);
                let exact: f64 = (0..cols).map(|k| f32::from_le_bytes(row[4 * k..4 * k + 4].try_into().unwrap()) as f64 * input[k] as f64).sum();
                let scale: f64 = (0..cols).map(|k| (f32::from_le_bytes(row[4 * k..4 * k + 4].try_into().unwrap()) as f64 * input[k] as f64).abs()).sum();
                let got = want[t * rows + r] as f64;
                assert!((got - exact).abs() <= 1e-6 * cols as f64 * scale.max(1e-30), "{rows}x{cols} t{t} r{r}: reference {got} vs exact {exact}");
            }
        }
        for compute in &isas {
            let product = |first: usize, n: usize| {
                let (mut act, mut out) = (Activations::default(), vec![0f32; n * rows]);
                matmul_packed(compute, view, Some(&packed), &x[first * cols..(first + n) * cols], n, &mut act, &mut out).unwrap();
                out
            };
            let all = product(0, tokens);
            for (i, (g, w)) in all.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{rows}x{cols}, {tokens} rows on {:?}: output {i} is {g}, the reference {w}", compute.isa);
            }
            for t in [0, tokens / 2, tokens - 1] {
                assert_eq!(product(t, 1), all[t * rows..(t + 1) * rows], "{rows}x{cols} on {:?}: row {t} alone differs from the batch", compute.isa);
            }
        }
    }
}
