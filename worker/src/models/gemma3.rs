//! Gemma 2 and Gemma 3 text decoders. Follows transformers' modeling_gemma2/3: embeddings
//! scaled by sqrt(hidden), RMSNorm before and after both attention and MLP, GeGLU, and
//! interleaved sliding-window and global layers; Gemma 3 adds per-head q/k RMSNorm and a
//! local RoPE base, Gemma 2 soft-caps attention scores and logits.

use super::batch::Batch;
use super::config::ModelConfig;
use super::scratch::Scratch;
use super::{Architecture, CausalLm, HeadShare, LmHead, OnBackend, Output};
use crate::backend::{kv_of, tap, tap_part, AttendInput, Backend, Device, Part};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::layers::attention::AttentionConfig;
use crate::layers::mlp::{Activation, GatedMlp};
use crate::layers::rope::Rope;
use crate::layers::{Attention, Compute, Embedding, Linear, RmsNorm, WeightSource};

struct DecoderLayer<B: Backend> {
    input_layernorm: B::Norm,
    self_attn: B::Attention,
    post_attention_layernorm: B::Norm,
    pre_feedforward_layernorm: B::Norm,
    mlp: B::Mlp,
    post_feedforward_layernorm: B::Norm,
    /// Index into the model's RoPE tables: 0 global, 1 local.
    rope_table: usize,
}

pub struct Gemma3<B: Backend> {
    embed_tokens: B::Embedding,
    layers: Vec<DecoderLayer<B>>,
    head: B::Head,
    /// Global and local rotary settings.
    ropes: [Rope; 2],
}

pub fn load(cfg: &ModelConfig, w: &WeightSource, device: &Device) -> Result<Box<dyn CausalLm>> {
    crate::on_device!(device, b => load_on(b, cfg, w))
}

fn load_on<B: Backend>(b: B, cfg: &ModelConfig, w: &WeightSource) -> Result<Box<dyn CausalLm>> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let global = Rope { base: cfg.rope_base, rotary_dims: cfg.rope_dims, style: cfg.rope_style };
    let local = Rope { base: cfg.rope_base_local.unwrap_or(cfg.rope_base), ..global };
    let norm = |name: String, len: usize| -> Result<RmsNorm> { Ok(RmsNorm { weight: super::offset(w.vector(&name, len)?, cfg.norm_offset), eps: cfg.rms_eps }) };
    let upload_norm = |name: String| -> Result<B::Norm> { b.upload_norm(norm(name, h)?) };
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
            input_layernorm: upload_norm(format!("{p}.input_layernorm.weight"))?,
            self_attn: b.upload_attention(Attention {
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
            })?,
            post_attention_layernorm: upload_norm(format!("{p}.post_attention_layernorm.weight"))?,
            pre_feedforward_layernorm: upload_norm(format!("{p}.pre_feedforward_layernorm.weight"))?,
            mlp: b.upload_mlp(GatedMlp::load(
                w,
                ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{p}.mlp.{n}.weight")).each_ref().map(String::as_str),
                cfg.intermediate_size,
                h,
                gelu,
            )?)?,
            post_feedforward_layernorm: upload_norm(format!("{p}.post_feedforward_layernorm.weight"))?,
            rope_table: usize::from(sliding),
        });
    }
    let embed_tokens = b.upload_embedding(Embedding::load(w, "model.embed_tokens.weight", cfg.vocab_size, h, Some((h as f32).sqrt()))?)?;
    let head = b.upload_head(LmHead::load(w, cfg)?)?;
    Ok(Box::new(OnBackend { backend: b, cfg: share.local_config(cfg), model: Gemma3 { embed_tokens, layers, head, ropes: [global, local] } }))
}

impl<B: Backend> Architecture<B> for Gemma3<B> {
    fn run(&self, b: &B, cfg: &ModelConfig, compute: &Compute, batch: &Batch, kv: &mut KvCache, s: &mut Scratch, output: Output, out: &mut Vec<f32>) -> Result<()> {
        let rows = batch.num_rows();
        let f = b.flow(s, rows, cfg.hidden_size)?;
        // Image rows take the projected image embeddings as they are (not scaled).
        b.embed(compute, &self.embed_tokens, batch, f.x)?;
        tap(b, f.tap, || "inp_scaled".into(), f.x);
        f.rope.resize_with(2, Default::default);
        f.rope_tables.resize_with(2, Default::default);
        for ((table, on_device), rope) in f.rope.iter_mut().zip(f.rope_tables.iter_mut()).zip(&self.ropes) {
            table.fill(rope, &batch.positions);
            b.rope_table(table, on_device)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let (group, kv_layer) = kv.layer(i);
            b.rms_norm(compute, &layer.input_layernorm, f.x, f.xn)?;
            let input = AttendInput { x: f.xn, batch, rope: &f.rope[layer.rope_table], rope_table: &f.rope_tables[layer.rope_table], group };
            b.attend(compute, &layer.self_attn, &input, kv_of(kv_layer, b)?, f.work, f.y)?;
            tap_part(b, f.tap, || format!("Qcur-{i}"), f.work, Part::Query);
            tap_part(b, f.tap, || format!("kqv_out-{i}"), f.work, Part::AttnOut);
            tap(b, f.tap, || format!("attn_out-{i}"), f.y);
            b.rms_norm(compute, &layer.post_attention_layernorm, f.y, f.xn)?;
            tap(b, f.tap, || format!("attn_post_norm-{i}"), f.xn);
            b.add(f.x, f.xn)?;
            tap(b, f.tap, || format!("sa_out-{i}"), f.x);
            b.rms_norm(compute, &layer.pre_feedforward_layernorm, f.x, f.xn)?;
            tap(b, f.tap, || format!("ffn_norm-{i}"), f.xn);
            b.mlp(compute, &layer.mlp, f.xn, rows, f.work, f.y)?;
            tap_part(b, f.tap, || format!("ffn_up-{i}"), f.work, Part::Up);
            tap_part(b, f.tap, || format!("ffn_geglu-{i}"), f.work, Part::Gated);
            tap(b, f.tap, || format!("ffn_out-{i}"), f.y);
            b.rms_norm(compute, &layer.post_feedforward_layernorm, f.y, f.xn)?;
            b.add(f.x, f.xn)?;
            tap(b, f.tap, || format!("l_out-{i}"), f.x);
        }
        b.head(compute, &self.head, batch, f.x, f.work, output, out)
    }
}
