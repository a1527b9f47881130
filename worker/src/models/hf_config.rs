//! Model hyper-parameters from a Hugging Face `config.json`, for the architectures kiln
//! builds from the shared layers. Each error names the field.

use super::config::{ModelConfig, MoeConfig, MoeNaming};
use crate::error::{Error, Result};
use crate::layers::rope::RopeStyle;
use kiln_kernels::attention::KvPrecision;
use serde_json::Value;

/// `architectures` entries kiln reads, and the model code that runs them.
const HF_ARCHITECTURES: &[(&str, &str)] = &[
    ("Gemma3ForConditionalGeneration", "gemma3"),
    ("Qwen2_5_VLForConditionalGeneration", "llama"),
    ("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "llama"), ("Qwen2ForCausalLM", "llama"), ("Qwen3ForCausalLM", "llama"), ("Phi3ForCausalLM", "llama"), ("MixtralForCausalLM", "llama"),
    ("Qwen3MoeForCausalLM", "llama"),
    ("Gemma2ForCausalLM", "gemma3"),
    ("Gemma3ForCausalLM", "gemma3"),
];

pub fn supported() -> String {
    HF_ARCHITECTURES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
}

fn field_err(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata { key: format!("config.json: {key}"), what: what.into() }
}

fn uint(v: &Value, key: &str) -> Result<Option<usize>> {
    match &v[key] {
        Value::Null => Ok(None),
        x => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| field_err(key, format!("{x} is not a non-negative integer"))),
    }
}

fn required(v: &Value, key: &str, limit: usize) -> Result<usize> {
    let n = uint(v, key)?.ok_or_else(|| field_err(key, "is missing"))?;
    if n == 0 || n > limit {
        return Err(field_err(key, format!("{n} is out of range (1 to {limit})")));
    }
    Ok(n)
}

fn float(v: &Value, key: &str) -> Result<Option<f32>> {
    match &v[key] {
        Value::Null => Ok(None),
        x => x.as_f64().map(|f| Some(f as f32)).ok_or_else(|| field_err(key, format!("{x} is not a number"))),
    }
}

/// A vision-language checkpoint: its language model's config (as a text-only checkpoint of
/// that architecture would have it) beside the vision parts in the full config.
pub struct Multimodal {
    pub text: Value,
}

/// The language model inside a vision-language `config.json`, or None for a text model.
pub fn multimodal(v: &Value) -> Result<Option<Multimodal>> {
    let text_arch = match v["architectures"][0].as_str() {
        Some("Gemma3ForConditionalGeneration") => "Gemma3ForCausalLM",
        Some("Qwen2_5_VLForConditionalGeneration") => "Qwen2ForCausalLM",
        _ => return Ok(None),
    };
    let mut text = v["text_config"].clone();
    let Some(fields) = text.as_object_mut() else {
        return Err(field_err("text_config", "is missing"));
    };
    fields.insert("architectures".into(), Value::from(vec![text_arch]));
    for key in ["torch_dtype", "dtype"] {
        if !v[key].is_null() && !fields.contains_key(key) {
            fields.insert(key.into(), v[key].clone());
        }
    }
    Ok(Some(Multimodal { text }))
}

/// `rope_theta` at the top level, in `rope_parameters`, or in its part for `layer_type`.
fn rope_theta(v: &Value, layer_type: &str) -> Result<Option<f32>> {
    if let Some(t) = float(v, "rope_theta")? {
        return Ok(Some(t));
    }
    match float(&v["rope_parameters"], "rope_theta")? {
        Some(t) => Ok(Some(t)),
        None => float(&v["rope_parameters"][layer_type], "rope_theta"),
    }
}

/// The architecture `config.json` names, as kiln's model code for it.
pub fn architecture(v: &Value) -> Result<&'static str> {
    let names: Vec<&str> = v["architectures"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let first = names.first().ok_or_else(|| field_err("architectures", "is missing or empty"))?;
    HF_ARCHITECTURES
        .iter()
        .find(|(a, _)| a == first)
        .map(|(_, code)| *code)
        .ok_or_else(|| Error::UnsupportedArchitecture { found: first.to_string(), supported: supported() })
}

fn moe(v: &Value) -> Result<Option<MoeConfig>> {
    let (naming, experts_key, size_key, renormalize) = match v["architectures"][0].as_str() {
        Some("MixtralForCausalLM") => (MoeNaming::Mixtral, "num_local_experts", "intermediate_size", true),
        Some("Qwen3MoeForCausalLM") => {
            if v["mlp_only_layers"].as_array().is_some_and(|l| !l.is_empty()) || uint(v, "decoder_sparse_step")?.is_some_and(|s| s != 1) {
                return Err(field_err("mlp_only_layers", "dense layers between sparse ones are not supported yet"));
            }
            (MoeNaming::Qwen, "num_experts", "moe_intermediate_size", v["norm_topk_prob"].as_bool().unwrap_or(false))
        }
        _ => return Ok(None),
    };
    let num_experts = required(v, experts_key, 1 << 12)?;
    let top_k = required(v, "num_experts_per_tok", num_experts)?;
    Ok(Some(MoeConfig { num_experts, top_k, expert_size: required(v, size_key, 1 << 20)?, renormalize, naming }))
}

pub fn from_hf(v: &Value, name: &str) -> Result<ModelConfig> {
    let arch = architecture(v)?;
    let hidden_size = required(v, "hidden_size", 1 << 16)?;
    let num_layers = required(v, "num_hidden_layers", 1 << 10)?;
    let num_heads = required(v, "num_attention_heads", 1 << 10)?;
    let num_kv_heads = uint(v, "num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(field_err("num_key_value_heads", format!("{num_kv_heads} does not divide the {num_heads} attention heads")));
    }
    let head_dim = uint(v, "head_dim")?.unwrap_or(hidden_size / num_heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(field_err("head_dim", format!("{head_dim} must be even and positive")));
    }
    let hf_arch = v["architectures"][0].as_str().unwrap_or("");
    let gemma = arch == "gemma3";
    let activation = v["hidden_activation"].as_str().or(v["hidden_act"].as_str());
    match (gemma, activation) {
        (false, Some("silu") | None) | (true, Some("gelu_pytorch_tanh") | None) => {}
        (_, Some(other)) => return Err(field_err("hidden_act", format!("`{other}` is not supported for {hf_arch}"))),
    }
    // RoPE settings: `rope_scaling` and `rope_theta` (older files), or `rope_parameters`,
    // whole or per layer type (`full_attention`, `sliding_attention`).
    // Qwen2-VL's multimodal sections ride along in either (older files say type `mrope`).
    let params = &v["rope_parameters"];
    let scalings = [("rope_scaling", &v["rope_scaling"]), ("rope_parameters", params), ("rope_parameters.full_attention", &params["full_attention"]), ("rope_parameters.sliding_attention", &params["sliding_attention"])];
    let mut mrope_sections = None;
    for (key, s) in scalings {
        if s.is_object() {
            let kind = s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or("default");
            if kind != "default" && kind != "mrope" {
                return Err(field_err(key, format!("RoPE scaling `{kind}` is not supported yet")));
            }
            if let Some(sections) = s["mrope_section"].as_array() {
                let n: Vec<usize> = sections.iter().filter_map(Value::as_u64).map(|n| n as usize).collect();
                match n[..] {
                    [t, h, w] if sections.len() == 3 => mrope_sections = Some([t, h, w]),
                    _ => return Err(field_err(&format!("{key}.mrope_section"), "expected three counts of frequencies")),
                }
            }
        }
    }
    if v["mlp_bias"].as_bool() == Some(true) {
        return Err(field_err("mlp_bias", format!("MLP biases are not supported for {arch}")));
    }
    let rotary_factor = float(v, "partial_rotary_factor")?.unwrap_or(1.0);
    let rope_dims = ((head_dim as f32 * rotary_factor) as usize) & !1;
    if let Some(sections) = mrope_sections.filter(|s| s.iter().sum::<usize>() != rope_dims / 2) {
        return Err(field_err("rope_parameters.mrope_section", format!("{sections:?} does not add up to the {} rotary frequencies", rope_dims / 2)));
    }
    if rope_dims == 0 || rope_dims > head_dim {
        return Err(field_err("partial_rotary_factor", format!("{rotary_factor} gives {rope_dims} rotated dimensions of {head_dim}")));
    }
    let sliding_window = uint(v, "sliding_window")?.filter(|&w| w > 0 && v["use_sliding_window"].as_bool() != Some(false));
    let is_sliding: Vec<bool> = match (hf_arch, sliding_window) {
        (_, None) => vec![false; num_layers],
        // Gemma 2: even layers local; Gemma 3: all but every `sliding_window_pattern`-th.
        ("Gemma2ForCausalLM", _) => (0..num_layers).map(|i| i % 2 == 0).collect(),
        ("Gemma3ForCausalLM", _) => match v["layer_types"].as_array() {
            Some(types) if types.len() == num_layers => types.iter().map(|t| t == "sliding_attention").collect(),
            _ => {
                let n = uint(v, "sliding_window_pattern")?.unwrap_or(6).max(1);
                (0..num_layers).map(|i| (i + 1) % n != 0).collect()
            }
        },
        _ => vec![true; num_layers],
    };
    Ok(ModelConfig {
        architecture: arch.to_string(),
        name: name.to_string(),
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: required(v, "intermediate_size", 1 << 20)?,
        vocab_size: required(v, "vocab_size", 1 << 24)?,
        max_context_len: required(v, "max_position_embeddings", 1 << 24)?,
        rms_eps: float(v, "rms_norm_eps")?.ok_or_else(|| field_err("rms_norm_eps", "is missing"))?,
        rope_base: rope_theta(v, "full_attention")?.unwrap_or(10_000.0),
        rope_dims,
        // Checkpoints keep each head's rotated halves apart (transformers' rotate_half).
        rope_style: RopeStyle::SplitHalf,
        sliding_window,
        is_sliding,
        rope_base_local: if hf_arch == "Gemma3ForCausalLM" {
            Some(match float(v, "rope_local_base_freq")? {
                Some(f) => f,
                None => float(&v["rope_parameters"]["sliding_attention"], "rope_theta")?.unwrap_or(10_000.0),
            })
        } else {
            None
        },
        final_logit_softcap: float(v, "final_logit_softcapping")?.filter(|&c| c > 0.0),
        attn_softcap: float(v, "attn_logit_softcapping")?.filter(|&c| c > 0.0),
        query_scale: float(v, "query_pre_attn_scalar")?.map(|s| 1.0 / s.sqrt()),
        norm_offset: if gemma { 1.0 } else { 0.0 },
        qk_norm: matches!(hf_arch, "Qwen3ForCausalLM" | "Qwen3MoeForCausalLM" | "Gemma3ForCausalLM"),
        qkv_bias: v["architectures"][0] == "Qwen2ForCausalLM" || v["attention_bias"].as_bool() == Some(true),
        fused_projections: v["architectures"][0] == "Phi3ForCausalLM",
        moe: moe(v)?,
        mrope_sections,
        kv_precision: match v["torch_dtype"].as_str().or(v["dtype"].as_str()) {
            Some("float16") | Some("bfloat16") => KvPrecision::Half,
            _ => KvPrecision::Full,
        },
    })
}
