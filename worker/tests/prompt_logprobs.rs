//! Prompt log-probabilities from the engine (`GenerationRequest::prompt_logprobs`): each
//! prompt token's given the tokens before it, as teacher-forced scoring (`Session::score`)
//! gives them, whatever the chunking, the batch, the prefix cache or preemption; reported
//! once, in order, before the first token; and on SmolLM2 as llama.cpp computes them.

mod common;

use common::tiny;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, GenerationRequest, PromptLogprob, RequestStream, Session, Usage};
use kiln_worker::loader::LoadedModel;
use std::sync::Arc;

/// Log-probabilities are compared in f32 after a log-sum-exp over the vocabulary; the
/// logits themselves are the same bits (the engine and teacher-forced scoring run the same
/// kernels in the same order).
const TOLERANCE: f32 = 1e-5;

/// Per prompt token after the first: its log-probability, and the most likely tokens with
/// theirs.
type Scores = Vec<(f32, Vec<(u32, f32)>)>;

struct Scored {
    prompt: Vec<PromptLogprob>,
    tokens: Vec<u32>,
    usage: Usage,
}

/// Collects a request's events, checking that the prompt's log-probabilities come in order,
/// each position once, all before the first token.
fn collect(stream: RequestStream) -> Scored {
    let (mut prompt, mut tokens) = (Vec::new(), Vec::new());
    for e in stream {
        match e {
            Event::PromptLogprobs { first, tokens: scored } => {
                assert!(tokens.is_empty(), "prompt log-probabilities after a token");
                assert_eq!(first, prompt.len() + 1, "positions in order, none twice or skipped");
                prompt.extend(scored);
            }
            Event::Token { id, .. } => tokens.push(id),
            Event::Done { usage, .. } => return Scored { prompt, tokens, usage },
            Event::Failed(msg) => panic!("request failed: {msg}"),
        }
    }
    panic!("stream ended without Done")
}

fn scoring(prompt: Vec<u32>, top: usize, max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(max_tokens), ignore_eos: true, prompt_logprobs: Some(top), ..Default::default() }
}

/// What teacher-forced scoring gives: for each prompt token after the first, its
/// log-probability and the `top` most likely tokens (by logit, then id) with theirs, from a
/// log-softmax in f64.
fn reference(session: &mut Session, prompt: &[u32], top: usize) -> Scores {
    let vocab = session.model().model.config().vocab_size;
    let logits = session.score(prompt).unwrap();
    logits
        .chunks(vocab)
        .take(prompt.len() - 1)
        .enumerate()
        .map(|(pos, row)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let lp = |id: u32| (row[id as usize] as f64 - lse) as f32;
            let mut ids: Vec<u32> = (0..vocab as u32).collect();
            let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if top > 0 {
                ids.select_nth_unstable_by(top - 1, by_logit);
            }
            ids.truncate(top);
            ids.sort_by(by_logit);
            (lp(prompt[pos + 1]), ids.iter().map(|&id| (id, lp(id))).collect())
        })
        .collect()
}

fn assert_matches(got: &[PromptLogprob], want: &Scores, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: one per prompt token after the first");
    for (pos, (g, (lp, top))) in got.iter().zip(want).enumerate() {
        assert!((g.logprob - lp).abs() <= TOLERANCE, "{what}: token {}: {} vs {lp}", pos + 1, g.logprob);
        assert_eq!(g.top.iter().map(|t| t.0).collect::<Vec<_>>(), top.iter().map(|t| t.0).collect::<Vec<_>>(), "{what}: token {}", pos + 1);
        for (a, b) in g.top.iter().zip(top) {
            assert!((a.1 - b.1).abs() <= TOLERANCE, "{what}: token {}: alternative {}: {} vs {}", pos + 1, a.0, a.1, b.1);
        }
    }
}

fn engine(model: Arc<LoadedModel>, cfg: EngineConfig) -> EngineHandle {
    Engine::start(model, common::compute(), cfg).unwrap()
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + salt * 11) % 250) as u32 + 3).collect()
}

/// The tiny model, a prompt for it, and that prompt's teacher-forced scores with `top`
/// alternatives.
fn tiny_case(len: usize, salt: usize, top: usize) -> (Arc<LoadedModel>, Vec<u32>, Scores) {
    let model = tiny::model();
    let p = prompt(len, salt);
    let wanted = reference(&mut Session::new(Arc::clone(&model), common::compute(), 256).unwrap(), &p, top);
    (model, p, wanted)
}

#[test]
fn the_engine_scores_prompts_as_teacher_forcing_does_whatever_the_chunks_and_batch() {
    let model = tiny::model();
    let mut session = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4).map(|k| prompt(40 + 9 * k, k)).collect();
    let wanted: Vec<_> = prompts.iter().map(|p| reference(&mut session, p, 3)).collect();
    // Whole prompts in one step, and chunks of 16 and 5 tokens shared with other sequences.
    for max_batch_tokens in [512, 16, 5] {
        let h = engine(Arc::clone(&model), EngineConfig { max_batch_tokens, ..EngineConfig::default() });
        let plain = h.submit(GenerationRequest { prompt: prompt(30, 9), sampling: SamplingParams::greedy(), max_tokens: Some(20), ..Default::default() }).unwrap();
        let streams: Vec<RequestStream> = prompts.iter().map(|p| h.submit(scoring(p.clone(), 3, 8)).unwrap()).collect();
        for (k, s) in streams.into_iter().enumerate() {
            let scored = collect(s);
            assert_matches(&scored.prompt, &wanted[k], &format!("prompt {k}, batch of {max_batch_tokens} tokens"));
            assert_eq!(scored.tokens.len(), 8);
        }
        assert!(collect(plain).prompt.is_empty(), "a request that did not ask gets none");
    }
}

#[test]
fn a_cached_prefix_is_recomputed_for_scoring_and_scoring_fills_the_cache() {
    let (model, p, wanted) = tiny_case(100, 1, 2);
    let h = engine(model, EngineConfig::default());
    let greedy = |p: Vec<u32>| GenerationRequest { prompt: p, sampling: SamplingParams::greedy(), max_tokens: Some(4), ignore_eos: true, ..Default::default() };
    let first = collect(h.submit(greedy(p.clone())).unwrap());
    assert_eq!(first.usage.cached_tokens, 0);
    let scored = collect(h.submit(scoring(p.clone(), 2, 4)).unwrap());
    assert_matches(&scored.prompt, &wanted, "after the prompt was cached");
    assert_eq!(scored.usage.cached_tokens, 0, "the scored prompt was computed in full");
    assert_eq!(scored.tokens, first.tokens);
    let again = collect(h.submit(greedy(p)).unwrap());
    assert!(again.usage.cached_tokens >= 64, "the prefix is still cached: {:?}", again.usage);
    assert_eq!(again.tokens, first.tokens);
}

#[test]
fn n_completions_get_the_prompt_scored_once() {
    let (model, p, wanted) = tiny_case(50, 2, 1);
    let h = engine(model, EngineConfig::default());
    let mut req = scoring(p, 1, 6);
    req.n = 3;
    req.sampling = SamplingParams { temperature: 0.8, seed: Some(4), ..SamplingParams::greedy() };
    let (mut prompt_events, mut done) = (Vec::new(), 0);
    for e in h.submit(req).unwrap() {
        match e {
            Event::PromptLogprobs { tokens, .. } => prompt_events.extend(tokens),
            Event::Done { .. } => done += 1,
            Event::Failed(msg) => panic!("{msg}"),
            Event::Token { .. } => {}
        }
    }
    assert_eq!(done, 3);
    assert_matches(&prompt_events, &wanted, "n = 3");
}

#[test]
fn preempted_scoring_requests_report_each_position_once() {
    let model = tiny::model();
    let mut session = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6).map(|k| prompt(60, k + 20)).collect();
    let wanted: Vec<_> = prompts.iter().map(|p| reference(&mut session, p, 2)).collect();
    // Room for about two sequences of 100 tokens, prompts prefilled 16 tokens a step.
    let per_block = 16 * 2 * tiny::KV_HEADS * (tiny::HIDDEN / tiny::HEADS) * 2 * tiny::LAYERS;
    let cfg = EngineConfig { kv_cache_bytes: Some(14 * per_block), max_context_len: Some(160), max_batch_tokens: 16, ..EngineConfig::default() };
    let h = engine(model, cfg);
    let streams: Vec<RequestStream> = prompts.iter().map(|p| h.submit(scoring(p.clone(), 2, 40)).unwrap()).collect();
    for (k, s) in streams.into_iter().enumerate() {
        assert_matches(&collect(s).prompt, &wanted[k], &format!("prompt {k}"));
    }
    assert!(h.stats().scheduler.preemptions > 0, "the cache was meant to run out");
}

#[test]
fn out_of_range_alternatives_are_refused() {
    let h = engine(tiny::model(), EngineConfig::default());
    let err = h.submit(scoring(prompt(10, 0), 21, 4)).err().expect("21 alternatives");
    assert!(err.to_string().contains("prompt_logprobs = 21 is out of range (0 to 20)"), "{err}");
}

/// A real model against llama.cpp: the most likely token and its log-probability at every
/// position of the golden text (llama.cpp's logits, see goldens.rs), through the engine; and
/// a prompt longer than the rows one step scores (341 for SmolLM2's 49,152-token vocabulary,
/// 64 for Gemma 3's 262,144) and than Gemma 3's 512-token sliding window, against
/// teacher-forced scoring.
fn prompt_logprobs_match_llama_cpp(name: &str) {
    let g = common::golden(name);
    let ids = common::ids(&g["logits"]["ids"]);
    let positions = g["logits"]["positions"].as_array().unwrap();
    let model = common::model(name);
    let h = engine(Arc::clone(&model), EngineConfig::default());
    let scored = collect(h.submit(scoring(ids.clone(), 1, 1)).unwrap());
    assert_eq!(scored.prompt.len(), ids.len() - 1);
    let (mut agree, mut gap) = (0, 0f32);
    for (pos, p) in scored.prompt.iter().enumerate() {
        // The log-probability of token pos + 1 comes from the logits at position pos.
        let golden = &positions[pos];
        let top = golden["top_ids"][0].as_u64().unwrap() as u32;
        agree += usize::from(p.top[0].0 == top);
        gap = gap.max((p.top[0].1 - golden["top1_logprob"].as_f64().unwrap() as f32).abs());
        if ids[pos + 1] == top {
            assert_eq!(p.logprob, p.top[0].1, "token {} is the most likely one", pos + 1);
        }
    }
    eprintln!("{name}: top-1 agreement {agree}/{}, max |Δ log p(top)| {gap:.2e}", scored.prompt.len());
    assert_eq!(agree, scored.prompt.len(), "the most likely token at every position");
    assert!(gap <= 1e-4, "log-probabilities of the top token within 1e-4 of llama.cpp's: {gap}");

    let long: Vec<u32> = ids.iter().chain(&ids).chain(&ids).copied().collect();
    let mut session = Session::new(model, common::compute(), long.len() + 1).unwrap();
    let wanted = reference(&mut session, &long, 2);
    assert_matches(&collect(h.submit(scoring(long.clone(), 2, 1)).unwrap()).prompt, &wanted, &format!("{name}, {} tokens", long.len()));
}

#[test]
fn smollm2_prompt_logprobs_match_llama_cpp() {
    prompt_logprobs_match_llama_cpp("smollm2");
}

#[test]
fn gemma3_prompt_logprobs_match_llama_cpp() {
    prompt_logprobs_match_llama_cpp("gemma3");
}
