//! Image input: each model's image processor (decode, resize, rescale, normalize, as its
//! Hugging Face processor does) and vision encoder, whose output rows take the places of
//! the prompt's image tokens.

pub mod qwen25vl;
pub mod siglip;

use crate::error::{Error, Result};
use crate::layers::weights::MatrixRef;
use crate::layers::{project, Compute, Linear, Projection, RmsNorm, WeightSource};
use crate::models::scratch::Scratch;
use kiln_shared::image::{Filter, ImageError, ImageLimits, RgbImage};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// A vision encoder's projection with its bias. Half-precision weights (bf16, f16: how
/// checkpoints and mmproj files ship) are widened to f32 once at load: an encoder multiplies
/// thousands of rows by each matrix, where kiln's f32 product is 2.5x faster than its
/// half-precision one (a 4-layer SigLIP at 896x896 on 2 threads: 13 s against 33 s), for
/// twice the memory of the tower. Quantized weights stay as they are.
pub(crate) fn encoder_linear(w: &WeightSource, name: &str, rows: usize, cols: usize) -> Result<Linear> {
    let weight = w.linear(&format!("{name}.weight"), rows, cols)?;
    let weight = match weight.dtype {
        kiln_kernels::DType::BF16 | kiln_kernels::DType::F16 => MatrixRef::from_f32(&weight.name, rows, cols, &w.tensor_f32(&format!("{name}.weight"), &[rows, cols])?),
        _ => weight,
    };
    Ok(Linear { weight, bias: Some(w.vector(&format!("{name}.bias"), rows)?) })
}

/// Most images one request may hold.
pub const MAX_IMAGES: usize = 16;

impl From<ImageError> for Error {
    fn from(e: ImageError) -> Error {
        Error::InvalidRequest(format!("bad image: {e}"))
    }
}

/// How the processor sizes an image.
#[derive(Clone, Debug, PartialEq)]
pub enum Resize {
    /// To exactly this size (Gemma 3: the tower's square).
    Exact { width: u32, height: u32 },
    /// Keeping the aspect, each side a multiple of `factor`, the area within the bounds
    /// (Qwen2-VL's `smart_resize`).
    Fit { factor: u32, min_pixels: u64, max_pixels: u64 },
}

/// How the model's image processor turns an image into pixel values.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub resize: Resize,
    pub filter: Filter,
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
    pub width: u32,
    pub height: u32,
    /// Identifies the resized image's content: equal keys, equal embeddings.
    pub key: u64,
}

impl std::fmt::Debug for PreparedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedImage {{ {}x{}, key: {:016x} }}", self.width, self.height, self.key)
    }
}

fn bad(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata { key: key.to_string(), what: what.into() }
}

impl ImageProcessor {
    /// Reads `processor_config.json` (its `image_processor` part) or
    /// `preprocessor_config.json` from `dir`; without either, `defaults`.
    pub fn from_dir(dir: &Path, defaults: ImageProcessor) -> Result<ImageProcessor> {
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
        let filter = match v["resample"].as_u64() {
            None => defaults.filter,
            Some(r) => Filter::from_pil(r).ok_or_else(|| bad(&key("resample"), format!("filter {r} is not supported (2 bilinear, 3 bicubic)")))?,
        };
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
        let number = |v: &Value, k: &str, default: u64| -> Result<u64> {
            match v {
                Value::Null => Ok(default),
                x => x.as_u64().filter(|&n| n > 0 && n <= 1 << 30).ok_or_else(|| bad(&key(k), format!("{x} is not a size"))),
            }
        };
        let resize = match defaults.resize {
            Resize::Exact { width, height } => Resize::Exact {
                width: number(&v["size"]["width"], "size.width", u64::from(width))?.min(1 << 14) as u32,
                height: number(&v["size"]["height"], "size.height", u64::from(height))?.min(1 << 14) as u32,
            },
            Resize::Fit { factor, min_pixels, max_pixels } => {
                let patch = number(&v["patch_size"], "patch_size", 14)?;
                let merge = number(&v["merge_size"], "merge_size", 2)?;
                let min = v["size"]["shortest_edge"].clone();
                let max = v["size"]["longest_edge"].clone();
                let (min, max) = (if min.is_null() { v["min_pixels"].clone() } else { min }, if max.is_null() { v["max_pixels"].clone() } else { max });
                let fit = Resize::Fit {
                    factor: if v["patch_size"].is_null() { factor } else { (patch * merge) as u32 },
                    min_pixels: number(&min, "size.shortest_edge", min_pixels)?,
                    max_pixels: number(&max, "size.longest_edge", max_pixels)?,
                };
                if let Resize::Fit { min_pixels, max_pixels, .. } = fit {
                    if min_pixels > max_pixels {
                        return Err(bad(&key("size"), format!("at least {min_pixels} pixels and at most {max_pixels}")));
                    }
                }
                fit
            }
        };
        let p = ImageProcessor {
            resize,
            filter,
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

    /// The size an image of `width` x `height` is resized to.
    pub fn target_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        match self.resize {
            Resize::Exact { width, height } => Ok((width, height)),
            Resize::Fit { factor, min_pixels, max_pixels } => kiln_shared::image::smart_resize(height, width, factor, min_pixels, max_pixels)
                .map(|(h, w)| (w, h))
                .ok_or_else(|| Error::InvalidRequest(format!("bad image: a {width}x{height} image is too narrow (aspect ratio over 200)"))),
        }
    }

    /// Decodes and prepares an image (PNG, JPEG, WebP or GIF bytes).
    pub fn prepare(&self, data: &[u8], limits: &ImageLimits) -> Result<PreparedImage> {
        let img = kiln_shared::image::decode_rgb(data, limits)?;
        self.prepare_rgb(&img)
    }

    pub fn prepare_rgb(&self, img: &RgbImage) -> Result<PreparedImage> {
        let (width, height) = self.target_size(img.width, img.height)?;
        let resized = kiln_shared::image::resize(img, width, height, self.filter);
        let digest = Sha256::new().chain_update(width.to_le_bytes()).chain_update(height.to_le_bytes()).chain_update(&resized.pixels).finalize();
        let key = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
        let scale = if self.rescale { self.rescale_factor } else { 1.0 };
        let (mean, std) = if self.normalize { (self.mean, self.std) } else { ([0.0; 3], [1.0; 3]) };
        Ok(PreparedImage { pixels: kiln_shared::image::normalize(&resized, scale, mean, std), width, height, key })
    }
}

/// How many tokens an image takes in the prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCount {
    /// The same for every image.
    Fixed(usize),
    /// One per `pixels` x `pixels` square of the resized image.
    Grid { pixels: u32 },
}

/// How a prompt holds an image, for whoever renders and tokenizes it (the router): the chat
/// template writes `placeholder` for each image, which becomes `before`, the image's count
/// of `image_token`, then `after`.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionInfo {
    pub placeholder: String,
    pub image_token: String,
    pub image_token_id: u32,
    pub count: TokenCount,
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

/// What differs between Gemma 3's vision side in a checkpoint and in an mmproj file.
struct Gemma3Parts {
    cfg: siglip::SiglipConfig,
    tokens: usize,
    /// Begin-of-image, end-of-image and image token ids.
    ids: (u32, u32, u32),
    mean: [f32; 3],
    std: [f32; 3],
    /// Added to the stored soft-embedding norm weights (1 for checkpoints, 0 for mmproj files,
    /// which hold `1 + w`).
    norm_offset: f32,
}

/// The encoder that turns prepared images into language-model rows.
enum Encoder {
    Gemma3 { tower: siglip::SiglipTower, projector: Gemma3Projector },
    Qwen25(qwen25vl::Qwen25Vision),
}

pub struct VisionModel {
    pub processor: ImageProcessor,
    pub info: VisionInfo,
    encoder: Encoder,
    /// Width of the language model's rows.
    pub hidden: usize,
    /// Whether an image's tokens attend to each other both ways in the language model.
    pub bidirectional: bool,
}

/// Where a checkpoint keeps the vision encoder and the language model, as the names models
/// ask for (`vision_tower.` / `visual.`, `multi_modal_projector.`, `model.`, `lm_head.`):
/// the layouts transformers has written over the years.
pub fn renames(arch: &str, has: impl Fn(&str) -> bool) -> Result<Vec<(String, String)>> {
    let find = |candidates: &[&str], probe: &str| candidates.iter().find(|p| has(&format!("{p}{probe}"))).map(|p| p.to_string());
    let missing = |name: &str| Error::Tensor { name: name.into(), what: "is missing from the model file".into() };
    let mut renames = Vec::new();
    match arch {
        "Qwen2_5_VLForConditionalGeneration" => {
            let visual = find(&["visual.", "model.visual."], "patch_embed.proj.weight").ok_or_else(|| missing("visual.patch_embed.proj.weight"))?;
            let text = find(&["model.language_model.", "model."], "embed_tokens.weight").ok_or_else(|| missing("model.embed_tokens.weight"))?;
            renames.push(("visual.".to_string(), visual));
            renames.push(("model.".to_string(), text));
        }
        _ => {
            let vision = find(&["vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."], "embeddings.patch_embedding.weight")
                .ok_or_else(|| missing("vision_tower.vision_model.embeddings.patch_embedding.weight"))?;
            let projector = find(&["multi_modal_projector.", "model.multi_modal_projector."], "mm_input_projection_weight").ok_or_else(|| missing("multi_modal_projector.mm_input_projection_weight"))?;
            let text = find(&["language_model.model.", "model.language_model."], "embed_tokens.weight").ok_or_else(|| missing("language_model.model.embed_tokens.weight"))?;
            renames.push(("vision_tower.".to_string(), vision));
            renames.push(("multi_modal_projector.".to_string(), projector));
            renames.push(("model.".to_string(), text));
        }
    }
    if let Some(head) = find(&["language_model.lm_head.", "lm_head."], "weight") {
        renames.push(("lm_head.".to_string(), head));
    }
    Ok(renames)
}

/// A token id `config.json` names under `key`, checked to be in the vocabulary.
fn config_token(config: &Value, key: &str, tokenizer: &kiln_shared::tokenizer::Tokenizer) -> Result<u32> {
    config[key].as_u64().filter(|&id| (id as usize) < tokenizer.vocab_size()).map(|id| id as u32).ok_or_else(|| bad(&format!("config.json: {key}"), "is missing or outside the vocabulary"))
}

impl VisionModel {
    /// The vision side of a vision-language checkpoint (`arch`, its `config.json` as `config`),
    /// tensors renamed by `renames`, for a language model `text_hidden` wide.
    pub fn load(arch: &str, config: &Value, dir: &Path, w: &WeightSource, text_hidden: usize, tokenizer: &kiln_shared::tokenizer::Tokenizer) -> Result<VisionModel> {
        let token_id = |key: &str| config_token(config, key, tokenizer);
        let text = |id: u32| tokenizer.decode(&[id], true);
        match arch {
            "Qwen2_5_VLForConditionalGeneration" => {
                let cfg = qwen25vl::Qwen25VisionConfig::from_hf(&config["vision_config"])?;
                if cfg.out_hidden_size != text_hidden {
                    return Err(bad("config.json: vision_config.out_hidden_size", format!("{} differs from the language model's {text_hidden}", cfg.out_hidden_size)));
                }
                let encoder = qwen25vl::load(&cfg, w, "visual.")?;
                let image = token_id("image_token_id")?;
                let pixels = cfg.token_pixels() as u32;
                let defaults = ImageProcessor {
                    resize: Resize::Fit { factor: pixels, min_pixels: 56 * 56, max_pixels: 28 * 28 * 1280 },
                    filter: Filter::Bicubic,
                    rescale_factor: 1.0 / 255.0,
                    rescale: true,
                    normalize: true,
                    mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
                    std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
                };
                let processor = ImageProcessor::from_dir(dir, defaults)?;
                if !matches!(processor.resize, Resize::Fit { factor, .. } if factor == pixels) {
                    return Err(bad("preprocessor_config.json", format!("patch_size x merge_size must be the encoder's {pixels} pixels per token")));
                }
                let info = VisionInfo {
                    placeholder: text(image),
                    image_token: text(image),
                    image_token_id: image,
                    count: TokenCount::Grid { pixels },
                    before: String::new(),
                    after: String::new(),
                };
                Ok(VisionModel { processor, info, encoder: Encoder::Qwen25(encoder), hidden: text_hidden, bidirectional: false })
            }
            _ => Self::load_gemma3(config, dir, w, text_hidden, tokenizer),
        }
    }

    /// Gemma 3's vision side from a llama.cpp `mmproj` file beside a GGUF language model (its
    /// `tokenizer` holds the image tokens by name).
    pub fn from_mmproj(path: &Path, text_hidden: usize, tokenizer: &kiln_shared::tokenizer::Tokenizer) -> Result<VisionModel> {
        let gguf = Arc::new(crate::formats::gguf::GgufFile::open(path)?);
        let projector = gguf.opt_string("clip.projector_type")?.or(gguf.opt_string("clip.vision.projector_type")?).unwrap_or("?").to_string();
        if projector != "gemma3" {
            return Err(bad("clip.projector_type", format!("`{projector}` mmproj files are not supported (gemma3)")));
        }
        let cfg = siglip::SiglipConfig::from_gguf(&gguf)?;
        // llama.cpp pools the patch grid by `scale_factor` (4 unless the file says otherwise).
        let scale = gguf.opt_u64("clip.vision.projector.scale_factor")?.unwrap_or(4) as usize;
        let per_side = cfg.patches_per_side();
        if scale == 0 || !per_side.is_multiple_of(scale) {
            return Err(bad("clip.vision.projector.scale_factor", format!("{scale} does not divide the {per_side}x{per_side} patch grid")));
        }
        let tokens = (per_side / scale) * (per_side / scale);
        let token = |text: &str| tokenizer.token_id(text).ok_or_else(|| bad("tokenizer", format!("the language model has no `{text}` token; is it Gemma 3?")));
        let ids = (token("<start_of_image>")?, token("<end_of_image>")?, token("<image_soft_token>")?);
        let mean_std = |key: &str| -> Result<[f32; 3]> {
            match gguf.get(key) {
                None => Ok([0.5; 3]),
                Some(v) => v.as_f32_array().filter(|a| a.len() == 3).map(|a| [a[0], a[1], a[2]]).ok_or_else(|| bad(key, "is not three numbers")),
            }
        };
        let w = WeightSource::new(Arc::clone(&gguf), "clip");
        let parts = Gemma3Parts { cfg, tokens, ids, mean: mean_std("clip.vision.image_mean")?, std: mean_std("clip.vision.image_std")?, norm_offset: 0.0 };
        let model = Self::gemma3(parts, None, &w, text_hidden, tokenizer)?;
        let unused = w.unused();
        if !unused.is_empty() {
            tracing::warn!("{} tensors of {} were not used: {}", unused.len(), path.display(), unused.join(", "));
        }
        Ok(model)
    }

    fn load_gemma3(config: &Value, dir: &Path, w: &WeightSource, text_hidden: usize, tokenizer: &kiln_shared::tokenizer::Tokenizer) -> Result<VisionModel> {
        let cfg = siglip::SiglipConfig::from_hf(&config["vision_config"])?;
        let token_id = |key: &str| config_token(config, key, tokenizer);
        let ids = (token_id("boi_token_index")?, token_id("eoi_token_index")?, token_id("image_token_index")?);
        let tokens = config["mm_tokens_per_image"].as_u64().unwrap_or(256) as usize;
        // Checkpoints store the soft-embedding norm as `w` for `1 + w`.
        let parts = Gemma3Parts { cfg, tokens, ids, mean: [0.5; 3], std: [0.5; 3], norm_offset: 1.0 };
        Self::gemma3(parts, Some(dir), w, text_hidden, tokenizer)
    }

    /// Gemma 3's tower and projector from `w`, the processor's settings from `dir` (when
    /// there is one) over `parts`' defaults.
    fn gemma3(parts: Gemma3Parts, dir: Option<&Path>, w: &WeightSource, text_hidden: usize, tokenizer: &kiln_shared::tokenizer::Tokenizer) -> Result<VisionModel> {
        let Gemma3Parts { cfg, tokens, ids: (boi, eoi, image), mean, std, norm_offset } = parts;
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
        let norm = RmsNorm { weight: crate::models::offset(w.vector("multi_modal_projector.mm_soft_emb_norm.weight", hv)?, norm_offset), eps: cfg.eps };
        let text = |id: u32| tokenizer.decode(&[id], true);
        let info = VisionInfo {
            placeholder: text(boi),
            image_token: text(image),
            image_token_id: image,
            count: TokenCount::Fixed(tokens),
            before: format!("\n\n{}", text(boi)),
            after: format!("{}\n\n", text(eoi)),
        };
        let size = cfg.image_size as u32;
        let defaults = ImageProcessor {
            resize: Resize::Exact { width: size, height: size },
            filter: Filter::Bilinear,
            rescale_factor: 1.0 / 255.0,
            rescale: true,
            normalize: true,
            mean,
            std,
        };
        let processor = match dir {
            Some(dir) => ImageProcessor::from_dir(dir, defaults)?,
            None => defaults,
        };
        if processor.resize != (Resize::Exact { width: size, height: size }) {
            return Err(bad("processor size", format!("{:?} differs from the vision tower's {size}x{size}", processor.resize)));
        }
        Ok(VisionModel {
            processor,
            info,
            encoder: Encoder::Gemma3 { tower, projector: Gemma3Projector { tokens_per_side, pool: per_side / tokens_per_side, norm, projection } },
            hidden: text_hidden,
            bidirectional: true,
        })
    }

    /// Embeddings of each image, `[tokens, hidden]`, the images encoded as one batch.
    pub fn encode(&self, compute: &Compute, images: &[&PreparedImage], s: &mut Scratch) -> Result<Vec<Arc<[f32]>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        match &self.encoder {
            Encoder::Gemma3 { tower, projector } => projector.forward(compute, tower, images, self.hidden, s),
            Encoder::Qwen25(encoder) => {
                let inputs: Vec<(&[f32], usize, usize)> = images.iter().map(|i| (i.pixels.as_slice(), i.height as usize, i.width as usize)).collect();
                Ok(encoder.forward(compute, &inputs, s)?.into_iter().map(Arc::from).collect())
            }
        }
    }
}

impl Gemma3Projector {
    fn forward(&self, compute: &Compute, tower: &siglip::SiglipTower, images: &[&PreparedImage], hidden: usize, s: &mut Scratch) -> Result<Vec<Arc<[f32]>>> {
        let pixels: Vec<&[f32]> = images.iter().map(|i| i.pixels.as_slice()).collect();
        let mut patches = Vec::new();
        tower.forward(compute, &pixels, s, &mut patches)?;
        let (hv, per_side, n) = (tower.cfg.hidden_size, tower.cfg.patches_per_side(), tower.cfg.num_patches());
        let (side, pool) = (self.tokens_per_side, self.pool);
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
        self.norm.forward(&pooled, &mut normed);
        let rows = images.len() * tokens;
        let mut out = vec![0.0f32; rows * hidden];
        project(compute, &normed, rows, &mut s.layer.acts, &mut [Projection { linear: &self.projection, out: &mut out }])?;
        Ok(out.chunks_exact(tokens * hidden).map(Arc::from).collect())
    }
}

impl VisionInfo {
    /// Tokens an image resized to `width` x `height` takes in the prompt.
    pub fn tokens_for(&self, width: u32, height: u32) -> usize {
        match self.count {
            TokenCount::Fixed(n) => n,
            TokenCount::Grid { pixels } => (width / pixels) as usize * (height / pixels) as usize,
        }
    }

    /// The prompt text with each image placeholder expanded to its image's token sequence
    /// (`counts`: tokens per image, in order; placeholders past them are left as they are).
    pub fn expand(&self, text: &str, counts: &[usize]) -> String {
        let markup = kiln_shared::image::ImageMarkup { placeholder: &self.placeholder, token: &self.image_token, before: &self.before, after: &self.after };
        markup.expand(text, counts)
    }

    /// The runs of image tokens in `prompt`, checked against the images given (`counts`:
    /// tokens per image): one run per image, each as long as its image's count.
    pub fn image_runs(&self, prompt: &[u32], counts: &[usize]) -> Result<Vec<Range<usize>>> {
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
        if runs.len() != counts.len() {
            return Err(Error::InvalidRequest(format!("the prompt has places for {} images, but {} were given", runs.len(), counts.len())));
        }
        if let Some((bad, want)) = runs.iter().zip(counts).find(|(r, &n)| r.len() != n) {
            return Err(Error::InvalidRequest(format!("an image takes {want} tokens in the prompt; positions {bad:?} hold {}", bad.len())));
        }
        Ok(runs)
    }

    /// Token counts of prepared images.
    pub fn counts(&self, images: &[std::sync::Arc<PreparedImage>]) -> Vec<usize> {
        images.iter().map(|i| self.tokens_for(i.width, i.height)).collect()
    }
}

impl VisionModel {
    /// Where each image's tokens are in `prompt` (`images`: the prepared images, in order);
    /// the spans' embeddings are filled in when a step first computes their rows.
    pub fn place(&self, prompt: &[u32], images: &[Arc<PreparedImage>]) -> Result<Vec<crate::models::batch::ImageSpan>> {
        let counts: Vec<usize> = images.iter().map(|i| self.info.tokens_for(i.width, i.height)).collect();
        let runs = self.info.image_runs(prompt, &counts)?;
        let pixels = match self.info.count {
            TokenCount::Grid { pixels } => Some(pixels),
            TokenCount::Fixed(_) => None,
        };
        Ok(runs
            .into_iter()
            .zip(images)
            .map(|(run, img)| crate::models::batch::ImageSpan {
                start: run.start,
                len: run.len(),
                embeddings: None,
                key: img.key,
                grid: pixels.map(|p| ((img.height / p) as usize, (img.width / p) as usize)),
                bidirectional: self.bidirectional,
            })
            .collect())
    }
}
