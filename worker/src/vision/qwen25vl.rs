//! The Qwen2.5-VL vision transformer (transformers' `Qwen2_5_VisionTransformerPretrainedModel`):
//! 14-pixel patches of each dynamically sized image (the frame repeated over the temporal
//! patch), 2D rotary positions, blocks of RMSNorm + attention + RMSNorm + gated MLP that
//! attend within windows of merged patches except in the full-attention blocks, and a merger
//! that joins each 2x2 group of patches into one language-model token.

use crate::error::{Error, Result};
use crate::layers::bidirectional::{attend, Heads};
use crate::layers::rope::RopeStyle;
use crate::layers::weights::MatrixRef;
use crate::layers::{project, Compute, Linear, Projection, RmsNorm, WeightSource};
use crate::models::bert::{gelu_on, Gelu};
use crate::models::scratch::Scratch;
use serde_json::Value;
use std::ops::Range;

#[derive(Clone, Debug, PartialEq)]
pub struct Qwen25VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    pub out_hidden_size: usize,
    pub full_attention_blocks: Vec<usize>,
    pub rope_theta: f32,
}

fn bad(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata { key: format!("config.json: vision_config.{key}"), what: what.into() }
}

impl Qwen25VisionConfig {
    pub fn from_hf(c: &Value) -> Result<Qwen25VisionConfig> {
        let size = |key: &str, default: u64| -> Result<usize> {
            match &c[key] {
                Value::Null => Ok(default as usize),
                v => v.as_u64().filter(|&n| n > 0 && n <= 1 << 16).map(|n| n as usize).ok_or_else(|| bad(key, format!("{v} is not a positive size"))),
            }
        };
        match c["hidden_act"].as_str().unwrap_or("silu") {
            "silu" => {}
            other => return Err(bad("hidden_act", format!("`{other}` is not supported (silu)"))),
        }
        let hidden_size = size("hidden_size", 1280)?;
        let cfg = Qwen25VisionConfig {
            depth: size("depth", 32)?,
            hidden_size,
            intermediate_size: size("intermediate_size", 3420)?,
            num_heads: size("num_heads", 16)?,
            patch_size: size("patch_size", 14)?,
            merge_size: size("spatial_merge_size", 2)?,
            temporal_patch_size: size("temporal_patch_size", 2)?,
            window_size: size("window_size", 112)?,
            out_hidden_size: size("out_hidden_size", 3584)?,
            full_attention_blocks: c["fullatt_block_indexes"].as_array().map_or(vec![7, 15, 23, 31], |a| a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect()),
            rope_theta: c["rope_parameters"]["rope_theta"].as_f64().or(c["rope_theta"].as_f64()).unwrap_or(10_000.0) as f32,
        };
        let head_dim = hidden_size / cfg.num_heads;
        if !hidden_size.is_multiple_of(cfg.num_heads) || !head_dim.is_multiple_of(4) {
            return Err(bad("num_heads", format!("{} heads of {hidden_size} leave a head size that is not a multiple of 4", cfg.num_heads)));
        }
        if !cfg.window_size.is_multiple_of(cfg.patch_size * cfg.merge_size) {
            return Err(bad("window_size", format!("{} is not a multiple of {} (patch x merge)", cfg.window_size, cfg.patch_size * cfg.merge_size)));
        }
        Ok(cfg)
    }

    /// Pixels per side of one language-model token (a merged group of patches).
    pub fn token_pixels(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

struct Block {
    norm1: RmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Qwen25Vision {
    pub cfg: Qwen25VisionConfig,
    /// The 3-D patch convolution as a product: `[hidden, 3 * temporal * patch * patch]`.
    patch: Linear,
    blocks: Vec<Block>,
    merger_norm: RmsNorm,
    merger_in: Linear,
    merger_out: Linear,
}

/// Loads the vision transformer whose tensors are named `{p}patch_embed...`, `{p}blocks...`.
pub fn load(cfg: &Qwen25VisionConfig, w: &WeightSource, p: &str) -> Result<Qwen25Vision> {
    let h = cfg.hidden_size;
    let linear = |name: String, rows: usize, cols: usize| -> Result<Linear> { super::encoder_linear(w, &name, rows, cols) };
    let norm = |name: String, len: usize| -> Result<RmsNorm> { Ok(RmsNorm { weight: w.vector(&format!("{name}.weight"), len)?, eps: 1e-6 }) };
    let (t, ps) = (cfg.temporal_patch_size, cfg.patch_size);
    let name = format!("{p}patch_embed.proj.weight");
    let kernel = w.tensor_f32(&name, &[h, 3, t, ps, ps])?;
    let patch = Linear { weight: MatrixRef::from_f32(&name, h, 3 * t * ps * ps, &kernel), bias: None };
    let blocks = (0..cfg.depth)
        .map(|i| {
            let b = format!("{p}blocks.{i}");
            Ok(Block {
                norm1: norm(format!("{b}.norm1"), h)?,
                qkv: linear(format!("{b}.attn.qkv"), 3 * h, h)?,
                proj: linear(format!("{b}.attn.proj"), h, h)?,
                norm2: norm(format!("{b}.norm2"), h)?,
                gate: linear(format!("{b}.mlp.gate_proj"), cfg.intermediate_size, h)?,
                up: linear(format!("{b}.mlp.up_proj"), cfg.intermediate_size, h)?,
                down: linear(format!("{b}.mlp.down_proj"), h, cfg.intermediate_size)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let merged = h * cfg.merge_size * cfg.merge_size;
    Ok(Qwen25Vision {
        cfg: cfg.clone(),
        patch,
        blocks,
        merger_norm: norm(format!("{p}merger.ln_q"), h)?,
        merger_in: linear(format!("{p}merger.mlp.0"), merged, merged)?,
        merger_out: linear(format!("{p}merger.mlp.2"), cfg.out_hidden_size, merged)?,
    })
}

/// One image's patches in the order the model reads them, with what attention needs.
struct Layout {
    /// Patch rows (`[patches, 3 * temporal * patch * patch]`), windows one after another.
    patches: Vec<f32>,
    /// (row, column) of each patch on the image's patch grid, in the same order.
    positions: Vec<(usize, usize)>,
    /// Row ranges of the attention windows.
    windows: Vec<Range<usize>>,
    /// For each language-model token in raster order, its merged group's index in row order.
    token_order: Vec<usize>,
}

impl Qwen25Vision {
    /// Lays out one image (`pixels`: `[3, height, width]`, sides multiples of a token's pixels).
    fn layout(&self, pixels: &[f32], height: usize, width: usize) -> Layout {
        let c = &self.cfg;
        let (ps, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
        let (gh, gw) = (height / ps, width / ps);
        let (th, tw) = (gh / m, gw / m);
        let win = c.window_size / ps / m;
        let patch_len = 3 * t * ps * ps;
        let mut out = Layout { patches: Vec::with_capacity(gh * gw * patch_len), positions: Vec::new(), windows: Vec::new(), token_order: vec![0; th * tw] };
        let mut group = 0;
        // Windows of `win` x `win` merged groups, row by row; groups row by row inside them;
        // the `m` x `m` patches of a group row by row.
        for wy in (0..th).step_by(win) {
            for wx in (0..tw).step_by(win) {
                let start = out.positions.len();
                for by in wy..(wy + win).min(th) {
                    for bx in wx..(wx + win).min(tw) {
                        out.token_order[by * tw + bx] = group;
                        group += 1;
                        for my in 0..m {
                            for mx in 0..m {
                                let (py, px) = (by * m + my, bx * m + mx);
                                out.positions.push((py, px));
                                for ch in 0..3 {
                                    // The frame fills every temporal slice of the patch.
                                    for _ in 0..t {
                                        for ky in 0..ps {
                                            let row = ch * height * width + (py * ps + ky) * width + px * ps;
                                            out.patches.extend_from_slice(&pixels[row..row + ps]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                out.windows.push(start..out.positions.len());
            }
        }
        out
    }

    /// Embeddings of each image (`(pixels, height, width)`), `[tokens, out_hidden]` each.
    pub fn forward(&self, compute: &Compute, images: &[(&[f32], usize, usize)], s: &mut Scratch) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let unit = c.token_pixels();
        let mut layouts = Vec::with_capacity(images.len());
        for &(pixels, height, width) in images {
            if height == 0 || width == 0 || !height.is_multiple_of(unit) || !width.is_multiple_of(unit) || pixels.len() != 3 * height * width {
                return Err(Error::InvalidRequest(format!("an image of {height}x{width} pixels does not divide into {unit}-pixel tokens")));
            }
            layouts.push(self.layout(pixels, height, width));
        }
        let rows: usize = layouts.iter().map(|l| l.positions.len()).sum();
        let patches: Vec<f32> = layouts.iter().flat_map(|l| l.patches.iter().copied()).collect();
        s.prepare(rows, h);
        project(compute, &patches, rows, &mut s.layer.acts, &mut [Projection { linear: &self.patch, out: &mut s.x }])?;
        // Attention spans: windows, and whole images for the full-attention blocks.
        let (mut windows, mut wholes, mut offset) = (Vec::new(), Vec::new(), 0);
        for l in &layouts {
            windows.extend(l.windows.iter().filter(|w| !w.is_empty()).map(|w| w.start + offset..w.end + offset));
            wholes.push(offset..offset + l.positions.len());
            offset += l.positions.len();
        }
        // 2D rotary angles: the first quarter of the frequencies turn with the patch row,
        // the second with its column; each head rotates its two halves by them.
        let head_dim = h / c.num_heads;
        let quarter = head_dim / 4;
        let inv: Vec<f32> = (0..quarter).map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / (head_dim / 2) as f32)).collect();
        let (mut cos, mut sin) = (Vec::with_capacity(rows * 2 * quarter), Vec::with_capacity(rows * 2 * quarter));
        for &(py, px) in layouts.iter().flat_map(|l| &l.positions) {
            for p in [py, px] {
                for f in &inv {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = Heads { heads: c.num_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt() };
        let mut qkv = vec![0.0f32; rows * 3 * h];
        for (i, block) in self.blocks.iter().enumerate() {
            let l = &mut s.layer;
            for b in [&mut l.q, &mut l.k, &mut l.v, &mut l.attn] {
                b.resize(rows * h, 0.0);
            }
            block.norm1.forward_on(compute, &s.x[..rows * h], &mut s.xn[..rows * h]);
            project(compute, &s.xn, rows, &mut l.acts, &mut [Projection { linear: &block.qkv, out: &mut qkv }])?;
            for r in 0..rows {
                let src = &qkv[r * 3 * h..(r + 1) * 3 * h];
                let angles = r * 2 * quarter..(r + 1) * 2 * quarter;
                for (dst, part) in [(&mut l.q, 0), (&mut l.k, 1), (&mut l.v, 2)] {
                    let row = &mut dst[r * h..(r + 1) * h];
                    row.copy_from_slice(&src[part * h..(part + 1) * h]);
                    if part < 2 {
                        for head in row.chunks_exact_mut(head_dim) {
                            kiln_kernels::ops::rope_apply(head, &cos[angles.clone()], &sin[angles.clone()], RopeStyle::SplitHalf);
                        }
                    }
                }
            }
            let spans = if c.full_attention_blocks.contains(&i) { &wholes } else { &windows };
            attend(compute, &l.q, &l.k, &l.v, spans, shape, &mut l.attn);
            project(compute, &l.attn, rows, &mut l.acts, &mut [Projection { linear: &block.proj, out: &mut s.y }])?;
            kiln_kernels::ops::add_in_place(&mut s.x[..rows * h], &s.y[..rows * h]);
            block.norm2.forward_on(compute, &s.x[..rows * h], &mut s.xn[..rows * h]);
            l.gate.resize(rows * c.intermediate_size, 0.0);
            l.up.resize(rows * c.intermediate_size, 0.0);
            project(compute, &s.xn, rows, &mut l.acts, &mut [Projection { linear: &block.gate, out: &mut l.gate }, Projection { linear: &block.up, out: &mut l.up }])?;
            for (g, u) in l.gate.iter_mut().zip(&l.up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            project(compute, &l.gate, rows, &mut l.acts, &mut [Projection { linear: &block.down, out: &mut s.y }])?;
            kiln_kernels::ops::add_in_place(&mut s.x[..rows * h], &s.y[..rows * h]);
        }
        // Merger: each group's patches (consecutive rows) normed, joined and projected.
        self.merger_norm.forward_on(compute, &s.x[..rows * h], &mut s.xn[..rows * h]);
        let groups = rows / (c.merge_size * c.merge_size);
        let merged = h * c.merge_size * c.merge_size;
        let mut hidden = vec![0.0f32; groups * merged];
        project(compute, &s.xn[..rows * h], groups, &mut s.layer.acts, &mut [Projection { linear: &self.merger_in, out: &mut hidden }])?;
        gelu_on(compute, Gelu::Erf, &mut hidden, merged);
        let mut out = vec![0.0f32; groups * c.out_hidden_size];
        project(compute, &hidden, groups, &mut s.layer.acts, &mut [Projection { linear: &self.merger_out, out: &mut out }])?;
        // Back to raster order, image by image.
        let d = c.out_hidden_size;
        let mut first = 0;
        Ok(layouts
            .iter()
            .map(|l| {
                let mut tokens = Vec::with_capacity(l.token_order.len() * d);
                for &g in &l.token_order {
                    tokens.extend_from_slice(&out[(first + g) * d..(first + g + 1) * d]);
                }
                first += l.token_order.len();
                tokens
            })
            .collect())
    }
}
