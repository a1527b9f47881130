//! A Hugging Face `tokenizer.json` (byte-level BPE) with `tokenizer_config.json` and
//! `generation_config.json`, as the same `TokenizerSpec` GGUF files give: vocabulary, merges,
//! token kinds, BOS/EOS and end-of-generation ids, and the chat template. Tokenizers kiln
//! cannot reproduce exactly are refused by name rather than approximated.

use crate::error::{Error, Result};
use kiln_shared::tokenizer::pretokenize::{LLAMA3_PATTERN, QWEN2_PATTERN};
use kiln_shared::tokenizer::{PreTokenizer, TokenKind, TokenizerModel, TokenizerSpec};
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
    Err(bad(format!("pre-tokenizer {p} is not supported yet (kiln has the GPT-2, digits-then-GPT-2, Llama 3 and Qwen 2 splitters)")))
}

/// A token named in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// Reads the tokenizer files of a model directory; returns the spec and the chat template.
pub fn load(dir: &Path) -> Result<(TokenizerSpec, Option<String>)> {
    let tj = read_json(&dir.join("tokenizer.json"))?;
    let config_path = dir.join("tokenizer_config.json");
    let tc = if config_path.exists() { read_json(&config_path)? } else { Value::Null };
    let gen_path = dir.join("generation_config.json");
    let gc = if gen_path.exists() { read_json(&gen_path)? } else { Value::Null };
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!("model type {} is not supported for generation (BPE)", model["type"])));
    }
    if model["byte_fallback"] == true || !tj["normalizer"].is_null() {
        return Err(bad("SentencePiece-style BPE (byte fallback, normalizer) is not supported from tokenizer.json yet"));
    }
    let pre = pre_tokenizer(&tj["pre_tokenizer"])?;
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("model.vocab is missing"))?;
    let mut entries: Vec<(u32, String)> = Vec::with_capacity(vocab.len());
    for (text, id) in vocab {
        let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| bad(format!("vocab entry `{text}` has a bad id")))?;
        entries.push((id, text.clone()));
    }
    let mut kinds_of_added = Vec::new();
    for t in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (t["id"].as_u64().and_then(|i| u32::try_from(i).ok()), t["content"].as_str()) else {
            return Err(bad(format!("added token {t} lacks an id or content")));
        };
        if !entries.iter().any(|(i, _)| *i == id) {
            entries.push((id, text.to_string()));
        }
        kinds_of_added.push((id, if t["special"] == true { TokenKind::Control } else { TokenKind::UserDefined }));
    }
    entries.sort();
    let n = entries.len();
    if let Some((pos, (id, _))) = entries.iter().enumerate().find(|(pos, (id, _))| *id as usize != *pos) {
        return Err(bad(format!("token ids are not contiguous: id {id} at position {pos} of {n}")));
    }
    let tokens: Vec<String> = entries.into_iter().map(|(_, t)| t).collect();
    let mut kinds = vec![TokenKind::Normal; n];
    for (id, kind) in kinds_of_added {
        kinds[id as usize] = kind;
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
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let named = |key: &str| -> Result<Option<u32>> {
        match token_text(&tc[key]) {
            None => Ok(None),
            Some(text) => id_of(text).map(Some).ok_or_else(|| bad(format!("tokenizer_config.json {key} `{text}` is not in the vocabulary"))),
        }
    };
    let bos_id = named("bos_token")?;
    let eos_id = named("eos_token")?;
    let mut eog_ids: Vec<u32> = eos_id.into_iter().collect();
    match &gc["eos_token_id"] {
        Value::Number(x) => eog_ids.extend(x.as_u64().map(|i| i as u32)),
        Value::Array(xs) => eog_ids.extend(xs.iter().filter_map(|x| x.as_u64().map(|i| i as u32))),
        _ => {}
    }
    eog_ids.sort();
    eog_ids.dedup();
    let spec = TokenizerSpec {
        model: TokenizerModel::ByteBpe { pre, merges },
        tokens,
        kinds,
        scores: Vec::new(),
        bos_id,
        eos_id,
        eog_ids,
        add_bos: tc["add_bos_token"].as_bool().unwrap_or(false),
        add_eos: tc["add_eos_token"].as_bool().unwrap_or(false),
    };
    let template = match &tc["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string),
        _ => None,
    };
    Ok((spec, template))
}
