"""The OpenAI-compatible ingress as real clients use it: the official `openai` client
against the real ingress, deployed under a route prefix, with the key in the replicas'
environment. The scripted backend gives fast, known answers; SmolLM2 (`demo_app`) only
where real log-probabilities matter."""

from __future__ import annotations

import httpx
import openai
import pytest
import yaml

from rl_system.config import save_resolved
from serve.app import serve_config
from tests.integration.conftest import TEST_API_KEY

PREFIX = "chatty"
SCRIPT = {
    "rules": [{"contains": "capital", "reply": "Paris is the capital of France, on the Seine."}],
    "default": "You said: {last_user}",
}


@pytest.fixture(scope="module")
def chatty(scripted_roles, serve_port):
    with scripted_roles(PREFIX, SCRIPT, "serve.limits.max_request_bytes=4096") as cfg:
        yield cfg, f"http://127.0.0.1:{serve_port}/{PREFIX}"


@pytest.fixture(scope="module")
def client(chatty):
    return openai.OpenAI(base_url=f"{chatty[1]}/v1", api_key=TEST_API_KEY, max_retries=0)


def test_a_prefixed_ingress_needs_the_key_on_every_route_but_health(chatty):
    root = chatty[1]
    for path in ("/v1/models", "/docs", "/openapi.json", "/redoc", "/v1/nothing"):
        resp = httpx.get(f"{root}{path}")
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(f"{root}/health").json() == {"status": "ok"}
    keyed = {"Authorization": f"Bearer {TEST_API_KEY}"}
    assert PREFIX in [m["id"] for m in httpx.get(f"{root}/v1/models", headers=keyed).json()["data"]]
    for resp, status in ((httpx.get(f"{root}/docs", headers=keyed), 404),
                         (httpx.get(f"{root}/v1/chat/completions", headers=keyed), 405)):
        assert resp.status_code == status and resp.json()["error"]["message"]


def test_streamed_chat_and_completion_join_into_the_full_text(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=PREFIX, messages=messages, max_tokens=32)
    text = whole.choices[0].message.content
    assert text == "Paris is the capital of France, on the Seine."
    chunks = list(client.chat.completions.create(
        model=PREFIX, messages=messages, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    ))
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    prompt = "Tell me about the capital."
    whole = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=32)
    streamed = list(client.completions.create(model=PREFIX, prompt=prompt, max_tokens=32,
                                              stream=True))
    assert len(streamed) > 3
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_list_prompts_n_and_every_message_shape(client):
    prompts = ["first prompt", "second one here"]
    resp = client.completions.create(model=PREFIX, prompt=prompts, max_tokens=16)
    assert [c.text for c in resp.choices] == [f"You said: {p}" for p in prompts]
    assert [c.index for c in resp.choices] == [0, 1]
    resp = client.chat.completions.create(model="expert", n=3, max_tokens=8, messages=[
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "two "},
                                     {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "a tool said this", "tool_call_id": "call_1"},
    ])
    assert [c.message.content for c in resp.choices] == ["You said: a tool said this"] * 3


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "now", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}),
    ("presence_penalty", 0.5),
    ("top_logprobs", 3),
    ("max_tokens", 10**6),
    ("stop", ["a", "b", "c", "d", "e"]),
])
def test_what_the_server_cannot_honour_is_a_400_naming_the_field(client, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=PREFIX, messages=[{"role": "user", "content": "hi"}], **{field: value}, **extra
        )
    assert err.value.body["param"] == field and field in err.value.body["message"]


def test_a_body_over_the_limit_gets_413(chatty):
    big = {"model": PREFIX, "messages": [{"role": "user", "content": "x" * 8000}]}
    resp = httpx.post(f"{chatty[1]}/v1/chat/completions", json=big,
                      headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    assert resp.status_code == 413 and "max_request_bytes" in resp.json()["error"]["message"]


def test_the_key_is_in_no_serve_config_checkpoint_job_log_or_run_file(chatty, tmp_path):
    import ray
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    cfg = chatty[0]
    key = TEST_API_KEY.encode()
    found = []
    if key in yaml.safe_dump(serve_config(cfg)).encode():
        found.append("emitted Serve config")
    save_resolved(cfg, tmp_path / "run" / "config.yaml")  # what a run directory holds
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and key in path.read_bytes():
            found.append(str(path))
    for namespace in ("serve", None):  # Serve's controller checkpoints live in the GCS KV
        for name in _internal_kv_list(b"", namespace=namespace) or []:
            if key in (_internal_kv_get(name, namespace=namespace) or b""):
                found.append(f"GCS KV {namespace}:{name!r}")
    if key in repr(ray._private.state.jobs()).encode():
        found.append("job table (runtime env, metadata)")
    logs = ray._private.worker._global_node.get_logs_dir_path()
    for path in __import__("pathlib").Path(logs).rglob("*"):
        if path.is_file() and key in path.read_bytes():
            found.append(f"log {path.name}")
    assert not found


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_chat_logprobs_are_the_answer_tokens_log_probabilities(demo_app, demo_cfg):
    from serve.client import LLMClient

    client = openai.OpenAI(base_url=demo_app, api_key=TEST_API_KEY)
    question = "What is the capital of France? Answer with one word."
    resp = client.chat.completions.create(
        model="reviewer", messages=[{"role": "user", "content": question}], max_tokens=6,
        temperature=0, logprobs=True,
    )
    choice = resp.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) >= 1 and "".join(t.token for t in tokens) == choice.message.content
    assert all(t.logprob <= 0 for t in tokens)
    (whole,) = LLMClient.from_config(demo_cfg, "reviewer").score(question, [choice.message.content])
    assert sum(t.logprob for t in tokens) == pytest.approx(whole, abs=0.05)
