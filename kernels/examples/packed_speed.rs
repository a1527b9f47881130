//! Products a second of one packed matrix against N activation rows on THREADS threads:
//! `cargo run --release -p kiln-kernels --example packed_speed -- [DTYPE] [ROWS] [COLS] [N] [THREADS]`
//! (defaults Q4_1 1536 576 16 1). The ISA is the one `KILN_ISA` or the CPU chooses. F32
//! matrices are not packed (the many-row dot-product kernels); F32C packs them in the column
//! order of encoders (`packed_f32`).
mod common;

use kiln_kernels::matmul::{matmul_group, Activations, MatMulJob, WeightView};
use kiln_kernels::packed::PackedMatrix;
use kiln_kernels::quantize::quantize_row;
use kiln_kernels::{Compute, DType};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = match args.first().map_or("Q4_1", |s| s.as_str()) {
        "Q4_0" => DType::Q4_0,
        "Q4_1" => DType::Q4_1,
        "Q5_0" => DType::Q5_0,
        "Q8_0" => DType::Q8_0,
        "Q4_K" => DType::Q4K,
        "Q6_K" => DType::Q6K,
        "F32" | "F32C" => DType::F32,
        other => return Err(format!("unknown format {other}").into()),
    };
    let rows: usize = args.get(1).map_or(Ok(1536), |s| s.parse())?;
    let cols: usize = args.get(2).map_or(Ok(576), |s| s.parse())?;
    let n: usize = args.get(3).map_or(Ok(16), |s| s.parse())?;
    let threads: usize = args.get(4).map_or(Ok(1), |s| s.parse())?;
    let mut next = common::uniform();
    let row_bytes = dtype.row_bytes(cols).ok_or("columns are not whole blocks")?;
    let mut bytes = vec![0u8; rows * row_bytes];
    for r in 0..rows {
        let w: Vec<f32> = (0..cols).map(|_| next()).collect();
        let dst = &mut bytes[r * row_bytes..(r + 1) * row_bytes];
        if dtype == DType::F32 {
            dst.copy_from_slice(&w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        } else {
            quantize_row(dtype, &w, dst)?;
        }
    }
    let view = WeightView::new(dtype, rows, cols, &bytes)?;
    let columns = args.first().is_some_and(|s| s == "F32C");
    let packed = if dtype == DType::F32 && !columns { None } else { Some(PackedMatrix::pack(&view)?) };
    let x: Vec<f32> = (0..n * cols).map(|_| next()).collect();
    let compute = Compute::new(threads);
    let mut act = Activations::default();
    let mut out = vec![0f32; n * rows];
    println!("{dtype} {rows}x{cols} against {n} rows, isa {:?}", compute.isa);
    act.prepare(&x, n, cols, dtype)?;
    for _ in 0..3 {
        let reps = (2_000_000_000 / (rows * cols * n)).max(3);
        let start = Instant::now();
        for _ in 0..reps {
            matmul_group(&compute, &act, &mut [MatMulJob { weight: view, packed: packed.as_ref(), out: &mut out }])?;
        }
        let secs = start.elapsed().as_secs_f64();
        println!("{:.1} G products/s, {:.1} us a product, {:.1} GB/s of weights", (reps * rows * cols * n) as f64 / secs / 1e9, secs / reps as f64 * 1e6, (reps * bytes.len()) as f64 / secs / 1e9);
    }
    Ok(())
}
