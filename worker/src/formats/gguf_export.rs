//! Writes a Hugging Face checkpoint as a GGUF file with its projection weights quantized
//! (`kiln-worker quantize`): llama.cpp's tensor names and metadata keys, the tokenizer as
//! `tokenizer.ggml.*`, and, for the `llama` architecture, q/k rows reordered for its
//! interleaved RoPE, and for Gemma the norms' `1 +` folded in. The quantized bytes are
//! those load-time quantization produces, so the file runs as the model does with `--isq`.

use super::gguf_value::{Array, Value};
use super::gguf_write::GgufWriter;
use super::names::gguf_name;
use crate::error::{Error, Result};
use crate::layers::weights::{IsqReport, MatrixRef};
use crate::layers::WeightSource;
use crate::models::config::{ModelConfig, MoeNaming};
use kiln_kernels::DType;
use super::hf_tokenizer::GgufVocab;
use kiln_shared::tokenizer::{PreTokenizer, TokenKind, Tokenizer, TokenizerModel};
use std::path::Path;
use std::sync::Arc;

/// Hugging Face architectures kiln writes, and the GGUF architecture they become.
const EXPORTS: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "llama"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
    ("Phi3ForCausalLM", "phi3"),
    ("Gemma2ForCausalLM", "gemma2"),
    ("Gemma3ForCausalLM", "gemma3"),
    ("MixtralForCausalLM", "llama"),
    ("Qwen3MoeForCausalLM", "qwen3moe"),
];

pub struct Exported {
    pub architecture: String,
    pub tensors: usize,
    pub bytes: usize,
    pub isq: IsqReport,
}

fn invalid(what: impl Into<String>) -> Error {
    Error::InvalidRequest(what.into())
}

fn is_projection(name: &str) -> bool {
    ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"].iter().any(|p| name.ends_with(&format!(".{p}.weight")))
}

/// Rows of each `head_dim` block reordered from split halves to interleaved pairs.
fn interleave_heads(m: &MatrixRef, head_dim: usize) -> Result<Vec<u8>> {
    let row = m.dtype.row_bytes(m.cols).ok_or_else(|| invalid("row too long"))?;
    let bytes = m.bytes();
    let mut out = Vec::with_capacity(bytes.len());
    for head in 0..m.rows / head_dim {
        for j in 0..head_dim / 2 {
            for half in 0..2 {
                let r = head * head_dim + half * head_dim / 2 + j;
                out.extend_from_slice(&bytes[r * row..(r + 1) * row]);
            }
        }
    }
    Ok(out)
}

fn pre_name(p: PreTokenizer) -> &'static str {
    match p {
        PreTokenizer::Gpt2 => "gpt-2",
        PreTokenizer::DigitsThenGpt2 => "smollm",
        PreTokenizer::Llama3 => "llama-bpe",
        PreTokenizer::Qwen2 => "qwen2",
    }
}

fn kind_id(k: TokenKind) -> i32 {
    match k {
        TokenKind::Normal => 1,
        TokenKind::Unknown => 2,
        TokenKind::Control => 3,
        TokenKind::UserDefined => 4,
        TokenKind::Unused => 5,
        TokenKind::Byte => 6,
        TokenKind::Undefined => 0,
    }
}

fn metadata(w: &mut GgufWriter, arch: &str, cfg: &ModelConfig, tokenizer: &Tokenizer, vocab: &GgufVocab, template: Option<&str>, isq: DType) -> Result<()> {
    let u32v = |v: usize| Value::U32(v as u32);
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String(cfg.name.clone()));
    w.set("general.quantization_version", Value::U32(2));
    w.set("general.quantized_by", Value::String(format!("kiln {} ({})", env!("CARGO_PKG_VERSION"), isq.name())));
    let key = |k: &str| format!("{arch}.{k}");
    w.set(&key("context_length"), u32v(cfg.max_context_len));
    w.set(&key("embedding_length"), u32v(cfg.hidden_size));
    w.set(&key("block_count"), u32v(cfg.num_layers));
    w.set(&key("feed_forward_length"), u32v(cfg.intermediate_size));
    w.set(&key("attention.head_count"), u32v(cfg.num_heads));
    w.set(&key("attention.head_count_kv"), u32v(cfg.num_kv_heads));
    w.set(&key("attention.key_length"), u32v(cfg.head_dim));
    w.set(&key("attention.value_length"), u32v(cfg.head_dim));
    w.set(&key("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_eps));
    w.set(&key("rope.freq_base"), Value::F32(cfg.rope_base));
    w.set(&key("rope.dimension_count"), u32v(cfg.rope_dims));
    w.set(&key("vocab_size"), u32v(cfg.vocab_size));
    if let Some(window) = cfg.sliding_window {
        w.set(&key("attention.sliding_window"), u32v(window));
    }
    if let Some(c) = cfg.attn_softcap {
        w.set(&key("attn_logit_softcapping"), Value::F32(c));
    }
    if let Some(c) = cfg.final_logit_softcap {
        w.set(&key("final_logit_softcapping"), Value::F32(c));
    }
    if let Some(m) = &cfg.moe {
        w.set(&key("expert_count"), u32v(m.num_experts));
        w.set(&key("expert_used_count"), u32v(m.top_k));
        w.set(&key("expert_feed_forward_length"), u32v(m.expert_size));
    }
    if let Some(base) = cfg.rope_base_local {
        w.set(&key("rope.freq_base_swa"), Value::F32(base));
    }
    if arch == "gemma3" {
        // Layers are local except every n-th; n is the distance between global layers.
        let n = cfg.is_sliding.iter().position(|s| !s).map_or(cfg.num_layers, |i| i + 1);
        w.set(&key("attention.sliding_window_pattern"), u32v(n));
    }
    let spec = tokenizer.spec();
    match vocab {
        GgufVocab::Gpt2 { pre, merges } => {
            w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
            w.set("tokenizer.ggml.pre", Value::String(pre_name(*pre).into()));
            w.set("tokenizer.ggml.merges", Value::Array(Array::String(merges.clone())));
        }
        GgufVocab::Llama { scores, add_space_prefix } => {
            w.set("tokenizer.ggml.model", Value::String("llama".into()));
            w.set("tokenizer.ggml.pre", Value::String("default".into()));
            w.set("tokenizer.ggml.scores", Value::Array(Array::F32(scores.clone())));
            w.set("tokenizer.ggml.add_space_prefix", Value::Bool(*add_space_prefix));
        }
    }
    w.set("tokenizer.ggml.tokens", Value::Array(Array::String(spec.tokens.clone())));
    w.set("tokenizer.ggml.token_type", Value::Array(Array::I32(spec.kinds.iter().map(|&k| kind_id(k)).collect())));
    if let Some(u) = spec.kinds.iter().position(|&k| k == TokenKind::Unknown) {
        w.set("tokenizer.ggml.unknown_token_id", Value::U32(u as u32));
    }
    if let Some(b) = spec.bos_id {
        w.set("tokenizer.ggml.bos_token_id", Value::U32(b));
    }
    if let Some(e) = spec.eos_id {
        w.set("tokenizer.ggml.eos_token_id", Value::U32(e));
    }
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(spec.add_bos));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(spec.add_eos));
    if let Some(t) = template {
        w.set("tokenizer.chat_template", Value::String(t.into()));
    }
    Ok(())
}

/// Writes the checkpoint in `dir` to `out` with projection weights quantized to `isq`.
pub fn export(dir: &Path, isq: DType, out: &Path) -> Result<Exported> {
    let config = super::hf_tokenizer::read_json(&dir.join("config.json"))?;
    let hf_arch = config["architectures"][0].as_str().unwrap_or("").to_string();
    let arch = EXPORTS.iter().find(|(a, _)| *a == hf_arch).map(|(_, g)| *g).ok_or_else(|| {
        invalid(format!("writing `{hf_arch}` to GGUF is not supported yet (supported: {})", EXPORTS.iter().map(|e| e.0).collect::<Vec<_>>().join(", ")))
    })?;
    let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let cfg = crate::models::hf_config::from_hf(&config, &name)?;
    if cfg.sliding_window.is_some() && arch == "llama" {
        return Err(invalid("sliding-window attention has no llama-architecture GGUF form; not written"));
    }
    let (tokenizer, template) = super::hf_tokenizer::load(dir)?;
    let TokenizerModel::HuggingFace { json } = &tokenizer.spec().model else {
        return Err(invalid("the checkpoint's tokenizer is not a tokenizer.json"));
    };
    let vocab = super::hf_tokenizer::gguf_vocab(json, &tokenizer)?;
    let checkpoint = Arc::new(super::safetensors::Checkpoint::open_dir(dir)?);
    if cfg.moe.as_ref().is_some_and(|m| !m.renormalize) {
        return Err(invalid("llama.cpp renormalizes the chosen experts' weights; this checkpoint does not (norm_topk_prob), so it is not written"));
    }
    if arch == "gemma2" && checkpoint.tensor("lm_head.weight").is_some() {
        return Err(invalid("llama.cpp's gemma2 reads the output head from the embeddings; this checkpoint has its own lm_head, so it is not written"));
    }
    let weights = WeightSource::from_checkpoint(Arc::clone(&checkpoint), &cfg.architecture).with_isq(Some(isq));
    let mut w = GgufWriter::new();
    metadata(&mut w, arch, &cfg, &tokenizer, &vocab, template.as_deref(), isq)?;
    // Experts are written merged, one tensor per matrix and layer.
    let mut names: Vec<&str> = checkpoint.names().filter(|n| !n.contains(".experts.")).collect();
    names.sort();
    let mut bytes = 0;
    if let Some(m) = &cfg.moe {
        for layer in 0..cfg.num_layers {
            let p = format!("model.layers.{layer}");
            let parts = match m.naming {
                MoeNaming::Mixtral => [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")].map(|(g, h)| (g, format!("{p}.block_sparse_moe.experts"), h)),
                MoeNaming::Qwen => [("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")].map(|(g, h)| (g, format!("{p}.mlp.experts"), h)),
            };
            for (merged, prefix, part) in parts {
                let (rows, cols) = if merged == "down_proj" { (cfg.hidden_size, m.expert_size) } else { (m.expert_size, cfg.hidden_size) };
                let mut data = Vec::new();
                let mut dtype = DType::F32;
                for e in 0..m.num_experts {
                    let x = weights.linear(&format!("{prefix}.{e}.{part}.weight"), rows, cols)?;
                    dtype = x.dtype;
                    data.extend_from_slice(x.bytes());
                }
                let gguf = gguf_name(arch, &format!("{p}.mlp.experts.{merged}.weight")).ok_or_else(|| invalid("no GGUF name for experts"))?;
                bytes += data.len();
                w.tensor(&gguf, &[cols as u64, rows as u64, m.num_experts as u64], dtype, data);
            }
        }
    }
    for hf in &names {
        let gguf = gguf_name(arch, hf).ok_or_else(|| invalid(format!("tensor `{hf}` has no GGUF name for {arch}")))?;
        let (info, _) = checkpoint.tensor(hf).ok_or_else(|| invalid(format!("tensor `{hf}` vanished")))?;
        let (dims, dtype, data) = match info.dims.as_slice() {
            [len] => {
                let mut v = weights.vector(hf, *len as usize)?;
                // GGUF Gemma norms hold 1 + w.
                if hf.ends_with("norm.weight") {
                    v = crate::models::offset(v, cfg.norm_offset);
                }
                (vec![*len], DType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
            }
            [cols, rows] => {
                let (cols, rows) = (*cols as usize, *rows as usize);
                let m = if is_projection(hf) { weights.linear(hf, rows, cols)? } else { weights.matrix(hf, rows, cols)? };
                let interleave = arch == "llama" && (hf.ends_with(".q_proj.weight") || hf.ends_with(".k_proj.weight"));
                let data = if interleave { interleave_heads(&m, cfg.head_dim)? } else { m.bytes().to_vec() };
                (vec![cols as u64, rows as u64], m.dtype, data)
            }
            other => return Err(invalid(format!("tensor `{hf}` has {} dimensions", other.len()))),
        };
        bytes += data.len();
        w.tensor(&gguf, &dims, dtype, data);
    }
    let image = w.to_bytes();
    std::fs::write(out, &image).map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    let isq = weights.isq_report.borrow().clone();
    let experts = cfg.moe.as_ref().map_or(0, |_| 3 * cfg.num_layers);
    Ok(Exported { architecture: arch.to_string(), tensors: names.len() + experts, bytes, isq })
}
