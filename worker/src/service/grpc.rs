//! The worker's `kiln.v1.Worker` gRPC service over the engine.
//!
//! Each Generate call submits to the engine and relays its events; a thread per stream waits
//! on the engine's channel and notices within 50 ms when the client has gone, dropping the
//! engine stream, which cancels the generation and frees its blocks.

use super::convert;
use crate::engine::{EngineHandle, RequestStream};
use crate::loader::LoadedModel;
use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_server::Worker;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct WorkerService {
    engine: EngineHandle,
    model: Arc<LoadedModel>,
    info: pb::ModelInfoResponse,
}

impl WorkerService {
    pub fn new(engine: EngineHandle, model: Arc<LoadedModel>, model_id: &str, max_seqs: usize) -> Result<WorkerService, serde_json::Error> {
        let cfg = model.model.config();
        let info = pb::ModelInfoResponse {
            model_id: model_id.to_string(),
            display_name: cfg.name.clone(),
            architecture: cfg.architecture.clone(),
            context_length: engine.capacity().max_context_len as u32,
            vocab_size: cfg.vocab_size as u32,
            tokenizer_json: serde_json::to_vec(model.tokenizer.spec())?,
            chat_template: model.chat_template_source.clone(),
            bos_token: model.tokenizer.bos_text().unwrap_or("").to_string(),
            eos_token: model.tokenizer.eos_text().unwrap_or("").to_string(),
            max_seqs: max_seqs as u32,
        };
        Ok(WorkerService { engine, model, info })
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// Relays engine events to the gRPC stream until the last one, or until the client leaves.
fn pump(mut events: RequestStream, tx: mpsc::Sender<Result<pb::GenerateEvent, Status>>, model: Arc<LoadedModel>) {
    while !events.is_finished() {
        if tx.is_closed() {
            return; // dropping `events` cancels the request
        }
        let Some(e) = events.next_timeout(Duration::from_millis(50)) else { continue };
        if tx.blocking_send(convert::event(e, &model.tokenizer)).is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let req = convert::generation_request(request.into_inner())?;
        let events = self.engine.submit(req).map_err(|e| convert::status(&e))?;
        let (tx, rx) = mpsc::channel(64);
        let model = Arc::clone(&self.model);
        std::thread::Builder::new()
            .name("kiln-stream".into())
            .spawn(move || pump(events, tx, model))
            .map_err(|e| Status::resource_exhausted(format!("cannot start a stream thread: {e}")))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let tokens = self.model.tokenizer.encode(&r.text, r.add_special, r.parse_special);
        Ok(Response::new(pb::TokenizeResponse { tokens }))
    }

    async fn detokenize(&self, request: Request<pb::DetokenizeRequest>) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let r = request.into_inner();
        let vocab = self.model.tokenizer.vocab_size();
        if let Some(&bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(Response::new(pb::DetokenizeResponse { text: self.model.tokenizer.decode(&r.tokens, r.render_special) }))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse { serving: true, model_id: self.info.model_id.clone() }))
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadResponse>, Status> {
        let s = self.engine.stats();
        Ok(Response::new(pb::LoadResponse {
            running: s.scheduler.running as u32,
            waiting: s.scheduler.waiting as u32,
            kv: s
                .blocks
                .iter()
                .map(|&(used, cached, total)| pb::KvGroupLoad { blocks_in_use: used as u32, blocks_cached: cached as u32, blocks_total: total as u32 })
                .collect(),
            prefix_query_tokens: s.scheduler.prefix_query_tokens,
            prefix_hit_tokens: s.scheduler.prefix_hit_tokens,
            preemptions: s.scheduler.preemptions,
            generated_tokens: s.generated_tokens,
            max_seqs: self.info.max_seqs,
        }))
    }
}
