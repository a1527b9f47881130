//! Helpers shared by the real-model tests: models are fetched (and verified) on first use
//! and loaded once per test binary.

#![allow(dead_code)]

pub mod tiny;

use kiln_worker::engine::Session;
use kiln_worker::layers::Compute;
use kiln_worker::loader::LoadedModel;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub fn model(name: &str) -> Arc<LoadedModel> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<LoadedModel>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(cache.entry(name.to_string()).or_insert_with(|| {
        let path = kiln_worker::assets::resolve(name, &mut |m| eprintln!("test: {m}"))
            .unwrap_or_else(|e| panic!("cannot fetch model {name}: {e}"));
        Arc::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display())))
    }))
}

pub fn compute() -> Arc<Compute> {
    static COMPUTE: OnceLock<Arc<Compute>> = OnceLock::new();
    Arc::clone(COMPUTE.get_or_init(|| Arc::new(Compute::new(2))))
}

pub fn session(name: &str, context_len: usize) -> Session {
    Session::new(model(name), compute(), context_len).unwrap()
}

pub fn golden(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/goldens/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array of token ids").iter().map(|x| x.as_u64().expect("a token id") as u32).collect()
}

/// A tiny Hugging Face checkpoint from worker/tests/fixtures/hf (made by
/// scripts/goldens/make_hf_fixtures.py).
pub fn hf_fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// transformers' outputs for a fixture: prompt, ids, logits, greedy continuation.
pub fn hf_reference(name: &str) -> serde_json::Value {
    let path = hf_fixture(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// A fresh copy of a fixture directory under the temp dir, to damage or edit.
pub fn copy_hf_fixture(name: &str, tag: &str) -> std::path::PathBuf {
    let to = std::env::temp_dir().join(format!("kiln-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(hf_fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}
