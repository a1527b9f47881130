//! The SigLIP vision transformer (transformers' `SiglipVisionModel` without the pooling
//! head): non-overlapping patches projected to the hidden size plus learned positions, then
//! pre-norm encoder layers (LayerNorm, bidirectional attention over the image's patches,
//! LayerNorm, GELU MLP) and a final LayerNorm. Gemma 3's vision tower.

use crate::error::{Error, Result};
use crate::layers::bidirectional::{attend, Heads};
use crate::layers::{project, Compute, LayerNorm, Linear, Projection, WeightSource};
use crate::models::bert::{gelu_on, Gelu};
use crate::models::scratch::Scratch;
use crate::layers::weights::MatrixRef;
use serde_json::Value;
use std::ops::Range;

#[derive(Clone, Debug, PartialEq)]
pub struct SiglipConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub eps: f32,
}

fn bad(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata { key: format!("config.json: vision_config.{key}"), what: what.into() }
}

impl SiglipConfig {
    /// The tower of a llama.cpp `mmproj` file (`clip.vision.*` metadata).
    pub fn from_gguf(g: &crate::formats::gguf::GgufFile) -> Result<SiglipConfig> {
        let size = |key: &str| -> Result<usize> {
            let v = g.u64(&format!("clip.vision.{key}"))?;
            if v == 0 || v > 1 << 16 {
                return Err(Error::Metadata { key: format!("clip.vision.{key}"), what: format!("{v} is out of range") });
            }
            Ok(v as usize)
        };
        let cfg = SiglipConfig {
            hidden_size: size("embedding_length")?,
            intermediate_size: size("feed_forward_length")?,
            num_layers: size("block_count")?,
            num_heads: size("attention.head_count")?,
            image_size: size("image_size")?,
            patch_size: size("patch_size")?,
            eps: g.opt_f32("clip.vision.attention.layer_norm_epsilon")?.unwrap_or(1e-6),
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads) || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::Metadata { key: "clip.vision".into(), what: "head count or patch size does not divide the tower".into() });
        }
        Ok(cfg)
    }

    pub fn from_hf(c: &Value) -> Result<SiglipConfig> {
        let size = |key: &str, default: Option<u64>| -> Result<usize> {
            match c[key].as_u64().or(if c[key].is_null() { default } else { None }) {
                Some(v) if v > 0 && v <= 1 << 16 => Ok(v as usize),
                Some(v) => Err(bad(key, format!("{v} is out of range"))),
                None => Err(bad(key, "is missing or not a positive integer")),
            }
        };
        match c["hidden_act"].as_str().unwrap_or("gelu_pytorch_tanh") {
            "gelu_pytorch_tanh" | "gelu_new" => {}
            other => return Err(bad("hidden_act", format!("`{other}` is not supported (gelu_pytorch_tanh)"))),
        }
        if c["num_channels"].as_u64().is_some_and(|n| n != 3) {
            return Err(bad("num_channels", "only RGB (3 channels) is supported"));
        }
        let cfg = SiglipConfig {
            hidden_size: size("hidden_size", Some(768))?,
            intermediate_size: size("intermediate_size", Some(3072))?,
            num_layers: size("num_hidden_layers", Some(12))?,
            num_heads: size("num_attention_heads", Some(12))?,
            image_size: size("image_size", Some(224))?,
            patch_size: size("patch_size", Some(16))?,
            eps: c["layer_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return Err(bad("num_attention_heads", format!("{} does not divide hidden_size {}", cfg.num_heads, cfg.hidden_size)));
        }
        if !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(bad("patch_size", format!("{} does not divide image_size {}", cfg.patch_size, cfg.image_size)));
        }
        Ok(cfg)
    }

    /// Patches along each side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct SiglipTower {
    pub cfg: SiglipConfig,
    /// The patch convolution as a product: `[hidden, 3 * patch * patch]`, inputs ordered
    /// channel, row, column as the kernel is.
    patch: Linear,
    positions: Vec<f32>,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
}

/// Loads the tower whose tensors are named `{p}embeddings...`, `{p}encoder.layers...`.
pub fn load(cfg: &SiglipConfig, w: &WeightSource, p: &str) -> Result<SiglipTower> {
    let h = cfg.hidden_size;
    let linear = |name: String, rows: usize, cols: usize| -> Result<Linear> { super::encoder_linear(w, &name, rows, cols) };
    let norm = |name: String| -> Result<LayerNorm> {
        Ok(LayerNorm { weight: w.vector(&format!("{name}.weight"), h)?, bias: w.vector(&format!("{name}.bias"), h)?, eps: cfg.eps })
    };
    let ps = cfg.patch_size;
    let kernel = w.tensor_f32(&format!("{p}embeddings.patch_embedding.weight"), &[h, 3, ps, ps])?;
    let patch = Linear {
        weight: MatrixRef::from_f32(&format!("{p}embeddings.patch_embedding.weight"), h, 3 * ps * ps, &kernel),
        bias: Some(w.vector(&format!("{p}embeddings.patch_embedding.bias"), h)?),
    };
    let positions = w.tensor_f32(&format!("{p}embeddings.position_embedding.weight"), &[cfg.num_patches(), h])?;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let l = format!("{p}encoder.layers.{i}");
            Ok(EncoderLayer {
                norm1: norm(format!("{l}.layer_norm1"))?,
                q: linear(format!("{l}.self_attn.q_proj"), h, h)?,
                k: linear(format!("{l}.self_attn.k_proj"), h, h)?,
                v: linear(format!("{l}.self_attn.v_proj"), h, h)?,
                out: linear(format!("{l}.self_attn.out_proj"), h, h)?,
                norm2: norm(format!("{l}.layer_norm2"))?,
                fc1: linear(format!("{l}.mlp.fc1"), cfg.intermediate_size, h)?,
                fc2: linear(format!("{l}.mlp.fc2"), h, cfg.intermediate_size)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SiglipTower { cfg: cfg.clone(), patch, positions, layers, post_norm: norm(format!("{p}post_layernorm"))? })
}

impl SiglipTower {
    /// Encodes images (each `[3, image_size, image_size]`, normalized) into `out`:
    /// `[images * num_patches, hidden]`, patches in row-major order.
    pub fn forward(&self, compute: &Compute, images: &[&[f32]], s: &mut Scratch, out: &mut Vec<f32>) -> Result<()> {
        let c = &self.cfg;
        let (h, side, ps, n) = (c.hidden_size, c.image_size, c.patch_size, c.num_patches());
        let per_side = c.patches_per_side();
        let patch_len = 3 * ps * ps;
        let rows = images.len() * n;
        // Patches as rows of the convolution's product.
        let mut patches = vec![0.0f32; rows * patch_len];
        for (i, img) in images.iter().enumerate() {
            if img.len() != 3 * side * side {
                return Err(Error::InvalidRequest(format!("an image has {} values; the vision tower takes 3x{side}x{side}", img.len())));
            }
            for (pi, row) in patches[i * n * patch_len..(i + 1) * n * patch_len].chunks_exact_mut(patch_len).enumerate() {
                let (py, px) = (pi / per_side, pi % per_side);
                for ch in 0..3 {
                    for ky in 0..ps {
                        let src = ch * side * side + (py * ps + ky) * side + px * ps;
                        row[(ch * ps + ky) * ps..(ch * ps + ky + 1) * ps].copy_from_slice(&img[src..src + ps]);
                    }
                }
            }
        }
        s.prepare(rows, h);
        project(compute, &patches, rows, &mut s.layer.acts, &mut [Projection { linear: &self.patch, out: &mut s.x }])?;
        for (row, pos) in s.x.chunks_exact_mut(h).zip(self.positions.chunks_exact(h).cycle()) {
            kiln_kernels::ops::add_in_place(row, pos);
        }
        let spans: Vec<Range<usize>> = (0..images.len()).map(|i| i * n..(i + 1) * n).collect();
        let head_dim = h / c.num_heads;
        let shape = Heads { heads: c.num_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt() };
        for layer in &self.layers {
            let l = &mut s.layer;
            for b in [&mut l.q, &mut l.k, &mut l.v, &mut l.attn] {
                b.resize(rows * h, 0.0);
            }
            s.xn.clear();
            s.xn.extend_from_slice(&s.x[..rows * h]);
            layer.norm1.forward_in_place_on(compute, &mut s.xn);
            project(
                compute,
                &s.xn,
                rows,
                &mut l.acts,
                &mut [Projection { linear: &layer.q, out: &mut l.q }, Projection { linear: &layer.k, out: &mut l.k }, Projection { linear: &layer.v, out: &mut l.v }],
            )?;
            attend(compute, &l.q, &l.k, &l.v, &spans, shape, &mut l.attn);
            project(compute, &l.attn, rows, &mut l.acts, &mut [Projection { linear: &layer.out, out: &mut s.y }])?;
            kiln_kernels::ops::add_in_place(&mut s.x[..rows * h], &s.y[..rows * h]);
            s.xn.clear();
            s.xn.extend_from_slice(&s.x[..rows * h]);
            layer.norm2.forward_in_place_on(compute, &mut s.xn);
            l.gate.resize(rows * c.intermediate_size, 0.0);
            project(compute, &s.xn, rows, &mut l.acts, &mut [Projection { linear: &layer.fc1, out: &mut l.gate }])?;
            gelu_on(compute, Gelu::Tanh, &mut l.gate, c.intermediate_size);
            project(compute, &l.gate, rows, &mut l.acts, &mut [Projection { linear: &layer.fc2, out: &mut s.y }])?;
            kiln_kernels::ops::add_in_place(&mut s.x[..rows * h], &s.y[..rows * h]);
        }
        self.post_norm.forward_in_place_on(compute, &mut s.x[..rows * h]);
        out.clear();
        out.extend_from_slice(&s.x[..rows * h]);
        Ok(())
    }
}
