//! Prints teacher-forced logits as JSON for comparing against a reference implementation:
//! `cargo run --release --example logits -- MODEL 1,2,3 > logits.json`

use kiln_worker::engine::Session;
use kiln_worker::layers::Compute;
use kiln_worker::loader::LoadedModel;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: logits MODEL_PATH COMMA_SEPARATED_TOKEN_IDS");
    let model = Arc::new(LoadedModel::load(std::path::Path::new(&args[1]))?);
    let tokens: Vec<u32> = args[2].split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?;
    let vocab = model.model.config().vocab_size;
    let mut session = Session::new(Arc::clone(&model), Arc::new(Compute::new(2)), tokens.len() + 1)?;
    let logits = session.score(&tokens)?;
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    println!("{}", serde_json::to_string(&rows)?);
    Ok(())
}
