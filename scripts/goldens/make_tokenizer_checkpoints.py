"""Tiny random-weight Llama/Mistral-shaped checkpoints, one per tokenizer.json kind of
make_tokenizer_kinds.py, with transformers' outputs as the reference: the prompt's ids as
`AutoTokenizer` gives them, 24 greedy tokens, their text decoded alone and as the text they add
after the prompt, and a chat prompt rendered and tokenized by `apply_chat_template`. Writes
worker/tests/fixtures/hf/tok-<kind>/. CI needs none of this; the fixtures are committed.

Needs: pip install torch transformers tokenizers safetensors
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from make_tokenizer_kinds import BUILDERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "worker" / "tests" / "fixtures" / "hf"
PROMPT = "The quick brown fox jumps over the lazy dog. 12345 café! 日本語 🤖"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, café?"}]
TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"

# The special tokens tokenizer_config.json names for each kind, and the architecture.
KINDS = {
    "spm_bpe_normalizer": ("<s>", "</s>", "llama"),
    "spm_bpe_metaspace": ("<s>", "</s>", "mistral"),
    "unigram": (None, "</s>", "llama"),
    "word_level": (None, "[PAD]", "llama"),
    "word_piece": ("[CLS]", "[SEP]", "llama"),
    "bpe_no_pre_tokenizer": (None, "<unk>", "mistral"),
    "byte_level_added": ("<|endoftext|>", "<|im_end|>", "llama"),
}


def config(arch, vocab, bos_id, eos_id):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    return transformers.LlamaConfig(**common)


def build(kind):
    bos, eos, arch = KINDS[kind]
    tok = BUILDERS[kind]()
    d = OUT / f"tok-{kind}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "eos_token": eos}
    if bos:
        tc["bos_token"] = bos
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=1, ensure_ascii=False))
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    bos_id = hf_tok.convert_tokens_to_ids(bos) if bos else None
    eos_id = hf_tok.convert_tokens_to_ids(eos)
    ids = hf_tok(PROMPT)["input_ids"]
    # A seed whose greedy path has no near-ties, so f32 rounding cannot flip a choice.
    for seed in range(100):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config(arch, len(hf_tok), bos_id, eos_id), attn_implementation="eager").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
            # An explicit mask: the default treats every pad id (often the unknown token) as padding.
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
        if margin > 1e-3:
            break
    greedy = out.sequences[0, len(ids):].tolist()
    model.save_pretrained(d, safe_serialization=True)
    head = hf_tok.decode(ids, skip_special_tokens=True)
    whole = hf_tok.decode(ids + greedy, skip_special_tokens=True)
    chat_text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    (d / "reference.json").write_text(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__, "seed": seed, "greedy_margin": margin, "prompt": PROMPT, "ids": ids, "greedy": greedy,
        "greedy_text": hf_tok.decode(greedy, skip_special_tokens=True),
        "continuation_text": whole[len(head):] if whole.startswith(head) else None,
        "chat": CHAT, "chat_text": chat_text, "chat_ids": list(chat_ids),
    }, ensure_ascii=False))
    print(f"tok-{kind}: vocab {len(hf_tok)}, prompt {len(ids)} tokens, greedy text {hf_tok.decode(greedy, skip_special_tokens=True)!r}")


for kind in sys.argv[1:] or KINDS:
    build(kind)
