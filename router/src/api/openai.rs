//! OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use super::openai_format::{self as fmt, Common, COMMON_FIELDS};
use super::sse::{self, json_event, Step};
use super::{admit, answer, check_context, collect, labelled, random_id, resolve_model, route_key, unix_now, Totals};
use crate::error::{ApiError, Flavor};
use crate::generate::{Batch, Generation, Update, Updates};
use crate::params::{parse_object, Fields};
use crate::tools::{self, CallReader, Delta, Format, Part, Tool, ToolCall, ToolChoice, Turn};
use crate::upstream::ModelState;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::v1 as pb;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

const CHAT_FIELDS: &[&str] =
    &["messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "grammar", "tools", "tool_choice", "parallel_tool_calls", "mcp"];
const CHAT_UNSUPPORTED: &[&str] = &[
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "service_tier",
    "store",
    "metadata",
    "web_search_options",
    "verbosity",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "best_of", "grammar"];
const COMPLETION_UNSUPPORTED: &[&str] = &["suffix"];

fn fields<'a>(map: &'a Map<String, Value>, own: &[&str], unsupported: &[&str]) -> Result<Fields<'a>, ApiError> {
    let known: Vec<&str> = COMMON_FIELDS.iter().chain(own).copied().collect();
    Fields::new(map, "", &known, unsupported)
}

/// Runs a handler and answers its error, labelling the response with the model either way.
/// The request's `model`; left out, the one text-generation model served (as vLLM and
/// llama.cpp's server take it, so clients written for them work unchanged).
pub(super) fn model_of(state: &AppState, f: &Fields) -> Result<String, ApiError> {
    if let Some(id) = f.str("model")? {
        return Ok(id.to_string());
    }
    let generators: Vec<String> =
        state.pool.models().iter().filter(|m| m.info.kind != pb::ModelKind::Embed as i32).map(|m| m.info.model_id.clone()).collect();
    match generators.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(ApiError::field("model", "is required")),
        several => Err(ApiError::field("model", format!("is required when several models are served ({})", several.join(", ")))),
    }
}

/// A message's `content`: a string, or an array of text parts and (in user messages)
/// `image_url` parts; the text, and the parts in order when there are images.
fn message_content(m: &Fields, i: usize, role: &str) -> Result<(String, Vec<Part>), ApiError> {
    let name = m.name("content");
    match m.get("content") {
        None if role == "assistant" => Ok((String::new(), Vec::new())),
        None => Err(ApiError::field(name, "is required")),
        Some(Value::String(s)) => Ok((s.clone(), Vec::new())),
        Some(Value::Array(items)) => {
            let (mut text, mut parts, mut images) = (String::new(), Vec::new(), false);
            for (j, part) in items.iter().enumerate() {
                let path = format!("messages[{i}].content[{j}].");
                let Some(obj) = part.as_object() else { return Err(ApiError::field(format!("{path}type"), "expected a content part object")) };
                match obj.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let p = Fields::new(obj, &path, &["type", "text"], &[])?;
                        let t = p.str("text")?.ok_or_else(|| ApiError::field(p.name("text"), "is required"))?;
                        text.push_str(t);
                        parts.push(Part::Text(t.to_string()));
                    }
                    Some("image_url") if role == "user" => {
                        let p = Fields::new(obj, &path, &["type", "image_url"], &[])?;
                        let image = p.object("image_url")?.ok_or_else(|| ApiError::field(p.name("image_url"), "is required (an object with `url`)"))?;
                        let u = Fields::new(image, &format!("{path}image_url."), &["url", "detail"], &[])?;
                        if let Some(d) = u.str("detail")?.filter(|d| !matches!(*d, "auto" | "low" | "high")) {
                            return Err(ApiError::field(u.name("detail"), format!("unknown value `{d}`; expected auto, low or high")));
                        }
                        let url = u.str("url")?.ok_or_else(|| ApiError::field(u.name("url"), "is required"))?;
                        parts.push(super::images::from_url(url, &u.name("url"), &Default::default())?);
                        images = true;
                    }
                    Some("image_url") => return Err(ApiError::field(format!("{path}type"), "images are only allowed in user messages")),
                    Some(other) => return Err(ApiError::field(format!("{path}type"), format!("`{other}` parts are not supported; only text and image_url"))),
                    None => return Err(ApiError::field(format!("{path}type"), "is required (a string)")),
                }
            }
            Ok((text, if images { parts } else { Vec::new() }))
        }
        Some(_) => Err(ApiError::field(name, "expected a string or an array of content parts")),
    }
}

fn chat_messages(f: &Fields, max: usize) -> Result<Vec<Turn>, ApiError> {
    let items = super::message_items(f, max)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("messages[{i}]"), "expected an object")) };
        let m = Fields::new(obj, &format!("messages[{i}]."), &["role", "content", "tool_call_id", "tool_calls", "name", "refusal"], &["function_call", "audio"])?;
        let role = match m.str("role")? {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            Some(other) => return Err(ApiError::field(m.name("role"), format!("unknown role `{other}`; expected system, developer, user, assistant or tool"))),
            None => return Err(ApiError::field(m.name("role"), "is required")),
        };
        m.str("name")?;
        let tool_call_id = m.str("tool_call_id")?.map(str::to_string);
        match (role, &tool_call_id) {
            ("tool", None) => return Err(ApiError::field(m.name("tool_call_id"), "is required on tool messages")),
            ("tool", Some(_)) | (_, None) => {}
            (_, Some(_)) => return Err(ApiError::field(m.name("tool_call_id"), "is only allowed on tool messages")),
        }
        let tool_calls = match m.array("tool_calls")? {
            Some(_) if role != "assistant" => return Err(ApiError::field(m.name("tool_calls"), "is only allowed on assistant messages")),
            Some(calls) => message_tool_calls(calls, &m.name("tool_calls"))?,
            None => Vec::new(),
        };
        let (content, parts) = if role == "assistant" && !tool_calls.is_empty() && m.get("content").is_none() { (String::new(), Vec::new()) } else { message_content(&m, i, role)? };
        out.push(Turn { role: role.to_string(), content, tool_calls, tool_call_id, parts });
    }
    Ok(out)
}

/// An assistant message's `tool_calls`: `[{id, type: "function", function: {name, arguments}}]`,
/// the arguments a string of JSON.
fn message_tool_calls(calls: &[Value], path: &str) -> Result<Vec<ToolCall>, ApiError> {
    let mut out = Vec::with_capacity(calls.len());
    for (j, call) in calls.iter().enumerate() {
        let p = format!("{path}[{j}].");
        let Some(obj) = call.as_object() else { return Err(ApiError::field(format!("{path}[{j}]"), "expected an object")) };
        let c = Fields::new(obj, &p, &["id", "type", "function"], &[])?;
        if c.str("type")?.is_some_and(|t| t != "function") {
            return Err(ApiError::field(c.name("type"), "only `function` calls are supported"));
        }
        let id = c.str("id")?.ok_or_else(|| ApiError::field(c.name("id"), "is required"))?.to_string();
        let Some(function) = c.object("function")? else { return Err(ApiError::field(c.name("function"), "is required")) };
        let fun = Fields::new(function, &format!("{p}function."), &["name", "arguments"], &[])?;
        let name = fun.str("name")?.ok_or_else(|| ApiError::field(fun.name("name"), "is required"))?.to_string();
        let arguments = fun.str("arguments")?.unwrap_or("{}").to_string();
        if serde_json::from_str::<Value>(&arguments).is_err() {
            return Err(ApiError::field(fun.name("arguments"), "must be a string of JSON"));
        }
        out.push(ToolCall { id, name, arguments });
    }
    Ok(out)
}

/// `tools`, `tool_choice` and `parallel_tool_calls`; `mcp` names the MCP tools the request
/// opted into, which `tool_choice` may name too.
fn chat_tools(f: &Fields, mcp: &[&str]) -> Result<(Vec<Tool>, ToolChoice, bool), ApiError> {
    let mut tools: Vec<Tool> = Vec::new();
    for (i, item) in f.array("tools")?.map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        let p = format!("tools[{i}].");
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("tools[{i}]"), "expected an object")) };
        let t = Fields::new(obj, &p, &["type", "function"], &[])?;
        if t.str("type")? != Some("function") {
            return Err(ApiError::field(t.name("type"), "must be `function`"));
        }
        let Some(function) = t.object("function")? else { return Err(ApiError::field(t.name("function"), "is required")) };
        let fun = Fields::new(function, &format!("{p}function."), &["name", "description", "parameters", "strict"], &[])?;
        tools.push(super::function_tool(&fun, &tools, mcp, false)?);
    }
    let none_offered = tools.is_empty() && mcp.is_empty();
    let choice = match f.get("tool_choice") {
        None if none_offered => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => super::tool_choice_word(s)?,
        Some(Value::Object(o)) => {
            let c = Fields::new(o, "tool_choice.", &["type", "function"], &[])?;
            if c.str("type")? != Some("function") {
                return Err(ApiError::field(c.name("type"), "must be `function`"));
            }
            let name = c.object("function")?.and_then(|fun| fun.get("name")).and_then(Value::as_str);
            let name = name.ok_or_else(|| ApiError::field("tool_choice.function.name", "is required"))?;
            ToolChoice::Named(name.to_string())
        }
        Some(_) => return Err(ApiError::field("tool_choice", "expected a string or an object")),
    };
    match &choice {
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) && !mcp.contains(&n.as_str()) => {
            return Err(ApiError::field("tool_choice.function.name", format!("`{n}` is not one of the tools")))
        }
        ToolChoice::Auto | ToolChoice::Required | ToolChoice::Named(_) if none_offered => return Err(ApiError::field("tool_choice", "needs `tools`")),
        _ => {}
    }
    Ok((tools, choice, f.bool("parallel_tool_calls")?.unwrap_or(true)))
}

pub(super) fn generate_request(prompt: Vec<u32>, c: &Common, logprobs: bool, top_logprobs: u32, id: &str, constraint: Option<pb::Constraint>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt,
        sampling: Some(c.sampling.clone()),
        max_tokens: c.max_tokens,
        stop: c.stop.clone(),
        ignore_eos: c.ignore_eos,
        n: c.n,
        logprobs,
        top_logprobs,
        request_id: match &c.user {
            Some(user) => format!("{id} user={user}"),
            None => id.to_string(),
        },
        resume: None,
        constraint,
        images: Vec::new(),
        prompt_logprobs: None,
    }
}

pub async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(Flavor::OpenAi, async {
        let mut model_id = None;
        let result = chat_inner(&state, &headers, &body, &mut model_id).await;
        (model_id, result)
    })
    .await
}

pub(crate) async fn chat_inner(state: &Arc<AppState>, headers: &HeaderMap, body: &[u8], model_id: &mut Option<String>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let map = parse_object(body)?;
    let f = fields(&map, CHAT_FIELDS, CHAT_UNSUPPORTED)?;
    let model = super::resolve_generator(state, &model_of(state, &f)?)?;
    *model_id = Some(model.info.model_id.clone());
    let mut turns = chat_messages(&f, state.config.limits.max_messages)?;
    super::images::resolve(state, &mut turns, &Default::default()).await?;
    let mcp_tools = super::mcp_loop::requested_tools(state, &f)?;
    let mcp_names: Vec<&str> = mcp_tools.iter().flatten().map(|t| t.name.as_str()).collect();
    let (tools, choice, parallel) = chat_tools(&f, &mcp_names)?;
    let constraint = super::structured::chat(&f)?;
    let max_completion = f.int("max_completion_tokens", 1, i64::from(model.info.context_length))?.map(|m| m as u32);
    let mut c = fmt::common(&f, &model, max_completion, &state.config.limits)?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top_logprobs = f.int("top_logprobs", 0, 20)?;
    if top_logprobs.is_some() && !logprobs {
        return Err(ApiError::field("top_logprobs", "requires `logprobs` to be true"));
    }
    if let Some(remote) = mcp_tools {
        if c.n != 1 {
            return Err(ApiError::field("n", "a request using MCP tools makes one completion"));
        }
        if logprobs {
            return Err(ApiError::field("logprobs", "log-probabilities are not returned for requests using MCP tools"));
        }
        if constraint.is_some() {
            return Err(ApiError::field("mcp", "MCP tools cannot be combined with a response_format or grammar"));
        }
        admit(state)?;
        let session = super::session(headers).map(str::to_string);
        let budget = if max_completion.is_some() { "max_completion_tokens" } else { "max_tokens" };
        let run = super::mcp_loop::ToolLoop { state: Arc::clone(state), model, turns, tools, remote, choice, parallel, c, session, started, call_ids: "call_", arguments_as_objects: false, context_fields: ("messages", budget), max_calls: None };
        return run.respond().await;
    }
    let conversation = super::conversation_prompt(&model, &turns, &tools, &choice, parallel, false)?;
    if conversation.grammar.is_some() && constraint.is_some() {
        return Err(ApiError::field("tool_choice", "tool calls cannot be combined with a response_format or grammar; set tool_choice to none"));
    }
    let constraint = conversation.grammar.or(constraint);
    let (prompt, calls) = (conversation.tokens, conversation.calls);
    let budget = if max_completion.is_some() { "max_completion_tokens" } else { "max_tokens" };
    c.max_tokens = check_context(&model, prompt.len(), c.max_tokens, state.config.limits.max_tokens, ("messages", budget))?;
    super::images::check_all(&crate::tools::images(&turns), Default::default()).await?;
    admit(state)?;
    let id = random_id("chatcmpl-");
    let key = route_key(headers, &prompt);
    let mut request = generate_request(prompt, &c, logprobs, top_logprobs.unwrap_or(0) as u32, &id, constraint);
    request.images = conversation.images;
    let mut generation = Generation::start(state, &model, request, key, started).await?;
    let created = unix_now();
    if c.stream {
        return Ok(stream_chat(generation, model, c, id, created, logprobs, calls));
    }
    let (choices, totals) = collect(&mut generation, c.n as usize, logprobs).await?;
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let mut finish = ch.done.as_ref().map(fmt::finish_reason);
            let message = match calls.and_then(|format| tools::read_calls(format, &ch.text)) {
                Some(calls) => {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|(name, args)| json!({"id": random_id("call_"), "type": "function", "function": {"name": name, "arguments": args}}))
                        .collect();
                    if finish == Some("stop") {
                        finish = Some("tool_calls");
                    }
                    json!({ "role": "assistant", "content": null, "tool_calls": calls, "refusal": null })
                }
                None => json!({ "role": "assistant", "content": ch.text, "refusal": null }),
            };
            json!({
                "index": i,
                "message": message,
                "logprobs": if logprobs { fmt::chat_logprobs(&model.tokenizer, &ch.tokens) } else { Value::Null },
                "finish_reason": finish,
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model.info.model_id,
        "choices": choices,
        "usage": fmt::usage(&totals),
    }))
    .into_response())
}

/// The shape of every streamed chunk of one request.
pub(super) struct Chunker {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl Chunker {
    /// A chunk with no choices that carries `key: value` (kiln's extra events).
    pub fn extra(&self, key: &str, value: Value) -> Event {
        let mut v = json!({ "id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [] });
        v[key] = value;
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        json_event(&v)
    }

    pub fn chunk(&self, choices: Value) -> Event {
        let mut v = json!({ "id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        json_event(&v)
    }

    /// The closing events: usage when asked for, then `[DONE]`.
    pub fn end(&self, totals: &Totals) -> Vec<Event> {
        let mut out = Vec::new();
        if self.include_usage {
            out.push(json_event(&json!({
                "id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": fmt::usage(totals),
            })));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

fn error_event(e: &ApiError) -> Vec<Event> {
    vec![json_event(&e.body())]
}

/// One streamed chunk for what a tool-reading completion added.
pub(super) fn delta_chunk(chunker: &Chunker, index: u32, delta: Delta) -> Event {
    let delta = match delta {
        Delta::Text(t) => json!({ "content": t }),
        Delta::CallStart { index: k, name } => {
            json!({ "tool_calls": [{ "index": k, "id": random_id("call_"), "type": "function", "function": { "name": name, "arguments": "" } }] })
        }
        Delta::Arguments { index: k, fragment } => json!({ "tool_calls": [{ "index": k, "function": { "arguments": fragment } }] }),
    };
    chunker.chunk(json!([{ "index": index, "delta": delta, "logprobs": null, "finish_reason": null }]))
}

fn stream_chat(generation: Generation, model: Arc<ModelState>, c: Common, id: String, created: u64, logprobs: bool, calls: Option<Format>) -> Response {
    let chunker = Chunker { id, object: "chat.completion.chunk", created, model: model.info.model_id.clone(), include_usage: c.include_usage };
    let first = (0..c.n)
        .map(|i| chunker.chunk(json!([{ "index": i, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }])))
        .collect();
    let mut totals = Totals::default();
    // With tools, each completion's text goes through a reader that turns calls into
    // `tool_calls` deltas (name first, then the arguments as they are written).
    let mut readers: Vec<CallReader> = calls.map(|f| (0..c.n).map(|_| CallReader::new(f)).collect()).unwrap_or_default();
    sse::stream(generation, first, move |step: Step| match step {
        Some(Ok(Update::Token(t))) => {
            if let Some(reader) = readers.get_mut(t.index as usize) {
                return reader.push(&t.text).into_iter().map(|d| delta_chunk(&chunker, t.index, d)).collect();
            }
            if t.text.is_empty() && !logprobs {
                return Vec::new();
            }
            let lp = if logprobs { fmt::chat_logprobs(&model.tokenizer, std::slice::from_ref(&t)) } else { Value::Null };
            vec![chunker.chunk(json!([{ "index": t.index, "delta": { "content": t.text }, "logprobs": lp, "finish_reason": null }]))]
        }
        Some(Ok(Update::Done(d))) => {
            if let Err(e) = super::collect::cancelled_is_error(&d) {
                return error_event(&e);
            }
            totals.add(&d);
            let mut out = Vec::new();
            let mut finish = fmt::finish_reason(&d);
            if let Some(reader) = readers.get_mut(d.index as usize) {
                let mut deltas = reader.push(&d.tail);
                deltas.extend(reader.finish());
                out.extend(deltas.into_iter().map(|delta| delta_chunk(&chunker, d.index, delta)));
                if reader.is_calls() && finish == "stop" {
                    finish = "tool_calls";
                }
            } else if !d.tail.is_empty() {
                out.push(chunker.chunk(json!([{ "index": d.index, "delta": { "content": d.tail }, "logprobs": null, "finish_reason": null }])));
            }
            out.push(chunker.chunk(json!([{ "index": d.index, "delta": {}, "logprobs": null, "finish_reason": finish }])));
            out
        }
        Some(Err(e)) => error_event(&e),
        None => chunker.end(&totals),
    })
}

/// Most prompts in one completions request (each is a generation of its own), and most
/// choices (prompts times `n`).
const MAX_PROMPTS: usize = 256;

/// Most prompt log-probabilities one request may ask for, alternatives included (each is a
/// JSON entry of the response, held by the router until it is written): 262,144, which is 64
/// prompts of 2,048 tokens with `logprobs: 1`.
const MAX_SCORED_ENTRIES: usize = 1 << 18;

/// A completions request's prompts: a string or an array of token ids, or an array of those
/// (several prompts); each with the text it echoes.
fn completion_prompts(f: &Fields, model: &ModelState) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let one = |v: &Value, path: &str| -> Result<Option<(Vec<u32>, String)>, ApiError> {
        match v {
            Value::String(s) => Ok(Some((model.tokenizer.encode(s, true, true), s.clone()))),
            Value::Array(ids) if ids.iter().all(Value::is_number) && !ids.is_empty() => {
                let vocab = model.info.vocab_size;
                let mut tokens = Vec::with_capacity(ids.len());
                for (i, id) in ids.iter().enumerate() {
                    match id.as_u64() {
                        Some(t) if t < u64::from(vocab) => tokens.push(t as u32),
                        _ => return Err(ApiError::field(format!("{path}[{i}]"), format!("{id} is not a token id of this model (0 to {})", vocab - 1))),
                    }
                }
                let text = model.tokenizer.decode(&tokens, true);
                Ok(Some((tokens, text)))
            }
            _ => Ok(None),
        }
    };
    let value = f.require("prompt")?;
    if let Some(p) = one(value, "prompt")? {
        return Ok(vec![p]);
    }
    match value {
        Value::Array(items) if items.is_empty() => Err(ApiError::field("prompt", "is empty")),
        Value::Array(items) if items.len() > MAX_PROMPTS => Err(ApiError::field("prompt", format!("{} prompts is more than the {MAX_PROMPTS} one request may hold", items.len()))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = format!("prompt[{i}]");
                one(item, &path)?.ok_or_else(|| ApiError::field(path, "expected a string or an array of token ids"))
            })
            .collect(),
        _ => Err(ApiError::field("prompt", "expected a string, an array of token ids, or an array of those")),
    }
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(Flavor::OpenAi, async {
        let mut model_id = None;
        let result = completions_inner(&state, &headers, &body, &mut model_id).await;
        (model_id, result)
    })
    .await
}

/// `max_tokens` of a `/v1/completions` request that leaves it out.
const LEGACY_DEFAULT_MAX_TOKENS: u32 = 16;

/// What a completions response echoes before each prompt's completions: its text and, with
/// `logprobs`, its tokens' log-probabilities.
struct Echo {
    text: String,
    logprobs: Option<Value>,
}

pub(crate) async fn completions_inner(state: &Arc<AppState>, headers: &HeaderMap, body: &[u8], model_id: &mut Option<String>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let map = parse_object(body)?;
    let f = fields(&map, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)?;
    let model = super::resolve_generator(state, &model_of(state, &f)?)?;
    *model_id = Some(model.info.model_id.clone());
    let prompts = completion_prompts(&f, &model)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    // `max_tokens: 0` with `echo` scores the prompt and generates nothing (the legacy API's
    // idiom): the worker samples one token as always, and it is dropped.
    let score_only = echo && f.int("max_tokens", 0, i64::from(model.info.context_length))? == Some(0);
    let c = fmt::common(&f, &model, score_only.then_some(1), &state.config.limits)?;
    let constraint = super::structured::completion(&f)?;
    let logprobs = f.int("logprobs", 0, 20)?;
    if let Some(best_of) = f.int("best_of", 1, 128)? {
        if best_of != i64::from(c.n) {
            return Err(ApiError::field("best_of", "only best_of equal to n is supported"));
        }
    }
    if prompts.len() * c.n as usize > MAX_PROMPTS {
        return Err(ApiError::field("n", format!("{} prompts of {} completions each is more than the {MAX_PROMPTS} choices one request may hold", prompts.len(), c.n)));
    }
    if let (true, Some(k)) = (echo, logprobs) {
        let entries = prompts.iter().map(|p| p.0.len()).sum::<usize>() * (1 + k as usize);
        if entries > MAX_SCORED_ENTRIES {
            return Err(ApiError::field("prompt", format!("scoring these prompts takes {entries} log-probabilities (alternatives included), more than the {MAX_SCORED_ENTRIES} one request may ask for; send fewer prompts or fewer `logprobs`")));
        }
    }
    // OpenAI's legacy completions default to 16 tokens (as vLLM's do).
    let default = state.config.limits.max_tokens.map_or(LEGACY_DEFAULT_MAX_TOKENS, |cap| cap.min(LEGACY_DEFAULT_MAX_TOKENS));
    let id = random_id("cmpl-");
    let mut requests = Vec::with_capacity(prompts.len());
    for (i, (prompt, _)) in prompts.iter().enumerate() {
        let field = if prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{i}]") };
        let budget = check_context(&model, prompt.len(), c.max_tokens, Some(default), (&field, "max_tokens"))?;
        let mut request = generate_request(prompt.clone(), &c, logprobs.is_some(), logprobs.unwrap_or(0) as u32, &id, constraint.clone());
        request.max_tokens = budget;
        // Echoed prompt tokens come with their log-probabilities too (as lm-evaluation-harness
        // scores continuations: `echo`, `logprobs` and one generated token).
        if echo {
            request.prompt_logprobs = logprobs.map(|k| k as u32);
        }
        requests.push(request);
    }
    admit(state)?;
    // Each prompt is routed on its own, and they all run at once.
    let starts = requests.into_iter().map(|r| {
        let key = route_key(headers, &r.prompt);
        Generation::start(state, &model, r, key, started)
    });
    let mut generations = futures_util::future::try_join_all(starts).await?;
    let created = unix_now();
    let mut echoes = Vec::with_capacity(prompts.len());
    for (g, (prompt, text)) in generations.iter_mut().zip(prompts) {
        let logprobs = match (echo, logprobs) {
            (true, Some(_)) => Some(fmt::prompt_logprobs(&model.tokenizer, &prompt, g.prompt_logprobs().await?)),
            _ => None,
        };
        echoes.push(Echo { text: if echo { text } else { String::new() }, logprobs });
    }
    let n = c.n as usize;
    let choices_count = n * generations.len();
    let mut updates = Batch::new(generations, c.n);
    if c.stream {
        return Ok(stream_completion(updates, model, c, (id, created), logprobs.is_some(), echoes, score_only));
    }
    let mut choices = collect(&mut updates, choices_count, logprobs.is_some()).await?.0;
    if score_only {
        for ch in &mut choices {
            ch.text.clear();
            ch.tokens.clear();
            ch.done.iter_mut().for_each(drop_generated);
        }
    }
    let totals = Totals::of_prompts(&choices, n);
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let echoed = &echoes[i / n];
            let generated = || fmt::completion_logprobs(&model.tokenizer, &ch.tokens, echoed.text.len());
            let lp = match (&echoed.logprobs, logprobs) {
                (Some(p), _) => fmt::join_logprobs(p.clone(), generated()),
                (None, Some(_)) => generated(),
                (None, None) => Value::Null,
            };
            json!({
                "index": i,
                "text": format!("{}{}", echoed.text, ch.text),
                "logprobs": lp,
                "finish_reason": ch.done.as_ref().map(fmt::finish_reason),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model.info.model_id,
        "choices": choices,
        "usage": fmt::usage(&totals),
    }))
    .into_response())
}

/// Makes a completion's end that of a prompt scored without generating (`max_tokens: 0`).
fn drop_generated(d: &mut pb::DoneEvent) {
    d.tail.clear();
    d.stop_sequence = None;
    d.finish = pb::FinishReason::Length as i32;
    if let Some(u) = d.usage.as_mut() {
        u.completion_tokens = 0;
    }
}

/// A streamed completions response: each choice first echoes its prompt (when asked), then
/// its tokens; choices of several prompts interleave, told apart by `index`.
fn stream_completion(updates: impl Updates, model: Arc<ModelState>, c: Common, (id, created): (String, u64), logprobs: bool, echoes: Vec<Echo>, score_only: bool) -> Response {
    let chunker = Chunker { id, object: "text_completion", created, model: model.info.model_id.clone(), include_usage: c.include_usage };
    let n = c.n as usize;
    let mut first = Vec::new();
    for (i, echo) in echoes.iter().flat_map(|e| std::iter::repeat_n(e, n)).enumerate() {
        if !echo.text.is_empty() {
            let lp = echo.logprobs.clone().unwrap_or(Value::Null);
            first.push(chunker.chunk(json!([{ "index": i, "text": echo.text, "logprobs": lp, "finish_reason": null }])));
        }
    }
    let mut offsets: Vec<usize> = echoes.iter().flat_map(|e| std::iter::repeat_n(e.text.len(), n)).collect();
    // Usage counts each prompt once, whatever its number of completions.
    let mut per_prompt = vec![Totals::default(); echoes.len()];
    sse::stream(updates, first, move |step: Step| match step {
        Some(Ok(Update::Token(t))) => {
            if (t.text.is_empty() && !logprobs) || score_only {
                return Vec::new();
            }
            let offset = offsets.get(t.index as usize).copied().unwrap_or(0);
            let lp = if logprobs { fmt::completion_logprobs(&model.tokenizer, std::slice::from_ref(&t), offset) } else { Value::Null };
            if let Some(o) = offsets.get_mut(t.index as usize) {
                *o += t.text.len();
            }
            vec![chunker.chunk(json!([{ "index": t.index, "text": t.text, "logprobs": lp, "finish_reason": null }]))]
        }
        Some(Ok(Update::Done(mut d))) => {
            if let Err(e) = super::collect::cancelled_is_error(&d) {
                return error_event(&e);
            }
            if score_only {
                drop_generated(&mut d);
            }
            if let Some(t) = per_prompt.get_mut(d.index as usize / n.max(1)) {
                t.add(&d);
            }
            vec![chunker.chunk(json!([{ "index": d.index, "text": d.tail, "logprobs": null, "finish_reason": fmt::finish_reason(&d) }]))]
        }
        Some(Err(e)) => error_event(&e),
        None => {
            let mut totals = Totals::default();
            per_prompt.iter().for_each(|t| totals.plus(t));
            chunker.end(&totals)
        }
    })
}

fn model_object(m: &ModelState, anthropic: bool) -> Value {
    if anthropic {
        json!({ "type": "model", "id": m.info.model_id, "display_name": m.info.display_name, "created_at": "1970-01-01T00:00:00Z" })
    } else {
        json!({
            "id": m.info.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "kiln",
            "max_model_len": m.info.context_length,
            "architecture": m.info.architecture,
            "weight_format": m.info.weight_format,
            "kind": if m.info.kind == pb::ModelKind::Embed as i32 { "embedding" } else { "generation" },
            "dimensions": (m.info.dimensions > 0).then_some(m.info.dimensions),
            // Which input kinds the model takes: text, and images for vision-language models.
            "input_modalities": if m.info.vision.is_some() { json!(["text", "image"]) } else { json!(["text"]) },
        })
    }
}

/// Anthropic's SDK lists models on the same path; its `anthropic-version` header selects
/// its response shape.
fn wants_anthropic(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let anthropic = wants_anthropic(&headers);
    let data: Vec<Value> = state.pool.models().iter().map(|m| model_object(m, anthropic)).collect();
    if anthropic {
        let first = data.first().and_then(|m| m["id"].as_str()).map(str::to_string);
        let last = data.last().and_then(|m| m["id"].as_str()).map(str::to_string);
        return Json(json!({ "data": data, "has_more": false, "first_id": first, "last_id": last })).into_response();
    }
    Json(json!({ "object": "list", "data": data })).into_response()
}

pub async fn model(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let anthropic = wants_anthropic(&headers);
    let flavor = if anthropic { crate::error::Flavor::Anthropic } else { crate::error::Flavor::OpenAi };
    match resolve_model(&state, &id) {
        Ok(m) => labelled(&id, Json(model_object(&m, anthropic))),
        Err(e) => e.with_flavor(flavor).into_response(),
    }
}
