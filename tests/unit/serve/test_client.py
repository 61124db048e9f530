"""``LLMClient``'s HTTP transport against a local OpenAI-shaped endpoint (a test double that
answers with scripted statuses), its rate limit, retries and key handling. No Ray."""

from __future__ import annotations

import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rl_system.config import load_config
from serve.client import (
    EnvKey,
    HTTPTransport,
    IngressKey,
    LLMCallError,
    LLMClient,
    PermitBucket,
    RateLimit,
    Retry,
)
from serve.protocol import BackendError, GenerationRequest

CHAT_REPLY = {
    "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class Endpoint:
    """Answers POSTs with the next status of ``statuses`` (then 200); records each request."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.seen: list[tuple[float, str | None]] = []  # (time, authorization)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length", 0)))
                endpoint.seen.append((time.monotonic(), self.headers.get("authorization")))
                status = endpoint.statuses.pop(0) if endpoint.statuses else 200
                body = CHAT_REPLY if status == 200 else {"error": {"message": f"said {status}"}}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def endpoint(request):
    ep = Endpoint(getattr(request, "param", []))
    yield ep
    ep.close()


def _transport(url: str, *, role: str = "expert", per_minute=None, retries=3, **kw):
    return HTTPTransport(
        "m", base_url=url, key=EnvKey("UNIT_TEST_KEY"), score_mode="echo",
        timeout_s=5, retry=Retry(retries, 0.0), limit=RateLimit(role, per_minute), **kw,
    )


def _ask(text="hi"):
    return GenerationRequest(prompt=None, messages=[{"role": "user", "content": text}],
                             max_tokens=4)


def test_permit_bucket_spaces_reservations():
    bucket = PermitBucket(per_minute=600)  # one per 0.1 s
    waits = [bucket.reserve() for _ in range(4)]
    assert waits[0] == 0.0
    assert waits[3] == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("endpoint", [[429, 503]], indirect=True)
def test_transient_statuses_are_retried_and_each_attempt_takes_a_permit(endpoint):
    transport = _transport(endpoint.url, role="unit-retry", per_minute=600)
    started = time.monotonic()
    [answer] = transport.generate([_ask()])
    assert answer.text == "fine"
    times = [t for t, _ in endpoint.seen]
    assert len(times) == 3 and transport.retries == 2
    assert times[-1] - started >= 0.19, times  # three permits, 0.1 s apart


@pytest.mark.parametrize("endpoint", [[400]], indirect=True)
def test_a_rejected_request_is_not_retried_and_says_so(endpoint):
    client = LLMClient("expert", _transport(endpoint.url))
    with pytest.raises(LLMCallError, match="HTTP 400 .*said 400") as info:
        client.generate(["hi"])
    assert info.value.transient is False
    assert len(endpoint.seen) == 1


@pytest.mark.parametrize("endpoint", [[500, 500, 500]], indirect=True)
def test_retries_stop_at_max_retries_and_stay_transient(endpoint):
    client = LLMClient("expert", _transport(endpoint.url, retries=2))
    [err] = client.generate(["hi"], return_exceptions=True)
    assert isinstance(err, LLMCallError) and err.transient
    assert len(endpoint.seen) == 3


def test_one_rate_limit_per_role_across_transports(endpoint):
    """Two callers of one role (two actors' clients) share its requests_per_minute."""
    a = _transport(endpoint.url, role="unit-shared", per_minute=600)
    b = pickle.loads(pickle.dumps(_transport(endpoint.url, role="unit-shared", per_minute=600)))
    started = time.monotonic()
    threads = [threading.Thread(target=t.generate, args=([_ask(), _ask()],)) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = sorted(t for t, _ in endpoint.seen)
    assert len(times) == 4
    assert times[-1] - started >= 0.29, times  # four permits of one bucket, 0.1 s apart


def test_unreachable_endpoint_is_a_transient_clear_error():
    transport = _transport("http://127.0.0.1:9/v1", retries=0)
    [err] = transport.generate([_ask()])
    assert isinstance(err, BackendError) and err.transient
    assert "cannot connect to http://127.0.0.1:9/v1" in str(err)


def test_openai_api_without_key_says_which_variable(monkeypatch):
    monkeypatch.delenv("MY_KEY_VAR", raising=False)
    transport = HTTPTransport("gpt-4o-mini", base_url=None, key=EnvKey("MY_KEY_VAR"),
                              score_mode="top_logprobs", retry=Retry(0, 0))
    [err] = transport.generate([_ask()])
    assert "set the environment variable MY_KEY_VAR" in str(err) and not err.transient


def test_ingress_key_is_sent_but_never_pickled(endpoint, monkeypatch):
    monkeypatch.setenv("TEAMS_RL_API_KEY", "sk-very-secret")
    transport = HTTPTransport("expert", base_url=endpoint.url, key=IngressKey(None),
                              score_mode="echo", retry=Retry(0, 0))
    client = LLMClient("expert", transport)
    client.generate(["hi"])
    assert endpoint.seen[0][1] == "Bearer sk-very-secret"
    assert b"sk-very-secret" not in pickle.dumps(client)
    restored = pickle.loads(pickle.dumps(client))
    assert restored.generate(["again"])[0].text == "fine"


def test_from_config_picks_each_backends_endpoint(monkeypatch):
    monkeypatch.delenv("TEAMS_RL_API_KEY", raising=False)
    cfg = load_config(None, [
        "serve.port=8123",
        "models.expert.backend=openai", "models.expert.model=gpt-4o-mini",
        "models.instructor.backend=vllm", "models.instructor.model=some/model",
        "models.reviewer.max_retries=5", "models.reviewer.requests_per_minute=30",
    ])
    expert = LLMClient.from_config(cfg, "expert").transport
    assert (expert.base_url, expert.score_mode, expert.key.variable) == (
        None, "top_logprobs", "OPENAI_API_KEY")
    instructor = LLMClient.from_config(cfg, "instructor").transport
    assert instructor.base_url == "http://127.0.0.1:8123/vllm/v1"
    assert instructor.score_mode == "echo"
    reviewer = LLMClient.from_config(cfg, "reviewer", transport="http").transport
    assert (reviewer.model, reviewer.base_url) == ("reviewer", "http://127.0.0.1:8123/v1")
    assert isinstance(reviewer.key, IngressKey)
    assert (reviewer.retry.max_retries, reviewer.limit.per_minute) == (5, 30)
    handle = LLMClient.from_config(cfg, "reviewer", transport="handle").transport
    assert (handle.retry.max_retries, handle.limit.role) == (5, "reviewer")
    with pytest.raises(ValueError, match="reached over HTTP only"):
        LLMClient.from_config(cfg, "expert", transport="handle")


def test_a_rejection_stays_non_transient_through_rays_error_wrapper():
    """A replica's error reaches the caller as RayTaskError(BackendError): a subclass of
    the cause's class that lacks the cause's ``transient``."""
    from ray.exceptions import RayTaskError

    from serve.client import _is_transient

    try:
        raise BackendError("prompt is too long", transient=False)
    except BackendError as exc:
        wrapped = RayTaskError("generate", "traceback", exc).as_instanceof_cause()
    assert isinstance(wrapped, BackendError)
    assert _is_transient(wrapped) is False
