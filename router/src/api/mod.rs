//! The HTTP API: routes, API-key check, CORS, per-request metrics, and what the OpenAI and
//! Anthropic handlers share (model lookup, admission, prompt building, result collection).

mod anthropic;
mod anthropic_mcp;
mod collect;
mod cors;
mod embeddings;
mod images;
mod mcp_loop;
pub(crate) mod openai;
mod openai_format;
mod responses;
mod responses_mcp;
mod sse;
mod structured;
mod tokenize;

pub use collect::{collect, Choice, Totals};

use crate::error::{ApiError, Flavor};
use crate::upstream::ModelState;
use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use kiln_shared::chat::ChatMessage;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::Instrument as _;
use std::time::Instant;
use crate::tools::{Format, Tool, ToolChoice, Turn};

/// The model a response was for, attached so the metrics layer can label it.
#[derive(Clone)]
pub struct ModelLabel(pub String);

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{*rest}", any(responses::not_stored))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), bounded_body))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_api_key))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), refuse_while_draining));
    // MCP: the same key and drain rules as the API; its own body limit (rmcp's).
    let mcp = Router::new()
        .nest_service("/mcp", crate::mcp::service(Arc::clone(&state)))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), require_api_key))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), refuse_while_draining));
    Router::new()
        .merge(api)
        .merge(mcp)
        .route("/health", get(health))
        // Liveness: the process answers HTTP. Unlike /health it stays 200 while no worker serves
        // a model or while draining, so an orchestrator does not restart a router for its
        // workers' state.
        .route("/live", get(|| std::future::ready("ok\n")))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), record))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), cors::cors))
        .layer(axum::extract::DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .with_state(state)
}

pub fn flavor_of(path: &str) -> Flavor {
    if path.starts_with("/v1/messages") {
        Flavor::Anthropic
    } else {
        Flavor::OpenAi
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Reads an API request's body within the size and time limits, answering in the API's error
/// shape when it is too large (413) or does not arrive in time (408).
async fn bounded_body(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let limits = &state.config.limits;
    let flavor = flavor_of(request.uri().path());
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(limits.client_timeout, axum::body::to_bytes(body, limits.max_body_bytes)).await {
        Err(_) => ApiError::body_timeout(format!("the request body did not arrive within {} s", limits.client_timeout.as_secs()))
            .with_flavor(flavor)
            .into_response(),
        Ok(Err(e)) if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) => {
            ApiError::too_large(format!("the request body is larger than the limit of {} bytes", limits.max_body_bytes))
                .with_flavor(flavor)
                .into_response()
        }
        Ok(Err(e)) => ApiError::bad_request(format!("the request body could not be read: {e}")).with_flavor(flavor).into_response(),
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await,
    }
}

/// While the router drains, API requests are refused with a 503 to retry elsewhere.
async fn refuse_while_draining(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return ApiError::unavailable("this router is shutting down; retry on another").with_flavor(flavor_of(request.uri().path())).into_response();
    }
    next.run(request).await
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let ok = presented_key(request.headers()).is_some_and(|k| constant_time_eq(k.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::unauthorized().with_flavor(flavor_of(request.uri().path())).into_response();
        }
    }
    next.run(request).await
}

/// Counts every response by route, model and status, and times it.
async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    // API requests are traced (probes and scrapes are not): one span from the request to the
    // end of its response, streams included, continuing the client's trace if it sent one.
    let is_api = route.starts_with("/v1/");
    let span = if is_api {
        let span = tracing::info_span!(
            "router.request",
            otel.name = %format!("{} {route}", request.method()),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %request.method(),
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            gen_ai.request.model = tracing::field::Empty,
            kiln.policy = tracing::field::Empty,
            kiln.worker = tracing::field::Empty,
            kiln.attempts = tracing::field::Empty,
            kiln.resumes = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            kiln.time_to_first_token_ms = tracing::field::Empty,
            error.message = tracing::field::Empty,
        );
        kiln_telemetry::continue_from_http(&span, request.headers());
        span
    } else {
        tracing::Span::none()
    };
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", i64::from(response.status().as_u16()));
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    // Handlers label a response only with a model they resolved to one a worker serves, so a
    // client inventing names cannot grow the series.
    let model = response.extensions().get::<ModelLabel>().map_or_else(String::new, |m| m.0.clone());
    if !model.is_empty() {
        span.record("gen_ai.request.model", model.as_str());
    }
    let status = response.status().as_u16().to_string();
    state.metrics.add("kiln_router_requests_total", vec![("route", route.clone()), ("model", model), ("status", status)], 1.0);
    if is_api {
        // For streams this is the time to the response head; the stream's end is timed by
        // the generation itself.
        state.metrics.observe("kiln_router_request_duration_seconds", vec![("route", route)], started.elapsed().as_secs_f64());
    }
    response
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let models: Vec<String> = state.pool.models().iter().map(|m| m.info.model_id.clone()).collect();
    let etcd = match &state.cluster {
        Some(view) => {
            let h = view.health();
            if h.connected {
                "etcd: connected\n".to_string()
            } else {
                format!(
                    "etcd: unreachable for {:.0} s ({}); routing from the last view\n",
                    h.since.elapsed().as_secs_f64(),
                    h.last_error.as_deref().unwrap_or("not reached yet")
                )
            }
        }
        None => String::new(),
    };
    // MCP servers are reported but never make the router unready: requests that do not use
    // their tools are unaffected, and those that do see only the connected ones.
    let mcp: String = state.mcp.iter().flat_map(|hub| hub.report()).map(|r| format!("mcp {}: {}\n", r.name, r.detail)).collect();
    if models.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("no worker is serving a model\n{etcd}{mcp}")).into_response()
    } else {
        (StatusCode::OK, format!("ok: {}\n{etcd}{mcp}", models.join(", "))).into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (in_flight, capacity) = state.pool.load();
    let mut gauges = vec![
        ("kiln_router_in_flight_requests", "Generations this router has in flight on workers.", vec![], in_flight as f64),
        ("kiln_router_worker_capacity", "Sequences the healthy workers run at once.", vec![], capacity as f64),
    ];
    for w in state.pool.workers() {
        gauges.push(("kiln_router_worker_up", "Whether a worker answers its health checks.", vec![("worker", w.id.clone())], f64::from(u8::from(w.is_healthy()))));
        gauges.push((
            "kiln_router_worker_draining",
            "Whether an operator is draining a worker.",
            vec![("worker", w.id.clone())],
            f64::from(u8::from(w.draining.load(Ordering::Relaxed))),
        ));
        gauges.push(("kiln_router_worker_in_flight", "Generations this router has in flight on a worker.", vec![("worker", w.id.clone())], w.in_flight.load(Ordering::Relaxed) as f64));
    }
    if let Some(view) = &state.cluster {
        let h = view.health();
        gauges.push(("kiln_router_etcd_connected", "Whether the router's etcd watch is live (0: routing from the last view).", vec![], f64::from(u8::from(h.connected))));
        gauges.push(("kiln_router_etcd_syncs", "Times the cluster view was read in full from etcd.", vec![], h.syncs as f64));
    }
    for r in state.mcp.iter().flat_map(|hub| hub.report()) {
        gauges.push(("kiln_router_mcp_server_up", "Whether an MCP server of --mcp-config is connected.", vec![("server", r.name.clone())], f64::from(u8::from(r.up))));
        gauges.push(("kiln_router_mcp_server_tools", "Tools a connected MCP server offers.", vec![("server", r.name)], r.tools as f64));
    }
    gauges.extend(crate::heap::gauges());
    // Each metric's samples must be together under one HELP/TYPE header.
    gauges.sort_by_key(|g| g.0);
    let body = state.metrics.render(&gauges);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The model a request names, as a healthy worker serves it.
/// A request's `messages`: present, not empty, and at most `max` of them.
pub fn message_items<'a>(f: &crate::params::Fields<'a>, max: usize) -> Result<&'a Vec<serde_json::Value>, ApiError> {
    let items = f.array("messages")?.ok_or_else(|| ApiError::field("messages", "is required"))?;
    if items.is_empty() {
        return Err(ApiError::field("messages", "must contain at least one message"));
    }
    if items.len() > max {
        return Err(ApiError::field("messages", format!("{} messages; at most {max} are allowed", items.len())));
    }
    Ok(items)
}

/// The model a request names, which must generate text: an embedding model gets a 400 that
/// says so.
pub fn resolve_generator(state: &AppState, id: &str) -> Result<Arc<ModelState>, ApiError> {
    let model = resolve_model(state, id)?;
    if model.info.kind == kiln_proto::v1::ModelKind::Embed as i32 {
        return Err(ApiError::field("model", format!("`{id}` is an embedding model; it does not generate text (use /v1/embeddings)")));
    }
    Ok(model)
}

pub fn resolve_model(state: &AppState, id: &str) -> Result<Arc<ModelState>, ApiError> {
    if let Some(m) = state.pool.model(id) {
        return Ok(m);
    }
    if state.pool.knows(id) {
        return Err(ApiError::unavailable(format!("no worker serving `{id}` is available right now")));
    }
    let available: Vec<String> = state.pool.models().iter().map(|m| m.info.model_id.clone()).collect();
    if available.is_empty() {
        return Err(ApiError::unavailable("no worker is available"));
    }
    Err(ApiError::model_not_found(id, &available))
}

/// Refuses a request when more than `--max-queue` would wait for a free sequence slot.
pub fn admit(state: &AppState) -> Result<(), ApiError> {
    let (in_flight, capacity) = state.pool.load();
    let waiting = in_flight.saturating_sub(capacity);
    if waiting >= state.config.max_queue && in_flight >= capacity {
        return Err(ApiError::overloaded(waiting));
    }
    Ok(())
}

/// Renders a conversation and tokenizes it. When `continue_last` and the last message is the
/// assistant's, generation continues that message instead of starting a new turn.
pub fn chat_prompt(model: &ModelState, messages: &[ChatMessage], continue_last: bool) -> Result<Vec<u32>, ApiError> {
    let (history, prefill) = match messages.split_last() {
        Some((last, rest)) if continue_last && last.role == "assistant" && !rest.is_empty() => (rest, last.content.as_str()),
        _ => (messages, ""),
    };
    let mut text = model.template.render(history, true).map_err(|e| ApiError::field("messages", e.to_string()))?;
    text.push_str(prefill);
    Ok(kiln_shared::chat::encode_rendered(&model.tokenizer, &text))
}

/// A conversation's prompt and, when tools may be called, how to read the answer.
pub struct ConversationPrompt {
    pub tokens: Vec<u32>,
    /// The call format the answer is read with (None: plain text).
    pub calls: Option<Format>,
    /// The grammar that holds the answer to calls (or text that cannot start like one).
    pub grammar: Option<kiln_proto::v1::Constraint>,
    /// The images the prompt holds, in order.
    pub images: Vec<Vec<u8>>,
}

/// The prompt for `turns`. With tools offered or in the history, the tools go to the template
/// when it renders them itself, otherwise into the system prompt with calls and results
/// written as text (crate::tools); without, the plain template renders the messages,
/// `continue_last` continuing a final assistant message rather than answering it.
pub fn conversation_prompt(model: &ModelState, turns: &[Turn], tools: &[Tool], choice: &ToolChoice, parallel: bool, continue_last: bool) -> Result<ConversationPrompt, ApiError> {
    let images = crate::tools::images(turns);
    if images.is_empty() && tools.is_empty() && !turns.iter().any(|t| !t.tool_calls.is_empty() || t.role == "tool") {
        let messages: Vec<ChatMessage> = turns.iter().map(|t| ChatMessage::new(t.role.clone(), t.content.clone())).collect();
        return Ok(ConversationPrompt { tokens: chat_prompt(model, &messages, continue_last)?, calls: None, grammar: None, images: Vec::new() });
    }
    if !images.is_empty() {
        let Some(vision) = &model.info.vision else {
            return Err(ApiError::field(images[0].0, format!("`{}` does not take images; it is a text-only model", model.info.model_id)));
        };
        if images.len() > vision.max_images as usize {
            return Err(ApiError::field("messages", format!("{} images; at most {} per request", images.len(), vision.max_images)));
        }
    }
    let (format, native) = crate::tools::format_for(&model.info.chat_template);
    let mut variables = crate::tools::template_variables(turns, tools, choice, format, native);
    variables["add_generation_prompt"] = serde_json::Value::Bool(true);
    let mut text = model.template.render_with(&variables).map_err(|e| ApiError::field("messages", e.to_string()))?;
    if let Some(vision) = model.info.vision.as_ref().filter(|_| !images.is_empty()) {
        let placed = text.matches(vision.placeholder.as_str()).count();
        if placed != images.len() {
            return Err(ApiError::field("messages", format!("the model's chat template placed {placed} of the {} images", images.len())));
        }
        let counts = images.iter().map(|(path, data)| image_tokens(vision, path, data)).collect::<Result<Vec<_>, _>>()?;
        let markup = kiln_shared::image::ImageMarkup { placeholder: &vision.placeholder, token: &vision.image_token, before: &vision.before, after: &vision.after };
        text = markup.expand(&text, &counts);
    }
    let grammar = crate::tools::grammar(tools, choice, parallel, format)
        .map(|lark| kiln_proto::v1::Constraint { kind: Some(kiln_proto::v1::constraint::Kind::Lark(lark)) });
    Ok(ConversationPrompt {
        tokens: kiln_shared::chat::encode_rendered(&model.tokenizer, &text),
        calls: (*choice != ToolChoice::None).then_some(format),
        grammar,
        images: images.into_iter().map(|(_, data)| data.to_vec()).collect(),
    })
}

/// How many tokens an image takes in the prompt of a model that takes images: a fixed count,
/// or (Qwen2-VL) one per square of the size the processor resizes it to, read from its header.
fn image_tokens(vision: &kiln_proto::v1::Vision, path: &str, data: &[u8]) -> Result<usize, ApiError> {
    if vision.tokens_per_image > 0 {
        return Ok(vision.tokens_per_image as usize);
    }
    let p = vision.pixels_per_token.max(1);
    let (width, height) = kiln_shared::image::dimensions(data, &Default::default()).map_err(|e| ApiError::field(path, format!("is not a usable image: {e}")))?;
    let (h, w) = kiln_shared::image::smart_resize(height, width, p, vision.min_pixels, vision.max_pixels)
        .ok_or_else(|| ApiError::field(path, format!("is not a usable image: {width}x{height} is too narrow (aspect ratio over 200)")))?;
    Ok((h / p) as usize * (w / p) as usize)
}

/// Runs the chat or completions handler on `body` as a request to `route` would (the MCP
/// tools' way into the API, with its checks, limits and errors).
pub async fn route_body(state: &Arc<AppState>, route: &str, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let mut model_id = None;
    match route {
        "/v1/chat/completions" => openai::chat_inner(state, headers, body, &mut model_id).await,
        "/v1/completions" => openai::completions_inner(state, headers, body, &mut model_id).await,
        other => Err(ApiError::internal(format!("no route {other}"))),
    }
}

/// Tool names as OpenAI and Anthropic allow them.
pub fn valid_tool_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err("must be 1 to 64 letters, digits, underscores or dashes");
    }
    Ok(())
}

/// A function tool: `name`, `description`, `parameters` (no arguments when left out) and
/// `strict` (`strict_by_default` when left out) of chat's `function` object or of a Responses
/// API tool; its name must differ from the tools before it and the request's MCP tools.
pub fn function_tool(fun: &crate::params::Fields, earlier: &[Tool], mcp: &[&str], strict_by_default: bool) -> Result<Tool, ApiError> {
    let name = fun.str("name")?.ok_or_else(|| ApiError::field(fun.name("name"), "is required"))?;
    valid_tool_name(name).map_err(|e| ApiError::field(fun.name("name"), e))?;
    if earlier.iter().any(|t| t.name == name) {
        return Err(ApiError::field(fun.name("name"), format!("`{name}` is given twice")));
    }
    if mcp.contains(&name) {
        return Err(ApiError::field(fun.name("name"), format!("`{name}` is also the name of an MCP tool this request uses")));
    }
    let parameters = match fun.get("parameters") {
        None => serde_json::json!({"type": "object", "properties": {}}),
        Some(p @ serde_json::Value::Object(_)) => p.clone(),
        Some(_) => return Err(ApiError::field(fun.name("parameters"), "expected a JSON Schema object")),
    };
    Ok(Tool { name: name.to_string(), description: fun.str("description")?.map(str::to_string), parameters, strict: fun.bool("strict")?.unwrap_or(strict_by_default) })
}

/// OpenAI's `tool_choice` given as a word.
pub fn tool_choice_word(word: &str) -> Result<ToolChoice, ApiError> {
    match word {
        "none" => Ok(ToolChoice::None),
        "auto" => Ok(ToolChoice::Auto),
        "required" => Ok(ToolChoice::Required),
        other => Err(ApiError::field("tool_choice", format!("unknown value `{other}`; expected none, auto, required or a function"))),
    }
}

/// Checks that the prompt and the requested completion fit the model's context, and returns
/// the completion's budget: what the request asked for (in the field named `budget`); else `default` (the router's
/// `--max-tokens`, which a request leaving the field out must not escape; OpenAI's 16 for
/// legacy completions) cut to the context the prompt leaves; else none (until the context
/// is full).
pub fn check_context(model: &ModelState, prompt_tokens: usize, max_tokens: Option<u32>, default: Option<u32>, (param, budget): (&str, &str)) -> Result<Option<u32>, ApiError> {
    let context = model.info.context_length as usize;
    if prompt_tokens == 0 {
        return Err(ApiError::field(param, "the prompt is empty"));
    }
    if prompt_tokens >= context {
        return Err(ApiError::field(
            param,
            format!("the prompt has {prompt_tokens} tokens, but the model's context is {context} tokens, which must also hold the completion"),
        ));
    }
    if let Some(max) = max_tokens {
        if prompt_tokens + max as usize > context {
            return Err(ApiError::field(
                budget,
                format!(
                    "the model's context is {context} tokens, but {} were requested ({prompt_tokens} in the prompt, {max} for the completion)",
                    prompt_tokens + max as usize
                ),
            ));
        }
    }
    Ok(max_tokens.or_else(|| default.map(|d| d.min((context - prompt_tokens) as u32))))
}

/// Header naming a conversation whose requests should go to the same worker.
pub const SESSION_HEADER: &str = "x-session-id";

/// The request's session, when it names one.
pub fn session(headers: &HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

/// What the routing policy may use to keep related requests on one worker.
pub fn route_key(headers: &HeaderMap, prompt: &[u32]) -> crate::routing::RouteKey {
    crate::routing::RouteKey::new(session(headers), prompt)
}

/// A short random identifier for responses.
pub fn random_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let a = h.finish();
    h.write_u64(a);
    format!("{prefix}{a:016x}{:08x}", h.finish() as u32)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The response to a handler's work, which yields the model the request named (once known)
/// and its result: errors in `flavor`'s shape, labelled with the model for the metrics layer.
pub async fn answer(flavor: Flavor, work: impl std::future::Future<Output = (Option<String>, Result<Response, ApiError>)>) -> Response {
    let (model, result) = work.await;
    let response = result.unwrap_or_else(|e| {
        tracing::Span::current().record("error.message", e.message.as_str());
        e.with_flavor(flavor).into_response()
    });
    labelled(model.as_deref().unwrap_or(""), response)
}

/// A response labelled with the model it was for.
pub fn labelled(model: &str, response: impl IntoResponse) -> Response {
    let mut r = response.into_response();
    r.extensions_mut().insert(ModelLabel(model.to_string()));
    r
}
