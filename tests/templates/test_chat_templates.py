"""Real chat templates rendered by kiln (`kiln-worker template`) equal what transformers'
`apply_chat_template` renders (its Jinja2 environment, through `render_jinja_template`) from
the same template and conversation, byte for byte; where transformers raises (a template's
own `raise_exception`), kiln fails too.

The corpus (scripts/template-corpus.sh) is fetched from PyPI: llama.cpp's collection of real
templates (Llama 3.x, Mistral, Qwen 2.5/3, Phi, Gemma, DeepSeek, SmolLM3, Granite, Kimi,
gpt-oss, ...), the templates named in its chat-template test, and llama-cpp-python's own.
"""
import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("KILN_BIN_DIR", ROOT / "target" / "release")) / "kiln-worker"
BOS, EOS = "<BOS>", "<EOS>"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}

# (name, variables): every template is rendered for each.
CONVERSATIONS = [
    ("single_user", {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True}),
    ("system_and_user", {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": True}),
    ("multi_turn", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello! How can I help?"},
                                 {"role": "user", "content": "Name a river."}], "add_generation_prompt": True}),
    ("ends_with_assistant", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                             "add_generation_prompt": False}),
    ("odd_text", {"messages": [{"role": "user", "content": "  Ünïcödé — 日本語 🤖\n\n \"quotes\" 'apostrophes' \\ {{ braces }} {% raw %}  "}],
                  "add_generation_prompt": True}),
    ("tools_offered", {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL],
                       "add_generation_prompt": True}),
    ("tool_round_trip", {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                      {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                                      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                                       "content": "{\"temperature\": 21}"}],
                         "tools": [WEATHER_TOOL], "add_generation_prompt": True}),
    ("thinking_off", {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True, "enable_thinking": False}),
]

# Templates kiln cannot render, with the feature its error must name.
UNSUPPORTED = {"meetkai-functionary-medium-v3.1": "Markup concatenation"}


def corpus_dir():
    out = subprocess.run([str(ROOT / "scripts" / "template-corpus.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def load_corpus():
    d = corpus_dir()
    templates = {}
    for f in sorted((d / "vendor/llama.cpp/models/templates").glob("*.jinja")):
        templates[f.stem] = f.read_text()
    # The chat-template test names each template next to its source, as a C string literal.
    cpp = (d / "vendor/llama.cpp/tests/test-chat-template.cpp").read_text()
    pairs = re.findall(r'/\* \.name= \*/ "((?:[^"\\]|\\.)*)",\s*(?://[^\n]*\n\s*)*/\* \.template_str= \*/ (?:u8)?("(?:[^"\\]|\\.)*")', cpp)
    for name, literal in pairs:
        key = "test-chat-template: " + name
        templates[key] = ast.literal_eval(literal)
    module = ast.parse((d / "llama_cpp/llama_chat_format.py").read_text())
    for node in module.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else ""
            if name.endswith("_CHAT_TEMPLATE"):
                templates["llama-cpp-python: " + name] = node.value.value
    # The templates of the known models, as their GGUF files carry them.
    for model in ["smollm2", "gemma3"]:
        out = subprocess.run([str(BIN), "template", "-m", model, "--source"], check=True, capture_output=True)
        templates[f"kiln model: {model}"] = out.stdout.decode()
    return templates


TEMPLATES = load_corpus()


def reference(template, variables):
    v = dict(variables)
    messages = v.pop("messages")
    tools = v.pop("tools", None)
    agp = v.pop("add_generation_prompt")
    try:
        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template, add_generation_prompt=agp,
                                            bos_token=BOS, eos_token=EOS, **v)
        return rendered[0], None
    except Exception as e:  # the template's raise_exception, or a Jinja error
        return None, f"{type(e).__name__}: {e}"


def kiln(template_file, variables):
    v = {"tools": None, "documents": None, **variables}
    p = subprocess.run([str(BIN), "template", "--template", str(template_file), "--bos-token", BOS, "--eos-token", EOS, "--input", "-"],
                       input=json.dumps(v).encode(), capture_output=True, timeout=30)
    if p.returncode != 0:
        return None, p.stderr.decode(errors="replace").strip()
    return p.stdout.decode(), None


def test_the_corpus_covers_the_popular_families():
    names = " ".join(TEMPLATES).lower()
    print(f"{len(TEMPLATES)} templates in the corpus")
    for family in ["llama-3.1", "llama-3.2", "mistral", "qwen2.5", "qwen3", "phi-3", "phi-4", "gemma", "deepseek", "smollm3",
                   "granite", "command-r", "hermes", "gpt-oss", "kimi", "smollm2", "gemma3"]:
        assert family in names, f"no {family} template in the corpus"
    assert len(TEMPLATES) >= 100, len(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_renders_like_transformers(name, tmp_path):
    template = TEMPLATES[name]
    path = tmp_path / "template.jinja"
    path.write_text(template)
    rendered = failed = no_reference = 0
    problems = []
    for case, variables in CONVERSATIONS:
        want, want_err = reference(template, variables)
        got, got_err = kiln(path, variables)
        if want_err is not None and want_err.startswith("TypeError"):
            # Python itself fails (iterating None, serializing a generator): there is no
            # reference text; kiln treats None as empty and generators as lists.
            no_reference += 1
        elif want_err is not None:
            failed += 1
            if got_err is None:
                problems.append(f"{case}: transformers raised ({want_err}) but kiln rendered {got!r}")
        elif got_err is not None:
            feature = UNSUPPORTED.get(name)
            if feature is None or feature not in got_err:
                problems.append(f"{case}: kiln failed ({got_err}) where transformers rendered {want!r}")
        else:
            rendered += 1
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                problems.append(f"{case}: differs at byte {at}: kiln {got[max(0, at - 40):at + 40]!r} vs transformers "
                                f"{want[max(0, at - 40):at + 40]!r}")
    print(f"{name}: {rendered} conversations rendered identically, {failed} refused by the template in both, "
          f"{no_reference} without a reference (Python fails)")
    assert rendered + failed > 0 or name in UNSUPPORTED, f"{name}: nothing was compared"
    assert not problems, f"{name}:\n" + "\n".join(problems)
