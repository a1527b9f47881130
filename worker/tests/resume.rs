//! Resuming a completion from the tokens it had produced gives exactly the rest of the
//! original: same tokens, same text (held-back bytes and stop strings included), same
//! sampled draws, for each completion of an n > 1 request.

mod common;

use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerationRequest, Resume};
use std::sync::Arc;

#[derive(Clone, Debug, Default, PartialEq)]
struct Choice {
    tokens: Vec<u32>,
    /// Text of each token event, then the tail.
    pieces: Vec<String>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    prompt_tokens: usize,
}

/// The completions by index; a resumed one keeps its original index.
fn run(h: &EngineHandle, req: GenerationRequest) -> Vec<Choice> {
    let mut out = vec![Choice::default(); req.n.max(1) + req.resume.as_ref().map_or(0, |r| r.index)];
    for e in h.submit(req).expect("submit") {
        match e {
            Event::Token { index, id, text, .. } => {
                out[index].tokens.push(id);
                out[index].pieces.push(text);
            }
            Event::Done { index, finish, tail, usage, .. } => {
                out[index].pieces.push(tail);
                out[index].finish = Some(finish);
                out[index].completion_tokens = usage.completion_tokens;
                out[index].prompt_tokens = usage.prompt_tokens;
            }
            Event::Failed(m) => panic!("{m}"),
            Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    out
}

fn text(pieces: &[String]) -> String {
    pieces.concat()
}

#[test]
fn resumed_completions_continue_exactly_where_the_original_stopped() {
    let model = common::model("smollm2");
    let h = Engine::start(Arc::clone(&model), common::compute(), EngineConfig::default()).unwrap();
    let prompt = model.encode_raw("Here is a short story about a robot who learns to paint:");
    let base = GenerationRequest {
        prompt,
        sampling: SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, repeat_penalty: 1.1, seed: Some(1234), ..SamplingParams::default() },
        max_tokens: Some(40),
        n: 3,
        ..Default::default()
    };
    let original = run(&h, base.clone());
    assert!(original.iter().all(|c| c.tokens.len() >= 12), "completions long enough to cut: {original:?}");
    assert!(original[0].tokens != original[1].tokens, "completions sample independently");
    for (index, choice) in original.iter().enumerate() {
        for cut in [1, 5, choice.tokens.len() / 2, choice.tokens.len() - 1] {
            let mut req = base.clone();
            req.n = 1;
            req.resume = Some(Resume { index, tokens: choice.tokens[..cut].to_vec() });
            let resumed = run(&h, req).remove(index);
            assert_eq!(resumed.tokens, choice.tokens[cut..], "choice {index} cut at {cut}: tokens");
            let sent: String = text(&choice.pieces[..cut]);
            assert_eq!(sent.clone() + &text(&resumed.pieces), text(&choice.pieces), "choice {index} cut at {cut}: text");
            assert_eq!(resumed.finish, choice.finish);
            assert_eq!(resumed.completion_tokens, choice.completion_tokens);
            assert_eq!(resumed.prompt_tokens, choice.prompt_tokens);
        }
    }
}

#[test]
fn a_stop_string_split_across_the_cut_still_stops() {
    let model = common::model("smollm2");
    let h = Engine::start(Arc::clone(&model), common::compute(), EngineConfig::default()).unwrap();
    let greedy = GenerationRequest { prompt: model.encode_raw("1, 2, 3, 4,"), sampling: SamplingParams::greedy(), max_tokens: Some(30), ..Default::default() };
    let free = run(&h, greedy.clone()).remove(0);
    let full = text(&free.pieces);
    // A stop string made of the end of one token's text and the start of the next one's.
    let at = free.pieces[..6].concat().len();
    let stop = full[at - 2..at + 2].to_string();
    let mut stopped = greedy.clone();
    stopped.stop = vec![stop.clone()];
    let original = run(&h, stopped.clone()).remove(0);
    assert_eq!(original.finish, Some(FinishReason::Stop));
    let cut = 6;
    let mut req = stopped.clone();
    req.resume = Some(Resume { index: 0, tokens: original.tokens[..cut].to_vec() });
    let resumed = run(&h, req).remove(0);
    assert_eq!(text(&original.pieces[..cut]) + &text(&resumed.pieces), text(&original.pieces), "stop `{stop}`");
    assert_eq!(resumed.finish, Some(FinishReason::Stop));
}

#[test]
fn impossible_resumes_are_refused() {
    let model = common::model("smollm2");
    let h = Engine::start(Arc::clone(&model), common::compute(), EngineConfig::default()).unwrap();
    let prompt = model.encode_raw("Hello");
    let base = GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(4), ..Default::default() };
    let cases = [
        (Resume { index: 0, tokens: vec![1_000_000] }, "outside the vocabulary"),
        (Resume { index: 0, tokens: vec![42; 4] }, "leave no room"),
        (Resume { index: 0, tokens: vec![model.tokenizer.eos_id().unwrap_or(2)] }, "already ends the completion"),
    ];
    for (resume, expected) in cases {
        let mut req = base.clone();
        req.resume = Some(resume);
        let err = h.submit(req).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(expected), "`{err}` should say `{expected}`");
    }
    let mut req = base.clone();
    req.n = 2;
    req.resume = Some(Resume { index: 0, tokens: vec![42] });
    assert!(h.submit(req).err().is_some_and(|e| e.to_string().contains("n must be 1")));
}
