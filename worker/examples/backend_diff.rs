//! Runs the same tokens through kiln's CPU kernels and through another backend, and prints,
//! for each intermediate tensor of the forward pass, the largest difference between them:
//! `cargo run --release --example backend_diff -- MODEL_PATH candle-cpu [TOKENS]`

use kiln_worker::backend::Device;
use kiln_worker::engine::Session;
use kiln_worker::layers::Compute;
use kiln_worker::loader::LoadedModel;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Taps = Arc<Mutex<Vec<(String, Vec<f32>)>>>;

fn run(path: &std::path::Path, device: &Device, tokens: &[u32]) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let model = Arc::new(LoadedModel::load_on(path, None, None, device)?);
    let mut session = Session::new(model, Arc::new(Compute::new(2)), tokens.len() + 1)?;
    let taps: Taps = Arc::default();
    let sink = Arc::clone(&taps);
    session.set_tap(Some(Box::new(move |name: &str, data: &[f32]| {
        if let Ok(mut t) = sink.lock() {
            t.push((name.to_string(), data.to_vec()));
        }
    })));
    let logits = session.score(tokens)?;
    let mut out = std::mem::take(&mut *taps.lock().map_err(|_| anyhow::anyhow!("tap lock"))?);
    out.push(("logits".into(), logits));
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 3, "usage: backend_diff MODEL_PATH DEVICE [TOKEN_IDS]");
    let path = std::path::Path::new(&args[1]);
    let device: Device = args[2].parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let tokens: Vec<u32> = match args.get(3) {
        Some(list) => list.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?,
        None => (0..64).map(|i| (i * 37 % 1000 + 10) as u32).collect(),
    };
    let reference = run(path, &Device::Cpu, &tokens)?;
    let other: BTreeMap<String, Vec<f32>> = run(path, &device, &tokens)?.into_iter().collect();
    for (name, want) in &reference {
        let Some(got) = other.get(name) else {
            println!("{name:<24} missing on {device}");
            continue;
        };
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let gap = want.iter().zip(got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{name:<24} max |x| {scale:>10.4}   max gap {gap:>10.3e}   relative {:>9.2e}", gap / scale.max(f32::MIN_POSITIVE));
    }
    Ok(())
}
