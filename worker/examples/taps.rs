//! Evaluates tokens one at a time and writes the named intermediate tensors of each step as
//! JSON (`{"name@step": [values]}`), to compare with a reference implementation's dump:
//! `cargo run --release --example taps -- MODEL 1,2,3 l_out-0,kqv_out-0 > taps.json`

use kiln_worker::engine::Session;
use kiln_worker::layers::Compute;
use kiln_worker::loader::LoadedModel;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: taps MODEL_PATH TOKEN_IDS NAMES");
    let model = Arc::new(LoadedModel::load(std::path::Path::new(&args[1]))?);
    let tokens: Vec<u32> = args[2].split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?;
    let wanted: Vec<String> = args[3].split(',').map(str::to_string).collect();
    let mut session = Session::new(Arc::clone(&model), Arc::new(Compute::new(2)), tokens.len() + 1)?;
    let store: Arc<Mutex<BTreeMap<String, Vec<f32>>>> = Arc::default();
    let step = Arc::new(Mutex::new(0usize));
    let (s2, st2) = (Arc::clone(&store), Arc::clone(&step));
    session.set_tap(Some(Box::new(move |name: &str, data: &[f32]| {
        if wanted.iter().any(|w| w == name) {
            let key = format!("{name}@{}", st2.lock().unwrap());
            s2.lock().unwrap().insert(key, data.to_vec());
        }
    })));
    for (i, &t) in tokens.iter().enumerate() {
        *step.lock().unwrap() = i;
        let logits = session.eval(&[t], i)?.to_vec();
        store.lock().unwrap().insert(format!("logits@{i}"), logits);
    }
    println!("{}", serde_json::to_string(&*store.lock().unwrap())?);
    Ok(())
}
