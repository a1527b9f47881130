//! `kiln-worker quantize`: a Hugging Face checkpoint written as GGUF with quantized
//! projections carries llama.cpp's names and metadata, and kiln reloads it with the outputs
//! the checkpoint gives under `--isq`, bit for bit (for `llama` too, whose q/k rows are
//! reordered for interleaved RoPE).

mod common;

use kiln_kernels::DType;
use kiln_worker::engine::Session;
use kiln_worker::formats::gguf::GgufFile;
use kiln_worker::loader::LoadedModel;
use std::sync::Arc;

fn logits(model: LoadedModel, ids: &[u32]) -> Vec<f32> {
    Session::new(Arc::new(model), common::compute(), 64).unwrap().score(ids).unwrap()
}

fn roundtrip(name: &str, isq: DType, arch: &str) {
    roundtrip_with(name, isq, arch, 14);
}

/// Like `roundtrip`, for a model whose output head is its embedding table.
fn roundtrip_tied(name: &str, isq: DType, arch: &str) {
    let dir = common::hf_fixture(name);
    let reference = common::hf_reference(name);
    let ids = common::ids(&reference["ids"]);
    let out = std::env::temp_dir().join(format!("kiln-export-{name}-{}.gguf", std::process::id()));
    let written = kiln_worker::formats::gguf_export::export(&dir, isq, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(written.architecture, arch);
    assert!(GgufFile::open(&out).unwrap().tensor("output.weight").is_none(), "a tied head is not written twice");
    let a = logits(LoadedModel::load(&out).unwrap(), &ids);
    let b = logits(LoadedModel::load_quantized(&dir, Some(isq)).unwrap(), &ids);
    assert_eq!(a, b, "{name}: reloaded GGUF and --isq give the same logits");
    std::fs::remove_file(&out).unwrap();
}

fn roundtrip_with(name: &str, isq: DType, arch: &str, projections: usize) {
    let dir = common::hf_fixture(name);
    let reference = common::hf_reference(name);
    let ids = common::ids(&reference["ids"]);
    let out = std::env::temp_dir().join(format!("kiln-export-{name}-{}-{}.gguf", isq.name(), std::process::id()));
    let written = kiln_worker::formats::gguf_export::export(&dir, isq, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(written.architecture, arch);
    assert_eq!(written.isq.quantized, projections, "{name}: every projection");

    let gguf = GgufFile::open(&out).unwrap();
    assert_eq!(gguf.string("general.architecture").unwrap(), arch);
    for key in ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count", "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"] {
        assert!(gguf.get(&format!("{arch}.{key}")).is_some(), "{name}: {arch}.{key}");
    }
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template"] {
        assert!(gguf.get(key).is_some(), "{name}: {key}");
    }
    let tensor = |n: &str| gguf.tensor(n).unwrap_or_else(|| panic!("{name}: tensor {n}"));
    assert_eq!(tensor("token_embd.weight").dtype, DType::F32);
    assert_eq!(tensor("output.weight").dtype, DType::F32);
    assert_eq!(tensor("output_norm.weight").dtype, DType::F32);
    let expected = if written.isq.fallbacks.is_empty() { isq } else { written.isq.fallbacks[0].1 };
    let parts: &[&str] = if arch == "phi3" { &["attn_qkv", "attn_output", "ffn_up", "ffn_down"] } else { &["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] };
    for t in parts {
        assert_eq!(tensor(&format!("blk.1.{t}.weight")).dtype, expected, "{name}: {t}");
    }

    let from_gguf = LoadedModel::load(&out).unwrap();
    assert_eq!(from_gguf.tokenizer.encode(reference["prompt"].as_str().unwrap(), true, true), ids, "{name}: the tokenizer survives");
    let a = logits(from_gguf, &ids);
    let b = logits(LoadedModel::load_quantized(&dir, Some(isq)).unwrap(), &ids);
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    eprintln!("{name} {}: largest logit difference after the GGUF round trip {diff:.2e}", isq.name());
    assert_eq!(diff, 0.0, "{name}: reloaded GGUF and --isq give the same logits");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn qwen2_and_qwen3_reload_bit_for_bit() {
    roundtrip("qwen2", DType::Q8_0, "qwen2");
    roundtrip("qwen2", DType::Q4_0, "qwen2");
    roundtrip("qwen3", DType::Q5_1, "qwen3");
}

#[test]
fn phi3_and_gemma3_reload_bit_for_bit() {
    roundtrip_with("phi3", DType::Q8_0, "phi3", 8);
    roundtrip("gemma3", DType::Q8_0, "gemma3");
    roundtrip_tied("gemma2-tied", DType::Q8_0, "gemma2");
}

#[test]
fn mixtures_of_experts_reload_bit_for_bit() {
    roundtrip_moe("mixtral", "llama", 32);
    // Rows of 48 do not divide into Q8_0 blocks: those down projections stay f32.
    roundtrip_moe("qwen3moe", "qwen3moe", 24);
}

fn roundtrip_moe(name: &str, arch: &str, quantized: usize) {
    let dir = common::hf_fixture(name);
    let reference = common::hf_reference(name);
    let ids = common::ids(&reference["ids"]);
    let out = std::env::temp_dir().join(format!("kiln-export-{name}-{}.gguf", std::process::id()));
    let written = kiln_worker::formats::gguf_export::export(&dir, DType::Q8_0, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!((written.architecture.as_str(), written.isq.quantized), (arch, quantized));
    let gguf = GgufFile::open(&out).unwrap();
    let gate = gguf.tensor("blk.0.ffn_gate_exps.weight").expect("merged experts");
    assert_eq!((gate.dims.len(), gate.dims[2], gate.dtype), (3, 4, DType::Q8_0));
    assert_eq!(gguf.tensor("blk.0.ffn_gate_inp.weight").map(|t| t.dtype), Some(DType::F32), "the router keeps its precision");
    let a = logits(LoadedModel::load(&out).unwrap(), &ids);
    let b = logits(LoadedModel::load_quantized(&dir, Some(DType::Q8_0)).unwrap(), &ids);
    assert_eq!(a, b, "{name}: reloaded GGUF and --isq give the same logits");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn llama_with_k_quants_reloads_with_interleaved_rope() {
    roundtrip("llama-wide", DType::Q4K, "llama");
    roundtrip("llama-wide", DType::Q6K, "llama");
}

#[test]
fn unsupported_exports_say_why() {
    let out = std::env::temp_dir().join(format!("kiln-export-bad-{}.gguf", std::process::id()));
    let e = kiln_worker::formats::gguf_export::export(&common::hf_fixture("mistral"), DType::Q8_0, &out).err().unwrap().to_string();
    assert!(e.contains("sliding-window"), "{e}");
    let e = kiln_worker::formats::gguf_export::export(&common::hf_fixture("gemma2"), DType::Q8_0, &out).err().unwrap().to_string();
    assert!(e.contains("lm_head"), "{e}");
    assert!(!out.exists());
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// A file written from fixture `name` with `isq`, loaded back.
fn written(fixture: &str, isq: DType, tag: &str) -> Arc<LoadedModel> {
    let out = std::env::temp_dir().join(format!("kiln-export-{tag}-{}.gguf", std::process::id()));
    kiln_worker::formats::gguf_export::export(&common::hf_fixture(fixture), isq, &out).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let model = Arc::new(LoadedModel::load(&out).unwrap());
    std::fs::remove_file(&out).unwrap();
    model
}

/// The text of `n` greedy tokens after `prompt`.
fn greedy_text(model: &Arc<LoadedModel>, prompt: Vec<u32>, n: usize) -> String {
    let context = prompt.len() + n + 1;
    let req = kiln_worker::engine::GenerationRequest {
        prompt,
        sampling: kiln_shared::sampling::SamplingParams::greedy(),
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    };
    let mut session = Session::new(Arc::clone(model), common::compute(), context).unwrap();
    let done = session.generate(&req, &std::sync::atomic::AtomicBool::new(false), |_| {}).unwrap();
    model.tokenizer.decode(&done.tokens, false)
}

/// llama.cpp loads the files kiln writes and continues the prompt as kiln does (goldens from
/// scripts/goldens/make_export_goldens.sh: greedy, one token per llama.cpp decode call, as the
/// model goldens are made): every architecture kiln writes as Q8_0, and every quantization
/// type on one fixture.
#[test]
fn llama_cpp_reads_the_written_files_and_agrees() {
    let golden = common::golden("llamacpp_export");
    let models = golden["models"].as_object().unwrap();
    let types: Vec<&str> = models.values().filter(|g| g["fixture"] == "llama-wide").map(|g| g["isq"].as_str().unwrap()).collect();
    assert!(types.len() >= 10, "every quantization type kiln writes is checked: {types:?}");
    let mut differing = Vec::new();
    for (name, g) in models {
        let isq = kiln_worker::loader::parse_isq(g["isq"].as_str().unwrap()).unwrap();
        let model = written(g["fixture"].as_str().unwrap(), isq, name);
        let got = greedy_text(&model, model.encode_raw(g["prompt"].as_str().unwrap()), g["tokens"].as_u64().unwrap() as usize);
        let expected = hex_bytes(g["llama_cpp_hex"].as_str().unwrap());
        // The continuation must vary, or agreeing on it would say little.
        let distinct: std::collections::HashSet<u8> = expected.iter().copied().collect();
        assert!(distinct.len() >= 4, "{name}: llama.cpp's continuation {expected:?} is degenerate");
        let want = String::from_utf8_lossy(&expected);
        if got != want {
            differing.push(format!("{name}: kiln {got:?}, llama.cpp {want:?}"));
        }
    }
    assert!(differing.is_empty(), "{} of {} files continue differently:\n{}", differing.len(), models.len(), differing.join("\n"));
}

/// Checkpoints whose tokenizer.json is SentencePiece-style BPE (written as llama.cpp's `llama`
/// vocabulary with scores) or byte-level BPE with added tokens (`gpt2`): llama.cpp tokenizes
/// each fixture's prompt as transformers does, and kiln, running the written file, gives the
/// same ids and greedy text as llama.cpp (goldens from scripts/goldens/make_export_goldens.sh).
#[test]
fn llama_cpp_reads_written_tokenizers_as_transformers_does() {
    let golden = common::golden("llamacpp_export_tokenizers");
    for (name, g) in golden["models"].as_object().unwrap() {
        let reference = common::hf_reference(name);
        let prompt = reference["prompt"].as_str().unwrap();
        let llama_cpp_ids = common::ids(&g["llama_cpp_ids"]);
        assert_eq!(llama_cpp_ids, common::ids(&reference["ids"]), "{name}: llama.cpp's ids for the written vocabulary equal transformers'");
        let model = written(name, DType::Q8_0, name);
        assert!(!model.tokenizer.is_hugging_face(), "{name}: a GGUF vocabulary runs on kiln's own tokenizer");
        assert_eq!(model.encode_raw(prompt), llama_cpp_ids, "{name}: kiln's ids for the written file");
        let got = greedy_text(&model, llama_cpp_ids, g["tokens"].as_u64().unwrap() as usize);
        let expected = String::from_utf8_lossy(&hex_bytes(g["llama_cpp_hex"].as_str().unwrap())).into_owned();
        assert_eq!(got, expected, "{name}: greedy text");
    }
}
