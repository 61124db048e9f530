"""OpenAI-compatible HTTP ingress in front of the ``LLMServer`` deployments.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(``echo`` + ``logprobs`` give prompt-token log-probabilities, which ``LLMClient.score``
uses over HTTP), ``GET /health``. With a key (``$TEAMS_RL_API_KEY`` or
``serve.api_key_file``, read in the replica) every route but ``/health`` needs
``Authorization: Bearer <key>``, under whatever route prefix the app is deployed; the
documentation routes are off. Errors use the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` so the ``openai`` client raises its
usual exceptions; a field this server cannot honour is a 400 that names it.

Streaming (``stream: true``): the backends batch whole requests, so the answer is
generated in full and then sent as server-sent events, one chunk per word with its
leading whitespace; the chunks join into the full text. ``n`` > 1 runs ``n`` requests.
Chat ``logprobs`` are the answer tokens' log-probabilities, computed by scoring the
answer's token prefixes after the prompt (about one forward pass per
``_PREFIXES_PER_SCORE`` answer tokens); ``top_logprobs`` alternatives are not offered.
"""

# No `from __future__ import annotations`: FastAPI must see real types on Serve's
# wrapped ingress methods.
import asyncio
import json
import re
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import check_exposure, guard, load_api_key
from serve.protocol import (
    BackendError,
    BackendTimeoutError,
    ChatMessage,
    GenerationRequest,
    ScoreRequest,
)

ROLE_HEADER = "x-teams-rl-role"
UNKNOWN_ROLE = "http"  # metric label of every caller that is not one of our roles
OPEN_PATHS = frozenset({"/health"})
DEFAULT_CHAT_MAX_TOKENS = 256
_PREFIXES_PER_SCORE = 8  # answer prefixes per score call: bounds one forward pass's logits

app = FastAPI(
    title="teams-rl OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None
)

# Fields clients send that we accept only at their neutral value; anything else is a 400
# naming the field (it is not in the model, and the models forbid extra fields).
_NEUTRAL_VALUES: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "parallel_tool_calls": (True, False),
    "best_of": (1,),
}
# Roles our backends do not know, as the role they play for the model.
_BACKEND_ROLE = {"developer": "system", "tool": "user"}


def _nth_choice(gen: GenerationRequest, i: int) -> GenerationRequest:
    """Choice ``i`` of ``n``: a seeded request gets seed + i, so the n choices differ and
    each is still reproducible."""
    if gen.seed is None or i == 0:
        return gen
    return gen.model_copy(update={"seed": gen.seed + i})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {
                k: v for k, v in data.items()
                if not (k in _NEUTRAL_VALUES and (v is None or v in _NEUTRAL_VALUES[k]))
            }
        return data


class InMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_call_id: str | None = Field(None, description="tool messages: kept as text only.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {kind!r} is not supported (text only)")
            texts.append(part["text"])
        return "".join(texts)

    def for_backend(self) -> ChatMessage:
        return ChatMessage(role=_BACKEND_ROLE.get(self.role, self.role), content=self.content or "")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, description="Sampling seed: same seed, same answer.")
    user: str | None = None  # an end-user id for the caller's logs; changes nothing here

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[InMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(p, str) and p for p in items):
            raise ValueError("give a non-empty string or a list of them (token ids are not "
                             "accepted)")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class OpenAIError(Exception):
    """A request this server refuses; becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return _error(self.status, str(self), kind=self.kind, param=self.param, code=self.code)


def _error(status: int, message: str, *, kind: str, code: str | None = None, param=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        msg, loc = "request body is not valid JSON", None
    elif first.get("type") == "extra_forbidden":
        msg = "this server cannot honour this field (or this value of it)"
    return _error(400, f"{loc}: {msg}" if loc else msg, kind="invalid_request_error", param=loc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no route {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                  kind="invalid_request_error", code=str(exc.status_code))


@app.exception_handler(OpenAIError)
async def _refused(_: Request, exc: OpenAIError):
    return exc.response()


async def _call(response):
    """Await a handle call; a backend failure becomes an ``OpenAIError``."""
    try:
        return await response
    except Exception as exc:  # noqa: BLE001 - the caller gets a message, not a hang
        raise _as_openai_error(exc) from None


def _as_openai_error(exc: BaseException) -> OpenAIError:
    # Ray wraps replica exceptions in a subclass of the cause's class that lacks the
    # cause's state: the original carries the message and ``transient`` meant for users.
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, BackendError):
        cause = exc
    if isinstance(cause, BackendTimeoutError):
        return OpenAIError(504, str(cause), kind="timeout_error")
    if isinstance(cause, BackendError):
        # A request the backend refuses as it stands (too long) is the caller's to fix.
        return OpenAIError(502 if cause.transient else 400, str(cause), kind="backend_error")
    return OpenAIError(500, f"internal error: {type(exc).__name__}", kind="server_error")


def _metric_role(header: str | None, roles: frozenset[str]) -> str:
    """The ``role`` metric label: a header value only if it names one of our roles (an
    unchecked header would let any caller mint label values without bound)."""
    return header if header in roles else UNKNOWN_ROLE


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _pieces(text: str) -> list[str]:
    """Stream chunks: each word with the whitespace before it; they join into ``text``."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)):]
    if tail:
        pieces.append(tail)
    return pieces or [text]


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


def _tokens_from(lp, *, start: int, shift: int) -> dict:
    """The tokens of ``lp`` that begin at or after character ``start``, offsets less ``shift``."""
    keep = [i for i, off in enumerate(lp.text_offsets) if off >= start]
    return {"tokens": [lp.tokens[i] for i in keep],
            "token_logprobs": [lp.logprobs[i] for i in keep],
            "text_offset": [lp.text_offsets[i] - shift for i in keep]}


def _stream(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _answer_logprobs(server, messages: list[ChatMessage], text: str, role: str) -> dict:
    """OpenAI chat ``logprobs`` of ``text`` as the answer to ``messages``.

    The answer's tokens come from the backend's tokenizer (``token_logprobs`` of the
    answer alone); each token's log-probability after the prompt is the difference of the
    scores of consecutive answer prefixes that end at token boundaries.
    """
    if not text:
        return {"content": [], "refusal": None}
    tokens = await _call(server.token_logprobs.remote(text, role))
    starts = [0, *tokens.text_offsets[1:]]
    ends = [*starts[1:], len(text)]
    prefixes = [text[:e] for e in ends]
    cumulative: list[float] = []
    for k in range(0, len(prefixes), _PREFIXES_PER_SCORE):
        request = ScoreRequest(messages=messages, candidates=prefixes[k: k + _PREFIXES_PER_SCORE],
                               role=role)
        cumulative += (await _call(server.score.remote(request))).logprobs
    content, before = [], 0.0
    for start, end, total in zip(starts, ends, cumulative, strict=True):
        piece = text[start:end]
        # A prefix tokenised alone may merge its last token differently; a log-probability
        # is never above 0.
        content.append({"token": piece, "logprob": min(0.0, total - before),
                        "bytes": list(piece.encode()), "top_logprobs": []})
        before = total
    return {"content": content, "refusal": None}


# Everything the ingress class uses is defined above it: Serve freezes the app (and with
# it the class's route methods and the module globals they name) when the class is built.
@serve.deployment(name="openai-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class OpenAIIngress:
    """Routes by the request's ``model``: a model reference or a role name.

    ``limits`` is ``serve.limits`` as a mapping; ``host`` is ``serve.host`` (an ingress
    reachable from other machines refuses to start without a key).
    """

    def __init__(
        self,
        servers: dict,  # deployment name -> DeploymentHandle
        routes: dict[str, str],  # model reference or role -> deployment name
        *,
        roles: tuple[str, ...],
        limits: dict[str, Any],
        host: str = "127.0.0.1",
        api_key_file: str | None = None,
    ):
        self._servers = servers
        self._routes = routes
        self._roles = frozenset(roles)
        self._limits = dict(limits)
        # Read here, in the replica: the key is never a bind argument (Serve checkpoints those).
        self._key = load_api_key(api_key_file)
        check_exposure(host, self._key)

    async def __serve_build_asgi_app__(self):
        # Serve calls this after the constructor, before the app starts: the middleware
        # gets the key here and wraps every route, declared or not.
        return guard(self.app, key=self._key, open_paths=OPEN_PATHS,
                     max_request_bytes=self._limits["max_request_bytes"])

    # -- checks ----------------------------------------------------------------------------

    def _server(self, model: str):
        name = self._routes.get(model)
        if name is None:
            known = ", ".join(sorted(self._routes))
            raise OpenAIError(404, f"model {model!r} is not served here; available: {known}",
                              param="model", code="model_not_found")
        return self._servers[name]

    def _role(self, request: Request) -> str:
        return _metric_role(request.headers.get(ROLE_HEADER), self._roles)

    def _check(self, body: _Sampling, *, max_tokens: int, prompts: int = 1) -> None:
        limits = self._limits
        if max_tokens > limits["max_tokens"]:
            raise OpenAIError(400, f"max_tokens {max_tokens} exceeds the limit "
                              f"{limits['max_tokens']}", param="max_tokens")
        if len(body.stops or ()) > limits["max_stop_strings"]:
            raise OpenAIError(400, f"stop: at most {limits['max_stop_strings']} stop strings",
                              param="stop")
        if body.n * prompts > limits["max_choices"]:
            raise OpenAIError(400, f"n times the prompts is {body.n * prompts}; at most "
                              f"{limits['max_choices']} choices per request", param="n")
        if body.stream_options is not None and not body.stream:
            raise OpenAIError(400, "stream_options needs stream: true", param="stream_options")

    # -- routes ----------------------------------------------------------------------------

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
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        self._check(body, max_tokens=max_tokens)
        if body.top_logprobs:
            raise OpenAIError(400, "top_logprobs: alternatives are not offered here; "
                              "logprobs: true gives the chosen tokens' log-probabilities",
                              param="top_logprobs")
        if body.logprobs and body.stream:
            raise OpenAIError(400, "logprobs are not available with stream", param="logprobs")
        role = self._role(request)
        messages = [m.for_backend() for m in body.messages]
        gen = GenerationRequest(
            messages=messages, max_tokens=max_tokens, temperature=body.temperature,
            top_p=body.top_p, stop=body.stops, seed=body.seed, role=role,
        )
        results = await asyncio.gather(
            *(_call(server.generate.remote(_nth_choice(gen, i))) for i in range(body.n))
        )
        logprobs = [None] * len(results)
        if body.logprobs:
            logprobs = [
                await _answer_logprobs(server, messages, r.text, role) for r in results
            ]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.model}
        usage = _usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
        if body.stream:
            return _stream(self._chat_chunks(head, results, usage, body.include_usage))
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": lp,
                }
                for i, (r, lp) in enumerate(zip(results, logprobs, strict=True))
            ],
            "usage": usage,
        }

    @staticmethod
    def _chat_chunks(head: dict, results: list, usage: dict, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        def chunk(i: int, delta: dict, finish=None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **extra})

        for i, r in enumerate(results):
            yield chunk(i, {"role": "assistant", "content": ""})
            for piece in _pieces(r.text):
                yield chunk(i, {"content": piece})
            yield chunk(i, {}, r.finish_reason)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage})
        yield _sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        server = self._server(body.model)
        prompts = body.prompts
        self._check(body, max_tokens=body.max_tokens, prompts=len(prompts))
        if body.max_tokens == 0 and not body.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 unless echo is set",
                              param="max_tokens")
        if body.logprobs:
            raise OpenAIError(400, "logprobs: top alternatives are not offered here; "
                              "logprobs: 0 gives the chosen tokens' log-probabilities",
                              param="logprobs")
        if body.logprobs is not None and body.stream:
            raise OpenAIError(400, "logprobs are not available with stream", param="logprobs")
        role = self._role(request)
        jobs = [(p, j) for p in prompts for j in range(body.n)]  # OpenAI's choice order
        choices = await asyncio.gather(*(self._one_completion(server, body, p, role, choice=j)
                                         for p, j in jobs))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.model}
        usage = _usage(sum(c["prompt_tokens"] for c in choices[:: body.n]),
                       sum(c["completion_tokens"] for c in choices))
        if body.stream:
            return _stream(self._completion_chunks(head, choices, usage, body.include_usage))
        return {
            **head,
            "object": "text_completion",
            "choices": [
                {"index": i, "text": c["text"], "logprobs": c["logprobs"],
                 "finish_reason": c["finish_reason"]}
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }

    async def _one_completion(self, server, body: CompletionRequest, prompt: str, role: str,
                              *, choice: int = 0):
        text, prompt_tokens, completion_tokens, finish = "", 0, 0, "stop"
        if body.max_tokens > 0:
            gen = GenerationRequest(
                prompt=prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                top_p=body.top_p, stop=body.stops, seed=body.seed, role=role,
            )
            result = await _call(server.generate.remote(_nth_choice(gen, choice)))
            text, prompt_tokens = result.text, result.prompt_tokens
            completion_tokens, finish = result.completion_tokens, result.finish_reason
        logprobs = None
        if body.logprobs is not None:
            # The prompt's tokens as the prompt alone tokenises (what echo scoring needs:
            # an answer appended could merge with the prompt's last token), then the
            # answer's tokens; offsets index the returned text.
            parts = []
            if body.echo:
                parts.append(_tokens_from(await _call(server.token_logprobs.remote(prompt, role)),
                                          start=0, shift=0))
            if text:
                whole = await _call(server.token_logprobs.remote(prompt + text, role))
                parts.append(_tokens_from(whole, start=len(prompt),
                                          shift=0 if body.echo else len(prompt)))
            logprobs = {
                "tokens": [t for p in parts for t in p["tokens"]],
                "token_logprobs": [x for p in parts for x in p["token_logprobs"]],
                "text_offset": [o for p in parts for o in p["text_offset"]],
                "top_logprobs": None,
            }
            if body.max_tokens == 0:
                prompt_tokens = len(logprobs["tokens"])
        return {"text": prompt + text if body.echo else text, "logprobs": logprobs,
                "finish_reason": finish, "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens}

    @staticmethod
    def _completion_chunks(head: dict, choices: list, usage: dict, include_usage: bool):
        head = {**head, "object": "text_completion"}
        extra = {"usage": None} if include_usage else {}
        for i, c in enumerate(choices):
            pieces = _pieces(c["text"])
            for k, piece in enumerate(pieces):
                finish = c["finish_reason"] if k == len(pieces) - 1 else None
                choice = {"index": i, "text": piece, "logprobs": None, "finish_reason": finish}
                yield _sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage})
        yield _sse("[DONE]")
