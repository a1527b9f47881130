//! What the engine does with a step's logits: forks the extra completions of `n` > 1
//! requests, samples, streams tokens, and ends completions, releasing their blocks.

use super::decoding::Decoding;
use super::handle::{Event, Failure, PromptLogprob};
use super::step::{Active, Engine};
use super::{FinishReason, Usage};
use crate::sampler::select::{log_sum_exp, top_log_probs};
use crate::scheduler::{Plan, PlanEntry, SeqId, SeqState};
use std::sync::Arc;
use std::time::Instant;

impl Engine {
    pub(super) fn after_forward(&mut self, plan: &Plan) {
        self.scheduler.complete(plan);
        let vocab = self.model.model.config().vocab_size;
        let mut next_row = 0;
        for e in &plan.entries {
            let rows = next_row..next_row + e.logit_rows();
            next_row = rows.end;
            if !e.scored.is_empty() {
                self.report_prompt_logprobs(e, rows.start);
            }
            if !e.wants_logits {
                continue;
            }
            let row = rows.end - 1;
            let logits = self.logits[row * vocab..(row + 1) * vocab].to_vec();
            let mut members = vec![e.id];
            if self.active.get(&e.id).is_some_and(|a| a.forks_pending > 0) {
                members.extend(self.fork(e.id));
            }
            for id in members {
                // Each completion applies its own penalties to its own copy of the logits.
                self.emit(id, &mut logits.clone());
            }
        }
    }

    /// Sends the log-probabilities of the prompt tokens that entry `e` scored, from the
    /// logits at `first_row` on, and records them as reported.
    fn report_prompt_logprobs(&mut self, e: &PlanEntry, first_row: usize) {
        let vocab = self.model.model.config().vocab_size;
        let (Some(a), Some(seq)) = (self.active.get(&e.id), self.scheduler.get(e.id)) else { return };
        let top = a.req.prompt_logprobs.unwrap_or(0).min(20);
        let tokens = e
            .scored
            .clone()
            .enumerate()
            .map(|(i, pos)| {
                let row = &self.logits[(first_row + i) * vocab..(first_row + i + 1) * vocab];
                let next = seq.tokens[pos + 1];
                let lse = log_sum_exp(row);
                PromptLogprob { logprob: row[next as usize] - lse, top: top_log_probs(row, top, lse) }
            })
            .collect();
        let sent = a.events.send(Event::PromptLogprobs { first: e.scored.start + 1, tokens });
        let request = a.request;
        if let Some(seq) = self.scheduler.get_mut(e.id) {
            seq.score_from = Some(e.scored.end);
        }
        if sent.is_err() {
            self.cancel_request(request);
        }
    }

    /// Creates the remaining completions of `parent`'s request as copies of it, now that its
    /// prompt is in the cache; returns the ids of those that sample from these logits.
    fn fork(&mut self, parent: SeqId) -> Vec<SeqId> {
        let Some(p) = self.active.get_mut(&parent) else { return vec![] };
        let count = std::mem::take(&mut p.forks_pending);
        let (req, events, max_len, submitted, request) = (Arc::clone(&p.req), p.events.clone(), p.max_len, p.submitted, p.request);
        let mut children = Vec::with_capacity(count);
        for index in 1..=count {
            let id = self.next_fork_id;
            self.next_fork_id += 1;
            match self.scheduler.fork(parent, id) {
                Some(copies) => match copies.into_iter().try_for_each(|(g, from, to)| self.kv.copy_block(g, from, to)) {
                    Ok(()) => children.push(id),
                    Err(e) => {
                        // The copy of the shared last block failed on the device: the
                        // completion computes its own prompt instead, as when no block is free.
                        tracing::warn!(error = %e, "copying a forked sequence's last block failed; it runs its own prefill");
                        self.scheduler.remove(id);
                        self.scheduler.add(SeqState::new(id, req.prompt.clone(), self.kv.groups.len()));
                    }
                },
                None => {
                    // No free block for the copy of the partly filled last block: the
                    // completion waits as a sequence of its own over the same prompt, found
                    // in the prefix cache but for that block, and samples from its own
                    // prefill's logits (the same distribution, drawn with its own seed).
                    self.scheduler.add(SeqState::new(id, req.prompt.clone(), self.kv.groups.len()));
                }
            }
            self.active.insert(
                id,
                Active {
                    request,
                    index,
                    decoding: Decoding::for_choice(&req, index),
                    req: Arc::clone(&req),
                    events: events.clone(),
                    max_len,
                    submitted,
                    first_token: None,
                    forks_pending: 0,
                },
            );
            self.requests.entry(request).or_default().push(id);
        }
        children
    }

    /// Samples the next token of sequence `id` from its logits and streams it.
    fn emit(&mut self, id: SeqId, logits: &mut [f32]) {
        let tokenizer = Arc::clone(&self.model.tokenizer);
        let (Some(a), Some(seq)) = (self.active.get_mut(&id), self.scheduler.get(id)) else { return };
        let sampled = a.decoding.sample(&a.req, logits, &seq.tokens);
        let accepted = match sampled.error {
            Some(e) => Err(e),
            None => {
                let accepted = a.decoding.accept(&a.req, &tokenizer, sampled.token);
                match accepted.error {
                    Some(e) => Err(e),
                    None => Ok(accepted),
                }
            }
        };
        let accepted = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // The grammar cannot go on: the request fails rather than emit text outside it.
                let request = a.request;
                let _ = a.events.send(Event::Failed(Failure::Request(e)));
                self.cancel_request(request);
                return;
            }
        };
        let cached = a.first_token.is_none().then(|| seq.num_cached_prompt.min(a.req.prompt.len()));
        a.first_token.get_or_insert_with(Instant::now);
        if accepted.is_end_token {
            self.finish_with(id, FinishReason::Stop, accepted.text);
            return;
        }
        let event = Event::Token { index: a.index, id: sampled.token, text: accepted.text, logprob: sampled.logprob, top_logprobs: sampled.top, cached };
        if a.events.send(event).is_err() {
            let request = a.request;
            self.cancel_request(request);
            return;
        }
        if let Some(reason) = accepted.finish {
            self.finish(id, reason);
            return;
        }
        let max_len = a.max_len;
        self.scheduler.push_token(id, sampled.token);
        self.stats.generated_tokens += 1;
        if self.scheduler.get(id).map_or(0, |s| s.tokens.len()) >= max_len {
            self.finish(id, FinishReason::ContextFull);
        }
    }

    /// Ends every completion of a request (its client went away or asked to stop).
    pub(super) fn cancel_request(&mut self, request: SeqId) {
        for id in self.requests.get(&request).cloned().unwrap_or_default() {
            self.finish(id, FinishReason::Cancelled);
        }
    }

    /// Ends a completion: releases its blocks and sends its final event.
    pub(super) fn finish(&mut self, id: SeqId, reason: FinishReason) {
        self.finish_with(id, reason, String::new());
    }

    /// `finish`, with text already released by the last token placed before any held back.
    fn finish_with(&mut self, id: SeqId, reason: FinishReason, mut tail: String) {
        let seq = self.scheduler.remove(id);
        let Some(mut a) = self.active.remove(&id) else { return };
        if let Some(ids) = self.requests.get_mut(&a.request) {
            ids.retain(|&s| s != id);
            if ids.is_empty() {
                self.requests.remove(&a.request);
            }
        }
        tail.push_str(&a.decoding.flush(&self.model.tokenizer));
        let ended = 1 + a.forks_pending as u64;
        if reason == FinishReason::Cancelled {
            self.stats.cancelled += ended;
        } else {
            self.stats.completed += ended;
        }
        let now = Instant::now();
        let ttft = a.first_token.unwrap_or(now).duration_since(a.submitted);
        let usage = Usage {
            prompt_tokens: a.req.prompt.len(),
            cached_tokens: seq.as_ref().map_or(0, |s| s.num_cached_prompt).min(a.req.prompt.len()),
            completion_tokens: a.decoding.generated,
            prefill_ms: ttft.as_secs_f64() * 1e3,
            decode_ms: a.first_token.map_or(0.0, |t| now.duration_since(t).as_secs_f64() * 1e3),
        };
        // A request with forks still pending also ends those completions.
        for index in a.index + 1..=a.index + a.forks_pending {
            let _ = a.events.send(Event::Done { index, finish: reason, usage: usage.clone(), tail: String::new(), stop: None });
        }
        let stop = a.decoding.stop_string().map(str::to_string);
        let _ = a.events.send(Event::Done { index: a.index, finish: reason, usage, tail, stop });
    }

    pub(super) fn fail_plan(&mut self, plan: &Plan, msg: &str) {
        for e in &plan.entries {
            self.fail_seq(e.id, msg);
        }
    }

    /// Ends sequence `id` with an error: drops it from the scheduler and its request.
    pub(super) fn fail_seq(&mut self, id: SeqId, msg: &str) {
        let request = self.active.get(&id).map(|a| a.request);
        self.scheduler.remove(id);
        if let Some(a) = self.active.remove(&id) {
            let _ = a.events.send(Event::Failed(Failure::Worker(msg.to_string())));
        }
        if let Some(r) = request {
            self.requests.remove(&r);
        }
    }
}
