//! Loading a model file into a ready-to-run model, tokenizer and chat template.

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::gguf_vocab::tokenizer_spec;
use crate::layers::WeightSource;
use crate::models::config::ModelConfig;
use crate::backend::Device;
use crate::models::{registry, CausalLm};
use crate::parallel::step::Leader;
use crate::parallel::Shard;
use kiln_shared::chat::{builtin_template, ChatMessage, ChatTemplate};
use kiln_shared::tokenizer::Tokenizer;
use kiln_kernels::DType;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct LoadedModel {
    pub path: PathBuf,
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: ChatTemplate,
    /// The template's source, and whether it came from the file or is kiln's built-in one.
    pub chat_template_source: String,
    pub chat_template_builtin: bool,
    /// Tensors in the file that the architecture did not use (usually a wrong guess).
    pub unused_tensors: Vec<String>,
    /// The weights' formats, as a user would name them: the format of most matrix elements,
    /// then the others (`Q4_1 (also Q8_0)`), and load-time quantization when it ran.
    pub weight_format: String,
    /// What load-time quantization did, when it was asked for.
    pub isq: Option<crate::layers::weights::IsqReport>,
    /// Sampling settings the model's authors recommend (generation_config.json).
    pub sampling_defaults: SamplingDefaults,
    /// The tensor-parallel group this share of the model computes with, when it is split.
    pub group: Option<Arc<dyn crate::parallel::Collective>>,
    /// The image processor and encoder of a vision-language model.
    pub vision: Option<Arc<crate::vision::VisionModel>>,
}

/// What a model file holds besides its weights and configuration, as `LoadedModel` keeps it.
struct FileParts {
    path: PathBuf,
    tokenizer: Arc<Tokenizer>,
    /// The file's chat template, if it has one.
    template: Option<String>,
    weight_format: String,
    sampling_defaults: SamplingDefaults,
}

/// Sampling defaults from `generation_config.json`; unset fields are left to the caller.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    pub fn from_generation_config(v: &serde_json::Value) -> SamplingDefaults {
        let f = |k: &str| v[k].as_f64().map(|x| x as f32);
        SamplingDefaults {
            // do_sample = false asks for greedy decoding whatever the temperature says.
            temperature: if v["do_sample"] == false { Some(0.0) } else { f("temperature") },
            top_k: v["top_k"].as_u64().map(|k| k as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        }
    }
}

/// The formats `--isq` accepts, by the names it accepts them under.
pub const ISQ_TYPES: &[(&str, DType)] = &[
    ("q4_0", DType::Q4_0),
    ("q4_1", DType::Q4_1),
    ("q5_0", DType::Q5_0),
    ("q5_1", DType::Q5_1),
    ("q8_0", DType::Q8_0),
    ("q2k", DType::Q2K),
    ("q3k", DType::Q3K),
    ("q4k", DType::Q4K),
    ("q5k", DType::Q5K),
    ("q6k", DType::Q6K),
];

pub fn parse_isq(name: &str) -> std::result::Result<DType, String> {
    let lower = name.to_ascii_lowercase().replace('_', "");
    ISQ_TYPES
        .iter()
        .find(|(n, _)| n.replace('_', "") == lower)
        .map(|(_, t)| *t)
        .ok_or_else(|| format!("unknown quantization `{name}` (one of {})", ISQ_TYPES.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")))
}

/// Names the formats of a model's matrices (tensors of two or more dimensions), by element
/// count: `Q4_1`, `Q4_1 (also Q8_0)`, `BF16`; with load-time quantization, `BF16, projections
/// quantized at load to Q4_K`.
pub(crate) fn weight_format(tensors: impl Iterator<Item = (DType, usize, u64)>, isq: Option<DType>) -> String {
    let mut counts: Vec<(DType, u64)> = Vec::new();
    for (dtype, _, elements) in tensors.filter(|t| t.1 >= 2) {
        match counts.iter_mut().find(|c| c.0 == dtype) {
            Some(c) => c.1 += elements,
            None => counts.push((dtype, elements)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let mut names = counts.iter().map(|c| c.0.name());
    let file = match (names.next(), names.collect::<Vec<_>>()) {
        (None, _) => "none".to_string(),
        (Some(main), rest) if rest.is_empty() => main.to_string(),
        (Some(main), rest) => format!("{main} (also {})", rest.join(", ")),
    };
    match isq {
        Some(t) => format!("{file}, projections quantized at load to {}", t.name()),
        None => file,
    }
}

impl LoadedModel {
    /// Loads a GGUF file, or a Hugging Face model directory.
    pub fn load(path: &Path) -> Result<LoadedModel> {
        Self::load_quantized(path, None)
    }

    /// Loads a model, quantizing its projection weights to `isq` on the way when given.
    pub fn load_quantized(path: &Path, isq: Option<DType>) -> Result<LoadedModel> {
        Self::load_shard(path, isq, None)
    }

    /// Loads tensor-parallel rank `shard`'s share of a model (the whole model for None). Rank
    /// 0's model sends each step to the other ranks before running it (`parallel::step`).
    pub fn load_shard(path: &Path, isq: Option<DType>, shard: Option<Shard>) -> Result<LoadedModel> {
        Self::load_on(path, isq, shard, &Device::Cpu)
    }

    /// `load_shard`, computing on `device` (weights uploaded there once).
    pub fn load_on(path: &Path, isq: Option<DType>, shard: Option<Shard>, device: &Device) -> Result<LoadedModel> {
        if path.is_dir() {
            return Self::hf_dir(path, isq, shard, device);
        }
        Self::gguf(Arc::new(GgufFile::open(path)?), isq, shard, device)
    }

    /// Builds the model from a Hugging Face directory: config.json, safetensors weights
    /// (one file or shards), tokenizer.json with tokenizer_config.json.
    pub fn from_hf_dir(dir: &Path) -> Result<LoadedModel> {
        Self::hf_dir(dir, None, None, &Device::Cpu)
    }

    fn hf_dir(dir: &Path, isq: Option<DType>, shard: Option<Shard>, device: &Device) -> Result<LoadedModel> {
        let config = crate::formats::hf_tokenizer::read_json(&dir.join("config.json"))?;
        if crate::embedding::is_encoder(&config) {
            return Err(Error::InvalidRequest(format!(
                "{} holds an embedding model (an encoder), which does not generate text: embed with it (`kiln-worker run --embed`, /v1/embeddings)",
                dir.display()
            )));
        }
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        let multimodal = crate::models::hf_config::multimodal(&config)?;
        let text_config = multimodal.as_ref().map_or(&config, |m| &m.text);
        let mut cfg = crate::models::hf_config::from_hf(text_config, &name)?;
        if isq.is_some() {
            // Quantized weights run with the half-precision cache and llama.cpp's numerics,
            // as the same model written to GGUF would.
            cfg.kv_precision = kiln_kernels::attention::KvPrecision::Half;
        }
        let (tokenizer, template) = crate::formats::hf_tokenizer::load(dir)?;
        let tokenizer = Arc::new(tokenizer);
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Metadata {
                key: "config.json: vocab_size".into(),
                what: format!("{} is smaller than the tokenizer's {} tokens", cfg.vocab_size, tokenizer.vocab_size()),
            });
        }
        let generation = dir.join("generation_config.json");
        let sampling_defaults = if generation.exists() {
            SamplingDefaults::from_generation_config(&crate::formats::hf_tokenizer::read_json(&generation)?)
        } else {
            SamplingDefaults::default()
        };
        let checkpoint = Arc::new(crate::formats::safetensors::Checkpoint::open_dir(dir)?);
        let format = weight_format(checkpoint.names().filter_map(|n| checkpoint.tensor(n)).map(|(t, _)| (t.dtype, t.dims.len(), t.num_elements())), isq);
        let mut weights = WeightSource::from_checkpoint(Arc::clone(&checkpoint), &cfg.architecture).with_isq(isq);
        let mut vision = None;
        if multimodal.is_some() {
            if shard.as_ref().is_some_and(|s| s.size > 1) {
                return Err(Error::InvalidRequest(format!("{} is a vision-language model; splitting those across ranks is not supported yet", dir.display())));
            }
            let arch = config["architectures"][0].as_str().unwrap_or_default();
            weights = weights.with_renames(crate::vision::renames(arch, |n| checkpoint.tensor(n).is_some())?);
            vision = Some(Arc::new(crate::vision::VisionModel::load(arch, &config, dir, &weights, cfg.hidden_size, &tokenizer)?));
        }
        let weights = weights.with_shard(shard);
        let file = FileParts { path: dir.to_path_buf(), tokenizer, template, weight_format: format, sampling_defaults };
        let mut model = Self::assemble(file, &cfg, &weights, isq.is_some(), device)?;
        model.vision = vision;
        Ok(model)
    }

    /// The model built from its weights, with its tokenizer and chat template (the file's, or
    /// kiln's built-in one for the architecture).
    fn assemble(file: FileParts, cfg: &ModelConfig, weights: &WeightSource, quantized: bool, device: &Device) -> Result<LoadedModel> {
        let FileParts { path, tokenizer, template, weight_format, sampling_defaults } = file;
        let (mut model, unused_tensors) = registry::build(cfg, weights, device)?;
        if let Some(shard) = weights.shard().filter(|s| s.rank == 0 && s.size > 1) {
            model = Box::new(Leader { inner: model, shard: shard.clone() });
        }
        let (source, builtin) = match template {
            Some(t) => (t, false),
            None => (builtin_template(&cfg.architecture).to_string(), true),
        };
        let chat_template = ChatTemplate::or_refusing(&source, tokenizer.bos_text().unwrap_or(""), tokenizer.eos_text().unwrap_or(""));
        if let Some(why) = chat_template.refusal() {
            tracing::warn!("{why}; chat requests to this model will fail with this error, raw completions still work");
        }
        Ok(LoadedModel {
            path,
            model,
            tokenizer,
            chat_template,
            chat_template_source: source,
            chat_template_builtin: builtin,
            unused_tensors,
            weight_format,
            isq: quantized.then(|| weights.isq_report.borrow().clone()),
            sampling_defaults,
            group: weights.shard().map(|s| Arc::clone(&s.collective)),
            vision: None,
        })
    }

    /// Builds the model from an opened (or in-memory) GGUF file.
    pub fn from_gguf(gguf: Arc<GgufFile>) -> Result<LoadedModel> {
        Self::gguf(gguf, None, None, &Device::Cpu)
    }

    fn gguf(gguf: Arc<GgufFile>, isq: Option<DType>, shard: Option<Shard>, device: &Device) -> Result<LoadedModel> {
        let path = gguf.path().to_path_buf();
        let arch = gguf.string("general.architecture")?.to_string();
        registry::check_supported(&arch)?;
        let spec = tokenizer_spec(&gguf)?;
        let tokenizer = Arc::new(Tokenizer::new(spec)?);
        let cfg = ModelConfig::from_gguf(&gguf, tokenizer.vocab_size())?;
        if cfg.vocab_size != tokenizer.vocab_size() {
            return Err(Error::Metadata {
                key: format!("{arch}.vocab_size"),
                what: format!("{} differs from the tokenizer's {} tokens", cfg.vocab_size, tokenizer.vocab_size()),
            });
        }
        let format = weight_format(gguf.tensors().iter().map(|t| (t.dtype, t.dims.len(), t.num_elements())), isq);
        let weights = WeightSource::new(Arc::clone(&gguf), &arch).with_isq(isq).with_shard(shard);
        let template = gguf.opt_string("tokenizer.chat_template")?.map(str::to_string);
        let file = FileParts { path, tokenizer, template, weight_format: format, sampling_defaults: SamplingDefaults::default() };
        Self::assemble(file, &cfg, &weights, isq.is_some(), device)
    }

    /// Plain-text prompt: BOS as the model asks, control tokens in the text recognized.
    pub fn encode_raw(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, true, true)
    }

    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        Ok(self.chat_template.render(messages, true)?)
    }

    /// Renders and tokenizes a conversation, ready for the assistant's turn.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        Ok(kiln_shared::chat::encode_rendered(&self.tokenizer, &self.render_chat(messages)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_formats_are_named_by_element_count() {
        let t = |d, dims, n| (d, dims, n);
        assert_eq!(weight_format([t(DType::Q8_0, 2, 10), t(DType::Q4_1, 2, 90), t(DType::F32, 1, 1000)].into_iter(), None), "Q4_1 (also Q8_0)");
        assert_eq!(weight_format([t(DType::BF16, 2, 5)].into_iter(), Some(DType::Q4K)), "BF16, projections quantized at load to Q4_K");
        assert_eq!(weight_format(std::iter::empty(), None), "none");
    }
}
