//! `kiln-worker quantize -m MODEL --isq TYPE -o OUT.gguf`

use kiln_kernels::DType;
use std::time::Instant;

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Hugging Face model directory or repo id (ORG/NAME)
    #[arg(short, long)]
    pub model: String,
    /// Quantization of the projection weights: q4_0 q4_1 q5_0 q5_1 q8_0 q2k q3k q4k q5k q6k
    #[arg(long, value_parser = kiln_worker::loader::parse_isq)]
    pub isq: DType,
    /// Where to write the GGUF file
    #[arg(short, long)]
    pub output: std::path::PathBuf,
}

pub fn main(args: QuantizeArgs) -> anyhow::Result<()> {
    let dir = kiln_worker::assets::resolve(&args.model, &mut |msg| eprintln!("kiln: {msg}"))?;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a Hugging Face model directory (quantize reads safetensors checkpoints)", dir.display());
    }
    let t = Instant::now();
    let done = kiln_worker::formats::gguf_export::export(&dir, args.isq, &args.output)?;
    eprintln!(
        "kiln: wrote {} ({}, {} tensors, {} projections as {}, {} in other formats, {:.1} MiB) in {:.0} ms",
        args.output.display(),
        done.architecture,
        done.tensors,
        done.isq.quantized,
        args.isq.name(),
        done.isq.fallbacks.len(),
        done.bytes as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
