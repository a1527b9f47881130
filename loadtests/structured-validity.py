#!/usr/bin/env python3
"""Validity of structured output on any OpenAI-compatible server: the 20 JSON schemas of
tests/api/schemas, each at temperature 0 and at temperature 1 with seeds 1-3, through
`response_format: {"type": "json_schema"}`. An answer counts as valid when it ends by itself
(`finish_reason: stop`), parses as JSON and validates against its schema (Python jsonschema,
formats checked). Prints one line per schema and the overall rate; the same run against kiln
and llama-server compares them (docs/api.md).

    loadtests/structured-validity.py http://127.0.0.1:8080 smollm2
"""
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import jsonschema

SCHEMAS = sorted((Path(__file__).resolve().parents[1] / "tests/api/schemas").glob("*.json"))
SETTINGS = [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)]


def one(url, model, case, name, temperature, seed):
    body = {"model": model, "messages": [{"role": "user", "content": case["prompt"]}], "temperature": temperature, "max_tokens": 400,
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": case["schema"]}}}
    if seed is not None:
        body["seed"] = seed
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    except httpx.HTTPError as e:
        return f"request failed: {e}"
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    choice = r.json()["choices"][0]
    if choice["finish_reason"] != "stop":
        return f"finish_reason {choice['finish_reason']}"
    try:
        value = json.loads(choice["message"]["content"])
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    validator = jsonschema.Draft202012Validator(case["schema"], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [e.message for e in validator.iter_errors(value)]
    return f"invalid: {errors[0]}" if errors else None


def main():
    url, model = sys.argv[1].rstrip("/"), sys.argv[2]
    total = valid = 0
    for path in SCHEMAS:
        case = json.loads(path.read_text())
        with ThreadPoolExecutor(len(SETTINGS)) as pool:
            problems = list(pool.map(lambda s: one(url, model, case, path.stem[3:], *s), SETTINGS))
        ok = sum(p is None for p in problems)
        total, valid = total + len(problems), valid + ok
        detail = "; ".join(f"T={t} seed={s}: {p}" for (t, s), p in zip(SETTINGS, problems) if p)
        print(f"{path.stem:34} {ok}/{len(problems)} {detail}")
    print(f"valid: {valid}/{total} ({100 * valid / total:.1f}%)")


if __name__ == "__main__":
    main()
