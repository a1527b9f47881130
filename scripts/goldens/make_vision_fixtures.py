"""Tiny random-weight vision-language checkpoints, test images, and transformers' outputs.

Writes worker/tests/fixtures/vision/:
- images/: real photographs from scikit-image's bundled data (public domain: `chelsea`, a
  cat, RGB PNG; `camera`, greyscale PNG; `rocket`, a JPEG) and synthetic images of odd sizes
  (RGBA with a gradient alpha, a palette GIF with a transparent colour, a lossless WebP, a
  one-pixel-tall strip) made here with Pillow.
- images/<name>.<model>.f32: the model's Hugging Face image processor output for the image
  (`pixel_values`, little-endian f32, channels first), from the PIL backend.
- qwen25vl/: a Qwen2_5_VLForConditionalGeneration checkpoint (vision transformer with 2D
  rotary positions, window and full attention blocks and the 2x2 patch merger; a Qwen2 text
  model with M-RoPE), with the same kind of tokenizer, template and reference.json; the
  processor's `max_pixels` is small so images stay a few dozen tokens.
- gemma3-gguf/ (when LLAMA_SRC names a llama.cpp source tree and kiln is built): the gemma3
  checkpoint as a llama.cpp model pair: `mmproj.gguf` written by llama.cpp's own converter
  (convert_hf_to_gguf.py --mmproj, f16 as released mmproj files are, from a copy with the
  released `vision_tower.vision_model.` names it expects) and `text.gguf`, the language model
  written by `kiln-worker quantize --isq q8_0` (llama.cpp's converter does not know this tiny
  tokenizer).
- gemma3/: a Gemma3ForConditionalGeneration checkpoint (SigLIP tower, projector, Gemma 3 text
  model) in the current transformers layout, with a tokenizer holding the image tokens, a
  chat template that emits `<start_of_image>` for image parts, and reference.json: for each
  prompt the processor's token ids, the logits of the last 8 prompt positions, and 16 greedy
  tokens (recomputed from scratch each step, so no cache path is involved).

Needs: pip install torch transformers tokenizers safetensors pillow scikit-image
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "worker" / "tests" / "fixtures" / "vision"
IMAGES = OUT / "images"

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
CORPUS = [
    "Describe this image.", "What is in the picture?", "Compare the two images.", "A cat sits on a mat.",
    "The rocket stands on the launch pad.", "Hello, world! How are you today?", "user model assistant",
] * 20
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer(specials=None):
    specials = specials or SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_images():
    import skimage
    IMAGES.mkdir(parents=True, exist_ok=True)
    data = Path(skimage.__file__).parent / "data"
    # Scaled down to keep the repository small; still photographs, still odd sizes.
    Image.open(data / "chelsea.png").convert("RGB").resize((151, 100), Image.LANCZOS).save(IMAGES / "chelsea.png")
    Image.open(data / "camera.png").resize((128, 128), Image.LANCZOS).save(IMAGES / "camera.png")
    Image.open(data / "rocket.jpg").resize((107, 160), Image.LANCZOS).save(IMAGES / "rocket.jpg", quality=90)
    y, x = np.mgrid[0:23, 0:37]
    rgba = np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256, (x * 255 // 36)], axis=-1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(IMAGES / "gradient_alpha.png")
    pal = Image.fromarray(((x * 3 + y * 5) % 16).astype(np.uint8), "P")
    pal.putpalette([v for i in range(16) for v in (i * 16, 255 - i * 16, (i * 40) % 256)])
    pal.save(IMAGES / "palette.gif", transparency=3)
    Image.fromarray(rgba[..., :3].copy(), "RGB").save(IMAGES / "lossless.webp", lossless=True)
    Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (1, 1, 3)).reshape(1, 50, 3), "RGB").save(IMAGES / "strip.png")
    return sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg", ".gif", ".webp"))


def write_reference(name, d, model, reference, image_token_id, vocab):
    """reference.json: one image, two images of different sizes, and text only."""
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    two = [{"role": "user", "content": [{"type": "text", "text": "Compare the two images."}, {"type": "image"}, {"type": "image"}]}]
    text_only = [{"role": "user", "content": "What is in the picture?"}]
    # Lossless images only: JPEG decoders differ by a step here and there, which logits show.
    cases = [reference("one_image", one, ["chelsea.png"]), reference("two_images", two, ["gradient_alpha.png", "camera.png"]),
             reference("text_only", text_only, [])]
    (d / "reference.json").write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                                   "image_token_id": image_token_id, "cases": cases}))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, vocab {vocab}, prompts {[len(c['ids']) for c in cases]}")


def gemma3(images):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    d = OUT / "gemma3"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                # A window shorter than an image: sliding layers see only part of it.
                sliding_window=8, query_pre_attn_scalar=16, sliding_window_pattern=2, rope_local_base_freq=10000.0,
                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False, bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                  layer_norm_eps=1e-6, vision_use_head=False, hidden_act="gelu_pytorch_tanh")
    # Untied output head: with random weights a tied one keeps predicting the last token,
    # which would make the greedy comparison say little.
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, boi_token_index=ids["<start_of_image>"],
                          eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False)
    # (seed 0 happens to give a model whose greedy output repeats one token)
    torch.manual_seed(1)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    tok_config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
                  "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    (d / "chat_template.jinja").write_text(GEMMA3_TEMPLATE)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(d)
    image_processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=hf_tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=16)
    processor.save_pretrained(d)

    for path in images:
        pixels = image_processor(Image.open(path), return_tensors="np")["pixel_values"][0].astype("<f4")
        pixels.tofile(IMAGES / f"{path.name}.gemma3.f32")

    def reference(name, messages, image_names):
        pics = [Image.open(IMAGES / n) for n in image_names]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=prompt, images=pics or None, return_tensors="pt")
        input_ids = inputs["input_ids"]
        extra = {k: inputs[k] for k in ("pixel_values", "token_type_ids") if k in inputs}
        with torch.no_grad():
            logits = model(input_ids=input_ids, **extra).logits[0]
            seq, greedy = input_ids, []
            for _ in range(16):
                tt = {"token_type_ids": torch.cat([extra["token_type_ids"], torch.zeros(1, seq.shape[1] - input_ids.shape[1], dtype=torch.long)], 1)} if "token_type_ids" in extra else {}
                px = {"pixel_values": extra["pixel_values"]} if "pixel_values" in extra else {}
                nxt = model(input_ids=seq, **px, **tt).logits[0, -1].argmax().item()
                greedy.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        return {"name": name, "messages": messages, "images": image_names, "prompt": prompt, "ids": input_ids[0].tolist(),
                "last_logits": [[round(float(x), 7) for x in row] for row in logits[-8:]], "greedy": greedy}

    write_reference("gemma3", d, model, reference, ids["<image_soft_token>"], vocab)


def greedy_from_scratch(model, inputs, extra_keys, steps=16):
    """Greedy tokens, each step a whole forward pass over the prompt and what came before."""
    input_ids = inputs["input_ids"]
    seq, out = input_ids, []
    for _ in range(steps):
        extra = {}
        for k in extra_keys:
            if k not in inputs:
                continue
            v = inputs[k]
            if k in ("token_type_ids", "mm_token_type_ids"):
                v = torch.cat([v, torch.zeros(1, seq.shape[1] - input_ids.shape[1], dtype=v.dtype)], 1)
            extra[k] = v
        nxt = model(input_ids=seq, **extra).logits[0, -1].argmax().item()
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    return out


def qwen25vl(images):
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    d = OUT / "qwen25vl"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tok = tokenizer(QWEN_SPECIALS)
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in QWEN_SPECIALS}
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # Windows of 56 pixels (2x2 merged tokens) and one full-attention block of two.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, out_hidden_size=64, fullatt_block_indexes=[1], hidden_act="silu")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(2)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        # Image features strong enough to steer a small text model's greedy choice.
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "visual" in name else 0.1)
    model.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                        "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    (d / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(d)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 12})
    # The processor class needs torchvision for its video half; its image half is the image
    # processor plus the prompt expansion below (processing_qwen2_5_vl's replace_image_token).
    image_processor.save_pretrained(d)

    for path in images:
        out = image_processor(Image.open(path), return_tensors="np")
        out["pixel_values"].astype("<f4").tofile(IMAGES / f"{path.name}.qwen25vl.f32")
        (IMAGES / f"{path.name}.qwen25vl.grid").write_text(" ".join(str(int(v)) for v in out["image_grid_thw"][0]))

    def reference(name, messages, image_names):
        prompt = hf_tok.apply_chat_template(messages, chat_template=QWEN_TEMPLATE, tokenize=False, add_generation_prompt=True)
        inputs = {}
        expanded = prompt
        if image_names:
            pics = image_processor([Image.open(IMAGES / n) for n in image_names], return_tensors="pt")
            inputs.update(pixel_values=pics["pixel_values"], image_grid_thw=pics["image_grid_thw"])
            pieces = expanded.split("<|image_pad|>")
            counts = [int(g.prod()) // 4 for g in pics["image_grid_thw"]]
            expanded = pieces[0] + "".join("<|placeholder|>" * n + rest for n, rest in zip(counts, pieces[1:]))
            expanded = expanded.replace("<|placeholder|>", "<|image_pad|>")
        input_ids = torch.tensor([hf_tok(expanded, add_special_tokens=False)["input_ids"]])
        inputs["input_ids"] = input_ids
        inputs["mm_token_type_ids"] = (input_ids == ids["<|image_pad|>"]).int()
        keys = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], **{k: inputs[k] for k in keys if k in inputs}).logits[0]
            greedy = greedy_from_scratch(model, inputs, keys)
        return {"name": name, "messages": messages, "images": image_names, "prompt": prompt, "ids": inputs["input_ids"][0].tolist(),
                "grids": inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else [],
                "last_logits": [[round(float(x), 7) for x in row] for row in logits[-8:]], "greedy": greedy}

    write_reference("qwen25vl", d, model, reference, ids["<|image_pad|>"], vocab)


def gemma3_gguf():
    import os
    import subprocess
    from safetensors.torch import load_file, save_file

    src = os.environ.get("LLAMA_SRC")
    if not src:
        print("gemma3-gguf: skipped (set LLAMA_SRC to a llama.cpp source tree)")
        return
    d, out = OUT / "gemma3", OUT / "gemma3-gguf"
    out.mkdir(exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "kiln-gemma3-gguf"
    shutil.rmtree(work, ignore_errors=True)
    released, text = work / "released", work / "text"
    released.mkdir(parents=True)
    text.mkdir()
    tensors = load_file(d / "model.safetensors")
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v for k, v in tensors.items()},
              released / "model.safetensors")
    for f in d.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, released / f.name)
    subprocess.run([sys.executable, f"{src}/convert_hf_to_gguf.py", str(released), "--mmproj", "--outtype", "f16", "--outfile", str(out / "mmproj.gguf")],
                   check=True, capture_output=True)
    config = json.loads((d / "config.json").read_text())
    (text / "config.json").write_text(json.dumps({**config["text_config"], "architectures": ["Gemma3ForCausalLM"], "torch_dtype": "float32"}))
    save_file({k.replace("language_model.", "", 1): v for k, v in tensors.items() if k.startswith("language_model.")}, text / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(d / f, text / f)
    subprocess.run([str(ROOT / "target/release/kiln-worker"), "quantize", "-m", str(text), "--isq", "q8_0", "-o", str(out / "text.gguf")],
                   check=True, capture_output=True)
    print(f"gemma3-gguf: {[(p.name, p.stat().st_size) for p in sorted(out.iterdir())]}")


pictures = write_images()
gemma3(pictures)
qwen25vl(pictures)
gemma3_gguf()
