//! Damaged or hostile Hugging Face files — safetensors headers, tokenizer.json, config.json
//! and chat templates, truncated and mutated at random — load or give an error within a
//! second each, never a panic or a hang; hostile templates (endless loops, deep recursion,
//! huge strings) stop with an error.

mod common;

use kiln_shared::chat::{ChatMessage, ChatTemplate};
use kiln_worker::formats::safetensors::SafetensorsFile;
use kiln_worker::sampler::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(1);

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// Truncations at random points (and the first bytes), then random byte changes.
fn damaged(original: &[u8], seed: u64, rounds: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::seeded(seed);
    let mut out: Vec<Vec<u8>> = (0..16.min(original.len())).map(|n| original[..n].to_vec()).collect();
    out.extend((0..rounds).map(|_| original[..below(&mut rng, original.len())].to_vec()));
    for _ in 0..rounds {
        let mut m = original.to_vec();
        for _ in 0..1 + below(&mut rng, 4) {
            let at = below(&mut rng, m.len());
            m[at] = match below(&mut rng, 4) {
                0 => rng.next_u64() as u8,
                1 => b"{}[]\",:0-9e"[below(&mut rng, 11)],
                2 => 0xFF,
                _ => m[at] ^ (1 << below(&mut rng, 8)),
            };
        }
        out.push(m);
    }
    out
}

/// Runs `f` on every damaged copy: no panic, and each within the limit. Returns how many
/// were accepted.
fn survive(what: &str, copies: &[Vec<u8>], f: impl Fn(&[u8]) -> bool) -> usize {
    let mut accepted = 0;
    for (i, copy) in copies.iter().enumerate() {
        let start = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| f(copy)));
        let took = start.elapsed();
        assert!(r.is_ok(), "{what} copy {i}: panicked");
        assert!(took < LIMIT, "{what} copy {i}: took {took:?}");
        accepted += usize::from(r.unwrap_or(false));
    }
    eprintln!("{what}: {} damaged copies, {accepted} still accepted, every one answered within {LIMIT:?}", copies.len());
    accepted
}

fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-robust-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn damaged_safetensors_headers_are_errors() {
    let original = std::fs::read(common::hf_fixture("llama").join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let dir = scratch_dir("st");
    let path = dir.join("model.safetensors");
    // Damage the length prefix and the JSON header; the tensor data follows unchanged.
    let copies: Vec<Vec<u8>> = damaged(&original[..8 + header_len], 0x57, 150)
        .into_iter()
        .map(|mut h| {
            h.extend_from_slice(&original[(8 + header_len).min(original.len())..]);
            h
        })
        .collect();
    survive("safetensors header", &copies, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        SafetensorsFile::open(&path).is_ok()
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_tokenizer_json_is_an_error_or_still_tokenizes() {
    let fixture = common::hf_fixture("tok-spm_bpe_normalizer");
    let original = std::fs::read(fixture.join("tokenizer.json")).unwrap();
    let dir = scratch_dir("tok");
    let accepted = survive("tokenizer.json", &damaged(&original, 0x70, 150), |bytes| {
        std::fs::write(dir.join("tokenizer.json"), bytes).unwrap();
        match kiln_worker::formats::hf_tokenizer::load(&dir) {
            Ok((tok, _)) => {
                let ids = tok.encode("Hello, wörld! 🤖 <s>", true, true);
                let _ = tok.decode(&ids, false);
                true
            }
            Err(e) => {
                assert!(e.to_string().contains("tokenizer.json"), "{e}");
                false
            }
        }
    });
    assert!(accepted > 0, "some damage (inside strings) leaves a usable tokenizer");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_config_json_is_an_error_naming_the_file() {
    let original = std::fs::read(common::hf_fixture("llama").join("config.json")).unwrap();
    survive("config.json", &damaged(&original, 0xC0, 200), |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else { return false };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return false };
        kiln_worker::models::hf_config::from_hf(&value, "damaged").is_ok()
    });
    // Through the loader, a damaged file is named.
    let dir = common::copy_hf_fixture("llama", "robust-config");
    std::fs::write(dir.join("config.json"), &original[..original.len() / 2]).unwrap();
    let e = kiln_worker::loader::LoadedModel::load(&dir).err().expect("half a config.json").to_string();
    assert!(e.contains("config.json"), "{e}");
}

fn conversation() -> Vec<ChatMessage> {
    vec![ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi"), ChatMessage::new("assistant", "Hello"), ChatMessage::new("user", "Bye")]
}

#[test]
fn damaged_chat_templates_are_errors_or_render() {
    let path = kiln_worker::assets::resolve("gemma3", &mut |m| eprintln!("test: {m}")).unwrap();
    let source = kiln_worker::loader::LoadedModel::load(&path).unwrap().chat_template_source.clone();
    survive("chat template", &damaged(source.as_bytes(), 0x7E, 200), |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else { return false };
        match ChatTemplate::new(text, "<bos>", "<eos>") {
            Ok(t) => t.render(&conversation(), true).is_ok(),
            Err(_) => false,
        }
    });
}

#[test]
fn hostile_templates_stop_with_an_error() {
    let cases = [
        ("nested loops of 10^10 steps", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
        ("endless recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        ("a string of 4 GB", "{{ 'x' * 4000000000 }}"),
        ("a loop over a huge range", "{% for i in range(10 ** 12) %}{% endfor %}"),
    ];
    for (what, source) in cases {
        let start = Instant::now();
        let result = ChatTemplate::new(source, "", "").and_then(|t| t.render(&conversation(), true));
        let took = start.elapsed();
        let err = result.expect_err(what).to_string();
        eprintln!("{what}: refused in {took:?}: {err}");
        assert!(took < LIMIT, "{what}: took {took:?}");
    }
}
