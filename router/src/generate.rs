//! One generation on some worker: picks the least-loaded healthy worker serving the model,
//! fails over to another while nothing has been produced yet, and relays the worker's
//! events, recording time to first token, inter-token latency and token counts.
//! Dropping a `Generation` closes its gRPC stream, which cancels the work on the worker.

use crate::error::ApiError;
use crate::upstream::{InFlight, ModelState};
use crate::AppState;
use kiln_proto::v1 as pb;
use pb::generate_event::Event;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Code, Status};

pub enum Update {
    Token(pb::TokenEvent),
    Done(pb::DoneEvent),
}

pub struct Generation {
    state: Arc<AppState>,
    stream: tonic::Streaming<pb::GenerateEvent>,
    in_flight: InFlight,
    /// An event read ahead while checking that the worker took the request.
    first: Option<pb::GenerateEvent>,
    model_label: Vec<(&'static str, String)>,
    started: Instant,
    last_token: Vec<Option<Instant>>,
    gaps: Vec<f64>,
    done: usize,
    n: usize,
}

/// Whether a failed call may be retried on another worker: the worker could not be reached
/// or went away, as opposed to rejecting the request.
fn worker_unreachable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted)
}

/// The client-facing error for a worker's refusal or failure.
pub fn from_status(s: &Status) -> ApiError {
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => ApiError::bad_request(s.message()),
        Code::ResourceExhausted => ApiError::unavailable(format!("the worker is out of capacity: {}", s.message())),
        Code::Unavailable => ApiError::unavailable(format!("the worker is unavailable: {}", s.message())),
        _ => ApiError::upstream(format!("the worker failed: {}", s.message())),
    }
}

impl Generation {
    /// Starts `request` on a worker serving `model`; `started` is when the HTTP request came.
    pub async fn start(state: &Arc<AppState>, model: &ModelState, request: pb::GenerateRequest, started: Instant) -> Result<Generation, ApiError> {
        let id = &model.info.model_id;
        let mut tried: Vec<String> = Vec::new();
        let mut last_error: Option<ApiError> = None;
        loop {
            let Some(in_flight) = state.pool.pick(id, &tried) else {
                return Err(last_error.unwrap_or_else(|| ApiError::unavailable(format!("no worker serving `{id}` is available"))));
            };
            let worker = Arc::clone(in_flight.worker());
            tried.push(worker.addr.clone());
            let mut client = worker.client.clone();
            let attempt = async {
                let mut stream = client.generate(request.clone()).await?.into_inner();
                let first = stream.message().await?;
                Ok::<_, Status>((stream, first))
            };
            match attempt.await {
                Ok((stream, first)) => {
                    let n = request.n.max(1) as usize;
                    state.metrics.add("kiln_router_prompt_tokens_total", vec![("model", id.clone())], request.prompt.len() as f64);
                    return Ok(Generation {
                        state: Arc::clone(state),
                        stream,
                        in_flight,
                        first,
                        model_label: vec![("model", id.clone())],
                        started,
                        last_token: vec![None; n],
                        gaps: Vec::new(),
                        done: 0,
                        n,
                    });
                }
                Err(s) => {
                    state.metrics.add("kiln_router_upstream_errors_total", vec![("worker", worker.addr.clone())], 1.0);
                    if !worker_unreachable(&s) {
                        return Err(from_status(&s));
                    }
                    eprintln!("kiln-router: worker {} failed ({}); trying another", worker.addr, s.message());
                    worker.mark_down();
                    last_error = Some(ApiError::unavailable(format!("no worker serving `{id}` could take the request; last error: {}", s.message())));
                }
            }
        }
    }

    pub fn worker_addr(&self) -> &str {
        &self.in_flight.worker().addr
    }

    /// The next event; `None` once every completion has finished.
    pub async fn next(&mut self) -> Option<Result<Update, ApiError>> {
        if self.done == self.n {
            return None;
        }
        let event = match self.first.take() {
            Some(e) => Some(e),
            None => match self.stream.message().await {
                Ok(e) => e,
                Err(s) => return Some(Err(self.fail(&s))),
            },
        };
        let Some(event) = event else {
            let worker = self.worker_addr().to_string();
            self.state.metrics.add("kiln_router_upstream_errors_total", vec![("worker", worker.clone())], 1.0);
            return Some(Err(ApiError::upstream(format!("worker {worker} ended the stream before the generation finished"))));
        };
        match event.event {
            Some(Event::Token(t)) => {
                self.on_token(t.index as usize);
                Some(Ok(Update::Token(t)))
            }
            Some(Event::Done(d)) => {
                self.done += 1;
                let generated = d.usage.as_ref().map_or(0, |u| u.completion_tokens);
                self.state.metrics.add("kiln_router_generated_tokens_total", self.model_label.clone(), generated as f64);
                if self.done == self.n {
                    self.flush_gaps();
                }
                Some(Ok(Update::Done(d)))
            }
            None => Some(Err(ApiError::upstream("the worker sent an empty event"))),
        }
    }

    fn on_token(&mut self, index: usize) {
        let now = Instant::now();
        let Some(slot) = self.last_token.get_mut(index) else { return };
        match slot.replace(now) {
            Some(prev) => self.gaps.push((now - prev).as_secs_f64()),
            None if index == 0 => {
                self.state.metrics.observe("kiln_router_time_to_first_token_seconds", self.model_label.clone(), (now - self.started).as_secs_f64())
            }
            None => {}
        }
        if self.gaps.len() >= 64 {
            self.flush_gaps();
        }
    }

    fn flush_gaps(&mut self) {
        self.state.metrics.observe_many("kiln_router_inter_token_latency_seconds", &self.model_label, &self.gaps);
        self.gaps.clear();
    }

    fn fail(&mut self, s: &Status) -> ApiError {
        let worker = self.worker_addr().to_string();
        self.state.metrics.add("kiln_router_upstream_errors_total", vec![("worker", worker.clone())], 1.0);
        if worker_unreachable(s) {
            self.in_flight.worker().mark_down();
            return ApiError::upstream(format!("worker {worker} went away mid-generation: {}", s.message()));
        }
        from_status(s)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.flush_gaps();
    }
}
