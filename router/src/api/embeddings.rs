//! OpenAI's `POST /v1/embeddings`: texts tokenized with the model's own tokenizer (token ids
//! are taken as given), all inputs of a request embedded in one call to a worker serving the
//! model (another is tried when one fails), vectors returned as floats or as base64 of
//! little-endian f32, as the API defines.

use super::{admit, answer, resolve_model};
use crate::error::{ApiError, Flavor};
use crate::params::{parse_object, Fields};
use crate::upstream::ModelState;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use kiln_proto::v1 as pb;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

const FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user", "truncate"];
/// Inputs in one request, as OpenAI allows.
pub const MAX_INPUTS: usize = 2048;

pub async fn embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(Flavor::OpenAi, async {
        let mut model_id = None;
        let result = embeddings_inner(&state, &body, &mut model_id).await;
        (model_id, result)
    })
    .await
}

/// The inputs as token ids: a string, an array of strings, an array of token ids, or an array
/// of arrays of token ids.
fn inputs(f: &Fields, model: &ModelState) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab = u64::from(model.info.vocab_size);
    let ids = |v: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        if v.is_empty() {
            return Err(ApiError::field(at, "is an empty array of token ids"));
        }
        v.iter()
            .enumerate()
            .map(|(j, t)| match t.as_u64() {
                Some(t) if t < vocab => Ok(t as u32),
                _ => Err(ApiError::field(format!("{at}[{j}]"), format!("{t} is not a token id of this model (0 to {})", vocab - 1))),
            })
            .collect()
    };
    let text = |s: &str, at: &str| -> Result<Vec<u32>, ApiError> {
        if s.is_empty() {
            return Err(ApiError::field(at, "is an empty string"));
        }
        Ok(model.tokenizer.encode(s, true, true))
    };
    match f.require("input")? {
        Value::String(s) => Ok(vec![text(s, "input")?]),
        Value::Array(items) if items.is_empty() => Err(ApiError::field("input", "is an empty array")),
        Value::Array(items) if items.len() > MAX_INPUTS => Err(ApiError::field("input", format!("{} inputs; at most {MAX_INPUTS} are allowed", items.len()))),
        Value::Array(items) if items.iter().all(Value::is_number) => Ok(vec![ids(items, "input")?]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => text(s, &format!("input[{i}]")),
                Value::Array(v) => ids(v, &format!("input[{i}]")),
                _ => Err(ApiError::field(format!("input[{i}]"), "expected a string or an array of token ids")),
            })
            .collect(),
        _ => Err(ApiError::field("input", "expected a string, an array of strings, or token ids")),
    }
}

async fn embeddings_inner(state: &Arc<AppState>, body: &[u8], model_id: &mut Option<String>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let map = parse_object(body)?;
    let f = Fields::new(&map, "", FIELDS, &[])?;
    let id = f.str("model")?.ok_or_else(|| ApiError::field("model", "is required"))?;
    let model = resolve_model(state, id)?;
    *model_id = Some(model.info.model_id.clone());
    if model.info.kind != pb::ModelKind::Embed as i32 {
        let embedding: Vec<String> = state.pool.models().iter().filter(|m| m.info.kind == pb::ModelKind::Embed as i32).map(|m| m.info.model_id.clone()).collect();
        let others = if embedding.is_empty() { "none is served here".to_string() } else { format!("embedding models: {}", embedding.join(", ")) };
        return Err(ApiError::field("model", format!("`{id}` generates text; it is not an embedding model ({others})")));
    }
    let base64 = match f.str("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::field("encoding_format", format!("`{other}` is not one of float, base64"))),
    };
    if let Some(d) = f.int("dimensions", 1, i64::from(u32::MAX))? {
        if d != i64::from(model.info.dimensions) {
            return Err(ApiError::field(
                "dimensions",
                format!("`{id}` returns {} dimensions and was not trained to be shortened; leave dimensions out or set it to {}", model.info.dimensions, model.info.dimensions),
            ));
        }
    }
    f.str("user")?;
    let truncate = f.bool("truncate")?.unwrap_or(false);
    let inputs = inputs(&f, &model)?;
    let max = model.info.context_length as usize;
    if !truncate {
        if let Some((i, ids)) = inputs.iter().enumerate().find(|(_, ids)| ids.len() > max) {
            let at = if matches!(f.get("input"), Some(Value::Array(a)) if !a.iter().all(Value::is_number)) { format!("input[{i}]") } else { "input".to_string() };
            return Err(ApiError::field(at, format!("has {} tokens, but `{id}` reads at most {max}; shorten it, or set truncate: true to cut it", ids.len())));
        }
    }
    admit(state)?;
    let count = inputs.len();
    let response = call(state, &model, pb::EmbedRequest { inputs: inputs.into_iter().map(|ids| pb::TokenIds { ids }).collect(), truncate, request_id: super::random_id("embd-") }).await?;
    if response.embeddings.len() != count {
        return Err(ApiError::upstream(format!("the worker returned {} embeddings for {count} inputs", response.embeddings.len())));
    }
    let labels = vec![("model", model.info.model_id.clone())];
    state.metrics.add("kiln_router_prompt_tokens_total", labels.clone(), f64::from(response.prompt_tokens));
    state.metrics.observe("kiln_router_embed_duration_seconds", labels, started.elapsed().as_secs_f64());
    let data: Vec<Value> = response
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e.values)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.info.model_id,
        "usage": {"prompt_tokens": response.prompt_tokens, "total_tokens": response.prompt_tokens},
    }))
    .into_response())
}

/// Sends the request to a worker serving the model, trying others while workers fail.
async fn call(state: &Arc<AppState>, model: &ModelState, request: pb::EmbedRequest) -> Result<pb::EmbedResponse, ApiError> {
    let id = &model.info.model_id;
    let mut failed: Vec<String> = Vec::new();
    let mut last_error = None;
    let limit = state.config.timeouts.first_token;
    loop {
        let Some(in_flight) = state.pool.pick(id, &failed, &crate::routing::RouteKey::default()) else {
            return Err(ApiError::unavailable(match last_error {
                Some(e) => format!("no worker serving `{id}` could take the request; last error: {e}"),
                None => format!("no worker serving `{id}` is available"),
            }));
        };
        let worker = std::sync::Arc::clone(in_flight.worker());
        let mut client = worker.client.clone();
        let span = tracing::info_span!("router.worker_call", otel.kind = "client", kiln.worker = %worker.id, kiln.inputs = request.inputs.len() as i64);
        let mut call = tonic::Request::new(request.clone());
        kiln_telemetry::propagate_to_grpc(&span, call.metadata_mut());
        match tokio::time::timeout(limit, client.embed(call)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(status)) if !crate::generate::worker_failed(&status) => return Err(crate::generate::from_status(&status)),
            Ok(Err(status)) => {
                // As for generation: the worker is out until a health check passes, so the
                // requests after this one do not try it first.
                worker.mark_down();
                state.metrics.add("kiln_router_upstream_errors_total", vec![("worker", worker.id.clone())], 1.0);
                last_error = Some(format!("{}: {}", worker.id, status.message()));
            }
            Err(_) => {
                state.metrics.add("kiln_router_stalled_total", vec![("worker", worker.id.clone())], 1.0);
                worker.eject(state.config.timeouts.eject);
                last_error = Some(format!("{} did not answer within {limit:?}", worker.id));
            }
        }
        failed.push(worker.id.clone());
    }
}
