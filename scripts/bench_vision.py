"""Image encode time at the released models' vision sizes, kiln beside transformers (and
llama.cpp's multimodal CLI for Gemma 3 when LLAMA_BIN names its build directory).

No released vision weights are reachable here, so the checkpoints have random weights at the
real shapes: Gemma 3 4B's SigLIP tower (896x896, 27 layers of 1152) with its projector, and
Qwen2.5-VL 7B's vision transformer (32 blocks of 1280, windows of 112 pixels, merger to 3584),
each in front of a one-layer text model of the right width (speed of the text model is not
what is measured). Weights are stored in bf16 as released; transformers runs them in f32.

    python3 scripts/bench_vision.py [THREADS] [DEPTH]   # needs torch transformers safetensors pillow scikit-image

Prints one table row per encoder: tokens per image, and milliseconds to encode one image.
DEPTH (default: the released depth) builds the towers with that many layers only, the last
Qwen2.5-VL block a full-attention one, and scales the times to the released depth (every
layer of a tower costs the same but for Qwen2.5-VL's few full-attention blocks).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "worker/tests/fixtures/vision"
WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "kiln-bench-vision"
THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
DEPTH = int(sys.argv[2]) if len(sys.argv) > 2 else None
KILN = ROOT / "target/release/kiln-worker"
torch.set_num_threads(THREADS)


def photo():
    import skimage
    path = WORK / "coffee.png"
    Image.open(Path(skimage.__file__).parent / "data/coffee.png").convert("RGB").save(path)
    return path


def checkpoint(name, model_class, config, fixture):
    d = WORK / name
    if (d / "model.safetensors").exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(0)
    model = model_class._from_config(config, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        if (FIXTURE / fixture / f).exists():
            shutil.copy(FIXTURE / fixture / f, d / f)
    return d


def time_it(fn, reps=2):
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return float(np.mean(samples))


def kiln_encode(d, image):
    out = subprocess.run([str(KILN), "bench", "-m", str(d), "--image", str(image), "-t", str(THREADS), "-r", "2"],
                         capture_output=True, text=True, check=True).stdout
    row = [l for l in out.splitlines() if l.startswith(f"| {image.name}")][0].split("|")
    return int(row[4]), float(row[6].split("±")[0])


def gemma3(image):
    ids = {s: i for i, s in enumerate(["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"])}
    # Two text layers, one sliding and one global, as llama.cpp's gemma3 expects.
    text = dict(vocab_size=320, hidden_size=2560, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                head_dim=256, max_position_embeddings=1024, sliding_window=512, query_pre_attn_scalar=256, tie_word_embeddings=False,
                layer_types=["sliding_attention", "full_attention"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    depth = DEPTH or 27
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=depth, num_attention_heads=16, image_size=896, patch_size=14,
                  layer_norm_eps=1e-6, vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=ids["<start_of_image>"],
                                       eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False)
    d = checkpoint(f"gemma3-4b-vision-{depth}", transformers.Gemma3ForConditionalGeneration, config, "gemma3")
    (d / "processor_config.json").write_text(json.dumps({"image_processor": {"size": {"height": 896, "width": 896}, "image_mean": [0.5] * 3,
                                                                             "image_std": [0.5] * 3, "resample": 2}}))
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32).eval()
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    pixels = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)(Image.open(image), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = time_it(lambda: model.get_image_features(pixel_values=pixels))
    tokens, kiln = kiln_encode(d, image)
    llama = llama_cpp_gemma3(d, image) if os.environ.get("LLAMA_BIN") else None
    f = 27 / depth
    return "Gemma 3 4B SigLIP (896x896)", tokens, kiln * f, reference * f, None if llama is None else llama * f


def llama_cpp_gemma3(d, image):
    """llama-mtmd-cli's own report of the image encode, on an mmproj written by llama.cpp's
    converter (which wants the released `vision_tower.vision_model.` names) and a text GGUF
    written by kiln."""
    from safetensors.torch import load_file, save_file
    src = WORK / "gemma3-4b-vision-released-names"
    src.mkdir(exist_ok=True)
    tensors = load_file(d / "model.safetensors")
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v for k, v in tensors.items()},
              src / "model.safetensors")
    for f in d.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, src / f.name)
    converter = Path(os.environ["LLAMA_SRC"]) / "convert_hf_to_gguf.py"
    mmproj = WORK / "gemma3-4b-mmproj.gguf"
    subprocess.run([sys.executable, str(converter), str(src), "--mmproj", "--outtype", "f16", "--outfile", str(mmproj)], check=True, capture_output=True)
    text = WORK / "gemma3-text"
    text.mkdir(exist_ok=True)
    config = json.loads((d / "config.json").read_text())
    text_config = {**config["text_config"], "architectures": ["Gemma3ForCausalLM"], "torch_dtype": "bfloat16"}
    (text / "config.json").write_text(json.dumps(text_config))
    save_file({k.replace("language_model.", "", 1): v for k, v in tensors.items() if k.startswith("language_model.")}, text / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(d / f, text / f)
    gguf = WORK / "gemma3-text.gguf"
    subprocess.run([str(KILN), "quantize", "-m", str(text), "--isq", "q8_0", "-o", str(gguf)], check=True, capture_output=True)
    times = []
    for _ in range(3):
        out = subprocess.run([str(Path(os.environ["LLAMA_BIN"]) / "llama-mtmd-cli"), "-m", str(gguf), "--mmproj", str(mmproj), "--image", str(image),
                              "-p", "Describe this image.", "-n", "1", "-t", str(THREADS), "--temp", "0"], capture_output=True, text=True)
        found = re.search(r"(?:image slice encoded|mtmd batch encoding done) in (\d+) ms", out.stdout + out.stderr)
        if not found:
            print(out.stderr[-2000:], file=sys.stderr)
            return None
        times.append(float(found.group(1)))
    return float(np.mean(times[1:] if len(times) > 1 else times))


def qwen25vl(image):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    ids = {s: i for i, s in enumerate(specials)}
    text = dict(vocab_size=320, hidden_size=3584, intermediate_size=512, num_hidden_layers=1, num_attention_heads=28, num_key_value_heads=4,
                max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}, tie_word_embeddings=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    depth = DEPTH or 32
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31] if depth == 32 else [depth - 1], hidden_act="silu")
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    d = checkpoint(f"qwen25vl-7b-vision-{depth}", transformers.Qwen2_5_VLForConditionalGeneration, config, "qwen25vl")
    # The released processor's pixel bounds.
    (d / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
                                                            "temporal_patch_size": 2, "resample": 3}))
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32).eval()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    out = Qwen2VLImageProcessorPil()(Image.open(image), return_tensors="pt")
    with torch.no_grad():
        reference = time_it(lambda: model.get_image_features(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"]))
    tokens, kiln = kiln_encode(d, image)
    f = 32 / depth
    return "Qwen2.5-VL 7B vision (600x400 photo)", tokens, kiln * f, reference * f, None


WORK.mkdir(parents=True, exist_ok=True)
image = photo()
scaled = f" (measured at depth {DEPTH}, scaled)" if DEPTH else ""
print(f"| encoder | tokens per image | kiln ms{scaled} | transformers ms (f32, {THREADS} threads) | kiln speed-up | llama.cpp ms |")
print("|---|---|---|---|---|---|")
for bench in (gemma3, qwen25vl):
    name, tokens, kiln, reference, llama = bench(image)
    print(f"| {name} | {tokens} | {kiln:.0f} | {reference:.0f} | {reference / kiln:.2f}x | {'' if llama is None else f'{llama:.0f}'} |", flush=True)
