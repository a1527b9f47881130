"""Tiny random-weight Hugging Face checkpoints and their reference outputs, from transformers.

For each architecture: a seeded 2-layer model with a small hidden size, saved as f32
safetensors with config.json, generation_config.json, a byte-level BPE tokenizer.json
(trained here on a small corpus) and tokenizer_config.json with a chat template, into
worker/tests/fixtures/hf/<name>/; and reference.json with the prompt's token ids, the
logits at every prompt position, and a greedy continuation. CI needs none of this; the
fixtures are committed.

Needs: pip install torch transformers tokenizers safetensors
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "worker" / "tests" / "fixtures" / "hf"
PROMPT = "The quick brown fox jumps over the lazy dog. 12345 café!"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?", "café naïve résumé 12345 67890",
    "def add(a, b):\n    return a + b\n", "Once upon a time there was a small model.", "It's 3:15 pm; the train's late.",
] * 20


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def common(vocab):
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32")


ARCHS = {
    "llama": lambda v: transformers.LlamaConfig(**common(v)),
    # Rows of 256 and more, so every k-quant format applies (load-time quantization tests).
    "llama-wide": lambda v: transformers.LlamaConfig(**{**common(v), "hidden_size": 256, "intermediate_size": 512}),
    # A window shorter than prompt plus continuation, so it matters.
    "mistral": lambda v: transformers.MistralConfig(**common(v), sliding_window=8),
    "qwen2": lambda v: transformers.Qwen2Config(**common(v), use_sliding_window=False),
    "phi3": lambda v: transformers.Phi3Config(**common(v), partial_rotary_factor=0.5),
    "mixtral": lambda v: transformers.MixtralConfig(**common(v), num_local_experts=4, num_experts_per_tok=2),
    "qwen3moe": lambda v: transformers.Qwen3MoeConfig(**common(v), head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                                                       mlp_only_layers=[], use_sliding_window=False),
    "gemma2": lambda v: transformers.Gemma2Config(**common(v), head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                  hidden_activation="gelu_pytorch_tanh"),
    # Tied embeddings, as released Gemma 2 models have (and llama.cpp's gemma2 requires).
    "gemma2-tied": lambda v: transformers.Gemma2Config(**{**common(v), "tie_word_embeddings": True}, head_dim=16, sliding_window=8,
                                                       query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                                                       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3": lambda v: transformers.Gemma3TextConfig(**common(v), head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                                      sliding_window_pattern=2, rope_local_base_freq=10000.0,
                                                      hidden_activation="gelu_pytorch_tanh"),
    "qwen3-bf16": lambda v: transformers.Qwen3Config(**common(v), head_dim=32, use_sliding_window=False),
    "llama-f16": lambda v: transformers.LlamaConfig(**common(v)),
    "qwen3": lambda v: transformers.Qwen3Config(**common(v), head_dim=32, use_sliding_window=False),
}


# Saved in half precision; the reference runs in f32 from the same rounded weights.
HALF = {"qwen3-bf16": torch.bfloat16, "llama-f16": torch.float16}


def build(name, make_config):
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    config = make_config(vocab)
    # Eager attention: the reference implementation of every masking rule (sliding windows).
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        # Larger than the default init, so logits are not all near zero; scaled by width so
        # wider models stay in the same range.
        std = 0.2 * (64 / config.hidden_size) ** 0.5
        for p in model.parameters():
            p.normal_(0.0, std)
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if name in HALF:
        model = model.to(HALF[name])
        model.config.torch_dtype = HALF[name]
    model.save_pretrained(d, safe_serialization=True)
    model = model.float()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    ids = tok.encode(PROMPT).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    (d / "reference.json").write_text(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__, "prompt": PROMPT, "ids": ids,
        "logits": [[round(float(x), 7) for x in row] for row in logits], "greedy": greedy.tolist()}))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, vocab {vocab}, prompt {len(ids)} tokens")


for name in sys.argv[1:] or ARCHS:
    build(name, ARCHS[name])
