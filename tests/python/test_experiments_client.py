"""Online experiments and feedback through the official openai Python package.

Run by the Rust integration test `experiments::experiments_over_http_for_the_python_client`,
which starts `qpai serve` with two routed deployments on a scripted upstream,
"steady" and "cheap", and two tenants. It sets QPAI_BASE_URL, QPAI_KEY (tenant
acme) and QPAI_RIVAL_KEY (another tenant).
"""

import os

import openai
import pytest
from openai import OpenAI

BASE_URL = os.environ["QPAI_BASE_URL"]
MESSAGES = [{"role": "user", "content": "Write a headline for a tulip shop."}]
EXPERIMENT = {
    "id": "headline",
    "task": "copy",
    "metric": {"name": "accepted", "type": "boolean"},
    "variants": [{"name": "steady", "model": "steady"}, {"name": "cheap", "model": "cheap"}],
}


def client(key):
    return OpenAI(base_url=BASE_URL, api_key=key, max_retries=0, timeout=60)


acme = client(os.environ["QPAI_KEY"])
rival = client(os.environ["QPAI_RIVAL_KEY"])


def ask(headers, user=None):
    extra = {"user": user} if user else {}
    raw = acme.chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES, max_tokens=3, extra_headers=headers, **extra
    )
    raw.parse()
    return raw.headers


def feedback(who, body):
    return who.post("/feedback", body=body, cast_to=object)


def test_requests_get_sticky_variants_and_feedback_moves_the_posteriors():
    shown = acme.post("/experiments", body=EXPERIMENT, cast_to=object)
    assert shown["status"] == "running"
    assert [v["name"] for v in shown["variants"]] == ["steady", "cheap"]

    seen, requests = {}, []
    for user in ["ann", "bob", "cy", "dee", "eve"]:
        for _ in range(3):
            headers = ask({"x-qpai-experiment": "headline"}, user=user)
            variant = headers["x-qpai-variant"]
            assert headers["x-qpai-deployment"] == variant
            assert headers["x-qpai-experiment"] == "headline"
            seen.setdefault(user, set()).add(variant)
            requests.append((headers["x-qpai-request-id"], variant))
    assert all(len(variants) == 1 for variants in seen.values()), seen

    for request_id, variant in requests:
        answer = feedback(acme, {"request_id": request_id, "metric": "accepted",
                                 "value": variant == "steady"})
        assert answer["experiments"] == ["headline"]

    # An episode (header) is a unit and a feedback target of its own.
    episode = ask({"x-qpai-experiment": "headline", "x-qpai-episode-id": "ep-9"})
    feedback(acme, {"episode_id": "ep-9", "metric": "accepted",
                    "value": episode["x-qpai-variant"] == "steady"})

    shown = acme.get("/experiments/headline", cast_to=object)
    variants = {v["name"]: v for v in shown["variants"]}
    assert sum(v["requests"] for v in variants.values()) == 16
    assert sum(v["feedback"] for v in variants.values()) == 16
    assert abs(sum(v["traffic_share"] for v in variants.values()) - 1) < 1e-9
    assert abs(sum(v["p_best"] for v in variants.values()) - 1) < 1e-9
    for name, v in variants.items():
        successes = v["feedback"] if name == "steady" else 0
        assert v["posterior"] == {"kind": "beta", "alpha": 1 + successes,
                                  "beta": 1 + v["feedback"] - successes}
        if v["requests"]:
            assert v["mean_cost_usd"] > 0, v
    listed = acme.get("/experiments", cast_to=object)
    assert [e["id"] for e in listed["data"]] == ["headline"]


def test_mistakes_are_named_and_tenants_kept_apart():
    headers = ask({"x-qpai-experiment": "headline"}, user="fay")
    request_id = headers["x-qpai-request-id"]

    with pytest.raises(openai.BadRequestError) as error:
        feedback(acme, {"request_id": request_id, "metric": "accepted", "value": "yes"})
    assert error.value.body["param"] == "value"
    with pytest.raises(openai.BadRequestError) as error:
        feedback(acme, {"request_id": request_id, "metric": "clicks", "value": True})
    assert error.value.body["param"] == "metric"
    with pytest.raises(openai.NotFoundError) as error:
        feedback(acme, {"request_id": "req_unknown", "metric": "accepted", "value": True})
    assert error.value.body["param"] == "request_id"
    with pytest.raises(openai.BadRequestError) as error:
        acme.post("/experiments", cast_to=object, body={
            "id": "solo", "metric": {"name": "accepted", "type": "boolean"},
            "variants": [{"name": "steady", "model": "steady"}]})
    assert error.value.body["param"] == "variants"
    with pytest.raises(openai.BadRequestError) as error:
        acme.post("/experiments", cast_to=object, body={
            "id": "ghost", "metric": {"name": "accepted", "type": "boolean"},
            "variants": [{"name": "steady", "model": "steady"},
                         {"name": "ghost", "model": "no-such-model"}]})
    assert error.value.body["param"] == "variants[1].model"
    with pytest.raises(openai.BadRequestError) as error:
        acme.post("/experiments", cast_to=object, body={
            "id": "ghost", "metric": {"name": "accepted", "type": "boolean"},
            "variants": [{"name": "steady", "model": "steady"},
                         {"name": "worded", "prompt": "no-such-prompt@1"}]})
    assert error.value.body["param"] == "variants[1].prompt"
    with pytest.raises(openai.NotFoundError) as error:
        ask({"x-qpai-experiment": "nothing-here"})
    assert error.value.body["param"] == "experiment"

    # Another tenant sees neither the request nor the experiment.
    with pytest.raises(openai.NotFoundError) as error:
        feedback(rival, {"request_id": request_id, "metric": "accepted", "value": True})
    assert error.value.body["param"] == "request_id"
    with pytest.raises(openai.NotFoundError):
        rival.get("/experiments/headline", cast_to=object)
    assert rival.get("/experiments", cast_to=object)["data"] == []

    feedback(acme, {"request_id": request_id, "metric": "accepted", "value": True})
    with pytest.raises(openai.ConflictError) as error:
        feedback(acme, {"request_id": request_id, "metric": "accepted", "value": False})
    assert error.value.body["param"] == "request_id"
