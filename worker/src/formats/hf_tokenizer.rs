//! A Hugging Face model's tokenizer files: `tokenizer.json` (run by the `tokenizers` crate)
//! with `tokenizer_config.json` and `generation_config.json` (BOS, EOS and end-of-generation
//! ids, the chat template); and the GGUF vocabulary llama.cpp reads for the same tokenizer.

use crate::error::{Error, Result};
use kiln_shared::tokenizer::pretokenize::{LLAMA3_PATTERN, QWEN2_PATTERN};
use kiln_shared::tokenizer::{HfSpecials, PreTokenizer, Tokenizer, TokenizerError};
use serde_json::Value;
use std::path::Path;

fn bad(what: impl Into<String>) -> Error {
    Error::UnsupportedTokenizer(format!("tokenizer.json: {}", what.into()))
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::ModelSource { name: path.display().to_string(), what: format!("not valid JSON: {e}") })
}

/// The splitter a `pre_tokenizer` entry describes, if kiln has it.
fn pre_tokenizer(p: &Value) -> Result<PreTokenizer> {
    let byte_level_with_regex = |p: &Value| p["type"] == "ByteLevel" && p["use_regex"].as_bool() != Some(false) && p["add_prefix_space"].as_bool() != Some(true);
    if byte_level_with_regex(p) {
        return Ok(PreTokenizer::Gpt2);
    }
    if p["type"] == "Sequence" {
        let items: Vec<&Value> = p["pretokenizers"].as_array().into_iter().flatten().collect();
        if let [first, level] = items.as_slice() {
            if first["type"] == "Digits" && first["individual_digits"] == true && byte_level_with_regex(level) {
                return Ok(PreTokenizer::DigitsThenGpt2);
            }
            // A regex split, then byte-level mapping without its own regex (Llama 3, Qwen).
            let byte_level_plain = level["type"] == "ByteLevel" && level["use_regex"] == false && level["add_prefix_space"] != true;
            let isolated = first["type"] == "Split" && first["behavior"] == "Isolated" && first["invert"] != true;
            match first["pattern"]["Regex"].as_str() {
                Some(LLAMA3_PATTERN) if isolated && byte_level_plain => return Ok(PreTokenizer::Llama3),
                Some(QWEN2_PATTERN) if isolated && byte_level_plain => return Ok(PreTokenizer::Qwen2),
                _ => {}
            }
        }
    }
    Err(bad(format!("pre-tokenizer {p} has no GGUF form (llama.cpp's GPT-2, digits-then-GPT-2, Llama 3 and Qwen 2 splitters have)")))
}

/// A token named in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// The tokenizer of a model directory: `tokenizer.json` run by the `tokenizers` crate, with
/// the special tokens of `tokenizer_config.json` and `generation_config.json`; and the chat
/// template (`chat_template.jinja`, else the one in `tokenizer_config.json`).
pub fn load(dir: &Path) -> Result<(Tokenizer, Option<String>)> {
    let path = dir.join("tokenizer.json");
    let json = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let config_path = dir.join("tokenizer_config.json");
    let tc = if config_path.exists() { read_json(&config_path)? } else { Value::Null };
    let gen_path = dir.join("generation_config.json");
    let gc = if gen_path.exists() { read_json(&gen_path)? } else { Value::Null };
    let eos_ids = match &gc["eos_token_id"] {
        Value::Number(x) => x.as_u64().and_then(|i| u32::try_from(i).ok()).into_iter().collect(),
        Value::Array(xs) => xs.iter().filter_map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok())).collect(),
        _ => Vec::new(),
    };
    let specials = HfSpecials { bos: token_text(&tc["bos_token"]).map(str::to_string), eos: token_text(&tc["eos_token"]).map(str::to_string), eos_ids };
    let tokenizer = Tokenizer::from_hf_json(json, &specials).map_err(|e| match e {
        TokenizerError::Invalid(what) => bad(what),
        // Only generation_config.json names end-of-generation ids.
        TokenizerError::SpecialOutOfRange { id, vocab_size, .. } => {
            Error::UnsupportedTokenizer(format!("generation_config.json: eos_token_id {id} is outside the vocabulary of {vocab_size}"))
        }
        other => Error::Tokenizer(other),
    })?;
    let template_file = dir.join("chat_template.jinja");
    let template = if template_file.exists() {
        Some(std::fs::read_to_string(&template_file).map_err(|source| Error::Io { path: template_file.clone(), source })?)
    } else {
        match &tc["chat_template"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(named) => named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string),
            _ => None,
        }
    };
    Ok((tokenizer, template))
}

/// The vocabulary as llama.cpp reads it from GGUF.
pub enum GgufVocab {
    /// `gpt2`: byte-level BPE with ranked merges and a named pre-tokenizer.
    Gpt2 { pre: PreTokenizer, merges: Vec<String> },
    /// `llama`: SentencePiece-style BPE (`▁` for spaces, `<0xXX>` byte fallback), merged by
    /// score.
    Llama { scores: Vec<f32>, add_space_prefix: bool },
}

/// How `tokenizer.json` is written to GGUF, or why it cannot be.
pub fn gguf_vocab(json: &str, tokenizer: &Tokenizer) -> Result<GgufVocab> {
    let tj: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!("a {} model has no GGUF form llama.cpp reads the same way (BPE only)", model["type"])));
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is missing"))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => Ok(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""))),
            other => Err(bad(format!("merge {other} is neither \"a b\" nor [a, b]"))),
        })
        .collect::<Result<Vec<_>>>()?;
    if model["byte_fallback"] != true {
        if !tj["normalizer"].is_null() {
            return Err(bad(format!("byte-level BPE with normalizer {} has no GGUF form", tj["normalizer"])));
        }
        return Ok(GgufVocab::Gpt2 { pre: pre_tokenizer(&tj["pre_tokenizer"])?, merges });
    }
    Ok(GgufVocab::Llama { scores: merge_scores(&merges, tokenizer)?, add_space_prefix: sentencepiece_space_prefix(&tj)? })
}

/// Scores under which llama.cpp's SentencePiece merging (best-scoring pair first) reproduces
/// the BPE merge order: the earlier the merge that makes a token, the higher its score.
/// Tokens no merge makes (characters, bytes, specials) are never a merge result, so their
/// score only has to stay below every merge's.
fn merge_scores(merges: &[String], tokenizer: &Tokenizer) -> Result<Vec<f32>> {
    let n = tokenizer.vocab_size();
    let floor = -(merges.len() as f32) - 1.0;
    let mut scores = vec![floor; n];
    for (rank, merge) in merges.iter().enumerate().rev() {
        let (a, b) = merge.split_once(' ').ok_or_else(|| bad(format!("merge `{merge}` is not two tokens")))?;
        if let Some(id) = tokenizer.token_id(&format!("{a}{b}")) {
            scores[id as usize] = -(rank as f32);
        }
    }
    Ok(scores)
}

/// Whether a SentencePiece-style tokenizer.json prefixes text with `▁` (a `Prepend` normalizer
/// or a Metaspace pre-tokenizer that prepends), checking that it is of the shape llama.cpp's
/// `llama` vocabulary reproduces: spaces become `▁`, and nothing else is normalized.
fn sentencepiece_space_prefix(tj: &Value) -> Result<bool> {
    let norm = &tj["normalizer"];
    let steps: Vec<&Value> = match norm["type"].as_str() {
        None => Vec::new(),
        Some("Sequence") => norm["normalizers"].as_array().into_iter().flatten().collect(),
        Some(_) => vec![norm],
    };
    let mut prefix = false;
    let mut spaces = false;
    for step in steps {
        match step["type"].as_str() {
            Some("Prepend") if step["prepend"] == "▁" => prefix = true,
            Some("Replace") if step["pattern"]["String"] == " " && step["content"] == "▁" => spaces = true,
            _ => return Err(bad(format!("normalizer step {step} has no GGUF form"))),
        }
    }
    let pre = &tj["pre_tokenizer"];
    if pre["type"] == "Metaspace" {
        spaces = true;
        prefix |= pre["prepend_scheme"] != "never" && pre["add_prefix_space"] != false;
    } else if !pre.is_null() {
        return Err(bad(format!("pre-tokenizer {pre} has no GGUF form for a SentencePiece-style vocabulary")));
    }
    if !spaces {
        return Err(bad("byte-fallback BPE that does not write spaces as `▁` has no GGUF form"));
    }
    Ok(prefix)
}
