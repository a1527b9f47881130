//! The worker's `kiln.v1.Worker` gRPC service over the engine.
//!
//! Each Generate call submits to the engine and relays its events; a thread per stream waits
//! on the engine's channel and notices within 50 ms when the client has gone, dropping the
//! engine stream, which cancels the generation and frees its blocks.
//!
//! The model sits in a `ModelSlot` that placement can fill, empty or replace while the
//! service runs; without a model every call but Health answers `Unavailable`. A generating
//! model answers Generate, an embedding model Embed; each refuses the other's call.

use super::convert;
use crate::embed_queue::EmbedQueue;
use crate::engine::{EngineHandle, Event, RequestStream};
use crate::loader::LoadedModel;
use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_server::Worker;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// What a loaded model does.
pub enum Backend {
    /// A generating model and its engine; `grammars` compiles requests' grammars against the
    /// model's vocabulary.
    Generate { engine: EngineHandle, model: Arc<LoadedModel>, grammars: Arc<crate::constraint::Grammars> },
    /// An embedding model and its queue.
    Embed(Arc<EmbedQueue>),
}

/// A loaded model with its engine, as the service exposes it.
pub struct Serving {
    pub backend: Backend,
    pub info: pb::ModelInfoResponse,
    pub tokenizer: Arc<kiln_shared::tokenizer::Tokenizer>,
}

impl Serving {
    pub fn new(engine: EngineHandle, model: Arc<LoadedModel>, model_id: &str, max_seqs: usize) -> Result<Serving, serde_json::Error> {
        let cfg = model.model.config();
        let info = pb::ModelInfoResponse {
            model_id: model_id.to_string(),
            display_name: cfg.name.clone(),
            architecture: cfg.architecture.clone(),
            context_length: engine.capacity().max_context_len as u32,
            vocab_size: cfg.vocab_size as u32,
            tokenizer_json: serde_json::to_vec(&model.tokenizer.wire_spec())?,
            chat_template: model.chat_template_source.clone(),
            bos_token: model.tokenizer.bos_text().unwrap_or("").to_string(),
            eos_token: model.tokenizer.eos_text().unwrap_or("").to_string(),
            max_seqs: max_seqs as u32,
            weight_format: model.weight_format.clone(),
            device: model.model.device(),
            kind: pb::ModelKind::Generate as i32,
            dimensions: 0,
            vision: model.vision.as_ref().map(|v| pb::Vision {
                placeholder: v.info.placeholder.clone(),
                image_token: v.info.image_token.clone(),
                image_token_id: v.info.image_token_id,
                tokens_per_image: match v.info.count {
                    crate::vision::TokenCount::Fixed(n) => n as u32,
                    crate::vision::TokenCount::Grid { .. } => 0,
                },
                pixels_per_token: match v.info.count {
                    crate::vision::TokenCount::Grid { pixels } => pixels,
                    crate::vision::TokenCount::Fixed(_) => 0,
                },
                min_pixels: match v.processor.resize {
                    crate::vision::Resize::Fit { min_pixels, .. } => min_pixels,
                    crate::vision::Resize::Exact { .. } => 0,
                },
                max_pixels: match v.processor.resize {
                    crate::vision::Resize::Fit { max_pixels, .. } => max_pixels,
                    crate::vision::Resize::Exact { .. } => 0,
                },
                before: v.info.before.clone(),
                after: v.info.after.clone(),
                max_images: crate::vision::MAX_IMAGES as u32,
            }),
        };
        let grammars = Arc::new(crate::constraint::Grammars::new(Arc::clone(&model.tokenizer)));
        let tokenizer = Arc::clone(&model.tokenizer);
        Ok(Serving { backend: Backend::Generate { engine, model, grammars }, info, tokenizer })
    }

    /// An embedding model, served through its queue.
    pub fn embedding(queue: Arc<EmbedQueue>, model_id: &str, max_seqs: usize) -> Result<Serving, serde_json::Error> {
        let e = &queue.embedder;
        let info = pb::ModelInfoResponse {
            model_id: model_id.to_string(),
            display_name: e.name.clone(),
            architecture: e.architecture.clone(),
            context_length: e.pooling.max_tokens as u32,
            vocab_size: e.tokenizer.vocab_size() as u32,
            tokenizer_json: serde_json::to_vec(&e.tokenizer.wire_spec())?,
            chat_template: String::new(),
            bos_token: e.tokenizer.bos_text().unwrap_or("").to_string(),
            eos_token: e.tokenizer.eos_text().unwrap_or("").to_string(),
            max_seqs: max_seqs as u32,
            weight_format: e.weight_format.clone(),
            // Encoders run on kiln's CPU kernels.
            device: "cpu".into(),
            kind: pb::ModelKind::Embed as i32,
            dimensions: e.dimensions() as u32,
            vision: None,
        };
        let tokenizer = Arc::clone(&e.tokenizer);
        Ok(Serving { backend: Backend::Embed(queue), info, tokenizer })
    }

    /// The generation engine, for a generating model.
    pub fn engine(&self) -> Option<&EngineHandle> {
        match &self.backend {
            Backend::Generate { engine, .. } => Some(engine),
            Backend::Embed(_) => None,
        }
    }

    /// Stops the engine or queue (after what is running).
    pub fn shutdown(&self) {
        match &self.backend {
            Backend::Generate { engine, .. } => engine.shutdown(),
            Backend::Embed(queue) => queue.shutdown(),
        }
    }

    /// (running, waiting) sequences or embedding requests.
    pub fn load(&self) -> (usize, usize) {
        match &self.backend {
            Backend::Generate { engine, .. } => {
                let s = engine.stats();
                (s.scheduler.running, s.scheduler.waiting)
            }
            Backend::Embed(q) => (q.stats.running.load(Ordering::Relaxed), q.stats.waiting.load(Ordering::Relaxed)),
        }
    }
}

/// The model the worker serves now, if any, and whether it takes new generations.
#[derive(Default)]
pub struct ModelSlot {
    current: RwLock<Option<Arc<Serving>>>,
    /// Set while draining: running streams go on, new generations are refused.
    pub refuse_new: AtomicBool,
}

impl ModelSlot {
    pub fn get(&self) -> Option<Arc<Serving>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `serving` (or empties the slot), returning what was there.
    pub fn replace(&self, serving: Option<Arc<Serving>>) -> Option<Arc<Serving>> {
        std::mem::replace(&mut *self.current.write().unwrap_or_else(|e| e.into_inner()), serving)
    }
}

pub struct WorkerService {
    slot: Arc<ModelSlot>,
}

impl WorkerService {
    /// A service over one fixed model.
    pub fn new(engine: EngineHandle, model: Arc<LoadedModel>, model_id: &str, max_seqs: usize) -> Result<WorkerService, serde_json::Error> {
        let slot = ModelSlot::default();
        slot.replace(Some(Arc::new(Serving::new(engine, model, model_id, max_seqs)?)));
        Ok(WorkerService { slot: Arc::new(slot) })
    }

    /// A service over whatever `slot` holds from moment to moment.
    pub fn with_slot(slot: Arc<ModelSlot>) -> WorkerService {
        WorkerService { slot }
    }

    pub fn slot(&self) -> &Arc<ModelSlot> {
        &self.slot
    }

    fn serving(&self) -> Result<Arc<Serving>, Status> {
        self.slot.get().ok_or_else(|| Status::unavailable("this worker has no model loaded (waiting for placement, or loading)"))
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// Relays engine events to the gRPC stream until the last one, or until the client leaves.
/// Relays a request's events to its gRPC stream, recording its outcome on `span` (which
/// ends with the stream).
fn pump(mut events: RequestStream, tx: mpsc::Sender<Result<pb::GenerateEvent, Status>>, model: Arc<LoadedModel>, span: tracing::Span) {
    let mut generated = 0;
    let mut first = true;
    while !events.is_finished() {
        if tx.is_closed() {
            span.record("kiln.outcome", "cancelled");
            return; // dropping `events` cancels the request
        }
        let Some(e) = events.next_timeout(Duration::from_millis(50)) else { continue };
        match &e {
            Event::Token { .. } if first => {
                first = false;
                span.in_scope(|| tracing::debug!("first token"));
            }
            Event::Done { finish, usage, .. } => {
                generated += usage.completion_tokens;
                span.record("gen_ai.usage.output_tokens", generated as i64);
                span.record("kiln.cached_tokens", usage.cached_tokens as i64);
                span.record("kiln.time_to_first_token_ms", usage.prefill_ms);
                span.record("kiln.decode_ms", usage.decode_ms);
                span.record("kiln.outcome", format!("{finish:?}").to_lowercase());
            }
            Event::Failed(msg) => {
                span.record("otel.status_code", "ERROR");
                span.record("kiln.outcome", "failed");
                span.in_scope(|| tracing::warn!("generation failed: {msg}"));
            }
            Event::Token { .. } | Event::PromptLogprobs { .. } => {}
        }
        if tx.blocking_send(convert::event(e, &model.tokenizer)).is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(self.serving()?.info.clone()))
    }

    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let serving = self.serving()?;
        if self.slot.refuse_new.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this worker is draining"));
        }
        let Backend::Generate { engine, model, grammars } = &serving.backend else {
            return Err(Status::invalid_argument(format!("`{}` is an embedding model; it does not generate text (use /v1/embeddings)", serving.info.model_id)));
        };
        // One span per request, a child of the router's attempt when it sent its context.
        let span = tracing::info_span!(
            "worker.generate",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            gen_ai.request.model = %serving.info.model_id,
            kiln.prompt_tokens = request.get_ref().prompt.len() as i64,
            kiln.n = i64::from(request.get_ref().n.max(1)),
            kiln.resume = request.get_ref().resume.is_some(),
            gen_ai.usage.output_tokens = tracing::field::Empty,
            kiln.cached_tokens = tracing::field::Empty,
            kiln.time_to_first_token_ms = tracing::field::Empty,
            kiln.decode_ms = tracing::field::Empty,
            kiln.outcome = tracing::field::Empty,
        );
        kiln_telemetry::continue_from_grpc(&span, request.metadata());
        let fail = |s: Status| {
            span.record("otel.status_code", "ERROR");
            span.record("kiln.outcome", s.message());
            s
        };
        let mut request = request.into_inner();
        let images = std::mem::take(&mut request.images);
        let spec = request.constraint.take().as_ref().map(convert::grammar_spec).transpose().map_err(fail)?.flatten();
        let mut req = convert::generation_request(request).map_err(fail)?;
        if let Some(spec) = spec {
            // Compiling a grammar (and, the first time, indexing the vocabulary) is CPU work.
            let grammars = Arc::clone(grammars);
            let compiled = tokio::task::spawn_blocking(move || grammars.compile(&spec))
                .await
                .map_err(|e| Status::internal(format!("grammar compilation failed: {e}")))
                .map_err(fail)?;
            req.constraint = Some(compiled.map_err(|e| fail(constraint_status(&e)))?);
        }
        if !images.is_empty() {
            let Some(vision) = model.vision.clone() else {
                return Err(fail(Status::invalid_argument(format!("`{}` does not take images", serving.info.model_id))));
            };
            if images.len() > crate::vision::MAX_IMAGES {
                return Err(fail(Status::invalid_argument(format!("{} images; at most {} per request", images.len(), crate::vision::MAX_IMAGES))));
            }
            // Decoding and resizing are CPU work.
            let prepared = tokio::task::spawn_blocking(move || {
                images.iter().map(|data| vision.processor.prepare(data, &Default::default()).map(Arc::new)).collect::<crate::error::Result<Vec<_>>>()
            })
            .await
            .map_err(|e| fail(Status::internal(format!("image preparation failed: {e}"))))?;
            req.images = prepared.map_err(|e| fail(convert::status(&e)))?;
        }
        let events = engine.submit(req).map_err(|e| {
            span.record("otel.status_code", "ERROR");
            span.record("kiln.outcome", e.to_string());
            convert::status(&e)
        })?;
        let (tx, rx) = mpsc::channel(64);
        let model = Arc::clone(model);
        std::thread::Builder::new()
            .name("kiln-stream".into())
            .spawn(move || pump(events, tx, model, span))
            .map_err(|e| Status::resource_exhausted(format!("cannot start a stream thread: {e}")))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let tokens = self.serving()?.tokenizer.encode(&r.text, r.add_special, r.parse_special);
        Ok(Response::new(pb::TokenizeResponse { tokens }))
    }

    async fn detokenize(&self, request: Request<pb::DetokenizeRequest>) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let r = request.into_inner();
        let serving = self.serving()?;
        let vocab = serving.tokenizer.vocab_size();
        if let Some(&bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(Response::new(pb::DetokenizeResponse { text: serving.tokenizer.decode(&r.tokens, r.render_special) }))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let serving = self.slot.get();
        Ok(Response::new(pb::HealthResponse {
            serving: serving.is_some() && !self.slot.refuse_new.load(Ordering::Relaxed),
            model_id: serving.map(|s| s.info.model_id.clone()).unwrap_or_default(),
        }))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let span = tracing::info_span!("worker.embed", otel.kind = "server", kiln.inputs = request.get_ref().inputs.len() as i64);
        kiln_telemetry::continue_from_grpc(&span, request.metadata());
        use tracing::Instrument as _;
        self.embed_inner(request.into_inner()).instrument(span).await.map(Response::new)
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadResponse>, Status> {
        let serving = self.serving()?;
        let Some(engine) = serving.engine() else {
            let (running, waiting) = serving.load();
            return Ok(Response::new(pb::LoadResponse { running: running as u32, waiting: waiting as u32, max_seqs: serving.info.max_seqs, ..Default::default() }));
        };
        let s = engine.stats();
        Ok(Response::new(pb::LoadResponse {
            running: s.scheduler.running as u32,
            waiting: s.scheduler.waiting as u32,
            kv: s
                .blocks
                .iter()
                .map(|b| pb::KvGroupLoad { blocks_in_use: b.in_use as u32, blocks_cached: b.cached as u32, blocks_total: b.num_blocks as u32 })
                .collect(),
            prefix_query_tokens: s.scheduler.prefix_query_tokens,
            prefix_hit_tokens: s.scheduler.prefix_hit_tokens,
            preemptions: s.scheduler.preemptions,
            generated_tokens: s.generated_tokens,
            max_seqs: serving.info.max_seqs,
        }))
    }
}

impl WorkerService {
    async fn embed_inner(&self, request: pb::EmbedRequest) -> Result<pb::EmbedResponse, Status> {
        let serving = self.serving()?;
        if self.slot.refuse_new.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this worker is draining"));
        }
        let Backend::Embed(queue) = &serving.backend else {
            return Err(Status::invalid_argument(format!("`{}` generates text; it is not an embedding model", serving.info.model_id)));
        };
        let inputs: Vec<Vec<u32>> = request.inputs.into_iter().map(|t| t.ids).collect();
        let (done, tokens) = queue.submit(inputs, request.truncate).map_err(|e| convert::status(&e))?;
        let vectors = done.await.map_err(|_| Status::internal("the embedding engine stopped"))?.map_err(|e| convert::status(&e))?;
        Ok(pb::EmbedResponse {
            prompt_tokens: tokens as u32,
            embeddings: vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
        })
    }
}

fn constraint_status(e: &crate::constraint::ConstraintError) -> Status {
    match e {
        crate::constraint::ConstraintError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}
