"""Tool calling through the official openai and anthropic clients on the real model: strict
and forced calls whose arguments validate, the same calls streamed as argument deltas,
`auto` answering either text or a well-formed call, tool results fed back to a final answer,
and tool definitions or messages that cannot work refused with 400s naming the field."""
import json

import httpx2 as httpx
import jsonschema
import openai
import pydantic
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}}, "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone", "parameters": TIME, "strict": True}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def check_call(name, arguments):
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_strict_calls_validate(oai, model):
    for seed in range(3):
        r = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, seed=seed, max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason in ("tool_calls", "length"), choice
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            check_call(call.function.name, call.function.arguments)


def test_named_call_and_its_stream(oai, model):
    whole = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        temperature=0, max_tokens=100)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time"
    check_call(call.function.name, call.function.arguments)
    # Streamed: the name first, then argument fragments that add up to the same arguments.
    calls, finish = {}, None
    for chunk in oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True, temperature=0, max_tokens=100,
                                             tool_choice={"type": "function", "function": {"name": "get_time"}}):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(call.function.name, call.function.arguments)]
    assert calls[0]["id"].startswith("call_")


def test_one_call_when_parallel_calls_are_off(router, model):
    body = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0, "max_tokens": 200}
    r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=120).json()
    assert len(r["choices"][0]["message"]["tool_calls"]) == 1 and r["choices"][0]["finish_reason"] == "tool_calls", r


def test_auto_answers_text_or_a_valid_call(oai, model):
    questions = ["What is the weather like in Paris right now?", "Tell me a joke about cats.", "What time is it in Europe/Berlin?"]
    for q in questions:
        for seed in range(2):
            r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], tools=TOOLS, temperature=1, seed=seed, max_tokens=120)
            m = r.choices[0].message
            if m.tool_calls:
                assert r.choices[0].finish_reason in ("tool_calls", "length")
                for call in m.tool_calls[:-1] if r.choices[0].finish_reason == "length" else m.tool_calls:
                    check_call(call.function.name, call.function.arguments)
            else:
                assert isinstance(m.content, str) and not m.content.lstrip().startswith("<tool_call>")


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    days: int = pydantic.Field(ge=1, le=7)


def test_openai_parse_with_a_pydantic_function_tool(oai, model):
    r = oai.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Forecast for Rome for the next three days."}],
                                   tools=[openai.pydantic_function_tool(Forecast)], tool_choice="required", parallel_tool_calls=False,
                                   temperature=0, max_tokens=100)
    [call] = r.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Forecast), call


def test_tool_result_flows_back_to_a_final_answer(oai, model):
    first = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        temperature=0, max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "condition": "sunny"})},
    ]
    final = oai.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60)
    m = final.choices[0].message
    assert not m.tool_calls and m.content.strip(), final


@pytest.mark.parametrize("change, field", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]}, "tools[0].function.name"),
    ({"tools": TOOLS + [TOOLS[0]]}, "tools[2].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "array", "uniqueItems": True}}}], "tool_choice": "required"}, None),
])
def test_bad_tool_requests_are_400s(router, model, change, field):
    body = {"model": model, "messages": ASK, "max_tokens": 5, **change}
    r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    if field:
        assert r.json()["error"]["param"] == field, r.json()
    else:
        assert "uniqueItems" in r.json()["error"]["message"]


CLAUDE_TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER, "strict": True}]


def test_anthropic_forced_tool_use_whole_and_streamed(claude, model):
    kwargs = dict(model=model, max_tokens=100, extra_body={"temperature": 0}, tools=CLAUDE_TOOLS, tool_choice={"type": "tool", "name": "get_weather"},
                  messages=[{"role": "user", "content": "Weather in Oslo?"}])
    whole = claude.messages.create(**kwargs)
    assert whole.stop_reason == "tool_use"
    [block] = whole.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER)
    with claude.messages.stream(**kwargs) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", block.name, block.input)]


def test_anthropic_tool_result_flows_back(claude, model):
    r = claude.messages.create(model=model, max_tokens=60, extra_body={"temperature": 0}, tools=CLAUDE_TOOLS, tool_choice={"type": "none"}, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 degrees"}]},
    ])
    assert r.content[0].type == "text" and r.content[0].text.strip() and r.stop_reason in ("end_turn", "max_tokens")
    count = claude.messages.count_tokens(model=model, tools=CLAUDE_TOOLS, messages=[{"role": "user", "content": "Weather in Oslo?"}])
    plain = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert count.input_tokens > plain.input_tokens, "the tool definitions are part of the prompt"


def test_anthropic_any_tool_calls_validate(claude, model):
    for seed_question in ["Weather in Oslo?", "Is it raining in Lima?"]:
        r = claude.messages.create(model=model, max_tokens=150, extra_body={"temperature": 1}, tools=CLAUDE_TOOLS, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   messages=[{"role": "user", "content": seed_question}])
        assert r.stop_reason == "tool_use" and len(r.content) == 1
        jsonschema.validate(r.content[0].input, WEATHER)
