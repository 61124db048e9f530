import time

import pytest

from serve.backends.openai_backend import OpenAIBackend, RateLimiter
from serve.protocol import BackendError


def test_rate_limiter_spaces_calls():
    limiter = RateLimiter(per_minute=600)  # one per 0.1 s
    started = time.monotonic()
    for _ in range(4):
        limiter.acquire()
    assert time.monotonic() - started >= 0.29


def test_openai_api_without_key_says_which_variable(monkeypatch):
    monkeypatch.delenv("MY_KEY_VAR", raising=False)
    backend = OpenAIBackend("gpt-4o-mini", api_key_env="MY_KEY_VAR")
    with pytest.raises(BackendError, match="set the environment variable MY_KEY_VAR"):
        backend.load()


def test_score_mode_auto_picks_by_endpoint():
    assert OpenAIBackend("gpt-4o-mini").score_mode == "top_logprobs"
    assert OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1").score_mode == "echo"


def test_unreachable_endpoint_is_a_clear_error():
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=2)
    from serve.protocol import GenerationRequest

    with pytest.raises(BackendError, match="cannot connect to http://127.0.0.1:9/v1"):
        backend.generate([GenerationRequest(prompt="hi", max_tokens=1)])


def test_key_is_not_kept_after_pickling(monkeypatch):
    import pickle

    monkeypatch.setenv("K", "sk-very-secret")
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env="K")
    backend.load()
    assert b"sk-very-secret" not in pickle.dumps(backend)
