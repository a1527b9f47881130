"""OpenAI's Responses API (`/v1/responses`) driven by the official `openai` client on the real
model: the same answers as chat for the same conversation (text, usage, log-probabilities),
streams whose typed events assemble the same response, a function call fed back with its
output, structured output parsed by the client, and what kiln cannot do refused by field."""
import json

import jsonschema
import openai
import pydantic
import pytest

QUESTION = "Name three colors of the rainbow."
SYSTEM = "You answer in one short sentence."
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER, "strict": True}}


def chat_text(oai, model, messages, **kw):
    r = oai.chat.completions.create(model=model, messages=messages, temperature=0, **kw)
    return r, r.choices[0].message.content


def test_a_response_answers_as_chat_does(oai, model):
    r = oai.responses.create(model=model, instructions=SYSTEM, input=QUESTION, max_output_tokens=40, temperature=0)
    chat, text = chat_text(oai, model, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}], max_tokens=40)
    assert r.output_text and r.output_text == text
    assert r.status == ("completed" if chat.choices[0].finish_reason == "stop" else "incomplete")
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.store is False and r.instructions == SYSTEM and r.model == model
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"


def test_max_output_tokens_makes_an_incomplete_response(oai, model):
    r = oai.responses.create(model=model, input="Write a long story about a dragon.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output_text


def test_stream_events_assemble_the_unstreamed_response(oai, model):
    whole = oai.responses.create(model=model, input=QUESTION, max_output_tokens=30, temperature=0)
    kinds, deltas = [], []
    with oai.responses.stream(model=model, input=QUESTION, max_output_tokens=30, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert "".join(deltas) == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.usage.input_tokens == whole.usage.input_tokens
    # The plain `stream=True` iterator sees the same events, numbered in order.
    numbers = [e.sequence_number for e in oai.responses.create(model=model, input=QUESTION, max_output_tokens=30, temperature=0, stream=True)]
    assert numbers == list(range(len(kinds)))


def test_logprobs_equal_chats(oai, model):
    r = oai.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0, top_logprobs=2,
                             include=["message.output_text.logprobs"])
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    ours = r.output[0].content[0].logprobs
    theirs = chat.choices[0].logprobs.content
    assert [t.token for t in ours] == [t.token for t in theirs] and len(ours) == 8
    for a, b in zip(ours, theirs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [x.token for x in a.top_logprobs] == [x.token for x in b.top_logprobs]


def test_a_function_call_and_its_output_continue_as_chat_does(oai, model):
    ask = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    r = oai.responses.create(model=model, input=ask, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, temperature=0,
                             max_output_tokens=100)
    assert r.status == "completed", r
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == len(r.output) == 1
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    # The client sends the calls back as they came, with their outputs.
    followed = ask + [item.model_dump(exclude_none=True) for item in r.output]
    followed += [{"type": "function_call_output", "call_id": c.call_id, "output": "18 degrees celsius, sunny"} for c in calls]
    answer = oai.responses.create(model=model, input=followed, tools=[TOOL], tool_choice="none", temperature=0, max_output_tokens=40)
    assert answer.output[0].type == "message" and answer.output_text
    # The same conversation through chat gets the same answer.
    messages = ask + [{"role": "assistant", "content": None,
                       "tool_calls": [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}]
    messages += [{"role": "tool", "tool_call_id": c.call_id, "content": "18 degrees celsius, sunny"} for c in calls]
    _, text = chat_text(oai, model, messages, tools=[CHAT_TOOL], tool_choice="none", max_tokens=40)
    assert answer.output_text == text


def test_streamed_function_call_arguments_add_up(oai, model):
    with oai.responses.stream(model=model, input="Weather in Rome, in celsius?", tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"},
                              temperature=0, max_output_tokens=100) as stream:
        fragments = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and "".join(fragments) == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER)


class Rainbow(pydantic.BaseModel):
    # Bounded, so that greedy decoding of a small model cannot list colors until the budget ends.
    colors: list[pydantic.constr(max_length=20)] = pydantic.Field(min_length=1, max_length=3)
    count: int


def test_structured_output_parses_into_the_clients_type(oai, model):
    r = oai.responses.parse(model=model, input=QUESTION, text_format=Rainbow, temperature=0, max_output_tokens=120)
    assert r.status == "completed", r
    assert isinstance(r.output_parsed, Rainbow)
    jsonschema.validate(json.loads(r.output_text), Rainbow.model_json_schema())


def test_what_kiln_cannot_do_is_refused_by_field(oai, model):
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=model, input=QUESTION, previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id" and "input" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=model, input=QUESTION, tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_123")
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=model, input=[{"type": "function_call_output", "call_id": "call_1", "output": "x"}])
    assert e.value.body["param"] == "input[0].call_id"


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    celsius: int


def test_an_openai_agents_sdk_agent_runs_on_kiln(router, model):
    """OpenAI's Agents SDK talks to the Responses API: a tool-using agent (whole and streamed)
    and an agent with a typed output run unchanged."""
    import asyncio
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.models.openai_responses import OpenAIResponsesModel

    set_tracing_disabled(True)
    called = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        called.append(city)
        return f"18 degrees celsius and sunny in {city}"

    async def run():
        llm = OpenAIResponsesModel(model=model, openai_client=openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0))
        agent = Agent(name="weather", instructions="Use the tool to answer weather questions.", tools=[get_weather], model=llm,
                      model_settings=ModelSettings(temperature=0, max_tokens=120, tool_choice="required", parallel_tool_calls=False),
                      tool_use_behavior="stop_on_first_tool")
        whole = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
        streamed = Runner.run_streamed(agent, "What is the weather in Rome?", max_turns=2)
        deltas = [e async for e in streamed.stream_events() if e.type == "raw_response_event" and e.data.type == "response.function_call_arguments.delta"]
        typed = Agent(name="typed", instructions="Report the weather: Paris, 18 degrees celsius.", model=llm, output_type=Forecast,
                      model_settings=ModelSettings(temperature=0, max_tokens=80))
        return whole, streamed, deltas, await Runner.run(typed, "Weather report please.", max_turns=1)

    whole, streamed, deltas, typed = asyncio.run(run())
    assert len(called) == 2 and all(called), called
    assert whole.final_output == f"18 degrees celsius and sunny in {called[0]}"
    assert streamed.final_output == f"18 degrees celsius and sunny in {called[1]}" and deltas
    assert isinstance(typed.final_output, Forecast)
