"""Goldens for tokenizer.json files of every kind kiln runs through the `tokenizers` crate:
SentencePiece-style BPE with byte fallback (normalizer form and Metaspace form), Unigram,
WordLevel, WordPiece, BPE without a pre-tokenizer, and byte-level BPE with added special and
non-special tokens. Each is built here (small vocabularies, trained on the corpus with a
limited alphabet so byte fallback and unknown tokens are exercised), and for every string the
Python library's ids (with and without special tokens, and with special tokens taken as
text) and decodes (skipping special tokens and not) are recorded. Writes
worker/tests/goldens/hf_tokenizer_kinds.json.

Needs: pip install tokenizers
"""
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).parent))
from corpus import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = [
    "control \x00\x01\x07\x08\x1b[0m\x7f chars", "bell\x07", "form\x0cfeed", "vertical\x0btab", "\u0085next line",
    "replacement \ufffd char", "\ufffd\ufffd", "lone surrogate \ufffd here", "zwj 👨\u200d👩\u200d👧 family",
    "bidi \u202eevil\u202c text", "combining e\u0301 a\u0308", "ﬁ ligature ＦＵＬＬ width",
    "<s>", "</s>", "<s>inline</s>", "<|im_start|>user\nhi<|im_end|>", "<tool_call>{\"a\": 1}</tool_call>",
    "x <tool_call> y", "[INST] hello [/INST]", "<unk>", "[UNK] [CLS] [SEP]", "  <s>  spaced  </s>  ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "🤖🦀🔥", "中文与English混合", "日本語のテキスト", "한국어 텍스트", "ภาษาไทย", "עברית", "العربية",
]
STRINGS = corpus() + EXTRAS
TRAIN = STRINGS * 2
SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_fallback_bpe(normalizer_form):
    """Llama 2 / Mistral-style BPE: the bytes <0x00>..<0xFF> in the vocabulary, spaces as ▁."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=500, limit_alphabet=120, special_tokens=SPECIALS, show_progress=False)
    base.train_from_iterator(TRAIN, trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if normalizer_form:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def unigram():
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False)
    # Latin-1 text only, so the other scripts meet the unknown token.
    tok.train_from_iterator([s for s in TRAIN if all(ord(c) < 256 for c in s)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return tok


def word_level():
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"], show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    return tok


def word_piece():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, limit_alphabet=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    return tok


def bpe_without_pre_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=150, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    return tok


def byte_level_with_added_tokens():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([
        AddedToken("<tool_call>", special=False, normalized=False),
        AddedToken("</tool_call>", special=False, normalized=False),
        AddedToken("[INST]", special=False, normalized=False, lstrip=True, rstrip=True),
        AddedToken("[/INST]", special=False, normalized=False, lstrip=True),
    ])
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    return tok


BUILDERS = {
    "spm_bpe_normalizer": lambda: byte_fallback_bpe(True),
    "spm_bpe_metaspace": lambda: byte_fallback_bpe(False),
    "unigram": unigram,
    "word_level": word_level,
    "word_piece": word_piece,
    "bpe_no_pre_tokenizer": bpe_without_pre_tokenizer,
    "byte_level_added": byte_level_with_added_tokens,
}


def cases(tok):
    literal = Tokenizer.from_str(tok.to_str())
    literal.encode_special_tokens = True
    out = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False).ids
        out.append({
            "text": s,
            "ids": ids,
            "ids_special": tok.encode(s, add_special_tokens=True).ids,
            "ids_literal": literal.encode(s, add_special_tokens=False).ids,
            "decoded": tok.decode(ids, skip_special_tokens=True),
            "decoded_special": tok.decode(ids, skip_special_tokens=False),
        })
    return out


def main():
    out = {name: {"tokenizer": json.loads(build().to_str()), "cases": None} for name, build in BUILDERS.items()}
    for name, entry in out.items():
        entry["cases"] = cases(Tokenizer.from_str(json.dumps(entry["tokenizer"])))
    path = ROOT / "worker" / "tests" / "goldens" / "hf_tokenizer_kinds.json"
    path.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")))
    print(f"wrote {path}: {len(BUILDERS)} tokenizers, {len(STRINGS)} strings each")


if __name__ == "__main__":
    main()
