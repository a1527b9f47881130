//! One generation across workers: starts it on the worker the routing policy picks, fails
//! over to another while nothing has been produced, and when a worker dies or stalls
//! mid-stream resumes each unfinished completion on another worker from the tokens already
//! relayed (same prompt, parameters and seed; the worker replays them), so the client sees
//! one uninterrupted stream. Records time to first token, inter-token latency and token
//! counts. Dropping a `Generation` closes its gRPC streams, which cancels the work.

use crate::error::ApiError;
use crate::routing::RouteKey;
use crate::upstream::{InFlight, ModelState};
use crate::AppState;
use kiln_proto::v1 as pb;
use pb::generate_event::Event;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Code, Status};

pub enum Update {
    Token(pb::TokenEvent),
    Done(pb::DoneEvent),
}

/// Where a response's updates come from: one generation, or several at once (`Batch`).
pub trait Updates: Send + 'static {
    /// The next update; `None` once everything has finished.
    fn next_update(&mut self) -> impl std::future::Future<Output = Option<Result<Update, ApiError>>> + Send;
}

impl Updates for Generation {
    fn next_update(&mut self) -> impl std::future::Future<Output = Option<Result<Update, ApiError>>> + Send {
        self.next()
    }
}

/// The generations of a completions request, one per prompt, as one: prompt `p`'s
/// completion `i` is choice `p * n + i`. The first failure ends it (dropping it cancels the
/// rest).
pub struct Batch {
    merged: futures_util::stream::SelectAll<futures_util::stream::BoxStream<'static, Result<Update, ApiError>>>,
}

impl Batch {
    pub fn new(generations: Vec<Generation>, n: u32) -> Batch {
        use futures_util::StreamExt;
        let streams = generations.into_iter().enumerate().map(|(p, g)| {
            let offset = p as u32 * n;
            futures_util::stream::unfold(g, |mut g| async move { g.next().await.map(|step| (step, g)) })
                .map(move |step| {
                    step.map(|update| match update {
                        Update::Token(mut t) => {
                            t.index += offset;
                            Update::Token(t)
                        }
                        Update::Done(mut d) => {
                            d.index += offset;
                            Update::Done(d)
                        }
                    })
                })
                .boxed()
        });
        Batch { merged: futures_util::stream::select_all(streams) }
    }
}

impl Updates for Batch {
    fn next_update(&mut self) -> impl std::future::Future<Output = Option<Result<Update, ApiError>>> + Send {
        futures_util::StreamExt::next(&mut self.merged)
    }
}

/// One gRPC stream carrying some of the request's completions.
struct Attempt {
    in_flight: InFlight,
    stream: tonic::Streaming<pb::GenerateEvent>,
    indices: Vec<usize>,
    /// The first event, read to learn that the worker took the request.
    first: Option<pb::GenerateEvent>,
    last_progress: Instant,
    /// The call's span, a child of the request's; the worker's spans are its children.
    span: tracing::Span,
}

pub struct Generation {
    state: Arc<AppState>,
    request: pb::GenerateRequest,
    key: RouteKey,
    attempts: Vec<Attempt>,
    /// Workers that failed this generation; it does not go back to them.
    failed: Vec<String>,
    produced: Vec<Vec<u32>>,
    finished: Vec<bool>,
    model_label: Vec<(&'static str, String)>,
    started: Instant,
    last_token: Vec<Option<Instant>>,
    gaps: Vec<f64>,
    /// Ends of completions settled without a worker (see `recover`).
    settled: Vec<pb::DoneEvent>,
    done: usize,
    n: usize,
    /// The HTTP request's span, which lives until the generation ends.
    span: tracing::Span,
    calls: u32,
    resumes: u32,
    generated: u32,
    /// Log-probabilities of the prompt's tokens, by position, when the request asked for
    /// them (the first token has none).
    prompt_logprobs: Vec<Option<pb::PromptLogprob>>,
    /// An update read ahead (see `prompt_logprobs`), returned next.
    read_ahead: Option<Update>,
}

/// Whether a failed call may be retried on another worker: the worker could not be reached,
/// went away or broke, as opposed to rejecting the request.
pub(crate) fn worker_failed(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal)
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

/// A seed for requests that give none, so that a resumed completion draws as the original would.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    crate::routing::fnv(t.to_le_bytes().into_iter().chain((&t as *const u64 as u64).to_le_bytes()))
}

/// How often a waiting generation looks at its workers' health.
const HEALTH_POLL: Duration = Duration::from_millis(250);

/// Waits for `attempt` (a request's first event) while its worker keeps answering health
/// checks, up to `limit`; Err says why it gave up.
async fn first_event<T>(attempt: impl std::future::Future<Output = T>, worker: &crate::upstream::Worker, limit: Duration) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    tokio::pin!(attempt);
    loop {
        if !worker.is_responsive() {
            return Err("stopped answering health checks".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("sent nothing within {limit:?}"));
        }
        if let Ok(out) = tokio::time::timeout(HEALTH_POLL, &mut attempt).await {
            return Ok(out);
        }
    }
}

enum Failure {
    /// The stream broke or ended early.
    Broken(String),
    /// No event within the timeout.
    Stalled,
}

impl Generation {
    /// Starts `request` on a worker serving `model`; `started` is when the HTTP request came.
    pub async fn start(state: &Arc<AppState>, model: &ModelState, mut request: pb::GenerateRequest, key: RouteKey, started: Instant) -> Result<Generation, ApiError> {
        let id = model.info.model_id.clone();
        let sampling = request.sampling.get_or_insert_with(Default::default);
        if sampling.seed.is_none() {
            sampling.seed = Some(fresh_seed());
        }
        let n = request.n.max(1) as usize;
        let mut g = Generation {
            state: Arc::clone(state),
            request,
            key,
            attempts: Vec::new(),
            failed: Vec::new(),
            produced: vec![Vec::new(); n],
            finished: vec![false; n],
            model_label: vec![("model", id.clone())],
            started,
            last_token: vec![None; n],
            gaps: Vec::new(),
            settled: Vec::new(),
            done: 0,
            n,
            span: tracing::Span::current(),
            calls: 0,
            resumes: 0,
            generated: 0,
            prompt_logprobs: Vec::new(),
            read_ahead: None,
        };
        if g.request.prompt_logprobs.is_some() {
            g.prompt_logprobs = vec![None; g.request.prompt.len()];
        }
        g.span.record("kiln.policy", format!("{:?}", state.pool.policy).to_lowercase());
        g.span.record("gen_ai.usage.input_tokens", g.request.prompt.len() as i64);
        g.open(g.request.clone(), (0..n).collect()).await?;
        state.metrics.add("kiln_router_prompt_tokens_total", g.model_label.clone(), g.request.prompt.len() as f64);
        Ok(g)
    }

    fn model_id(&self) -> &str {
        &self.model_label[0].1
    }

    /// Sends `request` (carrying completions `indices`) to the best worker that takes it,
    /// failing over while workers are unreachable or do not start in time.
    async fn open(&mut self, request: pb::GenerateRequest, indices: Vec<usize>) -> Result<(), ApiError> {
        let timeouts = self.state.config.timeouts.clone();
        let mut last_error: Option<String> = None;
        loop {
            let model = self.model_id().to_string();
            let Some(in_flight) = self.state.pool.pick(&model, &self.failed, &self.key) else {
                return Err(ApiError::unavailable(match last_error {
                    Some(e) => format!("no worker serving `{model}` could take the request; last error: {e}"),
                    None => format!("no worker serving `{model}` is available"),
                }));
            };
            let worker = Arc::clone(in_flight.worker());
            let mut client = worker.client.clone();
            self.calls += 1;
            self.span.record("kiln.attempts", i64::from(self.calls));
            self.span.record("kiln.worker", worker.id.as_str());
            let span = tracing::info_span!(
                parent: &self.span,
                "router.worker_call",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                kiln.worker = %worker.id,
                kiln.worker.addr = %worker.addr,
                kiln.worker.load = worker.load() as i64,
                kiln.resume = request.resume.is_some(),
                kiln.completions = indices.len() as i64,
                kiln.outcome = tracing::field::Empty,
            );
            let mut call = tonic::Request::new(request.clone());
            kiln_telemetry::propagate_to_grpc(&span, call.metadata_mut());
            let attempt = async {
                let mut stream = client.generate(call).await?.into_inner();
                let first = stream.message().await?;
                Ok::<_, Status>((stream, first))
            };
            let reason = match first_event(attempt, &worker, timeouts.first_token).await {
                Ok(Ok((stream, Some(first)))) => {
                    self.attempts.push(Attempt { in_flight, stream, indices, first: Some(first), last_progress: Instant::now(), span });
                    return Ok(());
                }
                Ok(Ok((_, None))) => {
                    worker.mark_down();
                    "ended the stream at once".to_string()
                }
                Ok(Err(s)) if worker_failed(&s) => {
                    worker.mark_down();
                    s.message().to_string()
                }
                Ok(Err(s)) => {
                    span.record("kiln.outcome", format!("refused: {}", s.message()));
                    self.upstream_error(&worker.id);
                    return Err(from_status(&s));
                }
                Err(why) => {
                    worker.eject(timeouts.eject);
                    self.state.metrics.add("kiln_router_stalled_total", vec![("worker", worker.id.clone())], 1.0);
                    why
                }
            };
            span.record("otel.status_code", "ERROR");
            span.record("kiln.outcome", format!("failed: {reason}"));
            span.in_scope(|| tracing::warn!("worker {} failed ({reason}); trying another", worker.id));
            self.upstream_error(&worker.id);
            self.failed.push(worker.id.clone());
            last_error = Some(format!("worker {}: {reason}", worker.id));
        }
    }

    fn upstream_error(&self, worker: &str) {
        self.state.metrics.add("kiln_router_upstream_errors_total", vec![("worker", worker.to_string())], 1.0);
    }

    /// The log-probabilities of the prompt's tokens by position (none for the first), for a
    /// request that asked for them. A worker sends them all before the first token, so they
    /// are complete once this reads ahead to the first update (which `next` then returns);
    /// a worker that sent none is one of a kiln before prompt scoring, which ignores the ask.
    pub async fn prompt_logprobs(&mut self) -> Result<&[Option<pb::PromptLogprob>], ApiError> {
        if self.read_ahead.is_none() && self.done < self.n {
            match self.next().await {
                Some(Ok(update)) => self.read_ahead = Some(update),
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        if !self.has_prompt_logprobs() {
            return Err(ApiError::upstream("the worker did not report the prompt's log-probabilities (it may run an older kiln)"));
        }
        Ok(&self.prompt_logprobs)
    }

    /// How many prompt tokens the worker found in its prefix cache, as its first event says
    /// (a first token says so, as does a completion that ended at once); None when the
    /// worker does not tell, or once that event was taken by `next`.
    pub fn cached_prompt_tokens(&self) -> Option<u32> {
        self.attempts.iter().find_map(|a| match a.first.as_ref()?.event.as_ref()? {
            Event::Token(t) => t.cached_tokens,
            Event::Done(d) => d.usage.as_ref().map(|u| u.cached_tokens),
            Event::PromptLogprobs(_) => None,
        })
    }

    fn has_prompt_logprobs(&self) -> bool {
        self.prompt_logprobs.iter().skip(1).all(Option::is_some)
    }

    /// The next event; `None` once every completion has finished.
    pub async fn next(&mut self) -> Option<Result<Update, ApiError>> {
        if let Some(update) = self.read_ahead.take() {
            return Some(Ok(update));
        }
        loop {
            if self.done == self.n {
                return None;
            }
            if let Some(d) = self.settled.pop() {
                self.done += 1;
                return Some(Ok(Update::Done(d)));
            }
            if let Some(i) = self.attempts.iter().position(|a| a.first.is_some()) {
                let event = self.attempts[i].first.take()?;
                match self.handle(i, event) {
                    Ok(None) => continue,
                    other => return other.transpose(),
                }
            }
            if self.attempts.is_empty() {
                return Some(Err(ApiError::upstream("the generation lost its workers")));
            }
            let (failed, failure) = match self.wait().await {
                Ok((i, event)) => {
                    self.attempts[i].last_progress = Instant::now();
                    match self.handle(i, event) {
                        Ok(None) => continue,
                        other => return other.transpose(),
                    }
                }
                Err((_, Err(e))) => return Some(Err(e)),
                Err((i, Ok(failure))) => (i, failure),
            };
            if let Err(e) = self.recover(failed, failure).await {
                return Some(Err(e));
            }
        }
    }

    /// The next event from any stream, or which stream failed and how (Ok) or a refusal (Err).
    /// A stream fails by breaking, by sending nothing for the stall timeout, or by its worker
    /// no longer answering health checks.
    async fn wait(&mut self) -> Result<(usize, pb::GenerateEvent), (usize, Result<Failure, ApiError>)> {
        let stall = self.state.config.timeouts.stall;
        loop {
            let now = Instant::now();
            if let Some(i) = self.attempts.iter().position(|a| now >= a.last_progress + stall || !a.in_flight.worker().is_responsive()) {
                return Err((i, Ok(Failure::Stalled)));
            }
            let earliest = self.attempts.iter().map(|a| a.last_progress + stall).min().unwrap_or(now).min(now + HEALTH_POLL);
            let reads = self.attempts.iter_mut().enumerate().map(|(i, a)| Box::pin(async move { (i, a.stream.message().await) }));
            let outcome = tokio::time::timeout_at(earliest.into(), futures_util::future::select_all(reads)).await.map(|(first, _, _)| first);
            match outcome {
                Ok((i, Ok(Some(event)))) => return Ok((i, event)),
                Ok((i, Ok(None))) => return Err((i, Ok(Failure::Broken("ended the stream before the generation finished".into())))),
                Ok((i, Err(s))) if worker_failed(&s) => return Err((i, Ok(Failure::Broken(s.message().to_string())))),
                Ok((i, Err(s))) => return Err((i, Err(from_status(&s)))),
                Err(_) => continue,
            }
        }
    }

    /// Moves the unfinished completions of failed stream `i` to other workers.
    async fn recover(&mut self, i: usize, failure: Failure) -> Result<(), ApiError> {
        let attempt = self.attempts.remove(i);
        let worker = Arc::clone(attempt.in_flight.worker());
        self.upstream_error(&worker.id);
        let why = match failure {
            Failure::Broken(reason) => {
                worker.mark_down();
                format!("went away mid-generation ({reason})")
            }
            Failure::Stalled => {
                worker.eject(self.state.config.timeouts.eject);
                self.state.metrics.add("kiln_router_stalled_total", vec![("worker", worker.id.clone())], 1.0);
                if worker.is_responsive() {
                    format!("made no progress for {:?}", self.state.config.timeouts.stall)
                } else {
                    "stopped answering health checks".to_string()
                }
            }
        };
        attempt.span.record("otel.status_code", "ERROR");
        attempt.span.record("kiln.outcome", format!("{why}; resumed elsewhere"));
        attempt.span.in_scope(|| tracing::warn!("worker {} {why}; resuming elsewhere", worker.id));
        self.failed.push(worker.id.clone());
        // Dropping the stream cancels whatever the worker may still be doing.
        let indices: Vec<usize> = attempt.indices.iter().copied().filter(|&x| !self.finished[x]).collect();
        drop(attempt);
        for index in indices {
            let produced = self.produced[index].len() as u32;
            if self.request.max_tokens.is_some_and(|m| produced >= m) {
                // The worker died between the last token and its end: the completion is
                // complete (text it may have held back at the end is lost).
                self.finished[index] = true;
                let usage = pb::Usage { prompt_tokens: self.request.prompt.len() as u32, completion_tokens: produced, ..Default::default() };
                let finish = pb::FinishReason::Length as i32;
                self.settled.push(pb::DoneEvent { index: index as u32, finish, usage: Some(usage), tail: String::new(), stop_sequence: None });
                continue;
            }
            let mut request = self.request.clone();
            request.n = 1;
            if self.has_prompt_logprobs() {
                // Scoring the prompt again would only forgo the prefix cache.
                request.prompt_logprobs = None;
            }
            request.resume = Some(pb::Resume { index: index as u32, tokens: self.produced[index].clone() });
            self.state.metrics.add("kiln_router_resumed_total", self.model_label.clone(), 1.0);
            self.resumes += 1;
            self.span.record("kiln.resumes", i64::from(self.resumes));
            if let Err(e) = self.open(request, vec![index]).await {
                return Err(ApiError::upstream(format!("worker {} {why}, and the generation could not be resumed: {}", worker.id, e.message)));
            }
        }
        Ok(())
    }

    /// An event from stream `attempt`: the update it makes, or None for one kept here.
    fn handle(&mut self, attempt: usize, event: pb::GenerateEvent) -> Result<Option<Update>, ApiError> {
        match event.event {
            Some(Event::PromptLogprobs(p)) => {
                // A resumed prefill may send some again; the values are the same.
                for (i, t) in p.tokens.into_iter().enumerate() {
                    if let Some(slot) = self.prompt_logprobs.get_mut(p.first as usize + i) {
                        *slot = Some(t);
                    }
                }
                Ok(None)
            }
            Some(Event::Token(t)) => {
                let index = t.index as usize;
                if let Some(p) = self.produced.get_mut(index) {
                    p.push(t.token);
                }
                self.on_token(index);
                Ok(Some(Update::Token(t)))
            }
            Some(Event::Done(d)) => {
                if let Some(f) = self.finished.get_mut(d.index as usize) {
                    *f = true;
                }
                self.done += 1;
                let generated = d.usage.as_ref().map_or(0, |u| u.completion_tokens);
                self.state.metrics.add("kiln_router_generated_tokens_total", self.model_label.clone(), generated as f64);
                self.generated += generated;
                self.span.record("gen_ai.usage.output_tokens", i64::from(self.generated));
                if self.attempts[attempt].indices.iter().all(|&x| self.finished[x]) {
                    let done = self.attempts.remove(attempt);
                    done.span.record("kiln.outcome", "finished");
                }
                if self.done == self.n {
                    self.flush_gaps();
                }
                Ok(Some(Update::Done(d)))
            }
            None => Err(ApiError::upstream("the worker sent an empty event")),
        }
    }

    fn on_token(&mut self, index: usize) {
        let now = Instant::now();
        let Some(slot) = self.last_token.get_mut(index) else { return };
        match slot.replace(now) {
            Some(prev) => self.gaps.push((now - prev).as_secs_f64()),
            None if index == 0 => {
                let ttft = (now - self.started).as_secs_f64();
                self.span.record("kiln.time_to_first_token_ms", ttft * 1e3);
                self.state.metrics.observe("kiln_router_time_to_first_token_seconds", self.model_label.clone(), ttft)
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
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.flush_gaps();
    }
}

/// How long the router waits on workers.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// From sending a request to its first event (queueing and prefill included).
    pub first_token: Duration,
    /// Between events of a running generation.
    pub stall: Duration,
    /// How long a worker that failed or stalled is kept out before health checks may
    /// readmit it.
    pub eject: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { first_token: Duration::from_secs(120), stall: Duration::from_secs(30), eject: Duration::from_secs(5) }
    }
}
