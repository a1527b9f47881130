//! Sentence embeddings: an encoder (BERT) or a decoder-only model read for its hidden states
//! (Qwen3-Embedding and the like), its tokenizer, and the pooling its sentence-transformers
//! directory describes (`modules.json`; `1_Pooling/config.json`: mean, CLS, max or last
//! token; a `Normalize` module for unit-length vectors; `sentence_bert_config.json`: the
//! longest input).

use crate::error::{Error, Result};
use crate::formats::hf_tokenizer::read_json;
use crate::layers::{Compute, WeightSource};
use crate::models::scratch::Scratch;
use crate::models::Encoder;
use kiln_shared::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How token states become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    LastToken,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::LastToken => "last-token",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolingConfig {
    pub pooling: Pooling,
    pub normalize: bool,
    /// The longest input in tokens (sentence-transformers' `max_seq_length`, else the
    /// model's positions).
    pub max_tokens: usize,
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::ModelSource { name: path.display().to_string(), what: what.into() }
}

/// Reads the sentence-transformers modules of `dir`. A directory without `modules.json` gets
/// mean pooling without normalization, as sentence-transformers gives a plain checkpoint.
pub fn read_pooling(dir: &Path, max_positions: usize) -> Result<PoolingConfig> {
    let modules_path = dir.join("modules.json");
    let mut cfg = PoolingConfig { pooling: Pooling::Mean, normalize: false, max_tokens: max_positions };
    let bert_config = dir.join("sentence_bert_config.json");
    if bert_config.exists() {
        if let Some(n) = read_json(&bert_config)?["max_seq_length"].as_u64() {
            cfg.max_tokens = (n as usize).min(max_positions);
        }
    }
    if !modules_path.exists() {
        return Ok(cfg);
    }
    let modules = read_json(&modules_path)?;
    let modules = modules.as_array().ok_or_else(|| bad(&modules_path, "expected an array of modules"))?;
    for m in modules {
        let kind = m["type"].as_str().unwrap_or_default();
        match kind.rsplit('.').next().unwrap_or_default() {
            "Transformer" => {}
            "Normalize" => cfg.normalize = true,
            "Pooling" => {
                let path = dir.join(m["path"].as_str().unwrap_or_default()).join("config.json");
                let p = read_json(&path)?;
                let on = |key: &str| p[key].as_bool() == Some(true);
                let modes: Vec<Pooling> = [
                    ("pooling_mode_mean_tokens", Pooling::Mean),
                    ("pooling_mode_cls_token", Pooling::Cls),
                    ("pooling_mode_max_tokens", Pooling::Max),
                    ("pooling_mode_lasttoken", Pooling::LastToken),
                ]
                .into_iter()
                .filter(|(k, _)| on(k))
                .map(|(_, m)| m)
                .collect();
                for unsupported in ["pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens"] {
                    if on(unsupported) {
                        return Err(bad(&path, format!("`{unsupported}` is not supported (mean, cls, max, last token)")));
                    }
                }
                cfg.pooling = match modes.as_slice() {
                    [one] => *one,
                    [] => return Err(bad(&path, "names no pooling mode")),
                    _ => return Err(bad(&path, "combines several pooling modes; kiln pools one way")),
                };
            }
            "Dense" => return Err(bad(&modules_path, "a Dense module after pooling is not supported")),
            _ => return Err(bad(&modules_path, format!("module `{kind}` is not supported (Transformer, Pooling, Normalize)"))),
        }
    }
    Ok(cfg)
}

/// Pools one sequence's token states (`[len, hidden]`) into `out` (`[hidden]`).
pub fn pool(pooling: Pooling, normalize: bool, states: &[f32], hidden: usize, out: &mut [f32]) {
    let rows = states.len() / hidden;
    match pooling {
        Pooling::Cls => out.copy_from_slice(&states[..hidden]),
        Pooling::LastToken => out.copy_from_slice(&states[(rows - 1) * hidden..rows * hidden]),
        Pooling::Max => {
            out.fill(f32::NEG_INFINITY);
            for row in states.chunks_exact(hidden) {
                out.iter_mut().zip(row).for_each(|(o, &v)| *o = o.max(v));
            }
        }
        Pooling::Mean => {
            out.fill(0.0);
            for row in states.chunks_exact(hidden) {
                out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= rows as f32);
        }
    }
    if normalize {
        // As torch's F.normalize: divide by the norm, at least 1e-12.
        let norm = out.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt().max(1e-12) as f32;
        out.iter_mut().for_each(|v| *v /= norm);
    }
}

/// Most tokens one encoder pass computes (an input longer than this runs alone). Measured on
/// all-MiniLM-L6-v2, 2 threads, 64 inputs of 128 tokens: 31.6 sentences/s in passes of 512
/// tokens, 31.0 of 1024, 25.9 of 2048 and 28.6 in one pass of 8192, whose activations no
/// longer stay in the caches.
pub const PASS_TOKENS: usize = 512;

pub struct Embedder {
    pub path: PathBuf,
    pub name: String,
    pub architecture: String,
    pub encoder: Box<dyn Encoder>,
    pub tokenizer: Arc<Tokenizer>,
    pub pooling: PoolingConfig,
    pub weight_format: String,
}

/// The encoder architectures kiln runs, by `model_type`.
pub const ENCODERS: &[&str] = &["bert"];

/// Whether a checkpoint's `config.json` names an encoder, which cannot generate text.
pub fn is_encoder(config: &serde_json::Value) -> bool {
    config["model_type"].as_str().is_some_and(|t| ENCODERS.contains(&t))
}

/// Whether `dir` holds an encoder checkpoint.
pub fn is_encoder_dir(dir: &Path) -> bool {
    read_json(&dir.join("config.json")).is_ok_and(|config| is_encoder(&config))
}

/// Whether `dir` holds an embedding model: an encoder, or any checkpoint whose
/// sentence-transformers modules pool its hidden states.
pub fn is_embedding_dir(dir: &Path) -> bool {
    if is_encoder_dir(dir) {
        return true;
    }
    let Ok(modules) = read_json(&dir.join("modules.json")) else { return false };
    modules.as_array().is_some_and(|m| m.iter().any(|m| m["type"].as_str().is_some_and(|t| t.ends_with(".Pooling"))))
}

/// A decoder-only model read as an encoder: each sequence runs alone from an empty cache,
/// attending causally, and gives its final-normed hidden states.
struct DecoderStates {
    model: Arc<crate::loader::LoadedModel>,
}

impl Encoder for DecoderStates {
    fn hidden_size(&self) -> usize {
        self.model.model.config().hidden_size
    }

    fn max_positions(&self) -> usize {
        self.model.model.config().max_context_len
    }

    fn forward(&self, compute: &Compute, seqs: &[&[u32]], scratch: &mut Scratch, out: &mut Vec<f32>) -> Result<()> {
        use crate::models::batch::{Batch, Logits};
        const BLOCK: usize = 16;
        let cfg = self.model.model.config();
        let groups = crate::kv_cache::group_layouts(cfg).len();
        out.clear();
        let mut states = Vec::new();
        for seq in seqs {
            if seq.len() > cfg.max_context_len {
                return Err(Error::InvalidRequest(format!("{} tokens; the model has positions for {}", seq.len(), cfg.max_context_len)));
            }
            let blocks = seq.len().div_ceil(BLOCK);
            let mut kv = self.model.model.kv_cache(BLOCK, &vec![blocks; groups])?;
            let mut batch = Batch::new(BLOCK);
            batch.push_seq(seq, 0, vec![(0..blocks as u32).collect(); groups], Logits::All);
            self.model.model.run(compute, &batch, &mut kv, scratch, crate::models::Output::Hidden, &mut states)?;
            out.extend_from_slice(&states);
        }
        Ok(())
    }
}

impl Embedder {
    /// Loads a Hugging Face directory holding an encoder, or a decoder with
    /// sentence-transformers modules, and its pooling.
    pub fn load(dir: &Path) -> Result<Embedder> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let model_type = config["model_type"].as_str().unwrap_or_default().to_string();
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        if !is_encoder(&config) {
            if !is_embedding_dir(dir) {
                return Err(Error::InvalidRequest(format!(
                    "{} is not an embedding model: an encoder ({}) or a checkpoint with sentence-transformers pooling (modules.json)",
                    dir.display(),
                    ENCODERS.join(", ")
                )));
            }
            let model = Arc::new(crate::loader::LoadedModel::load(dir)?);
            let cfg = model.model.config();
            let pooling = read_pooling(dir, cfg.max_context_len)?;
            return Ok(Embedder {
                path: dir.to_path_buf(),
                name,
                architecture: if model_type.is_empty() { cfg.architecture.clone() } else { model_type },
                tokenizer: Arc::clone(&model.tokenizer),
                weight_format: model.weight_format.clone(),
                encoder: Box::new(DecoderStates { model }),
                pooling,
            });
        }
        let cfg = crate::models::bert::BertConfig::from_hf(&config)?;
        let (tokenizer, _) = crate::formats::hf_tokenizer::load(dir)?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Metadata { key: "config.json: vocab_size".into(), what: format!("{} is smaller than the tokenizer's {} tokens", cfg.vocab_size, tokenizer.vocab_size()) });
        }
        let checkpoint = Arc::new(crate::formats::safetensors::Checkpoint::open_dir(dir)?);
        let weight_format = crate::loader::weight_format(checkpoint.names().filter_map(|n| checkpoint.tensor(n)).map(|(t, _)| (t.dtype, t.dims.len(), t.num_elements())), None);
        let weights = WeightSource::from_checkpoint(checkpoint, &model_type);
        let encoder = crate::models::bert::load(&cfg, &weights)?;
        let unused: Vec<String> = weights.unused().into_iter().filter(|n| !n.contains("pooler.") && !n.ends_with("position_ids")).collect();
        if !unused.is_empty() {
            tracing::warn!("{} tensors were not used: {}", unused.len(), unused.join(", "));
        }
        let pooling = read_pooling(dir, cfg.max_positions)?;
        Ok(Embedder { path: dir.to_path_buf(), name, architecture: model_type, encoder: Box::new(encoder), tokenizer: Arc::new(tokenizer), pooling, weight_format })
    }

    pub fn dimensions(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// Token ids of `text` as the model reads it (with its special tokens), cut to the
    /// longest input when `truncate`, else refused past it.
    pub fn encode(&self, text: &str, truncate: bool) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, true, true);
        self.fit(&mut ids, truncate)?;
        Ok(ids)
    }

    /// Checks (or, with `truncate`, cuts) a tokenized input against the longest input. A cut
    /// keeps the closing special token where the tokenizer adds one, as sentence-transformers
    /// does.
    pub fn fit(&self, ids: &mut Vec<u32>, truncate: bool) -> Result<()> {
        let max = self.pooling.max_tokens;
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the input is empty".into()));
        }
        if ids.len() <= max {
            return Ok(());
        }
        if !truncate {
            return Err(Error::PromptTooLong { prompt_tokens: ids.len(), context_len: max });
        }
        let last = ids[ids.len() - 1];
        ids.truncate(max);
        if self.tokenizer.token_kind(last).is_some_and(|k| k.is_control()) {
            ids[max - 1] = last;
        }
        Ok(())
    }

    /// One vector per input, computed together; each equals what it would be alone.
    pub fn embed(&self, compute: &Compute, inputs: &[&[u32]], scratch: &mut Scratch) -> Result<Vec<Vec<f32>>> {
        for (i, ids) in inputs.iter().enumerate() {
            if ids.is_empty() || ids.len() > self.pooling.max_tokens {
                return Err(Error::InvalidRequest(format!("input {i} has {} tokens; 1 to {} fit", ids.len(), self.pooling.max_tokens)));
            }
        }
        let hidden = self.encoder.hidden_size();
        let mut states = Vec::new();
        let mut out = Vec::with_capacity(inputs.len());
        // Passes of at most PASS_TOKENS tokens keep a pass's activations in cache; each
        // sequence's result is the same whichever pass it is in.
        let mut start = 0;
        while start < inputs.len() {
            let mut end = start + 1;
            let mut tokens = inputs[start].len();
            while end < inputs.len() && tokens + inputs[end].len() <= PASS_TOKENS {
                tokens += inputs[end].len();
                end += 1;
            }
            self.encoder.forward(compute, &inputs[start..end], scratch, &mut states)?;
            let mut at = 0;
            for ids in &inputs[start..end] {
                let rows = &states[at * hidden..(at + ids.len()) * hidden];
                at += ids.len();
                let mut v = vec![0.0; hidden];
                pool(self.pooling.pooling, self.pooling.normalize, rows, hidden, &mut v);
                out.push(v);
            }
            start = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes() {
        let states = [1.0, -2.0, 3.0, 4.0, 5.0, 0.0];
        let mut out = [0.0; 2];
        pool(Pooling::Mean, false, &states, 2, &mut out);
        assert_eq!(out, [3.0, 2.0 / 3.0]);
        pool(Pooling::Cls, false, &states, 2, &mut out);
        assert_eq!(out, [1.0, -2.0]);
        pool(Pooling::LastToken, false, &states, 2, &mut out);
        assert_eq!(out, [5.0, 0.0]);
        pool(Pooling::Max, true, &states, 2, &mut out);
        let n = (25.0f32 + 16.0).sqrt();
        assert_eq!(out, [5.0 / n, 4.0 / n]);
    }

    #[test]
    fn sentence_transformers_modules_are_read() {
        let dir = std::env::temp_dir().join(format!("kiln-pooling-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        let modules = r#"[{"type": "sentence_transformers.models.Transformer", "path": ""},
            {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"},
            {"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"}]"#;
        std::fs::write(dir.join("modules.json"), modules).unwrap();
        std::fs::write(dir.join("1_Pooling/config.json"), r#"{"pooling_mode_lasttoken": true}"#).unwrap();
        std::fs::write(dir.join("sentence_bert_config.json"), r#"{"max_seq_length": 256}"#).unwrap();
        assert_eq!(read_pooling(&dir, 512).unwrap(), PoolingConfig { pooling: Pooling::LastToken, normalize: true, max_tokens: 256 });
        std::fs::write(dir.join("1_Pooling/config.json"), r#"{"pooling_mode_mean_sqrt_len_tokens": true}"#).unwrap();
        assert!(read_pooling(&dir, 512).unwrap_err().to_string().contains("pooling_mode_mean_sqrt_len_tokens"));
        std::fs::write(dir.join("modules.json"), r#"[{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]"#).unwrap();
        assert!(read_pooling(&dir, 512).unwrap_err().to_string().contains("Dense"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_pooling(&dir, 512).unwrap(), PoolingConfig { pooling: Pooling::Mean, normalize: false, max_tokens: 512 });
    }
}
