"""OpenAI-compatible HTTP ingress in front of the ``LLMServer`` deployments.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(``echo`` + ``logprobs`` give prompt-token log-probabilities, which ``LLMClient.score``
uses over HTTP), ``GET /health``. With an API key configured every ``/v1`` route needs
``Authorization: Bearer <key>``. Errors use the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` so the ``openai`` client raises its
usual exceptions.
"""

# No `from __future__ import annotations`: FastAPI must see real types on Serve's
# wrapped ingress methods.
import hmac
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve.protocol import (
    BackendError,
    BackendTimeoutError,
    ChatMessage,
    GenerationRequest,
)

ROLE_HEADER = "x-teams-rl-role"

app = FastAPI(title="teams-rl OpenAI-compatible API")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: Literal[False] = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    n: Literal[1] = 1
    stream: Literal[False] = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)


def _error(status: int, message: str, *, kind: str, code: str | None = None, param=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, loc = "request body is not valid JSON", None
    return _error(400, f"{loc}: {msg}" if loc else msg, kind="invalid_request_error", param=loc)


@app.middleware("http")
async def _bearer_auth(request: Request, call_next):
    expected: str | None = getattr(request.app.state, "api_key", None)
    if expected and request.url.path.startswith("/v1"):
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), expected.encode()):
            return _error(
                401,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
    return await call_next(request)


async def _call(response):
    """Await a handle call; backend failures become OpenAI-shaped 5xx responses."""
    try:
        return await response
    except BackendTimeoutError as exc:
        return _error(504, _message(exc), kind="timeout_error")
    except BackendError as exc:
        return _error(502, _message(exc), kind="backend_error")
    except Exception as exc:  # noqa: BLE001 - the caller gets a message, not a hang
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")


def _message(exc: BaseException) -> str:
    # Ray wraps replica exceptions; the original carries the message meant for users.
    return str(getattr(exc, "cause", None) or exc)


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _as_list(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else stop


@serve.deployment(name="openai-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class OpenAIIngress:
    """Routes by the request's ``model``: a model reference or a role name."""

    def __init__(
        self,
        servers: dict,  # deployment name -> DeploymentHandle
        routes: dict[str, str],  # model reference or role -> deployment name
        *,
        api_key: str | None = None,
        max_new_tokens_limit: int = 4096,
    ):
        self._servers = servers
        self._routes = routes
        self._max_new_tokens = max_new_tokens_limit
        app.state.api_key = api_key

    def _server(self, model: str):
        name = self._routes.get(model)
        return None if name is None else self._servers[name]

    def _unknown_model(self, model: str):
        known = ", ".join(sorted(self._routes))
        return _error(
            404, f"model {model!r} is not served here; available: {known}",
            kind="invalid_request_error", code="model_not_found", param="model",
        )

    def _too_many_tokens(self, n: int):
        return _error(
            400, f"max_tokens {n} exceeds the limit {self._max_new_tokens}",
            kind="invalid_request_error", param="max_tokens",
        )

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "teams-rl"}
                for m in sorted(self._routes)
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        server = self._server(body.model)
        if server is None:
            return self._unknown_model(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        if max_tokens > self._max_new_tokens:
            return self._too_many_tokens(max_tokens)
        gen = GenerationRequest(
            messages=body.messages, max_tokens=max_tokens, temperature=body.temperature,
            top_p=body.top_p, stop=_as_list(body.stop), seed=body.seed,
            role=request.headers.get(ROLE_HEADER, "http"),
        )
        result = await _call(server.generate.remote(gen))
        if isinstance(result, JSONResponse):
            return result
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        server = self._server(body.model)
        if server is None:
            return self._unknown_model(body.model)
        if body.max_tokens > self._max_new_tokens:
            return self._too_many_tokens(body.max_tokens)
        if body.max_tokens == 0 and not body.echo:
            return _error(400, "max_tokens must be at least 1 unless echo is set",
                          kind="invalid_request_error", param="max_tokens")
        role = request.headers.get(ROLE_HEADER, "http")
        text, logprobs, prompt_tokens, completion_tokens, finish = "", None, 0, 0, "stop"
        if body.echo and body.logprobs is not None:
            lp = await _call(server.token_logprobs.remote(body.prompt, role))
            if isinstance(lp, JSONResponse):
                return lp
            logprobs = {
                "tokens": lp.tokens, "token_logprobs": lp.logprobs,
                "text_offset": lp.text_offsets, "top_logprobs": None,
            }
            prompt_tokens = len(lp.tokens)
        if body.max_tokens > 0:
            gen = GenerationRequest(
                prompt=body.prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                top_p=body.top_p, stop=_as_list(body.stop), seed=body.seed, role=role,
            )
            result = await _call(server.generate.remote(gen))
            if isinstance(result, JSONResponse):
                return result
            text, prompt_tokens = result.text, result.prompt_tokens
            completion_tokens, finish = result.completion_tokens, result.finish_reason
        if body.echo:
            text = body.prompt + text
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            ],
            "usage": _usage(prompt_tokens, completion_tokens),
        }
