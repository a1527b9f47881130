//! A tiny Llama-architecture model built in memory: byte-level vocabulary, seeded random
//! weights. Fast enough to check engine invariants without any model file.

use kiln_kernels::DType;
use kiln_worker::formats::gguf::GgufFile;
use kiln_worker::formats::gguf_value::{Array, Value};
use kiln_worker::formats::gguf_write::GgufWriter;
use kiln_worker::loader::LoadedModel;
use std::sync::Arc;

pub const HIDDEN: usize = 64;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const FF: usize = 128;
/// 256 byte tokens, then "<|im_start|>", "<|im_end|>".
pub const VOCAB: usize = 258;

fn random_f32(n: usize, seed: &mut u64, scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let v = ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The writer for the tiny model, so tests can change it before building.
pub fn writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    let s = |x: &str| Value::String(x.to_string());
    w.set("general.architecture", s("llama"))
        .set("general.name", s("tiny"))
        .set("llama.block_count", Value::U32(LAYERS as u32))
        .set("llama.context_length", Value::U32(2048))
        .set("llama.embedding_length", Value::U32(HIDDEN as u32))
        .set("llama.feed_forward_length", Value::U32(FF as u32))
        .set("llama.attention.head_count", Value::U32(HEADS as u32))
        .set("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .set("llama.rope.freq_base", Value::F32(10000.0));
    let table: Vec<String> = (0..=255u8).map(byte_char).collect();
    let mut tokens = table;
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut types = vec![1i32; 256];
    types.extend([3, 3]);
    w.set("tokenizer.ggml.model", s("gpt2"))
        .set("tokenizer.ggml.pre", s("gpt2"))
        .set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)))
        .set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .set("tokenizer.ggml.merges", Value::Array(Array::String(vec![])))
        .set("tokenizer.ggml.eos_token_id", Value::U32(257))
        .set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    let mut seed = 0x1234_5678_9abc_def0u64;
    let hd = HIDDEN / HEADS;
    let mut mat = |w: &mut GgufWriter, name: String, rows: usize, cols: usize, scale: f32| {
        w.tensor(&name, &[cols as u64, rows as u64], DType::F32, random_f32(rows * cols, &mut seed, scale));
    };
    mat(&mut w, "token_embd.weight".into(), VOCAB, HIDDEN, 1.0);
    for i in 0..LAYERS {
        mat(&mut w, format!("blk.{i}.attn_q.weight"), HEADS * hd, HIDDEN, 0.3);
        mat(&mut w, format!("blk.{i}.attn_k.weight"), KV_HEADS * hd, HIDDEN, 0.3);
        mat(&mut w, format!("blk.{i}.attn_v.weight"), KV_HEADS * hd, HIDDEN, 0.3);
        mat(&mut w, format!("blk.{i}.attn_output.weight"), HIDDEN, HEADS * hd, 0.3);
        mat(&mut w, format!("blk.{i}.ffn_gate.weight"), FF, HIDDEN, 0.3);
        mat(&mut w, format!("blk.{i}.ffn_up.weight"), FF, HIDDEN, 0.3);
        mat(&mut w, format!("blk.{i}.ffn_down.weight"), HIDDEN, FF, 0.3);
        let ones: Vec<u8> = (0..HIDDEN).flat_map(|_| 1.0f32.to_le_bytes()).collect();
        w.tensor(&format!("blk.{i}.attn_norm.weight"), &[HIDDEN as u64], DType::F32, ones.clone());
        w.tensor(&format!("blk.{i}.ffn_norm.weight"), &[HIDDEN as u64], DType::F32, ones);
    }
    let ones: Vec<u8> = (0..HIDDEN).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    w.tensor("output_norm.weight", &[HIDDEN as u64], DType::F32, ones);
    w
}

/// GPT-2's printable stand-in for a byte.
fn byte_char(b: u8) -> String {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        return (b as char).to_string();
    }
    let offset = (0..b).filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)).count() as u32;
    char::from_u32(256 + offset).unwrap().to_string()
}

pub fn build(w: &GgufWriter) -> kiln_worker::Result<LoadedModel> {
    let gguf = GgufFile::from_bytes("tiny.gguf", &w.to_bytes())?;
    LoadedModel::from_gguf(Arc::new(gguf))
}

pub fn model() -> Arc<LoadedModel> {
    Arc::new(build(&writer()).expect("the tiny model builds"))
}
