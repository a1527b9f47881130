"""Structured output through the HTTP API on the real model: 20 JSON schemas (tests/api/schemas)
at temperature 0 and at 1 with three seeds, streamed and not, all parse and validate with
Python's jsonschema; regex and Lark grammars (kiln's `grammar` extension) always match;
the official openai client's `parse` with a Pydantic model; bad schemas are 400s naming the
problem; a token limit inside a value is `length`."""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import jsonschema
import lark
import openai
import pydantic
import pytest
import re

SCHEMAS = sorted((Path(__file__).parent / "schemas").glob("*.json"))
SETTINGS = [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)]


def chat(router, model, body, stream):
    body = {"model": model, "max_tokens": 400, **body}
    if not stream:
        r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish = "", None
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                text += c["delta"].get("content") or ""
                finish = c.get("finish_reason") or finish
    return text, finish


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.stem for p in SCHEMAS])
def test_json_schema_outputs_validate(router, model, path):
    case = json.loads(path.read_text())
    validator = jsonschema.Draft202012Validator(case["schema"], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    jobs = []
    for temperature, seed in SETTINGS:
        body = {"messages": [{"role": "user", "content": case["prompt"]}], "temperature": temperature,
                "response_format": {"type": "json_schema", "json_schema": {"name": path.stem[3:], "strict": True, "schema": case["schema"]}}}
        if seed is not None:
            body["seed"] = seed
        jobs += [(body, False), (body, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: chat(router, model, *j), jobs))
    for (body, stream), (text, finish) in zip(jobs, results):
        setting = f"temperature {body['temperature']} seed {body.get('seed')} {'streamed' if stream else 'whole'}"
        assert finish == "stop", f"{setting}: {finish}: {text!r}"
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{setting}: {text!r}: {errors}"
    # The same seed gives the same answer streamed or not.
    for i in range(0, len(results), 2):
        assert results[i] == results[i + 1]


def test_json_object_mode(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give a JSON object with the name and colour of a fruit."}],
                                    response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_regex_grammar_always_matches(router, model):
    rx = r"(0[1-9]|1[0-2]):[0-5][0-9] (am|pm)"
    for seed in range(4):
        r = httpx.post(f"{router.url}/v1/completions", json={"model": model, "prompt": "The meeting starts at", "max_tokens": 20, "temperature": 1,
                                                              "seed": seed, "grammar": {"type": "regex", "value": rx}}, timeout=120)
        assert r.status_code == 200, r.text
        assert re.fullmatch(rx, r.json()["choices"][0]["text"]), r.json()


ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


def test_lark_grammar_always_parses(router, model):
    parser = lark.Lark(ARITHMETIC)
    for seed in range(4):
        body = {"model": model, "messages": [{"role": "user", "content": "Write a short arithmetic expression."}], "max_tokens": 40,
                "temperature": 1, "seed": seed, "grammar": {"type": "lark", "value": ARITHMETIC}}
        r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            parser.parse(choice["message"]["content"])
        else:
            assert choice["finish_reason"] == "length"


class Flight(pydantic.BaseModel):
    origin: str = pydantic.Field(max_length=30)
    destination: str = pydantic.Field(max_length=30)
    passengers: int = pydantic.Field(ge=1, le=9)
    class_of_service: str = pydantic.Field(pattern="^(economy|business|first)$")


def test_openai_client_parse_with_pydantic(oai, model):
    r = oai.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Book a flight from Paris to Rome for two people."}],
                                   response_format=Flight, max_tokens=200, temperature=0)
    flight = r.choices[0].message.parsed
    assert isinstance(flight, Flight), r
    assert 1 <= flight.passengers <= 9 and flight.class_of_service in ("economy", "business", "first")


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}},
     ["uniqueItems", "/properties/tags"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}},
     ["/$defs/nope"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, ["response_format.json_schema.name"]),
    ({"response_format": {"type": "xml"}}, ["response_format.type", "xml"]),
    ({"grammar": {"type": "regex", "value": "[a-"}}, ["regular expression"]),
    ({"grammar": {"type": "lark", "value": "start: missing_rule"}}, ["missing_rule"]),
    ({"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}}, ["grammar", "cannot be combined"]),
    # Compiles, but no text matches it: refused before it runs.
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"$ref": "#"}}}}, ["no output can match it"]),
    ({"grammar": {"type": "lark", "value": "start: start"}}, ["no output can match it"]),
    # Fails after its first token (an object that must contain itself): the request's error.
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}}, ["constrained decoding failed"]),
])
def test_bad_constraints_are_400s_naming_the_problem(router, model, extra, words):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    text = json.dumps(error)
    assert all(w in text for w in words), error
    # The worker stays in service: a bad request is the client's, not the worker's.
    assert httpx.get(f"{router.url}/health").status_code == 200
    ok = httpx.post(f"{router.url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_token_limit_inside_a_value_is_length(router, model):
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 100}}, "required": ["story"]}
    text, finish = chat(router, model, {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 6,
                                       "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}, stream=False)
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
