//! kiln against llama.cpp on the two real models: tokenizer ids, greedy continuations,
//! teacher-forced logits and chat rendering (goldens made by scripts/goldens/make_goldens.py).

mod common;

use common::{golden, ids, model, session};
use kiln_shared::chat::ChatMessage;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::GenerationRequest;
use std::sync::atomic::AtomicBool;

fn tokenizer_matches(name: &str) {
    let g = golden(name);
    let m = model(name);
    let cases = g["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 300, "corpus too small");
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let plain = m.tokenizer.encode(text, false, false);
        let raw = m.encode_raw(text);
        if plain != ids(&case["plain"]) || raw != ids(&case["raw"]) {
            failures.push(format!("{text:?}: kiln {plain:?} / {raw:?}, llama.cpp {} / {}", case["plain"], case["raw"]));
        }
        assert_eq!(m.tokenizer.decode(&plain, false), text, "decode(encode(x)) != x for {text:?}");
    }
    assert!(failures.is_empty(), "{} of {} strings differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

fn greedy_matches(name: &str) {
    let g = golden(name);
    let m = model(name);
    let mut s = session(name, 256);
    for case in g["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let prompt_ids = m.encode_raw(prompt);
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "prompt tokens for {prompt:?}");
        let req = GenerationRequest {
            prompt: prompt_ids,
            sampling: SamplingParams::greedy(),
            max_tokens: Some(32),
            stop: vec![],
            ignore_eos: true,
            logprobs: false,
            ..Default::default()
        };
        let out = s.generate(&req, &AtomicBool::new(false), |_| {}).unwrap();
        assert_eq!(out.tokens, ids(&case["generated"]), "greedy continuation of {prompt:?}");
    }
}

fn logits_match(name: &str) {
    let g = golden(name);
    let tokens = ids(&g["logits"]["ids"]);
    assert!(tokens.len() >= 256);
    let vocab = model(name).model.config().vocab_size;
    let mut s = session(name, tokens.len() + 1);
    let logits = s.score(&tokens).unwrap();
    let positions = g["logits"]["positions"].as_array().unwrap();
    let (mut agree, mut max_logit_gap, mut max_logprob_gap, mut differing) = (0usize, 0f32, 0f64, Vec::new());
    for (p, (row, pos)) in logits.chunks(vocab).zip(positions).enumerate() {
        let top = ids(&pos["top_ids"]);
        let kiln_top = kiln_worker::sampler::select::argmax(row);
        agree += usize::from(kiln_top == top[0]);
        // The goldens hold llama.cpp's f32 logits as JSON numbers, which read back exactly.
        for (&id, want) in top.iter().zip(pos["top_logits"].as_array().unwrap()) {
            let want = want.as_f64().unwrap() as f32;
            max_logit_gap = max_logit_gap.max((row[id as usize] - want).abs());
            if row[id as usize].to_bits() != want.to_bits() {
                differing.push(format!("position {p} token {id}: kiln {} vs llama.cpp {want}", row[id as usize]));
            }
        }
        let lp = kiln_worker::sampler::select::log_prob(row, top[0]) as f64;
        max_logprob_gap = max_logprob_gap.max((lp - pos["top1_logprob"].as_f64().unwrap()).abs());
    }
    eprintln!("{name}: top-1 agreement {agree}/{} , max |Δlogit| {max_logit_gap:.2e}, max |Δ log p(top)| {max_logprob_gap:.2e}", positions.len());
    // kiln sums in llama.cpp's order, so every logit is the same f32, bit for bit.
    assert!(differing.is_empty(), "{name}: {} logits differ from llama.cpp's:\n{}", differing.len(), differing.join("\n"));
    assert_eq!(agree, positions.len(), "top-1 agreement");
}

fn chat_matches(name: &str) {
    let g = golden(name);
    let m = model(name);
    let messages: Vec<ChatMessage> = serde_json::from_value(g["chat"]["messages"].clone()).unwrap();
    assert_eq!(m.render_chat(&messages).unwrap(), g["chat"]["rendered"].as_str().unwrap());
    assert_eq!(m.encode_chat(&messages).unwrap(), ids(&g["chat"]["ids"]));
    let question = [ChatMessage::new("user", g["chat"]["question"].as_str().unwrap())];
    assert_eq!(m.encode_chat(&question).unwrap(), ids(&g["chat"]["question_ids"]));
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    tokenizer_matches("smollm2");
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    greedy_matches("smollm2");
}

#[test]
fn smollm2_logits_match_llama_cpp() {
    logits_match("smollm2");
}

#[test]
fn smollm2_chat_rendering_matches_reference() {
    chat_matches("smollm2");
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    tokenizer_matches("gemma3");
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    greedy_matches("gemma3");
}

#[test]
fn gemma3_logits_match_llama_cpp() {
    logits_match("gemma3");
}

#[test]
fn gemma3_chat_rendering_matches_reference() {
    chat_matches("gemma3");
}
