//! The tokenizer both the router and the workers use.
//!
//! A `TokenizerSpec` is plain, serializable data (vocabulary, scores, merges, token kinds,
//! flags); workers build it from a model file and hand it to routers, and both construct the
//! same `Tokenizer` from it. Encoding follows llama.cpp's algorithm step for step: special
//! tokens are cut out first (longest first), then each text fragment goes through the
//! model's pre-tokenizer and BPE, so ids match llama.cpp's exactly.

mod bpe;
mod hf;
mod merge;
pub mod pretokenize;
mod spm;
mod stream;

pub use pretokenize::PreTokenizer;
pub use stream::StreamDecoder;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenKind {
    /// The numbering of GGUF `tokenizer.ggml.token_type`.
    pub fn from_gguf(t: i64) -> TokenKind {
        match t {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Undefined,
        }
    }

    /// Tokens matched verbatim in input text before the model's own splitting.
    fn is_special_text(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown)
    }

    /// Tokens that are not text: hidden from output unless asked for.
    pub fn is_control(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TokenizerModel {
    /// Byte-level BPE with ranked merges ("left right").
    ByteBpe { pre: PreTokenizer, merges: Vec<String> },
    /// Score-driven SentencePiece BPE with byte fallback.
    Spm { add_space_prefix: bool },
    /// A Hugging Face `tokenizer.json`, run by the `tokenizers` crate. The spec's tokens
    /// and kinds are derived from it when the tokenizer is built.
    HuggingFace { json: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    pub model: TokenizerModel,
    pub tokens: Vec<String>,
    pub kinds: Vec<TokenKind>,
    /// Merge priorities for `Spm`; empty for byte-level BPE.
    pub scores: Vec<f32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Tokens that end a generation (EOS, end-of-turn and the like).
    pub eog_ids: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The special tokens a Hugging Face checkpoint names outside `tokenizer.json`
/// (`tokenizer_config.json`'s `bos_token`/`eos_token`, `generation_config.json`'s
/// `eos_token_id`).
#[derive(Clone, Debug, Default)]
pub struct HfSpecials {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer has {tokens} tokens but {what} has {found} entries")]
    Inconsistent { tokens: usize, what: &'static str, found: usize },
    #[error("special token {name} = {id} is outside the vocabulary of {vocab_size}")]
    SpecialOutOfRange { name: &'static str, id: u32, vocab_size: usize },
    #[error("the vocabulary is empty")]
    Empty,
    #[error("tokenizer.json: {0}")]
    Invalid(String),
}

/// Text of end-of-generation tokens across common chat formats; marked as such (and as
/// control tokens) even when a file's metadata forgets them, as llama.cpp does.
const END_OF_TURN_TEXTS: [&str; 22] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// End-of-generation ids and kind fixes for `spec`, following llama.cpp's rules: tokens
/// named above end generation; in formats that have `<|return|>` and `<|call|>` (or `<|calls|>`
/// and `<|flush|>`), `<|end|>` only separates messages; where `<|tool_response>` or
/// `<|plamo:eos|>` exists, `</s>` is ordinary text.
fn end_of_generation(spec: &mut TokenizerSpec, token_to_id: &HashMap<String, u32>) -> Vec<u32> {
    let mut eog: Vec<u32> = spec.eog_ids.clone();
    eog.extend(spec.eos_id);
    for text in END_OF_TURN_TEXTS {
        if let Some(&id) = token_to_id.get(text) {
            eog.push(id);
            if !spec.kinds[id as usize].is_control() {
                spec.kinds[id as usize] = TokenKind::Control;
            }
        }
    }
    let has = |eog: &[u32], t: &str| token_to_id.get(t).is_some_and(|id| eog.contains(id));
    let mut demote = |text: &str, kind: TokenKind, eog: &mut Vec<u32>| {
        if let Some(&id) = token_to_id.get(text) {
            eog.retain(|&e| e != id);
            spec.kinds[id as usize] = kind;
        }
    };
    let separates_messages = (has(&eog, "<|return|>") && has(&eog, "<|call|>")) || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>"));
    if has(&eog, "<|end|>") && separates_messages {
        demote("<|end|>", TokenKind::UserDefined, &mut eog);
    }
    if has(&eog, "</s>") && (has(&eog, "<|tool_response>") || token_to_id.contains_key("<|plamo:eos|>")) {
        demote("</s>", TokenKind::Normal, &mut eog);
    }
    eog.sort_unstable();
    eog.dedup();
    eog
}

pub struct Tokenizer {
    spec: TokenizerSpec,
    hf: Option<hf::HfTokenizer>,
    token_to_id: HashMap<String, u32>,
    /// Tokens matched verbatim in input, longest text first.
    special_by_length: Vec<u32>,
    merges: Option<bpe::Merges>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// `<0xXX>` token ids for SentencePiece byte fallback.
    byte_tokens: [Option<u32>; 256],
    unk_id: Option<u32>,
}

impl Tokenizer {
    pub fn new(mut spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let hf = match &spec.model {
            TokenizerModel::HuggingFace { json } => Some(hf::HfTokenizer::parse(json)?),
            _ => None,
        };
        if let Some(hf) = &hf {
            (spec.tokens, spec.kinds) = hf.vocabulary();
        }
        Self::build(spec, hf)
    }

    /// A `tokenizer.json` with the special tokens its companion files name. BOS and EOS are
    /// added where the file's post-processor adds them.
    pub fn from_hf_json(json: String, specials: &HfSpecials) -> Result<Tokenizer, TokenizerError> {
        let hf = hf::HfTokenizer::parse(&json)?;
        let (tokens, kinds) = hf.vocabulary();
        let named = |key: &'static str, text: &Option<String>| -> Result<Option<u32>, TokenizerError> {
            let Some(text) = text else { return Ok(None) };
            match tokens.iter().position(|t| t == text) {
                Some(id) => Ok(Some(id as u32)),
                None => Err(TokenizerError::Invalid(format!("{key} `{text}` is not in the vocabulary"))),
            }
        };
        let bos_id = named("bos_token", &specials.bos)?;
        let eos_id = named("eos_token", &specials.eos)?;
        let mut eog_ids: Vec<u32> = eos_id.into_iter().chain(specials.eos_ids.iter().copied()).collect();
        eog_ids.sort_unstable();
        eog_ids.dedup();
        let (plain, with_special) = (hf.encode("a", false, true), hf.encode("a", true, true));
        let added = with_special.len() > plain.len();
        let spec = TokenizerSpec {
            model: TokenizerModel::HuggingFace { json },
            tokens,
            kinds,
            scores: Vec::new(),
            bos_id,
            eos_id,
            eog_ids,
            add_bos: added && bos_id.is_some() && with_special.first() == bos_id.as_ref(),
            add_eos: added && eos_id.is_some() && with_special.last() == eos_id.as_ref(),
        };
        Self::build(spec, Some(hf))
    }

    /// The tokenizer for `spec`, whose tokens and kinds are filled in (for a `tokenizer.json`,
    /// from `hf` by the caller).
    fn build(mut spec: TokenizerSpec, hf: Option<hf::HfTokenizer>) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Empty);
        }
        if spec.kinds.len() != n {
            return Err(TokenizerError::Inconsistent { tokens: n, what: "token kinds", found: spec.kinds.len() });
        }
        if matches!(spec.model, TokenizerModel::Spm { .. }) && spec.scores.len() != n {
            return Err(TokenizerError::Inconsistent { tokens: n, what: "scores", found: spec.scores.len() });
        }
        for (name, id) in [("bos", spec.bos_id), ("eos", spec.eos_id)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(TokenizerError::SpecialOutOfRange { name, id, vocab_size: n });
            }
        }
        if let Some(&id) = spec.eog_ids.iter().find(|&&id| id as usize >= n) {
            return Err(TokenizerError::SpecialOutOfRange { name: "end-of-generation", id, vocab_size: n });
        }
        for (i, t) in spec.tokens.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[EMPTY_{i}]");
            }
        }
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in spec.tokens.iter().enumerate() {
            // A later duplicate wins, as when the list is loaded into a map in order.
            token_to_id.insert(t.clone(), i as u32);
        }
        spec.eog_ids = end_of_generation(&mut spec, &token_to_id);

        let mut special_by_length: Vec<u32> = (0..n as u32).filter(|&i| spec.kinds[i as usize].is_special_text()).collect();
        special_by_length.sort_by_key(|&i| std::cmp::Reverse(spec.tokens[i as usize].len()));

        let byte_to_char = bpe::byte_to_char_table();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_to_id.get(&format!("<0x{b:02X}>")).copied();
        }
        let merges = match &spec.model {
            TokenizerModel::ByteBpe { merges, .. } => Some(bpe::Merges::new(merges)),
            TokenizerModel::Spm { .. } | TokenizerModel::HuggingFace { .. } => None,
        };
        let unk_id = spec.kinds.iter().position(|&k| k == TokenKind::Unknown).map(|i| i as u32);
        Ok(Tokenizer { spec, hf, token_to_id, special_by_length, merges, byte_to_char, char_to_byte, byte_tokens, unk_id })
    }

    pub fn spec(&self) -> &TokenizerSpec {
        &self.spec
    }

    /// The spec as sent to routers: what `Tokenizer::new` derives is left out.
    pub fn wire_spec(&self) -> TokenizerSpec {
        let mut spec = self.spec.clone();
        if self.hf.is_some() {
            spec.tokens.clear();
            spec.kinds.clear();
        }
        spec
    }

    /// Whether this tokenizer runs a Hugging Face `tokenizer.json`.
    pub fn is_hugging_face(&self) -> bool {
        self.hf.is_some()
    }

    pub fn vocab_size(&self) -> usize {
        self.spec.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.spec.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.spec.eos_id
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.spec.eog_ids.binary_search(&id).is_ok()
    }

    pub fn eog_ids(&self) -> &[u32] {
        &self.spec.eog_ids
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.spec.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.spec.kinds.get(id as usize).copied()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Encodes `text`. `add_special` adds BOS/EOS as the model asks; `parse_special` lets
    /// control tokens written in the text (like `<|im_start|>`) become those tokens.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        if let Some(hf) = &self.hf {
            return hf.encode(text, add_special, parse_special);
        }
        let mut out = Vec::new();
        if add_special && self.spec.add_bos {
            out.extend(self.spec.bos_id);
        }
        let mut prev_was_special = true;
        for fragment in self.partition_special(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_was_special = true;
                }
                Fragment::Text(range) => {
                    self.encode_fragment(&text[range], prev_was_special, &mut out);
                    prev_was_special = false;
                }
            }
        }
        if add_special && self.spec.add_eos {
            out.extend(self.spec.eos_id);
        }
        out
    }

    fn encode_fragment(&self, text: &str, prev_was_special: bool, out: &mut Vec<u32>) {
        match &self.spec.model {
            TokenizerModel::ByteBpe { pre, .. } => {
                let merges = self.merges.as_ref().expect("byte BPE tokenizers are built with merges");
                let mut words = Vec::new();
                pre.split(text, &mut words);
                let mut encoded = String::new();
                for (a, b) in words {
                    encoded.clear();
                    encoded.extend(text.as_bytes()[a..b].iter().map(|&byte| self.byte_to_char[byte as usize]));
                    for (s, e) in merges.apply(&encoded) {
                        let piece = &encoded[s..e];
                        match self.token_to_id.get(piece) {
                            Some(&id) => out.push(id),
                            // Unknown symbol: fall back to one token per UTF-8 byte of the
                            // encoded text, skipping bytes the vocabulary lacks.
                            None => out.extend(
                                piece
                                    .bytes()
                                    .filter(u8::is_ascii)
                                    .filter_map(|byte| self.token_to_id.get(&(byte as char).to_string()).copied()),
                            ),
                        }
                    }
                }
            }
            TokenizerModel::Spm { add_space_prefix } => {
                let mut escaped = String::with_capacity(text.len() + 3);
                if *add_space_prefix && prev_was_special {
                    escaped.push('▁');
                }
                for c in text.chars() {
                    escaped.push(if c == ' ' { '▁' } else { c });
                }
                for (s, e) in spm::merge(&escaped, &self.token_to_id, &self.spec.scores) {
                    let piece = &escaped[s..e];
                    match self.token_to_id.get(piece) {
                        Some(&id) => out.push(id),
                        None => {
                            for byte in piece.bytes() {
                                let as_text = || self.token_to_id.get(&(byte as char).to_string()).copied();
                                let id = self.byte_tokens[byte as usize]
                                    .or_else(|| if byte.is_ascii() { as_text() } else { None })
                                    .or(self.unk_id);
                                out.extend(id);
                            }
                        }
                    }
                }
            }
            // `encode` hands tokenizer.json files to the tokenizers crate before this point.
            TokenizerModel::HuggingFace { .. } => {}
        }
    }

    fn partition_special(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut fragments = if text.is_empty() { vec![] } else { vec![Fragment::Text(0..text.len())] };
        for &id in &self.special_by_length {
            let kind = self.spec.kinds[id as usize];
            if !parse_special && kind.is_control() {
                continue;
            }
            let needle = self.spec.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for f in fragments {
                let Fragment::Text(range) = f else {
                    next.push(f);
                    continue;
                };
                let mut start = range.start;
                while let Some(found) = text[start..range.end].find(needle) {
                    let at = start + found;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The bytes a token stands for. Control tokens give their text only when
    /// `render_special` is set; unused tokens give nothing.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        let Some(text) = self.spec.tokens.get(id as usize) else {
            return Vec::new();
        };
        let kind = self.spec.kinds[id as usize];
        match kind {
            TokenKind::Control | TokenKind::Unknown => {
                if render_special {
                    text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenKind::UserDefined => text.as_bytes().to_vec(),
            TokenKind::Normal => match self.spec.model {
                TokenizerModel::ByteBpe { .. } => {
                    let mut bytes = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match self.char_to_byte.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend_from_slice(c.to_string().as_bytes()),
                        }
                    }
                    bytes
                }
                TokenizerModel::Spm { .. } => text.replace('▁', " ").into_bytes(),
                TokenizerModel::HuggingFace { .. } => self.hf.as_ref().map_or_else(Vec::new, |hf| hf.token_bytes(id, text, &self.char_to_byte)),
            },
            TokenKind::Byte => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
            TokenKind::Unused | TokenKind::Undefined => Vec::new(),
        }
    }

    /// Whether token `id` starts in the middle of a character (its first byte is a UTF-8
    /// continuation byte), for tokenizers whose decoders work on whole sequences.
    pub(crate) fn continues_character(&self, id: u32) -> bool {
        match (&self.hf, self.spec.tokens.get(id as usize)) {
            (Some(hf), Some(text)) => hf.continues_character(text, self.spec.kinds[id as usize], &self.char_to_byte),
            _ => false,
        }
    }

    /// Decodes ids to text; invalid UTF-8 (a cut-off character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        if let Some(hf) = &self.hf {
            return hf.decode(ids, render_special);
        }
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id, render_special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bos token's text, for chat templates.
    pub fn bos_text(&self) -> Option<&str> {
        self.spec.bos_id.and_then(|id| self.token_text(id))
    }

    pub fn eos_text(&self) -> Option<&str> {
        self.spec.eos_id.and_then(|id| self.token_text(id))
    }
}

enum Fragment {
    Text(std::ops::Range<usize>),
    Token(u32),
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
