"""Images through the router to workers serving the tiny Gemma 3 and Qwen2.5-VL
vision-language fixtures (worker/tests/fixtures/vision, made with transformers by
scripts/goldens/make_vision_fixtures.py), with the official openai and anthropic clients:
base64 images in chat, streamed and not, give transformers' greedy tokens for the same
prompt (Qwen2.5-VL's images take as many tokens as their size gives, which the router works
out from the image header); bad images (truncated, not an image, too many pixels, too many) get a 400 naming the
problem and the worker keeps serving; a text-only model given an image says so."""
import base64
import io
import json
import struct
import zlib

import anthropic
import openai
import pytest

from conftest import ROOT, Router, Worker

FIXTURE = ROOT / "worker/tests/fixtures/vision"
CASES = {m: {c["name"]: c for c in json.loads((FIXTURE / m / "reference.json").read_text())["cases"]} for m in ("gemma3", "qwen25vl")}


def image_b64(name):
    return base64.b64encode((FIXTURE / "images" / name).read_bytes()).decode()


def data_url(name):
    media = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}[name.rsplit(".", 1)[1]]
    return f"data:{media};base64,{image_b64(name)}"


def png(width, height):
    """A valid PNG header claiming `width` x `height` pixels (the data is never reached)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def vision(worker):
    workers = [Worker(m, model=str(FIXTURE / m)) for m in ("gemma3", "qwen25vl")]
    # The Gemma 3 fixture as a llama.cpp model pair, and as the checkpoint quantized alike.
    pair = FIXTURE / "gemma3-gguf"
    workers.append(Worker("pair", "--mmproj", str(pair / "mmproj.gguf"), "--model-id", "gemma3-pair", model=str(pair / "text.gguf")))
    workers.append(Worker("q8", "--isq", "q8_0", "--model-id", "gemma3-q8", model=str(FIXTURE / "gemma3")))
    r = Router("vision", [w.grpc for w in workers] + [worker.grpc])
    yield r, workers
    r.stop()
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def oai_v(vision):
    return openai.OpenAI(base_url=f"{vision[0].url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude_v(vision):
    return anthropic.Anthropic(base_url=vision[0].url, api_key="unused", max_retries=0, timeout=120)


def expected_text(case, model="gemma3"):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(FIXTURE / model / "tokenizer.json"))
    return tok.decode(case["greedy"], skip_special_tokens=True)


def openai_messages(case):
    parts = []
    images = iter(case["images"])
    for p in case["messages"][0]["content"]:
        if p["type"] == "image":
            parts.append({"type": "image_url", "image_url": {"url": data_url(next(images))}})
        else:
            parts.append({"type": "text", "text": p["text"]})
    return [{"role": "user", "content": parts}]


@pytest.mark.parametrize("model", ["gemma3", "qwen25vl"])
@pytest.mark.parametrize("name", ["one_image", "two_images"])
def test_openai_chat_with_images_gives_transformers_tokens(oai_v, model, name):
    case = CASES[model][name]
    want = expected_text(case, model)
    r = oai_v.chat.completions.create(model=model, messages=openai_messages(case), max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(case["ids"])
    assert r.choices[0].message.content == want
    stream = oai_v.chat.completions.create(model=model, messages=openai_messages(case), max_tokens=16, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_anthropic_image_blocks_give_transformers_tokens(claude_v):
    case = CASES["gemma3"]["one_image"]
    content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64("chelsea.png")}},
               {"type": "text", "text": "Describe this image."}]
    r = claude_v.messages.create(model="gemma3", max_tokens=16, extra_body={"temperature": 0}, messages=[{"role": "user", "content": content}])
    # Anthropic counts prompt tokens read from the cache apart (the OpenAI cases above cached this prefix).
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(case["ids"])
    text = "".join(b.text for b in r.content if b.type == "text")
    with claude_v.messages.stream(model="gemma3", max_tokens=16, extra_body={"temperature": 0}, messages=[{"role": "user", "content": content}]) as s:
        streamed = "".join(s.text_stream)
    assert text == streamed
    # Same prompt and image as the OpenAI case: the reference's tokens, up to an end of turn.
    assert expected_text(case).startswith(text)


def test_a_llama_cpp_model_pair_serves_images(oai_v):
    """`--mmproj` gives a GGUF language model llama.cpp's vision projector; it answers as
    the checkpoint it was converted from, quantized the same way."""
    for name in ("one_image", "two_images"):
        case = CASES["gemma3"][name]
        answers = [oai_v.chat.completions.create(model=m, messages=openai_messages(case), max_tokens=16, temperature=0,
                                                 extra_body={"ignore_eos": True}) for m in ("gemma3-pair", "gemma3-q8")]
        assert answers[0].usage.prompt_tokens == len(case["ids"])
        assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


def test_models_say_which_take_images(oai_v):
    kinds = {m.id: m.model_extra["input_modalities"] for m in oai_v.models.list().data}
    assert kinds["gemma3"] == kinds["qwen25vl"] == ["text", "image"]
    assert kinds["smollm2"] == ["text"]


def image_request(oai_v, url, model="gemma3", count=1):
    content = [{"type": "image_url", "image_url": {"url": url}}] * count + [{"type": "text", "text": "Describe this image."}]
    return oai_v.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=4)


@pytest.mark.parametrize("url,needle", [
    ("data:image/png;base64," + base64.b64encode((FIXTURE / "images/chelsea.png").read_bytes()[:2000]).decode(), "not a usable image"),
    ("data:image/png;base64," + base64.b64encode(b"this is plain text, not an image").decode(), "not an image in a supported format"),
    ("data:image/png;base64," + base64.b64encode(png(20000, 20000)).decode(), "20000x20000 pixels"),
    ("data:image/png;base64,%%%not-base64", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "media type `text/plain`"),
    ("https://example.com/cat.png", "not fetched"),
])
def test_bad_images_get_a_400_naming_the_problem(oai_v, url, needle):
    with pytest.raises(openai.BadRequestError) as e:
        image_request(oai_v, url)
    assert needle in str(e.value), str(e.value)
    assert "content[0].image_url.url" in str(e.value)


def test_too_many_images_and_text_only_models_are_refused(oai_v):
    with pytest.raises(openai.BadRequestError) as e:
        image_request(oai_v, data_url("strip.png"), count=17)
    assert "at most 16" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        image_request(oai_v, data_url("strip.png"), model="smollm2")
    assert "does not take images" in str(e.value)
    # The worker keeps serving afterwards.
    r = oai_v.chat.completions.create(model="gemma3", messages=openai_messages(CASES["gemma3"]["one_image"]), max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected_text(CASES["gemma3"]["one_image"])


class ImageServer:
    """A local HTTP server for image URLs: real images, a text file, a missing path, a
    response claiming 30 MB, and one that never finishes."""

    def __init__(self):
        import http.server
        import threading
        import time

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                if name == "slow.png":
                    time.sleep(6)
                    return
                if name == "huge.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(30 << 20))
                    self.end_headers()
                    return
                path = FIXTURE / "images" / name
                if name == "notes.txt":
                    body, kind = b"just some text", "text/plain; charset=utf-8"
                elif path.is_file() and name.endswith(".png"):
                    body, kind = path.read_bytes(), "image/png"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def fetching(vision):
    """A router that fetches image URLs, over the same workers."""
    server = ImageServer()
    r = Router("vision-urls", [w.grpc for w in vision[1]], "--allow-image-urls", "--image-url-timeout-secs", "2")
    yield openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=120), server
    r.stop()
    server.server.shutdown()


def test_image_urls_are_fetched_when_allowed(fetching, oai_v):
    client, server = fetching
    case = CASES["gemma3"]["one_image"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{server.url}/chelsea.png"}},
                                             {"type": "text", "text": "Describe this image."}]}]
    r = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected_text(case)


@pytest.mark.parametrize("name,needle", [
    ("notes.txt", "served as `text/plain; charset=utf-8`, not as an image"),
    ("missing.png", "answered 404"),
    ("huge.png", "is 31457280 bytes; the limit is 20971520"),
    ("slow.png", "timed out"),
])
def test_image_url_failures_get_a_400_naming_the_problem(fetching, name, needle):
    client, server = fetching
    with pytest.raises(openai.BadRequestError) as e:
        image_request(client, f"{server.url}/{name}")
    assert needle in str(e.value) and f"{server.url}/{name}" in str(e.value), str(e.value)
