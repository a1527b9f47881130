//! What OpenAI's chat and completions routes share: the sampling fields, finish reasons,
//! usage and log-probability objects.

use super::collect::Totals;
use crate::error::ApiError;
use crate::params::Fields;
use crate::upstream::ModelState;
use crate::Limits;
use kiln_proto::v1 as pb;
use kiln_shared::tokenizer::Tokenizer;
use serde_json::{json, Value};

/// Fields both routes accept, besides their prompt and log-probability fields.
pub const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "repeat_last_n",
    "seed",
    "stop",
    "n",
    "logit_bias",
    "ignore_eos",
    "stream",
    "stream_options",
    "user",
];

/// The request fields every generation route reads.
pub struct Common {
    pub sampling: pb::SamplingParams,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub n: u32,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
}

/// Checks sampling values with the same rules the worker applies, so the client hears which
/// field is wrong before anything is sent.
pub fn validate_sampling(s: &pb::SamplingParams) -> Result<(), ApiError> {
    let shared = kiln_proto::sampling_params(s);
    shared.validate().map_err(|e| {
        let name = if e.name == "repeat_penalty" { "repetition_penalty" } else { e.name };
        ApiError::field(name, format!("{} is out of range ({})", e.value, e.range))
    })
}

fn logit_bias(f: &Fields, vocab: u32) -> Result<Vec<pb::LogitBias>, ApiError> {
    let Some(map) = f.object("logit_bias")? else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let name = format!("logit_bias.{key}");
        let token: u32 = key.parse().map_err(|_| ApiError::field(&name, "keys must be token ids"))?;
        if token >= vocab {
            return Err(ApiError::field(&name, format!("token {token} is outside the vocabulary of {vocab}")));
        }
        let bias = value.as_f64().ok_or_else(|| ApiError::field(&name, "expected a number"))? as f32;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::field(&name, format!("{bias} is out of range (-100 to 100)")));
        }
        out.push(pb::LogitBias { token, bias });
    }
    Ok(out)
}

/// Reads the fields in `COMMON_FIELDS`. Defaults are OpenAI's: temperature 1, no top-k,
/// top-p or min-p filtering.
pub fn common(f: &Fields, model: &ModelState, max_tokens_field: Option<u32>, limits: &Limits) -> Result<Common, ApiError> {
    let context = i64::from(model.info.context_length);
    let top_k = f.int("top_k", -1, i64::from(u32::MAX))?.unwrap_or(0);
    let sampling = pb::SamplingParams {
        temperature: f.f32("temperature", 0.0, 2.0)?.unwrap_or(1.0),
        top_k: top_k.max(0) as u32,
        top_p: f.f32("top_p", 0.0, 1.0)?.unwrap_or(1.0),
        min_p: f.f32("min_p", 0.0, 1.0)?.unwrap_or(0.0),
        repeat_penalty: f.f32("repetition_penalty", 0.0, 10.0)?.unwrap_or(1.0),
        repeat_last_n: f.int("repeat_last_n", 0, context)?.unwrap_or(64) as u32,
        presence_penalty: f.f32("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: f.f32("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        seed: f.u64("seed")?,
        logit_bias: logit_bias(f, model.info.vocab_size)?,
    };
    validate_sampling(&sampling)?;
    let max_tokens = match max_tokens_field {
        Some(m) => Some(m),
        None => f.int("max_tokens", 1, context)?.map(|m| m as u32),
    };
    check_max_tokens(max_tokens, if max_tokens_field.is_some() { "max_completion_tokens" } else { "max_tokens" }, limits)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        None => false,
        Some(_) if !stream => return Err(ApiError::field("stream_options", "is only allowed when `stream` is true")),
        Some(options) => {
            let o = Fields::new(options, "stream_options.", &["include_usage"], &["include_obfuscation"])?;
            o.bool("include_usage")?.unwrap_or(false)
        }
    };
    Ok(Common {
        sampling,
        max_tokens,
        stop: stop_sequences(f, "stop", limits)?,
        n: f.int("n", 1, i64::from(limits.max_n))?.unwrap_or(1) as u32,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        stream,
        include_usage,
        user: f.str("user")?.map(str::to_string),
    })
}

/// Stop sequences within the limits on their number and length.
pub fn stop_sequences(f: &Fields, key: &str, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let stops = f.strings(key, limits.max_stop_sequences)?;
    if let Some((i, s)) = stops.iter().enumerate().find(|(_, s)| s.len() > limits.max_stop_bytes) {
        return Err(ApiError::field(format!("{}[{i}]", f.name(key)), format!("is {} bytes; at most {} are allowed", s.len(), limits.max_stop_bytes)));
    }
    Ok(stops)
}

/// `max_tokens` within the router's cap.
pub fn check_max_tokens(max_tokens: Option<u32>, field: &str, limits: &Limits) -> Result<(), ApiError> {
    match (max_tokens, limits.max_tokens) {
        (Some(asked), Some(cap)) if asked > cap => Err(ApiError::field(field, format!("{asked} is more than this server allows ({cap})"))),
        _ => Ok(()),
    }
}

pub fn finish_reason(d: &pb::DoneEvent) -> &'static str {
    match pb::FinishReason::try_from(d.finish) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

pub fn usage(t: &Totals) -> Value {
    json!({
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": t.cached_tokens },
    })
}

/// A token's text as the API shows it, with its exact bytes (a token may hold part of a
/// character).
fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id, true);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat's `logprobs.content` entries for some tokens.
pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[pb::TokenEvent]) -> Value {
    json!({ "content": token_logprobs(tokenizer, tokens), "refusal": null })
}

/// Each token's text, bytes, log-probability and alternatives (chat's `logprobs.content`
/// entries, the Responses API's `logprobs`).
pub fn token_logprobs(tokenizer: &Tokenizer, tokens: &[pb::TokenEvent]) -> Vec<Value> {
    tokens
        .iter()
        .map(|t| {
            let (text, bytes) = token_text(tokenizer, t.token);
            let top: Vec<Value> = t
                .top_logprobs
                .iter()
                .map(|a| {
                    let (text, bytes) = token_text(tokenizer, a.token);
                    json!({ "token": text, "logprob": a.logprob, "bytes": bytes })
                })
                .collect();
            json!({ "token": text, "logprob": t.logprob.unwrap_or(0.0), "bytes": bytes, "top_logprobs": top })
        })
        .collect()
}

/// A legacy `top_logprobs` entry: each alternative's text and log-probability.
fn top_object(tokenizer: &Tokenizer, alternatives: &[pb::TopLogprob]) -> Value {
    Value::Object(alternatives.iter().map(|a| (token_text(tokenizer, a.token).0, json!(a.logprob))).collect())
}

/// The legacy completions `logprobs` object; `offset` is where the first token's text starts.
pub fn completion_logprobs(tokenizer: &Tokenizer, tokens: &[pb::TokenEvent], mut offset: usize) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut logprobs = Vec::with_capacity(tokens.len());
    let mut tops = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        let (text, _) = token_text(tokenizer, t.token);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        logprobs.push(t.logprob.unwrap_or(0.0));
        tops.push(top_object(tokenizer, &t.top_logprobs));
    }
    json!({ "tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
}

/// The legacy completions `logprobs` object for an echoed prompt (`scored` by position): the
/// first token has no log-probability (null, as OpenAI's).
pub fn prompt_logprobs(tokenizer: &Tokenizer, prompt: &[u32], scored: &[Option<pb::PromptLogprob>]) -> Value {
    let mut texts = Vec::with_capacity(prompt.len());
    let mut logprobs = Vec::with_capacity(prompt.len());
    let mut tops = Vec::with_capacity(prompt.len());
    let mut offsets = Vec::with_capacity(prompt.len());
    let mut offset = 0;
    for (i, &token) in prompt.iter().enumerate() {
        let (text, _) = token_text(tokenizer, token);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        match scored.get(i).and_then(Option::as_ref) {
            Some(p) => {
                logprobs.push(json!(p.logprob));
                tops.push(top_object(tokenizer, &p.top_logprobs));
            }
            None => {
                logprobs.push(Value::Null);
                tops.push(Value::Null);
            }
        }
    }
    json!({ "tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
}

/// Two legacy `logprobs` objects as one, `first`'s tokens then `then`'s.
pub fn join_logprobs(mut first: Value, then: Value) -> Value {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(Value::Array(a)), Some(Value::Array(b))) = (first.get_mut(key), then.get(key)) {
            a.extend(b.iter().cloned());
        }
    }
    first
}
