//! tokenizer.json files of every kind encode and decode exactly like the Python `tokenizers`
//! package (goldens from scripts/goldens/make_tokenizer_goldens.py and
//! make_tokenizer_kinds.py): ids with and without special tokens and with special tokens
//! taken as text, whole decodes, and decodes streamed token by token, also after a prompt.

mod common;

use kiln_shared::tokenizer::{StreamDecoder, Tokenizer};

fn load(name: &str, tokenizer_json: &serde_json::Value) -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("kiln-tok-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json.to_string()).unwrap();
    let loaded = kiln_worker::formats::hf_tokenizer::load(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let (tok, _) = loaded.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(tok.is_hugging_face(), "{name}: tokenizer.json must run through the tokenizers crate");
    tok
}

fn streamed(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> String {
    let mut decoder = if prompt.is_empty() { StreamDecoder::new() } else { StreamDecoder::after(prompt) };
    let mut text: String = ids.iter().map(|&id| decoder.push(tok, id, false)).collect();
    text.push_str(&decoder.finish_with(tok, false));
    text
}

#[test]
fn regex_splitters_encode_like_the_tokenizers_package() {
    let golden = common::golden("hf_tokenizers");
    for (name, g) in golden.as_object().unwrap() {
        let tok = load(name, &g["tokenizer"]);
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

#[test]
fn every_tokenizer_kind_matches_the_tokenizers_package() {
    let golden = common::golden("hf_tokenizer_kinds");
    let kinds = golden.as_object().unwrap();
    assert!(kinds.len() >= 7, "the golden file lost tokenizer kinds: {:?}", kinds.keys().collect::<Vec<_>>());
    for (name, g) in kinds {
        let tok = load(name, &g["tokenizer"]);
        // What a router builds from the worker's ModelInfo behaves the same.
        let wire = serde_json::to_string(&tok.wire_spec()).unwrap();
        let remote = Tokenizer::new(serde_json::from_str(&wire).unwrap()).unwrap();
        assert_eq!(remote.spec().tokens, tok.spec().tokens, "{name}: vocabulary differs after the wire");

        let cases = g["cases"].as_array().unwrap();
        let mut bad = Vec::new();
        let mut continued = 0;
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let ids = common::ids(&case["ids"]);
            let checks = [
                ("ids", tok.encode(text, false, true), &case["ids"]),
                ("ids with special tokens", remote.encode(text, true, true), &case["ids_special"]),
                ("ids with special tokens as text", tok.encode(text, false, false), &case["ids_literal"]),
            ];
            for (what, got, want) in checks {
                if got != common::ids(want) {
                    bad.push(format!("{text:?} {what}: got {got:?}, want {want}"));
                }
            }
            let decoded = case["decoded"].as_str().unwrap();
            for (what, got, want) in [
                ("decode", tok.decode(&ids, false), decoded),
                ("decode with special tokens", tok.decode(&ids, true), case["decoded_special"].as_str().unwrap()),
                ("streamed decode", streamed(&tok, &[], &ids), decoded),
                ("streamed decode on the router's copy", streamed(&remote, &[], &ids), decoded),
            ] {
                if got != want {
                    bad.push(format!("{text:?} {what}: got {got:?}, want {want:?}"));
                }
            }
            // A completion after a prompt adds what decoding prompt and completion together
            // adds to the prompt's text (a leading space stays).
            let cut = ids.len() / 2;
            let head = tok.decode(&ids[..cut], false);
            if cut > 0 && decoded.starts_with(&head) {
                continued += 1;
                let got = streamed(&tok, &ids[..cut], &ids[cut..]);
                if got != decoded[head.len()..] {
                    bad.push(format!("{text:?} streamed after {cut} prompt tokens: got {got:?}, want {:?}", &decoded[head.len()..]));
                }
            }
        }
        eprintln!("{name}: {} strings, {continued} also streamed after a prompt", cases.len());
        assert!(continued > cases.len() / 2, "{name}: too few strings split into prompt and completion ({continued})");
        assert!(bad.is_empty(), "{name}: {} mismatches over {} strings:\n{}", bad.len(), cases.len(), bad.join("\n"));
    }
}
