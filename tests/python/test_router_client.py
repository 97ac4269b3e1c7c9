"""The official openai Python package through qpai's router.

Run by the Rust integration test `router_serve`, which starts two servers: an
upstream `qpai serve` (with its own API key) and a router `qpai serve` whose
routing catalog sends the logical model "writer" to that upstream as an
OpenAI-compatible deployment priced at $1 / $2 per 1M tokens. It sets:
QPAI_BASE_URL (the router), QPAI_KEY (tenant acme), QPAI_ADMIN_KEY,
QPAI_POOR_KEY (a tenant with a tiny budget), QPAI_LIMITED_KEY (1 request per
minute), QPAI_UPSTREAM_URL and QPAI_UPSTREAM_KEY, QPAI_MODEL.
"""

import json
import os
import time
import urllib.request
from decimal import Decimal

import openai
import pytest
from openai import OpenAI

BASE_URL = os.environ["QPAI_BASE_URL"]
MODEL = os.environ.get("QPAI_MODEL", "smollm2-135m-instruct")
MESSAGES = [{"role": "user", "content": "Name three colours of tulips."}]
PRICE_IN = Decimal("0.000001")
PRICE_OUT = Decimal("0.000002")


def client(key, base_url=BASE_URL):
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def acme():
    return client(os.environ["QPAI_KEY"])


@pytest.fixture(scope="module")
def upstream():
    return client(os.environ["QPAI_UPSTREAM_KEY"], os.environ["QPAI_UPSTREAM_URL"])


def usage_total(key, tenant=None, group_by="tenant"):
    query = f"?group_by={group_by}" + (f"&tenant={tenant}" if tenant else "")
    request = urllib.request.Request(
        f"{BASE_URL}/usage{query}", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def test_routed_answer_equals_the_upstreams_own_and_costs_what_it_used(acme, upstream):
    raw = acme.chat.completions.with_raw_response.create(
        model="writer", messages=MESSAGES, max_tokens=12, temperature=0
    )
    routed = raw.parse()
    direct = upstream.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert routed.choices[0].message.content == direct.choices[0].message.content
    assert raw.headers["x-qpai-provider"] == "openai_compatible"
    assert raw.headers["x-qpai-deployment"] == "edge"
    assert raw.headers["x-qpai-model"] == MODEL
    usage = routed.usage
    assert usage.prompt_tokens == direct.usage.prompt_tokens
    expected = usage.prompt_tokens * PRICE_IN + usage.completion_tokens * PRICE_OUT
    assert Decimal(raw.headers["x-qpai-cost-usd"]) == expected


def test_routed_stream_equals_the_whole_answer_and_reports_its_cost(acme):
    whole = acme.chat.completions.create(
        model="writer", messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        acme.chat.completions.create(
            model="writer",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    cost = Decimal(last.model_extra["x_qpai_cost_usd"])
    assert cost == last.usage.prompt_tokens * PRICE_IN + last.usage.completion_tokens * PRICE_OUT
    # Without include_usage no usage chunk reaches the client.
    plain = list(
        acme.chat.completions.create(
            model="writer", messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
    )
    assert all(c.usage is None for c in plain)


def test_the_ledger_total_is_the_sum_of_the_answers_costs(acme):
    before = Decimal(usage_total(os.environ["QPAI_KEY"])["total"]["cost_usd"])
    costs = []
    for n in (3, 5, 7):
        raw = acme.chat.completions.with_raw_response.create(
            model="writer", messages=MESSAGES, max_tokens=n, temperature=0
        )
        costs.append(Decimal(raw.headers["x-qpai-cost-usd"]))
    after = usage_total(os.environ["QPAI_KEY"])
    assert Decimal(after["total"]["cost_usd"]) - before == sum(costs)
    assert [row["tenant"] for row in after["data"]] == ["acme"]


def test_keys_are_required_and_tenants_are_kept_apart():
    with pytest.raises(openai.AuthenticationError):
        client("qpai-not-a-key").models.list()
    with pytest.raises(urllib.error.HTTPError) as error:
        usage_total(os.environ["QPAI_KEY"], tenant="poor")
    assert error.value.code == 403
    everyone = usage_total(os.environ["QPAI_ADMIN_KEY"])
    assert {"acme"} <= {row["tenant"] for row in everyone["data"]}


def test_an_exhausted_budget_is_a_clear_error():
    poor = client(os.environ["QPAI_POOR_KEY"])
    with pytest.raises(openai.APIStatusError) as error:
        poor.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=50)
    assert error.value.status_code == 402
    assert error.value.body["code"] == "budget_exceeded"
    assert "monthly budget" in error.value.body["message"]


def test_a_rate_limit_raises_rate_limit_error_with_retry_after():
    limited = client(os.environ["QPAI_LIMITED_KEY"])
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as error:
        limited.models.list()
    assert int(error.value.response.headers["retry-after"]) >= 1


def test_router_health_lists_the_deployment(acme):
    request = urllib.request.Request(
        f"{BASE_URL}/router/health", headers={"Authorization": f"Bearer {os.environ['QPAI_KEY']}"}
    )
    with urllib.request.urlopen(request) as response:
        health = json.load(response)
    edge = health["data"][0]
    assert (edge["deployment"], edge["state"]) == ("edge", "closed")
    assert edge["successes"] >= 1
    ids = [m.id for m in acme.models.list()]
    assert "writer" in ids and "edge" in ids and "auto" in ids


def test_a_batch_on_the_routed_deployment_is_billed_at_its_batch_price(acme):
    rows = b"".join(
        json.dumps(
            {"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "writer", "messages": MESSAGES, "max_tokens": 4 + i, "temperature": 0}}
        ).encode()
        + b"\n"
        for i in range(3)
    )
    source = acme.files.create(file=("rows.jsonl", rows), purpose="batch")
    batch = acme.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
        time.sleep(0.2)
        batch = acme.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.id in [b.id for b in acme.batches.list()]
    lines = [json.loads(line) for line in acme.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["p0", "p1", "p2"]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt, completion)
    grouped = usage_total(os.environ["QPAI_KEY"], group_by="batch")
    mine = [row for row in grouped["data"] if row["batch"] == batch.id]
    assert len(mine) == 1 and mine[0]["requests"] == 3
    # The catalog's batch_discount = 0.5: half of $1 / $2 per 1M tokens.
    assert Decimal(mine[0]["cost_usd"]) == (prompt * PRICE_IN + completion * PRICE_OUT) / 2
