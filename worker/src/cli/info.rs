//! `kiln-worker info -m MODEL`

use kiln_worker::formats::gguf::GgufFile;
use kiln_worker::formats::gguf_value::{Array, Value};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Model file or known model name
    #[arg(short, long)]
    pub model: String,
    /// Also list every tensor
    #[arg(long)]
    pub tensors: bool,
}

pub fn main(args: InfoArgs) -> anyhow::Result<()> {
    let path = kiln_worker::assets::resolve(&args.model, &mut |msg| eprintln!("kiln: {msg}"))?;
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

fn array_kind(a: &Array) -> &'static str {
    match a {
        Array::String(_) => "string",
        Array::F32(_) => "f32",
        Array::I32(_) => "i32",
        Array::Array(_) => "array",
        _ => "number",
    }
}
