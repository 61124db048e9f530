"""The ingress's guards and request models without Ray: the key check, the body limit,
the metric role label and the fields a request may carry."""

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from serve.auth import check_exposure, guard, is_loopback
from serve.openai_api import ChatCompletionRequest, CompletionRequest, _metric_role, _pieces


def _guarded(*, key="k3y", max_bytes=2048, root_path=""):
    """A copy of the real ingress app behind the guards, frozen as Serve freezes it."""
    from ray import cloudpickle
    from ray._common.serialization import pickle_dumps
    from ray.serve._private.utils import ensure_serialization_context

    from serve.openai_api import OPEN_PATHS, app

    ensure_serialization_context()
    copy = cloudpickle.loads(pickle_dumps(app, error_msg="cannot freeze the app"))
    return TestClient(guard(copy, key=key, open_paths=OPEN_PATHS, max_request_bytes=max_bytes),
                      root_path=root_path, raise_server_exceptions=False)


@pytest.mark.parametrize("root_path", ["", "/failing"])
def test_every_route_but_health_needs_the_key_under_any_prefix(root_path):
    client = _guarded(root_path=root_path)
    for path in ("/v1/models", "/docs", "/openapi.json", "/redoc", "/no/such/route"):
        resp = client.get(f"{root_path}{path}")
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"
    wrong = client.get(f"{root_path}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    # with the key, the documentation routes do not exist and the 404 is OpenAI-shaped
    keyed = client.get(f"{root_path}/docs", headers={"Authorization": "Bearer k3y"})
    assert keyed.status_code == 404 and keyed.json()["error"]["message"]


def test_a_body_over_the_limit_is_refused_before_parsing():
    client = _guarded(max_bytes=1024)
    headers = {"Authorization": "Bearer k3y", "Content-Type": "application/json"}
    resp = client.post("/v1/completions", content=b"{" + b" " * 4096, headers=headers)
    assert resp.status_code == 413 and "max_request_bytes" in resp.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b"{" + b" " * 600
        yield b" " * 600

    assert client.post("/v1/completions", content=chunked(), headers=headers).status_code == 413
    small = client.post("/v1/completions", content=b"{not json", headers=headers)
    assert small.status_code == 400 and "not valid JSON" in small.json()["error"]["message"]


def test_only_loopback_hosts_may_serve_without_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("my-host")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "k")
    with pytest.raises(ValueError, match="TEAMS_RL_API_KEY"):
        check_exposure("0.0.0.0", None)


def test_the_metric_role_label_comes_only_from_known_roles():
    roles = frozenset({"expert", "reviewer"})
    assert _metric_role("expert", roles) == "expert"
    assert _metric_role("x" * 500, roles) == _metric_role(None, roles) == "http"


def test_chat_messages_take_developer_and_tool_roles_text_parts_and_null_content():
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ], "frequency_penalty": 0, "response_format": {"type": "text"}, "tools": []})
    sent = [m.for_backend() for m in body.messages]
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]
    assert [m.content for m in sent] == ["Be brief.", "Hi there", "", "42"]


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_object"}),
    ("presence_penalty", 0.5),
    ("logit_bias", {"50256": -100}),
])
def test_a_field_the_server_cannot_honour_is_refused_by_name(field, value):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}
        )
    assert err.value.errors()[0]["loc"] == (field,)


def test_a_sampling_seed_is_honoured_and_each_of_n_choices_gets_its_own():
    from serve.openai_api import _nth_choice
    from serve.protocol import GenerationRequest

    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 7, "n": 3})
    gen = GenerationRequest(prompt="x", seed=body.seed, temperature=0.7)
    assert [_nth_choice(gen, i).seed for i in range(body.n)] == [7, 8, 9]
    unseeded = GenerationRequest(prompt="x")
    assert _nth_choice(unseeded, 2).seed is None


def test_image_parts_and_token_prompts_are_refused():
    with pytest.raises(ValidationError, match="image_url"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ValidationError, match="token ids"):
        CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2, 3]]})
    listed = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
    assert listed.prompts == ["a", "b"]


def test_stream_pieces_join_into_the_text():
    for text in ("Paris is the capital.", "  leading and trailing  ", "one", ""):
        assert "".join(_pieces(text)) == text
    assert len(_pieces("Paris is the capital.")) == 4


def test_a_replicas_rejection_is_a_400_even_through_rays_error_wrapper():
    """The replica's BackendError reaches the ingress as RayTaskError(BackendError), a
    subclass of the cause's class that reads the class default ``transient=True``: the
    status must come from the cause, or a too-long prompt is a 502 that clients retry."""
    from ray.exceptions import RayTaskError

    from serve.openai_api import _as_openai_error
    from serve.protocol import BackendError

    for transient, status in ((False, 400), (True, 502)):
        try:
            raise BackendError("prompt is too long", transient=transient)
        except BackendError as exc:
            wrapped = RayTaskError("generate", "traceback", exc).as_instanceof_cause()
        assert _as_openai_error(wrapped).status == status
