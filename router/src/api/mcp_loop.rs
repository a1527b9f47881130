//! The tool loop of a chat request that opts into MCP tools (`"mcp": true` or a list of
//! servers): the router offers the servers' tools beside the client's, calls the ones the
//! model picks, appends their results as tool messages and lets the model continue, for at
//! most `--max-tool-rounds` rounds of calls; then the model must answer in text. Calls of the
//! client's own tools end the loop and go back to the client as usual. Streams carry each
//! call and result as an extra chunk (docs/api.md, "Models using MCP tools").

use super::openai::{delta_chunk, generate_request, Chunker};
use super::openai_format::{self as fmt, Common};
use super::{check_context, random_id, Totals};
use crate::error::ApiError;
use crate::generate::{Generation, Update};
use crate::mcp::client::{RemoteTool, Selection};
use crate::params::Fields;
use crate::tools::{self, CallReader, Delta, Format, Tool, ToolCall, ToolChoice, Turn};
use crate::upstream::ModelState;
use crate::AppState;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
    let Some(hub) = &state.mcp else {
        return Err(ApiError::field("mcp", "this router has no MCP servers (it runs without --mcp-config)"));
    };
    hub.tools(&selection).map(Some).map_err(|e| match e {
        crate::mcp::client::SelectionError::Unknown { .. } => ApiError::field("mcp", e.to_string()),
        crate::mcp::client::SelectionError::Down { .. } => ApiError::unavailable(e.to_string()),
    })
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
}

enum Answer {
    Text(String),
    /// Calls of the client's tools, for the client to run.
    Calls(Vec<ToolCall>),
}

struct Finished {
    answer: Answer,
    finish: &'static str,
    totals: Totals,
    rounds: usize,
    /// The calls the router made and their results, as chat messages a client can append
    /// to its history.
    messages: Vec<Value>,
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
struct Sink {
    tx: mpsc::Sender<Result<Event, Infallible>>,
    chunker: Chunker,
}

impl Sink {
    async fn send(&self, e: Event) -> Result<(), ApiError> {
        self.tx.send(Ok(e)).await.map_err(|_| gone())
    }

    async fn mcp(&self, event: Value) -> Result<(), ApiError> {
        self.send(self.chunker.extra("mcp", event)).await
    }

    /// A content chunk of the answer, when there is text to send.
    async fn content(&self, text: String) -> Result<(), ApiError> {
        if text.is_empty() {
            return Ok(());
        }
        self.send(self.chunker.chunk(json!([{ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null }]))).await
    }
}

/// The text among a call reader's deltas (a round's calls are sent as events once complete).
fn text_of(deltas: Vec<Delta>) -> String {
    deltas.into_iter().filter_map(|d| if let Delta::Text(t) = d { Some(t) } else { None }).collect()
}

fn gone() -> ApiError {
    ApiError::bad_request("the client went away")
}

/// Runs `fut` unless the streaming client leaves first.
async fn unless_gone<T>(sink: Option<&Sink>, fut: impl std::future::Future<Output = T>) -> Result<T, ApiError> {
    match sink {
        None => Ok(fut.await),
        Some(s) => tokio::select! {
            _ = s.tx.closed() => Err(gone()),
            v = fut => Ok(v),
        },
    }
}

fn call_message(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

impl ToolLoop {
    fn all_tools(&self) -> Vec<Tool> {
        let remote = self.remote.iter().map(|t| Tool { name: t.name.clone(), description: t.description.clone(), parameters: t.parameters.clone(), strict: true });
        self.tools.iter().cloned().chain(remote).collect()
    }

    /// Starts round `round`: past the last round of calls, no tool may be called.
    async fn start_round(&self, round: usize) -> Result<(Generation, Option<Format>), ApiError> {
        let max_rounds = self.state.config.max_tool_rounds;
        let choice = if round >= max_rounds { ToolChoice::None } else { self.choice.clone() };
        let conversation = super::conversation_prompt(&self.model, &self.turns, &self.all_tools(), &choice, self.parallel, false)?;
        check_context(&self.model, conversation.tokens.len(), self.c.max_tokens, "messages")?;
        let key = crate::routing::RouteKey::new(self.session.as_deref(), &conversation.tokens);
        let mut request = generate_request(conversation.tokens, &self.c, false, 0, &random_id("chatcmpl-"), conversation.grammar);
        request.images = conversation.images;
        let generation = Generation::start(&self.state, &self.model, request, key, self.started).await?;
        Ok((generation, conversation.calls))
    }

    /// Reads one round's answer, streaming its text (never its calls) as it comes.
    async fn read_round(generation: &mut Generation, calls: Option<Format>, sink: Option<&Sink>, totals: &mut Totals) -> Result<(String, &'static str), ApiError> {
        let mut reader = calls.map(CallReader::new);
        let mut text = String::new();
        let mut finish = "stop";
        while let Some(update) = unless_gone(sink, generation.next()).await? {
            let piece = match update? {
                Update::Token(t) => t.text,
                Update::Done(d) => {
                    super::collect::cancelled_is_error(&d)?;
                    let mut round = Totals::default();
                    round.add(&d);
                    totals.plus(&round);
                    finish = fmt::finish_reason(&d);
                    d.tail
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
        Ok((text, finish))
    }

    async fn run(mut self, mut generation: Generation, mut calls: Option<Format>, sink: Option<&Sink>) -> Result<Finished, ApiError> {
        let _running = LoopGuard::new(&self.state);
        let hub = self.state.mcp.clone().ok_or_else(|| ApiError::internal("MCP tools without MCP servers"))?;
        let mut totals = Totals::default();
        let mut messages = Vec::new();
        let mut round = 0;
        loop {
            let (text, finish) = Self::read_round(&mut generation, calls, sink, &mut totals).await?;
            // An answer cut short inside its first call has no call to make: it goes back as
            // it is, with its finish reason saying why.
            let made = calls.and_then(|f| tools::read_calls(f, &text)).filter(|c| !c.is_empty());
            let Some(made) = made else {
                return Ok(Finished { answer: Answer::Text(text), finish, totals, rounds: round, messages });
            };
            let made: Vec<ToolCall> = made.into_iter().map(|(name, arguments)| ToolCall { id: random_id("call_"), name, arguments }).collect();
            let (ours, theirs): (Vec<ToolCall>, Vec<ToolCall>) = made.into_iter().partition(|c| self.remote.iter().any(|t| t.name == c.name));
            if !ours.is_empty() {
                let targets: Vec<&RemoteTool> = ours.iter().filter_map(|c| self.remote.iter().find(|t| t.name == c.name)).collect();
                for (call, tool) in ours.iter().zip(&targets) {
                    tracing::info!(mcp_server = %tool.server, "round {}: calling `{}`", round + 1, tool.remote);
                    if let Some(s) = sink {
                        s.mcp(json!({"type": "tool_call", "round": round + 1, "server": tool.server, "call": call_message(call)})).await?;
                    }
                }
                let outcomes = unless_gone(sink, futures_util::future::join_all(ours.iter().zip(&targets).map(|(call, tool)| hub.call(tool, &call.arguments)))).await?;
                self.turns.push(Turn { role: "assistant".into(), content: String::new(), tool_calls: ours.clone(), tool_call_id: None, parts: Vec::new() });
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": ours.iter().map(call_message).collect::<Vec<_>>()}));
                for ((call, tool), outcome) in ours.iter().zip(&targets).zip(outcomes) {
                    if let Some(s) = sink {
                        s.mcp(json!({"type": "tool_result", "round": round + 1, "server": tool.server, "tool_call_id": call.id, "content": outcome.content, "is_error": outcome.is_error}))
                            .await?;
                    }
                    // The model reads a failure as the result, so it can answer or try again.
                    let content = if outcome.is_error { format!("Error: {}", outcome.content) } else { outcome.content };
                    messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": content}));
                    self.turns.push(Turn { role: "tool".into(), content, tool_calls: Vec::new(), tool_call_id: Some(call.id.clone()), parts: Vec::new() });
                }
            }
            round += 1;
            if !theirs.is_empty() {
                return Ok(Finished { answer: Answer::Calls(theirs), finish: "tool_calls", totals, rounds: round, messages });
            }
            // The request's choice held for the first round; after it the model decides.
            if matches!(self.choice, ToolChoice::Named(_) | ToolChoice::Required) {
                self.choice = ToolChoice::Auto;
            }
            (generation, calls) = self.start_round(round).await?;
        }
    }

    /// Answers the request: the first round starts before the response does, so a request
    /// that cannot start gets an HTTP error rather than an error event.
    pub async fn respond(self) -> Result<Response, ApiError> {
        let (generation, calls) = self.start_round(0).await?;
        let (id, created) = (random_id("chatcmpl-"), super::unix_now());
        let chunker = Chunker { id, object: "chat.completion.chunk", created, model: self.model.info.model_id.clone(), include_usage: self.c.include_usage };
        if self.c.stream {
            let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
            tokio::spawn(async move {
                let sink = Sink { tx, chunker };
                if sink.send(sink.chunker.chunk(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]))).await.is_err() {
                    return;
                }
                let events = match self.run(generation, calls, Some(&sink)).await {
                    Ok(done) => {
                        let mut out: Vec<Event> = Vec::new();
                        if let Answer::Calls(calls) = &done.answer {
                            for (k, call) in calls.iter().enumerate() {
                                out.push(delta_chunk(&sink.chunker, 0, Delta::CallStart { index: k, name: call.name.clone() }));
                                out.push(delta_chunk(&sink.chunker, 0, Delta::Arguments { index: k, fragment: call.arguments.clone() }));
                            }
                        }
                        out.push(sink.chunker.chunk(json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": done.finish }])));
                        out.extend(sink.chunker.end(&done.totals));
                        out
                    }
                    Err(e) => vec![super::sse::json_event(&e.body())],
                };
                for e in events {
                    if sink.send(e).await.is_err() {
                        return;
                    }
                }
            });
            return Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response());
        }
        let model_id = self.model.info.model_id.clone();
        let done = self.run(generation, calls, None).await?;
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
