//! Model hyper-parameters, read from GGUF metadata (`{arch}.*` keys) with the defaults
//! llama.cpp applies when a key is absent.

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::layers::rope::RopeStyle;

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: String,
    pub name: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub max_context_len: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_dims: usize,
    pub rope_style: RopeStyle,
    /// Sliding-window attention size, for the layers `is_sliding` marks.
    pub sliding_window: Option<usize>,
    pub is_sliding: Vec<bool>,
    /// RoPE base of sliding-window layers, where it differs from `rope_base`.
    pub rope_base_local: Option<f32>,
    pub final_logit_softcap: Option<f32>,
    /// How the KV cache holds keys and values: half precision with llama.cpp's roundings for
    /// GGUF files, f32 for checkpoints whose reference computes in f32.
    pub kv_precision: kiln_kernels::attention::KvPrecision,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    /// q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// Mixture-of-experts feed-forward blocks instead of dense ones.
    pub moe: Option<MoeConfig>,
    /// Added to RMSNorm weights as loaded: Gemma checkpoints store `w` for `x * (1 + w)`
    /// (GGUF files have the 1 folded in already).
    pub norm_offset: f32,
    /// Multiplies queries before q·k (Gemma's query_pre_attn_scalar^-1/2); None: 1/sqrt(head_dim) on the scores.
    pub query_scale: Option<f32>,
    /// Gemma 2's attention-score soft cap.
    pub attn_softcap: Option<f32>,
    /// Qwen2-VL's multimodal RoPE: how many rotary frequencies follow each of the temporal,
    /// height and width position components.
    pub mrope_sections: Option<[usize; 3]>,
}

#[derive(Clone, Debug)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Hidden size of each expert.
    pub expert_size: usize,
    pub renormalize: bool,
    pub naming: MoeNaming,
}

/// Where a checkpoint keeps its router and experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeNaming {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2`.
    Mixtral,
    /// `mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
    Qwen,
}

impl ModelConfig {
    pub fn from_gguf(gguf: &GgufFile, vocab_len: usize) -> Result<ModelConfig> {
        let arch = gguf.string("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let usize_key = |k: &str| -> Result<usize> { Ok(gguf.u64(&key(k))? as usize) };
        let hidden_size = usize_key("embedding_length")?;
        let num_layers = usize_key("block_count")?;
        let num_heads = usize_key("attention.head_count")?;
        let num_kv_heads = gguf.opt_u64(&key("attention.head_count_kv"))?.map_or(num_heads, |v| v as usize);
        let positive = |name: &str, v: usize, limit: usize| -> Result<()> {
            if v == 0 || v > limit {
                return Err(Error::Metadata { key: key(name), what: format!("{v} is out of range (1 to {limit})") });
            }
            Ok(())
        };
        positive("embedding_length", hidden_size, 1 << 16)?;
        positive("block_count", num_layers, 1 << 10)?;
        positive("attention.head_count", num_heads, 1 << 10)?;
        positive("attention.head_count_kv", num_kv_heads, num_heads)?;
        if num_heads % num_kv_heads != 0 {
            return Err(Error::Metadata {
                key: key("attention.head_count_kv"),
                what: format!("{num_kv_heads} does not divide the {num_heads} query heads"),
            });
        }
        let head_dim = gguf.opt_u64(&key("attention.key_length"))?.map_or(hidden_size / num_heads, |v| v as usize);
        positive("attention.key_length", head_dim, 1 << 12)?;
        if let Some(v) = gguf.opt_u64(&key("attention.value_length"))? {
            if v as usize != head_dim {
                return Err(Error::Metadata { key: key("attention.value_length"), what: format!("{v} differs from key_length {head_dim}; not supported") });
            }
        }
        let intermediate_size = usize_key("feed_forward_length")?;
        positive("feed_forward_length", intermediate_size, 1 << 20)?;
        let vocab_size = gguf.opt_u64(&key("vocab_size"))?.map_or(vocab_len, |v| v as usize);
        let max_context_len = usize_key("context_length")?;
        positive("context_length", max_context_len, 1 << 24)?;
        let rms_eps = gguf.f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_base = gguf.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_dims = gguf.opt_u64(&key("rope.dimension_count"))?.map_or(head_dim, |v| v as usize);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(Error::Metadata { key: key("rope.dimension_count"), what: format!("{rope_dims} must be even and at most head_dim {head_dim}") });
        }
        if let Some(kind) = gguf.opt_string(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(Error::Metadata { key: key("rope.scaling.type"), what: format!("RoPE scaling `{kind}` is not supported yet") });
            }
        }
        let sliding_window = gguf.opt_u64(&key("attention.sliding_window"))?.filter(|&w| w > 0).map(|w| w as usize);
        let pattern = gguf.opt_u64(&key("attention.sliding_window_pattern"))?;
        let is_sliding = match (sliding_window, arch.as_str()) {
            // Gemma 3: five local layers, then one global, unless the file says otherwise.
            (Some(_), "gemma3") => {
                let n = pattern.unwrap_or(6).max(1) as usize;
                (0..num_layers).map(|i| i % n < n - 1).collect()
            }
            // Gemma 2: even layers local.
            (Some(_), "gemma2") => (0..num_layers).map(|i| i % 2 == 0).collect(),
            (Some(_), _) => vec![true; num_layers],
            (None, _) => vec![false; num_layers],
        };
        let rope_base_local = match arch.as_str() {
            "gemma3" => Some(gguf.opt_f32(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0)),
            _ => None,
        };
        let rope_style = match arch.as_str() {
            // GGUF llama weights are permuted for interleaved pairs; Gemma keeps halves.
            "llama" => RopeStyle::Interleaved,
            _ => RopeStyle::SplitHalf,
        };
        let arch_is_gemma3 = arch == "gemma3";
        let arch_is_qwen3 = arch == "qwen3" || arch == "qwen3moe";
        let arch_is_qwen2 = arch == "qwen2";
        let arch_is_phi3 = arch == "phi3";
        // Mixture of experts (qwen3moe; llama files with experts are Mixtral): llama.cpp
        // renormalizes the chosen experts' weights for both.
        let moe = match gguf.opt_u64(&key("expert_count"))? {
            Some(n) if n > 0 => Some(MoeConfig {
                num_experts: n as usize,
                top_k: gguf.u64(&key("expert_used_count"))? as usize,
                expert_size: gguf.opt_u64(&key("expert_feed_forward_length"))?.map_or(intermediate_size, |v| v as usize),
                renormalize: gguf.opt_bool(&key("expert_weights_norm"))?.unwrap_or(true),
                naming: if arch == "qwen3moe" { MoeNaming::Qwen } else { MoeNaming::Mixtral },
            }),
            _ => None,
        };
        let attn_softcap = gguf.opt_f32(&key("attn_logit_softcapping"))?;
        Ok(ModelConfig {
            name: gguf.opt_string("general.name")?.unwrap_or(&arch).to_string(),
            final_logit_softcap: gguf.opt_f32(&key("final_logit_softcapping"))?.filter(|&c| c > 0.0),
            architecture: arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            vocab_size,
            max_context_len,
            rms_eps,
            rope_base,
            rope_dims,
            rope_style,
            sliding_window,
            is_sliding,
            rope_base_local,
            kv_precision: kiln_kernels::attention::KvPrecision::Half,
            qk_norm: arch_is_gemma3 || arch_is_qwen3,
            qkv_bias: arch_is_qwen2,
            fused_projections: arch_is_phi3,
            moe,
            mrope_sections: None,
            norm_offset: 0.0,
            query_scale: None,
            attn_softcap: attn_softcap.filter(|&c| c > 0.0),
        })
    }
}
