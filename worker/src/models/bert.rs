//! BERT encoder (all-MiniLM-L6-v2 and the other BERT-family sentence-transformer
//! checkpoints), as transformers' modeling_bert computes it: word, absolute position and
//! token-type embeddings summed and LayerNormed, then post-norm blocks of attention in both
//! directions and a GELU feed-forward, each added to its input and LayerNormed.

use super::scratch::Scratch;
use super::Encoder;
use crate::error::{Error, Result};
use crate::layers::bidirectional::{attend, Heads};
use crate::layers::{project, Compute, Embedding, LayerNorm, Linear, Projection, WeightSource};
use serde_json::Value;
use std::ops::Range;

/// The feed-forward activation (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `x Φ(x)` with the error function (`gelu`).
    Erf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    Tanh,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub eps: f32,
    pub activation: Gelu,
}

fn bad(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata { key: format!("config.json: {key}"), what: what.into() }
}

impl BertConfig {
    pub fn from_hf(c: &Value) -> Result<BertConfig> {
        let size = |key: &str| -> Result<usize> {
            match c[key].as_u64() {
                Some(v) if v > 0 && v <= 1 << 24 => Ok(v as usize),
                Some(v) => Err(bad(key, format!("{v} is out of range"))),
                None => Err(bad(key, "is missing or not a positive integer")),
            }
        };
        let activation = match c["hidden_act"].as_str().unwrap_or("gelu") {
            "gelu" => Gelu::Erf,
            "gelu_new" | "gelu_pytorch_tanh" => Gelu::Tanh,
            other => return Err(bad("hidden_act", format!("`{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh)"))),
        };
        if let Some(kind) = c["position_embedding_type"].as_str().filter(|k| *k != "absolute") {
            return Err(bad("position_embedding_type", format!("`{kind}` is not supported (absolute)")));
        }
        let cfg = BertConfig {
            vocab_size: size("vocab_size")?,
            hidden_size: size("hidden_size")?,
            num_layers: size("num_hidden_layers")?,
            num_heads: size("num_attention_heads")?,
            intermediate_size: size("intermediate_size")?,
            max_positions: size("max_position_embeddings")?,
            type_vocab_size: c["type_vocab_size"].as_u64().map_or(Ok(2), |_| size("type_vocab_size"))?,
            eps: c["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
            activation,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return Err(bad("num_attention_heads", format!("{} does not divide hidden_size {}", cfg.num_heads, cfg.hidden_size)));
        }
        Ok(cfg)
    }
}

struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct Bert {
    cfg: BertConfig,
    word: Embedding,
    position: Embedding,
    /// Token type 0's embedding: sentence embeddings use one segment.
    token_type: Vec<f32>,
    norm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

pub fn load(cfg: &BertConfig, w: &WeightSource) -> Result<Bert> {
    let h = cfg.hidden_size;
    // Checkpoints saved from a task model (BertForMaskedLM and the like) nest the encoder.
    let root = if w.has("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
    let linear = |name: String, rows: usize, cols: usize| -> Result<Linear> {
        // Many rows per product (whole inputs) and no llama.cpp results to match.
        let weight = w.linear(&format!("{name}.weight"), rows, cols)?.in_column_order();
        Ok(Linear { weight, bias: Some(w.vector(&format!("{name}.bias"), rows)?) })
    };
    let norm = |name: String| -> Result<LayerNorm> {
        Ok(LayerNorm { weight: w.vector(&format!("{name}.weight"), h)?, bias: w.vector(&format!("{name}.bias"), h)?, eps: cfg.eps })
    };
    let table = |name: &str, rows: usize| -> Result<Embedding> {
        Ok(Embedding::whole(w.matrix(&format!("{root}embeddings.{name}.weight"), rows, h)?, None))
    };
    let types = table("token_type_embeddings", cfg.type_vocab_size)?;
    let mut token_type = vec![0.0; h];
    types.forward(&[0], &mut token_type)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("{root}encoder.layer.{i}");
        layers.push(EncoderLayer {
            query: linear(format!("{p}.attention.self.query"), h, h)?,
            key: linear(format!("{p}.attention.self.key"), h, h)?,
            value: linear(format!("{p}.attention.self.value"), h, h)?,
            attention_output: linear(format!("{p}.attention.output.dense"), h, h)?,
            attention_norm: norm(format!("{p}.attention.output.LayerNorm"))?,
            intermediate: linear(format!("{p}.intermediate.dense"), cfg.intermediate_size, h)?,
            output: linear(format!("{p}.output.dense"), h, cfg.intermediate_size)?,
            output_norm: norm(format!("{p}.output.LayerNorm"))?,
        });
    }
    Ok(Bert {
        cfg: cfg.clone(),
        word: table("word_embeddings", cfg.vocab_size)?,
        position: table("position_embeddings", cfg.max_positions)?,
        token_type,
        norm: norm(format!("{root}embeddings.LayerNorm"))?,
        layers,
    })
}

/// GELU over `x`, rows split across `compute`'s threads.
pub(crate) fn gelu_on(compute: &Compute, activation: Gelu, x: &mut [f32], width: usize) {
    let rows = x.len() / width;
    let dst = kiln_kernels::pool::SharedMut::new(x);
    compute.pool.for_ranges(rows, 8, &|r| {
        // SAFETY: each range of rows is written by one thread only.
        gelu(compute.isa, activation, unsafe { dst.slice(r.start * width..r.end * width) });
    });
}

fn gelu(isa: kiln_kernels::Isa, activation: Gelu, x: &mut [f32]) {
    match activation {
        Gelu::Erf => kiln_kernels::ops::gelu_erf(isa, x),
        Gelu::Tanh => x.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + (0.797_884_6 * (*v + 0.044_715 * *v * *v * *v)).tanh())),
    }
}

impl Encoder for Bert {
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_positions
    }

    fn forward(&self, compute: &Compute, seqs: &[&[u32]], s: &mut Scratch, out: &mut Vec<f32>) -> Result<()> {
        let h = self.cfg.hidden_size;
        let mut spans: Vec<Range<usize>> = Vec::with_capacity(seqs.len());
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for seq in seqs {
            if seq.len() > self.cfg.max_positions {
                return Err(Error::InvalidRequest(format!("{} tokens; the model has positions for {}", seq.len(), self.cfg.max_positions)));
            }
            spans.push(tokens.len()..tokens.len() + seq.len());
            tokens.extend_from_slice(seq);
            positions.extend((0..seq.len()).map(|p| p as u32));
        }
        let rows = tokens.len();
        s.prepare(rows, h);
        self.word.forward(&tokens, &mut s.x)?;
        self.position.forward(&positions, &mut s.y)?;
        for (x, (p, t)) in s.x.chunks_exact_mut(h).zip(s.y.chunks_exact(h).zip(std::iter::repeat(&self.token_type))) {
            for ((a, &b), &c) in x.iter_mut().zip(p).zip(t) {
                *a = (*a + c) + b;
            }
        }
        self.norm.forward_in_place_on(compute, &mut s.x);
        let shape = Heads { heads: self.cfg.num_heads, head_dim: h / self.cfg.num_heads, scale: 1.0 / ((h / self.cfg.num_heads) as f32).sqrt() };
        let l = &mut s.layer;
        for layer in &self.layers {
            for b in [&mut l.q, &mut l.k, &mut l.v, &mut l.attn] {
                b.resize(rows * h, 0.0);
            }
            project(
                compute,
                &s.x,
                rows,
                &mut l.acts,
                &mut [
                    Projection { linear: &layer.query, out: &mut l.q },
                    Projection { linear: &layer.key, out: &mut l.k },
                    Projection { linear: &layer.value, out: &mut l.v },
                ],
            )?;
            attend(compute, &l.q, &l.k, &l.v, &spans, shape, &mut l.attn);
            project(compute, &l.attn, rows, &mut l.acts, &mut [Projection { linear: &layer.attention_output, out: &mut s.y }])?;
            kiln_kernels::ops::add_in_place(&mut s.x, &s.y);
            layer.attention_norm.forward_in_place_on(compute, &mut s.x);
            l.gate.resize(rows * self.cfg.intermediate_size, 0.0);
            project(compute, &s.x, rows, &mut l.acts, &mut [Projection { linear: &layer.intermediate, out: &mut l.gate }])?;
            gelu_on(compute, self.cfg.activation, &mut l.gate, self.cfg.intermediate_size);
            project(compute, &l.gate, rows, &mut l.acts, &mut [Projection { linear: &layer.output, out: &mut s.y }])?;
            kiln_kernels::ops::add_in_place(&mut s.x, &s.y);
            layer.output_norm.forward_in_place_on(compute, &mut s.x);
        }
        out.clear();
        out.extend_from_slice(&s.x[..rows * h]);
        Ok(())
    }
}
