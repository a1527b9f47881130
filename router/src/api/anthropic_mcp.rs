//! MCP tools on `/v1/messages`, in the shape of Anthropic's MCP connector: `mcp_servers`
//! names servers of the router's `--mcp-config` (kiln connects to no server a request brings),
//! `mcp_toolset` entries of `tools` and `tool_configuration` choose among their tools, and the
//! calls the router makes come back as `mcp_tool_use` and `mcp_tool_result` blocks ahead of
//! the answer. kiln's own `"mcp": true | [names]` works here as on the OpenAI route. The loop
//! itself is the OpenAI route's (`mcp_loop`); only the request and the blocks differ.

use super::anthropic::{error_event, named, usage};
use super::mcp_loop::{Answer, Finished, LoopEvents, Step, ToolLoop};
use crate::error::ApiError;
use crate::mcp::client::{RemoteTool, Selection, ToolOutcome, Transport};
use crate::params::Fields;
use crate::tools::ToolCall;
use crate::AppState;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Which of one server's tools a request allows.
#[derive(Default)]
struct Allowed {
    /// The server's default (`default_config.enabled`, or `tool_configuration.enabled`).
    all: Option<bool>,
    /// Per tool, by the server's name for it.
    tools: HashMap<String, bool>,
    /// `tool_configuration.allowed_tools`: only these.
    only: Option<Vec<String>>,
    /// Where each rule was given, for errors about tools the server does not have.
    paths: HashMap<String, String>,
}

impl Allowed {
    fn allows(&self, tool: &str) -> bool {
        if let Some(only) = &self.only {
            if !only.iter().any(|t| t == tool) {
                return false;
            }
        }
        self.tools.get(tool).copied().or(self.all).unwrap_or(true)
    }
}

/// The MCP tools a `/v1/messages` request asked for, or None when it asked for none.
pub fn requested_tools(state: &AppState, f: &Fields) -> Result<Option<Vec<RemoteTool>>, ApiError> {
    let servers = f.array("mcp_servers")?;
    if f.get("mcp").is_some_and(|v| !v.is_null()) {
        if servers.is_some() {
            return Err(ApiError::field("mcp", "give either `mcp` or `mcp_servers`, not both"));
        }
        if toolsets(f)?.next().is_some() {
            return Err(ApiError::field("tools", "`mcp_toolset` entries go with `mcp_servers`"));
        }
        return super::mcp_loop::requested_tools(state, f);
    }
    let Some(servers) = servers else {
        if let Some((path, _)) = toolsets(f)?.next() {
            return Err(ApiError::field(path, "an `mcp_toolset` needs its server in `mcp_servers`"));
        }
        return Ok(None);
    };
    let Some(hub) = &state.mcp else {
        return Err(ApiError::field("mcp_servers", "this router has no MCP servers (it runs without --mcp-config)"));
    };
    let mut rules: Vec<(String, Allowed)> = Vec::new();
    for (i, item) in servers.iter().enumerate() {
        let path = format!("mcp_servers[{i}].");
        let Some(obj) = item.as_object() else { return Err(ApiError::field(format!("mcp_servers[{i}]"), "expected an object")) };
        let s = Fields::new(obj, &path, &["type", "name", "url", "authorization_token", "tool_configuration"], &[])?;
        if s.str("type")?.is_some_and(|t| t != "url") {
            return Err(ApiError::field(s.name("type"), "must be `url`"));
        }
        let name = s.str("name")?.ok_or_else(|| ApiError::field(s.name("name"), "is required: the name of one of the router's MCP servers"))?;
        if rules.iter().any(|(n, _)| n == name) {
            return Err(ApiError::field(s.name("name"), format!("`{name}` is given twice")));
        }
        let Some(spec) = hub.spec(name) else {
            return Err(ApiError::field(s.name("name"), format!("no MCP server `{name}`; this router has {}", known(&hub.names()))));
        };
        // The router connects only to the servers its operator configured; a URL that is not
        // the configured one would otherwise be answered by another server than the client meant.
        if let Some(url) = s.str("url")? {
            match &spec.transport {
                Transport::Http { url: configured, .. } if configured == url => {}
                Transport::Http { .. } => {
                    return Err(ApiError::field(s.name("url"), format!("is not the URL of the router's MCP server `{name}`; the router connects only to the servers of its --mcp-config")))
                }
                Transport::Stdio { .. } => {
                    return Err(ApiError::field(s.name("url"), format!("the router's MCP server `{name}` is a local program, not a URL; give only its name")))
                }
            }
        }
        if s.get("authorization_token").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::field(s.name("authorization_token"), "is not accepted: the router's --mcp-config holds each server's credentials"));
        }
        let mut allowed = Allowed::default();
        if let Some(config) = s.object("tool_configuration")? {
            let c = Fields::new(config, &format!("{path}tool_configuration."), &["enabled", "allowed_tools"], &[])?;
            allowed.all = c.bool("enabled")?;
            if c.get("allowed_tools").is_some_and(|v| !v.is_null()) {
                let only = c.strings("allowed_tools", 4096)?;
                for tool in &only {
                    allowed.paths.insert(tool.clone(), c.name("allowed_tools"));
                }
                allowed.only = Some(only);
            }
        }
        rules.push((name.to_string(), allowed));
    }
    for (path, set) in toolsets(f)? {
        let t = Fields::new(set, &path, &["type", "mcp_server_name", "default_config", "configs", "cache_control"], &["tools"])?;
        let server = t.str("mcp_server_name")?.ok_or_else(|| ApiError::field(t.name("mcp_server_name"), "is required"))?;
        let Some((_, allowed)) = rules.iter_mut().find(|(n, _)| n == server) else {
            return Err(ApiError::field(t.name("mcp_server_name"), format!("`{server}` is not one of `mcp_servers`")));
        };
        if let Some(default) = t.object("default_config")? {
            allowed.all = tool_config(default, &t.name("default_config"))?.or(allowed.all);
        }
        if let Some(configs) = t.object("configs")? {
            for (tool, config) in configs {
                let path = format!("{}.{tool}", t.name("configs"));
                let Some(config) = config.as_object() else { return Err(ApiError::field(path, "expected an object")) };
                if let Some(on) = tool_config(config, &path)? {
                    allowed.tools.insert(tool.clone(), on);
                }
                allowed.paths.insert(tool.clone(), path);
            }
        }
    }
    let names: Vec<String> = rules.iter().map(|(n, _)| n.clone()).collect();
    let offered = hub.tools(&Selection::Named(names)).map_err(|e| match e {
        crate::mcp::client::SelectionError::Unknown { .. } => ApiError::field("mcp_servers", e.to_string()),
        crate::mcp::client::SelectionError::Down { .. } => ApiError::unavailable(e.to_string()),
    })?;
    for (server, allowed) in &rules {
        for (tool, path) in &allowed.paths {
            if !offered.iter().any(|t| &t.server == server && &t.remote == tool) {
                return Err(ApiError::field(path.clone(), format!("the MCP server `{server}` has no tool `{tool}`")));
            }
        }
    }
    let chosen = offered.into_iter().filter(|t| rules.iter().any(|(server, allowed)| *server == t.server && allowed.allows(&t.remote))).collect();
    Ok(Some(chosen))
}

fn known(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// `{enabled?, defer_loading?}`: whether the tools it covers are offered.
fn tool_config(config: &Map<String, Value>, path: &str) -> Result<Option<bool>, ApiError> {
    let c = Fields::new(config, &format!("{path}."), &["enabled", "defer_loading"], &[])?;
    if c.bool("defer_loading")? == Some(true) {
        return Err(ApiError::field(c.name("defer_loading"), "is not supported: every enabled tool is offered to the model"));
    }
    c.bool("enabled")
}

/// The `mcp_toolset` entries of `tools`, with their paths.
fn toolsets<'a>(f: &Fields<'a>) -> Result<impl Iterator<Item = (String, &'a Map<String, Value>)>, ApiError> {
    let tools = f.array("tools")?.map(Vec::as_slice).unwrap_or_default();
    Ok(tools.iter().enumerate().filter_map(|(i, t)| {
        let obj = t.as_object()?;
        (obj.get("type").and_then(Value::as_str) == Some("mcp_toolset")).then(|| (format!("tools[{i}]."), obj))
    }))
}

fn tool_use_block(call: &ToolCall, server: Option<(&str, &str)>) -> Value {
    let input = serde_json::from_str::<Value>(&call.arguments).unwrap_or_else(|_| json!({}));
    match server {
        Some((server, tool)) => json!({ "type": "mcp_tool_use", "id": call.id, "name": tool, "server_name": server, "input": input }),
        // The client's own tools: their calls end the loop, so no history holds their ids yet.
        None => json!({ "type": "tool_use", "id": call.id.replacen("mcptoolu_", "toolu_", 1), "name": call.name, "input": input }),
    }
}

fn result_block(call_id: &str, outcome: &ToolOutcome) -> Value {
    json!({ "type": "mcp_tool_result", "tool_use_id": call_id, "is_error": outcome.is_error, "content": [{ "type": "text", "text": outcome.content }] })
}

/// The blocks of a finished loop, in the order they happened.
fn content(done: &Finished) -> Vec<Value> {
    let mut out = Vec::new();
    for step in &done.steps {
        match step {
            Step::Text(text) if text.is_empty() => {}
            Step::Text(text) => out.push(json!({ "type": "text", "text": text })),
            Step::Call { server, tool, call } => out.push(tool_use_block(call, Some((server, tool)))),
            Step::Result { call_id, outcome } => out.push(result_block(call_id, outcome)),
        }
    }
    match &done.answer {
        Answer::Text(text) if text.is_empty() && !out.is_empty() => {}
        Answer::Text(text) => out.push(json!({ "type": "text", "text": text })),
        Answer::Calls(calls) => out.extend(calls.iter().map(|c| tool_use_block(c, None))),
    }
    out
}

fn stop_reason(done: &Finished) -> &'static str {
    match done.answer {
        Answer::Calls(_) => "tool_use",
        Answer::Text(_) => super::anthropic::stop_reason(&done.last),
    }
}

/// Streamed blocks: text as it comes, each call as an `mcp_tool_use` block whose input comes
/// whole in one `input_json_delta`, each result as an `mcp_tool_result` block.
#[derive(Default)]
struct Blocks {
    /// The index of the open text block.
    text: Option<usize>,
    next: usize,
}

impl Blocks {
    fn start(&mut self, block: Value) -> Event {
        let index = self.next;
        self.next += 1;
        named("content_block_start", json!({ "type": "content_block_start", "index": index, "content_block": block }))
    }

    fn stop(index: usize) -> Event {
        named("content_block_stop", json!({ "type": "content_block_stop", "index": index }))
    }

    fn close_text(&mut self) -> Vec<Event> {
        self.text.take().map(Blocks::stop).into_iter().collect()
    }

    fn tool_use(&mut self, call: &ToolCall, server: Option<(&str, &str)>) -> Vec<Event> {
        let mut out = self.close_text();
        let mut block = tool_use_block(call, server);
        let input = std::mem::replace(&mut block["input"], json!({}));
        let index = self.next;
        out.push(self.start(block));
        out.push(named("content_block_delta", json!({ "type": "content_block_delta", "index": index, "delta": { "type": "input_json_delta", "partial_json": input.to_string() } })));
        out.push(Blocks::stop(index));
        out
    }

    /// The last events of a message: the client's calls, or an empty text block when the
    /// message would have no block at all.
    fn finish(&mut self, done: &Finished) -> Vec<Event> {
        let mut out = Vec::new();
        if let Answer::Calls(calls) = &done.answer {
            for call in calls {
                out.extend(self.tool_use(call, None));
            }
        }
        if self.next == 0 {
            self.text = Some(self.next);
            out.push(self.start(json!({ "type": "text", "text": "" })));
        }
        out.extend(self.close_text());
        out
    }
}

impl LoopEvents for Blocks {
    fn text(&mut self, text: &str) -> Vec<Event> {
        let mut out = Vec::new();
        let index = match self.text {
            Some(i) => i,
            None => {
                self.text = Some(self.next);
                out.push(self.start(json!({ "type": "text", "text": "" })));
                self.next - 1
            }
        };
        out.push(named("content_block_delta", json!({ "type": "content_block_delta", "index": index, "delta": { "type": "text_delta", "text": text } })));
        out
    }

    fn call(&mut self, _round: usize, tool: &RemoteTool, call: &ToolCall) -> Vec<Event> {
        self.tool_use(call, Some((&tool.server, &tool.remote)))
    }

    fn result(&mut self, _round: usize, _tool: &RemoteTool, call: &ToolCall, outcome: &ToolOutcome) -> Vec<Event> {
        let mut out = self.close_text();
        let index = self.next;
        out.push(self.start(result_block(&call.id, outcome)));
        out.push(Blocks::stop(index));
        out
    }
}

/// Answers a `/v1/messages` request that uses MCP tools.
pub async fn respond(run: ToolLoop, id: String) -> Result<Response, ApiError> {
    let model_id = run.model.info.model_id.clone();
    let start = run.start().await?;
    if run.c.stream {
        let first = vec![
            named(
                "message_start",
                json!({
                    "type": "message_start",
                    "message": {
                        "id": id, "type": "message", "role": "assistant", "model": model_id,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": { "input_tokens": start.prompt_tokens, "output_tokens": 0 },
                    },
                }),
            ),
            named("ping", json!({ "type": "ping" })),
        ];
        return Ok(run.stream(start, first, Blocks::default(), |blocks, outcome| match outcome {
            Ok(done) => {
                let mut out = blocks.finish(&done);
                out.push(named(
                    "message_delta",
                    json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason(&done), "stop_sequence": done.last.stop_sequence }, "usage": usage(&done.totals) }),
                ));
                out.push(named("message_stop", json!({ "type": "message_stop" })));
                out
            }
            Err(e) => vec![error_event(e)],
        }));
    }
    let done = run.finish(start).await?;
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model_id,
        "content": content(&done),
        "stop_reason": stop_reason(&done),
        "stop_sequence": done.last.stop_sequence,
        "usage": usage(&done.totals),
    }))
    .into_response())
}
