//! Load-time quantization (`--isq`): every type quantizes all projection weights of a real
//! (tiny, seeded) checkpoint while loading, and the logits drift from transformers' f32
//! reference by an amount that grows as the format gets coarser, within stated bounds.
//! Prints load time and drift per type (`cargo test --test isq -- --nocapture`).

mod common;

use kiln_kernels::DType;
use kiln_worker::engine::Session;
use kiln_worker::loader::{LoadedModel, ISQ_TYPES};
use std::sync::Arc;
use std::time::Instant;

/// Largest relative RMS logit drift accepted per type: the measured value (docs/models.md)
/// plus about a quarter. Quantizers and kernels are deterministic and the fixture is seeded,
/// so the drift is the same on every run; the headroom only absorbs deliberate changes to the
/// quantizers, and a bound far above the measurement would let a quantizer bug through.
fn bound(t: DType) -> f64 {
    match t {
        DType::Q8_0 => 0.02,   // measured 0.0154
        DType::Q6K => 0.05,    // 0.0399
        DType::Q5K => 0.075,   // 0.0596
        DType::Q5_0 | DType::Q5_1 => 0.10, // 0.0811, 0.0758
        DType::Q4_0 | DType::Q4_1 | DType::Q4K => 0.225, // 0.1788, 0.1326, 0.1357
        DType::Q3K => 0.36,    // 0.2846
        DType::Q2K => 0.62,    // 0.4972
        other => panic!("no drift bound for {other}"),
    }
}

#[test]
fn every_isq_type_quantizes_all_projections_with_bounded_drift() {
    let dir = common::hf_fixture("llama-wide");
    let reference = common::hf_reference("llama-wide");
    let ids = common::ids(&reference["ids"]);
    let want: Vec<f64> = reference["logits"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect();
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
    let vocab = want.len() / ids.len();
    let top1 = |logits: &[f64], p: usize| (0..vocab).max_by(|&a, &b| logits[p * vocab + a].total_cmp(&logits[p * vocab + b])).unwrap();
    let mut drifts = Vec::new();
    println!("type   load ms  weights MiB  rel. RMS drift  max |drift|  top-1 agreement");
    for &(name, t) in ISQ_TYPES {
        let start = Instant::now();
        let model = Arc::new(LoadedModel::load_quantized(&dir, Some(t)).unwrap_or_else(|e| panic!("{name}: {e}")));
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let report = model.isq.clone().expect("a load-time quantization report");
        assert_eq!(report.quantized, 14, "{name}: every projection of both layers");
        assert!(report.fallbacks.is_empty(), "{name}: rows of 256 and 512 take every format: {:?}", report.fallbacks);
        let mut session = Session::new(Arc::clone(&model), common::compute(), 64).unwrap();
        let got: Vec<f64> = session.score(&ids).unwrap().iter().map(|&v| v as f64).collect();
        let drift = (got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / want.len() as f64).sqrt() / rms;
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let agree = (0..ids.len()).filter(|&p| top1(&got, p) == top1(&want, p)).count();
        println!(
            "{name:<6} {load_ms:>7.1}  {:>11.2}  {drift:>14.4}  {max:>11.4}  {agree}/{}",
            report.bytes_after as f64 / (1 << 20) as f64,
            ids.len()
        );
        assert!(drift > 1e-4, "{name}: the logits moved, so the weights really were quantized");
        assert!(drift < bound(t), "{name}: relative drift {drift} exceeds {}", bound(t));
        drifts.push((name, drift));
    }
    let of = |n: &str| drifts.iter().find(|d| d.0 == n).map(|d| d.1).unwrap();
    assert!(of("q8_0") < of("q4_0") && of("q4_0") < of("q2k"), "coarser formats drift more: {drifts:?}");
    assert!(of("q6k") < of("q4k") && of("q4k") < of("q3k"), "{drifts:?}");
}
