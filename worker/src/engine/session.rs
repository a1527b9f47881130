//! One conversation's generation loop: prefill the prompt (reusing cached keys and values
//! of a shared prefix, as a multi-turn chat re-sends its history), then sample token by
//! token until an end-of-generation token, a stop string, the token limit, the context
//! limit or cancellation.

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::layers::Compute;
use crate::loader::LoadedModel;
use crate::models::batch::{Batch, ImageSpan, Logits};
use crate::models::scratch::Scratch;
use super::decoding::Decoding;
use kiln_shared::sampling::SamplingParams;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Cache slots per block.
pub const BLOCK_SIZE: usize = 32;
/// Most prompt tokens run in one forward pass.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Report each token's log-probability (costs a pass over the vocabulary per token).
    pub logprobs: bool,
    /// With `logprobs`, also report this many most likely alternatives (at most 20).
    pub top_logprobs: usize,
    /// Completions to sample from the prompt (0 is taken as 1). They share the prompt's
    /// cache blocks and use seeds derived from `sampling.seed`.
    pub n: usize,
    /// Continue completion `index` of an earlier identical request from the tokens it had
    /// produced (when the worker running it went away): the result is the one that
    /// request would have given.
    pub resume: Option<Resume>,
    /// A grammar the output must match (JSON schema, regex, Lark), compiled for this model.
    pub constraint: Option<Arc<crate::constraint::Constraint>>,
    /// Images of the prompt, in order: each fills one run of the model's image token.
    pub images: Vec<Arc<crate::vision::PreparedImage>>,
    /// Report the log-probability of each prompt token after the first (given those before
    /// it) with this many most likely alternatives (at most 20); see `Event::PromptLogprobs`.
    /// The prompt is then computed in full, never taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resume {
    pub index: usize,
    pub tokens: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// The request's token limit.
    Length,
    /// The context window is full.
    ContextFull,
    Cancelled,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were already cached.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub usage: Usage,
}

pub struct Session {
    model: Arc<LoadedModel>,
    compute: Arc<Compute>,
    kv: KvCache,
    scratch: Scratch,
    logits: Vec<f32>,
    block_table: Vec<u32>,
    /// Tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
    context_len: usize,
}

impl Session {
    /// A session whose cache holds `context_len` tokens, where the model computes.
    pub fn new(model: Arc<LoadedModel>, compute: Arc<Compute>, context_len: usize) -> Result<Session> {
        let cfg = model.model.config();
        let num_blocks = context_len.div_ceil(BLOCK_SIZE);
        let groups = crate::kv_cache::group_layouts(cfg).len();
        Ok(Session {
            kv: model.model.kv_cache(BLOCK_SIZE, &vec![num_blocks; groups])?,
            block_table: (0..num_blocks as u32).collect(),
            model,
            compute,
            scratch: Scratch::default(),
            logits: Vec::new(),
            cached: Vec::new(),
            context_len,
        })
    }

    /// Installs a receiver for intermediate tensors (see `Scratch::tap`).
    pub fn set_tap(&mut self, tap: Option<crate::models::scratch::TapFn>) {
        self.scratch.tap = tap;
    }

    pub fn model(&self) -> Arc<LoadedModel> {
        Arc::clone(&self.model)
    }

    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// Forgets the cached prefix (the next prompt is prefilled in full).
    pub fn reset(&mut self) {
        self.cached.clear();
    }

    /// Runs `tokens` after the first `start` cached tokens; keeps logits of the last row, or
    /// of every row with `all_logits`.
    fn forward(&mut self, tokens: &[u32], start: usize, all_logits: bool) -> Result<()> {
        self.forward_placed(tokens, start, all_logits, &[])
    }

    fn forward_placed(&mut self, tokens: &[u32], start: usize, all_logits: bool, images: &[ImageSpan]) -> Result<()> {
        let mut batch = Batch::new(BLOCK_SIZE);
        let blocks = (start + tokens.len()).div_ceil(BLOCK_SIZE);
        // One sequence owns the whole cache: block i of every group is block i.
        let tables = vec![self.block_table[..blocks].to_vec(); self.kv.groups.len()];
        batch.push_seq(tokens, start, tables, if all_logits { Logits::All } else { Logits::Last });
        batch.place_images(images);
        self.model.model.forward(&self.compute, &batch, &mut self.kv, &mut self.scratch, &mut self.logits)?;
        self.cached.truncate(start);
        self.cached.extend_from_slice(tokens);
        Ok(())
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= self.context_len {
            return Err(Error::PromptTooLong { prompt_tokens: prompt.len(), context_len: self.context_len });
        }
        let vocab = self.model.model.config().vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(())
    }

    /// Prefills `prompt`, reusing the cached common prefix; leaves its last logits ready.
    /// Returns how many prompt tokens were reused.
    fn prefill(&mut self, prompt: &[u32]) -> Result<usize> {
        let common = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least the last prompt token must run, to produce the first logits.
        let reused = common.min(prompt.len() - 1);
        let mut start = reused;
        while start < prompt.len() {
            let end = (start + PREFILL_CHUNK).min(prompt.len());
            self.forward(&prompt[start..end], start, false)?;
            start = end;
        }
        Ok(reused)
    }

    /// Runs `tokens` at positions `start..`, after the first `start` cached tokens, and
    /// returns the logits of the last one. For benchmarks and tools that drive the model
    /// directly.
    pub fn eval(&mut self, tokens: &[u32], start: usize) -> Result<&[f32]> {
        if start > self.cached.len() || start + tokens.len() > self.context_len {
            return Err(Error::InvalidRequest(format!(
                "cannot evaluate {} tokens at position {start} (cached {}, context {})",
                tokens.len(),
                self.cached.len(),
                self.context_len
            )));
        }
        let mut pos = start;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            self.forward(chunk, pos, false)?;
            pos += chunk.len();
        }
        Ok(&self.logits)
    }

    /// Logits of every position of `tokens` (`[tokens.len(), vocab]`), teacher-forced from an
    /// empty cache. Used by correctness checks against reference implementations.
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_prompt(tokens)?;
        self.reset();
        let mut all = Vec::with_capacity(tokens.len() * self.model.model.config().vocab_size);
        let mut start = 0;
        while start < tokens.len() {
            let end = (start + PREFILL_CHUNK).min(tokens.len());
            self.forward(&tokens[start..end], start, true)?;
            all.extend_from_slice(&self.logits);
            start = end;
        }
        Ok(all)
    }

    /// Logits of every position of a prompt holding images (`[tokens.len(), vocab]`), from
    /// an empty cache, in one pass (an image's tokens attend to each other, so no chunk may
    /// end inside one). The cache is left empty: it is keyed by tokens alone.
    pub fn score_with_images(&mut self, tokens: &[u32], images: &[ImageSpan]) -> Result<Vec<f32>> {
        self.check_prompt(tokens)?;
        self.reset();
        let result = self.forward_placed(tokens, 0, true, images);
        self.reset();
        result.map(|()| self.logits.clone())
    }

    /// Generates a completion, calling `on_text` with each new piece of text as it becomes
    /// final. `cancel` is checked before every token.
    pub fn generate(&mut self, req: &GenerationRequest, cancel: &AtomicBool, mut on_text: impl FnMut(&str)) -> Result<Completion> {
        req.sampling.validate().map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.check_prompt(&req.prompt)?;
        let tokenizer = Arc::clone(&self.model.tokenizer);
        let t0 = Instant::now();
        let reused = self.prefill(&req.prompt)?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();

        let vocab = self.model.model.config().vocab_size;
        let mut decoding = Decoding::new(req);
        let mut history = req.prompt.clone();
        let mut generated = Vec::new();
        let finish = loop {
            if cancel.load(Ordering::Relaxed) {
                break FinishReason::Cancelled;
            }
            let last = self.logits.len() - vocab;
            let sampled = decoding.sample(req, &mut self.logits[last..], &history);
            if let Some(e) = sampled.error {
                return Err(Error::InvalidRequest(e));
            }
            let token = sampled.token;
            let accepted = decoding.accept(req, &tokenizer, token);
            if let Some(e) = accepted.error {
                return Err(Error::InvalidRequest(e));
            }
            if !accepted.text.is_empty() {
                on_text(&accepted.text);
            }
            if accepted.is_end_token {
                break FinishReason::Stop;
            }
            generated.push(token);
            history.push(token);
            if let Some(reason) = accepted.finish {
                break reason;
            }
            let pos = req.prompt.len() + generated.len() - 1;
            if pos + 1 >= self.context_len {
                let tail = decoding.flush(&tokenizer);
                if !tail.is_empty() {
                    on_text(&tail);
                }
                break FinishReason::ContextFull;
            }
            self.forward(&[token], pos, false)?;
        };
        if finish == FinishReason::Cancelled {
            let tail = decoding.flush(&tokenizer);
            if !tail.is_empty() {
                on_text(&tail);
            }
        }
        let text = decoding.text.clone();
        Ok(Completion {
            usage: Usage {
                prompt_tokens: req.prompt.len(),
                cached_tokens: reused,
                completion_tokens: generated.len(),
                prefill_ms,
                decode_ms: t1.elapsed().as_secs_f64() * 1e3,
            },
            tokens: generated,
            text,
            finish,
        })
    }
}
