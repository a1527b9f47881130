//! Builds the shared tokenizer description from a GGUF file's `tokenizer.ggml.*` metadata.

use super::gguf::GgufFile;
use super::gguf_value::{Array, Value};
use crate::error::{Error, Result};
use kiln_shared::tokenizer::{PreTokenizer, TokenKind, TokenizerModel, TokenizerSpec};

fn array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Option<&'a Array>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err(Error::Metadata { key: key.into(), what: format!("expected an array, found {}", other.type_name()) }),
    }
}

fn token_id(gguf: &GgufFile, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    let Some(id) = gguf.opt_u64(key)? else {
        return Ok(None);
    };
    if id as usize >= vocab_size {
        // llama.cpp ignores out-of-range special ids; so does kiln, rather than refusing the model.
        return Ok(None);
    }
    Ok(Some(id as u32))
}

pub fn tokenizer_spec(gguf: &GgufFile) -> Result<TokenizerSpec> {
    let model_name = gguf.string("tokenizer.ggml.model")?;
    let tokens = match array(gguf, "tokenizer.ggml.tokens")? {
        Some(Array::String(t)) => t.clone(),
        Some(_) => return Err(Error::Metadata { key: "tokenizer.ggml.tokens".into(), what: "expected an array of strings".into() }),
        None => return Err(Error::Metadata { key: "tokenizer.ggml.tokens".into(), what: "missing".into() }),
    };
    let n = tokens.len();
    let kinds = match array(gguf, "tokenizer.ggml.token_type")? {
        None => vec![TokenKind::Normal; n],
        Some(a) => {
            let types = a.to_i64().ok_or_else(|| Error::Metadata {
                key: "tokenizer.ggml.token_type".into(),
                what: "expected an array of integers".into(),
            })?;
            if types.len() < n {
                return Err(Error::Metadata {
                    key: "tokenizer.ggml.token_type".into(),
                    what: format!("has {} entries for {n} tokens", types.len()),
                });
            }
            types[..n].iter().map(|&t| TokenKind::from_gguf(t)).collect()
        }
    };
    let scores = match array(gguf, "tokenizer.ggml.scores")? {
        None => vec![],
        Some(Array::F32(s)) if s.len() >= n => s[..n].to_vec(),
        Some(_) => {
            return Err(Error::Metadata { key: "tokenizer.ggml.scores".into(), what: format!("expected {n} f32 scores") });
        }
    };
    let model = match model_name {
        "gpt2" => {
            let pre_name = gguf.opt_string("tokenizer.ggml.pre")?.unwrap_or("default");
            let pre = PreTokenizer::from_gguf_name(pre_name).ok_or_else(|| {
                Error::UnsupportedTokenizer(format!("pre-tokenizer `{pre_name}` (tokenizer.ggml.pre) is not implemented"))
            })?;
            let merges = match array(gguf, "tokenizer.ggml.merges")? {
                Some(Array::String(m)) => m.clone(),
                _ => return Err(Error::Metadata { key: "tokenizer.ggml.merges".into(), what: "missing or not strings".into() }),
            };
            TokenizerModel::ByteBpe { pre, merges }
        }
        "llama" => {
            if scores.is_empty() {
                return Err(Error::Metadata { key: "tokenizer.ggml.scores".into(), what: "missing".into() });
            }
            TokenizerModel::Spm { add_space_prefix: gguf.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true) }
        }
        other => return Err(Error::UnsupportedTokenizer(format!("tokenizer model `{other}` (kiln supports gpt2 and llama)"))),
    };
    // SentencePiece vocabularies add BOS unless told otherwise; byte-level BPE ones do not.
    let default_add_bos = matches!(model, TokenizerModel::Spm { .. });
    let mut eog_ids = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        eog_ids.extend(token_id(gguf, key, n)?);
    }
    let spec = TokenizerSpec {
        model,
        kinds,
        scores,
        bos_id: token_id(gguf, "tokenizer.ggml.bos_token_id", n)?,
        eos_id: token_id(gguf, "tokenizer.ggml.eos_token_id", n)?,
        eog_ids,
        add_bos: gguf.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos),
        add_eos: gguf.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        tokens,
    };
    Ok(spec)
}
