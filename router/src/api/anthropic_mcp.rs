//! MCP tools on `/v1/messages`, in the shape of Anthropic's MCP connector: `mcp_servers`
//! names servers of the router's `--mcp-config` (kiln connects to no server a request brings),
//! `mcp_toolset` entries of `tools` and `tool_configuration` choose among their tools, and the
//! calls the router makes come back as `mcp_tool_use` and `mcp_tool_result` blocks ahead of
//! the answer. kiln's own `"mcp": true | [names]` works here as on the OpenAI route. The loop
//! itself is the OpenAI route's (`mcp_loop`); only the request and the blocks differ.

use super::anthropic::{blocks_text, error_event, named, usage};
use super::mcp_loop::{Answer, Finished, LoopEvents, Step, ToolLoop};
use crate::error::ApiError;
use crate::mcp::client::{offered_name, McpHub, RemoteTool, Selection, ToolOutcome};
use crate::params::Fields;
use crate::tools::{ToolCall, Turn};
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
    let first_toolset = toolsets(f)?.next().map(|(path, _)| path);
    if f.get("mcp").is_some_and(|v| !v.is_null()) {
        if servers.is_some() {
            return Err(ApiError::field("mcp", "give either `mcp` or `mcp_servers`, not both"));
        }
        if let Some(path) = first_toolset {
            return Err(ApiError::field(path, "an `mcp_toolset` goes with `mcp_servers`"));
        }
        return super::mcp_loop::requested_tools(state, f);
    }
    let Some(servers) = servers else {
        return match first_toolset {
            Some(path) => Err(ApiError::field(path, "an `mcp_toolset` needs its server in `mcp_servers`")),
            None => Ok(None),
        };
    };
    let hub = super::mcp_loop::hub(state, "mcp_servers")?;
    let mut rules: Vec<(String, Allowed)> = Vec::new();
    for (i, item) in servers.iter().enumerate() {
        let (name, allowed) = server_rule(hub, &format!("mcp_servers[{i}]"), item)?;
        if rules.iter().any(|(n, _)| *n == name) {
            return Err(ApiError::field(format!("mcp_servers[{i}].name"), format!("`{name}` is given twice")));
        }
        rules.push((name, allowed));
    }
    for (path, set) in toolsets(f)? {
        apply_toolset(&path, set, &mut rules)?;
    }
    let offered = super::mcp_loop::select(hub, &Selection::Named(rules.iter().map(|(n, _)| n.clone()).collect()), "mcp_servers")?;
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

/// One entry of `mcp_servers`: `{type: url, name, url?, tool_configuration?}`.
fn server_rule(hub: &McpHub, path: &str, item: &Value) -> Result<(String, Allowed), ApiError> {
    let Some(obj) = item.as_object() else { return Err(ApiError::field(path, "expected an object")) };
    let s = Fields::new(obj, &format!("{path}."), &["type", "name", "url", "authorization_token", "tool_configuration"], &[])?;
    if s.str("type")?.is_some_and(|t| t != "url") {
        return Err(ApiError::field(s.name("type"), "must be `url`"));
    }
    let name = s.str("name")?.ok_or_else(|| ApiError::field(s.name("name"), "is required: the name of one of the router's MCP servers"))?;
    super::mcp_loop::configured_server(hub, name, &s.name("name"), s.str("url")?, &s.name("url"))?;
    if s.get("authorization_token").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::field(s.name("authorization_token"), "is not accepted: the router's --mcp-config holds each server's credentials"));
    }
    let mut allowed = Allowed::default();
    if let Some(config) = s.object("tool_configuration")? {
        let c = Fields::new(config, &format!("{path}.tool_configuration."), &["enabled", "allowed_tools"], &[])?;
        allowed.all = c.bool("enabled")?;
        if c.get("allowed_tools").is_some_and(|v| !v.is_null()) {
            let only = c.strings("allowed_tools", 4096)?;
            allowed.paths.extend(only.iter().map(|tool| (tool.clone(), c.name("allowed_tools"))));
            allowed.only = Some(only);
        }
    }
    Ok((name.to_string(), allowed))
}

/// An `mcp_toolset` entry of `tools`: `{mcp_server_name, default_config?, configs?}`.
fn apply_toolset(path: &str, set: &Map<String, Value>, rules: &mut [(String, Allowed)]) -> Result<(), ApiError> {
    let t = Fields::new(set, &format!("{path}."), &["type", "mcp_server_name", "default_config", "configs", "cache_control"], &["tools"])?;
    let server = t.str("mcp_server_name")?.ok_or_else(|| ApiError::field(t.name("mcp_server_name"), "is required"))?;
    let Some((_, allowed)) = rules.iter_mut().find(|(n, _)| n == server) else {
        return Err(ApiError::field(t.name("mcp_server_name"), format!("`{server}` is not one of `mcp_servers`")));
    };
    if let Some(default) = t.object("default_config")? {
        allowed.all = tool_config(default, &t.name("default_config"))?.or(allowed.all);
    }
    for (tool, config) in t.object("configs")?.into_iter().flatten() {
        let path = format!("{}.{tool}", t.name("configs"));
        let Some(config) = config.as_object() else { return Err(ApiError::field(path, "expected an object")) };
        if let Some(on) = tool_config(config, &path)? {
            allowed.tools.insert(tool.clone(), on);
        }
        allowed.paths.insert(tool.clone(), path);
    }
    Ok(())
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
        (obj.get("type").and_then(Value::as_str) == Some("mcp_toolset")).then(|| (format!("tools[{i}]"), obj))
    }))
}

/// An assistant message holding the `mcp_tool_use` and `mcp_tool_result` blocks of an earlier
/// answer (with any text and client `tool_use` blocks), as the turns the router's tool loop
/// had: text and calls, the results, text and calls again.
pub fn history(blocks: &[Value], name: &str) -> Result<Vec<Turn>, ApiError> {
    let mut out = Vec::new();
    let mut current = Turn { role: "assistant".into(), ..Turn::default() };
    for (j, block) in blocks.iter().enumerate() {
        let path = format!("{name}[{j}].");
        let Some(obj) = block.as_object() else { return Err(ApiError::field(format!("{name}[{j}]"), "expected a content block object")) };
        match obj.get("type").and_then(Value::as_str) {
            Some("text") => {
                if !current.tool_calls.is_empty() {
                    out.push(std::mem::replace(&mut current, Turn { role: "assistant".into(), ..Turn::default() }));
                }
                current.content.push_str(&blocks_text(&Value::Array(vec![block.clone()]), name)?);
            }
            Some(kind @ ("mcp_tool_use" | "tool_use")) => {
                let known: &[&str] = if kind == "tool_use" { &["type", "id", "name", "input", "cache_control"] } else { &["type", "id", "name", "server_name", "input", "cache_control"] };
                let b = Fields::new(obj, &path, known, &[])?;
                let id = b.str("id")?.ok_or_else(|| ApiError::field(b.name("id"), "is required"))?;
                let tool = b.str("name")?.ok_or_else(|| ApiError::field(b.name("name"), "is required"))?;
                let input = b.object("input")?.ok_or_else(|| ApiError::field(b.name("input"), "is required (an object)"))?;
                // The model knew the call by the name the router offered it under.
                let offered = match kind {
                    "tool_use" => tool.to_string(),
                    _ => {
                        let server = b.str("server_name")?.ok_or_else(|| ApiError::field(b.name("server_name"), "is required"))?;
                        offered_name(server, tool).ok_or_else(|| ApiError::field(b.name("name"), "is not a tool name the router could offer"))?
                    }
                };
                current.tool_calls.push(ToolCall { id: id.into(), name: offered, arguments: Value::Object(input.clone()).to_string() });
            }
            Some("mcp_tool_result") => {
                let b = Fields::new(obj, &path, &["type", "tool_use_id", "content", "is_error", "cache_control"], &[])?;
                let id = b.str("tool_use_id")?.ok_or_else(|| ApiError::field(b.name("tool_use_id"), "is required"))?;
                if !current.tool_calls.is_empty() || !current.content.is_empty() {
                    out.push(std::mem::replace(&mut current, Turn { role: "assistant".into(), ..Turn::default() }));
                }
                let content = match b.get("content") {
                    None => String::new(),
                    Some(c) => blocks_text(c, &b.name("content"))?,
                };
                let content = if b.bool("is_error")?.unwrap_or(false) { format!("Error: {content}") } else { content };
                out.push(Turn { role: "tool".into(), content, tool_call_id: Some(id.into()), ..Turn::default() });
            }
            Some(other) => return Err(ApiError::field(format!("{path}type"), format!("`{other}` blocks are not supported in assistant messages"))),
            None => return Err(ApiError::field(format!("{path}type"), "is required (a string)")),
        }
    }
    if !current.tool_calls.is_empty() || !current.content.is_empty() {
        out.push(current);
    }
    Ok(out)
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
                        "usage": usage(&start.totals()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_sent_back_becomes_the_loops_turns() {
        let blocks = json!([
            {"type": "text", "text": "Let me look."},
            {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "read file", "server_name": "files", "input": {"path": "a.txt"}},
            {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "is_error": true, "content": [{"type": "text", "text": "no such file"}]},
            {"type": "text", "text": "It is missing; "},
            {"type": "tool_use", "id": "toolu_2", "name": "ask_user", "input": {}},
        ]);
        let turns = history(blocks.as_array().unwrap(), "messages[1].content").unwrap();
        let shape: Vec<String> = turns
            .iter()
            .map(|t| {
                let calls: Vec<String> = t.tool_calls.iter().map(|c| format!("{} {}", c.name, c.arguments)).collect();
                format!("{}: {:?} {calls:?} {:?}", t.role, t.content, t.tool_call_id)
            })
            .collect();
        assert_eq!(
            shape,
            [
                r#"assistant: "Let me look." ["files__read_file {\"path\":\"a.txt\"}"] None"#,
                r#"tool: "Error: no such file" [] Some("mcptoolu_1")"#,
                r#"assistant: "It is missing; " ["ask_user {}"] None"#,
            ]
        );
    }

    #[test]
    fn malformed_blocks_are_refused_by_path() {
        let refused = |block: Value| history(&[block], "messages[1].content").unwrap_err().to_string();
        assert!(refused(json!({"type": "mcp_tool_use", "id": "x", "name": "t", "input": {}})).contains("`messages[1].content[0].server_name`: is required"));
        assert!(refused(json!({"type": "mcp_tool_use", "id": "x", "name": "t", "server_name": "s", "input": 3})).contains("input"));
        assert!(refused(json!({"type": "mcp_tool_result", "content": "x"})).contains("tool_use_id"));
        assert!(refused(json!({"type": "image"})).contains("`image` blocks are not supported in assistant messages"));
    }

    #[test]
    fn allowed_tools_narrow_and_configs_override_the_default() {
        let mut rules = Allowed { all: Some(false), ..Allowed::default() };
        rules.tools.insert("read".into(), true);
        assert!(rules.allows("read") && !rules.allows("write"));
        let only = Allowed { only: Some(vec!["read".into()]), ..Allowed::default() };
        assert!(only.allows("read") && !only.allows("write"));
        assert!(Allowed::default().allows("anything"));
    }
}
