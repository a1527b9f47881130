//! BERT's WordPiece tokenizer as a Hugging Face `tokenizer.json` describes it (BertNormalizer,
//! BertPreTokenizer, WordPiece model, `[CLS] … [SEP]` template): special tokens are cut out
//! of the raw text first; each remaining piece is cleaned (control characters dropped,
//! whitespace made plain spaces), CJK ideographs are isolated, accents stripped and case
//! folded as configured, then split on whitespace and punctuation, and each word is covered
//! greedily by the longest vocabulary entries (`##` marking continuations), or becomes
//! `[UNK]` when it cannot be.

use super::TokenizerError;
use serde_json::Value;
use std::collections::HashMap;
use unicode_general_category::{get_general_category, GeneralCategory as G};
use unicode_normalization::UnicodeNormalization;

#[derive(Clone, Debug)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    unk_id: u32,
    prefix: String,
    max_chars: usize,
    clean_text: bool,
    chinese_chars: bool,
    strip_accents: bool,
    lowercase: bool,
    /// Added tokens matched verbatim in raw text, longest first.
    specials: Vec<(String, u32)>,
    /// Ids placed around a sequence by the post-processor.
    before: Vec<u32>,
    after: Vec<u32>,
}

fn err(what: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid(what.into())
}

fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r')
        && matches!(get_general_category(c), G::Control | G::Format | G::Surrogate | G::PrivateUse | G::Unassigned)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F | 0x2B920..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            get_general_category(c),
            G::ConnectorPunctuation | G::DashPunctuation | G::ClosePunctuation | G::FinalPunctuation | G::InitialPunctuation | G::OtherPunctuation | G::OpenPunctuation
        )
}

impl WordPiece {
    /// Reads a `tokenizer.json` whose model is WordPiece.
    pub fn from_tokenizer_json(json: &Value) -> Result<WordPiece, TokenizerError> {
        let model = &json["model"];
        if model["type"] != "WordPiece" {
            return Err(err(format!("model type {} is not WordPiece", model["type"])));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| err("model.vocab is missing"))?
            .iter()
            .map(|(k, v)| v.as_u64().and_then(|id| u32::try_from(id).ok()).map(|id| (k.clone(), id)).ok_or_else(|| err(format!("vocab entry `{k}` has a bad id"))))
            .collect::<Result<_, _>>()?;
        let unk = model["unk_token"].as_str().unwrap_or("[UNK]");
        let unk_id = *vocab.get(unk).ok_or_else(|| err(format!("the unknown token `{unk}` is not in the vocabulary")))?;
        let norm = &json["normalizer"];
        let (clean_text, chinese_chars, lowercase, strip_accents) = match norm["type"].as_str() {
            Some("BertNormalizer") => {
                let lowercase = norm["lowercase"].as_bool().unwrap_or(true);
                (
                    norm["clean_text"].as_bool().unwrap_or(true),
                    norm["handle_chinese_chars"].as_bool().unwrap_or(true),
                    lowercase,
                    // Unset, accents go with case.
                    norm["strip_accents"].as_bool().unwrap_or(lowercase),
                )
            }
            None if norm.is_null() => (false, false, false, false),
            other => return Err(err(format!("normalizer {other:?} is not supported with WordPiece"))),
        };
        match json["pre_tokenizer"]["type"].as_str() {
            Some("BertPreTokenizer") => {}
            other => return Err(err(format!("pre-tokenizer {other:?} is not supported with WordPiece"))),
        }
        let mut specials: Vec<(String, u32)> = json["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| Some((t["content"].as_str()?.to_string(), u32::try_from(t["id"].as_u64()?).ok()?)))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        let (mut before, mut after) = (Vec::new(), Vec::new());
        let post = &json["post_processor"];
        if post["type"] == "TemplateProcessing" {
            let ids = |name: &str| -> Result<Vec<u32>, TokenizerError> {
                let ids = post["special_tokens"][name]["ids"].as_array().ok_or_else(|| err(format!("post-processor token `{name}` has no ids")))?;
                ids.iter().map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| err(format!("post-processor token `{name}` has a bad id")))).collect()
            };
            let mut seen_sequence = false;
            for piece in post["single"].as_array().into_iter().flatten() {
                if let Some(s) = piece["SpecialToken"]["id"].as_str() {
                    let target = if seen_sequence { &mut after } else { &mut before };
                    target.extend(ids(s)?);
                } else if piece.get("Sequence").is_some() {
                    seen_sequence = true;
                }
            }
        } else if !post.is_null() {
            return Err(err(format!("post-processor {} is not supported with WordPiece", post["type"])));
        }
        Ok(WordPiece {
            vocab,
            unk_id,
            prefix: model["continuing_subword_prefix"].as_str().unwrap_or("##").to_string(),
            max_chars: model["max_input_chars_per_word"].as_u64().unwrap_or(100) as usize,
            clean_text,
            chinese_chars,
            strip_accents,
            lowercase,
            specials,
            before,
            after,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.values().max().map_or(0, |&m| m as usize + 1)
    }

    /// Token ids of `text`; with `add_special`, wrapped as the post-processor says.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special {
            out.extend_from_slice(&self.before);
        }
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token, longest at that position.
            let found = self.specials.iter().filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id))).min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            match found {
                Some((at, len, id)) => {
                    self.encode_plain(&rest[..at], &mut out);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        if add_special {
            out.extend_from_slice(&self.after);
        }
        out
    }

    fn normalize(&self, text: &str) -> String {
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if self.clean_text {
                if c == '\0' || c == '\u{fffd}' || is_control(c) {
                    continue;
                }
                if is_whitespace(c) {
                    s.push(' ');
                    continue;
                }
            }
            if self.chinese_chars && is_cjk(c) {
                s.push(' ');
                s.push(c);
                s.push(' ');
            } else {
                s.push(c);
            }
        }
        if self.strip_accents {
            s = s.nfd().filter(|&c| get_general_category(c) != G::NonspacingMark).collect();
        }
        if self.lowercase {
            s = s.to_lowercase();
        }
        s
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let normalized = self.normalize(text);
        let mut word = String::new();
        for c in normalized.chars() {
            if is_whitespace(c) {
                self.encode_word(&word, out);
                word.clear();
            } else if is_punctuation(c) {
                self.encode_word(&word, out);
                word.clear();
                self.encode_word(c.encode_utf8(&mut [0; 4]), out);
            } else {
                word.push(c);
            }
        }
        self.encode_word(&word, out);
    }

    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if word.chars().count() > self.max_chars {
            out.push(self.unk_id);
            return;
        }
        let bounds: Vec<usize> = word.char_indices().map(|(i, _)| i).chain([word.len()]).collect();
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < bounds.len() - 1 {
            let found = (start + 1..bounds.len()).rev().find_map(|end| {
                let piece = &word[bounds[start]..bounds[end]];
                let id = if start == 0 { self.vocab.get(piece) } else { self.vocab.get(&format!("{}{piece}", self.prefix)) };
                id.map(|&id| (id, end))
            });
            match found {
                Some((id, end)) => {
                    pieces.push(id);
                    start = end;
                }
                None => {
                    out.push(self.unk_id);
                    return;
                }
            }
        }
        out.extend(pieces);
    }
}
