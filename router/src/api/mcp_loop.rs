//! The tool loop of a chat request that opts into MCP tools (`"mcp": true` or a list of
//! servers): the router offers the servers' tools beside the client's, calls the ones the
//! model picks, appends their results as tool messages and lets the model continue, for at
//! most `--max-tool-rounds` rounds of calls; then the model must answer in text. Calls of the
//! client's own tools end the loop and go back to the client as usual. Streams carry each
//! call and result as they happen, in the route's own format (`LoopEvents`): extra chunks on
//! the OpenAI route, `mcp_tool_use` and `mcp_tool_result` blocks on `/v1/messages`
//! (`anthropic_mcp`; docs/api.md, "Models using MCP tools").

use super::openai::{delta_chunk, generate_request, Chunker};
use super::openai_format::{self as fmt, Common};
use super::{check_context, random_id, Totals};
use crate::error::ApiError;
use crate::generate::{Generation, Update};
use crate::mcp::client::{McpHub, RemoteTool, Selection, SelectionError, ToolOutcome, Transport};
use crate::params::Fields;
use crate::tools::{self, CallReader, Delta, Format, Tool, ToolCall, ToolChoice, Turn};
use crate::upstream::ModelState;
use crate::AppState;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::v1 as pb;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tokio::sync::mpsc;

/// The MCP tools a request opted into, or None when it did not.
pub fn requested_tools(state: &AppState, f: &Fields) -> Result<Option<Vec<RemoteTool>>, ApiError> {
    let selection = match f.get("mcp") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => Selection::All,
        Some(Value::Array(names)) => {
            let names: Option<Vec<String>> = names.iter().map(|v| v.as_str().map(str::to_string)).collect();
            Selection::Named(names.ok_or_else(|| ApiError::field("mcp", "expected true or an array of MCP server names"))?)
        }
        Some(_) => return Err(ApiError::field("mcp", "expected true or an array of MCP server names")),
    };
    select(hub(state, "mcp")?, &selection, "mcp").map(Some)
}

/// The router's MCP servers, for a request that asks for them in `field`.
pub fn hub<'a>(state: &'a AppState, field: &str) -> Result<&'a McpHub, ApiError> {
    state.mcp.as_deref().ok_or_else(|| ApiError::field(field, "this router has no MCP servers (it runs without --mcp-config)"))
}

/// The tools of the servers a request named in `field`: each must exist (400) and be
/// connected (503).
pub fn select(hub: &McpHub, selection: &Selection, field: &str) -> Result<Vec<RemoteTool>, ApiError> {
    hub.tools(selection).map_err(|e| match e {
        SelectionError::Unknown { .. } => ApiError::field(field, e.to_string()),
        SelectionError::Down { .. } => ApiError::unavailable(e.to_string()),
    })
}

/// The router's MCP server a request named in `field`, with the `url` it gave for it (in
/// `url_field`) checked: the router connects only to the servers its operator configured, and
/// a URL that is not the configured one would otherwise be answered by another server than
/// the client meant.
pub fn configured_server(hub: &McpHub, name: &str, field: &str, url: Option<&str>, url_field: &str) -> Result<(), ApiError> {
    let Some(spec) = hub.spec(name) else {
        let names = hub.names();
        let known = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        return Err(ApiError::field(field, format!("no MCP server `{name}`; this router has {known}")));
    };
    match (url, &spec.transport) {
        (None, _) => Ok(()),
        (Some(url), Transport::Http { url: configured, .. }) if configured == url => Ok(()),
        (Some(_), Transport::Http { .. }) => {
            Err(ApiError::field(url_field, format!("is not the URL of the router's MCP server `{name}`; the router connects only to the servers of its --mcp-config")))
        }
        (Some(_), Transport::Stdio { .. }) => Err(ApiError::field(url_field, format!("the router's MCP server `{name}` is a local program, not a URL; give only its name"))),
    }
}

/// One request's loop.
pub struct ToolLoop {
    pub state: Arc<AppState>,
    pub model: Arc<ModelState>,
    pub turns: Vec<Turn>,
    /// The client's tools.
    pub tools: Vec<Tool>,
    pub remote: Vec<RemoteTool>,
    pub choice: ToolChoice,
    pub parallel: bool,
    pub c: Common,
    pub session: Option<String>,
    pub started: Instant,
    /// The prefix of the ids given to the model's calls (`call_`, `mcptoolu_`).
    pub call_ids: &'static str,
    /// The route returns calls' arguments as JSON objects (Anthropic's), which a client sends
    /// back serialized anew: the loop's own history holds them in that form too, so that a
    /// continued conversation puts the same prompt to the model.
    pub arguments_as_objects: bool,
    /// The route's names for the conversation and the answer's budget, in context errors.
    pub context_fields: (&'static str, &'static str),
    /// The most MCP calls the loop makes (the Responses API's `max_tool_calls`); a round that
    /// asks for more makes only the first ones, and the model then answers without tools.
    pub max_calls: Option<usize>,
}

pub enum Answer {
    Text(String),
    /// Calls of the client's tools, for the client to run.
    Calls(Vec<ToolCall>),
}

/// What happened before the answer, in order.
pub enum Step {
    /// The text the model wrote in a round of calls, without the calls' markup.
    Text(String),
    /// A call the router made: `tool` is the server's name for it.
    Call { server: String, tool: String, call: ToolCall },
    Result { call_id: String, outcome: ToolOutcome },
}

pub struct Finished {
    pub answer: Answer,
    /// The OpenAI finish reason.
    pub finish: &'static str,
    /// The last round's end, for routes that describe it otherwise.
    pub last: pb::DoneEvent,
    pub totals: Totals,
    pub rounds: usize,
    /// The calls the router made and their results, as chat messages a client can append
    /// to its history.
    pub messages: Vec<Value>,
    pub steps: Vec<Step>,
}

/// The first round, started: a request that cannot start gets an HTTP error rather than an
/// error event.
pub struct Start {
    generation: Generation,
    calls: Option<Format>,
    pub prompt_tokens: u32,
}

impl Start {
    /// The first round's prompt, with the part the worker found in its prefix cache (when
    /// it said) and nothing generated yet.
    pub fn totals(&self) -> Totals {
        Totals { prompt_tokens: self.prompt_tokens, cached_tokens: self.generation.cached_prompt_tokens().unwrap_or(0), completion_tokens: 0 }
    }
}

/// How a route shows a loop's progress to a streaming client.
pub trait LoopEvents: Send + 'static {
    /// Answer text as it comes (never a call's markup).
    fn text(&mut self, text: &str) -> Vec<Event>;
    /// A call the router is about to make.
    fn call(&mut self, round: usize, tool: &RemoteTool, call: &ToolCall) -> Vec<Event>;
    fn result(&mut self, round: usize, tool: &RemoteTool, call: &ToolCall, outcome: &ToolOutcome) -> Vec<Event>;
}

/// Counts a loop in `AppState::tool_loops` while it runs.
struct LoopGuard<'a>(&'a AppState);

impl<'a> LoopGuard<'a> {
    fn new(state: &'a AppState) -> LoopGuard<'a> {
        state.tool_loops.fetch_add(1, Ordering::Relaxed);
        LoopGuard(state)
    }
}

impl Drop for LoopGuard<'_> {
    fn drop(&mut self) {
        self.0.tool_loops.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a streamed request's events go.
struct Sink<E> {
    tx: mpsc::Sender<Result<Event, Infallible>>,
    events: Mutex<E>,
}

impl<E: LoopEvents> Sink<E> {
    async fn send(&self, events: Vec<Event>) -> Result<(), ApiError> {
        for e in events {
            self.tx.send(Ok(e)).await.map_err(|_| gone())?;
        }
        Ok(())
    }

    fn format(&self, f: impl FnOnce(&mut E) -> Vec<Event>) -> Vec<Event> {
        f(&mut self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A piece of the answer, when there is text to send.
    async fn content(&self, text: String) -> Result<(), ApiError> {
        if text.is_empty() {
            return Ok(());
        }
        self.send(self.format(|e| e.text(&text))).await
    }
}

/// The loop of a request that is not streamed shows nothing as it runs.
struct Quiet;

impl LoopEvents for Quiet {
    fn text(&mut self, _: &str) -> Vec<Event> {
        Vec::new()
    }
    fn call(&mut self, _: usize, _: &RemoteTool, _: &ToolCall) -> Vec<Event> {
        Vec::new()
    }
    fn result(&mut self, _: usize, _: &RemoteTool, _: &ToolCall, _: &ToolOutcome) -> Vec<Event> {
        Vec::new()
    }
}

/// The OpenAI route's events: the answer as content chunks, calls and results as chunks with
/// empty `choices` and an `mcp` object.
struct OpenAiEvents {
    chunker: Chunker,
}

impl LoopEvents for OpenAiEvents {
    fn text(&mut self, text: &str) -> Vec<Event> {
        vec![self.chunker.chunk(json!([{ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null }]))]
    }

    fn call(&mut self, round: usize, tool: &RemoteTool, call: &ToolCall) -> Vec<Event> {
        vec![self.chunker.extra("mcp", json!({"type": "tool_call", "round": round, "server": tool.server, "call": call_message(call)}))]
    }

    fn result(&mut self, round: usize, tool: &RemoteTool, call: &ToolCall, outcome: &ToolOutcome) -> Vec<Event> {
        let event = json!({"type": "tool_result", "round": round, "server": tool.server, "tool_call_id": call.id, "content": outcome.content, "is_error": outcome.is_error});
        vec![self.chunker.extra("mcp", event)]
    }
}

/// The text among a call reader's deltas (a round's calls are sent as events once complete).
fn text_of(deltas: Vec<Delta>) -> String {
    deltas.into_iter().filter_map(|d| if let Delta::Text(t) = d { Some(t) } else { None }).collect()
}

/// A round's text without its calls' markup.
fn visible(format: Format, text: &str) -> String {
    let mut reader = CallReader::new(format);
    let mut out = text_of(reader.push(text));
    out.push_str(&text_of(reader.finish()));
    out
}

fn gone() -> ApiError {
    ApiError::bad_request("the client went away")
}

/// Runs `fut` unless the streaming client leaves first.
async fn unless_gone<T, E>(sink: Option<&Sink<E>>, fut: impl std::future::Future<Output = T>) -> Result<T, ApiError> {
    match sink {
        None => Ok(fut.await),
        Some(s) => tokio::select! {
            _ = s.tx.closed() => Err(gone()),
            v = fut => Ok(v),
        },
    }
}

/// An MCP tool as the model is offered it.
pub fn offered(t: &RemoteTool) -> Tool {
    Tool { name: t.name.clone(), description: t.description.clone(), parameters: t.parameters.clone(), strict: true }
}

fn call_message(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

impl ToolLoop {
    fn all_tools(&self) -> Vec<Tool> {
        self.tools.iter().cloned().chain(self.remote.iter().map(offered)).collect()
    }

    /// Starts round `round` after `calls` MCP calls: past the last round of calls, or with
    /// no calls left, no tool may be called.
    async fn start_round(&self, round: usize, calls: usize) -> Result<Start, ApiError> {
        let max_rounds = self.state.config.max_tool_rounds;
        let spent = self.max_calls.is_some_and(|max| calls >= max);
        let choice = if round >= max_rounds || spent { ToolChoice::None } else { self.choice.clone() };
        let conversation = super::conversation_prompt(&self.model, &self.turns, &self.all_tools(), &choice, self.parallel, false)?;
        let budget = check_context(&self.model, conversation.tokens.len(), self.c.max_tokens, self.state.config.limits.max_tokens, self.context_fields)?;
        let key = crate::routing::RouteKey::new(self.session.as_deref(), &conversation.tokens);
        let prompt_tokens = conversation.tokens.len() as u32;
        let mut request = generate_request(conversation.tokens, &self.c, false, 0, &random_id("chatcmpl-"), conversation.grammar);
        request.max_tokens = budget;
        request.images = conversation.images;
        let generation = Generation::start(&self.state, &self.model, request, key, self.started).await?;
        Ok(Start { generation, calls: conversation.calls, prompt_tokens })
    }

    /// Starts the first round.
    pub async fn start(&self) -> Result<Start, ApiError> {
        self.start_round(0, 0).await
    }

    /// Reads one round's answer, streaming its text (never its calls) as it comes.
    async fn read_round<E: LoopEvents>(generation: &mut Generation, calls: Option<Format>, sink: Option<&Sink<E>>, totals: &mut Totals) -> Result<(String, pb::DoneEvent), ApiError> {
        let mut reader = calls.map(CallReader::new);
        let mut text = String::new();
        let mut last = pb::DoneEvent::default();
        while let Some(update) = unless_gone(sink, generation.next()).await? {
            let piece = match update? {
                Update::Token(t) => t.text,
                Update::Done(d) => {
                    super::collect::cancelled_is_error(&d)?;
                    let mut round = Totals::default();
                    round.add(&d);
                    totals.plus(&round);
                    let tail = d.tail.clone();
                    last = d;
                    tail
                }
            };
            text.push_str(&piece);
            let Some(sink) = sink else { continue };
            let shown = match &mut reader {
                None => piece,
                Some(r) => text_of(r.push(&piece)),
            };
            sink.content(shown).await?;
        }
        if let (Some(sink), Some(r)) = (sink, &mut reader) {
            sink.content(text_of(r.finish())).await?;
        }
        Ok((text, last))
    }

    async fn run<E: LoopEvents>(mut self, start: Start, sink: Option<&Sink<E>>) -> Result<Finished, ApiError> {
        let _running = LoopGuard::new(&self.state);
        let hub = self.state.mcp.clone().ok_or_else(|| ApiError::internal("MCP tools without MCP servers"))?;
        let mut totals = Totals::default();
        let mut messages = Vec::new();
        let mut steps = Vec::new();
        let mut round = 0;
        let mut calls_made = 0;
        let Start { mut generation, mut calls, .. } = start;
        loop {
            let (text, last) = Self::read_round(&mut generation, calls, sink, &mut totals).await?;
            let finish = fmt::finish_reason(&last);
            // An answer cut short inside its first call has no call to make: it goes back as
            // it is, with its finish reason saying why.
            let made = calls.and_then(|f| tools::read_calls(f, &text)).filter(|c| !c.is_empty());
            let (Some(made), Some(format)) = (made, calls) else {
                return Ok(Finished { answer: Answer::Text(text), finish, last, totals, rounds: round, messages, steps });
            };
            steps.push(Step::Text(visible(format, &text)));
            let made: Vec<ToolCall> = made
                .into_iter()
                .map(|(name, arguments)| {
                    let arguments = match serde_json::from_str::<Value>(&arguments) {
                        Ok(object @ Value::Object(_)) if self.arguments_as_objects => object.to_string(),
                        _ => arguments,
                    };
                    ToolCall { id: random_id(self.call_ids), name, arguments }
                })
                .collect();
            let (mut ours, theirs): (Vec<ToolCall>, Vec<ToolCall>) = made.into_iter().partition(|c| self.remote.iter().any(|t| t.name == c.name));
            if let Some(max) = self.max_calls {
                ours.truncate(max.saturating_sub(calls_made));
            }
            calls_made += ours.len();
            if !ours.is_empty() {
                let targets: Vec<&RemoteTool> = ours.iter().filter_map(|c| self.remote.iter().find(|t| t.name == c.name)).collect();
                for (call, tool) in ours.iter().zip(&targets) {
                    tracing::info!(mcp_server = %tool.server, "round {}: calling `{}`", round + 1, tool.remote);
                    if let Some(s) = sink {
                        s.send(s.format(|e| e.call(round + 1, tool, call))).await?;
                    }
                    steps.push(Step::Call { server: tool.server.clone(), tool: tool.remote.clone(), call: call.clone() });
                }
                let outcomes = unless_gone(sink, futures_util::future::join_all(ours.iter().zip(&targets).map(|(call, tool)| hub.call(tool, &call.arguments)))).await?;
                self.turns.push(Turn { role: "assistant".into(), content: String::new(), tool_calls: ours.clone(), tool_call_id: None, parts: Vec::new() });
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": ours.iter().map(call_message).collect::<Vec<_>>()}));
                for ((call, tool), outcome) in ours.iter().zip(&targets).zip(outcomes) {
                    if let Some(s) = sink {
                        s.send(s.format(|e| e.result(round + 1, tool, call, &outcome))).await?;
                    }
                    // The model reads a failure as the result, so it can answer or try again.
                    let content = if outcome.is_error { format!("Error: {}", outcome.content) } else { outcome.content.clone() };
                    messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": content}));
                    self.turns.push(Turn { role: "tool".into(), content, tool_calls: Vec::new(), tool_call_id: Some(call.id.clone()), parts: Vec::new() });
                    steps.push(Step::Result { call_id: call.id.clone(), outcome });
                }
            }
            round += 1;
            if !theirs.is_empty() {
                return Ok(Finished { answer: Answer::Calls(theirs), finish: "tool_calls", last, totals, rounds: round, messages, steps });
            }
            // The request's choice held for the first round; after it the model decides.
            if matches!(self.choice, ToolChoice::Named(_) | ToolChoice::Required) {
                self.choice = ToolChoice::Auto;
            }
            Start { generation, calls, .. } = self.start_round(round, calls_made).await?;
        }
    }

    /// Runs the loop to its end for a request that is not streamed.
    pub async fn finish(self, start: Start) -> Result<Finished, ApiError> {
        self.run::<Quiet>(start, None).await
    }

    /// Streams the loop: `first` at once, `events` as it runs, then what `end` makes of the
    /// outcome.
    pub fn stream<E: LoopEvents>(self, start: Start, first: Vec<Event>, events: E, end: impl FnOnce(&mut E, Result<Finished, ApiError>) -> Vec<Event> + Send + 'static) -> Response {
        let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        tokio::spawn(async move {
            let sink = Sink { tx, events: Mutex::new(events) };
            if sink.send(first).await.is_err() {
                return;
            }
            let outcome = self.run(start, Some(&sink)).await;
            let last = sink.format(|e| end(e, outcome));
            // A client that left needs nothing more.
            let _ = sink.send(last).await;
        });
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
    }

    /// Answers a request of the OpenAI route.
    pub async fn respond(self) -> Result<Response, ApiError> {
        let start = self.start().await?;
        let (id, created) = (random_id("chatcmpl-"), super::unix_now());
        let chunker = Chunker { id, object: "chat.completion.chunk", created, model: self.model.info.model_id.clone(), include_usage: self.c.include_usage };
        if self.c.stream {
            let first = vec![chunker.chunk(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]))];
            return Ok(self.stream(start, first, OpenAiEvents { chunker }, |events, outcome| match outcome {
                Ok(done) => {
                    let chunker = &events.chunker;
                    let mut out: Vec<Event> = Vec::new();
                    if let Answer::Calls(calls) = &done.answer {
                        for (k, call) in calls.iter().enumerate() {
                            out.push(delta_chunk(chunker, 0, Delta::CallStart { index: k, name: call.name.clone() }));
                            out.push(delta_chunk(chunker, 0, Delta::Arguments { index: k, fragment: call.arguments.clone() }));
                        }
                    }
                    out.push(chunker.chunk(json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": done.finish }])));
                    out.extend(chunker.end(&done.totals));
                    out
                }
                Err(e) => vec![super::sse::json_event(&e.body())],
            }));
        }
        let model_id = self.model.info.model_id.clone();
        let done = self.finish(start).await?;
        let message = match &done.answer {
            Answer::Text(text) => json!({ "role": "assistant", "content": text, "refusal": null }),
            Answer::Calls(calls) => json!({ "role": "assistant", "content": null, "tool_calls": calls.iter().map(call_message).collect::<Vec<_>>(), "refusal": null }),
        };
        Ok(Json(json!({
            "id": chunker.id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": done.finish }],
            "usage": fmt::usage(&done.totals),
            "mcp": { "rounds": done.rounds, "messages": done.messages },
        }))
        .into_response())
    }
}
