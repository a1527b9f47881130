//! Anthropic-compatible routes: `/v1/messages` (streamed with the Messages API's named
//! events) and `/v1/messages/count_tokens`.

use super::mcp_loop::ToolLoop;
use super::openai_format::{validate_sampling, Common};
use super::sse::{self, Step};
use super::{admit, answer, check_context, collect, random_id, route_key, Totals};
use crate::error::{ApiError, Flavor};
use crate::generate::{Generation, Update};
use crate::params::{parse_object, Fields};
use crate::tools::{self, CallReader, Delta, Format, Part, Tool, ToolCall, ToolChoice, Turn};
use crate::upstream::ModelState;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::v1 as pb;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

// Prompt caching is automatic, so `cache_control` hints are accepted and need no action.
const MESSAGE_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "metadata",
    "cache_control",
    "tools",
    "tool_choice",
    "mcp_servers",
    "mcp",
];
const MESSAGE_UNSUPPORTED: &[&str] = &[
    "thinking",
    "service_tier",
    "container",
    "context_management",
    "output_config",
    "output_format",
    "speed",
    "inference_geo",
];
const COUNT_FIELDS: &[&str] = &["model", "messages", "system", "cache_control", "tools", "tool_choice", "mcp_servers", "mcp"];

/// Text of a `content` or `system` value: a string or an array of text blocks.
pub(super) fn blocks_text(value: &Value, name: &str) -> Result<String, ApiError> {
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

fn conversation(f: &Fields, max: usize) -> Result<Vec<Turn>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = f.get("system") {
        out.push(Turn { role: "system".into(), content: blocks_text(system, "system")?, ..Turn::default() });
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
        let name = m.name("content");
        match content {
            Value::Array(blocks) if role == "assistant" && blocks.iter().any(|b| matches!(b.get("type").and_then(Value::as_str), Some("mcp_tool_use" | "mcp_tool_result"))) => {
                out.extend(super::anthropic_mcp::history(blocks, &name)?);
            }
            Value::Array(blocks) if blocks.iter().any(|b| matches!(b.get("type").and_then(Value::as_str), Some("tool_use" | "tool_result"))) => {
                out.extend(tool_blocks(role, blocks, &name)?);
            }
            Value::Array(blocks) if role == "user" && blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("image")) => {
                out.push(image_blocks(blocks, &name)?);
            }
            _ => out.push(Turn { role: role.into(), content: blocks_text(content, &name)?, ..Turn::default() }),
        }
    }
    Ok(out)
}

/// A user message holding `image` blocks (`source`: `{type: base64, media_type, data}` or a
/// `data:` URL as `{type: url, url}`) among text blocks.
fn image_blocks(blocks: &[Value], name: &str) -> Result<Turn, ApiError> {
    let (mut text, mut parts) = (String::new(), Vec::new());
    for (j, block) in blocks.iter().enumerate() {
        let path = format!("{name}[{j}].");
        let Some(obj) = block.as_object() else { return Err(ApiError::field(format!("{name}[{j}]"), "expected a content block object")) };
        if obj.get("type").and_then(Value::as_str) != Some("image") {
            let t = blocks_text(&Value::Array(vec![block.clone()]), name)?;
            text.push_str(&t);
            parts.push(Part::Text(t));
            continue;
        }
        let b = Fields::new(obj, &path, &["type", "source", "cache_control"], &[])?;
        let source = b.object("source")?.ok_or_else(|| ApiError::field(b.name("source"), "is required (an object)"))?;
        let sp = format!("{path}source.");
        let s = Fields::new(source, &sp, &["type", "media_type", "data", "url"], &[])?;
        let data = match s.str("type")? {
            Some("base64") => {
                let media_type = s.str("media_type")?.ok_or_else(|| ApiError::field(s.name("media_type"), "is required"))?;
                let data = s.str("data")?.ok_or_else(|| ApiError::field(s.name("data"), "is required"))?;
                super::images::from_base64(media_type, data, &s.name("data"), &Default::default())?
            }
            Some("url") => {
                parts.push(super::images::from_url(s.str("url")?.ok_or_else(|| ApiError::field(s.name("url"), "is required"))?, &s.name("url"), &Default::default())?);
                continue;
            }
            Some(other) => return Err(ApiError::field(s.name("type"), format!("unknown image source `{other}`; expected base64 or url"))),
            None => return Err(ApiError::field(s.name("type"), "is required")),
        };
        parts.push(Part::Image { path: format!("{path}source"), data });
    }
    Ok(Turn { role: "user".into(), content: text, parts, ..Turn::default() })
}

/// A message holding `tool_use` (assistant) or `tool_result` (user) blocks, with any text.
fn tool_blocks(role: &str, blocks: &[Value], name: &str) -> Result<Vec<Turn>, ApiError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let path = format!("{name}[{j}].");
        let Some(obj) = block.as_object() else { return Err(ApiError::field(format!("{name}[{j}]"), "expected a content block object")) };
        match (role, obj.get("type").and_then(Value::as_str)) {
            (_, Some("text")) => text.push_str(&blocks_text(&Value::Array(vec![block.clone()]), name)?),
            ("assistant", Some("tool_use")) => {
                let b = Fields::new(obj, &path, &["type", "id", "name", "input", "cache_control"], &[])?;
                let id = b.str("id")?.ok_or_else(|| ApiError::field(b.name("id"), "is required"))?;
                let tool = b.str("name")?.ok_or_else(|| ApiError::field(b.name("name"), "is required"))?;
                let input = b.object("input")?.ok_or_else(|| ApiError::field(b.name("input"), "is required (an object)"))?;
                calls.push(ToolCall { id: id.into(), name: tool.into(), arguments: Value::Object(input.clone()).to_string() });
            }
            ("user", Some("tool_result")) => {
                let b = Fields::new(obj, &path, &["type", "tool_use_id", "content", "is_error", "cache_control"], &[])?;
                let id = b.str("tool_use_id")?.ok_or_else(|| ApiError::field(b.name("tool_use_id"), "is required"))?;
                let content = match b.get("content") {
                    None => String::new(),
                    Some(c) => blocks_text(c, &b.name("content"))?,
                };
                let content = if b.bool("is_error")?.unwrap_or(false) { format!("Error: {content}") } else { content };
                results.push(Turn { role: "tool".into(), content, tool_call_id: Some(id.into()), ..Turn::default() });
            }
            (_, Some(other)) => return Err(ApiError::field(format!("{path}type"), format!("`{other}` blocks are not supported in {role} messages"))),
            (_, None) => return Err(ApiError::field(format!("{path}type"), "is required (a string)")),
        }
    }
    let mut out = results;
    if role == "assistant" || !text.is_empty() {
        out.push(Turn { role: role.into(), content: text, tool_calls: calls, ..Turn::default() });
    }
    Ok(out)
}

/// `tools` and `tool_choice`: `[{name, description?, input_schema, strict?}]`,
/// `{type: auto | any | tool | none, name?, disable_parallel_tool_use?}`.
/// `mcp` names the MCP tools the request uses; its `mcp_toolset` entries of `tools` are read
/// by `anthropic_mcp`.
fn message_tools(f: &Fields, mcp: &[&str]) -> Result<(Vec<Tool>, ToolChoice, bool), ApiError> {
    let mut tools: Vec<Tool> = Vec::new();
    for (i, item) in f.array("tools")?.map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("tools[{i}]"), "expected an object")) };
        if obj.get("type").and_then(Value::as_str) == Some("mcp_toolset") {
            continue;
        }
        let t = Fields::new(obj, &format!("tools[{i}]."), &["type", "name", "description", "input_schema", "strict", "cache_control"], &[])?;
        if t.str("type")?.is_some_and(|ty| ty != "custom") {
            return Err(ApiError::field(t.name("type"), "only custom tools are supported"));
        }
        let name = t.str("name")?.ok_or_else(|| ApiError::field(t.name("name"), "is required"))?;
        super::valid_tool_name(name).map_err(|e| ApiError::field(t.name("name"), e))?;
        if tools.iter().any(|x| x.name == name) {
            return Err(ApiError::field(t.name("name"), format!("`{name}` is given twice")));
        }
        if mcp.contains(&name) {
            return Err(ApiError::field(t.name("name"), format!("`{name}` is also the name of an MCP tool this request uses")));
        }
        let schema = t.object("input_schema")?.ok_or_else(|| ApiError::field(t.name("input_schema"), "is required (a JSON Schema object)"))?;
        tools.push(Tool {
            name: name.into(),
            description: t.str("description")?.map(str::to_string),
            parameters: Value::Object(schema.clone()),
            strict: t.bool("strict")?.unwrap_or(false),
        });
    }
    let Some(tc) = f.object("tool_choice")? else {
        let choice = if tools.is_empty() && mcp.is_empty() { ToolChoice::None } else { ToolChoice::Auto };
        return Ok((tools, choice, true));
    };
    let c = Fields::new(tc, "tool_choice.", &["type", "name", "disable_parallel_tool_use"], &[])?;
    let parallel = !c.bool("disable_parallel_tool_use")?.unwrap_or(false);
    let choice = match c.str("type")? {
        Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => {
            let name = c.str("name")?.ok_or_else(|| ApiError::field(c.name("name"), "is required when type is tool"))?;
            if !tools.iter().any(|t| t.name == name) && !mcp.contains(&name) {
                return Err(ApiError::field(c.name("name"), format!("`{name}` is not one of the tools")));
            }
            ToolChoice::Named(name.into())
        }
        Some(other) => return Err(ApiError::field(c.name("type"), format!("unknown type `{other}`; expected auto, any, tool or none"))),
        None => return Err(ApiError::field(c.name("type"), "is required")),
    };
    if choice != ToolChoice::None && tools.is_empty() && mcp.is_empty() {
        return Err(ApiError::field("tool_choice", "needs `tools`"));
    }
    Ok((tools, choice, parallel))
}

pub(super) fn stop_reason(d: &pb::DoneEvent) -> &'static str {
    match pb::FinishReason::try_from(d.finish) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextFull) => "max_tokens",
        _ if d.stop_sequence.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

pub(super) fn usage(t: &Totals) -> Value {
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
    let model = super::resolve_generator(state, f.str("model")?.ok_or_else(|| ApiError::field("model", "is required"))?)?;
    *model_id = Some(model.info.model_id.clone());
    let mut conversation = conversation(&f, state.config.limits.max_messages)?;
    super::images::resolve(state, &mut conversation, &Default::default()).await?;
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
    let mcp_tools = super::anthropic_mcp::requested_tools(state, &f)?;
    let mcp_names: Vec<&str> = mcp_tools.iter().flatten().map(|t| t.name.as_str()).collect();
    let (tools, choice, parallel) = message_tools(&f, &mcp_names)?;
    if let Some(remote) = mcp_tools {
        super::images::check_all(&crate::tools::images(&conversation), Default::default()).await?;
        admit(state)?;
        let c = Common { sampling, max_tokens: Some(max_tokens), stop, n: 1, ignore_eos: false, stream, include_usage: false, user: None };
        let session = super::session(headers).map(str::to_string);
        let run = ToolLoop { state: Arc::clone(state), model, turns: conversation, tools, remote, choice, parallel, c, session, started, call_ids: "mcptoolu_", arguments_as_objects: true, context_fields: ("messages", "max_tokens"), max_calls: None };
        return super::anthropic_mcp::respond(run, random_id("msg_")).await;
    }
    let super::ConversationPrompt { tokens: prompt, calls: format, grammar, images } = super::conversation_prompt(&model, &conversation, &tools, &choice, parallel, true)?;
    check_context(&model, prompt.len(), Some(max_tokens), None, ("messages", "max_tokens"))?;
    super::images::check_all(&crate::tools::images(&conversation), Default::default()).await?;
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
        constraint: grammar,
        images,
        prompt_logprobs: None,
    };
    let mut generation = Generation::start(state, &model, request, key, started).await?;
    if stream {
        return Ok(stream_message(generation, &model, id, prompt_tokens, format));
    }
    let (choices, totals) = collect(&mut generation, 1, false).await?;
    let choice = choices.into_iter().next().unwrap_or_default();
    let done = choice.done.unwrap_or_default();
    let mut stop = stop_reason(&done);
    let content = match format.and_then(|format| tools::read_calls(format, &choice.text)) {
        Some(calls) => {
            if stop == "end_turn" {
                stop = "tool_use";
            }
            calls
                .iter()
                .map(|(name, args)| {
                    let input = serde_json::from_str::<Value>(args).unwrap_or_else(|_| json!({}));
                    json!({ "type": "tool_use", "id": random_id("toolu_"), "name": name, "input": input })
                })
                .collect()
        }
        None => vec![json!({ "type": "text", "text": choice.text })],
    };
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model.info.model_id,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": done.stop_sequence,
        "usage": usage(&totals),
    }))
    .into_response())
}

pub(super) fn named(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

fn text_delta(index: usize, text: &str) -> Event {
    named("content_block_delta", json!({ "type": "content_block_delta", "index": index, "delta": { "type": "text_delta", "text": text } }))
}

/// Content blocks as they stream: text, or tool_use blocks whose input arrives as
/// `input_json_delta`s. Without tools there is one text block, opened at once.
struct Blocks {
    reader: Option<CallReader>,
    /// The open block's index and whether it is text.
    open: Option<(usize, bool)>,
    next: usize,
}

impl Blocks {
    fn events(&mut self, deltas: Vec<Delta>) -> Vec<Event> {
        let mut out = Vec::new();
        for d in deltas {
            match d {
                Delta::Text(t) if t.is_empty() => {}
                Delta::Text(t) => {
                    if !matches!(self.open, Some((_, true))) {
                        out.extend(self.close());
                        out.push(self.start(json!({ "type": "text", "text": "" }), true));
                    }
                    out.push(text_delta(self.open.map_or(0, |o| o.0), &t));
                }
                Delta::CallStart { name, .. } => {
                    out.extend(self.close());
                    out.push(self.start(json!({ "type": "tool_use", "id": random_id("toolu_"), "name": name, "input": {} }), false));
                }
                Delta::Arguments { fragment, .. } => {
                    let index = self.open.map_or(0, |o| o.0);
                    out.push(named("content_block_delta", json!({ "type": "content_block_delta", "index": index, "delta": { "type": "input_json_delta", "partial_json": fragment } })));
                }
            }
        }
        out
    }

    fn start(&mut self, block: Value, text: bool) -> Event {
        let index = self.next;
        self.next += 1;
        self.open = Some((index, text));
        named("content_block_start", json!({ "type": "content_block_start", "index": index, "content_block": block }))
    }

    fn close(&mut self) -> Option<Event> {
        self.open.take().map(|(index, _)| named("content_block_stop", json!({ "type": "content_block_stop", "index": index })))
    }

    fn push(&mut self, text: &str) -> Vec<Event> {
        let deltas = match &mut self.reader {
            Some(r) => r.push(text),
            None => vec![Delta::Text(text.to_string())],
        };
        self.events(deltas)
    }

    fn finish(&mut self) -> Vec<Event> {
        let deltas = self.reader.as_mut().map(CallReader::finish).unwrap_or_default();
        let mut out = self.events(deltas);
        // Every message has at least one block.
        if self.next == 0 {
            out.push(self.start(json!({ "type": "text", "text": "" }), true));
        }
        out.extend(self.close());
        out
    }
}

fn stream_message(generation: Generation, model: &ModelState, id: String, prompt_tokens: u32, calls: Option<Format>) -> Response {
    // Split as the final usage is, when the worker said how much of the prompt was cached.
    let start = Totals { prompt_tokens, cached_tokens: generation.cached_prompt_tokens().unwrap_or(0), completion_tokens: 0 };
    let mut first = vec![named(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": model.info.model_id,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage(&start),
            },
        }),
    )];
    let mut blocks = Blocks { reader: calls.map(CallReader::new), open: None, next: 0 };
    if calls.is_none() {
        first.push(blocks.start(json!({ "type": "text", "text": "" }), true));
    }
    first.push(named("ping", json!({ "type": "ping" })));
    let mut totals = Totals::default();
    let mut done: Option<pb::DoneEvent> = None;
    sse::stream(generation, first, move |step: Step| match step {
        Some(Ok(Update::Token(t))) if t.text.is_empty() => Vec::new(),
        Some(Ok(Update::Token(t))) => blocks.push(&t.text),
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
                blocks.push(&tail)
            }
        }
        Some(Err(e)) => vec![error_event(e)],
        None => {
            let d = done.take().unwrap_or_default();
            let mut stop = stop_reason(&d);
            if blocks.reader.as_ref().is_some_and(CallReader::is_calls) && stop == "end_turn" {
                stop = "tool_use";
            }
            let mut out = blocks.finish();
            out.push(named(
                "message_delta",
                json!({
                    "type": "message_delta",
                    "delta": { "stop_reason": stop, "stop_sequence": d.stop_sequence },
                    "usage": usage(&totals),
                }),
            ));
            out.push(named("message_stop", json!({ "type": "message_stop" })));
            out
        }
    })
}

pub(super) fn error_event(e: ApiError) -> Event {
    named("error", e.with_flavor(Flavor::Anthropic).body())
}

pub async fn count_tokens(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(Flavor::Anthropic, async {
        let mut model_id = None;
        let result = async {
            let map = parse_object(&body)?;
            let f = Fields::new(&map, "", COUNT_FIELDS, &["thinking"])?;
            let model = super::resolve_generator(&state, f.str("model")?.ok_or_else(|| ApiError::field("model", "is required"))?)?;
            model_id = Some(model.info.model_id.clone());
            let remote = super::anthropic_mcp::requested_tools(&state, &f)?.unwrap_or_default();
            let mcp_names: Vec<&str> = remote.iter().map(|t| t.name.as_str()).collect();
            let (mut tools, choice, parallel) = message_tools(&f, &mcp_names)?;
            tools.extend(remote.iter().map(super::mcp_loop::offered));
            let mut turns = conversation(&f, state.config.limits.max_messages)?;
            super::images::resolve(&state, &mut turns, &Default::default()).await?;
            let prompt = super::conversation_prompt(&model, &turns, &tools, &choice, parallel, true)?.tokens;
            Ok(Json(json!({ "input_tokens": prompt.len() })).into_response())
        }
        .await;
        (model_id, result)
    })
    .await
}
