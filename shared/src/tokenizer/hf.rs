//! Hugging Face `tokenizer.json` files, run by the `tokenizers` crate: the reference
//! implementation of the format, so every model type (BPE, WordPiece, Unigram, WordLevel),
//! normalizer, pre-tokenizer, post-processor, decoder and added-token rule behaves as it does
//! in Python. kiln's own tokenizers stay for GGUF vocabularies, where llama.cpp is the
//! reference.

use super::{TokenKind, TokenizerError};
use serde_json::Value;
use std::sync::OnceLock;

pub(super) struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens treated as plain text (`parse_special` off),
    /// made on first use: most callers never need it.
    literal: OnceLock<tokenizers::Tokenizer>,
    /// The decoder maps bytes to printable characters (GPT-2 byte level).
    byte_level: bool,
    /// `<0xXX>` tokens stand for single bytes (SentencePiece-style byte fallback).
    byte_fallback: bool,
    /// The model's unknown token.
    unknown: Option<String>,
}

/// True when `v` (a decoder or pre-tokenizer entry) is, or contains, one of type `ty`.
fn has_component(v: &Value, ty: &str) -> bool {
    if v["type"] == ty {
        return true;
    }
    ["decoders", "pretokenizers"].iter().any(|key| v[key].as_array().is_some_and(|items| items.iter().any(|i| has_component(i, ty))))
}

/// Component types the tokenizers library has, per part of the pipeline, and the key under
/// which a `Sequence` of that part lists its steps.
const COMPONENTS: [(&str, &str, &[&str]); 5] = [
    ("model", "", &["BPE", "WordPiece", "WordLevel", "Unigram"]),
    (
        "normalizer",
        "normalizers",
        &["BertNormalizer", "Strip", "StripAccents", "NFC", "NFD", "NFKC", "NFKD", "Sequence", "Lowercase", "Nmt", "Precompiled", "Replace", "Prepend", "ByteLevel"],
    ),
    (
        "pre_tokenizer",
        "pretokenizers",
        &[
            "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Metaspace", "Whitespace", "Sequence", "Split", "Punctuation", "WhitespaceSplit",
            "Digits", "UnicodeScripts", "FixedLength",
        ],
    ),
    ("post_processor", "processors", &["RobertaProcessing", "BertProcessing", "ByteLevel", "TemplateProcessing", "Sequence"]),
    ("decoder", "decoders", &["BPEDecoder", "ByteLevel", "WordPiece", "Metaspace", "CTC", "Sequence", "Replace", "Fuse", "Strip", "ByteFallback"]),
];

/// Names an unknown component type (the library's own error names only an untagged enum).
fn check_components(raw: &Value) -> Result<(), TokenizerError> {
    fn walk(part: &str, v: &Value, steps: &str, known: &[&str]) -> Result<(), TokenizerError> {
        if v.is_null() {
            return Ok(());
        }
        match v["type"].as_str() {
            // Files written by old versions may leave the type out; the library infers it.
            None => Ok(()),
            Some(t) if known.contains(&t) => {
                v[steps].as_array().into_iter().flatten().try_for_each(|step| walk(part, step, steps, known))
            }
            Some(t) => Err(TokenizerError::Invalid(format!("{part} type `{t}` is not one the tokenizers library has ({})", known.join(", ")))),
        }
    }
    COMPONENTS.iter().try_for_each(|(part, steps, known)| walk(part, &raw[*part], steps, known))
}

impl HfTokenizer {
    pub(super) fn parse(json: &str) -> Result<HfTokenizer, TokenizerError> {
        let raw: Value = serde_json::from_str(json).map_err(|e| TokenizerError::Invalid(format!("not valid JSON: {e}")))?;
        check_components(&raw)?;
        let mut inner: tokenizers::Tokenizer = json.parse().map_err(|e| TokenizerError::Invalid(format!("not a tokenizer the tokenizers library reads: {e}")))?;
        // Files saved for training carry padding and truncation; transformers turns both off
        // unless a call asks for them, and kiln never does.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        let model = &raw["model"];
        let unknown = match model["unk_token"].as_str() {
            Some(t) => Some(t.to_string()),
            None => model["unk_id"].as_u64().and_then(|id| u32::try_from(id).ok()).and_then(|id| inner.id_to_token(id)),
        };
        Ok(HfTokenizer {
            unknown,
            inner,
            literal: OnceLock::new(),
            byte_level: has_component(&raw["decoder"], "ByteLevel"),
            byte_fallback: raw["model"]["byte_fallback"] == true,
        })
    }

    /// Token texts by id (holes in the id space are empty) and their kinds.
    pub(super) fn vocabulary(&self) -> (Vec<String>, Vec<TokenKind>) {
        let added = self.inner.get_added_tokens_decoder();
        let n = self.inner.get_vocab_size(true).max(added.keys().map(|&id| id as usize + 1).max().unwrap_or(0));
        let mut tokens = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let text = self.inner.id_to_token(id).unwrap_or_default();
            let kind = match added.get(&id) {
                Some(t) if t.special => TokenKind::Control,
                Some(_) => TokenKind::UserDefined,
                None if text.is_empty() => TokenKind::Unused,
                None if self.unknown.as_deref() == Some(text.as_str()) => TokenKind::Unknown,
                None if self.byte_fallback && super::parse_byte_token(&text).is_some() => TokenKind::Byte,
                None => TokenKind::Normal,
            };
            tokens.push(text);
            kinds.push(kind);
        }
        (tokens, kinds)
    }

    pub(super) fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let tokenizer = if parse_special {
            &self.inner
        } else {
            self.literal.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            })
        };
        // Encoding only fails on truncation settings, which are cleared when the file is read.
        tokenizer.encode_fast(text, add_special).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }

    /// Decodes through the file's decoder; `render_special` keeps special tokens' text.
    pub(super) fn decode(&self, ids: &[u32], render_special: bool) -> String {
        self.inner.decode(ids, !render_special).unwrap_or_default()
    }

    /// Whether a token's first byte continues a character begun by an earlier token (byte
    /// tokens and byte-level pieces can split a character; other tokens hold whole ones).
    pub(super) fn continues_character(&self, text: &str, kind: TokenKind, char_to_byte: &std::collections::HashMap<char, u8>) -> bool {
        let first = if self.byte_level {
            text.chars().next().and_then(|c| char_to_byte.get(&c).copied())
        } else if self.byte_fallback && kind == TokenKind::Byte {
            super::parse_byte_token(text)
        } else {
            None
        };
        first.is_some_and(|b| b & 0xC0 == 0x80)
    }

    /// The bytes an ordinary token contributes in the middle of a text (leading-space rules
    /// that apply only at the start of a text are not applied). Byte-fallback tokens are
    /// `TokenKind::Byte` and never come here.
    pub(super) fn token_bytes(&self, id: u32, text: &str, char_to_byte: &std::collections::HashMap<char, u8>) -> Vec<u8> {
        if self.byte_level {
            return text.chars().flat_map(|c| char_to_byte.get(&c).map_or_else(|| c.to_string().into_bytes(), |&b| vec![b])).collect();
        }
        // What the token adds after a copy of itself: the text-start rules (a stripped
        // leading space) apply to the first copy only.
        let once = self.decode(&[id], true);
        let twice = self.decode(&[id, id], true);
        match twice.strip_prefix(once.as_str()) {
            Some(rest) => rest.as_bytes().to_vec(),
            None => once.into_bytes(),
        }
    }
}
