//! One tiny random-weight Llama/Mistral-shaped checkpoint per tokenizer.json kind
//! (worker/tests/fixtures/hf/tok-*, made by scripts/goldens/make_tokenizer_checkpoints.py)
//! against transformers: the prompt's ids, the greedy tokens, their text (alone, and as what
//! they add after the prompt), and the chat prompt rendered and tokenized.

mod common;

use kiln_shared::chat::ChatMessage;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{GenerationRequest, Session};
use kiln_worker::loader::LoadedModel;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn check(kind: &str) {
    let name = format!("tok-{kind}");
    let dir = common::hf_fixture(&name);
    let reference = common::hf_reference(&name);
    let model = Arc::new(LoadedModel::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}")));
    let prompt = reference["prompt"].as_str().unwrap();
    let ids = common::ids(&reference["ids"]);
    assert_eq!(model.tokenizer.encode(prompt, true, true), ids, "{name}: prompt token ids");

    let greedy = common::ids(&reference["greedy"]);
    let req = GenerationRequest { prompt: ids, sampling: SamplingParams::greedy(), max_tokens: Some(greedy.len()), ignore_eos: true, ..Default::default() };
    let mut session = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
    let mut streamed = String::new();
    let out = session.generate(&req, &AtomicBool::new(false), |piece| streamed.push_str(piece)).unwrap();
    assert_eq!(out.tokens, greedy, "{name}: greedy tokens");
    assert_eq!(model.tokenizer.decode(&out.tokens, false), reference["greedy_text"].as_str().unwrap(), "{name}: decoded greedy text");
    let continuation = reference["continuation_text"].as_str().expect("the reference decodes the prompt as a prefix of prompt + completion");
    assert_eq!(out.text, continuation, "{name}: completion text after the prompt");
    assert_eq!(streamed, continuation, "{name}: streamed completion text");

    // A stop string spanning several tokens ends the text right before its first occurrence.
    let chars: Vec<char> = continuation.chars().collect();
    if chars.len() >= 8 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
        let req = GenerationRequest { stop: vec![stop.clone()], ..req };
        let mut session = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
        let out = session.generate(&req, &AtomicBool::new(false), |_| {}).unwrap();
        let cut = continuation.find(&stop).unwrap();
        assert_eq!(out.text, continuation[..cut], "{name}: text before the stop string {stop:?}");
    }

    let messages: Vec<ChatMessage> = serde_json::from_value(reference["chat"].clone()).unwrap();
    assert_eq!(model.render_chat(&messages).unwrap(), reference["chat_text"].as_str().unwrap(), "{name}: rendered chat");
    assert_eq!(model.encode_chat(&messages).unwrap(), common::ids(&reference["chat_ids"]), "{name}: chat token ids");
}

#[test]
fn sentencepiece_style_bpe_with_a_normalizer_matches_transformers() {
    check("spm_bpe_normalizer");
}

#[test]
fn sentencepiece_style_bpe_with_metaspace_matches_transformers() {
    check("spm_bpe_metaspace");
}

#[test]
fn unigram_matches_transformers() {
    check("unigram");
}

#[test]
fn word_level_matches_transformers() {
    check("word_level");
}

#[test]
fn word_piece_matches_transformers() {
    check("word_piece");
}

#[test]
fn bpe_without_a_pre_tokenizer_matches_transformers() {
    check("bpe_no_pre_tokenizer");
}

#[test]
fn byte_level_bpe_with_added_tokens_matches_transformers() {
    check("byte_level_added");
}
