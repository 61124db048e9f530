"""The serving layer end to end: ingress, handles, scoring, auth, bad requests, failures."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve.client import LLMCallError, LLMClient
from tests.integration.conftest import TEST_API_KEY

CAPITALS = [
    ("What is the capital of France? Answer with one word.", "Paris", "Berlin"),
    ("What is the capital of Japan? Answer with one word.", "Tokyo", "Madrid"),
    ("What is the capital of Italy? Answer with one word.", "Rome", "Oslo"),
]


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_openai_client_gets_a_chat_completion(demo_app):
    client = openai.OpenAI(base_url=demo_app, api_key=TEST_API_KEY)
    assert "expert" in {m.id for m in client.models.list().data}
    resp = client.chat.completions.create(
        model="embedded:smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Name a colour of the sky."}],
        max_tokens=16,
        temperature=0,
    )
    assert resp.choices[0].message.content.strip()
    assert 0 < resp.usage.completion_tokens <= 16


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_llm_client_over_a_handle_generates_and_counts(demo_app, demo_cfg):
    client = LLMClient.from_config(demo_cfg, "expert")
    assert client.transport.name == "handle"
    answers = client.generate(["Write one short sentence about rain.", "Say the word 'hello'."])
    assert all(a.text for a in answers)
    assert client.usage.queries == 2
    assert client.usage.completion_tokens == sum(a.completion_tokens for a in answers) > 0


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
@pytest.mark.parametrize("transport", ["handle", "http"])
def test_score_ranks_the_right_answer_first(demo_app, demo_cfg, transport):
    client = LLMClient.from_config(demo_cfg, "reviewer", transport=transport)
    for question, right, wrong in CAPITALS:
        lp_right, lp_wrong = client.score(question, [right, wrong])
        assert lp_right > lp_wrong, (question, lp_right, lp_wrong)


def _post(url: str, body, *, key: str | None = TEST_API_KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url, content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url, json=body, headers=headers, timeout=60)


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_auth_rejects_missing_and_wrong_tokens(demo_app):
    url = f"{demo_app}/chat/completions"
    body = {"model": "expert", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong-key"):
        resp = _post(url, body, key=key)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{demo_app}/models").status_code == 401


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_malformed_requests_get_4xx_json_and_serving_continues(demo_app):
    url = f"{demo_app}/chat/completions"
    ok = {"model": "expert", "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 4}
    cases = {
        "no messages": ({**ok, "messages": []}, 400),
        "zero max_tokens": ({**ok, "max_tokens": 0}, 400),
        "huge max_tokens": ({**ok, "max_tokens": 10**7}, 400),
        "unknown model": ({**ok, "model": "gpt-17"}, 404),
        "bad role": ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    }
    for name, (body, status) in cases.items():
        resp = _post(url, body)
        assert resp.status_code == status, name
        assert resp.json()["error"]["message"], name
    resp = _post(url, None, raw=b"{not json")
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    resp = _post(url, ok)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]


def test_backend_error_reaches_the_caller_with_its_message(scripted_roles):
    with scripted_roles("failing", {"error": "the model fell over"}) as cfg:
        client = LLMClient.from_config(cfg, "expert", transport="handle")
        with pytest.raises(LLMCallError, match="expert: .*the model fell over"):
            client.generate(["hello"])
        results = client.generate(["a", "b"], return_exceptions=True)
        assert all(isinstance(r, LLMCallError) for r in results)
        assert client.usage.failures == 3


def test_slow_backend_times_out_instead_of_hanging(scripted_roles):
    import time

    with scripted_roles("slow", {"latency_s": 30}, "serve.request_timeout_s=1") as cfg:
        client = LLMClient.from_config(cfg, "expert", transport="handle")
        started = time.monotonic()
        with pytest.raises(LLMCallError, match="took longer than 1 s"):
            client.generate(["hello"])
        assert time.monotonic() - started < 20
        client.transport.timeout_s = 0.5  # the caller's own limit also holds
        with pytest.raises(LLMCallError, match="no answer within"):
            client.generate(["hello"])
