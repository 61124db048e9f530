"""``LLMClient``: the only way stage code talks to a model role.

Two transports behind one API, sync and async:

- ``handle``: a Serve ``DeploymentHandle`` to the role's ``LLMServer`` (inside the Ray
  cluster: env runners, Ray Data workers, the driver);
- ``http``: the ``openai`` client against an OpenAI-compatible URL (our ingress, Ray
  Serve LLM / vLLM, or the OpenAI API).

Every call is counted per role (``queries``, ``prompt_tokens``, ``completion_tokens``,
``failures``) on the client and, inside Ray, as ``teams_rl_queries_total`` metrics.

    client = LLMClient.from_config(cfg, "expert")
    [answer] = client.generate(["Name three prime numbers."])
    yes, no = client.score([{"role": "user", "content": "Is 7 prime?"}], ["Yes", "No"])
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from serve.protocol import (
    BackendError,
    ChatMessage,
    Completion,
    GenerationRequest,
    ScoreRequest,
)

PromptLike = GenerationRequest | str | Sequence[dict] | Sequence[ChatMessage]


class LLMCallError(RuntimeError):
    """A model call failed or timed out; ``role`` says which role, the message says why.

    ``transient`` (from the backend's error; see ``BackendError``): the call may succeed
    if made again later. Stage code keeps transiently failed work pending (never complete)
    and counts a non-transient failure as a failed evolution.
    """

    def __init__(self, role: str, message: str, *, transient: bool = True):
        super().__init__(f"{role}: {message}")
        self.role = role
        self.transient = transient


@dataclass
class Usage:
    queries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class HandleTransport:
    """Calls an ``LLMServer`` deployment through a Serve handle, looked up lazily by name."""

    name = "handle"

    def __init__(self, *, app_name: str, deployment_name: str, timeout_s: float):
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.timeout_s = timeout_s
        self._handle = None

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment_name, self.app_name)
        return self._handle

    def _sync(self, method: str, items: list) -> list:
        responses = [getattr(self.handle, method).remote(item) for item in items]
        out = []
        for resp in responses:
            try:
                out.append(resp.result(timeout_s=self.timeout_s))
            except TimeoutError:
                resp.cancel()
                out.append(BackendError(f"no answer within {self.timeout_s:.0f} s"))
            except Exception as exc:  # noqa: BLE001 - returned to the caller per item
                out.append(exc)
        return out

    async def _async(self, method: str, items: list) -> list:
        async def one(item):
            resp = getattr(self.handle, method).remote(item)
            try:
                return await asyncio.wait_for(resp, timeout=self.timeout_s)
            except asyncio.TimeoutError:
                resp.cancel()
                return BackendError(f"no answer within {self.timeout_s:.0f} s")
            except Exception as exc:  # noqa: BLE001
                return exc

        return await asyncio.gather(*(one(i) for i in items))

    def generate(self, requests):
        return self._sync("generate", requests)

    def score(self, requests):
        return self._sync("score", requests)

    async def agenerate(self, requests):
        return await self._async("generate", requests)

    async def ascore(self, requests):
        return await self._async("score", requests)


class HTTPTransport:
    """Calls an OpenAI-compatible endpoint through ``serve.backends.openai_backend``."""

    name = "http"

    def __init__(self, backend):
        self.backend = backend

    def _per_item(self, fn, items: list) -> list:
        def one(item):
            try:
                return fn([item])[0]
            except Exception as exc:  # noqa: BLE001 - returned to the caller per item
                return exc

        return self.backend._map(one, items)

    def generate(self, requests):
        return self._per_item(self.backend.generate, requests)

    def score(self, requests):
        return self._per_item(self.backend.score, requests)

    async def agenerate(self, requests):
        return await asyncio.to_thread(self.generate, requests)

    async def ascore(self, requests):
        return await asyncio.to_thread(self.score, requests)


class LLMClient:
    def __init__(
        self,
        role: str,
        transport: HandleTransport | HTTPTransport,
        *,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_tokens: int = 128,
    ):
        self.role = role
        self.transport = transport
        self.defaults = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.usage = Usage()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, cfg, role: str, *, transport: Literal["auto", "handle", "http"] = "auto"
    ) -> LLMClient:
        """The client for ``role``: a handle inside Ray for our deployments, else HTTP."""
        role_cfg = cfg.models.role(role)
        sampling = role_cfg.sampling.model_dump()
        if role_cfg.backend in ("transformers", "scripted"):
            if transport == "auto":
                import ray

                transport = "handle" if ray.is_initialized() else "http"
            if transport == "handle":
                chosen = HandleTransport(
                    app_name=cfg.serve.app_name,
                    deployment_name=role_cfg.deployment_name,
                    timeout_s=role_cfg.timeout_s,
                )
                return cls(role, chosen, **sampling)
            return cls(role, HTTPTransport(_ingress_backend(cfg, role_cfg, role)), **sampling)
        if transport == "handle":
            raise ValueError(f"models.{role}: backend {role_cfg.backend} is reached over HTTP only")
        return cls(role, HTTPTransport(_external_backend(cfg, role_cfg)), **sampling)

    # -- requests --------------------------------------------------------------------------

    def _request(self, item: PromptLike) -> GenerationRequest:
        if isinstance(item, GenerationRequest):
            return item.model_copy(update={"role": self.role})
        if isinstance(item, str):
            messages = [ChatMessage(role="user", content=item)]
        else:
            messages = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in item]
        return GenerationRequest(messages=messages, role=self.role, **self.defaults)

    def _score_request(self, prompt, candidates: Sequence[str]) -> ScoreRequest:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in prompt]
        return ScoreRequest(messages=messages, candidates=list(candidates), role=self.role)

    # -- accounting --------------------------------------------------------------------------

    def _account(self, results: list, *, return_exceptions: bool) -> list:
        out, first_error = [], None
        for r in results:
            if isinstance(r, BaseException):
                message = str(getattr(r, "cause", None) or r).strip().splitlines()
                err = LLMCallError(self.role, message[-1] if message else type(r).__name__,
                                   transient=_is_transient(r))
                self._record(failed=True)
                first_error = first_error or err
                out.append(err)
            else:
                completion = r.completion_tokens if isinstance(r, Completion) else 0
                self._record(prompt=r.prompt_tokens, completion=completion)
                out.append(r)
        if first_error is not None and not return_exceptions:
            raise first_error
        return out

    def _record(self, *, prompt: int = 0, completion: int = 0, failed: bool = False) -> None:
        with self._lock:
            self.usage.queries += 1
            self.usage.failures += int(failed)
            self.usage.prompt_tokens += prompt
            self.usage.completion_tokens += completion
        try:
            import ray

            if not ray.is_initialized():
                return
            from rl_system.metrics import client_metrics

            m = client_metrics()
            m.queries.inc(tags={"role": self.role, "status": "error" if failed else "ok"})
            if prompt:
                m.tokens.inc(prompt, tags={"role": self.role, "type": "prompt"})
            if completion:
                m.tokens.inc(completion, tags={"role": self.role, "type": "completion"})
        except ImportError:
            pass

    # -- public API ----------------------------------------------------------------------

    def generate(
        self, requests: Sequence[PromptLike], *, return_exceptions: bool = False
    ) -> list[Completion]:
        """One completion per request, in order. Failures raise ``LLMCallError`` unless
        ``return_exceptions`` is set, in which case they take the failed items' places."""
        results = self.transport.generate([self._request(r) for r in requests])
        return self._account(results, return_exceptions=return_exceptions)

    async def agenerate(
        self, requests: Sequence[PromptLike], *, return_exceptions: bool = False
    ) -> list[Completion]:
        results = await self.transport.agenerate([self._request(r) for r in requests])
        return self._account(results, return_exceptions=return_exceptions)

    def score(self, prompt, candidates: Sequence[str]) -> list[float]:
        """Log-probability of each candidate as the answer to ``prompt``."""
        return self.score_many([(prompt, candidates)])[0]

    async def ascore(self, prompt, candidates: Sequence[str]) -> list[float]:
        return (await self.ascore_many([(prompt, candidates)]))[0]

    def score_many(self, items, *, return_exceptions: bool = False) -> list:
        results = self.transport.score([self._score_request(p, c) for p, c in items])
        results = self._account(results, return_exceptions=return_exceptions)
        return [r if isinstance(r, BaseException) else r.logprobs for r in results]

    async def ascore_many(self, items, *, return_exceptions: bool = False) -> list:
        results = await self.transport.ascore([self._score_request(p, c) for p, c in items])
        results = self._account(results, return_exceptions=return_exceptions)
        return [r if isinstance(r, BaseException) else r.logprobs for r in results]


def _is_transient(exc: BaseException) -> bool:
    """A backend error says for itself; anything else (a dead actor, a lost connection)
    is an infrastructure failure that a later attempt may get past."""
    cause = getattr(exc, "cause", None)
    for e in (exc, cause):
        if isinstance(e, BackendError):
            return e.transient
    return True


def _ingress_backend(cfg, role_cfg, role: str):
    from rl_system.config import API_KEY_ENV
    from serve.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(
        role,  # the ingress routes role names to the role's deployment
        base_url=cfg.serve.base_url,
        api_key_env=API_KEY_ENV,
        score_mode="echo",
        timeout_s=role_cfg.timeout_s,
        max_retries=role_cfg.max_retries,
        tokenizer_model=role_cfg.model,
        extra_headers={"X-Teams-RL-Role": role},
    )


def _external_backend(cfg, role_cfg):
    from serve.backends.openai_backend import OpenAIBackend
    from serve.backends.vllm_backend import VLLM_ROUTE_PREFIX

    base_url = role_cfg.base_url
    if role_cfg.backend == "vllm" and base_url is None:
        base_url = f"http://{cfg.serve.host}:{cfg.serve.port}{VLLM_ROUTE_PREFIX}/v1"
    return OpenAIBackend(
        role_cfg.model,
        base_url=base_url,
        api_key_env=role_cfg.api_key_env,
        score_mode=role_cfg.score_mode,
        timeout_s=role_cfg.timeout_s,
        max_retries=role_cfg.max_retries,
        requests_per_minute=role_cfg.requests_per_minute,
    )
