//! MCP tools on `/v1/responses`, in the shape of OpenAI's hosted MCP tool: `{"type": "mcp",
//! "server_label": …}` entries of `tools` name servers of the router's `--mcp-config` (kiln
//! connects to no server a request brings), `allowed_tools` chooses among their tools, and the
//! response holds an `mcp_list_tools` item per server the conversation has not listed yet,
//! then an `mcp_call` item per call the router made (with its output or error) among the
//! messages, then the answer. The router asks no approval before a call: the servers are the
//! ones its operator configured, so `require_approval` may only say `never`. The loop itself is
//! the chat route's (`mcp_loop`); only the request and the items differ.

use super::mcp_loop::{self, Answer, Finished, LoopEvents, Step, ToolLoop};
use super::responses::{Head, Output, Status};
use crate::error::ApiError;
use crate::mcp::client::{offered_name, RemoteTool, Selection, ToolOutcome};
use crate::params::Fields;
use crate::tools::{ToolCall, Turn};
use crate::AppState;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

pub(super) const NO_APPROVALS: &str = "kiln asks no approval before calling the tools of the MCP servers its operator configured";

/// One `mcp` entry of `tools`.
struct Server {
    label: String,
    /// `allowed_tools`: only these (by the server's names), with where they were given.
    only: Option<(Vec<String>, String)>,
}

/// The MCP tools a request's `tools` offer (entries of type `mcp`), or None when it has none.
pub fn requested_tools(state: &AppState, f: &Fields) -> Result<Option<Vec<RemoteTool>>, ApiError> {
    let entries = f.array("tools")?.map(Vec::as_slice).unwrap_or_default();
    let mut servers: Vec<Server> = Vec::new();
    for (i, item) in entries.iter().enumerate() {
        let Some(obj) = item.as_object().filter(|o| o.get("type").and_then(Value::as_str) == Some("mcp")) else { continue };
        let hub = mcp_loop::hub(state, &format!("tools[{i}]"))?;
        let server = server_entry(hub, &format!("tools[{i}]."), obj)?;
        if servers.iter().any(|s| s.label == server.label) {
            return Err(ApiError::field(format!("tools[{i}].server_label"), format!("`{}` is given twice", server.label)));
        }
        servers.push(server);
    }
    if servers.is_empty() {
        return Ok(None);
    }
    let hub = mcp_loop::hub(state, "tools")?;
    let offered = mcp_loop::select(hub, &Selection::Named(servers.iter().map(|s| s.label.clone()).collect()), "tools")?;
    for server in &servers {
        let Some((only, path)) = &server.only else { continue };
        if let Some(tool) = only.iter().find(|tool| !offered.iter().any(|t| t.server == server.label && &t.remote == *tool)) {
            return Err(ApiError::field(path.clone(), format!("the MCP server `{}` has no tool `{tool}`", server.label)));
        }
    }
    let allowed = |t: &RemoteTool| servers.iter().any(|s| s.label == t.server && s.only.as_ref().is_none_or(|(only, _)| only.contains(&t.remote)));
    Ok(Some(offered.into_iter().filter(allowed).collect()))
}

/// `{type: mcp, server_label, server_url?, server_description?, allowed_tools?, require_approval?}`.
fn server_entry(hub: &crate::mcp::client::McpHub, path: &str, obj: &Map<String, Value>) -> Result<Server, ApiError> {
    let known = ["type", "server_label", "server_url", "server_description", "allowed_tools", "require_approval", "headers", "authorization", "connector_id"];
    let s = Fields::new(obj, path, &known, &["defer_loading", "allowed_callers", "tunnel_id"])?;
    let label = s.str("server_label")?.ok_or_else(|| ApiError::field(s.name("server_label"), "is required: the name of one of the router's MCP servers"))?;
    mcp_loop::configured_server(hub, label, &s.name("server_label"), s.str("server_url")?, &s.name("server_url"))?;
    s.str("server_description")?;
    for key in ["headers", "authorization"] {
        if s.get(key).is_some() {
            return Err(ApiError::field(s.name(key), "is not accepted: the router's --mcp-config holds each server's credentials"));
        }
    }
    if s.get("connector_id").is_some() {
        return Err(ApiError::field(s.name("connector_id"), "is not supported: name one of the router's MCP servers in `server_label`"));
    }
    let only = match s.get("allowed_tools") {
        None => None,
        Some(Value::Array(_)) => Some((s.strings("allowed_tools", 4096)?, s.name("allowed_tools"))),
        Some(Value::Object(filter)) => {
            let a = Fields::new(filter, &format!("{}.", s.name("allowed_tools")), &["tool_names", "read_only"], &[])?;
            if a.get("read_only").is_some() {
                return Err(ApiError::field(a.name("read_only"), "is not supported: name the tools in `tool_names`"));
            }
            Some((a.strings("tool_names", 4096)?, a.name("tool_names")))
        }
        Some(_) => return Err(ApiError::field(s.name("allowed_tools"), "expected an array of tool names or a filter object")),
    };
    approval(&s)?;
    Ok(Server { label: label.to_string(), only })
}

/// `require_approval`: `never`, or a filter that puts no tool under `always`.
fn approval(s: &Fields) -> Result<(), ApiError> {
    let refused = || ApiError::field(s.name("require_approval"), format!("only `never` is supported: {NO_APPROVALS}"));
    match s.get("require_approval") {
        None => Ok(()),
        Some(Value::String(word)) if word == "never" => Ok(()),
        Some(Value::String(_)) => Err(refused()),
        Some(Value::Object(filter)) => {
            let r = Fields::new(filter, &format!("{}.", s.name("require_approval")), &["always", "never"], &[])?;
            let always = r.object("always")?;
            if always.is_some_and(|a| a.values().any(|v| !v.is_null() && v != &json!([]) && v != &json!(false))) {
                return Err(refused());
            }
            r.object("never")?;
            Ok(())
        }
        Some(_) => Err(ApiError::field(s.name("require_approval"), "expected `never` or a filter object")),
    }
}

/// `tool_choice: {type: mcp, server_label, name}`: the offered name of that tool.
pub fn choice(c: &Fields, remote: &[RemoteTool]) -> Result<String, ApiError> {
    let server = c.str("server_label")?.ok_or_else(|| ApiError::field(c.name("server_label"), "is required"))?;
    let name = c.str("name")?.ok_or_else(|| ApiError::field(c.name("name"), "is required: the tool the model must call"))?;
    remote
        .iter()
        .find(|t| t.server == server && t.remote == name)
        .map(|t| t.name.clone())
        .ok_or_else(|| ApiError::field(c.name("name"), format!("`{name}` is not a tool of an MCP server in `tools` with server_label `{server}`")))
}

/// An `mcp_call` item of an earlier response, as the loop's turns had it: the call (joining
/// the answer it belongs to) and its result.
pub fn call_item(c: &Fields, turns: &mut Vec<Turn>) -> Result<(), ApiError> {
    let id = c.str("id")?.ok_or_else(|| ApiError::field(c.name("id"), "is required"))?;
    let server = c.str("server_label")?.ok_or_else(|| ApiError::field(c.name("server_label"), "is required"))?;
    let tool = c.str("name")?.ok_or_else(|| ApiError::field(c.name("name"), "is required"))?;
    let arguments = c.str("arguments")?.ok_or_else(|| ApiError::field(c.name("arguments"), "is required (a string of JSON)"))?;
    c.str("status")?;
    // The model knew the tool by the name the router offered it under.
    let offered = offered_name(server, tool).ok_or_else(|| ApiError::field(c.name("name"), "is not a tool name the router could offer"))?;
    let content = match (c.str("output")?, c.get("error")) {
        (_, Some(error)) => format!("Error: {}", error_text(error, &c.name("error"))?),
        (Some(output), None) => output.to_string(),
        (None, None) => return Err(ApiError::field(c.name("output"), "is required: an mcp_call item passed back needs its output or error")),
    };
    let call = ToolCall { id: id.into(), name: offered, arguments: arguments.into() };
    match turns.last_mut() {
        Some(t) if t.role == "assistant" => t.tool_calls.push(call),
        _ => turns.push(Turn { role: "assistant".into(), tool_calls: vec![call], ..Turn::default() }),
    }
    turns.push(Turn { role: "tool".into(), content, tool_call_id: Some(id.into()), ..Turn::default() });
    Ok(())
}

/// An `mcp_call`'s error as text: a string, or an error object (its text content or message).
fn error_text(error: &Value, name: &str) -> Result<String, ApiError> {
    match error {
        Value::String(s) => Ok(s.clone()),
        Value::Object(o) => {
            let e = Fields::new(o, &format!("{name}."), &["type", "content", "code", "message"], &[])?;
            if let Some(message) = e.str("message")? {
                return Ok(message.to_string());
            }
            let parts = e.array("content")?.map(Vec::as_slice).unwrap_or_default();
            Ok(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n"))
        }
        _ => Err(ApiError::field(name, "expected a string or an error object")),
    }
}

/// The items a response gets as the loop runs, shared by streamed and whole responses (a
/// whole response replays the loop's steps), so both hold the same items.
pub struct McpItems {
    output: Output,
}

impl McpItems {
    /// An `mcp_list_tools` item for each server in `remote` not in `listed`.
    fn list(&mut self, remote: &[RemoteTool], listed: &[String]) -> Vec<Event> {
        let mut servers: Vec<&str> = Vec::new();
        for t in remote {
            if !servers.contains(&t.server.as_str()) && !listed.contains(&t.server) {
                servers.push(&t.server);
            }
        }
        let mut out = Vec::new();
        for server in servers {
            let tools: Vec<Value> = remote
                .iter()
                .filter(|t| t.server == server)
                .map(|t| json!({ "name": t.remote, "description": t.description, "input_schema": t.parameters, "annotations": null }))
                .collect();
            let item = json!({ "id": super::random_id("mcpl_"), "type": "mcp_list_tools", "server_label": server, "tools": tools, "error": null });
            let (index, added) = self.output.add(item.clone());
            out.push(added);
            for kind in ["response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed"] {
                out.push(self.output.event(kind, json!({ "item_id": item["id"], "output_index": index })));
            }
            out.push(self.output.event("response.output_item.done", json!({ "output_index": index, "item": item })));
        }
        out
    }

    fn add_call(&mut self, server: &str, tool: &str, call: &ToolCall) -> Vec<Event> {
        let mut out = self.output.close(Status::Completed);
        let item = json!({
            "id": call.id, "type": "mcp_call", "status": "in_progress", "server_label": server, "name": tool,
            "arguments": "", "output": null, "error": null, "approval_request_id": null,
        });
        let (index, added) = self.output.add(item);
        out.push(added);
        self.output.items[index]["arguments"] = json!(call.arguments);
        out.push(self.output.event("response.mcp_call_arguments.delta", json!({ "item_id": call.id, "output_index": index, "delta": call.arguments })));
        out.push(self.output.event("response.mcp_call_arguments.done", json!({ "item_id": call.id, "output_index": index, "arguments": call.arguments })));
        out.push(self.output.event("response.mcp_call.in_progress", json!({ "item_id": call.id, "output_index": index })));
        out
    }

    fn add_result(&mut self, call_id: &str, outcome: &ToolOutcome) -> Vec<Event> {
        let Some(index) = self.output.items.iter().position(|i| i["type"] == "mcp_call" && i["id"] == call_id) else { return Vec::new() };
        let item = &mut self.output.items[index];
        let kind = if outcome.is_error {
            item["status"] = json!("failed");
            item["error"] = json!({ "type": "mcp_tool_execution_error", "content": [{ "type": "text", "text": outcome.content }] });
            "response.mcp_call.failed"
        } else {
            item["status"] = json!("completed");
            item["output"] = json!(outcome.content);
            "response.mcp_call.completed"
        };
        let item = item.clone();
        vec![
            self.output.event(kind, json!({ "item_id": call_id, "output_index": index })),
            self.output.event("response.output_item.done", json!({ "output_index": index, "item": item })),
        ]
    }

    /// The loop is over: the client's calls, and the last item closed.
    fn finish(&mut self, done: &Finished) -> Vec<Event> {
        let mut out = Vec::new();
        if let Answer::Calls(calls) = &done.answer {
            for call in calls {
                out.extend(self.output.function_call(&call.id.replacen("mcp_", "fc_", 1), &call.id.replacen("mcp_", "call_", 1), &call.name, &call.arguments));
            }
        }
        out.extend(self.output.finish(status(done)));
        out
    }
}

impl LoopEvents for McpItems {
    fn text(&mut self, text: &str) -> Vec<Event> {
        self.output.push(text, Vec::new())
    }

    fn call(&mut self, _round: usize, tool: &RemoteTool, call: &ToolCall) -> Vec<Event> {
        self.add_call(&tool.server, &tool.remote, call)
    }

    fn result(&mut self, _round: usize, _tool: &RemoteTool, call: &ToolCall, outcome: &ToolOutcome) -> Vec<Event> {
        self.add_result(&call.id, outcome)
    }
}

fn status(done: &Finished) -> Status {
    match done.answer {
        Answer::Calls(_) => Status::Completed,
        Answer::Text(_) => Status::of(&done.last),
    }
}

/// Answers a `/v1/responses` request that uses MCP tools; `listed` are the servers whose
/// `mcp_list_tools` items the input already holds.
pub async fn respond(run: ToolLoop, head: Head, listed: Vec<String>) -> Result<Response, ApiError> {
    let start = run.start().await.map_err(super::responses::named_input)?;
    let mut items = McpItems { output: Output::new(None) };
    if run.c.stream {
        let mut first = vec![
            items.output.event("response.created", json!({ "response": head.object("in_progress", &[]) })),
            items.output.event("response.in_progress", json!({ "response": head.object("in_progress", &[]) })),
        ];
        first.extend(items.list(&run.remote, &listed));
        return Ok(run.stream(start, first, items, move |items, outcome| match outcome {
            Ok(done) => {
                let mut out = items.finish(&done);
                let status = status(&done);
                let kind = if status == Status::Completed { "response.completed" } else { "response.incomplete" };
                let response = head.finished(status, &items.output.items, &done.totals);
                out.push(items.output.event(kind, json!({ "response": response })));
                out
            }
            Err(e) => {
                let response = head.failed(&items.output.items, &e);
                vec![items.output.event("response.failed", json!({ "response": response }))]
            }
        }));
    }
    items.list(&run.remote, &listed);
    let done = run.finish(start).await?;
    for step in &done.steps {
        match step {
            Step::Text(text) => items.text(text),
            Step::Call { server, tool, call } => items.add_call(server, tool, call),
            Step::Result { call_id, outcome } => items.add_result(call_id, outcome),
        };
    }
    if let Answer::Text(text) = &done.answer {
        items.text(text);
    }
    items.finish(&done);
    Ok(Json(head.finished(status(&done), &items.output.items, &done.totals)).into_response())
}
