//! Loading a model file into a ready-to-run model, tokenizer and chat template.

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::gguf_vocab::tokenizer_spec;
use crate::layers::WeightSource;
use crate::models::config::ModelConfig;
use crate::models::{registry, CausalLm};
use kiln_shared::chat::{builtin_template, ChatMessage, ChatTemplate};
use kiln_shared::tokenizer::Tokenizer;
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
}

impl LoadedModel {
    /// Loads a GGUF file, or a Hugging Face model directory.
    pub fn load(path: &Path) -> Result<LoadedModel> {
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        Self::from_gguf(Arc::new(GgufFile::open(path)?))
    }

    /// Builds the model from a Hugging Face directory: config.json, safetensors weights
    /// (one file or shards), tokenizer.json with tokenizer_config.json.
    pub fn from_hf_dir(dir: &Path) -> Result<LoadedModel> {
        let config = crate::formats::hf_tokenizer::read_json(&dir.join("config.json"))?;
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        let cfg = crate::models::hf_config::from_hf(&config, &name)?;
        let (spec, template) = crate::formats::hf_tokenizer::load(dir)?;
        let tokenizer = Arc::new(Tokenizer::new(spec)?);
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Metadata {
                key: "config.json: vocab_size".into(),
                what: format!("{} is smaller than the tokenizer's {} tokens", cfg.vocab_size, tokenizer.vocab_size()),
            });
        }
        let checkpoint = Arc::new(crate::formats::safetensors::Checkpoint::open_dir(dir)?);
        let weights = WeightSource::from_checkpoint(checkpoint, &cfg.architecture);
        let (model, unused_tensors) = registry::build(&cfg, &weights)?;
        let (source, builtin) = match template {
            Some(t) => (t, false),
            None => (builtin_template(&cfg.architecture).to_string(), true),
        };
        let chat_template = ChatTemplate::new(&source, tokenizer.bos_text().unwrap_or(""), tokenizer.eos_text().unwrap_or(""))?;
        Ok(LoadedModel {
            path: dir.to_path_buf(),
            model,
            tokenizer,
            chat_template,
            chat_template_source: source,
            chat_template_builtin: builtin,
            unused_tensors,
        })
    }

    /// Builds the model from an opened (or in-memory) GGUF file.
    pub fn from_gguf(gguf: Arc<GgufFile>) -> Result<LoadedModel> {
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
        let weights = WeightSource::new(Arc::clone(&gguf), &arch);
        let (model, unused_tensors) = registry::build(&cfg, &weights)?;
        let (source, builtin) = match gguf.opt_string("tokenizer.chat_template")? {
            Some(t) => (t.to_string(), false),
            None => (builtin_template(&arch).to_string(), true),
        };
        let chat_template = ChatTemplate::new(&source, tokenizer.bos_text().unwrap_or(""), tokenizer.eos_text().unwrap_or(""))?;
        Ok(LoadedModel {
            path,
            model,
            tokenizer,
            chat_template,
            chat_template_source: source,
            chat_template_builtin: builtin,
            unused_tensors,
        })
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
