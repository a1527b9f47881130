//! Gemma 2 and Gemma 3 text decoders. Follows transformers' modeling_gemma2/3: embeddings
//! scaled by sqrt(hidden), RMSNorm before and after both attention and MLP, GeGLU, and
//! interleaved sliding-window and global layers; Gemma 3 adds per-head q/k RMSNorm and a
//! local RoPE base, Gemma 2 soft-caps attention scores and logits.

use super::batch::Batch;
use super::config::ModelConfig;
use super::scratch::{tap, Scratch};
use super::{CausalLm, HeadShare, LmHead, Output};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::layers::attention::{AttentionConfig, AttentionInput};
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::rope::Rope;
use crate::layers::{Attention, Compute, Embedding, Linear, RmsNorm, WeightSource};

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: GatedMlp,
    post_feedforward_layernorm: RmsNorm,
    /// Index into the model's RoPE tables: 0 global, 1 local.
    rope_table: usize,
}

pub struct Gemma3 {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    head: LmHead,
    /// Global and local rotary settings.
    ropes: [Rope; 2],
}

pub fn load(cfg: &ModelConfig, w: &WeightSource) -> Result<Box<dyn CausalLm>> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let global = Rope { base: cfg.rope_base, rotary_dims: cfg.rope_dims, style: cfg.rope_style };
    let local = Rope { base: cfg.rope_base_local.unwrap_or(cfg.rope_base), ..global };
    let norm = |name: String, len: usize| -> Result<RmsNorm> { Ok(RmsNorm { weight: super::offset(w.vector(&name, len)?, cfg.norm_offset), eps: cfg.rms_eps }) };
    let head_norm = |name: String| -> Result<Option<RmsNorm>> { if cfg.qk_norm { norm(name, hd).map(Some) } else { Ok(None) } };
    // f32 checkpoints are checked against an f32 reference: GELU computed exactly rather
    // than through llama.cpp's half-precision table.
    let gelu = if cfg.kv_precision == kiln_kernels::attention::KvPrecision::Full { Activation::GeluTanhExact } else { Activation::GeluTanh };
    let share = HeadShare::new(cfg, w, "model.layers.0.self_attn.o_proj.weight")?;
    let (q_range, kv_range, q_rows, kv_rows) = (share.q_rows(), share.kv_rows(), cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let rows = |name: String, all: usize, range: &std::ops::Range<usize>| -> Result<Linear> { Ok(Linear { weight: w.linear_rows(&name, all, h, range.clone())?, bias: None }) };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let sliding = cfg.is_sliding[i];
        layers.push(DecoderLayer {
            input_layernorm: norm(format!("{p}.input_layernorm.weight"), h)?,
            self_attn: Attention {
                q_proj: rows(format!("{p}.self_attn.q_proj.weight"), q_rows, &q_range)?,
                k_proj: rows(format!("{p}.self_attn.k_proj.weight"), kv_rows, &kv_range)?,
                v_proj: rows(format!("{p}.self_attn.v_proj.weight"), kv_rows, &kv_range)?,
                o_proj: Linear { weight: w.out_projection(&format!("{p}.self_attn.o_proj.weight"), h, q_rows, q_range.clone())?, bias: None },
                q_norm: head_norm(format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: head_norm(format!("{p}.self_attn.k_norm.weight"))?,
                cfg: AttentionConfig {
                    num_heads: share.heads.q.len(),
                    num_kv_heads: share.heads.kv.len(),
                    head_dim: hd,
                    score_scale: 1.0,
                    // query_pre_attn_scalar = head_dim for the released Gemma 3 text models.
                    query_scale: Some(cfg.query_scale.unwrap_or(1.0 / (hd as f32).sqrt())),
                    sliding_window: cfg.sliding_window.filter(|_| sliding),
                    softcap: cfg.attn_softcap,
                    rope: if sliding { local } else { global },
                },
                combine: w.combine(),
            },
            post_attention_layernorm: norm(format!("{p}.post_attention_layernorm.weight"), h)?,
            pre_feedforward_layernorm: norm(format!("{p}.pre_feedforward_layernorm.weight"), h)?,
            mlp: GatedMlp::load(
                w,
                ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{p}.mlp.{n}.weight")).each_ref().map(String::as_str),
                cfg.intermediate_size,
                h,
                gelu,
            )?,
            post_feedforward_layernorm: norm(format!("{p}.post_feedforward_layernorm.weight"), h)?,
            rope_table: usize::from(sliding),
        });
    }
    let embed_tokens = Embedding::load(w, "model.embed_tokens.weight", cfg.vocab_size, h, Some((h as f32).sqrt()))?;
    let head = LmHead::load(w, cfg)?;
    Ok(Box::new(Gemma3 { cfg: share.local_config(cfg), embed_tokens, layers, head, ropes: [global, local] }))
}

impl CausalLm for Gemma3 {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn run(&self, compute: &Compute, batch: &Batch, kv: &mut KvCache, s: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        let rows = batch.num_rows();
        s.prepare(rows, self.cfg.hidden_size);
        self.embed_tokens.forward(&batch.tokens, &mut s.x)?;
        // Image rows take the projected image embeddings as they are (not scaled).
        batch.apply_placed(&mut s.x, self.cfg.hidden_size)?;
        tap(&mut s.tap, || "inp_scaled".into(), &s.x);
        s.rope.resize_with(2, Default::default);
        for (table, rope) in s.rope.iter_mut().zip(&self.ropes) {
            table.fill(rope, &batch.positions);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let (group, kv_layer) = kv.layer(i);
            layer.input_layernorm.forward_on(compute, &s.x, &mut s.xn);
            let input = AttentionInput { x: &s.xn, batch, rope: &s.rope[layer.rope_table], group };
            layer.self_attn.forward(compute, &input, kv_layer, &mut s.layer, &mut s.y)?;
            tap(&mut s.tap, || format!("Qcur-{i}"), &s.layer.q);
            tap(&mut s.tap, || format!("kqv_out-{i}"), &s.layer.attn);
            tap(&mut s.tap, || format!("attn_out-{i}"), &s.y);
            layer.post_attention_layernorm.forward_on(compute, &s.y, &mut s.xn);
            tap(&mut s.tap, || format!("attn_post_norm-{i}"), &s.xn);
            kiln_kernels::ops::add_in_place(&mut s.x, &s.xn);
            tap(&mut s.tap, || format!("sa_out-{i}"), &s.x);
            layer.pre_feedforward_layernorm.forward_on(compute, &s.x, &mut s.xn);
            tap(&mut s.tap, || format!("ffn_norm-{i}"), &s.xn);
            layer.mlp.forward(compute, &s.xn, rows, &mut s.layer, &mut s.y)?;
            tap(&mut s.tap, || format!("ffn_up-{i}"), &s.layer.up);
            tap(&mut s.tap, || format!("ffn_geglu-{i}"), &s.layer.gate);
            tap(&mut s.tap, || format!("ffn_out-{i}"), &s.y);
            layer.post_feedforward_layernorm.forward_on(compute, &s.y, &mut s.xn);
            kiln_kernels::ops::add_in_place(&mut s.x, &s.xn);
            tap(&mut s.tap, || format!("l_out-{i}"), &s.x);
        }
        self.head.output(compute, batch, s, output, out)
    }
}
