//! Models that cannot be run give one specific error each, naming the key or tensor.

mod common;

use common::tiny;
use kiln_worker::formats::gguf_value::{Array, Value};

fn error_of(w: &kiln_worker::formats::gguf_write::GgufWriter) -> String {
    match tiny::build(w) {
        Ok(_) => panic!("model unexpectedly loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_model_loads_and_reports_no_unused_tensors() {
    let m = tiny::build(&tiny::writer()).unwrap();
    assert!(m.unused_tensors.is_empty(), "{:?}", m.unused_tensors);
    assert_eq!(m.model.config().num_layers, tiny::LAYERS);
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let mut w = tiny::writer();
    w.set("general.architecture", Value::String("mamba".into()));
    let e = error_of(&w);
    assert!(e.contains("`mamba`") && e.contains("llama") && e.contains("gemma3"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let mut w = tiny::writer();
    w.remove_tensor("blk.1.ffn_down.weight");
    let e = error_of(&w);
    assert!(e.contains("blk.1.ffn_down.weight") && e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("missing"), "{e}");
    let mut w = tiny::writer();
    w.tensor("blk.1.ffn_up.weight", &[1], kiln_kernels::DType::F32, vec![0; 4]);
    let e = error_of(&w);
    assert!(e.contains("blk.1.ffn_up.weight") && e.contains("shape [1]"), "{e}");
    let mut w = tiny::writer();
    w.tensor("unrelated", &[1], kiln_kernels::DType::F32, vec![0; 4]);
    let m = tiny::build(&w).unwrap();
    assert_eq!(m.unused_tensors, ["unrelated"]);
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let mut w = tiny::writer();
    w.tensor("blk.0.attn_q.weight", &[64, 32], kiln_kernels::DType::F32, vec![0; 64 * 32 * 4]);
    let e = error_of(&w);
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("[64, 32]") && e.contains("[64, 64]"), "{e}");
}

#[test]
fn missing_or_bad_hyperparameters_name_the_key() {
    let mut w = tiny::writer();
    w.remove("llama.embedding_length");
    assert!(error_of(&w).contains("llama.embedding_length"));
    let mut w = tiny::writer();
    w.set("llama.attention.head_count_kv", Value::U32(3));
    let e = error_of(&w);
    assert!(e.contains("head_count_kv"), "{e}");
    let mut w = tiny::writer();
    w.set("llama.block_count", Value::String("two".into()));
    let e = error_of(&w);
    assert!(e.contains("llama.block_count") && e.contains("string"), "{e}");
    let mut w = tiny::writer();
    w.set("llama.rope.scaling.type", Value::String("yarn".into()));
    assert!(error_of(&w).contains("yarn"));
}

#[test]
fn tokenizer_problems_are_specific() {
    let mut w = tiny::writer();
    w.set("tokenizer.ggml.model", Value::String("bert".into()));
    assert!(error_of(&w).contains("`bert`"));
    let mut w = tiny::writer();
    w.set("tokenizer.ggml.pre", Value::String("unheard-of".into()));
    assert!(error_of(&w).contains("unheard-of"));
    let mut w = tiny::writer();
    w.set("tokenizer.ggml.token_type", Value::Array(Array::I32(vec![1; 3])));
    assert!(error_of(&w).contains("token_type"));
    let mut w = tiny::writer();
    w.remove("tokenizer.ggml.tokens");
    assert!(error_of(&w).contains("tokenizer.ggml.tokens"));
    // A broken chat template does not stop the model: chat requests fail, naming it.
    let mut w = tiny::writer();
    w.set("tokenizer.chat_template", Value::String("{% if %}".into()));
    let m = tiny::build(&w).expect("the model loads without a usable chat template");
    let e = m.encode_chat(&[kiln_shared::chat::ChatMessage::new("user", "hi")]).unwrap_err().to_string();
    assert!(e.contains("chat template does not parse"), "{e}");
}
