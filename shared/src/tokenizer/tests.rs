use super::*;

/// A tiny byte-level BPE vocabulary: all 256 byte characters plus a few merges.
fn tiny_bpe() -> Tokenizer {
    let table = bpe::byte_to_char_table();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let merges = vec!["h e".to_string(), "l l".into(), "he ll".into(), "hell o".into(), "Ġ w".into()];
    for m in ["he", "ll", "hell", "hello", "Ġw"] {
        tokens.push(m.into());
    }
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut kinds = vec![TokenKind::Normal; tokens.len()];
    let n = kinds.len();
    kinds[n - 2] = TokenKind::Control;
    kinds[n - 1] = TokenKind::Control;
    Tokenizer::new(TokenizerSpec {
        model: TokenizerModel::ByteBpe { pre: PreTokenizer::Gpt2, merges },
        tokens,
        kinds,
        scores: vec![],
        bos_id: None,
        eos_id: Some(n as u32 - 1),
        eog_ids: vec![],
        add_bos: false,
        add_eos: false,
    })
    .unwrap()
}

#[test]
fn bpe_round_trips_any_text() {
    let t = tiny_bpe();
    for text in ["hello world", "héllo 🎉\n\n\tx", "", "  leading and trailing  "] {
        let ids = t.encode(text, false, false);
        assert_eq!(t.decode(&ids, false), text);
    }
    let ids = t.encode("hello", false, false);
    assert_eq!(ids.len(), 1);
}

#[test]
fn special_tokens_parse_only_when_asked() {
    let t = tiny_bpe();
    let start = t.token_id("<|im_start|>").unwrap();
    let with = t.encode("<|im_start|>hello", false, true);
    assert_eq!(with[0], start);
    let without = t.encode("<|im_start|>hello", false, false);
    assert!(!without.contains(&start));
    assert_eq!(t.decode(&without, false), "<|im_start|>hello");
    // Control tokens are hidden unless rendered.
    assert_eq!(t.decode(&with, false), "hello");
    assert_eq!(t.decode(&with, true), "<|im_start|>hello");
}

#[test]
fn end_of_turn_text_is_end_of_generation() {
    let t = tiny_bpe();
    let end = t.token_id("<|im_end|>").unwrap();
    assert!(t.is_eog(end));
    assert!(!t.is_eog(0));
}

#[test]
fn stream_decoder_never_emits_broken_utf8_and_concatenates_to_decode() {
    let t = tiny_bpe();
    let text = "a€b🎉c 日本 hello";
    let ids = t.encode(text, false, false);
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = dec.push(&t, id, false);
        assert!(!piece.contains('\u{FFFD}'));
        out.push_str(&piece);
    }
    out.push_str(&dec.finish());
    assert_eq!(out, text);
}

#[test]
fn stream_decoder_replaces_invalid_bytes_without_stalling() {
    let t = tiny_bpe();
    // The byte 0xFF alone (GPT-2 char 'ÿ') is not valid UTF-8.
    let ff = t.token_id("ÿ").unwrap();
    let a = t.token_id("a").unwrap();
    let mut dec = StreamDecoder::new();
    let first = dec.push(&t, ff, false);
    let second = dec.push(&t, a, false);
    assert_eq!(first + &second + &dec.finish(), "\u{FFFD}a");
}

fn tiny_spm() -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut kinds = vec![TokenKind::Unknown, TokenKind::Control, TokenKind::Control];
    for b in 0..=255u32 {
        tokens.push(format!("<0x{b:02X}>"));
        kinds.push(TokenKind::Byte);
    }
    let mut scores = vec![0.0; tokens.len()];
    for (t, s) in [("▁", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("he", -3.0), ("ll", -1.5), ("hell", -4.0), ("▁hello", -5.0), ("▁h", -6.0), ("▁he", -5.5), ("▁hell", -5.2)] {
        tokens.push(t.into());
        kinds.push(TokenKind::Normal);
        scores.push(s);
    }
    Tokenizer::new(TokenizerSpec {
        model: TokenizerModel::Spm { add_space_prefix: true },
        tokens,
        kinds,
        scores,
        bos_id: Some(1),
        eos_id: Some(2),
        eog_ids: vec![],
        add_bos: true,
        add_eos: false,
    })
    .unwrap()
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let t = tiny_spm();
    let ids = t.encode("hello", true, false);
    assert_eq!(ids[0], 1, "bos first");
    assert_eq!(t.token_text(ids[1]), Some("▁hello"));
    // 'z' is not in the vocabulary: it becomes its byte token.
    let ids = t.encode("hez", false, false);
    assert_eq!(t.token_text(*ids.last().unwrap()), Some("<0x7A>"));
    assert_eq!(t.decode(&ids, false), " hez");
    let ids = t.encode("é", false, false);
    assert_eq!(ids.len(), 3, "▁ plus two UTF-8 bytes");
}

#[test]
fn inconsistent_specs_are_errors() {
    let mut spec = tiny_spm().spec().clone();
    spec.scores.pop();
    assert!(Tokenizer::new(spec).is_err());
    let mut spec = tiny_spm().spec().clone();
    spec.bos_id = Some(100_000);
    assert!(Tokenizer::new(spec).is_err());
}
