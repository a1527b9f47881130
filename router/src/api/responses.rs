//! OpenAI's Responses API: `POST /v1/responses`, answered whole or streamed as its typed
//! events (`response.created` … `response.completed`). kiln keeps no responses: a request
//! carries its whole conversation in `input` (the `output` items of earlier responses can be
//! passed back as they are), every response says `store: false`, and `previous_response_id`
//! is refused with that advice. Function tools, structured output (`text.format`) and token
//! log-probabilities work as in chat, over the prompt a chat request with the same
//! conversation gets; `mcp` tools (the router's own MCP servers) run in `responses_mcp`.

use super::openai_format::{self as fmt, Common};
use super::sse::{self, Step};
use super::{admit, answer, check_context, collect, random_id, unix_now, ConversationPrompt, Totals};
use crate::error::{ApiError, Flavor};
use crate::generate::{Generation, Update};
use crate::mcp::client::RemoteTool;
use crate::params::{parse_object, Fields};
use crate::routing::RouteKey;
use crate::tools::{CallReader, Delta, Format, Part, Tool, ToolCall, ToolChoice, Turn};
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

/// `top_k`, `min_p` and `seed` are kiln's sampling extensions, as on chat.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stream",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "include",
    "top_logprobs",
    "store",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "truncation",
    "max_tool_calls",
];
const UNSUPPORTED: &[&str] = &["background", "prompt", "reasoning", "service_tier", "stream_options"];
/// Fields that need responses kept on the server.
const STORED_STATE: &[&str] = &["previous_response_id", "conversation"];
const NO_STORE: &str = "kiln keeps no responses; send the whole conversation in `input` (the `output` items of earlier responses can be passed back as they are)";
/// OpenAI's bounds on `metadata`.
const METADATA_KEYS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

pub async fn create(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(Flavor::OpenAi, async {
        let mut model_id = None;
        let result = create_inner(&state, &headers, &body, &mut model_id).await;
        (model_id, result)
    })
    .await
}

/// `GET`, `DELETE` and the other routes under `/v1/responses/{id}`: nothing is stored.
pub async fn not_stored(Path(rest): Path<String>) -> Response {
    let id = rest.split('/').next().unwrap_or_default();
    ApiError::not_found(format!("response `{id}` does not exist: {NO_STORE}")).into_response()
}

async fn create_inner(state: &Arc<AppState>, headers: &HeaderMap, body: &[u8], model_id: &mut Option<String>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let map = parse_object(body)?;
    if let Some(key) = STORED_STATE.iter().find(|k| map.get(**k).is_some_and(|v| !v.is_null())) {
        return Err(ApiError::field(*key, format!("is not supported: {NO_STORE}")));
    }
    let f = Fields::new(&map, "", FIELDS, UNSUPPORTED)?;
    let model = super::resolve_generator(state, &super::openai::model_of(state, &f)?)?;
    *model_id = Some(model.info.model_id.clone());
    let limits = &state.config.limits;
    let (mut turns, listed) = input_turns(&f, limits.max_messages)?;
    super::images::resolve(state, &mut turns, &Default::default()).await?;
    let remote = super::responses_mcp::requested_tools(state, &f)?;
    let (tools, choice, parallel) = response_tools(&f, remote.as_deref().unwrap_or_default())?;
    let format = super::structured::text_format(&f)?;
    let mut c = fmt::common(&f, &model, None, limits)?;
    let max_output = f.int("max_output_tokens", 1, i64::from(model.info.context_length))?.map(|m| m as u32);
    fmt::check_max_tokens(max_output, "max_output_tokens", limits)?;
    let (logprobs, top_logprobs) = logprobs_wanted(&f)?;
    let truncate = match f.str("truncation")? {
        None | Some("disabled") => false,
        Some("auto") => true,
        Some(other) => return Err(ApiError::field("truncation", format!("unknown value `{other}`; expected disabled or auto"))),
    };
    let max_tool_calls = f.int("max_tool_calls", 1, i64::from(u32::MAX))?.map(|m| m as usize);
    f.bool("store")?;
    for key in ["safety_identifier", "prompt_cache_key"] {
        f.str(key)?;
    }
    let metadata = metadata(&f)?;
    // Requests sharing a `prompt_cache_key` go to the same worker, as a session does.
    let session = super::session(headers).or(f.str("prompt_cache_key")?);
    if let Some(remote) = remote {
        if logprobs {
            return Err(ApiError::field("include", "log-probabilities are not returned for requests using MCP tools"));
        }
        if format.is_some() {
            return Err(ApiError::field("text.format", "MCP tools cannot be combined with a json_object or json_schema format"));
        }
        if truncate {
            let offered: Vec<Tool> = tools.iter().cloned().chain(remote.iter().map(super::mcp_loop::offered)).collect();
            fitted(&model, &mut turns, &offered, &choice, parallel, max_output)?;
        }
        super::images::check_all(&crate::tools::images(&turns), Default::default()).await?;
        admit(state)?;
        let head = Head { id: random_id("resp_"), created_at: unix_now(), echo: echo(&f, &model.info.model_id, &c, max_output, &tools, &choice, parallel, metadata)? };
        c.max_tokens = max_output;
        let run = super::mcp_loop::ToolLoop {
            state: Arc::clone(state),
            model,
            turns,
            tools,
            remote,
            choice,
            parallel,
            c,
            session: session.map(str::to_string),
            started,
            call_ids: "mcp_",
            arguments_as_objects: false,
            context_fields: ("input", "max_output_tokens"),
            max_calls: max_tool_calls,
        };
        return super::responses_mcp::respond(run, head, listed).await;
    }
    let conversation = if truncate {
        fitted(&model, &mut turns, &tools, &choice, parallel, max_output)?
    } else {
        super::conversation_prompt(&model, &turns, &tools, &choice, parallel, false).map_err(named_input)?
    };
    if conversation.grammar.is_some() && format.is_some() {
        return Err(ApiError::field("tool_choice", "function calls cannot be combined with a json_object or json_schema `text.format`; set tool_choice to none"));
    }
    let constraint = conversation.grammar.or(format);
    let prompt = conversation.tokens;
    c.max_tokens = check_context(&model, prompt.len(), max_output, limits.max_tokens, ("input", "max_output_tokens"))?;
    super::images::check_all(&crate::tools::images(&turns), Default::default()).await?;
    admit(state)?;
    let head = Head {
        id: random_id("resp_"),
        created_at: unix_now(),
        echo: echo(&f, &model.info.model_id, &c, max_output, &tools, &choice, parallel, metadata)?,
    };
    let key = RouteKey::new(session, &prompt);
    let mut request = super::openai::generate_request(prompt, &c, logprobs, top_logprobs, &head.id, constraint);
    request.images = conversation.images;
    let mut generation = Generation::start(state, &model, request, key, started).await?;
    let vocabulary = Arc::clone(&model);
    let logprobs_of = move |t: &pb::TokenEvent| if logprobs { fmt::token_logprobs(&vocabulary.tokenizer, std::slice::from_ref(t)) } else { Vec::new() };
    let mut output = Output::new(conversation.calls);
    if c.stream {
        return Ok(stream(generation, head, output, logprobs_of));
    }
    let (choices, totals) = collect(&mut generation, 1, logprobs).await?;
    let choice = choices.into_iter().next().unwrap_or_default();
    let done = choice.done.unwrap_or_default();
    if logprobs {
        for t in &choice.tokens {
            output.push(&t.text, logprobs_of(t));
        }
        output.push(&done.tail, Vec::new());
    } else {
        output.push(&choice.text, Vec::new());
    }
    let status = Status::of(&done);
    output.finish(status);
    Ok(Json(head.finished(status, &output.items, &totals)).into_response())
}

/// The prompt builder's errors name chat's `messages`; here the conversation is `input`.
pub(super) fn named_input(e: ApiError) -> ApiError {
    match e.param.as_deref() {
        Some("messages") => ApiError::field("input", e.message.strip_prefix("`messages`: ").unwrap_or(&e.message)),
        _ => e,
    }
}

/// `truncation: "auto"`: while the prompt and `max_output_tokens` (at least one token) do not
/// fit the context, drops the oldest exchange (a user message and what follows it up to the
/// next user message: answers, calls and their outputs go together, so no output is left
/// without its call). Leading system messages (`instructions`) stay, and so does the last
/// exchange: a conversation that does not fit even then is refused with its size.
fn fitted(model: &ModelState, turns: &mut Vec<Turn>, tools: &[Tool], choice: &ToolChoice, parallel: bool, max_output: Option<u32>) -> Result<ConversationPrompt, ApiError> {
    let context = model.info.context_length as usize;
    loop {
        let conversation = super::conversation_prompt(model, turns, tools, choice, parallel, false).map_err(named_input)?;
        if conversation.tokens.len() + max_output.unwrap_or(1) as usize <= context || !drop_oldest_exchange(turns) {
            return Ok(conversation);
        }
    }
}

/// Drops the first exchange after the leading system messages; false when it is the last.
fn drop_oldest_exchange(turns: &mut Vec<Turn>) -> bool {
    let Some(first) = turns.iter().position(|t| t.role != "system") else { return false };
    let Some(next) = turns[first + 1..].iter().position(|t| t.role == "user") else { return false };
    turns.drain(first..first + 1 + next);
    true
}

/// The conversation in `instructions` and `input`: a string (one user message) or an array
/// of items: messages, the function calls of earlier answers and their outputs, the MCP calls
/// the router made in them. Also the servers whose `mcp_list_tools` items the input holds.
fn input_turns(f: &Fields, max: usize) -> Result<(Vec<Turn>, Vec<String>), ApiError> {
    let mut turns = Vec::new();
    let mut listed = Vec::new();
    if let Some(text) = f.str("instructions")? {
        turns.push(Turn { role: "system".into(), content: text.into(), ..Turn::default() });
    }
    let items = match f.require("input")? {
        Value::String(s) => {
            turns.push(Turn { role: "user".into(), content: s.clone(), ..Turn::default() });
            return Ok((turns, listed));
        }
        Value::Array(items) if items.is_empty() => return Err(ApiError::field("input", "must contain at least one item")),
        Value::Array(items) if items.len() > max => return Err(ApiError::field("input", format!("{} items; at most {max} are allowed", items.len()))),
        Value::Array(items) => items,
        _ => return Err(ApiError::field("input", "expected a string or an array of input items")),
    };
    let mut call_ids: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("input[{i}].");
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("input[{i}]"), "expected an object")) };
        // An item with a role and no type is a message (the "easy input message").
        let kind = match obj.get("type") {
            None | Some(Value::Null) if obj.contains_key("role") => "message",
            Some(Value::String(kind)) => kind.as_str(),
            None | Some(Value::Null) => return Err(ApiError::field(format!("{path}type"), "is required")),
            Some(_) => return Err(ApiError::field(format!("{path}type"), "expected a string")),
        };
        match kind {
            "message" => turns.push(message(obj, &path)?),
            "function_call" => {
                let c = Fields::new(obj, &path, &["type", "id", "call_id", "name", "arguments", "status"], &[])?;
                let call_id = c.str("call_id")?.ok_or_else(|| ApiError::field(c.name("call_id"), "is required"))?;
                let name = c.str("name")?.ok_or_else(|| ApiError::field(c.name("name"), "is required"))?;
                let arguments = c.str("arguments")?.ok_or_else(|| ApiError::field(c.name("arguments"), "is required (a string of JSON)"))?;
                if serde_json::from_str::<Value>(arguments).is_err() {
                    return Err(ApiError::field(c.name("arguments"), "must be a string of JSON"));
                }
                c.str("id")?;
                c.str("status")?;
                call_ids.push(call_id.to_string());
                let call = ToolCall { id: call_id.into(), name: name.into(), arguments: arguments.into() };
                // Calls that follow an assistant message (or each other) belong to that answer.
                match turns.last_mut() {
                    Some(t) if t.role == "assistant" => t.tool_calls.push(call),
                    _ => turns.push(Turn { role: "assistant".into(), tool_calls: vec![call], ..Turn::default() }),
                }
            }
            "function_call_output" => {
                let o = Fields::new(obj, &path, &["type", "id", "call_id", "output", "status"], &[])?;
                let call_id = o.str("call_id")?.ok_or_else(|| ApiError::field(o.name("call_id"), "is required"))?;
                if !call_ids.iter().any(|id| id == call_id) {
                    return Err(ApiError::field(o.name("call_id"), format!("no function_call item before this one has call_id `{call_id}`")));
                }
                o.str("id")?;
                o.str("status")?;
                let content = match o.require("output")? {
                    Value::String(s) => s.clone(),
                    Value::Array(parts) => text_parts(parts, &o.name("output"))?,
                    _ => return Err(ApiError::field(o.name("output"), "expected a string or an array of input_text parts")),
                };
                turns.push(Turn { role: "tool".into(), content, tool_call_id: Some(call_id.into()), ..Turn::default() });
            }
            "mcp_call" => {
                let c = Fields::new(obj, &path, &["type", "id", "server_label", "name", "arguments", "output", "error", "status", "approval_request_id"], &[])?;
                super::responses_mcp::call_item(&c, &mut turns)?;
            }
            // What the model was offered is the request's `tools`; the list only says which
            // servers need no new one.
            "mcp_list_tools" => {
                let l = Fields::new(obj, &path, &["type", "id", "server_label", "tools", "error"], &[])?;
                listed.push(l.str("server_label")?.ok_or_else(|| ApiError::field(l.name("server_label"), "is required"))?.to_string());
            }
            "mcp_approval_request" | "mcp_approval_response" => {
                return Err(ApiError::field(format!("{path}type"), format!("approval items are not supported: {}", super::responses_mcp::NO_APPROVALS)))
            }
            "reasoning" => return Err(ApiError::field(format!("{path}type"), "reasoning items are not supported: the models kiln serves produce none")),
            "item_reference" => return Err(ApiError::field(format!("{path}type"), "item references are not supported: kiln keeps no items; send the item itself")),
            other => return Err(ApiError::field(format!("{path}type"), format!("unknown item type `{other}`; expected message, function_call, function_call_output, mcp_call or mcp_list_tools"))),
        }
    }
    Ok((turns, listed))
}

/// A message item: `role` (`developer` counts as system) and `content`, a string or an array
/// of `input_text`, `output_text` and `refusal` parts, and in user messages `input_image` parts.
fn message(obj: &Map<String, Value>, path: &str) -> Result<Turn, ApiError> {
    let m = Fields::new(obj, path, &["type", "role", "content", "id", "status"], &[])?;
    let role = match m.str("role")? {
        Some("developer") => "system",
        Some(r @ ("system" | "user" | "assistant")) => r,
        Some(other) => return Err(ApiError::field(m.name("role"), format!("unknown role `{other}`; expected user, assistant, system or developer"))),
        None => return Err(ApiError::field(m.name("role"), "is required")),
    };
    m.str("id")?;
    m.str("status")?;
    let items = match m.require("content")? {
        Value::String(s) => return Ok(Turn { role: role.into(), content: s.clone(), ..Turn::default() }),
        Value::Array(items) => items,
        _ => return Err(ApiError::field(m.name("content"), "expected a string or an array of content parts")),
    };
    let (mut text, mut parts, mut images) = (String::new(), Vec::new(), false);
    for (j, part) in items.iter().enumerate() {
        let p = format!("{path}content[{j}].");
        let Some(obj) = part.as_object() else { return Err(ApiError::field(format!("{path}content[{j}]"), "expected a content part object")) };
        let (fields, key) = match (role, obj.get("type").and_then(Value::as_str)) {
            (_, Some("input_text")) => (Fields::new(obj, &p, &["type", "text"], &[])?, "text"),
            ("assistant", Some("output_text")) => (Fields::new(obj, &p, &["type", "text", "annotations", "logprobs"], &[])?, "text"),
            ("assistant", Some("refusal")) => (Fields::new(obj, &p, &["type", "refusal"], &[])?, "refusal"),
            ("user", Some("input_image")) => {
                let im = Fields::new(obj, &p, &["type", "image_url", "detail", "file_id"], &["file_id"])?;
                if let Some(d) = im.str("detail")?.filter(|d| !matches!(*d, "auto" | "low" | "high")) {
                    return Err(ApiError::field(im.name("detail"), format!("unknown value `{d}`; expected auto, low or high")));
                }
                let url = im.str("image_url")?.ok_or_else(|| ApiError::field(im.name("image_url"), "is required (a data: or http(s) URL)"))?;
                parts.push(super::images::from_url(url, &im.name("image_url"), &Default::default())?);
                images = true;
                continue;
            }
            (_, Some(kind @ ("input_image" | "output_text" | "refusal"))) => return Err(ApiError::field(format!("{p}type"), format!("`{kind}` parts are not allowed in {role} messages"))),
            (_, Some(other)) => return Err(ApiError::field(format!("{p}type"), format!("`{other}` parts are not supported; expected input_text, output_text or input_image"))),
            (_, None) => return Err(ApiError::field(format!("{p}type"), "is required (a string)")),
        };
        let t = fields.str(key)?.ok_or_else(|| ApiError::field(fields.name(key), "is required"))?;
        text.push_str(t);
        parts.push(Part::Text(t.to_string()));
    }
    Ok(Turn { role: role.into(), content: text, parts: if images { parts } else { Vec::new() }, ..Turn::default() })
}

/// The text of a function call's output given as `input_text` parts.
fn text_parts(parts: &[Value], name: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let p = format!("{name}[{j}].");
        let Some(obj) = part.as_object() else { return Err(ApiError::field(format!("{name}[{j}]"), "expected a content part object")) };
        match obj.get("type").and_then(Value::as_str) {
            Some("input_text") => text.push_str(Fields::new(obj, &p, &["type", "text"], &[])?.str("text")?.ok_or_else(|| ApiError::field(format!("{p}text"), "is required"))?),
            Some(other) => return Err(ApiError::field(format!("{p}type"), format!("`{other}` parts are not supported in a function call's output; only input_text"))),
            None => return Err(ApiError::field(format!("{p}type"), "is required (a string)")),
        }
    }
    Ok(text)
}

/// `tools` (`{type: "function", name, description?, parameters?, strict?}`, strict unless
/// `strict: false`, as OpenAI's; `mcp` entries are `responses_mcp`'s, and `remote` their
/// tools), `tool_choice` and `parallel_tool_calls`.
fn response_tools(f: &Fields, remote: &[RemoteTool]) -> Result<(Vec<Tool>, ToolChoice, bool), ApiError> {
    let mcp: Vec<&str> = remote.iter().map(|t| t.name.as_str()).collect();
    let mut tools: Vec<Tool> = Vec::new();
    for (i, item) in f.array("tools")?.map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        let p = format!("tools[{i}].");
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("tools[{i}]"), "expected an object")) };
        match obj.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some("mcp") => continue,
            Some(other) => return Err(ApiError::field(format!("{p}type"), format!("`{other}` tools are not supported; only function and mcp tools"))),
            None => return Err(ApiError::field(format!("{p}type"), "is required (a string)")),
        }
        let t = Fields::new(obj, &p, &["type", "name", "description", "parameters", "strict"], &[])?;
        tools.push(super::function_tool(&t, &tools, &mcp, true)?);
    }
    let none_offered = tools.is_empty() && remote.is_empty();
    let choice = match f.get("tool_choice") {
        None if none_offered => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => super::tool_choice_word(s)?,
        Some(Value::Object(o)) => {
            let c = Fields::new(o, "tool_choice.", &["type", "name", "server_label"], &[])?;
            match c.str("type")? {
                Some("function") => {}
                Some("mcp") => return Ok((tools, ToolChoice::Named(super::responses_mcp::choice(&c, remote)?), f.bool("parallel_tool_calls")?.unwrap_or(true))),
                Some(other) => return Err(ApiError::field(c.name("type"), format!("`{other}` is not supported; expected function or mcp"))),
                None => return Err(ApiError::field(c.name("type"), "is required")),
            }
            let name = c.str("name")?.ok_or_else(|| ApiError::field(c.name("name"), "is required"))?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::field(c.name("name"), format!("`{name}` is not one of the tools")));
            }
            ToolChoice::Named(name.into())
        }
        Some(_) => return Err(ApiError::field("tool_choice", "expected a string or an object")),
    };
    if choice != ToolChoice::None && none_offered {
        return Err(ApiError::field("tool_choice", "needs `tools`"));
    }
    Ok((tools, choice, f.bool("parallel_tool_calls")?.unwrap_or(true)))
}

/// Whether tokens' log-probabilities are returned (`include: ["message.output_text.logprobs"]`,
/// or `top_logprobs` above 0), and with how many alternatives.
fn logprobs_wanted(f: &Fields) -> Result<(bool, u32), ApiError> {
    let mut logprobs = false;
    for (i, v) in f.array("include")?.map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        match v.as_str() {
            Some("message.output_text.logprobs") => logprobs = true,
            // No reasoning items are made, so there is nothing encrypted to include.
            Some("reasoning.encrypted_content") => {}
            Some(other) => return Err(ApiError::field(format!("include[{i}]"), format!("`{other}` is not supported; expected message.output_text.logprobs"))),
            None => return Err(ApiError::field(format!("include[{i}]"), "expected a string")),
        }
    }
    let top = f.int("top_logprobs", 0, 20)?.unwrap_or(0) as u32;
    Ok((logprobs || top > 0, top))
}

/// `metadata`: up to 16 string values under keys of up to 64 characters (values up to 512).
fn metadata(f: &Fields) -> Result<Value, ApiError> {
    let Some(map) = f.object("metadata")? else { return Ok(json!({})) };
    if map.len() > METADATA_KEYS {
        return Err(ApiError::field("metadata", format!("{} keys; at most {METADATA_KEYS} are allowed", map.len())));
    }
    for (key, value) in map {
        let name = format!("metadata.{key}");
        if key.chars().count() > METADATA_KEY_CHARS {
            return Err(ApiError::field("metadata", format!("a key is longer than {METADATA_KEY_CHARS} characters")));
        }
        match value.as_str() {
            Some(v) if v.chars().count() > METADATA_VALUE_CHARS => return Err(ApiError::field(name, format!("is longer than {METADATA_VALUE_CHARS} characters"))),
            Some(_) => {}
            None => return Err(ApiError::field(name, "expected a string")),
        }
    }
    Ok(Value::Object(map.clone()))
}

/// The request's settings as every response object repeats them.
#[allow(clippy::too_many_arguments)]
fn echo(f: &Fields, model: &str, c: &Common, max_output: Option<u32>, tools: &[Tool], choice: &ToolChoice, parallel: bool, metadata: Value) -> Result<Map<String, Value>, ApiError> {
    // In the request's order: functions as the router read them, MCP servers as given.
    let mut functions = tools.iter();
    let tools: Vec<Value> = f
        .array("tools")?
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|item| match item.get("type").and_then(Value::as_str) {
            Some("mcp") => Some(item.clone()),
            _ => functions.next().map(|t| json!({ "type": "function", "name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict })),
        })
        .collect();
    let tool_choice = match choice {
        ToolChoice::None => json!("none"),
        ToolChoice::Auto => json!("auto"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Named(name) => match f.object("tool_choice")? {
            Some(given) if given.get("type").and_then(Value::as_str) == Some("mcp") => Value::Object(given.clone()),
            _ => json!({ "type": "function", "name": name }),
        },
    };
    let text = match f.object("text")?.and_then(|t| t.get("format")).filter(|v| !v.is_null()) {
        Some(format) => json!({ "format": format }),
        None => json!({ "format": { "type": "text" } }),
    };
    let echoed = json!({
        "background": false,
        "instructions": f.str("instructions")?,
        "max_output_tokens": max_output,
        "max_tool_calls": f.get("max_tool_calls"),
        "metadata": metadata,
        "model": model,
        "parallel_tool_calls": parallel,
        "previous_response_id": null,
        "prompt_cache_key": f.str("prompt_cache_key")?,
        "reasoning": { "effort": null, "summary": null },
        "safety_identifier": f.str("safety_identifier")?,
        "service_tier": "default",
        "store": false,
        "temperature": c.sampling.temperature,
        "text": text,
        "tool_choice": tool_choice,
        "tools": tools,
        "top_logprobs": f.get("top_logprobs").cloned().unwrap_or(json!(0)),
        "top_p": c.sampling.top_p,
        "truncation": f.str("truncation")?.unwrap_or("disabled"),
        "user": c.user,
    });
    Ok(match echoed {
        Value::Object(map) => map,
        _ => Map::new(),
    })
}

/// How a response ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Completed,
    /// Cut off by `max_output_tokens` or the context.
    Incomplete,
}

impl Status {
    pub(super) fn of(done: &pb::DoneEvent) -> Status {
        if fmt::finish_reason(done) == "length" {
            Status::Incomplete
        } else {
            Status::Completed
        }
    }

    fn name(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::Incomplete => "incomplete",
        }
    }
}

/// The response object's fixed part.
pub(super) struct Head {
    id: String,
    created_at: u64,
    echo: Map<String, Value>,
}

impl Head {
    pub(super) fn object(&self, status: &str, output: &[Value]) -> Value {
        let mut v = self.echo.clone();
        for (key, value) in [
            ("id", json!(self.id)),
            ("object", json!("response")),
            ("created_at", json!(self.created_at)),
            ("status", json!(status)),
            ("error", Value::Null),
            ("incomplete_details", Value::Null),
            ("output", json!(output)),
            ("usage", Value::Null),
        ] {
            v.insert(key.into(), value);
        }
        Value::Object(v)
    }

    pub(super) fn finished(&self, status: Status, output: &[Value], totals: &Totals) -> Value {
        let mut v = self.object(status.name(), output);
        match status {
            Status::Completed => v["completed_at"] = json!(unix_now()),
            Status::Incomplete => v["incomplete_details"] = json!({ "reason": "max_output_tokens" }),
        }
        v["usage"] = usage(totals);
        v
    }

    pub(super) fn failed(&self, output: &[Value], e: &ApiError) -> Value {
        let mut v = self.object("failed", output);
        let code = if e.status.is_server_error() { "server_error" } else { "invalid_prompt" };
        v["error"] = json!({ "code": code, "message": e.message });
        v
    }
}

fn usage(t: &Totals) -> Value {
    json!({
        "input_tokens": t.prompt_tokens,
        "input_tokens_details": { "cached_tokens": t.cached_tokens },
        "output_tokens": t.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": t.prompt_tokens + t.completion_tokens,
    })
}

/// The response's output items as the answer is read: a message whose text grows, or
/// function calls whose arguments do; every change is also the stream event that tells it.
pub(super) struct Output {
    reader: Option<CallReader>,
    pub(super) items: Vec<Value>,
    /// The last item is still being written.
    open: bool,
    /// Log-probabilities of tokens whose text is not shown yet (held back by the call reader).
    pending: Vec<Value>,
    sequence: u64,
}

impl Output {
    pub(super) fn new(calls: Option<Format>) -> Output {
        Output { reader: calls.map(CallReader::new), items: Vec::new(), open: false, pending: Vec::new(), sequence: 0 }
    }

    pub(super) fn event(&mut self, kind: &str, mut body: Value) -> Event {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Event::default().event(kind).data(body.to_string())
    }

    /// Text the model wrote, with its tokens' log-probabilities.
    pub(super) fn push(&mut self, text: &str, logprobs: Vec<Value>) -> Vec<Event> {
        self.pending.extend(logprobs);
        let deltas = match &mut self.reader {
            Some(r) => r.push(text),
            None => vec![Delta::Text(text.to_string())],
        };
        self.apply(deltas)
    }

    fn apply(&mut self, deltas: Vec<Delta>) -> Vec<Event> {
        let mut out = Vec::new();
        for d in deltas {
            match d {
                Delta::Text(t) if t.is_empty() && self.pending.is_empty() => {}
                Delta::Text(t) => {
                    if !self.open || self.items.last().is_some_and(|i| i["type"] != "message") {
                        out.extend(self.close(Status::Completed));
                        out.extend(self.open_item(json!({
                            "id": random_id("msg_"), "type": "message", "status": "in_progress", "role": "assistant", "content": [],
                        })));
                    }
                    let logprobs = std::mem::take(&mut self.pending);
                    let index = self.items.len() - 1;
                    let part = &mut self.items[index]["content"][0];
                    if let Value::String(s) = &mut part["text"] {
                        s.push_str(&t);
                    }
                    if let Some(all) = part["logprobs"].as_array_mut() {
                        all.extend(logprobs.iter().cloned());
                    }
                    let id = self.items[index]["id"].clone();
                    out.push(self.event(
                        "response.output_text.delta",
                        json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": logprobs }),
                    ));
                }
                Delta::CallStart { name, .. } => {
                    out.extend(self.close(Status::Completed));
                    out.extend(self.open_item(json!({
                        "id": random_id("fc_"), "type": "function_call", "status": "in_progress",
                        "call_id": random_id("call_"), "name": name, "arguments": "",
                    })));
                }
                Delta::Arguments { fragment, .. } => {
                    let Some(index) = self.items.len().checked_sub(1) else { continue };
                    let item = &mut self.items[index];
                    if let Value::String(s) = &mut item["arguments"] {
                        s.push_str(&fragment);
                    }
                    let id = item["id"].clone();
                    out.push(self.event("response.function_call_arguments.delta", json!({ "item_id": id, "output_index": index, "delta": fragment })));
                }
            }
        }
        out
    }

    /// Adds a finished item that is not written piece by piece (an MCP tool list or call).
    pub(super) fn add(&mut self, item: Value) -> (usize, Event) {
        let index = self.items.len();
        self.items.push(item.clone());
        (index, self.event("response.output_item.added", json!({ "output_index": index, "item": item })))
    }

    /// A function call known whole (the last round of an MCP tool loop).
    pub(super) fn function_call(&mut self, id: &str, call_id: &str, name: &str, arguments: &str) -> Vec<Event> {
        let mut out = self.close(Status::Completed);
        out.extend(self.open_item(json!({ "id": id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name, "arguments": "" })));
        out.extend(self.apply(vec![Delta::Arguments { index: 0, fragment: arguments.to_string() }]));
        out
    }

    /// Adds an item (a message gets its one `output_text` part at once).
    fn open_item(&mut self, item: Value) -> Vec<Event> {
        let index = self.items.len();
        let message = item["type"] == "message";
        let id = item["id"].clone();
        self.items.push(item.clone());
        self.open = true;
        let mut out = vec![self.event("response.output_item.added", json!({ "output_index": index, "item": item }))];
        if message {
            let part = json!({ "type": "output_text", "text": "", "annotations": [], "logprobs": [] });
            self.items[index]["content"] = json!([part]);
            out.push(self.event("response.content_part.added", json!({ "item_id": id, "output_index": index, "content_index": 0, "part": part })));
        }
        out
    }

    /// Closes the item being written, with `status`.
    pub(super) fn close(&mut self, status: Status) -> Vec<Event> {
        if !std::mem::take(&mut self.open) {
            return Vec::new();
        }
        let index = self.items.len() - 1;
        self.items[index]["status"] = json!(status.name());
        let item = self.items[index].clone();
        let id = item["id"].clone();
        let mut out = Vec::new();
        if item["type"] == "message" {
            let part = item["content"][0].clone();
            out.push(self.event(
                "response.output_text.done",
                json!({ "item_id": id, "output_index": index, "content_index": 0, "text": part["text"], "logprobs": part["logprobs"] }),
            ));
            out.push(self.event("response.content_part.done", json!({ "item_id": id, "output_index": index, "content_index": 0, "part": part })));
        } else {
            out.push(self.event(
                "response.function_call_arguments.done",
                json!({ "item_id": id, "output_index": index, "name": item["name"], "arguments": item["arguments"] }),
            ));
        }
        out.push(self.event("response.output_item.done", json!({ "output_index": index, "item": item })));
        out
    }

    /// The answer is over: text the call reader held back, at least one item (an empty
    /// message when nothing was written), and the last item closed.
    pub(super) fn finish(&mut self, status: Status) -> Vec<Event> {
        let deltas = self.reader.as_mut().map(CallReader::finish).unwrap_or_default();
        let mut out = self.apply(deltas);
        if self.items.is_empty() {
            out.extend(self.open_item(json!({ "id": random_id("msg_"), "type": "message", "status": "in_progress", "role": "assistant", "content": [] })));
        }
        out.extend(self.close(status));
        out
    }
}

fn stream(generation: Generation, head: Head, mut output: Output, logprobs_of: impl Fn(&pb::TokenEvent) -> Vec<Value> + Send + 'static) -> Response {
    let first = vec![
        output.event("response.created", json!({ "response": head.object("in_progress", &[]) })),
        output.event("response.in_progress", json!({ "response": head.object("in_progress", &[]) })),
    ];
    let mut totals = Totals::default();
    let mut done: Option<pb::DoneEvent> = None;
    let mut failed = false;
    sse::stream(generation, first, move |step: Step| {
        if failed {
            return Vec::new();
        }
        let error = match step {
            Some(Ok(Update::Token(t))) => return output.push(&t.text, logprobs_of(&t)),
            Some(Ok(Update::Done(d))) => match super::collect::cancelled_is_error(&d) {
                Ok(()) => {
                    totals.add(&d);
                    let events = output.push(&d.tail, Vec::new());
                    done = Some(d);
                    return events;
                }
                Err(e) => e,
            },
            Some(Err(e)) => e,
            None => {
                let status = Status::of(&done.take().unwrap_or_default());
                let mut out = output.finish(status);
                let kind = if status == Status::Completed { "response.completed" } else { "response.incomplete" };
                let response = head.finished(status, &output.items, &totals);
                out.push(output.event(kind, json!({ "response": response })));
                return out;
            }
        };
        // The output so far stays in the failed response; nothing follows it.
        failed = true;
        let response = head.failed(&output.items, &error);
        vec![output.event("response.failed", json!({ "response": response }))]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_drops_whole_exchanges_and_keeps_the_instructions_and_the_last() {
        let turn = |role: &str, content: &str| Turn { role: role.into(), content: content.into(), ..Turn::default() };
        let mut turns = vec![
            turn("system", "instructions"),
            turn("user", "q1"),
            Turn { role: "assistant".into(), tool_calls: vec![ToolCall { id: "c".into(), name: "f".into(), arguments: "{}".into() }], ..Turn::default() },
            turn("tool", "out"),
            turn("assistant", "a1"),
            turn("user", "q2"),
            turn("assistant", "a2"),
            turn("user", "q3"),
        ];
        let contents = |turns: &[Turn]| turns.iter().map(|t| t.content.clone()).collect::<Vec<_>>();
        assert!(drop_oldest_exchange(&mut turns));
        assert_eq!(contents(&turns), ["instructions", "q2", "a2", "q3"]);
        assert!(drop_oldest_exchange(&mut turns));
        assert_eq!(contents(&turns), ["instructions", "q3"]);
        assert!(!drop_oldest_exchange(&mut turns));
        assert_eq!(contents(&turns), ["instructions", "q3"]);
        // A conversation that opens with an answer loses it up to the first question.
        let mut turns = vec![turn("assistant", "hello"), turn("tool", "x"), turn("user", "q")];
        assert!(drop_oldest_exchange(&mut turns));
        assert_eq!(contents(&turns), ["q"]);
    }

    #[test]
    fn prompt_errors_name_input_not_messages() {
        let e = named_input(ApiError::field("messages", "the template failed: roles must alternate"));
        assert_eq!(e.param.as_deref(), Some("input"));
        assert_eq!(e.message, "`input`: the template failed: roles must alternate");
        let other = ApiError::field("input[0].content[1].image_url", "is not a usable image");
        assert_eq!(named_input(other.clone()), other);
    }
}
