//! A scripted stand-in for a worker: serves a byte-level tokenizer and answers every
//! generation with a fixed reply, or fails in a chosen way, so router behaviour can be
//! checked exactly and quickly.

#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_server::{Worker, WorkerServer};
use kiln_router::routing::Policy;
use kiln_router::upstream::WorkerPool;
use kiln_router::{api, AppState, RouterConfig};
use serde_json::Value;
use tower::ServiceExt;
use kiln_shared::tokenizer::{PreTokenizer, TokenKind, TokenizerModel, TokenizerSpec};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

pub const REPLY: &str = "Hello world";
/// What Mode::Calls answers: one call in the Hermes format kiln's generic tool prompt asks for.
pub const CALL_REPLY: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
pub const CONTEXT: u32 = 64;
/// The context of a worker that must take a prompt describing tools.
pub const LONG_CONTEXT: u32 = 4096;
/// Prompt tokens every generation reports as found in the prefix cache (fewer for a
/// shorter prompt).
pub const CACHED: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Streams REPLY, one byte per token, for each of the n completions; cut off (finish
    /// `length`) at the request's `max_tokens`.
    Reply,
    /// As Reply, with CALL_REPLY.
    Calls,
    /// Refuses every call as if down.
    Unavailable,
    /// Refuses every generation as a bad request.
    Invalid,
    /// Sends two tokens, then fails.
    DiesMidStream,
    /// Sends two tokens, then refuses the request (as a worker does when the request's
    /// grammar fails while generating).
    RefusesMidStream,
    /// Sends a token every 20 ms until the stream is closed.
    Endless,
    /// Sends two tokens, then nothing, keeping the stream open (a hung worker).
    StallsMidStream,
}

#[derive(Default)]
pub struct Record {
    pub requests: Mutex<Vec<pb::GenerateRequest>>,
    /// Streams the router closed before they ended.
    pub closed_early: AtomicUsize,
}

/// GPT-2's byte-to-character mapping, so each byte is one token.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

pub fn tokenizer_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut kinds = vec![TokenKind::Normal; 256];
    for special in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(special.to_string());
        kinds.push(TokenKind::Control);
    }
    TokenizerSpec {
        model: TokenizerModel::ByteBpe { pre: PreTokenizer::Gpt2, merges: vec![] },
        tokens,
        kinds,
        scores: vec![],
        bos_id: None,
        eos_id: Some(257),
        eog_ids: vec![257],
        add_bos: false,
        add_eos: false,
    }
}

pub struct FakeWorker {
    pub mode: Mode,
    pub record: Arc<Record>,
    pub model_id: String,
    pub context: u32,
}

type Events = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

fn token(index: u32, b: u8) -> pb::GenerateEvent {
    pb::GenerateEvent {
        event: Some(pb::generate_event::Event::Token(pb::TokenEvent {
            index,
            token: u32::from(b),
            text: (b as char).to_string(),
            logprob: Some(-0.5),
            top_logprobs: vec![pb::TopLogprob { token: u32::from(b), text: (b as char).to_string(), logprob: -0.5 }],
            cached_tokens: None,
        })),
    }
}

/// A completion's first token, which says how much of the prompt was cached.
fn first_token(index: u32, b: u8, prompt: usize) -> pb::GenerateEvent {
    let mut e = token(index, b);
    if let Some(pb::generate_event::Event::Token(t)) = &mut e.event {
        t.cached_tokens = Some(CACHED.min(prompt) as u32);
    }
    e
}

/// Log-probability the fake reports for prompt position `pos`.
pub fn prompt_logprob(pos: usize) -> f32 {
    -(pos as f32) / 8.0
}

/// Prompt log-probabilities for positions 1.. of a prompt of `len` tokens, in two events
/// (as a worker sends a long prompt's, chunk by chunk); each names its token as the top one.
fn prompt_logprobs(prompt: &[u32]) -> Vec<pb::GenerateEvent> {
    let mid = prompt.len().div_ceil(2);
    [1..mid, mid..prompt.len()]
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| pb::GenerateEvent {
            event: Some(pb::generate_event::Event::PromptLogprobs(pb::PromptLogprobsEvent {
                first: r.start as u32,
                tokens: r
                    .map(|pos| pb::PromptLogprob {
                        logprob: prompt_logprob(pos),
                        top_logprobs: vec![pb::TopLogprob { token: prompt[pos], text: String::new(), logprob: prompt_logprob(pos) }],
                    })
                    .collect(),
            })),
        })
        .collect()
}

fn done(index: u32, prompt: usize, generated: usize) -> pb::GenerateEvent {
    pb::GenerateEvent {
        event: Some(pb::generate_event::Event::Done(pb::DoneEvent {
            index,
            finish: pb::FinishReason::Stop as i32,
            usage: Some(pb::Usage { prompt_tokens: prompt as u32, cached_tokens: CACHED.min(prompt) as u32, completion_tokens: generated as u32, ..Default::default() }),
            tail: String::new(),
            stop_sequence: None,
        })),
    }
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(pb::ModelInfoResponse {
            model_id: self.model_id.clone(),
            display_name: "fake".into(),
            architecture: "llama".into(),
            context_length: self.context,
            vocab_size: 258,
            tokenizer_json: serde_json::to_vec(&tokenizer_spec()).unwrap(),
            chat_template: kiln_shared::chat::builtin_template("llama").into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
            max_seqs: 2,
            weight_format: "F32".into(),
            device: "cpu".into(),
            kind: pb::ModelKind::Generate as i32,
            dimensions: 0,
            vision: None,
        }))
    }

    type GenerateStream = Events;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Events>, Status> {
        let req = request.into_inner();
        self.record.requests.lock().unwrap().push(req.clone());
        match self.mode {
            Mode::Unavailable => return Err(Status::unavailable("fake worker is down")),
            Mode::Invalid => return Err(Status::invalid_argument("fake worker refuses: bad thing")),
            _ => {}
        }
        let (tx, rx) = mpsc::channel(8);
        let (mode, record, prompt) = (self.mode, Arc::clone(&self.record), req.prompt.len());
        tokio::spawn(async move {
            let n = req.n.max(1);
            if req.prompt_logprobs.is_some() && matches!(mode, Mode::Reply | Mode::Calls | Mode::DiesMidStream) {
                for e in prompt_logprobs(&req.prompt) {
                    let _ = tx.send(Ok(e)).await;
                }
            }
            let ok = match mode {
                Mode::Reply | Mode::Calls => {
                    let reply = if mode == Mode::Calls { CALL_REPLY } else { REPLY };
                    let mut ok = true;
                    // A resumed completion continues the reply after the bytes already sent.
                    let (indices, skip) = match &req.resume {
                        Some(r) => (vec![r.index], r.tokens.len()),
                        None => ((0..n).collect(), 0),
                    };
                    let budget = req.max_tokens.map_or(reply.len(), |m| m as usize);
                    let end = reply.len().min(skip + budget);
                    for index in indices {
                        for (i, &b) in reply.as_bytes()[skip.min(end)..end].iter().enumerate() {
                            let event = if i == 0 { first_token(index, b, prompt) } else { token(index, b) };
                            ok &= tx.send(Ok(event)).await.is_ok();
                        }
                        let mut last = done(index, prompt, end);
                        if let Some(pb::generate_event::Event::Done(d)) = last.event.as_mut().filter(|_| end < reply.len()) {
                            d.finish = pb::FinishReason::Length as i32;
                        }
                        ok &= tx.send(Ok(last)).await.is_ok();
                    }
                    ok
                }
                Mode::DiesMidStream => {
                    let _ = tx.send(Ok(token(0, b'H'))).await;
                    let _ = tx.send(Ok(token(0, b'e'))).await;
                    tx.send(Err(Status::internal("fake worker crashed"))).await.is_ok()
                }
                Mode::RefusesMidStream => {
                    let _ = tx.send(Ok(token(0, b'H'))).await;
                    let _ = tx.send(Ok(token(0, b'e'))).await;
                    tx.send(Err(Status::invalid_argument("constrained decoding failed: fake grammar"))).await.is_ok()
                }
                Mode::StallsMidStream => {
                    let _ = tx.send(Ok(token(0, b'H'))).await;
                    let _ = tx.send(Ok(token(0, b'e'))).await;
                    tx.closed().await;
                    false
                }
                Mode::Endless => loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.send(Ok(token(0, b'x'))).await.is_err() {
                        break false;
                    }
                },
                Mode::Unavailable | Mode::Invalid => true,
            };
            if !ok {
                record.closed_early.fetch_add(1, Ordering::SeqCst);
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, _: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        Err(Status::unimplemented("the router tokenizes itself"))
    }

    async fn detokenize(&self, _: Request<pb::DetokenizeRequest>) -> Result<Response<pb::DetokenizeResponse>, Status> {
        Err(Status::unimplemented("the router detokenizes itself"))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse { serving: true, model_id: self.model_id.clone() }))
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(pb::LoadResponse::default()))
    }

    async fn embed(&self, _: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        Err(Status::invalid_argument("the fake worker generates text; it is not an embedding model"))
    }
}

/// Serves a fake worker on a free port; returns its address and what it saw.
pub async fn spawn(mode: Mode) -> (String, Arc<Record>) {
    spawn_serving(mode, "fake").await
}

/// A fake worker whose model is called `model_id`.
pub async fn spawn_serving(mode: Mode, model_id: &str) -> (String, Arc<Record>) {
    spawn_with_context(mode, model_id, CONTEXT).await
}

/// A fake worker whose model has a context of `context` tokens.
pub async fn spawn_with_context(mode: Mode, model_id: &str, context: u32) -> (String, Arc<Record>) {
    let record = Arc::new(Record::default());
    let worker = FakeWorker { mode, record: Arc::clone(&record), model_id: model_id.into(), context };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServer::new(worker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, record)
}

// What the tests drive the router with.

pub async fn router_over(modes: &[Mode], config: RouterConfig) -> (axum::Router, Arc<AppState>, Vec<Arc<Record>>) {
    let mut addrs = vec![];
    let mut records = vec![];
    for &m in modes {
        let context = if m == Mode::Calls { LONG_CONTEXT } else { CONTEXT };
        let (addr, record) = spawn_with_context(m, "fake", context).await;
        addrs.push(addr);
        records.push(record);
    }
    // Round robin visits every worker first within as many requests as there are workers.
    let pool = WorkerPool::new(&addrs).unwrap().with_policy(Policy::RoundRobin);
    pool.refresh_all().await;
    let state = Arc::new(AppState::new(pool, config));
    (api::router(Arc::clone(&state)), state, records)
}

pub async fn call(app: &axum::Router, method: &str, path: &str, body: Value, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut req = HttpRequest::builder().method(method).uri(path).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = app.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub async fn post(app: &axum::Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = call(app, "POST", path, body, &[]).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an SSE body, and its event names.
pub fn sse(text: &str) -> (Vec<String>, Vec<String>) {
    let data = text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    let names = text.lines().filter_map(|l| l.strip_prefix("event: ")).map(str::to_string).collect();
    (data, names)
}
