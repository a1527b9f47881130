//! The engine's public face: a cheap, cloneable handle to submit requests and cancel them,
//! and a stream of events per request. Dropping a stream cancels its request.

use super::{FinishReason, GenerationRequest, Usage};
use crate::error::{Error, Result};
use crate::scheduler::{SchedulerStats, SeqId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a request's stream carries. `index` tells the request's `n` completions apart.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes; text may be empty while bytes of a
    /// character or a possible stop string are held back. `logprob` (and `top_logprobs`)
    /// are set when the request asked for log-probabilities. `cached` is set on a
    /// completion's first token: how many prompt tokens the prefix cache held.
    Token { index: usize, id: u32, text: String, logprob: Option<f32>, top_logprobs: Vec<(u32, f32)>, cached: Option<usize> },
    /// Completion `index` ended. `tail` is text held back until the end (part of a
    /// character, or text that might have begun a stop string); `stop` is the stop string
    /// that ended it, if one did.
    Done { index: usize, finish: FinishReason, usage: Usage, tail: String, stop: Option<String> },
    /// Log-probabilities of prompt tokens `first..first + tokens.len()` (each: the token's,
    /// and the most likely alternatives), for a request that asked for them; all of them
    /// come before the first `Token`.
    PromptLogprobs { first: usize, tokens: Vec<PromptLogprob> },
    /// The request failed; no more events follow.
    Failed(Failure),
}

#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a request failed: because of what it asks (another worker would fail it the same way,
/// so the router must not retry it elsewhere nor take this worker out of rotation), or
/// because this worker could not finish it.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The request itself cannot go on: its grammar admits no continuation, its images do not
    /// fit its prompt.
    Request(String),
    /// The worker could not complete it: the engine stopped or is shutting down, a step failed.
    Worker(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Request(m) | Failure::Worker(m) => f.write_str(m),
        }
    }
}

pub(super) enum Command {
    Submit(Box<super::step::Admission>),
    Cancel(SeqId),
    Shutdown,
}

/// Cache capacity as the engine was built, for checking requests at submit.
#[derive(Clone, Debug)]
pub struct Capacity {
    pub block_size: usize,
    /// Per cache group: (blocks, sliding window).
    pub groups: Vec<(usize, Option<usize>)>,
    pub max_batch_tokens: usize,
    pub max_context_len: usize,
    pub vocab_size: usize,
}

impl Capacity {
    /// Whether a sequence growing to `len` tokens fits the cache even when alone.
    pub fn fits(&self, len: usize) -> bool {
        self.groups.iter().all(|&(blocks, window)| {
            let full = len.div_ceil(self.block_size);
            let peak = match window {
                Some(w) => full.min((w + self.max_batch_tokens).div_ceil(self.block_size) + 1),
                None => full,
            };
            peak <= blocks
        })
    }
}

/// Counters the engine publishes after every step.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub scheduler: SchedulerStats,
    /// Per cache group.
    pub blocks: Vec<crate::kv_cache::block_pool::PoolStats>,
    /// Bytes one block of each cache group occupies.
    pub kv_block_bytes: Vec<usize>,
    pub steps: u64,
    pub generated_tokens: u64,
    /// Completions that ended on their own (stop, length, full context).
    pub completed: u64,
    /// Completions ended because their client left or asked to stop.
    pub cancelled: u64,
    /// Images run through the vision encoder (an image several sequences share, or that the
    /// prefix cache already holds, is encoded once or not at all).
    pub images_encoded: u64,
}

pub(super) struct Shared {
    pub next_id: AtomicU64,
    pub tokenizer: Arc<kiln_shared::tokenizer::Tokenizer>,
    pub stats: Mutex<EngineStats>,
    pub capacity: Capacity,
    /// How the model's prompts hold images, for a vision-language model.
    pub vision: Option<crate::vision::VisionInfo>,
}

#[derive(Clone)]
pub struct EngineHandle {
    pub(super) tx: Sender<Command>,
    pub(super) shared: Arc<Shared>,
}

impl EngineHandle {
    /// Checks and queues a request. Errors here (bad parameters, a prompt that can never fit)
    /// mean nothing was queued.
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestStream> {
        let cap = &self.shared.capacity;
        req.sampling.validate().map_err(|e| Error::InvalidRequest(e.to_string()))?;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= cap.vocab_size) {
            return Err(Error::InvalidRequest(format!("token id {bad} is outside the vocabulary of {}", cap.vocab_size)));
        }
        if req.prompt.len() >= cap.max_context_len {
            return Err(Error::PromptTooLong { prompt_tokens: req.prompt.len(), context_len: cap.max_context_len });
        }
        match &self.shared.vision {
            Some(vision) => {
                vision.image_runs(&req.prompt, &vision.counts(&req.images))?;
            }
            None if !req.images.is_empty() => return Err(Error::InvalidRequest("this model does not take images (it has no vision encoder)".into())),
            None => {}
        }
        if req.max_tokens == Some(0) {
            return Err(Error::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if req.n > 128 {
            return Err(Error::InvalidRequest(format!("n = {} is out of range (1 to 128)", req.n)));
        }
        if req.top_logprobs > 20 {
            return Err(Error::InvalidRequest(format!("top_logprobs = {} is out of range (0 to 20)", req.top_logprobs)));
        }
        if let Some(k) = req.prompt_logprobs.filter(|&k| k > 20) {
            return Err(Error::InvalidRequest(format!("prompt_logprobs = {k} is out of range (0 to 20)")));
        }
        if let Some(&(bad, _)) = req.sampling.logit_bias.iter().find(|(t, _)| *t as usize >= cap.vocab_size) {
            return Err(Error::InvalidRequest(format!("logit_bias names token {bad}, outside the vocabulary of {}", cap.vocab_size)));
        }
        let max_len = req.max_tokens.map_or(cap.max_context_len, |m| (req.prompt.len() + m).min(cap.max_context_len));
        if !cap.fits(max_len) {
            return Err(Error::InvalidRequest(format!(
                "a sequence of {max_len} tokens cannot fit in the KV cache ({} blocks of {} tokens); lower max_tokens or enlarge the cache",
                cap.groups[0].0, cap.block_size
            )));
        }
        let resumed = match &req.resume {
            None => None,
            Some(r) => Some(self.check_resume(&req, r, max_len)?),
        };
        let req_n = req.n.max(1);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = std::sync::mpsc::channel();
        let admission = super::step::Admission::new(id, req, max_len, events, resumed);
        self.tx.send(Command::Submit(Box::new(admission))).map_err(|_| Error::InvalidRequest("the engine has stopped".into()))?;
        let remaining = req_n;
        Ok(RequestStream { id, rx, handle: self.clone(), remaining })
    }

    /// The decoding state a resumed completion continues from.
    fn check_resume(&self, req: &GenerationRequest, r: &super::Resume, max_len: usize) -> Result<super::decoding::Decoding> {
        let vocab = self.shared.capacity.vocab_size;
        if req.n > 1 {
            return Err(Error::InvalidRequest("a resumed request continues one completion; n must be 1".into()));
        }
        if let Some(&bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!("resumed token id {bad} is outside the vocabulary of {vocab}")));
        }
        if req.prompt.len() + r.tokens.len() >= max_len {
            return Err(Error::InvalidRequest(format!(
                "{} resumed tokens after a prompt of {} leave no room to generate (limit {max_len})",
                r.tokens.len(),
                req.prompt.len()
            )));
        }
        super::decoding::Decoding::resumed(req, r.index, &r.tokens, &self.shared.tokenizer).map_err(Error::InvalidRequest)
    }

    /// Cancels a request; its stream ends with `Done { finish: Cancelled }`.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn capacity(&self) -> &Capacity {
        &self.shared.capacity
    }

    /// Asks the engine thread to stop; requests still running end with `Failed`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Events of one request, in order. Dropping it before the last `Done` cancels the request.
pub struct RequestStream {
    id: SeqId,
    rx: Receiver<Event>,
    handle: EngineHandle,
    /// Completions not yet done; 0 once the stream is over.
    remaining: usize,
}

impl RequestStream {
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Waits up to `timeout` for the next event; None on timeout or after the last event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Event> {
        if self.remaining == 0 {
            return None;
        }
        let e = self.rx.recv_timeout(timeout).ok()?;
        self.account(&e);
        Some(e)
    }

    pub fn is_finished(&self) -> bool {
        self.remaining == 0
    }

    fn account(&mut self, e: &Event) {
        match e {
            Event::Done { .. } => self.remaining = self.remaining.saturating_sub(1),
            Event::Failed(_) => self.remaining = 0,
            Event::Token { .. } | Event::PromptLogprobs { .. } => {}
        }
    }

    pub fn cancel(&self) {
        self.handle.cancel(self.id);
    }
}

impl Iterator for RequestStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.remaining == 0 {
            return None;
        }
        match self.rx.recv() {
            Ok(e) => {
                self.account(&e);
                Some(e)
            }
            Err(_) => {
                self.remaining = 0;
                Some(Event::Failed(Failure::Worker("the engine stopped".into())))
            }
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if self.remaining > 0 {
            self.handle.cancel(self.id);
        }
    }
}
