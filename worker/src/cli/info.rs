//! `kiln-worker info -m MODEL`

use kiln_worker::formats::gguf::GgufFile;
use kiln_worker::formats::gguf_value::{Array, Value};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Model file, Hugging Face model directory, or known model name
    #[arg(short, long)]
    pub model: String,
    /// Also list every tensor
    #[arg(long)]
    pub tensors: bool,
}

pub fn main(args: InfoArgs) -> anyhow::Result<()> {
    let path = kiln_worker::assets::resolve(&args.model, &mut |msg| eprintln!("kiln: {msg}"))?;
    if path.is_dir() && kiln_worker::embedding::is_embedding_dir(&path) {
        let e = kiln_worker::embedding::Embedder::load(&path)?;
        println!("directory: {} (embedding model)", path.display());
        println!("  architecture = {}", e.architecture);
        println!("  dimensions = {}", e.dimensions());
        println!("  pooling = {}{}", e.pooling.pooling.name(), if e.pooling.normalize { ", normalized" } else { "" });
        println!("  longest input = {} tokens", e.pooling.max_tokens);
        println!("  vocabulary = {} tokens", e.tokenizer.vocab_size());
        println!("  weights = {}", e.weight_format);
        return Ok(());
    }
    if path.is_dir() {
        return hf_info(&path, args.tensors);
    }
    let gguf = GgufFile::open(&path)?;
    println!("file: {} (GGUF v{})", path.display(), gguf.version);
    let mut keys: Vec<_> = gguf.metadata().keys().collect();
    keys.sort();
    for k in keys {
        let v = &gguf.metadata()[k];
        let shown = match v {
            Value::Array(a) => format!("[{} x {}]", a.len(), array_kind(a)),
            Value::String(s) if s.len() > 120 => format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(120)], s.len()),
            Value::String(s) => format!("{s:?}"),
            other => format!("{other:?}"),
        };
        println!("  {k} = {shown}");
    }
    let total: u64 = gguf.tensors().iter().map(|t| t.num_bytes).sum();
    println!("tensors: {} ({:.1} MiB)", gguf.tensors().len(), total as f64 / (1 << 20) as f64);
    if args.tensors {
        for t in gguf.tensors() {
            println!("  {:<40} {:>6} {:?}", t.name, t.dtype.name(), t.dims);
        }
    }
    Ok(())
}

/// A Hugging Face directory: what kiln reads from config.json, and the checkpoint's tensors.
fn hf_info(dir: &std::path::Path, list: bool) -> anyhow::Result<()> {
    let config = kiln_worker::formats::hf_tokenizer::read_json(&dir.join("config.json"))?;
    let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let cfg = kiln_worker::models::hf_config::from_hf(&config, &name)?;
    println!("directory: {} (Hugging Face, {})", dir.display(), config["architectures"][0].as_str().unwrap_or("?"));
    println!("  {cfg:#?}");
    let checkpoint = kiln_worker::formats::safetensors::Checkpoint::open_dir(dir)?;
    println!("tensors: {}", checkpoint.len());
    if list {
        for n in checkpoint.names() {
            if let Some((t, _)) = checkpoint.tensor(n) {
                println!("  {:<50} {:>6} {:?}", t.name, t.dtype.name(), t.dims);
            }
        }
        for (n, dtype) in checkpoint.others() {
            println!("  {n:<50} {dtype:>6} (not used)");
        }
    }
    Ok(())
}

fn array_kind(a: &Array) -> &'static str {
    match a {
        Array::String(_) => "string",
        Array::F32(_) => "f32",
        Array::I32(_) => "i32",
        Array::Array(_) => "array",
        _ => "number",
    }
}
