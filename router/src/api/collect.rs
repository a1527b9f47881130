//! Gathering a whole generation for a non-streamed response.

use crate::error::ApiError;
use crate::generate::{Update, Updates};
use kiln_proto::v1 as pb;

#[derive(Default)]
pub struct Choice {
    pub text: String,
    /// Every token with its log-probabilities (kept only when they were asked for).
    pub tokens: Vec<pb::TokenEvent>,
    pub done: Option<pb::DoneEvent>,
}

/// Token counts over all completions of a request; the prompt is counted once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}

impl Totals {
    /// Adds another generation's counts (the rounds of one request: each has its prompt).
    pub fn plus(&mut self, other: &Totals) {
        self.prompt_tokens += other.prompt_tokens;
        self.cached_tokens += other.cached_tokens;
        self.completion_tokens += other.completion_tokens;
    }

    /// The counts of a request with several prompts, each with `n` of `choices`.
    pub fn of_prompts(choices: &[Choice], n: usize) -> Totals {
        let mut all = Totals::default();
        for prompt in choices.chunks(n.max(1)) {
            let mut t = Totals::default();
            prompt.iter().filter_map(|c| c.done.as_ref()).for_each(|d| t.add(d));
            all.plus(&t);
        }
        all
    }

    pub fn add(&mut self, done: &pb::DoneEvent) {
        if let Some(u) = &done.usage {
            self.prompt_tokens = u.prompt_tokens;
            self.cached_tokens = self.cached_tokens.max(u.cached_tokens);
            self.completion_tokens += u.completion_tokens;
        }
    }
}

/// Runs a generation to its end. A completion the worker had to cancel is an error: its
/// text would be silently cut short.
pub async fn collect(generation: &mut impl Updates, n: usize, keep_tokens: bool) -> Result<(Vec<Choice>, Totals), ApiError> {
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut totals = Totals::default();
    while let Some(update) = generation.next_update().await {
        match update? {
            Update::Token(t) => {
                let Some(c) = choices.get_mut(t.index as usize) else { continue };
                c.text.push_str(&t.text);
                if keep_tokens {
                    c.tokens.push(t);
                }
            }
            Update::Done(d) => {
                cancelled_is_error(&d)?;
                totals.add(&d);
                if let Some(c) = choices.get_mut(d.index as usize) {
                    c.text.push_str(&d.tail);
                    c.done = Some(d);
                }
            }
        }
    }
    Ok((choices, totals))
}

pub fn cancelled_is_error(d: &pb::DoneEvent) -> Result<(), ApiError> {
    if d.finish == pb::FinishReason::Cancelled as i32 {
        return Err(ApiError::unavailable("the worker stopped the generation (it is shutting down); retry"));
    }
    Ok(())
}
