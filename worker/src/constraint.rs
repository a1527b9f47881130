//! Constrained decoding: output held to a JSON schema, a regular expression or a Lark grammar.
//! llguidance compiles the grammar against the model's own vocabulary and, at each step, gives
//! the set of tokens that keep the output inside the language; the sampler sees only those.
//! Output is therefore valid by construction, whatever the temperature.

use kiln_shared::tokenizer::{TokenKind, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    #[error("invalid {kind}: {message}")]
    Invalid { kind: &'static str, message: String },
    #[error("the constraint cannot be built for this model's vocabulary: {0}")]
    Vocabulary(String),
    #[error("constrained decoding failed: {0}")]
    Matcher(String),
}

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object.
    JsonObject,
    /// A value valid against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// Text matched in full by this regular expression.
    Regex(String),
    /// Text derived from this Lark grammar (llguidance's dialect; `start` is the root).
    Lark(String),
}

impl GrammarSpec {
    fn kind(&self) -> &'static str {
        match self {
            GrammarSpec::JsonObject | GrammarSpec::JsonSchema(_) => "JSON schema",
            GrammarSpec::Regex(_) => "regular expression",
            GrammarSpec::Lark(_) => "Lark grammar",
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(with_layout(serde_json::json!({"type": "object"}))),
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_layout(schema.clone())),
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// llguidance's message, with where in the schema the offending keyword or value sits (as a
/// JSON pointer) when the message names one.
fn explain(spec: &GrammarSpec, message: &str) -> String {
    // One line: errors travel in HTTP bodies and log lines.
    let message = reason(message);
    let message = message.as_str();
    let GrammarSpec::JsonSchema(schema) = spec else { return message.to_string() };
    let quoted = |prefix: &str| message.split_once(prefix).map(|(_, rest)| rest.split(" (").next().unwrap_or("").trim().to_string());
    let at = if let Some(keys) = quoted("Unimplemented keys: ") {
        let keys: Vec<String> = keys.trim_matches(|c| c == '[' || c == ']').split(',').map(|k| k.trim().trim_matches('"').to_string()).collect();
        find(schema, "", &|obj| keys.iter().any(|k| obj.contains_key(k)))
    } else if let Some(format) = quoted("Unknown format: ") {
        find(schema, "", &|obj| obj.get("format").and_then(|v| v.as_str()) == Some(format.as_str()))
    } else if let Some(ty) = quoted("Invalid type: ") {
        find(schema, "", &|obj| obj.get("type").is_some_and(|v| v.as_str() == Some(ty.as_str()) || v.as_array().is_some_and(|a| a.iter().any(|t| t.as_str() == Some(ty.as_str())))))
    } else {
        None
    };
    match at {
        Some(pointer) => format!("{message} (at {})", if pointer.is_empty() { "the schema's root" } else { &pointer }),
        None => message.to_string(),
    }
}

/// The JSON pointer of the first object inside `value` (depth first) that `wanted` accepts.
fn find(value: &serde_json::Value, path: &str, wanted: &dyn Fn(&serde_json::Map<String, serde_json::Value>) -> bool) -> Option<String> {
    let escape = |k: &str| k.replace('~', "~0").replace('/', "~1");
    match value {
        serde_json::Value::Object(obj) => {
            if wanted(obj) {
                return Some(path.to_string());
            }
            obj.iter().find_map(|(k, v)| find(v, &format!("{path}/{}", escape(k)), wanted))
        }
        serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| find(v, &format!("{path}/{i}"), wanted)),
        _ => None,
    }
}

/// JSON laid out on one line with a space after `,` and `:`. Free whitespace lets a small
/// model wander into endless blank lines inside a value; one fixed layout cannot.
fn with_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

/// The model's vocabulary as llguidance sees it: each token's bytes, control tokens marked so
/// that no text can produce them.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.tokenizer.encode(&String::from_utf8_lossy(s), false, false)
    }
}

fn token_env(tokenizer: &Arc<Tokenizer>) -> Result<TokEnv, ConstraintError> {
    let n = tokenizer.vocab_size();
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| match tokenizer.token_kind(id) {
            Some(TokenKind::Control | TokenKind::Unknown) => {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(tokenizer.token_text(id).unwrap_or_default().as_bytes());
                w
            }
            _ => tokenizer.token_bytes(id, false),
        })
        .collect();
    let eos = tokenizer.eos_id().or_else(|| tokenizer.eog_ids().first().copied()).ok_or_else(|| ConstraintError::Vocabulary("the model has no end-of-generation token".into()))?;
    let info = TokRxInfo { tok_bos: tokenizer.bos_id(), ..TokRxInfo::new(n as u32, eos) };
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(Vocabulary { trie, tokenizer: Arc::clone(tokenizer) }))
}

/// Compiles grammars for one model. The vocabulary index is built on the first constrained
/// request (a fraction of a second), then shared.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Grammars {
        Grammars { tokenizer, factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, ConstraintError> {
        self.factory
            .get_or_init(|| {
                let env = token_env(&self.tokenizer).map_err(|e| e.to_string())?;
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| ConstraintError::Vocabulary(e.clone()))
    }

    /// Checks and compiles `spec`; errors name what is wrong with it.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Arc<Constraint>, ConstraintError> {
        let factory = self.factory()?;
        let parser = factory.create_parser(spec.top_level()).map_err(|e| ConstraintError::Invalid { kind: spec.kind(), message: explain(spec, &e.to_string()) })?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Invalid { kind: spec.kind(), message: e });
        }
        // A grammar can compile and still match nothing: a rule defined only through itself,
        // or a required property whose schema requires itself, never reaches the end of any
        // text. The first step's mask shows it; computed here, it makes that the request's
        // error (rather than a failure at its first step) and serves every completion's first
        // step.
        let first_mask = if matcher.is_stopped() {
            None
        } else {
            let mask = matcher.compute_mask().map_err(|e| no_output(spec, &e.to_string()))?;
            if mask.is_zero() {
                return Err(no_output(spec, "no token may start it"));
            }
            Some(mask)
        };
        Ok(Arc::new(Constraint { start: Mutex::new(matcher), first_mask, eog: self.tokenizer.eog_ids().into(), spec: spec.clone() }))
    }
}

/// llguidance's message on one line, without the parser state it appends to runtime failures
/// (dozens of lines of statistics that mean nothing to whoever sent the grammar).
fn reason(message: &str) -> String {
    let before_state = message.split("<state>").next().unwrap_or(message);
    let lines: Vec<&str> = before_state.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() { "no reason given".to_string() } else { lines.join(" ") }
}

/// The error of a grammar that admits no output, with llguidance's reason.
fn no_output(spec: &GrammarSpec, reason_given: &str) -> ConstraintError {
    let reason = reason(reason_given);
    ConstraintError::Invalid {
        kind: spec.kind(),
        message: format!("no output can match it ({reason}): a rule defined only through itself, or a required property that contains itself, never ends"),
    }
}

/// A compiled grammar in its initial state; each completion starts its own matcher from it.
pub struct Constraint {
    start: Mutex<Matcher>,
    /// The mask of the first token (None when the grammar is complete before any).
    first_mask: Option<SimpleVob>,
    eog: Arc<[u32]>,
    pub spec: GrammarSpec,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("spec", &self.spec).finish()
    }
}

impl Constraint {
    pub fn start(&self) -> TokenMatcher {
        let matcher = self.start.lock().unwrap_or_else(|e| e.into_inner()).deep_clone();
        TokenMatcher { matcher, eog: Arc::clone(&self.eog), mask: self.first_mask.clone().map(Ok) }
    }
}

/// One completion's position in the grammar.
pub struct TokenMatcher {
    matcher: Matcher,
    eog: Arc<[u32]>,
    /// The mask for the next token, computed ahead (while the model runs).
    mask: Option<Result<SimpleVob, String>>,
}

impl TokenMatcher {
    /// Computes the next token's mask now, so that `restrict` finds it ready.
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            self.mask = Some(self.matcher.compute_mask().map_err(|e| e.to_string()));
        }
    }

    /// Sets every token the grammar does not allow next to -inf. End-of-generation tokens are
    /// allowed exactly when the grammar could end here.
    pub fn restrict(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        self.prepare();
        let mut mask = self.mask.take().unwrap_or_else(|| Err("no mask".into())).map_err(|e| ConstraintError::Matcher(reason(&e)))?;
        let may_end = self.eog.iter().any(|&t| (t as usize) < mask.len() && mask.is_allowed(t));
        let size = mask.len();
        for &t in self.eog.iter().filter(|&&t| (t as usize) < size) {
            mask.set(t as usize, may_end);
        }
        // Word by word over the bit set: whole runs of allowed or refused tokens at a time.
        mask.iter_unset_entries(|t| {
            if let Some(l) = logits.get_mut(t) {
                *l = f32::NEG_INFINITY;
            }
        });
        // Rows past the tokenizer's vocabulary (padding) are never text.
        logits.iter_mut().skip(mask.len()).for_each(|l| *l = f32::NEG_INFINITY);
        let mut any = false;
        mask.iter_set_entries(|t| any |= logits.get(t).is_some_and(|l| l.is_finite()));
        if !any {
            return Err(ConstraintError::Matcher("no token the grammar allows has a finite probability".into()));
        }
        Ok(())
    }

    /// Advances past `token`. End-of-generation tokens are not part of the text: they are
    /// accepted where the grammar may end.
    pub fn consume(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.mask = None;
        if self.eog.contains(&token) {
            return if self.matcher.is_accepting().unwrap_or(false) {
                Ok(())
            } else {
                Err(ConstraintError::Matcher(format!("token {token} ends the output where the grammar cannot end")))
            };
        }
        self.matcher.consume_token(token).map_err(|e| ConstraintError::Matcher(reason(&e.to_string())))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
