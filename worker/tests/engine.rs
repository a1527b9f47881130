//! The batching engine: batch composition never changes a sequence's output, chunked prefill
//! and prefix-cache hits change nothing, blocks always come back, cancellation and
//! preemption work, and impossible requests are refused at submit.

mod common;

use common::tiny;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, FinishReason, GenerationRequest, RequestStream, Session, Usage};
use kiln_worker::formats::gguf_value::Value;
use kiln_worker::loader::LoadedModel;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

struct Outcome {
    tokens: Vec<u32>,
    text: String,
    finish: FinishReason,
    usage: Usage,
}

fn collect(stream: RequestStream) -> Outcome {
    let (mut tokens, mut text) = (vec![], String::new());
    for e in stream {
        match e {
            Event::Token { id, text: t, .. } => {
                tokens.push(id);
                text.push_str(&t);
            }
            Event::Done { finish, usage, tail, .. } => {
                text.push_str(&tail);
                return Outcome { tokens, text, finish, usage };
            }
            Event::Failed(msg) => panic!("request failed: {msg}"),
            Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    panic!("stream ended without Done")
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(max_tokens), stop: vec![], ignore_eos: true, logprobs: false, ..Default::default() }
}

fn engine(model: Arc<LoadedModel>, cfg: EngineConfig) -> EngineHandle {
    Engine::start(model, common::compute(), cfg).unwrap()
}

fn prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n).map(|k| (0..len + 3 * k).map(|i| ((i * 31 + k * 7) % 250) as u32 + 3).collect()).collect()
}

/// Waits until the engine has no running sequence and no block in use (finished and
/// cancelled requests release everything); fails if that never happens.
fn wait_until_drained(h: &EngineHandle) {
    for _ in 0..4000 {
        let s = h.stats();
        if s.scheduler.running == 0 && s.scheduler.waiting == 0 && s.blocks.iter().all(|b| b.in_use == 0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("engine never released every block: {:?}", h.stats());
}

fn alone_vs_together(model: Arc<LoadedModel>, prompts: &[Vec<u32>], tokens: usize, cfg: EngineConfig) {
    let h = engine(Arc::clone(&model), cfg.clone());
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| collect(h.submit(greedy(p.clone(), tokens)).unwrap()).tokens).collect();
    let streams: Vec<RequestStream> = prompts.iter().map(|p| h.submit(greedy(p.clone(), tokens)).unwrap()).collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), tokens);
        assert_eq!(a, b, "prompt {i}: batched output differs from running alone");
    }
    wait_until_drained(&h);
}

#[test]
fn concurrent_requests_match_running_alone_on_the_tiny_model() {
    alone_vs_together(tiny::model(), &prompts(8, 20), 24, EngineConfig::default());
}

#[test]
fn concurrent_requests_match_running_alone_on_smollm2() {
    let model = common::model("smollm2");
    let texts = [
        "The capital of France is",
        "Once upon a time",
        "def add(a, b):",
        "The best way to learn a language is",
        "Water is made of",
        "My favourite fruit is",
        "1, 2, 3, 4,",
        "In the beginning",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| model.encode_raw(t)).collect();
    alone_vs_together(model, &prompts, 32, EngineConfig::default());
}

#[test]
fn engine_matches_the_single_sequence_session() {
    let model = tiny::model();
    let h = engine(Arc::clone(&model), EngineConfig::default());
    for p in prompts(3, 30) {
        let via_engine = collect(h.submit(greedy(p.clone(), 20)).unwrap());
        let mut s = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
        let direct = s.generate(&greedy(p, 20), &AtomicBool::new(false), |_| {}).unwrap();
        assert_eq!(via_engine.tokens, direct.tokens);
        assert_eq!(via_engine.text, direct.text);
        assert_eq!(via_engine.finish, FinishReason::Length);
    }
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let model = tiny::model();
    let p = prompts(1, 90).remove(0);
    let one = collect(engine(Arc::clone(&model), EngineConfig::default()).submit(greedy(p.clone(), 12)).unwrap());
    let chunked_cfg = EngineConfig { max_batch_tokens: 7, ..EngineConfig::default() };
    let chunked = collect(engine(model, chunked_cfg).submit(greedy(p, 12)).unwrap());
    assert_eq!(one.tokens, chunked.tokens);
}

#[test]
fn prefix_cache_hits_skip_compute_and_change_nothing() {
    let model = tiny::model();
    let h = engine(Arc::clone(&model), EngineConfig::default());
    let system: Vec<u32> = (0..64).map(|i| (i * 13 % 200) as u32 + 5).collect();
    let with = |tail: &[u32]| [system.as_slice(), tail].concat();
    let first = collect(h.submit(greedy(with(&[7, 8, 9]), 10)).unwrap());
    assert_eq!(first.usage.cached_tokens, 0);
    let second = collect(h.submit(greedy(with(&[7, 8, 9]), 10)).unwrap());
    assert_eq!(second.usage.cached_tokens, 64, "four full blocks of 16 come from the cache");
    assert_eq!(first.tokens, second.tokens);
    let other = collect(h.submit(greedy(with(&[1, 2]), 10)).unwrap());
    assert_eq!(other.usage.cached_tokens, 64);
    let fresh = collect(engine(model, EngineConfig::default()).submit(greedy(with(&[1, 2]), 10)).unwrap());
    assert_eq!(other.tokens, fresh.tokens, "a hit yields the same tokens as a miss");
    assert!(h.stats().scheduler.prefix_hit_tokens >= 128);
    wait_until_drained(&h);
}

#[test]
fn dropping_a_stream_cancels_and_frees_its_blocks() {
    let h = engine(tiny::model(), EngineConfig::default());
    let mut stream = h.submit(greedy(prompts(1, 40).remove(0), 1000)).unwrap();
    assert!(matches!(stream.next(), Some(Event::Token { .. })));
    drop(stream);
    wait_until_drained(&h);
    let mut stream = h.submit(greedy(prompts(1, 40).remove(0), 1000)).unwrap();
    stream.next();
    stream.cancel();
    let rest: Vec<Event> = stream.collect();
    assert!(matches!(rest.last(), Some(Event::Done { finish: FinishReason::Cancelled, .. })), "{rest:?}");
    wait_until_drained(&h);
}

#[test]
fn preemption_under_memory_pressure_keeps_outputs_exact() {
    let model = tiny::model();
    let ps = prompts(6, 30);
    let alone: Vec<Vec<u32>> = {
        let h = engine(Arc::clone(&model), EngineConfig::default());
        ps.iter().map(|p| collect(h.submit(greedy(p.clone(), 40)).unwrap()).tokens).collect()
    };
    // Room for about two sequences of 70+ tokens at a time.
    let per_block = 16 * 2 * tiny::KV_HEADS * (tiny::HIDDEN / tiny::HEADS) * 2 * tiny::LAYERS;
    let cfg = EngineConfig { kv_cache_bytes: Some(12 * per_block), max_context_len: Some(160), ..EngineConfig::default() };
    let h = engine(model, cfg);
    let streams: Vec<RequestStream> = ps.iter().map(|p| h.submit(greedy(p.clone(), 40)).unwrap()).collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| collect(s).tokens).collect();
    assert_eq!(alone, together);
    assert!(h.stats().scheduler.preemptions > 0, "the cache was meant to run out");
    wait_until_drained(&h);
}

#[test]
fn requests_that_cannot_fit_are_refused_at_submit() {
    let per_block = 16 * 2 * tiny::KV_HEADS * (tiny::HIDDEN / tiny::HEADS) * 2 * tiny::LAYERS;
    // Ten blocks of 16 tokens; sequences may be up to 256 tokens long.
    let cfg = EngineConfig { kv_cache_bytes: Some(10 * per_block), max_context_len: Some(256), max_seqs: 1, ..EngineConfig::default() };
    let h = engine(tiny::model(), cfg);
    let err = h.submit(greedy(prompts(1, 100).remove(0), 100)).err().unwrap().to_string();
    assert!(err.contains("cannot fit"), "{err}");
    let err = h.submit(greedy(prompts(1, 260).remove(0), 1)).err().unwrap().to_string();
    assert!(err.contains("context holds 256"), "{err}");
    let err = h.submit(greedy(vec![], 1)).err().unwrap().to_string();
    assert!(err.contains("empty"), "{err}");
    let mut bad = greedy(vec![1, 2], 4);
    bad.sampling.temperature = -1.0;
    assert!(h.submit(bad).err().unwrap().to_string().contains("temperature"));
    // A request that fits still runs after the refusals.
    assert_eq!(collect(h.submit(greedy(vec![1, 2, 3], 4)).unwrap()).tokens.len(), 4);
    // Without max_tokens a request may grow to the whole context, which this cache cannot hold.
    let mut open_ended = greedy(vec![1, 2, 3], 1);
    open_ended.max_tokens = None;
    assert!(h.submit(open_ended).err().unwrap().to_string().contains("cannot fit"));
    let small = EngineConfig { kv_cache_bytes: Some(per_block), max_context_len: Some(256), ..EngineConfig::default() };
    let err = Engine::start(tiny::model(), common::compute(), small).err().unwrap().to_string();
    assert!(err.contains("at least 2"), "{err}");
}

#[test]
fn sliding_window_blocks_are_released_without_changing_output() {
    let mut w = tiny::writer();
    w.set("llama.attention.sliding_window", Value::U32(24));
    let model = Arc::new(tiny::build(&w).unwrap());
    let p = prompts(1, 70).remove(0);
    let mut s = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
    let direct = s.generate(&greedy(p.clone(), 30), &AtomicBool::new(false), |_| {}).unwrap();
    let h = engine(Arc::clone(&model), EngineConfig::default());
    let mut stream = h.submit(greedy(p, 30)).unwrap();
    let mut tokens = vec![];
    let mut max_blocks_held = 0;
    for e in &mut stream {
        max_blocks_held = max_blocks_held.max(h.stats().blocks.first().map_or(0, |b| b.in_use));
        match e {
            Event::Token { id, .. } => tokens.push(id),
            _ => break,
        }
    }
    assert_eq!(tokens, direct.tokens);
    // 100 tokens would need 7 blocks of 16; a 24-token window needs at most 3 at a time.
    assert!(max_blocks_held <= 3, "held {max_blocks_held} blocks");
    wait_until_drained(&h);
}

#[test]
fn gemma3_long_sequence_through_the_engine_matches_the_session() {
    let model = common::model("gemma3");
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let p = model.encode_raw(&text);
    assert!(p.len() > 540, "the prompt must pass the 512-token window");
    let mut s = Session::new(Arc::clone(&model), common::compute(), 1024).unwrap();
    let direct = s.generate(&greedy(p.clone(), 8), &AtomicBool::new(false), |_| {}).unwrap();
    let h = engine(model, EngineConfig::default());
    let out = collect(h.submit(greedy(p, 8)).unwrap());
    assert_eq!(out.tokens, direct.tokens);
    wait_until_drained(&h);
}

/// Text and tokens of each of a request's completions.
fn collect_n(stream: RequestStream, n: usize) -> Vec<(Vec<u32>, String, FinishReason)> {
    let mut out = vec![(vec![], String::new(), FinishReason::Cancelled); n];
    let mut done = 0;
    for e in stream {
        match e {
            Event::Token { index, id, text, .. } => {
                out[index].0.push(id);
                out[index].1.push_str(&text);
            }
            Event::Done { index, finish, tail, .. } => {
                out[index].1.push_str(&tail);
                out[index].2 = finish;
                done += 1;
            }
            Event::Failed(m) => panic!("{m}"),
            Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    assert_eq!(done, n, "every completion ends");
    out
}

#[test]
fn n_completions_share_the_prompt_and_sample_independently() {
    let model = tiny::model();
    let h = engine(Arc::clone(&model), EngineConfig::default());
    let prompt = prompts(1, 45).remove(0);
    // Greedy: all completions agree with a single request.
    let single = collect(h.submit(greedy(prompt.clone(), 12)).unwrap());
    let mut req = greedy(prompt.clone(), 12);
    req.n = 3;
    for (tokens, _, finish) in collect_n(h.submit(req).unwrap(), 3) {
        assert_eq!(tokens, single.tokens);
        assert_eq!(finish, FinishReason::Length);
    }
    // Seeded sampling: completion 0 equals a single request with the seed, others differ.
    let mut sampled = greedy(prompt.clone(), 16);
    sampled.sampling = SamplingParams { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(11), ..SamplingParams::default() };
    let alone = collect(h.submit(sampled.clone()).unwrap());
    sampled.n = 4;
    let choices = collect_n(h.submit(sampled.clone()).unwrap(), 4);
    assert_eq!(choices[0].0, alone.tokens);
    assert!(choices[1..].iter().any(|c| c.0 != choices[0].0), "different completions draw differently");
    assert_eq!(choices, collect_n(h.submit(sampled).unwrap(), 4), "same seed, same completions");
    wait_until_drained(&h);
}

#[test]
fn n_completions_wait_for_room_when_the_cache_is_full_at_the_fork() {
    let model = tiny::model();
    let prompt = prompts(1, 45).remove(0);
    let single = collect(engine(Arc::clone(&model), EngineConfig::default()).submit(greedy(prompt.clone(), 12)).unwrap());
    // Five blocks of 16: the 45-token prompt takes three, so at most two of the three copies
    // of its partly filled last block find a free block; the rest wait for one.
    let per_block = 16 * 2 * tiny::KV_HEADS * (tiny::HIDDEN / tiny::HEADS) * 2 * tiny::LAYERS;
    let cfg = EngineConfig { kv_cache_bytes: Some(5 * per_block), max_context_len: Some(64), ..EngineConfig::default() };
    let h = engine(model, cfg);
    let mut req = greedy(prompt, 12);
    req.n = 4;
    for (tokens, _, finish) in collect_n(h.submit(req).unwrap(), 4) {
        assert_eq!(tokens, single.tokens);
        assert_eq!(finish, FinishReason::Length);
    }
    wait_until_drained(&h);
}

#[test]
fn logprobs_and_logit_bias_are_applied() {
    let h = engine(tiny::model(), EngineConfig::default());
    let mut req = greedy(prompts(1, 10).remove(0), 6);
    req.logprobs = true;
    req.top_logprobs = 3;
    for e in h.submit(req.clone()).unwrap() {
        if let Event::Token { id, logprob, top_logprobs, .. } = e {
            let lp = logprob.unwrap();
            assert!(lp <= 0.0);
            assert_eq!(top_logprobs.len(), 3);
            assert_eq!(top_logprobs[0].0, id, "greedy picks the likeliest token");
            assert!((top_logprobs[0].1 - lp).abs() < 1e-6);
            assert!(top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
    req.logprobs = false;
    req.sampling.logit_bias = vec![(42, 100.0)];
    let out = collect(h.submit(req).unwrap());
    assert!(out.tokens.iter().all(|&t| t == 42), "{:?}", out.tokens);
    let mut bad = greedy(vec![1, 2], 2);
    bad.sampling.logit_bias = vec![(10_000, 1.0)];
    assert!(h.submit(bad).err().unwrap().to_string().contains("10000"));
}
