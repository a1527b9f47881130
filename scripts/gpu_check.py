"""The GPU machine's half of scripts/gpu-check.sh: random-weight checkpoints of released
models' shapes with transformers' outputs for them (computed on the GPU in f32), and the
comparison of `kiln-worker eval` outputs with those and with each other.

usage:
  gpu_check.py models OUT              checkpoints OUT/<name>/ (bf16 safetensors, a BPE tokenizer
                                       of the model's vocabulary size), the same
                                       weights in f32 in OUT/<name>-f32/, OUT/cases.json and
                                       OUT/<name>/reference.json (transformers in f32)
  gpu_check.py compare NAME REF.json KILN.json [--engine] [--top1 FRACTION] [--greedy N] [--near-tie LOGITS]
                                       top-1 agreement and logit gaps of KILN against REF (the
                                       same shape: transformers' or another kiln run); with
                                       --engine also checks KILN's engine runs against its own
                                       one-at-a-time run. Exit status 1 when a check fails.

Needs torch, transformers and tokenizers (the GPU machine has them).
"""
import json
import random
import sys
from pathlib import Path

# What a device must reach against its reference.
TOP1_AGREEMENT = 0.99
# The engine's prompt log-probabilities (rows of batched steps) against the same device's
# teacher-forced ones: equal on kiln's CPU kernels and candle's CPU device; on a GPU the
# products of another number of rows may take another cuBLAS algorithm.
PROMPT_LOGPROB_GAP = 1e-3
GREEDY_SAME = 9  # of 10 prompts
GREEDY_TOKENS = 32

SHAPES = {
    # SmolLM2-135M's shape.
    "llama": dict(arch="LlamaConfig", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=100000.0, tie_word_embeddings=True),
    # Gemma 3 270M's shape (its sliding window shortened so the check's sequences cross it).
    "gemma3": dict(arch="Gemma3TextConfig", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=64,
                   query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    # A small Mixtral (8 experts, 2 per token): the mixture-of-experts block on the device.
    "mixtral": dict(arch="MixtralConfig", vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False),
}


def cases(vocab_limit=4000, seed=0):
    rng = random.Random(seed)
    score = [[rng.randrange(3, vocab_limit) for _ in range(n)] for n in (200, 120, 64, 17)]
    greedy = [[rng.randrange(3, vocab_limit) for _ in range(rng.randrange(6, 40))] for _ in range(10)]
    return {"score": score, "greedy": greedy, "max_tokens": GREEDY_TOKENS}


def tokenizer_of_size(vocab_size):
    """A byte-level BPE vocabulary of `vocab_size` made-up tokens and no merges: the checks
    feed token ids, and `kiln-worker quantize` writes only BPE vocabularies into GGUF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def top5(row):
    import torch
    values, ids = torch.topk(row, 5)
    return ids.tolist(), values.tolist()


def make_models(out):
    import torch
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = cases()
    (out / "cases.json").write_text(json.dumps(work))
    for name, shape in SHAPES.items():
        shape = dict(shape)
        config = getattr(transformers, shape.pop("arch"))(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                           torch_dtype="bfloat16")
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        with torch.no_grad():
            # Larger than the default init, so logits are not all near zero (as the fixtures).
            std = 0.2 * (64 / config.hidden_size) ** 0.5
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    # Norm weights near their trained scale: 1, or 0 where the model adds 1 (Gemma).
                    p.normal_(0.0 if name == "gemma3" else 1.0, 0.05)
                elif "o_proj" in pname or "down_proj" in pname:
                    # Each layer's additions to the residual stream scaled down with depth (as
                    # GPT-2 initializes them): with full-size additions the stream grows layer
                    # after layer and the random model amplifies a rounding so much that bf16
                    # inputs to its products (as llama.cpp and kiln compute bf16 weights) move
                    # 12% of its top tokens from f32's; trained models are far calmer.
                    p.normal_(0.0, std / (2 * config.num_hidden_layers) ** 0.5)
                else:
                    p.normal_(0.0, std)
        d = out / name
        d.mkdir(exist_ok=True)
        model = model.to(torch.bfloat16)
        model.save_pretrained(d, safe_serialization=True)
        tokenizer_of_size(config.vocab_size).save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
                                                             "tokenizer_class": "PreTrainedTokenizerFast"}))
        # The reference computes in f32 from the same rounded weights, loaded back from the
        # files as any user of the checkpoint loads them: the model in memory holds its rotary
        # frequencies rounded to bf16 by the cast above (0.3 radians off by position 200).
        del model
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        # The same weights in f32 files: what the GPU is held to transformers' f32 outputs on.
        # (The bf16 files are held to kiln's CPU kernels: both round each product's inputs to
        # bf16, as llama.cpp does, which on a random-weight model moves top tokens too often
        # for a comparison with f32 arithmetic to mean anything.)
        d32 = out / f"{name}-f32"
        model.save_pretrained(d32, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d32 / f).write_bytes((d / f).read_bytes())
        model = model.to(device).eval()
        ref = {"device": f"transformers {transformers.__version__} on {device}", "score": []}
        with torch.no_grad():
            for seq in work["score"]:
                logits = model(torch.tensor([seq], device=device)).logits[0].float().cpu()
                ids, values = zip(*(top5(row) for row in logits))
                ref["score"].append({"top_ids": list(ids), "top_logits": list(values)})
            ref["greedy_alone"] = []
            for prompt in work["greedy"]:
                x = torch.tensor([prompt], device=device)
                y = model.generate(x, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
                ref["greedy_alone"].append(y[0, len(prompt):].tolist())
        (d / "reference.json").write_text(json.dumps(ref))
        print(f"gpu-check: {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, reference on {device}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def compare(name, ref_path, kiln_path, engine, top1=TOP1_AGREEMENT, greedy_same=GREEDY_SAME, near_tie=None):
    """With `near_tie`, a position also agrees where KILN's top token is within that much of
    REF's best logit under REF's own logits (two roundings may order a near-tie either way),
    and greedy runs, which part at the first such tie, are reported rather than held to
    `greedy_same`."""
    ref = json.loads(Path(ref_path).read_text())
    got = json.loads(Path(kiln_path).read_text())
    failures = []
    positions = agree = 0
    worst = widest_tie = 0.0
    for r, k in zip(ref["score"], got["score"]):
        for r_ids, r_vals, k_ids, k_vals in zip(r["top_ids"], r["top_logits"], k["top_ids"], k["top_logits"]):
            positions += 1
            theirs = dict(zip(r_ids, r_vals))
            if r_ids[0] == k_ids[0]:
                agree += 1
            elif near_tie is not None and k_ids[0] in theirs and r_vals[0] - theirs[k_ids[0]] <= near_tie:
                agree += 1
                widest_tie = max(widest_tie, r_vals[0] - theirs[k_ids[0]])
            for t, v in zip(k_ids, k_vals):
                if t in theirs:
                    worst = max(worst, abs(theirs[t] - v))
    agreement = agree / max(positions, 1)
    same = sum(a == b for a, b in zip(ref["greedy_alone"], got["greedy_alone"]))
    ties = f" (a top token within {near_tie} of the best counted as agreeing; the widest such {widest_tie:.3g})" if near_tie is not None else ""
    print(f"gpu-check: {name}: {got['device']} against {ref['device']}: teacher-forced top-1 agreement {100 * agreement:.2f}%{ties} "
          f"over {positions} positions, largest gap on shared top-5 logits {worst:.3g}; greedy {len(ref['greedy_alone'][0]) if ref['greedy_alone'] else 0} tokens identical on "
          f"{same}/{len(ref['greedy_alone'])} prompts")
    if agreement < top1:
        failures.append(f"top-1 agreement {100 * agreement:.2f}% < {100 * top1:.0f}%")
    if near_tie is None and same < greedy_same:
        failures.append(f"greedy identical on {same} < {greedy_same} prompts")
    if engine:
        alone = got["greedy_alone"]
        for what in ("greedy_batched", "greedy_cached", "greedy_preempted"):
            if got[what] != alone:
                failures.append(f"{what} differs from running alone")
        if got["prefix_hit_tokens"] == 0:
            failures.append("the repeated prompts did not hit the prefix cache")
        if got["prompt_logprob_gap"] > PROMPT_LOGPROB_GAP:
            failures.append(f"prompt log-probabilities through the engine lie {got['prompt_logprob_gap']:.3g} from teacher forcing (> {PROMPT_LOGPROB_GAP})")
        print(f"gpu-check: {name}: engine on {got['device']}: batched, prefix-cache hits ({got['prefix_hit_tokens']} tokens) and "
              f"a cache with {got['preemptions']} preemptions {'all equal' if not failures else 'checked'} to running alone; "
              f"prompt log-probabilities within {got['prompt_logprob_gap']:.3g} of teacher forcing")
    for f in failures:
        print(f"gpu-check: {name}: FAILED: {f}", flush=True)
    return not failures


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "models":
        make_models(sys.argv[2])
    elif len(sys.argv) >= 5 and sys.argv[1] == "compare":
        flags = sys.argv[5:]
        value = lambda flag, default: type(default)(flags[flags.index(flag) + 1]) if flag in flags else default
        ok = compare(sys.argv[2], sys.argv[3], sys.argv[4], "--engine" in flags, value("--top1", TOP1_AGREEMENT), value("--greedy", GREEDY_SAME),
                     value("--near-tie", 0.0) if "--near-tie" in flags else None)
        sys.exit(0 if ok else 1)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
