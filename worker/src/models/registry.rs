//! Architecture name (GGUF `general.architecture`) to constructor.

use super::config::ModelConfig;
use super::CausalLm;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::layers::WeightSource;

type Constructor = fn(&ModelConfig, &WeightSource, &Device) -> Result<Box<dyn CausalLm>>;

const ARCHITECTURES: &[(&str, Constructor)] =
    &[
        ("llama", super::llama::load),
        ("qwen2", super::llama::load),
        ("qwen3", super::llama::load),
        ("qwen3moe", super::llama::load),
        ("phi3", super::llama::load),
        ("gemma2", super::gemma3::load),
        ("gemma3", super::gemma3::load),
    ];

pub fn supported() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|(name, _)| *name).collect()
}

pub fn check_supported(arch: &str) -> Result<()> {
    if ARCHITECTURES.iter().any(|(name, _)| *name == arch) {
        Ok(())
    } else {
        Err(Error::UnsupportedArchitecture { found: arch.to_string(), supported: supported().join(", ") })
    }
}

/// Builds the model on `device`; tensors the architecture did not use are returned for a
/// warning.
pub fn build(cfg: &ModelConfig, weights: &WeightSource, device: &Device) -> Result<(Box<dyn CausalLm>, Vec<String>)> {
    check_supported(&cfg.architecture)?;
    let (_, construct) = ARCHITECTURES.iter().find(|(name, _)| *name == cfg.architecture).expect("checked above");
    let model = construct(cfg, weights, device)?;
    Ok((model, weights.unused()))
}
