"""The official openai Python package as a real client of a running `qpai serve`.

Run by the Rust integration test `openai_client` (which starts the server and
sets QPAI_BASE_URL and QPAI_MODEL).
"""

import os

import json
import time
import urllib.request

import openai
import pytest
from openai import OpenAI

BASE_URL = os.environ["QPAI_BASE_URL"]
MODEL = os.environ.get("QPAI_MODEL", "smollm2-135m-instruct")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    return OpenAI(base_url=BASE_URL, api_key="not-needed", max_retries=0, timeout=120)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_with_exact_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 16


def test_streaming_with_include_usage_equals_non_streaming(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 5


def test_seed_gives_the_same_sample(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.code == "model_not_found"


def test_bad_value_raises_bad_request_naming_the_param(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10_000_000)
    assert err.value.param == "max_tokens"


def test_unsupported_parameter_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            prediction={"type": "content", "content": "Paris"},
        )
    assert err.value.param == "prediction"


def test_embeddings(client):
    # The SDK asks for base64 by default and decodes it.
    r = client.embeddings.create(model="all-minilm-l6-v2", input=["The cat sits on the mat.", "A cat is sitting on a mat."])
    assert [d.index for d in r.data] == [0, 1]
    a, b = (d.embedding for d in r.data)
    assert len(a) == 384
    cosine = sum(x * y for x, y in zip(a, b))
    assert 0.9 < cosine <= 1.0001
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="all-minilm-l6-v2", input="hi", dimensions=64)
    assert err.value.param == "dimensions"


def test_grounded_answer_with_citations(client):
    docs = {"documents": [
        {"url": "https://bakery.example/hours", "title": "Opening hours",
         "text": "The bakery opens at 7 am from Tuesday to Sunday and is closed on Mondays."},
        {"url": "https://bakery.example/bread", "title": "Our bread",
         "text": "All loaves are sourdough, baked from organic rye and spelt flour."},
    ]}
    request = urllib.request.Request(
        f"{BASE_URL}/sites/pytest/documents",
        data=json.dumps(docs).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        report = json.load(response)
    assert report["added"] == 2, report
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "When is the bakery closed?"}],
        max_tokens=30,
        temperature=0,
        extra_body={"rag": {"site": "pytest", "top_k": 2}},
    )
    citations = r.model_extra["citations"]
    assert [c["index"] for c in citations] == [1, 2]
    assert citations[0]["url"] == "https://bakery.example/hours"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "When is the bakery closed?"}],
        max_tokens=30,
        temperature=0,
        stream=True,
        extra_body={"rag": {"site": "pytest", "top_k": 2}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].model_extra["citations"] == citations
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"rag": {"site": "no-such-site"}}
        )
    assert err.value.code == "site_not_found"


# The catalog's house-style adapter (models/adapters/house-style) is served on
# the default model as `BASE:house-style` and `house-style`.
ADAPTER = f"{MODEL}:house-style"
HOUSE_PROMPT = (
    "Write the product description for zstd.\n"
    "Summary: fast lossless compression algorithm -- CLI tool\n"
    "Section: utils\n"
    "Facts: Zstd, short for Zstandard, is a fast lossless compression algorithm, targeting "
    "real-time compression scenarios at zlib-level compression ratio. This package contains "
    "the CLI program implementing zstd. It is the reference implementation of the format."
)


def test_adapters_are_listed_with_their_base(client):
    cards = {m.id: m for m in client.models.list()}
    assert ADAPTER in cards
    assert cards[ADAPTER].model_extra["parent"] == MODEL
    assert client.models.retrieve(ADAPTER).id == ADAPTER


def test_an_adapter_changes_the_reply_and_its_alias_is_the_same_adapter(client):
    def reply(model):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": HOUSE_PROMPT}],
            max_tokens=120,
            temperature=0,
        )
        assert r.model == model
        return r.choices[0].message.content

    base, adapted, alias = reply(MODEL), reply(ADAPTER), reply("house-style")
    assert adapted == alias
    assert adapted != base
    # The house style: a `## name` title and a `Category:` line.
    assert adapted.startswith("## zstd\n"), adapted
    assert "\nCategory: " in adapted, adapted
    assert not base.startswith("## zstd\n"), base
    # Streaming gives the same text.
    stream = client.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": HOUSE_PROMPT}],
        max_tokens=120,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == adapted


def test_an_unknown_adapter_is_a_clear_error(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=f"{MODEL}:no-such-adapter", messages=MESSAGES, max_tokens=4
        )
    assert error.value.body["param"] == "model"
    assert "no-such-adapter" in error.value.body["message"]


def test_files_upload_list_retrieve_content_and_delete(client):
    lines = b"".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": MESSAGES}}
        ).encode()
        + b"\n"
        for i in range(3)
    )
    created = client.files.create(file=("input.jsonl", lines), purpose="batch")
    assert (created.object, created.purpose, created.filename) == ("file", "batch", "input.jsonl")
    assert created.bytes == len(lines)
    assert client.files.retrieve(created.id).model_dump() == created.model_dump()
    assert client.files.content(created.id).content == lines
    assert created.id in [f.id for f in client.files.list(purpose="batch")]
    kept = client.files.create(
        file=("kept.jsonl", lines),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert kept.expires_at == kept.created_at + 3600
    newest_first = [f.id for f in client.files.list(limit=2, order="desc")]
    assert newest_first.index(kept.id) < newest_first.index(created.id)
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.jsonl", lines), purpose="fine-tune")
    assert err.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("empty.jsonl", b""), purpose="batch")
    assert err.value.param == "file"


def batch_input(count, model=MODEL, max_tokens=8):
    return b"".join(
        json.dumps(
            {"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Name colour number {i}."}]}}
        ).encode()
        + b"\n"
        for i in range(count)
    )


def wait_for_batch(client, batch_id, done=("completed", "failed", "expired", "cancelled")):
    deadline = time.time() + 300
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in done:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def test_batch_flow_on_a_local_model(client):
    source = client.files.create(file=("rows.jsonl", batch_input(4)), purpose="batch")
    batch = client.batches.create(
        input_file_id=source.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"site": "planters"},
    )
    assert (batch.object, batch.status, batch.metadata) == ("batch", "validating", {"site": "planters"})
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 4, 0)
    assert batch.error_file_id is None
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"row-{i}" for i in range(4)]
    first = next(line for line in lines if line["custom_id"] == "row-0")
    live = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Name colour number 0."}],
    )
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    completion_tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    assert batch.usage.output_tokens == completion_tokens
    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=5)]


def test_batch_cancel_and_bad_batches(client):
    source = client.files.create(file=("many.jsonl", batch_input(40, max_tokens=32)), purpose="batch")
    batch = client.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "cancelled"
    counts = batch.request_counts
    assert counts.completed + counts.failed == counts.total
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=source.id, endpoint="/v1/images", completion_window="24h")
    assert err.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError) as err:
        client.batches.create(input_file_id="file-absent", endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.param == "input_file_id"
    streamed = json.dumps(
        {"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": MESSAGES, "stream": True}}
    ).encode()
    bad = client.files.create(file=("stream.jsonl", streamed), purpose="batch")
    failed = wait_for_batch(
        client,
        client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h").id,
    )
    assert failed.status == "failed"
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("stream_not_supported", 1, "body.stream")]
