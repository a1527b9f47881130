//! A damaged Hugging Face directory fails with an error that names what is wrong: missing
//! config fields, an unknown architecture (listing the supported ones), a tensor of the
//! wrong shape, a missing tensor, a tokenizer.json that does not parse.

mod common;

use kiln_worker::loader::LoadedModel;
use std::path::{Path, PathBuf};

fn copy_fixture(tag: &str) -> PathBuf {
    common::copy_hf_fixture("llama", tag)
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn load_error(dir: &Path) -> String {
    let e = LoadedModel::load(dir).err().map(|e| e.to_string()).unwrap_or_else(|| "loaded".into());
    let _ = std::fs::remove_dir_all(dir);
    e
}

type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn config_problems_name_the_field() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("nohidden", Box::new(|v| drop(v.as_object_mut().unwrap().remove("hidden_size"))), "config.json: hidden_size`: is missing"),
        ("badheads", Box::new(|v| v["num_key_value_heads"] = 3.into()), "does not divide the 4 attention heads"),
        ("badtype", Box::new(|v| v["num_hidden_layers"] = "two".into()), "num_hidden_layers`: \"two\" is not a non-negative integer"),
        ("arch", Box::new(|v| v["architectures"] = serde_json::json!(["FalconForCausalLM"])), "unsupported architecture `FalconForCausalLM`"),
        ("act", Box::new(|v| v["hidden_act"] = "relu".into()), "`relu` is not supported"),
        ("rope", Box::new(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})), "RoPE scaling `yarn`"),
    ];
    for (tag, edit, expected) in cases {
        let dir = copy_fixture(tag);
        edit_json(&dir.join("config.json"), edit);
        let e = load_error(&dir);
        assert!(e.contains(expected), "{tag}: `{e}` should contain `{expected}`");
    }
    let dir = copy_fixture("arch-list");
    edit_json(&dir.join("config.json"), |v| v["architectures"] = serde_json::json!(["FalconForCausalLM"]));
    let e = load_error(&dir);
    for supported in ["LlamaForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"] {
        assert!(e.contains(supported), "the error lists {supported}: {e}");
    }
}

#[test]
fn wrong_or_missing_tensors_are_named() {
    let dir = copy_fixture("shape");
    edit_json(&dir.join("config.json"), |v| v["intermediate_size"] = 96.into());
    let e = load_error(&dir);
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[64, 128]") && e.contains("[64, 96]"), "{e}");

    let dir = copy_fixture("missing");
    edit_json(&dir.join("config.json"), |v| v["num_hidden_layers"] = 3.into());
    let e = load_error(&dir);
    assert!(e.contains("model.layers.2.") && e.contains("is missing from the model file"), "{e}");

    let dir = copy_fixture("noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("neither model.safetensors nor model.safetensors.index.json"), "{e}");

    let dir = copy_fixture("truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn tokenizer_problems_are_specific() {
    let dir = copy_fixture("tokjson");
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let e = load_error(&dir);
    assert!(e.contains("tokenizer.json") && e.contains("not valid JSON"), "{e}");

    let dir = copy_fixture("tokmodel");
    edit_json(&dir.join("tokenizer.json"), |v| v["model"]["type"] = "Unigram".into());
    let e = load_error(&dir);
    assert!(e.contains("tokenizer.json") && e.contains("not a tokenizer the tokenizers library reads"), "{e}");

    let dir = copy_fixture("tokpre");
    edit_json(&dir.join("tokenizer.json"), |v| v["pre_tokenizer"] = serde_json::json!({"type": "NoSuchSplitter"}));
    let e = load_error(&dir);
    assert!(e.contains("tokenizer.json") && e.contains("NoSuchSplitter"), "{e}");

    let dir = copy_fixture("tokeos");
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 99999]}"#).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("eos_token_id 99999 is outside the vocabulary"), "{e}");

    let dir = copy_fixture("tokbos");
    edit_json(&dir.join("tokenizer_config.json"), |v| v["bos_token"] = "<nope>".into());
    let e = load_error(&dir);
    assert!(e.contains("bos_token `<nope>` is not in the vocabulary"), "{e}");

    let dir = copy_fixture("noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load_error(&dir);
    assert!(e.contains("config.json"), "{e}");
}

/// A chat template kiln cannot render (a syntax error, or a Jinja2 feature kiln does not
/// emulate) does not stop the model from loading: raw prompts still work, and chat requests
/// fail with an error naming the problem.
#[test]
fn unusable_chat_templates_fail_chat_only() {
    for (tag, template, needle) in [
        ("tplsyntax", "{% for %}", "does not parse"),
        ("tplmarkup", "{{ 'a' | safe + messages[0]['content'] }}", "Markup concatenation"),
    ] {
        let dir = copy_fixture(tag);
        edit_json(&dir.join("tokenizer_config.json"), |v| v["chat_template"] = template.into());
        let model = LoadedModel::load(&dir).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!model.encode_raw("The quick brown fox").is_empty());
        let e = model.encode_chat(&[kiln_shared::chat::ChatMessage::new("user", "hi")]).unwrap_err().to_string();
        assert!(e.contains(needle), "{tag}: {e}");
    }
}
