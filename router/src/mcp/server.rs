//! kiln as a Model Context Protocol server: `/mcp` (streamable HTTP, rmcp) offers the tools
//! `chat`, `complete` and `list_models`, and one resource per served model. The tools run
//! the HTTP API's own handlers, so answers, limits and error wording are the API's; a long
//! generation reports progress as tokens arrive, and a cancelled call drops the stream, which
//! cancels the generation on its worker as a departed HTTP client does.

use crate::api::route_body;
use crate::AppState;
use axum::http::HeaderMap;
use http_body_util::BodyExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::ErrorData;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Clone)]
pub struct KilnMcp {
    state: Arc<AppState>,
}

impl KilnMcp {
    pub fn new(state: Arc<AppState>) -> KilnMcp {
        KilnMcp { state }
    }
}

/// The sampling fields `chat` and `complete` take, as the HTTP API reads them.
fn sampling_properties() -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("model".into(), json!({"type": "string", "description": "Model id (default: the first served model)"}));
    p.insert("max_tokens".into(), json!({"type": "integer", "minimum": 1}));
    p.insert("temperature".into(), json!({"type": "number", "minimum": 0, "maximum": 2}));
    p.insert("top_p".into(), json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1}));
    p.insert("seed".into(), json!({"type": "integer"}));
    p.insert("stop".into(), json!({"type": "array", "items": {"type": "string"}}));
    p.insert("ignore_eos".into(), json!({"type": "boolean", "description": "Keep generating past end-of-generation tokens"}));
    p
}

fn schema(extra: Value, required: &[&str]) -> Arc<Map<String, Value>> {
    let mut properties = sampling_properties();
    if let Value::Object(e) = extra {
        properties.extend(e);
    }
    let mut s = Map::new();
    s.insert("type".into(), json!("object"));
    s.insert("properties".into(), Value::Object(properties));
    s.insert("required".into(), json!(required));
    s.insert("additionalProperties".into(), json!(false));
    Arc::new(s)
}

fn tools() -> Vec<Tool> {
    let message = json!({"type": "object", "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}, "required": ["role", "content"]});
    vec![
        Tool::new("chat", "Answer a conversation with a model served by this kiln cluster", schema(json!({"messages": {"type": "array", "items": message, "minItems": 1}}), &["messages"])),
        Tool::new("complete", "Continue a text with a model served by this kiln cluster", schema(json!({"prompt": {"type": "string"}}), &["prompt"])),
        Tool::new("list_models", "The models this kiln cluster serves", Arc::new(Map::from_iter([("type".into(), json!("object")), ("properties".into(), json!({}))]))),
    ]
}

fn tool_error(message: impl Into<String>) -> CallToolResponse {
    CallToolResponse::Complete(CallToolResult::error(vec![ContentBlock::text(message.into())]))
}

impl KilnMcp {
    /// The first served model that generates text.
    fn default_model(&self) -> Option<String> {
        self.state.pool.models().iter().find(|m| m.info.kind != kiln_proto::v1::ModelKind::Embed as i32).map(|m| m.info.model_id.clone())
    }

    /// Runs an API route with a streamed body built from the tool's arguments, collecting the
    /// text and sending progress (tokens so far, of `max_tokens` when known) as it streams.
    async fn generate(&self, route: &str, mut args: Map<String, Value>, ctx: &RequestContext<RoleServer>) -> CallToolResponse {
        if !args.contains_key("model") {
            match self.default_model() {
                Some(m) => {
                    args.insert("model".into(), json!(m));
                }
                None => return tool_error("no worker is serving a model"),
            }
        }
        args.insert("stream".into(), json!(true));
        let total = args.get("max_tokens").and_then(Value::as_f64);
        let body = Value::Object(args).to_string();
        let response = match route_body(&self.state, route, &HeaderMap::new(), body.as_bytes()).await {
            Ok(r) => r,
            Err(e) => return tool_error(e.message),
        };
        let progress = ctx.meta.get_progress_token();
        let mut body = response.into_body();
        let (mut pending, mut text, mut tokens, mut finish) = (String::new(), String::new(), 0f64, Value::Null);
        loop {
            let frame = tokio::select! {
                // Dropping the stream cancels the generation on its worker.
                _ = ctx.ct.cancelled() => return tool_error("cancelled"),
                f = body.frame() => f,
            };
            let Some(frame) = frame else { break };
            let Ok(Some(data)) = frame.map(|f| f.into_data().ok()) else { return tool_error("the generation's stream failed") };
            pending.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                for line in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                    if let Some(e) = v.get("error") {
                        return tool_error(e["message"].as_str().unwrap_or("the generation failed"));
                    }
                    for c in v["choices"].as_array().into_iter().flatten() {
                        let piece = c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or("");
                        if !piece.is_empty() {
                            text.push_str(piece);
                            tokens += 1.0;
                            if let Some(token) = &progress {
                                let mut p = ProgressNotificationParam::new(token.clone(), tokens);
                                if let Some(t) = total {
                                    p = p.with_total(t);
                                }
                                let _ = ctx.peer.notify_progress(p).await;
                            }
                        }
                        if !c["finish_reason"].is_null() {
                            finish = c["finish_reason"].clone();
                        }
                    }
                }
            }
        }
        let mut result = CallToolResult::success(vec![ContentBlock::text(text.clone())]);
        result.structured_content = Some(json!({"text": text, "finish_reason": finish}));
        CallToolResponse::Complete(result)
    }

    fn model_resource(m: &crate::upstream::ModelState) -> Resource {
        Resource::new(format!("kiln://models/{}", m.info.model_id), m.info.model_id.clone())
            .with_description(format!("{} ({}), context {} tokens", m.info.display_name, m.info.architecture, m.info.context_length))
            .with_mime_type("application/json")
    }

    fn model_metadata(&self, id: &str) -> Option<Value> {
        let m = self.state.pool.model(id)?;
        let workers: Vec<String> = self.state.pool.workers().iter().filter(|w| w.is_available() && w.serves(id)).map(|w| w.id.clone()).collect();
        Some(json!({
            "id": m.info.model_id,
            "name": m.info.display_name,
            "architecture": m.info.architecture,
            "context_length": m.info.context_length,
            "vocab_size": m.info.vocab_size,
            "weight_format": m.info.weight_format,
            "kind": if m.info.kind == kiln_proto::v1::ModelKind::Embed as i32 { "embedding" } else { "generation" },
            "workers": workers,
        }))
    }
}

impl rmcp::ServerHandler for KilnMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_resources().build())
            .with_server_info(Implementation::new("kiln", env!("CARGO_PKG_VERSION")))
            .with_instructions("Models served by a kiln cluster: `chat` and `complete` generate, `list_models` and the kiln://models/ resources describe them.")
    }

    async fn list_tools(&self, _: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(&self, request: CallToolRequestParams, ctx: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.clone().unwrap_or_default();
        match request.name.as_ref() {
            "chat" => Ok(self.generate("/v1/chat/completions", args, &ctx).await),
            "complete" => Ok(self.generate("/v1/completions", args, &ctx).await),
            "list_models" => {
                let models: Vec<Value> = self.state.pool.models().iter().filter_map(|m| self.model_metadata(&m.info.model_id)).collect();
                let mut result = CallToolResult::success(vec![ContentBlock::text(json!(models).to_string())]);
                result.structured_content = Some(json!({"models": models}));
                Ok(CallToolResponse::Complete(result))
            }
            other => Err(ErrorData::invalid_params(format!("unknown tool `{other}`; the tools are chat, complete and list_models"), None)),
        }
    }

    async fn list_resources(&self, _: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(self.state.pool.models().iter().map(|m| Self::model_resource(m)).collect()))
    }

    async fn read_resource(&self, request: ReadResourceRequestParams, _: RequestContext<RoleServer>) -> Result<ReadResourceResponse, ErrorData> {
        let id = request.uri.strip_prefix("kiln://models/").unwrap_or_default();
        match self.model_metadata(id) {
            Some(meta) => Ok(ReadResourceResult::new(vec![ResourceContents::text(meta.to_string(), request.uri.clone())]).into()),
            None => Err(ErrorData::resource_not_found(format!("no served model at {}", request.uri), None)),
        }
    }
}

/// The `/mcp` endpoint.
pub fn service(state: Arc<AppState>) -> rmcp::transport::streamable_http_server::StreamableHttpService<KilnMcp, rmcp::transport::streamable_http_server::session::local::LocalSessionManager> {
    rmcp::transport::streamable_http_server::StreamableHttpService::new(
        move || Ok(KilnMcp::new(Arc::clone(&state))),
        Arc::default(),
        Default::default(),
    )
}
