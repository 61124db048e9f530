"""``LLMServer``: one Serve deployment per (backend, model), shared by the roles using it.

Requests from many callers (env runners, Ray Data workers, the HTTP ingress) are grouped
by ``@serve.batch`` into one backend call; the backend runs in a worker thread so the
replica keeps answering health checks and queueing requests while a batch computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from serve.protocol import (
    BackendError,
    BackendTimeoutError,
    Completion,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprobs,
)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LLMServerSpec:
    """Everything a replica needs to build its backend; plain data, cheap to pickle."""

    deployment_name: str
    backend: str
    backend_kwargs: dict[str, Any]
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    request_timeout_s: float = 120.0
    max_new_tokens_limit: int = 4096
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Ticket:
    """A request in a batch queue; ``gone`` is set once its caller stops waiting."""

    item: Any
    gone: threading.Event = field(default_factory=threading.Event)


def _caller_gone() -> BackendError:
    return BackendError("cancelled: the caller stopped waiting")


class LLMServer:
    def __init__(self, spec: LLMServerSpec):
        from serve.backends import build_backend
        from serve.metrics import llm_metrics

        self.spec = spec
        self.backend = build_backend(spec.backend, **spec.backend_kwargs)
        self.backend.load()
        for method in (self._generate_batch, self._score_batch, self._logprobs_batch):
            method.set_max_batch_size(spec.max_batch_size)
            method.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self._metrics = llm_metrics()

    # -- public methods, called through DeploymentHandle ------------------------------

    async def generate(self, request: GenerationRequest) -> Completion:
        if request.max_tokens > self.spec.max_new_tokens_limit:
            raise BackendError(
                f"max_tokens {request.max_tokens} exceeds this server's limit "
                f"{self.spec.max_new_tokens_limit}",
                transient=False,
            )
        result = await self._serve("generate", request.role, self._generate_batch, request)
        self._count_tokens(request.role, result.prompt_tokens, result.completion_tokens)
        return result

    async def score(self, request: ScoreRequest) -> ScoreResult:
        result = await self._serve("score", request.role, self._score_batch, request)
        self._count_tokens(request.role, result.prompt_tokens, 0)
        return result

    async def token_logprobs(self, text: str, role: str = "http") -> TokenLogprobs:
        return await self._serve("logprobs", role, self._logprobs_batch, text)

    async def model_id(self) -> str:
        return self.backend.model_id

    async def check_health(self) -> None:
        # The backend's check may run the model: keep the event loop free meanwhile.
        await asyncio.to_thread(self.backend.check_health)

    # -- batching ------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, tickets: list[_Ticket]) -> list:
        return await self._run_batch("generate", self.backend.generate, tickets)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _score_batch(self, tickets: list[_Ticket]) -> list:
        return await self._run_batch("score", self.backend.score, tickets)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _logprobs_batch(self, tickets: list[_Ticket]) -> list:
        return await self._run_batch("logprobs", self.backend.token_logprobs, tickets)

    async def _run_batch(self, kind: str, fn, tickets: list[_Ticket]) -> list:
        """One backend call for the batch's live requests; results (or errors) per ticket.

        Serve drops a request whose caller has gone before its batch starts; one that goes
        while its batch runs lets the backend stop early once no caller is left.
        """
        live = [t for t in tickets if not t.gone.is_set()]
        if not live:
            return [_caller_gone() for _ in tickets]
        self._metrics.batch_size.observe(
            len(live), tags={"deployment": self.spec.deployment_name, "kind": kind}
        )
        results = await asyncio.to_thread(
            fn, [t.item for t in live], cancelled=lambda: all(t.gone.is_set() for t in live)
        )
        by_ticket = dict(zip(map(id, live), results, strict=True))
        return [by_ticket[id(t)] if id(t) in by_ticket else _caller_gone() for t in tickets]

    # -- accounting --------------------------------------------------------------------

    async def _serve(self, kind: str, role: str, batch_method, item):
        """Queue ``item`` for its batch, within the time limit; its own error is raised here."""
        tags = {"deployment": self.spec.deployment_name, "role": role, "kind": kind}
        started = time.monotonic()
        ticket = _Ticket(item)
        try:
            result = await asyncio.wait_for(
                batch_method(ticket), timeout=self.spec.request_timeout_s
            )
        except asyncio.TimeoutError:
            self._metrics.requests.inc(tags={**tags, "status": "timeout"})
            raise BackendTimeoutError(
                f"{self.spec.deployment_name}: {kind} took longer than "
                f"{self.spec.request_timeout_s:.0f} s (serve.request_timeout_s)"
            ) from None
        except asyncio.CancelledError:  # the caller has gone
            self._metrics.requests.inc(tags={**tags, "status": "cancelled"})
            raise
        except Exception:
            self._metrics.requests.inc(tags={**tags, "status": "error"})
            raise
        finally:
            # A timed-out or cancelled request must not keep its batch computing.
            ticket.gone.set()
        if isinstance(result, BaseException):
            self._metrics.requests.inc(tags={**tags, "status": "error"})
            raise result
        self._metrics.requests.inc(tags={**tags, "status": "ok"})
        self._metrics.latency.observe(
            time.monotonic() - started,
            tags={"deployment": self.spec.deployment_name, "kind": kind},
        )
        return result

    def _count_tokens(self, role: str, prompt: int, completion: int) -> None:
        base = {"deployment": self.spec.deployment_name, "role": role}
        self._metrics.tokens.inc(prompt, tags={**base, "type": "prompt"})
        if completion:
            self._metrics.tokens.inc(completion, tags={**base, "type": "completion"})
