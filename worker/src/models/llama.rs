//! Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen3 and other checkpoints of the
//! same shape). Follows transformers' modeling_llama: pre-norm attention and SwiGLU MLP
//! blocks; Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm of queries and keys before
//! RoPE, Phi-3 fuses q/k/v and gate/up into single matrices and may rotate part of each head.

use super::batch::Batch;
use super::config::{ModelConfig, MoeConfig, MoeNaming};
use super::scratch::Scratch;
use super::{Architecture, CausalLm, HeadShare, LmHead, OnBackend, Output};
use crate::backend::{kv_of, tap, tap_part, AttendInput, Backend, Device, Part};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::layers::attention::AttentionConfig;
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::moe::MoeMlp;
use crate::layers::rope::Rope;
use crate::layers::{Attention, Compute, Embedding, Linear, RmsNorm, WeightSource};

enum FeedForward<B: Backend> {
    Dense(B::Mlp),
    Experts(B::Moe),
}

struct DecoderLayer<B: Backend> {
    input_layernorm: B::Norm,
    self_attn: B::Attention,
    post_attention_layernorm: B::Norm,
    mlp: FeedForward<B>,
}

pub struct Llama<B: Backend> {
    embed_tokens: B::Embedding,
    layers: Vec<DecoderLayer<B>>,
    head: B::Head,
    rope: Rope,
}

pub fn load(cfg: &ModelConfig, w: &WeightSource, device: &Device) -> Result<Box<dyn CausalLm>> {
    crate::on_device!(device, b => load_on(b, cfg, w))
}

fn load_on<B: Backend>(b: B, cfg: &ModelConfig, w: &WeightSource) -> Result<Box<dyn CausalLm>> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let share = HeadShare::new(cfg, w, "model.layers.0.self_attn.o_proj.weight")?;
    let (q_range, kv_range) = (share.q_rows(), share.kv_rows());
    let rope = Rope { base: cfg.rope_base, rotary_dims: cfg.rope_dims, style: cfg.rope_style };
    let norm = |name: &str| -> Result<RmsNorm> { Ok(RmsNorm { weight: w.vector(name, h)?, eps: cfg.rms_eps }) };
    let head_norm = |name: String| -> Result<Option<RmsNorm>> {
        if !cfg.qk_norm {
            return Ok(None);
        }
        Ok(Some(RmsNorm { weight: w.vector(&name, hd)?, eps: cfg.rms_eps }))
    };
    let linear = |name: String, rows: usize, cols: usize| -> Result<Linear> { Ok(Linear { weight: w.linear(&name, rows, cols)?, bias: None }) };
    // Qwen2 adds biases to the q/k/v projections. `range`: this rank's rows.
    let biased = |name: String, rows: usize, range: std::ops::Range<usize>| -> Result<Linear> {
        let mut l = Linear { weight: w.linear_rows(&format!("{name}.weight"), rows, h, range.clone())?, bias: None };
        if cfg.qkv_bias {
            l.bias = Some(w.vector_range(&format!("{name}.bias"), rows, range)?);
        }
        Ok(l)
    };
    // Phi-3 keeps q, k and v in one matrix, and gate and up in another: each part is rows
    // `range` of its block of `rows` (this rank's share of it).
    let split = |name: String, parts: &[(usize, std::ops::Range<usize>)]| -> Result<Vec<Linear>> {
        let total = parts.iter().map(|p| p.0).sum();
        let mut start = 0;
        let mut out = Vec::with_capacity(parts.len());
        for (rows, range) in parts {
            let weight = w.linear_rows(&name, total, h, start + range.start..start + range.end)?;
            out.push(Linear { weight, bias: None });
            start += rows;
        }
        Ok(out)
    };
    let (q_rows, kv_rows) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let (q_proj, k_proj, v_proj) = if cfg.fused_projections {
            let parts = [(q_rows, q_range.clone()), (kv_rows, kv_range.clone()), (kv_rows, kv_range.clone())];
            let mut qkv = split(format!("{p}.self_attn.qkv_proj.weight"), &parts)?.into_iter();
            let mut next = || qkv.next().ok_or_else(|| crate::error::Error::Tensor { name: format!("{p}.self_attn.qkv_proj.weight"), what: "split failed".into() });
            (next()?, next()?, next()?)
        } else {
            (
                biased(format!("{p}.self_attn.q_proj"), q_rows, q_range.clone())?,
                biased(format!("{p}.self_attn.k_proj"), kv_rows, kv_range.clone())?,
                biased(format!("{p}.self_attn.v_proj"), kv_rows, kv_range.clone())?,
            )
        };
        let mlp = match &cfg.moe {
            Some(m) => FeedForward::Experts(b.upload_moe(load_moe(m, &p, h, w, &linear)?)?),
            None if cfg.fused_projections => {
                let inter = cfg.intermediate_size;
                let down = format!("{p}.mlp.down_proj.weight");
                let range = w.inner_split(&down, h, inter)?;
                let mut gu = split(format!("{p}.mlp.gate_up_proj.weight"), &[(inter, range.clone()), (inter, range.clone())])?.into_iter();
                let (Some(gate_proj), Some(up_proj)) = (gu.next(), gu.next()) else {
                    return Err(crate::error::Error::Tensor { name: format!("{p}.mlp.gate_up_proj.weight"), what: "split failed".into() });
                };
                let down_proj = Linear { weight: w.out_projection(&down, h, inter, range)?, bias: None };
                FeedForward::Dense(b.upload_mlp(GatedMlp { gate_proj, up_proj, down_proj, activation: Activation::Silu, combine: w.combine() })?)
            }
            None => {
                let names = ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{p}.mlp.{n}.weight"));
                FeedForward::Dense(b.upload_mlp(GatedMlp::load(w, names.each_ref().map(String::as_str), cfg.intermediate_size, h, Activation::Silu)?)?)
            }
        };
        layers.push(DecoderLayer {
            input_layernorm: b.upload_norm(norm(&format!("{p}.input_layernorm.weight"))?)?,
            self_attn: b.upload_attention(Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj: Linear { weight: w.out_projection(&format!("{p}.self_attn.o_proj.weight"), h, q_rows, q_range.clone())?, bias: None },
                q_norm: head_norm(format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: head_norm(format!("{p}.self_attn.k_norm.weight"))?,
                cfg: AttentionConfig {
                    num_heads: share.heads.q.len(),
                    num_kv_heads: share.heads.kv.len(),
                    head_dim: hd,
                    score_scale: 1.0 / (hd as f32).sqrt(),
                    query_scale: None,
                    sliding_window: cfg.sliding_window.filter(|_| cfg.is_sliding[i]),
                    softcap: None,
                    rope,
                },
                combine: w.combine(),
            })?,
            post_attention_layernorm: b.upload_norm(norm(&format!("{p}.post_attention_layernorm.weight"))?)?,
            mlp,
        });
    }
    let embed_tokens = b.upload_embedding(Embedding::load(w, "model.embed_tokens.weight", cfg.vocab_size, h, None)?)?;
    let head = b.upload_head(LmHead::load(w, cfg)?)?;
    Ok(Box::new(OnBackend { backend: b, cfg: share.local_config(cfg), model: Llama { embed_tokens, layers, head, rope } }))
}

/// A mixture-of-experts block of layer prefix `p`: the router and this rank's experts (all of
/// them unless the model is split; whole experts otherwise, their outputs summed over ranks).
fn load_moe(m: &MoeConfig, p: &str, h: usize, w: &WeightSource, linear: &dyn Fn(String, usize, usize) -> Result<Linear>) -> Result<MoeMlp> {
    let (rank, size) = w.tp();
    if size > m.num_experts {
        return Err(crate::error::Error::Sharding { size, what: format!("{p} has {} experts, fewer than the ranks", m.num_experts) });
    }
    let mine = crate::parallel::split_even(m.num_experts, rank, size);
    let (router, expert) = match m.naming {
        MoeNaming::Mixtral => (format!("{p}.block_sparse_moe.gate.weight"), format!("{p}.block_sparse_moe.experts")),
        MoeNaming::Qwen => (format!("{p}.mlp.gate.weight"), format!("{p}.mlp.experts")),
    };
    let gated = |gate: Linear, up: Linear, down: Linear| GatedMlp { gate_proj: gate, up_proj: up, down_proj: down, activation: Activation::Silu, combine: Default::default() };
    // GGUF files merge each layer's experts into one tensor per matrix.
    let experts = if !w.has(&format!("{expert}.0.{}", if m.naming == MoeNaming::Mixtral { "w1.weight" } else { "gate_proj.weight" }))
        && w.has(&format!("{p}.mlp.experts.gate_proj.weight"))
    {
        let merged = |part: &str, rows: usize, cols: usize| w.experts(&format!("{p}.mlp.experts.{part}.weight"), m.num_experts, rows, cols);
        let (gates, ups, downs) = (merged("gate_proj", m.expert_size, h)?, merged("up_proj", m.expert_size, h)?, merged("down_proj", h, m.expert_size)?);
        let linear = |weight| Linear { weight, bias: None };
        gates.into_iter().zip(ups).zip(downs).skip(mine.start).take(mine.len()).map(|((g, u), d)| gated(linear(g), linear(u), linear(d))).collect()
    } else {
        // Other ranks' experts are theirs, not tensors this architecture failed to use.
        for e in (0..m.num_experts).filter(|e| !mine.contains(e)) {
            let names = match m.naming {
                MoeNaming::Mixtral => ["w1", "w3", "w2"],
                MoeNaming::Qwen => ["gate_proj", "up_proj", "down_proj"],
            };
            names.iter().for_each(|n| w.mark_used(&format!("{expert}.{e}.{n}.weight")));
        }
        mine.clone()
            .map(|e| {
                let [gate, up, down] = match m.naming {
                    MoeNaming::Mixtral => ["w1", "w3", "w2"].map(|n| format!("{expert}.{e}.{n}.weight")),
                    MoeNaming::Qwen => ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{expert}.{e}.{n}.weight")),
                };
                Ok(gated(linear(gate, m.expert_size, h)?, linear(up, m.expert_size, h)?, linear(down, h, m.expert_size)?))
            })
            .collect::<Result<Vec<_>>>()?
    };
    // The router stays at the checkpoint's precision: it picks experts, and is small.
    let router = Linear { weight: w.matrix(&router, m.num_experts, h)?, bias: None };
    Ok(MoeMlp { router, experts, first_expert: mine.start, combine: w.combine(), top_k: m.top_k, renormalize: m.renormalize })
}

impl<B: Backend> Architecture<B> for Llama<B> {
    fn run(&self, b: &B, cfg: &ModelConfig, compute: &Compute, batch: &Batch, kv: &mut KvCache, s: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        let rows = batch.num_rows();
        let f = b.flow(s, rows, cfg.hidden_size)?;
        b.embed(compute, &self.embed_tokens, batch, f.x)?;
        f.rope.resize_with(1, Default::default);
        f.rope_tables.resize_with(1, Default::default);
        match &cfg.mrope_sections {
            Some(sections) => f.rope[0].fill_sections(&self.rope, &batch.rope3_positions(), sections),
            None => f.rope[0].fill(&self.rope, &batch.positions),
        }
        b.rope_table(&f.rope[0], &mut f.rope_tables[0])?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (group, kv_layer) = kv.layer(i);
            b.rms_norm(compute, &layer.input_layernorm, f.x, f.xn)?;
            tap(b, f.tap, || format!("attn_norm-{i}"), f.xn);
            let input = AttendInput { x: f.xn, batch, rope: &f.rope[0], rope_table: &f.rope_tables[0], group };
            b.attend(compute, &layer.self_attn, &input, kv_of(kv_layer, b)?, f.work, f.y)?;
            tap_part(b, f.tap, || format!("Qcur-{i}"), f.work, Part::Query);
            tap_part(b, f.tap, || format!("kqv_out-{i}"), f.work, Part::AttnOut);
            tap(b, f.tap, || format!("attn_out-{i}"), f.y);
            b.add(f.x, f.y)?;
            b.rms_norm(compute, &layer.post_attention_layernorm, f.x, f.xn)?;
            match &layer.mlp {
                FeedForward::Dense(mlp) => b.mlp(compute, mlp, f.xn, rows, f.work, f.y)?,
                FeedForward::Experts(moe) => b.moe(compute, moe, f.xn, rows, f.work, f.y)?,
            }
            tap(b, f.tap, || format!("ffn_out-{i}"), f.y);
            b.add(f.x, f.y)?;
            tap(b, f.tap, || format!("l_out-{i}"), f.x);
        }
        b.head(compute, &self.head, batch, f.x, f.work, output, out)
    }
}
