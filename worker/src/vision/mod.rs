//! Image input: each model's image processor (decode, resize, rescale, normalize, as its
//! Hugging Face processor does) and vision encoder, whose output rows take the places of
//! the prompt's image tokens.

pub mod siglip;

use crate::error::{Error, Result};
use crate::layers::weights::MatrixRef;
use crate::layers::{project, Compute, Linear, Projection, RmsNorm, WeightSource};
use crate::models::scratch::Scratch;
use kiln_shared::image::{ImageError, ImageLimits, RgbImage};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Most images one request may hold.
pub const MAX_IMAGES: usize = 16;

impl From<ImageError> for Error {
    fn from(e: ImageError) -> Error {
        Error::InvalidRequest(format!("bad image: {e}"))
    }
}

/// How the model's image processor turns an image into pixel values.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub width: u32,
    pub height: u32,
    /// Bytes are multiplied by this (1/255) when `rescale` is on.
    pub rescale_factor: f64,
    pub rescale: bool,
    pub normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// An image ready for the encoder: `[3, height, width]` values and a digest of its pixels.
#[derive(Clone)]
pub struct PreparedImage {
    pub pixels: Vec<f32>,
    /// Identifies the resized image's content: equal keys, equal embeddings.
    pub key: u64,
}

impl std::fmt::Debug for PreparedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedImage {{ values: {}, key: {:016x} }}", self.pixels.len(), self.key)
    }
}

fn bad(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata { key: key.to_string(), what: what.into() }
}

impl ImageProcessor {
    /// Reads `processor_config.json` (its `image_processor` part) or
    /// `preprocessor_config.json` from `dir`; without either, the defaults of the model's
    /// processor for a square `size`.
    pub fn from_dir(dir: &Path, size: u32) -> Result<ImageProcessor> {
        let defaults = ImageProcessor { width: size, height: size, rescale_factor: 1.0 / 255.0, rescale: true, normalize: true, mean: [0.5; 3], std: [0.5; 3] };
        for (file, part) in [("processor_config.json", Some("image_processor")), ("preprocessor_config.json", None)] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            let v = crate::formats::hf_tokenizer::read_json(&path)?;
            let v = match part {
                Some(key) if v[key].is_object() => v[key].clone(),
                Some(_) => continue,
                None => v,
            };
            return Self::from_json(&v, file, defaults);
        }
        Ok(defaults)
    }

    fn from_json(v: &Value, file: &str, defaults: ImageProcessor) -> Result<ImageProcessor> {
        let key = |k: &str| format!("{file}: {k}");
        if let Some(r) = v["resample"].as_u64().filter(|&r| r != 2) {
            return Err(bad(&key("resample"), format!("filter {r} is not supported (2, bilinear)")));
        }
        if v["do_pan_and_scan"].as_bool() == Some(true) {
            return Err(bad(&key("do_pan_and_scan"), "pan and scan is not supported; set it to false"));
        }
        let triple = |k: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match &v[k] {
                Value::Null => Ok(default),
                Value::Number(n) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Value::Array(a) if a.len() == 3 && a.iter().all(Value::is_number) => Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32)),
                other => Err(bad(&key(k), format!("{other} is not three numbers"))),
            }
        };
        let dim = |k: &str, default: u32| -> Result<u32> {
            match &v["size"][k] {
                Value::Null => Ok(default),
                x => x.as_u64().filter(|&n| n > 0 && n <= 1 << 14).map(|n| n as u32).ok_or_else(|| bad(&key(&format!("size.{k}")), format!("{x} is not a size"))),
            }
        };
        let p = ImageProcessor {
            width: dim("width", defaults.width)?,
            height: dim("height", defaults.height)?,
            rescale_factor: v["rescale_factor"].as_f64().unwrap_or(defaults.rescale_factor),
            rescale: v["do_rescale"].as_bool().unwrap_or(true),
            normalize: v["do_normalize"].as_bool().unwrap_or(true),
            mean: triple("image_mean", defaults.mean)?,
            std: triple("image_std", defaults.std)?,
        };
        if p.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(bad(&key("image_std"), "a standard deviation is zero"));
        }
        Ok(p)
    }

    /// Decodes and prepares an image (PNG, JPEG, WebP or GIF bytes).
    pub fn prepare(&self, data: &[u8], limits: &ImageLimits) -> Result<PreparedImage> {
        let img = kiln_shared::image::decode_rgb(data, limits)?;
        Ok(self.prepare_rgb(&img))
    }

    pub fn prepare_rgb(&self, img: &RgbImage) -> PreparedImage {
        let resized = kiln_shared::image::resize_bilinear(img, self.width, self.height);
        let digest = Sha256::new().chain_update(self.width.to_le_bytes()).chain_update(self.height.to_le_bytes()).chain_update(&resized.pixels).finalize();
        let key = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
        let scale = if self.rescale { self.rescale_factor } else { 1.0 };
        let (mean, std) = if self.normalize { (self.mean, self.std) } else { ([0.0; 3], [1.0; 3]) };
        PreparedImage { pixels: kiln_shared::image::normalize(&resized, scale, mean, std), key }
    }
}

/// How a prompt holds an image, for whoever renders and tokenizes it (the router): the chat
/// template writes `placeholder` for each image, which becomes `before`, `tokens` copies of
/// `image_token`, then `after`.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionInfo {
    pub placeholder: String,
    pub image_token: String,
    pub image_token_id: u32,
    pub tokens: usize,
    pub before: String,
    pub after: String,
}

/// Gemma 3's vision side: the SigLIP tower, average pooling of its patch grid down to
/// `mm_tokens_per_image` tokens, RMSNorm (`1 + weight`), and a projection to the language
/// model's width.
struct Gemma3Projector {
    tokens_per_side: usize,
    pool: usize,
    norm: RmsNorm,
    projection: Linear,
}

pub struct VisionModel {
    pub processor: ImageProcessor,
    pub info: VisionInfo,
    tower: siglip::SiglipTower,
    projector: Gemma3Projector,
    /// Width of the language model's rows.
    pub hidden: usize,
}

/// Where a checkpoint keeps the vision tower and projector, and the language model under the
/// names the text models ask for (`model.`, `lm_head.`): the layouts transformers has written.
pub fn gemma3_renames(has: impl Fn(&str) -> bool) -> Result<Vec<(String, String)>> {
    let find = |candidates: &[&str], probe: &str| candidates.iter().find(|p| has(&format!("{p}{probe}"))).map(|p| p.to_string());
    let vision = find(&["vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."], "embeddings.patch_embedding.weight")
        .ok_or_else(|| Error::Tensor { name: "vision_tower.vision_model.embeddings.patch_embedding.weight".into(), what: "is missing from the model file".into() })?;
    let projector = find(&["multi_modal_projector.", "model.multi_modal_projector."], "mm_input_projection_weight")
        .ok_or_else(|| Error::Tensor { name: "multi_modal_projector.mm_input_projection_weight".into(), what: "is missing from the model file".into() })?;
    let text = find(&["language_model.model.", "model.language_model."], "embed_tokens.weight")
        .ok_or_else(|| Error::Tensor { name: "language_model.model.embed_tokens.weight".into(), what: "is missing from the model file".into() })?;
    let mut renames = vec![("vision_tower.".to_string(), vision), ("multi_modal_projector.".to_string(), projector), ("model.".to_string(), text)];
    if let Some(head) = find(&["language_model.lm_head.", "lm_head."], "weight") {
        renames.push(("lm_head.".to_string(), head));
    }
    Ok(renames)
}

impl VisionModel {
    /// Gemma 3's vision tower and projector from a `Gemma3ForConditionalGeneration` checkpoint
    /// (tensors renamed by `gemma3_renames`), for a language model `text_hidden` wide.
    pub fn load_gemma3(config: &Value, dir: &Path, w: &WeightSource, text_hidden: usize, tokenizer: &kiln_shared::tokenizer::Tokenizer) -> Result<VisionModel> {
        let cfg = siglip::SiglipConfig::from_hf(&config["vision_config"])?;
        let tokens = config["mm_tokens_per_image"].as_u64().unwrap_or(256) as usize;
        let tokens_per_side = (tokens as f64).sqrt() as usize;
        let per_side = cfg.patches_per_side();
        if tokens_per_side * tokens_per_side != tokens || tokens_per_side == 0 || !per_side.is_multiple_of(tokens_per_side) {
            return Err(bad("config.json: mm_tokens_per_image", format!("{tokens} is not a square that divides the {per_side}x{per_side} patch grid")));
        }
        let tower = siglip::load(&cfg, w, "vision_tower.")?;
        let hv = cfg.hidden_size;
        // Stored `[vision, text]` (applied as x @ W); the product wants rows per output.
        let stored = w.tensor_f32("multi_modal_projector.mm_input_projection_weight", &[hv, text_hidden])?;
        let mut rows = vec![0.0f32; hv * text_hidden];
        for i in 0..hv {
            for o in 0..text_hidden {
                rows[o * hv + i] = stored[i * text_hidden + o];
            }
        }
        let projection = Linear { weight: MatrixRef::from_f32("multi_modal_projector.mm_input_projection_weight", text_hidden, hv, &rows), bias: None };
        let norm = RmsNorm { weight: crate::models::offset(w.vector("multi_modal_projector.mm_soft_emb_norm.weight", hv)?, 1.0), eps: cfg.eps };
        let token_id = |key: &str| -> Result<u32> {
            config[key].as_u64().filter(|&id| (id as usize) < tokenizer.vocab_size()).map(|id| id as u32).ok_or_else(|| bad(&format!("config.json: {key}"), "is missing or outside the vocabulary"))
        };
        let text = |id: u32| tokenizer.decode(&[id], true);
        let (boi, eoi, image) = (token_id("boi_token_index")?, token_id("eoi_token_index")?, token_id("image_token_index")?);
        let info = VisionInfo {
            placeholder: text(boi),
            image_token: text(image),
            image_token_id: image,
            tokens,
            before: format!("\n\n{}", text(boi)),
            after: format!("{}\n\n", text(eoi)),
        };
        let size = cfg.image_size as u32;
        let processor = ImageProcessor::from_dir(dir, size)?;
        if (processor.width, processor.height) != (size, size) {
            return Err(bad("processor size", format!("{}x{} differs from the vision tower's {size}x{size}", processor.width, processor.height)));
        }
        Ok(VisionModel {
            processor,
            info,
            projector: Gemma3Projector { tokens_per_side, pool: per_side / tokens_per_side, norm, projection },
            tower,
            hidden: text_hidden,
        })
    }

    /// Embeddings of each image, `[info.tokens, hidden]`, the images encoded as one batch.
    pub fn encode(&self, compute: &Compute, images: &[&PreparedImage], s: &mut Scratch) -> Result<Vec<Arc<[f32]>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels: Vec<&[f32]> = images.iter().map(|i| i.pixels.as_slice()).collect();
        let mut patches = Vec::new();
        self.tower.forward(compute, &pixels, s, &mut patches)?;
        let (hv, per_side, n) = (self.tower.cfg.hidden_size, self.tower.cfg.patches_per_side(), self.tower.cfg.num_patches());
        let (side, pool) = (self.projector.tokens_per_side, self.projector.pool);
        let tokens = side * side;
        // Average pooling of each pool x pool square of patches, summed row by row.
        let mut pooled = vec![0.0f32; images.len() * tokens * hv];
        for (i, out) in pooled.chunks_exact_mut(tokens * hv).enumerate() {
            let grid = &patches[i * n * hv..(i + 1) * n * hv];
            for (t, dst) in out.chunks_exact_mut(hv).enumerate() {
                let (ty, tx) = (t / side, t % side);
                for dy in 0..pool {
                    for dx in 0..pool {
                        let p = (ty * pool + dy) * per_side + tx * pool + dx;
                        kiln_kernels::ops::add_in_place(dst, &grid[p * hv..(p + 1) * hv]);
                    }
                }
                let div = (pool * pool) as f32;
                dst.iter_mut().for_each(|v| *v /= div);
            }
        }
        let mut normed = vec![0.0f32; pooled.len()];
        self.projector.norm.forward(&pooled, &mut normed);
        let rows = images.len() * tokens;
        let mut out = vec![0.0f32; rows * self.hidden];
        project(compute, &normed, rows, &mut s.layer.acts, &mut [Projection { linear: &self.projector.projection, out: &mut out }])?;
        Ok(out.chunks_exact(tokens * self.hidden).map(Arc::from).collect())
    }
}

impl VisionInfo {
    /// The prompt text with each image placeholder expanded to the image's token sequence.
    pub fn expand(&self, text: &str) -> String {
        let full = format!("{}{}{}", self.before, self.image_token.repeat(self.tokens), self.after);
        text.replace(&self.placeholder, &full)
    }

    /// The runs of image tokens in `prompt`, checked against the `images` given: one run per
    /// image, each `tokens` long.
    pub fn image_runs(&self, prompt: &[u32], images: usize) -> Result<Vec<Range<usize>>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (i, &t) in prompt.iter().enumerate() {
            if t != self.image_token_id {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        if runs.len() != images {
            return Err(Error::InvalidRequest(format!("the prompt has places for {} images, but {images} were given", runs.len())));
        }
        if let Some(bad) = runs.iter().find(|r| r.len() != self.tokens) {
            return Err(Error::InvalidRequest(format!("an image takes {} tokens in the prompt; positions {bad:?} hold {}", self.tokens, bad.len())));
        }
        Ok(runs)
    }

    /// Where each image's embeddings go in `prompt` (`images`: embeddings and content key).
    pub fn place(&self, prompt: &[u32], images: &[(Arc<[f32]>, u64)]) -> Result<Vec<crate::models::batch::ImageSpan>> {
        let runs = self.image_runs(prompt, images.len())?;
        Ok(runs
            .into_iter()
            .zip(images)
            .map(|(run, (embeddings, key))| crate::models::batch::ImageSpan { start: run.start, len: run.len(), embeddings: Arc::clone(embeddings), key: *key })
            .collect())
    }
}
