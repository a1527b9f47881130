"""`/v1/embeddings` through a router to a worker serving all-MiniLM-L6-v2, with the official
openai client: strings, lists, token ids and base64 give the vectors sentence-transformers
gives (goldens: worker/tests/goldens/minilm_embeddings.json, cosine >= 0.9999), usage counts
the tokens read, and bad requests (empty, too long, the wrong kind of model either way) get a
400 that says what is wrong; a dead worker is tried once and then left out."""
import base64
import concurrent.futures
import json
import math
import signal
import struct

import httpx2 as httpx
import openai
import pytest

from conftest import ROOT, Router, Worker

GOLDEN = json.loads((ROOT / "worker/tests/goldens/minilm_embeddings.json").read_text())["cases"]


@pytest.fixture(scope="module")
def embed_worker():
    w = Worker("embed", model="minilm")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def both(worker, embed_worker):
    """A router over the chat worker and the embedding worker."""
    r = Router("both", [worker.grpc, embed_worker.grpc])
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield r, client
    r.stop()


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_texts_and_token_ids_match_sentence_transformers(both):
    router, client = both
    cases = [c for c in GOLDEN if len(c["ids"]) <= 256][:20]
    r = client.embeddings.create(model="minilm", input=[c["text"] for c in cases], encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(cases)))
    assert r.model == "minilm" and r.usage.prompt_tokens == r.usage.total_tokens == sum(len(c["ids"]) for c in cases)
    for d, c in zip(r.data, cases):
        assert len(d.embedding) == 384
        assert cosine(d.embedding, c["embedding"]) >= 0.9999, c["text"]
    # One string; token ids (as sentence-transformers' tokenizer makes them); base64, which
    # the client asks for by default and decodes: all the same vector.
    one = client.embeddings.create(model="minilm", input=cases[0]["text"], encoding_format="float").data[0].embedding
    by_ids = client.embeddings.create(model="minilm", input=cases[0]["ids"], encoding_format="float").data[0].embedding
    default = client.embeddings.create(model="minilm", input=[cases[0]["text"]]).data[0].embedding
    assert one == by_ids == default == r.data[0].embedding
    raw = httpx.post(f"{router.url}/v1/embeddings", json={"model": "minilm", "input": [cases[0]["ids"], cases[1]["ids"]], "encoding_format": "base64"}).json()
    decoded = [list(struct.unpack(f"<{384}f", base64.b64decode(d["embedding"]))) for d in raw["data"]]
    assert decoded == [r.data[0].embedding, r.data[1].embedding]


def test_concurrent_requests_get_their_own_vectors(both):
    _, client = both
    texts = [c["text"] for c in GOLDEN[:24]]
    alone = [client.embeddings.create(model="minilm", input=t, encoding_format="float").data[0].embedding for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: client.embeddings.create(model="minilm", input=t, encoding_format="float").data[0].embedding, texts))
    assert together == alone


def test_long_inputs_are_refused_or_cut_on_request(both):
    router, client = both
    long = next(c for c in GOLDEN if c["text"].startswith("token token"))
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input=["short", long["text"]])
    assert "`input[1]`: has" in e.value.message and "reads at most 256" in e.value.message and "truncate" in e.value.message
    r = client.embeddings.create(model="minilm", input=long["text"], encoding_format="float", extra_body={"truncate": True})
    assert r.usage.prompt_tokens == 256
    assert cosine(r.data[0].embedding, long["embedding"]) >= 0.9999


@pytest.mark.parametrize("body, message", [
    ({"input": ""}, "`input`: is an empty string"),
    ({"input": []}, "`input`: is an empty array"),
    ({"input": ["ok", ""]}, "`input[1]`: is an empty string"),
    ({"input": [[101, 102], []]}, "`input[1]`: is an empty array of token ids"),
    ({"input": [101, 99999999]}, "`input[1]`: 99999999 is not a token id of this model"),
    ({"input": [{"text": "x"}]}, "`input[0]`: expected a string or an array of token ids"),
    ({"input": "x", "encoding_format": "int8"}, "`encoding_format`: `int8` is not one of float, base64"),
    ({"input": "x", "dimensions": 128}, "returns 384 dimensions and was not trained to be shortened"),
    ({"input": ["x"] * 2049}, "2049 inputs; at most 2048"),
    ({}, "`input`: is required"),
])
def test_bad_requests_say_what_is_wrong(both, body, message):
    router, _ = both
    r = httpx.post(f"{router.url}/v1/embeddings", json={"model": "minilm", **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_the_wrong_kind_of_model_is_named(both, model):
    router, client = both
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model, input="hello")
    assert f"`{model}` generates text; it is not an embedding model (embedding models: minilm)" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "Hi"}])
    assert "`minilm` is an embedding model; it does not generate text" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="minilm", prompt="Hi")
    assert "is an embedding model" in e.value.message
    kinds = {m["id"]: (m["kind"], m.get("dimensions")) for m in httpx.get(f"{router.url}/v1/models").json()["data"]}
    assert kinds == {"minilm": ("embedding", 384), model: ("generation", None)}
    assert client.embeddings.create(model="minilm", input="x", dimensions=384).data[0].embedding


def test_worker_metrics_count_embeddings(both, embed_worker):
    _, client = both
    before = embed_worker.metric("kiln_worker_embed_inputs_total")
    client.embeddings.create(model="minilm", input=["one", "two", "three"])
    assert embed_worker.metric("kiln_worker_embed_inputs_total") == before + 3
    assert embed_worker.metric("kiln_worker_embed_waiting_requests") == 0


def test_kilnctl_embed_prints_the_api_vectors(both):
    import subprocess
    from conftest import BIN
    router, client = both
    texts = [GOLDEN[0]["text"], GOLDEN[1]["text"]]
    p = subprocess.run([str(BIN / "kilnctl"), "--router", router.url, "embed", *texts], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    printed = [json.loads(line) for line in p.stdout.splitlines()]
    api = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert printed == [d.embedding for d in api.data]
    p = subprocess.run([str(BIN / "kilnctl"), "--router", router.url, "embed", "-m", "smollm2", "x"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "is not an embedding model" in p.stderr, p.stderr


def test_a_dead_worker_is_tried_once_then_left_out():
    """Two embedding workers; one is killed. The first request sent there fails over to the
    other and marks it down, so the requests right after it (well inside the router's
    one-second health check) go straight to the live one: at most one upstream error."""
    live, doomed = Worker("embed-live", model="minilm"), Worker("embed-doomed", model="minilm")
    router = Router("embed-failover", [live.grpc, doomed.grpc])
    try:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        want = client.embeddings.create(model="minilm", input="a dead worker").data[0].embedding
        # Static workers are named by their address in the router's series.
        assert f'kiln_router_worker_up{{worker="{doomed.grpc}"}} 1' in httpx.get(f"{router.url}/metrics").text
        doomed.stop(signal.SIGKILL)
        for _ in range(8):
            got = client.embeddings.create(model="minilm", input="a dead worker").data[0].embedding
            assert cosine(got, want) > 0.99999
        text = httpx.get(f"{router.url}/metrics").text
        errors = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                     if l.startswith(f'kiln_router_upstream_errors_total{{worker="{doomed.grpc}"}}'))
        assert errors <= 1, f"the dead worker was tried {errors:.0f} times:\n{text}"
    finally:
        router.stop()
        live.stop()
        doomed.stop()
