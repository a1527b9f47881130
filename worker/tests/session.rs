//! Generation-loop behaviour on the tiny in-memory model: batch invariance, prefix reuse,
//! limits, stop strings, cancellation and request validation.

mod common;

use common::tiny;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{FinishReason, GenerationRequest, Session};
use kiln_worker::Error;
use std::sync::atomic::AtomicBool;

fn session(ctx: usize) -> Session {
    Session::new(tiny::model(), common::compute(), ctx).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(max_tokens), stop: vec![], ignore_eos: true, logprobs: false, ..Default::default() }
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 37 % 250) as u32 + 3).collect()
}

#[test]
fn batched_prefill_equals_token_by_token() {
    let tokens = prompt(70);
    let mut a = session(128);
    let all = a.score(&tokens).unwrap();
    let mut b = session(128);
    for (i, &t) in tokens.iter().enumerate() {
        let row = b.eval(&[t], i).unwrap();
        assert_eq!(row, &all[i * tiny::VOCAB..(i + 1) * tiny::VOCAB], "position {i}");
    }
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let tokens = prompt(90);
    let mut a = session(128);
    let one = a.eval(&tokens, 0).unwrap().to_vec();
    let mut b = session(128);
    b.eval(&tokens[..31], 0).unwrap();
    b.eval(&tokens[31..64], 31).unwrap();
    let chunked = b.eval(&tokens[64..], 64).unwrap();
    assert_eq!(one, chunked);
}

#[test]
fn shared_prefix_is_reused_and_changes_nothing() {
    let cancel = AtomicBool::new(false);
    let mut warm = session(256);
    let first = warm.generate(&request(prompt(40), 8), &cancel, |_| {}).unwrap();
    assert_eq!(first.usage.cached_tokens, 0);
    let mut longer = prompt(40);
    longer.extend(&first.tokens);
    longer.extend(prompt(10));
    let reused = warm.generate(&request(longer.clone(), 8), &cancel, |_| {}).unwrap();
    // The last answer token was sampled but never run, so it is not cached.
    assert_eq!(reused.usage.cached_tokens, 47, "prompt and first answer come from the cache");
    let fresh = session(256).generate(&request(longer, 8), &cancel, |_| {}).unwrap();
    assert_eq!(reused.tokens, fresh.tokens);
    assert_eq!(fresh.usage.cached_tokens, 0);
}

#[test]
fn limits_end_generation_with_the_right_reason() {
    let cancel = AtomicBool::new(false);
    let out = session(64).generate(&request(prompt(10), 5), &cancel, |_| {}).unwrap();
    assert_eq!((out.tokens.len(), out.finish), (5, FinishReason::Length));
    let out = session(16).generate(&request(prompt(10), 100), &cancel, |_| {}).unwrap();
    assert_eq!(out.finish, FinishReason::ContextFull);
    assert_eq!(out.tokens.len(), 6, "10 prompt tokens + 6 generated fill 16 slots");
}

#[test]
fn cancellation_stops_before_the_next_token() {
    let cancel = AtomicBool::new(true);
    let out = session(64).generate(&request(prompt(10), 50), &cancel, |_| {}).unwrap();
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert!(out.tokens.is_empty());
}

#[test]
fn stop_strings_end_the_text_and_are_not_emitted() {
    let cancel = AtomicBool::new(false);
    let mut s = session(128);
    let full = s.generate(&request(prompt(10), 40), &cancel, |_| {}).unwrap();
    // Stop at a piece of text the model is known to produce (from its third character on).
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 6, "tiny model produced too little text: {:?}", full.text);
    let stop: String = chars[3..5].iter().collect();
    let expected_prefix = &full.text[..full.text.find(&stop).unwrap()];
    let mut req = request(prompt(10), 40);
    req.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let out = s.generate(&req, &cancel, |t| streamed.push_str(t)).unwrap();
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(out.text, expected_prefix);
    assert_eq!(streamed, out.text, "streamed pieces concatenate to the final text");
}

#[test]
fn seeded_sampling_reproduces_and_different_seeds_differ() {
    let cancel = AtomicBool::new(false);
    let mut req = request(prompt(10), 24);
    req.sampling = SamplingParams { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(7), ..SamplingParams::default() };
    let a = session(64).generate(&req, &cancel, |_| {}).unwrap();
    let b = session(64).generate(&req, &cancel, |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    req.sampling.seed = Some(8);
    let c = session(64).generate(&req, &cancel, |_| {}).unwrap();
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn bad_requests_are_clear_errors() {
    let cancel = AtomicBool::new(false);
    let mut s = session(32);
    let err = s.generate(&request(prompt(32), 4), &cancel, |_| {}).unwrap_err();
    assert!(matches!(err, Error::PromptTooLong { prompt_tokens: 32, context_len: 32 }), "{err}");
    let err = s.generate(&request(vec![], 4), &cancel, |_| {}).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = s.generate(&request(vec![1, 9999], 4), &cancel, |_| {}).unwrap_err();
    assert!(err.to_string().contains("9999"), "{err}");
    let mut req = request(prompt(4), 4);
    req.sampling.top_p = 1.5;
    let err = s.generate(&req, &cancel, |_| {}).unwrap_err();
    assert!(err.to_string().contains("top_p"), "{err}");
    // The session still works afterwards.
    assert!(s.generate(&request(prompt(4), 2), &cancel, |_| {}).is_ok());
}
