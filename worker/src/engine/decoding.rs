//! Per-sequence generation state: sampling, incremental detokenization, stop strings and
//! token limits. Shared by the batching engine and the single-sequence session.

use super::{FinishReason, GenerationRequest};
use crate::constraint::TokenMatcher;
use crate::sampler::select::{log_sum_exp, top_log_probs};
use crate::sampler::{apply_penalties, sample, Candidates, Rng, StopMatch, StopMatcher};
use kiln_shared::tokenizer::{StreamDecoder, Tokenizer};

pub struct Decoding {
    /// This completion's seed; token k is drawn from a generator seeded by (seed, k), so a
    /// completion resumed at token k draws exactly what the original would have.
    seed: u64,
    candidates: Candidates,
    decoder: StreamDecoder,
    stops: StopMatcher,
    stopped_by_string: bool,
    /// Where the output stands in the request's grammar, when it has one.
    pub matcher: Option<TokenMatcher>,
    pub generated: usize,
    pub text: String,
}

/// A sampled token and, if asked for, its log-probability and the likeliest alternatives.
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
    /// The grammar could not give the allowed tokens (the completion cannot go on).
    pub error: Option<String>,
}

/// What one accepted token produced.
pub struct Accepted {
    /// Text now final (may be empty while bytes or a possible stop string are held back).
    pub text: String,
    pub finish: Option<FinishReason>,
    /// The token ended generation by itself (end-of-generation) and is not part of the output.
    pub is_end_token: bool,
    /// The token does not fit the request's grammar (only a replayed token can do that).
    pub error: Option<String>,
}

impl Decoding {
    pub fn new(req: &GenerationRequest) -> Decoding {
        Self::for_choice(req, 0)
    }

    /// State for completion `index` of a request; each completion draws from its own seed.
    pub fn for_choice(req: &GenerationRequest, index: usize) -> Decoding {
        let seed = req.sampling.seed.unwrap_or_else(Rng::entropy_seed);
        Decoding {
            seed: seed.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            candidates: Candidates::default(),
            decoder: StreamDecoder::after(&req.prompt),
            stops: StopMatcher::new(req.stop.clone()),
            stopped_by_string: false,
            matcher: req.constraint.as_ref().map(|c| c.start()),
            generated: 0,
            text: String::new(),
        }
    }

    /// State for continuing completion `index` after `tokens` it already produced: the
    /// text they made is taken as already sent, and what was held back stays held back.
    /// Fails when those tokens could not have been produced by a completion still running.
    pub fn resumed(req: &GenerationRequest, index: usize, tokens: &[u32], tokenizer: &Tokenizer) -> Result<Decoding, String> {
        let mut d = Self::for_choice(req, index);
        for (k, &t) in tokens.iter().enumerate() {
            let accepted = d.accept(req, tokenizer, t);
            if let Some(e) = accepted.error {
                return Err(format!("resumed token {k} ({t}): {e}"));
            }
            if accepted.is_end_token || accepted.finish.is_some() {
                return Err(format!("resumed token {k} ({t}) already ends the completion"));
            }
        }
        d.text.clear();
        Ok(d)
    }

    /// Picks the next token from `logits` after `history` (prompt and output so far). With
    /// `logprobs`, log-probabilities are those of the penalized logits at temperature 1.
    pub fn sample(&mut self, req: &GenerationRequest, logits: &mut [f32], history: &[u32]) -> Sampled {
        apply_penalties(logits, history, &req.sampling);
        if let Some(m) = &mut self.matcher {
            if let Err(e) = m.restrict(logits) {
                return Sampled { token: 0, logprob: None, top: Vec::new(), error: Some(e.to_string()) };
            }
        }
        let mut rng = Rng::seeded(self.seed ^ (self.generated as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let token = sample(logits, &req.sampling, &mut rng, &mut self.candidates);
        if !req.logprobs {
            return Sampled { token, logprob: None, top: Vec::new(), error: None };
        }
        let lse = log_sum_exp(logits);
        Sampled { token, logprob: Some(logits[token as usize] - lse), top: top_log_probs(logits, req.top_logprobs.min(20), lse), error: None }
    }

    /// Takes a sampled token: end-of-generation, stop strings, the token limit and the end of
    /// the grammar decide whether generation ends.
    pub fn accept(&mut self, req: &GenerationRequest, tokenizer: &Tokenizer, token: u32) -> Accepted {
        if let Some(m) = &mut self.matcher {
            if let Err(e) = m.consume(token) {
                return Accepted { text: String::new(), finish: None, is_end_token: false, error: Some(e.to_string()) };
            }
        }
        if (!req.ignore_eos || self.matcher.is_some()) && tokenizer.is_eog(token) {
            return Accepted { text: self.flush(tokenizer), finish: Some(FinishReason::Stop), is_end_token: true, error: None };
        }
        self.generated += 1;
        let piece = self.decoder.push(tokenizer, token, false);
        let (mut text, mut finish) = match self.stops.push(&piece) {
            StopMatch::Continue(safe) => (safe, None),
            StopMatch::Stopped(before) => {
                self.stopped_by_string = true;
                (before, Some(FinishReason::Stop))
            }
        };
        // A finished grammar ends the output even at the token limit: the value is complete.
        if finish.is_none() && self.matcher.as_ref().is_some_and(TokenMatcher::is_finished) {
            finish = Some(FinishReason::Stop);
        }
        if finish.is_none() && req.max_tokens.is_some_and(|m| self.generated >= m) {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() {
            text.push_str(&self.flush(tokenizer));
        }
        self.text.push_str(&text);
        Accepted { text, finish, is_end_token: false, error: None }
    }

    /// The stop string that ended generation, if one did.
    pub fn stop_string(&self) -> Option<&str> {
        self.stops.matched()
    }

    /// Releases text held back at the end of generation (nothing after a stop string).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        if self.stopped_by_string {
            return String::new();
        }
        let tail = self.decoder.finish_with(tokenizer, false);
        let text = match self.stops.push(&tail) {
            StopMatch::Continue(t) => t + &self.stops.finish(),
            StopMatch::Stopped(t) => {
                self.stopped_by_string = true;
                t
            }
        };
        self.text.push_str(&text);
        text
    }
}
