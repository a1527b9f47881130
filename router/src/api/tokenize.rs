//! `/tokenize`, `/detokenize` and `/tokenizer_info`, answered by the router from the model's
//! tokenizer (the endpoints vLLM serves, which evaluation tools such as lm-evaluation-harness
//! use to tokenize as the server does).

use super::{chat_prompt, labelled, resolve_model};
use crate::error::ApiError;
use crate::params::{parse_object, Fields};
use crate::upstream::ModelState;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_shared::chat::ChatMessage;
use serde_json::{json, Value};
use std::sync::Arc;

/// The named model, or the only one served when none is named.
fn model(state: &AppState, f: &Fields) -> Result<Arc<ModelState>, ApiError> {
    if let Some(id) = f.str("model")? {
        return resolve_model(state, id);
    }
    let models = state.pool.models();
    match models.as_slice() {
        [only] => Ok(Arc::clone(only)),
        [] => Err(ApiError::unavailable("no worker is available")),
        _ => Err(ApiError::field("model", "is required when several models are served")),
    }
}

fn messages(items: &[Value]) -> Result<Vec<ChatMessage>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) => Ok(ChatMessage::new(r, c)),
                _ => Err(ApiError::field(format!("messages[{i}]"), "expected {\"role\": string, \"content\": string}")),
            }
        })
        .collect()
}

fn respond(model: Option<&str>, result: Result<Response, ApiError>) -> Response {
    labelled(model.unwrap_or(""), result.unwrap_or_else(IntoResponse::into_response))
}

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let mut id = None;
    let result = (|| {
        let map = parse_object(&body)?;
        let f = Fields::new(&map, "", &["model", "prompt", "messages", "add_special_tokens"], &[])?;
        let m = model(&state, &f)?;
        id = Some(m.info.model_id.clone());
        let tokens = match (f.str("prompt")?, f.array("messages")?) {
            (Some(text), None) => m.tokenizer.encode(text, f.bool("add_special_tokens")?.unwrap_or(true), true),
            (None, Some(items)) => chat_prompt(&m, &messages(items)?, false)?,
            _ => return Err(ApiError::bad_request("give exactly one of `prompt` and `messages`")),
        };
        Ok(Json(json!({ "tokens": tokens, "count": tokens.len(), "max_model_len": m.info.context_length })).into_response())
    })();
    respond(id.as_deref(), result)
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let mut id = None;
    let result = (|| {
        let map = parse_object(&body)?;
        let f = Fields::new(&map, "", &["model", "tokens"], &[])?;
        let m = model(&state, &f)?;
        id = Some(m.info.model_id.clone());
        let items = f.array("tokens")?.ok_or_else(|| ApiError::field("tokens", "is required"))?;
        let vocab = m.info.vocab_size;
        let mut tokens = Vec::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            match t.as_u64() {
                Some(t) if t < u64::from(vocab) => tokens.push(t as u32),
                _ => return Err(ApiError::field(format!("tokens[{i}]"), format!("{t} is not a token id of this model (0 to {})", vocab - 1))),
            }
        }
        Ok(Json(json!({ "prompt": m.tokenizer.decode(&tokens, true) })).into_response())
    })();
    respond(id.as_deref(), result)
}

/// The tokenizer's special tokens and the chat template: `GET /tokenizer_info`, with
/// `?model=` when several models are served.
pub async fn tokenizer_info(State(state): State<Arc<AppState>>, Query(query): Query<std::collections::HashMap<String, String>>) -> Response {
    let mut id = None;
    let result = (|| {
        let name = query.get("model").map(|m| Value::String(m.clone()));
        let map: serde_json::Map<String, Value> = name.into_iter().map(|m| ("model".to_string(), m)).collect();
        let f = Fields::new(&map, "", &["model"], &[])?;
        let m = model(&state, &f)?;
        id = Some(m.info.model_id.clone());
        let template = (!m.info.chat_template.is_empty()).then_some(m.info.chat_template.as_str());
        Ok(Json(json!({
            "model": m.info.model_id,
            "bos_token": m.tokenizer.bos_text(),
            "eos_token": m.tokenizer.eos_text(),
            "pad_token": null,
            "chat_template": template,
            "model_max_length": m.info.context_length,
            "vocab_size": m.info.vocab_size,
        }))
        .into_response())
    })();
    respond(id.as_deref(), result)
}
