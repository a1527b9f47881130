//! tokenizer.json files with the Llama 3 and Qwen 2 regex splitters encode exactly like the
//! `tokenizers` package (goldens from scripts/goldens/make_tokenizer_goldens.py), and
//! decoding gives the text back.

mod common;

use kiln_shared::tokenizer::Tokenizer;

#[test]
fn regex_splitters_encode_like_the_tokenizers_package() {
    let golden = common::golden("hf_tokenizers");
    for (name, g) in golden.as_object().unwrap() {
        let dir = std::env::temp_dir().join(format!("kiln-tok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), g["tokenizer"].to_string()).unwrap();
        let (spec, _) = kiln_worker::formats::hf_tokenizer::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::remove_dir_all(&dir).unwrap();
        let tok = Tokenizer::new(spec).unwrap();
        let cases = g["cases"].as_array().unwrap();
        let mut bad = Vec::new();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text, false, true);
            if got != common::ids(&case["ids"]) {
                bad.push(format!("{text:?}: got {got:?}, want {}", case["ids"]));
            } else if tok.decode(&got, true) != text {
                bad.push(format!("{text:?}: decodes to {:?}", tok.decode(&got, true)));
            }
        }
        assert!(bad.is_empty(), "{name}: {} of {} strings differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
    }
}
