//! A hostile or damaged GGUF file must give an error that names the problem, never a panic,
//! a hang (each mutated header is parsed or refused within a second) or a huge allocation. The real SmolLM2 header is truncated and mutated here.

mod common;

use kiln_worker::formats::gguf::GgufFile;
use kiln_worker::Error;

use kiln_worker::sampler::Rng;

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// The real file's bytes and where its tensor data starts.
fn real_file() -> (Vec<u8>, usize) {
    let path = kiln_worker::assets::resolve("smollm2", &mut |m| eprintln!("test: {m}")).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    let data_start = gguf.tensors().iter().map(|t| t.file_offset).min().unwrap() as usize;
    (bytes, data_start)
}

#[test]
fn intact_file_parses() {
    let (bytes, _) = real_file();
    let g = GgufFile::from_bytes("smollm2", &bytes).unwrap();
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(g.string("general.architecture").unwrap(), "llama");
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let (bytes, data_start) = real_file();
    let mut rng = Rng::seeded(0x5eed);
    let mut cuts: Vec<usize> = (0..40).collect();
    cuts.extend((0..300).map(|_| below(&mut rng, data_start)));
    cuts.extend((0..20).map(|_| data_start + below(&mut rng, bytes.len() - data_start)));
    for cut in cuts {
        let err = GgufFile::from_bytes("cut.gguf", &bytes[..cut]).err().unwrap_or_else(|| panic!("truncation at {cut} parsed"));
        let msg = err.to_string();
        assert!(!msg.is_empty());
        if cut >= data_start {
            assert!(matches!(err, Error::Tensor { .. }), "cut {cut}: {msg}");
            assert!(msg.contains("truncated"), "cut {cut}: {msg}");
        }
    }
}

#[test]
fn mutated_headers_never_panic_or_hang() {
    let (bytes, data_start) = real_file();
    let mut rng = Rng::seeded(0xfeed);
    for round in 0..400 {
        // The header alone: tensor data would only be copied, never read, by the parser.
        let mut m = bytes[..data_start].to_vec();
        // A few random byte changes, biased to the front where counts and lengths live.
        for _ in 0..1 + below(&mut rng, 4) {
            let limit = if below(&mut rng, 2) == 0 { 4096 } else { data_start };
            let at = below(&mut rng, limit);
            m[at] = match below(&mut rng, 3) {
                0 => rng.next_u64() as u8,
                1 => 0xFF,
                _ => m[at] ^ (1 << below(&mut rng, 8)),
            };
        }
        let start = std::time::Instant::now();
        let result = std::panic::catch_unwind(|| GgufFile::from_bytes("mutated.gguf", &m).map(|g| g.tensors().len()));
        assert!(result.is_ok(), "round {round}: parsing panicked");
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(1), "round {round}: parsing took {took:?}");
    }
}

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

#[test]
fn hostile_counts_and_lengths_are_rejected() {
    let header = |tensors: u64, kvs: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&le64(tensors));
        b.extend_from_slice(&le64(kvs));
        b
    };
    let e = GgufFile::from_bytes("x", &header(u64::MAX, 0)).unwrap_err().to_string();
    assert!(e.contains("tensor count"), "{e}");
    let e = GgufFile::from_bytes("x", &header(0, u64::MAX)).unwrap_err().to_string();
    assert!(e.contains("metadata count"), "{e}");

    // One key whose string value claims 2^62 bytes.
    let mut b = header(0, 1);
    b.extend_from_slice(&le64(3));
    b.extend_from_slice(b"key");
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&le64(1 << 62));
    b.extend_from_slice(&[0; 64]);
    let e = GgufFile::from_bytes("x", &b).unwrap_err().to_string();
    assert!(e.contains("string length") && e.contains("value of `key`"), "{e}");

    // An array claiming 2^60 u64 elements.
    let mut b = header(0, 1);
    b.extend_from_slice(&le64(3));
    b.extend_from_slice(b"arr");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&10u32.to_le_bytes());
    b.extend_from_slice(&le64(1 << 60));
    b.extend_from_slice(&[0; 64]);
    let e = GgufFile::from_bytes("x", &b).unwrap_err().to_string();
    assert!(e.contains("array of"), "{e}");

    // A tensor with too many dimensions, and one with an unknown type.
    let tensor = |dims: &[u64], type_id: u32, offset: u64| {
        let mut b = header(1, 0);
        b.extend_from_slice(&le64(1));
        b.extend_from_slice(b"t");
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for &d in dims {
            b.extend_from_slice(&le64(d));
        }
        b.extend_from_slice(&type_id.to_le_bytes());
        b.extend_from_slice(&le64(offset));
        b.resize(b.len().div_ceil(32) * 32 + 64, 0);
        b
    };
    let e = GgufFile::from_bytes("x", &tensor(&[1; 9], 0, 0)).unwrap_err().to_string();
    assert!(e.contains("9 dimensions"), "{e}");
    let e = GgufFile::from_bytes("x", &tensor(&[32], 16, 0)).unwrap_err().to_string();
    assert!(e.contains("IQ2_XXS") && e.contains("`t`"), "{e}");
    let e = GgufFile::from_bytes("x", &tensor(&[u64::MAX, u64::MAX], 0, 0)).unwrap_err().to_string();
    assert!(e.contains("overflow") || e.contains("too large"), "{e}");
    let e = GgufFile::from_bytes("x", &tensor(&[16], 0, 1 << 40)).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = GgufFile::from_bytes("x", &tensor(&[33], 2, 0)).unwrap_err().to_string();
    assert!(e.contains("multiple of the Q4_0 block size"), "{e}");
    assert!(GgufFile::from_bytes("x", &tensor(&[16], 0, 0)).is_ok());
}

#[test]
fn not_gguf_files_are_named_as_such() {
    let e = GgufFile::from_bytes("notes.txt", b"hello, this is text").unwrap_err();
    assert!(matches!(e, Error::NotGguf { .. }), "{e}");
    let mut v1 = b"GGUF".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    let e = GgufFile::from_bytes("old.gguf", &v1).unwrap_err().to_string();
    assert!(e.contains("version 1"), "{e}");
    let mut be = b"GGUF".to_vec();
    be.extend_from_slice(&3u32.to_be_bytes());
    let e = GgufFile::from_bytes("be.gguf", &be).unwrap_err().to_string();
    assert!(e.contains("big-endian"), "{e}");
    let e = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}
