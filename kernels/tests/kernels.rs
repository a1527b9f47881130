//! Every kernel against its scalar reference, on random blocks of every format.

use kiln_kernels::activation;
use kiln_kernels::attention::{attention, AttentionParams, AttentionScratch, KvStore, SeqSpan};
use kiln_kernels::blocks::*;
use kiln_kernels::dequant::dequantize_row;
use kiln_kernels::dot::{kernel, kernel_for_matrix, Isa};
use kiln_kernels::dot_ref;
use kiln_kernels::matmul::{matmul, Activations, AlignedBuf, WeightView};
use kiln_kernels::pool::ThreadPool;
use kiln_kernels::DType;

mod common;
use common::{random_f32, random_row, weight_types, Rng};

fn lengths(dtype: DType) -> Vec<usize> {
    let b = dtype.block_len().max(32);
    if dtype.block_len() == 1 {
        vec![1, 7, 8, 31, 64, 100, 576]
    } else {
        vec![b, 2 * b, 3 * b, 18 * 32 / b * b + b, 2560 / b * b]
    }
}

fn prepared(x: &[f32], dtype: DType) -> Activations {
    let mut act = Activations::default();
    act.prepare(x, 1, x.len(), dtype).unwrap();
    act
}

#[test]
fn reference_dot_matches_dequantized_product() {
    let mut rng = Rng(1);
    for dtype in weight_types() {
        for n in lengths(dtype) {
            let w = random_row(dtype, n, &mut rng);
            let x = random_f32(n, &mut rng);
            let act = prepared(&x, dtype);
            let mut wf = vec![0.0; n];
            let mut af = vec![0.0; n];
            dequantize_row(dtype, w.bytes(), &mut wf).unwrap();
            dequantize_row(dtype.activation_type(), act.row(0), &mut af).unwrap();
            let exact: f64 = wf.iter().zip(&af).map(|(a, b)| *a as f64 * *b as f64).sum();
            let got = dot_ref::dot(dtype, w.bytes(), act.row(0)) as f64;
            let mag: f64 = wf.iter().zip(&af).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            // Q8_1's precomputed block sum `s` is stored as f16, hence the looser bound there.
            let tol = if dtype.activation_type() == DType::Q8_1 { 2e-3 } else { 1e-5 } * mag + 1e-6;
            assert!((exact - got).abs() <= tol, "{dtype} n={n}: dequantized {exact} vs reference {got}");
        }
    }
}

#[test]
fn simd_dot_matches_reference_on_every_isa() {
    let mut rng = Rng(2);
    common::covered("simd_dot_matches_reference_on_every_isa", &Isa::available());
    for isa in Isa::available() {
        for dtype in weight_types() {
            for n in lengths(dtype) {
                let w = random_row(dtype, n, &mut rng);
                let x = random_f32(n, &mut rng);
                let act = prepared(&x, dtype);
                let reference = dot_ref::dot(dtype, w.bytes(), act.row(0));
                let tol = 1e-5 * (reference.abs() + n as f32 * 0.05);
                // Both the plain kernel and the one chosen for 8-row-multiple matrices.
                for f in [kernel(dtype, isa), kernel_for_matrix(dtype, 8, isa)] {
                    let got = unsafe { f(w.bytes().as_ptr(), act.row(0).as_ptr(), n) };
                    assert!((reference - got).abs() <= tol, "{isa:?} {dtype} n={n}: {reference} vs {got}");
                }
            }
        }
    }
}

#[test]
fn activation_quantization_error_is_bounded() {
    let mut rng = Rng(3);
    let x = random_f32(512, &mut rng);
    let mut b0 = vec![BlockQ8_0 { d: 0, qs: [0; 32] }; 16];
    activation::quantize_q8_0(&x, &mut b0);
    let mut bk = vec![BlockQ8K { d: 0.0, qs: [0; 256], bsums: [0; 16] }; 2];
    activation::quantize_q8k(&x, &mut bk);
    for (i, &v) in x.iter().enumerate() {
        let b = &b0[i / 32];
        let d = f16_bits_to_f32(b.d);
        assert!((d * b.qs[i % 32] as f32 - v).abs() <= d * 0.51 + 1e-3 * v.abs());
        let k = &bk[i / 256];
        assert!((k.d * k.qs[i % 256] as f32 - v).abs() <= k.d.abs() * 0.51);
    }
    for k in &bk {
        for (s, chunk) in k.bsums.iter().zip(k.qs.chunks(16)) {
            assert_eq!(*s as i32, chunk.iter().map(|&q| q as i32).sum::<i32>());
        }
    }
    let zeros = [0.0f32; 256];
    activation::quantize_q8k(&zeros, &mut bk[..1]);
    assert_eq!(bk[0].d, 0.0);
}

#[test]
fn matmul_matches_row_by_row_reference_for_any_thread_count() {
    let mut rng = Rng(4);
    for (threads, isa) in [1, 2, 3].into_iter().flat_map(|t| Isa::available().into_iter().map(move |i| (t, i))) {
        let compute = kiln_kernels::Compute { pool: ThreadPool::new(threads), isa };
        for dtype in [DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K, DType::F32] {
            let (rows, cols, tokens) = (37, 512, 5);
            let mut w = AlignedBuf::default();
            w.resize(dtype.row_bytes(cols).unwrap() * rows);
            for r in 0..rows {
                let row = random_row(dtype, cols, &mut rng);
                let n = row.bytes().len();
                w.bytes_mut()[r * n..(r + 1) * n].copy_from_slice(row.bytes());
            }
            let view = WeightView::new(dtype, rows, cols, w.bytes()).unwrap();
            let x = random_f32(cols * tokens, &mut rng);
            let mut act = Activations::default();
            let mut out = vec![0.0; rows * tokens];
            matmul(&compute, view, &x, tokens, &mut act, &mut out).unwrap();
            for t in 0..tokens {
                let single = prepared(&x[t * cols..(t + 1) * cols], dtype);
                for r in 0..rows {
                    let reference = dot_ref::dot(dtype, view.row(r), single.row(0));
                    let got = out[t * rows + r];
                    assert!((reference - got).abs() <= 1e-4 * (1.0 + reference.abs()), "{dtype} {isa:?} t{t} r{r}: {reference} vs {got}");
                }
            }
        }
    }
    common::covered("matmul_matches_row_by_row_reference_for_any_thread_count", &Isa::available());
}

#[test]
fn wrong_shapes_are_errors_not_panics() {
    let bytes = vec![0u8; 20 * 3];
    assert!(WeightView::new(DType::Q4_1, 2, 32, &bytes).is_err());
    assert!(WeightView::new(DType::Q4_1, 3, 33, &bytes).is_err());
    assert!(WeightView::new(DType::Q8K, 3, 32, &bytes).is_err());
    let mut act = Activations::default();
    assert!(act.prepare(&[0.0; 10], 1, 10, DType::Q4_0).is_err());
    assert!(act.prepare(&[0.0; 32], 2, 32, DType::Q4_0).is_err());
}

/// Plain f32 attention over a contiguous history, for comparison with the paged f16 kernel.
fn naive_attention(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], p: &AttentionParams, pos: usize, head: usize) -> Vec<f32> {
    let kvh = head / (p.num_heads / p.num_kv_heads);
    let d = p.head_dim;
    let first = p.window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
    let qh = &q[head * d..(head + 1) * d];
    let mut s: Vec<f32> = (first..=pos)
        .map(|j| qh.iter().zip(&keys[j][kvh * d..(kvh + 1) * d]).map(|(a, b)| a * b).sum::<f32>() * p.scale)
        .collect();
    let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = s.iter_mut().map(|v| {
        *v = (*v - max).exp();
        *v
    }).sum();
    let mut out = vec![0.0; d];
    for (j, w) in (first..=pos).zip(&s) {
        for (o, v) in out.iter_mut().zip(&values[j][kvh * d..(kvh + 1) * d]) {
            *o += w / sum * v;
        }
    }
    out
}

#[test]
fn paged_attention_matches_contiguous_attention() {
    let mut rng = Rng(5);
    common::covered("paged_attention_matches_contiguous_attention", &Isa::available());
    for isa in Isa::available() {
        let compute = kiln_kernels::Compute { pool: ThreadPool::new(2), isa };
        for window in [None, Some(5)] {
            let p = AttentionParams { num_heads: 4, num_kv_heads: 2, head_dim: 16, scale: 0.25, window, softcap: None, block_size: 4 };
            let row = p.num_kv_heads * p.head_dim;
            let mut kv = KvStore::new(64, p.num_kv_heads, p.head_dim);
            // Two sequences with scattered blocks: 11 tokens and 6 tokens.
            let tables: [Vec<u32>; 2] = [vec![7, 2, 9], vec![4, 12]];
            let lens = [11usize, 6];
            // Per sequence: the (keys, values) of every position, rounded as the cache stores them.
            type History = (Vec<Vec<f32>>, Vec<Vec<f32>>);
            let mut history: Vec<History> = vec![];
            for (table, &len) in tables.iter().zip(&lens) {
                let mut ks = vec![];
                let mut vs = vec![];
                for pos in 0..len {
                    let k = random_f32(row, &mut rng);
                    let v = random_f32(row, &mut rng);
                    let slot = table[pos / p.block_size] as usize * p.block_size + pos % p.block_size;
                    kv.write(slot, &k, &v);
                    let round = |x: &Vec<f32>| x.iter().map(|&v| f16_bits_to_f32(f32_to_f16_bits(v))).collect::<Vec<_>>();
                    ks.push(round(&k));
                    vs.push(round(&v));
                }
                history.push((ks, vs));
            }
            // The last 3 tokens of sequence 0 and the last 1 of sequence 1 are "new" rows.
            let spans = [
                SeqSpan { rows: 0..3, first_pos: 8, block_table: &tables[0], bidirectional: &[] },
                SeqSpan { rows: 3..4, first_pos: 5, block_table: &tables[1], bidirectional: &[] },
            ];
            let q = random_f32(4 * p.num_heads * p.head_dim, &mut rng);
            let mut out = vec![0.0; q.len()];
            attention(&compute, &p, &kv, &spans, &q, &mut out, &mut AttentionScratch::default());
            for (si, span) in spans.iter().enumerate() {
                for (i, r) in span.rows.clone().enumerate() {
                    for h in 0..p.num_heads {
                        let qrow = &q[r * p.num_heads * p.head_dim..(r + 1) * p.num_heads * p.head_dim];
                        let expect = naive_attention(qrow, &history[si].0, &history[si].1, &p, span.first_pos + i, h);
                        let got = &out[(r * p.num_heads + h) * p.head_dim..][..p.head_dim];
                        for (a, b) in got.iter().zip(&expect) {
                            assert!((a - b).abs() < 2e-2, "window {window:?} seq {si} row {r} head {h}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }
}

fn many_row_kernel_matches<const N: usize>() {
    let mut rng = Rng(6 + N as u64);
    // 8 rows: matrices llama.cpp repacks (and kiln sums in their order); 5 rows: the rest.
    for (isa, matrix_rows) in Isa::available().into_iter().flat_map(|isa| [(isa, 5), (isa, 8)]) {
        for dtype in weight_types() {
            let Some(many) = kiln_kernels::dot::kernel_xn_for_matrix::<N>(dtype, matrix_rows, isa) else { continue };
            let single = kernel_for_matrix(dtype, matrix_rows, isa);
            for n in lengths(dtype) {
                let w = random_row(dtype, n, &mut rng);
                let x = random_f32(N * n, &mut rng);
                let mut acts = Activations::default();
                acts.prepare(&x, N, n, dtype).unwrap();
                let ptrs: [*const u8; N] = std::array::from_fn(|t| acts.row(t).as_ptr());
                let mut out = [0f32; N];
                unsafe { many(w.bytes().as_ptr(), &ptrs, &acts.scales::<N>(0), n, &mut out) };
                for t in 0..N {
                    let one = unsafe { single(w.bytes().as_ptr(), ptrs[t], n) };
                    assert_eq!(out[t].to_bits(), one.to_bits(), "{isa:?} {dtype} ({matrix_rows}-row matrix) n={n} row {t} of {N}");
                }
            }
        }
    }
}

#[test]
fn many_row_kernels_equal_single_row_kernels_bit_for_bit() {
    many_row_kernel_matches::<4>();
    many_row_kernel_matches::<8>();
}

#[test]
fn batched_attention_scores_equal_single_scores_bit_for_bit() {
    let mut rng = Rng(8);
    for n in [64usize, 128, 256] {
        let mut kv = KvStore::new(20, 1, n);
        for slot in 0..20 {
            kv.write(slot, &random_f32(n, &mut rng), &random_f32(n, &mut rng));
        }
        let q: Vec<f32> = random_f32(n, &mut rng).iter().map(|&v| f16_bits_to_f32(f32_to_f16_bits(v))).collect();
        let slots: Vec<u32> = (0..19).map(|i| (i * 7 % 20) as u32).collect();
        let q16: Vec<u16> = q.iter().map(|&v| f32_to_f16_bits(v)).collect();
        common::covered("batched_attention_scores_equal_single_scores_bit_for_bit", &Isa::available());
        for isa in Isa::available() {
            let mut got = vec![0f32; slots.len()];
            kiln_kernels::attention::scores(isa, &q, &kv, &slots, 0, &mut got);
            for (j, &slot) in slots.iter().enumerate() {
                let k: Vec<u16> = (0..n).map(|i| kv_key_bits(&kv, slot as usize, i)).collect();
                let one = kiln_kernels::numerics::dot_f16(&q16, &k);
                assert_eq!(got[j].to_bits(), one.to_bits(), "{isa:?} n={n} key {j}");
            }
        }
    }
}

/// Reads back the half-precision key bits the store holds (one kv head).
fn kv_key_bits(kv: &KvStore, slot: usize, i: usize) -> u16 {
    kv.key_bits(slot, 0)[i]
}

#[test]
fn paged_attention_equals_contiguous_layout_exactly() {
    // The same history stored in consecutive blocks and in scattered ones gives the same
    // output bit for bit: paging changes where keys live, not the arithmetic.
    let mut rng = Rng(9);
    common::covered("paged_attention_equals_contiguous_layout_exactly", &Isa::available());
    for isa in Isa::available() {
        let compute = kiln_kernels::Compute { pool: ThreadPool::new(2), isa };
        for window in [None, Some(7)] {
            let p = AttentionParams { num_heads: 4, num_kv_heads: 2, head_dim: 64, scale: 0.125, window, softcap: None, block_size: 4 };
            let row = p.num_kv_heads * p.head_dim;
            let len = 30;
            let contiguous: Vec<u32> = (0..8).collect();
            let scattered: Vec<u32> = vec![13, 2, 9, 31, 0, 22, 17, 5];
            let mut kv_a = KvStore::new(40 * 4, p.num_kv_heads, p.head_dim);
            let mut kv_b = KvStore::new(40 * 4, p.num_kv_heads, p.head_dim);
            for pos in 0..len {
                let (k, v) = (random_f32(row, &mut rng), random_f32(row, &mut rng));
                kv_a.write(contiguous[pos / 4] as usize * 4 + pos % 4, &k, &v);
                kv_b.write(scattered[pos / 4] as usize * 4 + pos % 4, &k, &v);
            }
            let q = random_f32(5 * p.num_heads * p.head_dim, &mut rng);
            let run = |kv: &KvStore, table: &[u32]| {
                let spans = [SeqSpan { rows: 0..5, first_pos: len - 5, block_table: table, bidirectional: &[] }];
                let mut out = vec![0.0; q.len()];
                attention(&compute, &p, kv, &spans, &q, &mut out, &mut AttentionScratch::default());
                out
            };
            let (a, b) = (run(&kv_a, &contiguous), run(&kv_b, &scattered));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "window {window:?}");
        }
    }
}

#[test]
fn attention_is_identical_on_every_isa_and_head_grouping() {
    // With many rows, query heads that share a key/value head are computed together; a row
    // alone is computed head by head. Neither that nor the instruction set may change a bit.
    let mut rng = Rng(10);
    let len = 70;
    for (num_heads, num_kv_heads, head_dim) in [(4, 1, 256), (9, 3, 64), (6, 1, 128), (5, 5, 64), (8, 2, 48), (10, 2, 64)] {
        for window in [None, Some(37)] {
            let p = AttentionParams { num_heads, num_kv_heads, head_dim, scale: 0.1, window, softcap: None, block_size: 16 };
            let row = num_kv_heads * head_dim;
            let table: Vec<u32> = vec![3, 0, 4, 1, 2];
            let mut kv = KvStore::new(5 * 16, num_kv_heads, head_dim);
            let round = |x: &[f32]| x.iter().map(|&v| f16_bits_to_f32(f32_to_f16_bits(v))).collect::<Vec<_>>();
            let (mut keys, mut values) = (vec![], vec![]);
            for pos in 0..len {
                let (k, v) = (random_f32(row, &mut rng), random_f32(row, &mut rng));
                kv.write(table[pos / 16] as usize * 16 + pos % 16, &k, &v);
                keys.push(round(&k));
                values.push(round(&v));
            }
            let width = num_heads * head_dim;
            let q = random_f32(len * width, &mut rng);
            let mut reference: Option<Vec<f32>> = None;
            common::covered("attention_is_identical_on_every_isa_and_head_grouping", &Isa::available());
            for isa in Isa::available() {
                let compute = kiln_kernels::Compute { pool: ThreadPool::new(2), isa };
                let mut all = vec![0.0; q.len()];
                let spans = [SeqSpan { rows: 0..len, first_pos: 0, block_table: &table, bidirectional: &[] }];
                attention(&compute, &p, &kv, &spans, &q, &mut all, &mut AttentionScratch::default());
                let mut last = vec![0.0; width];
                let spans = [SeqSpan { rows: 0..1, first_pos: len - 1, block_table: &table, bidirectional: &[] }];
                attention(&compute, &p, &kv, &spans, &q[(len - 1) * width..], &mut last, &mut AttentionScratch::default());
                let case = format!("{isa:?} heads {num_heads}/{num_kv_heads} dim {head_dim} window {window:?}");
                assert!(all[(len - 1) * width..].iter().zip(&last).all(|(a, b)| a.to_bits() == b.to_bits()), "{case}: last row alone differs");
                match &reference {
                    None => {
                        // The shared arithmetic (softmax, bucket folding) checked once
                        // against plain f32 attention.
                        for pos in [0, 15, 16, 40, len - 1] {
                            for h in 0..num_heads {
                                let expect = naive_attention(&q[pos * width..(pos + 1) * width], &keys, &values, &p, pos, h);
                                let got = &all[pos * width + h * head_dim..][..head_dim];
                                let gap = got.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                                assert!(gap < 2e-2, "{case}: position {pos} head {h} off by {gap}");
                            }
                        }
                        reference = Some(all)
                    }
                    Some(r) => assert!(r.iter().zip(&all).all(|(a, b)| a.to_bits() == b.to_bits()), "{case}: differs from scalar"),
                }
            }
        }
    }
}

/// Exact GELU with kiln's erf polynomial: the same bits on every instruction set (and for
/// any length, whose tail the vector kernels leave to the scalar form), within 3e-7 |x| of
/// GELU with a double-precision erf, and the usual values at the edges.
#[test]
fn gelu_erf_is_identical_on_every_isa_and_close_to_exact_gelu() {
    let mut xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 1e-4).collect();
    xs.extend([0.0, -0.0, 1e-30, -1e-30, 4.0 * std::f32::consts::SQRT_2, 30.0, -30.0, 1e6, -1e6, f32::MAX, f32::MIN]);
    for &x in &xs {
        let got = kiln_kernels::ops::gelu_erf_one(x) as f64;
        let x64 = x as f64;
        let want = 0.5 * x64 * (1.0 + libm::erf(x64 / std::f64::consts::SQRT_2));
        assert!((got - want).abs() <= 3e-7 * x64.abs().min(1e30) + 1.2e-7 * want.abs(), "gelu({x}) = {got}, exact {want}");
    }
    assert_eq!(kiln_kernels::ops::gelu_erf_one(-30.0), 0.0);
    assert_eq!(kiln_kernels::ops::gelu_erf_one(30.0), 30.0);
    assert!(kiln_kernels::ops::gelu_erf_one(f32::NAN).is_nan());
    let want: Vec<u32> = xs.iter().map(|&x| kiln_kernels::ops::gelu_erf_one(x).to_bits()).collect();
    for isa in Isa::available() {
        for len in [xs.len(), 1, 7, 8, 15, 17, 33] {
            let mut got = xs[..len].to_vec();
            kiln_kernels::ops::gelu_erf(isa, &mut got);
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert!(got == want[..len], "gelu_erf on {isa:?} ({len} values) differs from the scalar form");
        }
    }
    common::covered("gelu_erf_is_identical_on_every_isa_and_close_to_exact_gelu", &Isa::available());
}
