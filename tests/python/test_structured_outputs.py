"""Structured outputs, tool calls and logit_bias on a local model, through the
official openai Python package as a real client of a running `qpai serve`.

Run by the Rust integration test `openai_client` (which starts the server and
sets QPAI_BASE_URL and QPAI_MODEL). The JSON schema corpus is
tests/fixtures/schemas/*.json, one `{"name", "prompt", "strict", "schema"}`
object per file; every string and array in it is bounded so that a whole
answer fits in CORPUS_MAX_TOKENS.
"""

import concurrent.futures
import json
import os
from pathlib import Path

import openai
import pytest
from jsonschema import Draft202012Validator
from openai import OpenAI
from pydantic import BaseModel, Field

BASE_URL = os.environ["QPAI_BASE_URL"]
MODEL = os.environ.get("QPAI_MODEL", "smollm2-135m-instruct")
ADAPTER = f"{MODEL}:house-style"

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "schemas"
CORPUS = [json.loads(path.read_text()) for path in sorted(SCHEMA_DIR.glob("*.json"))]
BY_NAME = {entry["name"]: entry for entry in CORPUS}
CORPUS_MAX_TOKENS = 1000
# The server batches up to 8 sequences.
WORKERS = 8


def user(text):
    return [{"role": "user", "content": text}]


MESSAGES = user("What is the capital of France?")


@pytest.fixture(scope="module")
def client():
    return OpenAI(base_url=BASE_URL, api_key="not-needed", max_retries=0, timeout=300)


def validator(schema):
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(schema, text):
    """Why `text` is not a JSON document valid under `schema`; empty when it is."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as error:
        return [f"not JSON: {error}"]
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator(schema).iter_errors(value)
    ]


def json_schema_format(entry):
    return {
        "type": "json_schema",
        "json_schema": {"name": entry["name"], "schema": entry["schema"], "strict": entry["strict"]},
    }


def streamed_text(chunks):
    """The text and the finish reasons of a streamed single-choice answer."""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes


# --- the schema corpus ------------------------------------------------------


def test_the_corpus_is_well_formed():
    assert len(CORPUS) >= 32
    assert len(BY_NAME) == len(CORPUS), "schema names must be unique"
    for entry in CORPUS:
        Draft202012Validator.check_schema(entry["schema"])
        assert entry["schema"]["type"] == "object", entry["name"]


def corpus_answer(client, entry, stream):
    """(text, finish_reason) of one corpus request, whole or streamed."""
    kwargs = dict(
        model=MODEL,
        messages=user(entry["prompt"]),
        temperature=0,
        max_tokens=CORPUS_MAX_TOKENS,
        response_format=json_schema_format(entry),
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    text, finishes = streamed_text(list(client.chat.completions.create(stream=True, **kwargs)))
    # More than one finish reason shows up as e.g. "stop,stop" and fails.
    return text, ",".join(finishes) or None


def test_every_corpus_schema_gives_valid_json_whole_and_streamed(client):
    jobs = [(entry, stream) for entry in CORPUS for stream in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            (entry["name"], stream): pool.submit(corpus_answer, client, entry, stream)
            for entry, stream in jobs
        }
    answers = {}
    for key, future in futures.items():
        try:
            answers[key] = future.result()
        except Exception as error:  # reported with the others below
            answers[key] = (f"<{type(error).__name__}: {error}>", "error")
    failures = []
    valid = 0
    for entry in CORPUS:
        name = entry["name"]
        for stream in (False, True):
            text, finish = answers[(name, stream)]
            problems = [] if finish == "stop" else [f"finish_reason {finish!r}"]
            problems += schema_errors(entry["schema"], text)
            if problems:
                kind = "streamed" if stream else "whole"
                failures.append(f"{name} ({kind}, finish_reason {finish!r}): {problems}\n    text: {text!r}")
            else:
                valid += 1
        whole, streamed = answers[(name, False)][0], answers[(name, True)][0]
        if whole != streamed:
            failures.append(f"{name}: the streamed text differs from the whole text\n"
                            f"    whole:    {whole!r}\n    streamed: {streamed!r}")
    summary = f"{valid}/{len(jobs)} valid"
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)


def test_json_object_mode_gives_a_json_object(client):
    kwargs = dict(
        model=MODEL,
        messages=user("Describe a coffee shop as a JSON object with the keys name, city and rating."),
        temperature=0,
        max_tokens=300,
        response_format={"type": "json_object"},
    )
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    text, finishes = streamed_text(list(client.chat.completions.create(stream=True, **kwargs)))
    assert finishes == ["stop"]
    assert text == choice.message.content


def test_several_sampled_choices_are_each_valid(client):
    entry = BY_NAME["brand_palette"]
    r = client.chat.completions.create(
        model=MODEL,
        messages=user(entry["prompt"]),
        temperature=0.9,
        seed=7,
        n=3,
        max_tokens=CORPUS_MAX_TOKENS,
        response_format=json_schema_format(entry),
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert not schema_errors(entry["schema"], choice.message.content), (
            choice.message.content,
            schema_errors(entry["schema"], choice.message.content),
        )


def test_a_schema_with_a_lora_adapter(client):
    entry = BY_NAME["product_copy"]
    r = client.chat.completions.create(
        model=ADAPTER,
        messages=user(entry["prompt"]),
        temperature=0,
        max_tokens=CORPUS_MAX_TOKENS,
        response_format=json_schema_format(entry),
    )
    assert r.model == ADAPTER
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    errors = schema_errors(entry["schema"], choice.message.content)
    assert not errors, (choice.message.content, errors)


class SeoMeta(BaseModel):
    title: str = Field(max_length=60)
    description: str = Field(max_length=155)
    # On a list, pydantic's max_length becomes the schema's maxItems.
    keywords: list[str] = Field(max_length=5)


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=user("Write SEO meta tags for the home page of a bicycle repair shop as JSON."),
        response_format=SeoMeta,
        max_tokens=400,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    parsed = choice.message.parsed
    assert isinstance(parsed, SeoMeta), choice.message.content
    assert len(parsed.title) <= 60 and len(parsed.description) <= 155 and len(parsed.keywords) <= 5
    assert json.loads(choice.message.content) == parsed.model_dump()


# --- tool calls ---------------------------------------------------------------

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH_PARAMS = {
    "type": "object",
    "properties": {
        # Bounded: a 135M model forced to this tool for a weather question can
        # repeat itself in the query until max_tokens (greedy paths differ with
        # the CPU's kernel level); the grammar then ends the string in time.
        "query": {"type": "string", "description": "What to look for", "maxLength": 80},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
    },
    "required": ["query"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": WEATHER_PARAMS,
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_products",
            "description": "Search the shop's product catalog.",
            "parameters": SEARCH_PARAMS,
        },
    },
]
TOOL_PARAMS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
WEATHER_QUESTION = user("What is the weather in Paris right now? Use celsius.")
TOOL_MAX_TOKENS = 200


def checked_arguments(name, arguments):
    """The parsed arguments of a call to `name`, checked against its parameters."""
    assert name in TOOL_PARAMS, name
    value = json.loads(arguments)
    errors = [e.message for e in validator(TOOL_PARAMS[name]).iter_errors(value)]
    assert not errors, (name, arguments, errors)
    return value


def checked_call(call):
    """(id, name, parsed arguments) of a well-formed tool call of a whole answer."""
    assert call.id, call
    assert call.type == "function", call
    return call.id, call.function.name, checked_arguments(call.function.name, call.function.arguments)


def run_tool(name, arguments):
    if name == "get_weather":
        return {"city": arguments["city"], "temp": 18, "unit": arguments["unit"], "sky": "cloudy"}
    return {"results": [{"name": "Trail running shoe", "price": 89.0}]}


def tool_results(calls):
    return [
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(run_tool(name, arguments))}
        for call_id, name, arguments in calls
    ]


def assert_text_answer(choice):
    assert choice.finish_reason in ("stop", "length"), choice
    assert isinstance(choice.message.content, str) and choice.message.content.strip(), choice
    assert not choice.message.tool_calls, choice


@pytest.fixture(scope="module")
def required_weather_answer(client):
    return client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=TOOL_MAX_TOKENS,
    )


def test_tool_call_round_trip(client, required_weather_answer):
    choice = required_weather_answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    message = choice.message
    assert message.role == "assistant"
    assert message.content is None, message
    assert message.tool_calls, message
    calls = [checked_call(call) for call in message.tool_calls]
    assert len({call_id for call_id, _, _ in calls}) == len(calls), "tool call ids must differ"
    # The assistant message goes back as the SDK returned it.
    messages = WEATHER_QUESTION + [message.model_dump(exclude_none=True)] + tool_results(calls)
    follow_up = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=150,
    )
    assert_text_answer(follow_up.choices[0])


def streamed_tool_calls(chunks):
    """The calls of a streamed answer by index, checking the OpenAI delta shape:
    the first delta of a call carries its id, type and name, later ones only
    argument fragments."""
    calls = {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function", delta
                assert delta.function is not None and delta.function.name in TOOL_PARAMS, delta
                calls[delta.index] = {
                    "id": delta.id,
                    "name": delta.function.name,
                    "arguments": delta.function.arguments or "",
                }
            else:
                assert delta.id is None and delta.function is not None, delta
                assert delta.function.name is None, delta
                assert isinstance(delta.function.arguments, str), delta
                calls[delta.index]["arguments"] += delta.function.arguments
    assert sorted(calls) == list(range(len(calls))), sorted(calls)
    return [calls[i] for i in range(len(calls))]


def test_streamed_tool_call_round_trip(client, required_weather_answer):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=WEATHER_QUESTION,
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            max_tokens=TOOL_MAX_TOKENS,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text, finishes = streamed_text(chunks)
    assert text == "", text
    assert finishes == ["tool_calls"]
    calls = streamed_tool_calls(chunks)
    assert calls
    parsed = [(c["name"], checked_arguments(c["name"], c["arguments"])) for c in calls]
    whole = [
        (call.function.name, json.loads(call.function.arguments))
        for call in required_weather_answer.choices[0].message.tool_calls
    ]
    assert parsed == whole
    # The assistant message goes back as a plain dict, with an explicit null content.
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ],
    }
    results = tool_results([(c["id"], name, args) for c, (name, args) in zip(calls, parsed)])
    follow_up = list(
        client.chat.completions.create(
            model=MODEL,
            messages=WEATHER_QUESTION + [assistant] + results,
            tools=TOOLS,
            tool_choice="none",
            temperature=0,
            max_tokens=150,
            stream=True,
        )
    )
    text, finishes = streamed_text(follow_up)
    assert text.strip(), follow_up
    assert len(finishes) == 1 and finishes[0] in ("stop", "length"), finishes
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in follow_up)


def test_a_named_tool_choice_forces_that_function(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "search_products"}},
        temperature=0,
        max_tokens=TOOL_MAX_TOKENS,
    )
    choice = r.choices[0]
    # OpenAI answers a forced function with finish_reason "stop"; "tool_calls" is as good.
    assert choice.finish_reason in ("tool_calls", "stop"), choice
    assert choice.message.content is None, choice.message
    assert choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        _, name, _ = checked_call(call)
        assert name == "search_products", call


def test_parallel_tool_calls_false_gives_one_call(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("What is the weather in Paris and in London right now? Use celsius."),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=TOOL_MAX_TOKENS,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1, choice.message
    checked_call(choice.message.tool_calls[0])


def test_auto_tool_choice_gives_text_or_valid_calls(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="auto",
        temperature=0,
        max_tokens=TOOL_MAX_TOKENS,
    )
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            checked_call(call)
    else:
        assert_text_answer(choice)


def test_none_tool_choice_gives_text(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=100,
    )
    assert_text_answer(r.choices[0])


# --- logit_bias ---------------------------------------------------------------

# "Hello" in SmolLM2's vocabulary; the test learns the token's text from the server.
FORCED_TOKEN = 19556
# SmolLM2's special tokens, which end a chat answer.
END_TOKENS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}


def token_text(client, token_id):
    """The text of one token: /v1/completions echoes the prompt (here a single
    token id) before the continuation, so it is the echoed text less the
    continuation."""
    kwargs = dict(model=MODEL, prompt=[token_id], max_tokens=1, temperature=0)
    echoed = client.completions.create(echo=True, **kwargs).choices[0].text
    continuation = client.completions.create(**kwargs).choices[0].text
    assert echoed.endswith(continuation), (echoed, continuation)
    return echoed[: len(echoed) - len(continuation)]


def test_a_positive_logit_bias_forces_a_token(client):
    text = token_text(client, FORCED_TOKEN)
    assert text.strip(), text
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        logit_bias={str(FORCED_TOKEN): 100},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == text * 3, (text, choice.message.content)


def test_a_negative_logit_bias_bans_the_end_tokens(client):
    for token_id, name in END_TOKENS.items():
        echoed = client.completions.create(
            model=MODEL, prompt=[token_id], max_tokens=1, temperature=0, echo=True
        ).choices[0].text
        assert echoed.startswith(name), (token_id, echoed)
    # A question the model answers briefly and ends by itself.
    question = user("What is 2+2?")
    plain = client.chat.completions.create(model=MODEL, messages=question, max_tokens=200, temperature=0)
    assert plain.choices[0].finish_reason == "stop", plain.choices[0].message.content
    limit = plain.usage.completion_tokens + 10
    banned = client.chat.completions.create(
        model=MODEL,
        messages=question,
        max_tokens=limit,
        temperature=0,
        logit_bias={str(token_id): -100 for token_id in END_TOKENS},
    )
    # Greedy decoding picks the same tokens up to where it would have ended,
    # then has to go on until max_tokens.
    assert banned.choices[0].finish_reason == "length"
    assert banned.usage.completion_tokens == limit
    before, after = plain.choices[0].message.content, banned.choices[0].message.content
    assert after.startswith(before) and len(after) > len(before), (before, after)


# --- bad input ----------------------------------------------------------------

SMALL_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 20}},
    "required": ["name"],
    "additionalProperties": False,
}


def nested_schema(levels):
    schema = {"type": "string", "maxLength": 5}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


def function_tool(name):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def schema_format(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}

# (case, request fields, the error's param, whether param only starts with it)
BAD_REQUESTS = [
    ("schema_not_an_object", {"response_format": schema_format("x", 5)}, "response_format", True),
    ("unknown_response_format_type", {"response_format": {"type": "xml"}}, "response_format", True),
    (
        "json_schema_without_name",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SMALL_SCHEMA}}},
        "response_format",
        True,
    ),
    ("bad_tool_name", {"tools": [function_tool("bad name!")]}, "tools[0].function.name", False),
    ("duplicate_tool_names", {"tools": [function_tool("f"), function_tool("f")]}, "tools", False),
    ("too_many_tools", {"tools": [function_tool(f"f{i}") for i in range(129)]}, "tools", False),
    (
        "tool_choice_names_a_missing_function",
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_email"}}},
        "tool_choice",
        False,
    ),
    ("tool_choice_without_tools", {"tool_choice": "required"}, "tool_choice", False),
    (
        "tool_message_answers_no_call",
        {
            "tools": TOOLS,
            "messages": WEATHER_QUESTION
            + [
                {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 18}'},
            ],
        },
        "messages",
        True,
    ),
    ("schema_nested_40_deep", {"response_format": schema_format("deep", nested_schema(40))}, "response_format", True),
    ("logit_bias_unknown_token", {"logit_bias": {"99999999": 5}}, "logit_bias", False),
    ("logit_bias_out_of_range", {"logit_bias": {str(FORCED_TOKEN): 150}}, "logit_bias", False),
]


@pytest.mark.parametrize(
    "fields, param, prefix", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_input_is_refused_naming_the_param(client, fields, param, prefix):
    fields = dict(fields)
    messages = fields.pop("messages", MESSAGES)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **fields)
    got = err.value.body["param"]
    assert isinstance(got, str), err.value.body
    if prefix:
        assert got.startswith(param), err.value.body
    else:
        assert got == param, err.value.body


def test_the_server_still_serves_after_bad_input(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("Name a cat. Answer as JSON."),
        max_tokens=60,
        temperature=0,
        response_format=schema_format("cat_name", SMALL_SCHEMA),
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert not schema_errors(SMALL_SCHEMA, choice.message.content), choice.message.content
