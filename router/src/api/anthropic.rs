//! Anthropic-compatible routes: `/v1/messages` (streamed with the Messages API's named
//! events) and `/v1/messages/count_tokens`.

use super::openai_format::validate_sampling;
use super::sse::{self, Step};
use super::{admit, answer, chat_prompt, check_context, collect, random_id, resolve_model, route_key, Totals};
use crate::error::{ApiError, Flavor};
use crate::generate::{Generation, Update};
use crate::params::{parse_object, Fields};
use crate::upstream::ModelState;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::v1 as pb;
use kiln_shared::chat::ChatMessage;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

// Prompt caching is automatic, so `cache_control` hints are accepted and need no action.
const MESSAGE_FIELDS: &[&str] =
    &["model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream", "metadata", "cache_control"];
const MESSAGE_UNSUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
    "speed",
    "inference_geo",
];
const COUNT_FIELDS: &[&str] = &["model", "messages", "system", "cache_control"];

/// Text of a `content` or `system` value: a string or an array of text blocks.
fn blocks_text(value: &Value, name: &str) -> Result<String, ApiError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, block) in blocks.iter().enumerate() {
                let path = format!("{name}[{j}].");
                let Some(obj) = block.as_object() else { return Err(ApiError::field(format!("{name}[{j}]"), "expected a content block object")) };
                match obj.get("type").and_then(Value::as_str) {
                    Some("text") => {}
                    Some(other) => return Err(ApiError::field(format!("{path}type"), format!("`{other}` blocks are not supported; only text"))),
                    None => return Err(ApiError::field(format!("{path}type"), "is required (a string)")),
                }
                let b = Fields::new(obj, &path, &["type", "text", "cache_control", "citations"], &[])?;
                text.push_str(b.str("text")?.ok_or_else(|| ApiError::field(b.name("text"), "is required"))?);
            }
            Ok(text)
        }
        _ => Err(ApiError::field(name, "expected a string or an array of content blocks")),
    }
}

fn conversation(f: &Fields, max: usize) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = f.get("system") {
        out.push(ChatMessage::new("system", blocks_text(system, "system")?));
    }
    let items = super::message_items(f, max)?;
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("messages[{i}]"), "expected an object")) };
        let m = Fields::new(obj, &format!("messages[{i}]."), &["role", "content"], &[])?;
        let role = match m.str("role")? {
            Some(r @ ("user" | "assistant")) => r,
            Some(other) => return Err(ApiError::field(m.name("role"), format!("unknown role `{other}`; expected user or assistant"))),
            None => return Err(ApiError::field(m.name("role"), "is required")),
        };
        let content = m.require("content")?;
        out.push(ChatMessage::new(role, blocks_text(content, &m.name("content"))?));
    }
    Ok(out)
}

fn stop_reason(d: &pb::DoneEvent) -> &'static str {
    match pb::FinishReason::try_from(d.finish) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextFull) => "max_tokens",
        _ if d.stop_sequence.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

fn usage(t: &Totals) -> Value {
    json!({
        "input_tokens": t.prompt_tokens - t.cached_tokens.min(t.prompt_tokens),
        "cache_read_input_tokens": t.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": t.completion_tokens,
    })
}

pub async fn messages(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(Flavor::Anthropic, async {
        let mut model_id = None;
        let result = messages_inner(&state, &headers, &body, &mut model_id).await;
        (model_id, result)
    })
    .await
}

async fn messages_inner(state: &Arc<AppState>, headers: &HeaderMap, body: &[u8], model_id: &mut Option<String>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let map = parse_object(body)?;
    let f = Fields::new(&map, "", MESSAGE_FIELDS, MESSAGE_UNSUPPORTED)?;
    let model = resolve_model(state, f.str("model")?.ok_or_else(|| ApiError::field("model", "is required"))?)?;
    *model_id = Some(model.info.model_id.clone());
    let conversation = conversation(&f, state.config.limits.max_messages)?;
    let context = i64::from(model.info.context_length);
    let max_tokens = f.int("max_tokens", 1, context)?.ok_or_else(|| ApiError::field("max_tokens", "is required"))? as u32;
    if let Some(meta) = f.object("metadata")? {
        Fields::new(meta, "metadata.", &["user_id"], &[])?.str("user_id")?;
    }
    super::openai_format::check_max_tokens(Some(max_tokens), "max_tokens", &state.config.limits)?;
    let stop = super::openai_format::stop_sequences(&f, "stop_sequences", &state.config.limits)?;
    let sampling = pb::SamplingParams {
        temperature: f.f32("temperature", 0.0, 1.0)?.unwrap_or(1.0),
        top_k: f.int("top_k", 0, i64::from(u32::MAX))?.unwrap_or(0) as u32,
        top_p: f.f32("top_p", 0.0, 1.0)?.unwrap_or(1.0),
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: None,
        logit_bias: Vec::new(),
    };
    validate_sampling(&sampling)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let prompt = chat_prompt(&model, &conversation, true)?;
    check_context(&model, prompt.len(), Some(max_tokens), "messages")?;
    admit(state)?;
    let id = random_id("msg_");
    let prompt_tokens = prompt.len() as u32;
    let key = route_key(headers, &prompt);
    let request = pb::GenerateRequest {
        prompt,
        sampling: Some(sampling),
        max_tokens: Some(max_tokens),
        stop,
        ignore_eos: false,
        n: 1,
        logprobs: false,
        top_logprobs: 0,
        request_id: id.clone(),
        resume: None,
        constraint: None,
    };
    let mut generation = Generation::start(state, &model, request, key, started).await?;
    if stream {
        return Ok(stream_message(generation, &model, id, prompt_tokens));
    }
    let (choices, totals) = collect(&mut generation, 1, false).await?;
    let choice = choices.into_iter().next().unwrap_or_default();
    let done = choice.done.unwrap_or_default();
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model.info.model_id,
        "content": [{ "type": "text", "text": choice.text }],
        "stop_reason": stop_reason(&done),
        "stop_sequence": done.stop_sequence,
        "usage": usage(&totals),
    }))
    .into_response())
}

fn named(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

fn text_delta(text: &str) -> Event {
    named("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": text } }))
}

fn stream_message(generation: Generation, model: &ModelState, id: String, prompt_tokens: u32) -> Response {
    let first = vec![
        named(
            "message_start",
            json!({
                "type": "message_start",
                "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model.info.model_id,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": { "input_tokens": prompt_tokens, "output_tokens": 0 },
                },
            }),
        ),
        named("content_block_start", json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } })),
        named("ping", json!({ "type": "ping" })),
    ];
    let mut totals = Totals::default();
    let mut done: Option<pb::DoneEvent> = None;
    sse::stream(generation, first, move |step: Step| match step {
        Some(Ok(Update::Token(t))) if t.text.is_empty() => Vec::new(),
        Some(Ok(Update::Token(t))) => vec![text_delta(&t.text)],
        Some(Ok(Update::Done(d))) => {
            if let Err(e) = super::collect::cancelled_is_error(&d) {
                return vec![error_event(e)];
            }
            totals.add(&d);
            let tail = d.tail.clone();
            done = Some(d);
            if tail.is_empty() {
                Vec::new()
            } else {
                vec![text_delta(&tail)]
            }
        }
        Some(Err(e)) => vec![error_event(e)],
        None => {
            let d = done.take().unwrap_or_default();
            vec![
                named("content_block_stop", json!({ "type": "content_block_stop", "index": 0 })),
                named(
                    "message_delta",
                    json!({
                        "type": "message_delta",
                        "delta": { "stop_reason": stop_reason(&d), "stop_sequence": d.stop_sequence },
                        "usage": usage(&totals),
                    }),
                ),
                named("message_stop", json!({ "type": "message_stop" })),
            ]
        }
    })
}

fn error_event(e: ApiError) -> Event {
    named("error", e.with_flavor(Flavor::Anthropic).body())
}

pub async fn count_tokens(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(Flavor::Anthropic, async {
        let mut model_id = None;
        let result = async {
            let map = parse_object(&body)?;
            let f = Fields::new(&map, "", COUNT_FIELDS, &["tools", "tool_choice", "thinking"])?;
            let model = resolve_model(&state, f.str("model")?.ok_or_else(|| ApiError::field("model", "is required"))?)?;
            model_id = Some(model.info.model_id.clone());
            let prompt = chat_prompt(&model, &conversation(&f, state.config.limits.max_messages)?, true)?;
            Ok(Json(json!({ "input_tokens": prompt.len() })).into_response())
        }
        .await;
        (model_id, result)
    })
    .await
}
