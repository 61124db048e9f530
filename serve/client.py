"""``LLMClient``: the only way stage code talks to a model role.

Two transports behind one API, sync and async:

- ``handle``: a Serve ``DeploymentHandle`` to the role's ``LLMServer`` (inside the Ray
  cluster: env runners, Ray Data workers, the driver);
- ``http``: the ``openai`` client against an OpenAI-compatible URL (our ingress, Ray
  Serve LLM / vLLM, or the OpenAI API).

Both retry a transiently failed call (a replica that died, 429, 5xx, a lost connection)
up to the role's ``max_retries`` with doubling backoff, and every attempt takes a permit
from the role's rate limiter, one per role for the whole Ray cluster. Every call is
counted per role (``queries``, ``prompt_tokens``, ``completion_tokens``, ``failures``) on
the client and, inside Ray, as ``teams_rl_queries_total`` metrics.

    client = LLMClient.from_config(cfg, "expert")
    [answer] = client.generate(["Name three prime numbers."])
    yes, no = client.score([{"role": "user", "content": "Is 7 prime?"}], ["Yes", "No"])
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

from serve.errors import TeamsRLError
from serve.protocol import (
    BackendError,
    BackendTimeoutError,
    ChatMessage,
    Completion,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
)

PromptLike = GenerationRequest | str | Sequence[dict] | Sequence[ChatMessage]

# A candidate that is not among the returned alternatives gets this log-probability:
# below anything the API reports, but finite so averages stay defined.
TOP_LOGPROBS_FLOOR = -30.0
RATE_LIMIT_NAMESPACE = "teams-rl"


class LLMCallError(TeamsRLError):
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


# -- rate limit and retries -------------------------------------------------------------


class PermitBucket:
    """Token bucket: at most ``per_minute`` permits a minute, bursts of one.

    ``reserve`` books the next free slot and says how long to wait for it, so the waiting
    happens in the caller, not here (the bucket also runs as a shared Ray actor).
    """

    def __init__(self, per_minute: float | None):
        self._interval_s = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        if not self._interval_s:
            return 0.0
        with self._lock:
            now = time.monotonic()
            wait_s = max(0.0, self._next - now)
            self._next = max(now, self._next) + self._interval_s
        return wait_s


_LOCAL_BUCKETS: dict[str, PermitBucket] = {}
_LOCAL_BUCKETS_LOCK = threading.Lock()


class RateLimit:
    """The role's permits: one named Ray actor per (role, rate) shared by every process of
    the cluster, or one bucket per process when Ray is not initialised. No limit: no-op."""

    def __init__(self, role: str, per_minute: float | None):
        self.role = role
        self.per_minute = per_minute
        self._actor = None

    def __getstate__(self):
        return {**self.__dict__, "_actor": None}

    @property
    def name(self) -> str:
        return f"teams-rl-rate-{self.role}-{self.per_minute:g}"

    def _shared(self):
        import ray

        if not ray.is_initialized():
            return None
        if self._actor is None:
            # Detached: it must outlive whichever worker happened to create it.
            self._actor = (
                ray.remote(PermitBucket)
                .options(name=self.name, namespace=RATE_LIMIT_NAMESPACE, get_if_exists=True,
                         lifetime="detached", num_cpus=0)
                .remote(self.per_minute)
            )
        return self._actor

    def _local(self) -> PermitBucket:
        with _LOCAL_BUCKETS_LOCK:
            return _LOCAL_BUCKETS.setdefault(self.name, PermitBucket(self.per_minute))

    def acquire(self) -> None:
        if not self.per_minute:
            return
        import ray

        actor = self._shared()
        wait_s = ray.get(actor.reserve.remote()) if actor is not None else self._local().reserve()
        time.sleep(wait_s)

    async def aacquire(self) -> None:
        if not self.per_minute:
            return
        actor = self._shared()
        wait_s = await actor.reserve.remote() if actor is not None else self._local().reserve()
        await asyncio.sleep(wait_s)


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a transient failure is tried again."""

    max_retries: int = 3
    backoff_s: float = 0.5

    def delay_s(self, attempt: int) -> float:
        """Wait before attempt ``attempt`` (1 = the first retry)."""
        return self.backoff_s * 2 ** (attempt - 1)


def _replica_lost(exc: BaseException) -> bool:
    """A failure of the serving infrastructure that another attempt may get past."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(exc, (RayActorError, DeploymentUnavailableError, BackPressureError))


# -- transports -------------------------------------------------------------------------


class HandleTransport:
    """Calls an ``LLMServer`` deployment through a Serve handle, looked up lazily by name.

    A call whose replica died (or that Serve could not place) is made again, through the
    handle's router, which skips the dead replica; ``retries`` counts those attempts.
    """

    name = "handle"

    def __init__(
        self,
        *,
        app_name: str,
        deployment_name: str,
        timeout_s: float,
        retry: Retry | None = None,
        limit: RateLimit | None = None,
    ):
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.timeout_s = timeout_s
        self.retry = retry or Retry()
        self.limit = limit or RateLimit(deployment_name, None)
        self.retries = 0
        self._handle = None

    @classmethod
    def from_config(cls, cfg, role: str) -> HandleTransport:
        role_cfg = cfg.models.role(role)
        return cls(
            app_name=cfg.serve.app_name,
            deployment_name=role_cfg.deployment_name,
            timeout_s=role_cfg.timeout_s,
            retry=Retry(role_cfg.max_retries, role_cfg.retry_backoff_s),
            limit=RateLimit(role, role_cfg.requests_per_minute),
        )

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment_name, self.app_name)
        return self._handle

    def _timeout(self) -> BackendTimeoutError:
        return BackendTimeoutError(f"no answer within {self.timeout_s:.0f} s")

    def _sync(self, method: str, items: list) -> list:
        out: list = [None] * len(items)
        pending = list(range(len(items)))
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                time.sleep(self.retry.delay_s(attempt))
                self.retries += len(pending)
            responses = {}
            for i in pending:
                self.limit.acquire()
                responses[i] = getattr(self.handle, method).remote(items[i])
            pending = []
            for i, resp in responses.items():
                try:
                    out[i] = resp.result(timeout_s=self.timeout_s)
                except TimeoutError:
                    resp.cancel()  # the replica drops or stops the work
                    out[i] = self._timeout()
                except Exception as exc:  # noqa: BLE001 - returned to the caller per item
                    out[i] = exc
                    if _replica_lost(exc):
                        pending.append(i)
            if not pending:
                break
        return out

    async def _async(self, method: str, items: list) -> list:
        async def one(item):
            for attempt in range(self.retry.max_retries + 1):
                if attempt:
                    await asyncio.sleep(self.retry.delay_s(attempt))
                    self.retries += 1
                await self.limit.aacquire()
                resp = getattr(self.handle, method).remote(item)
                try:
                    return await asyncio.wait_for(resp, timeout=self.timeout_s)
                except asyncio.TimeoutError:
                    resp.cancel()
                    return self._timeout()
                except Exception as exc:  # noqa: BLE001
                    if not _replica_lost(exc) or attempt == self.retry.max_retries:
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


class IngressKey:
    """Our ingress's key, read where it is used (``serve.auth``); holds only the file path."""

    def __init__(self, key_file: str | None):
        self.key_file = key_file

    def read(self) -> str | None:
        from serve.auth import load_api_key

        return load_api_key(self.key_file)


class EnvKey:
    """An external endpoint's key from an environment variable; holds only its name."""

    def __init__(self, variable: str):
        self.variable = variable

    def read(self) -> str | None:
        return os.environ.get(self.variable) or None


_TOKENIZERS: dict[str, object] = {}
_TOKENIZERS_LOCK = threading.Lock()


def chat_tokenizer(model: str):
    """The model's tokenizer, loaded once per process under a lock.

    transformers' lazy top-level import is not thread-safe (DESIGN §6): the import and the
    load happen here, under the lock, before a call fans out to threads.
    """
    with _TOKENIZERS_LOCK:
        if model not in _TOKENIZERS:
            import transformers

            from serve.models import resolve_model

            _TOKENIZERS[model] = transformers.AutoTokenizer.from_pretrained(resolve_model(model))
        return _TOKENIZERS[model]


class HTTPTransport:
    """Calls an OpenAI-compatible endpoint with the ``openai`` client, one request per call.

    ``score`` has two modes: ``echo`` (completions with ``echo`` + ``logprobs``: exact
    candidate log-probabilities; vLLM and our ingress support it; the chat prompt is
    rendered with the model's tokenizer, the candidate's tokens found by the server's
    ``text_offset``) and ``top_logprobs`` (the first answer token's top alternatives; the
    OpenAI API's chat models allow only this). The key is read when the ``openai`` client
    is built, in the process that calls, and is never kept in a picklable attribute.
    """

    name = "http"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None,
        key: IngressKey | EnvKey,
        score_mode: Literal["echo", "top_logprobs"],
        timeout_s: float = 120.0,
        retry: Retry | None = None,
        limit: RateLimit | None = None,
        tokenizer_model: str | None = None,
        headers: dict[str, str] | None = None,
        max_concurrency: int = 16,
    ):
        self.model = model
        self.base_url = base_url
        self.key = key
        self.score_mode = score_mode
        self.timeout_s = timeout_s
        self.retry = retry or Retry()
        self.limit = limit or RateLimit(model, None)
        self.tokenizer_model = tokenizer_model or model
        self.headers = headers or {}
        self.max_concurrency = max_concurrency
        self.retries = 0
        self._client = None
        self._client_lock = threading.Lock()

    # The openai client holds the key, locks and sockets: rebuild it after pickling.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_client_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _client=None, _client_lock=threading.Lock())

    @classmethod
    def from_config(cls, cfg, role: str) -> HTTPTransport:
        """The role's endpoint: our ingress, the Ray Serve LLM app, or an external API."""
        role_cfg = cfg.models.role(role)
        endpoint = _ENDPOINTS[role_cfg.backend](cfg, role_cfg, role)
        return cls(
            timeout_s=role_cfg.timeout_s,
            retry=Retry(role_cfg.max_retries, role_cfg.retry_backoff_s),
            limit=RateLimit(role, role_cfg.requests_per_minute),
            headers={"X-Teams-RL-Role": role},
            **endpoint,
        )

    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                import openai

                key = self.key.read()
                if not key:
                    if isinstance(self.key, EnvKey) and _is_openai_api(self.base_url):
                        raise BackendError(
                            "the OpenAI API needs a key: set the environment variable "
                            f"{self.key.variable}", transient=False,
                        )
                    key = "unused"  # servers without auth still need a non-empty value
                self._client = openai.OpenAI(
                    api_key=key, base_url=self.base_url, timeout=self.timeout_s,
                    max_retries=0,  # ours, so that every attempt takes a rate-limit permit
                    default_headers=self.headers or None,
                )
            return self._client

    # -- one request -------------------------------------------------------------------

    def _call(self, method: Callable[[], object]):
        """One API request with our retries; a failure becomes a classified ``BackendError``."""
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                time.sleep(self.retry.delay_s(attempt))
                self.retries += 1
            self.limit.acquire()
            try:
                return method()
            except Exception as exc:  # noqa: BLE001 - classified below
                error = self._classify(exc)
                if not error.transient or attempt == self.retry.max_retries:
                    raise error from None

    def _classify(self, exc: Exception) -> BackendError:
        import openai

        where = self.base_url or "the OpenAI API"
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return BackendTimeoutError(f"{self.model}: no answer within {self.timeout_s:.0f} s")
        if isinstance(exc, openai.APIConnectionError):
            return BackendError(f"{self.model}: cannot connect to {where}")
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            return BackendError(
                f"{self.model}: HTTP {code} from {where}: {_error_message(exc)}",
                transient=code in (408, 409, 429) or code >= 500,
            )
        return BackendError(f"{self.model}: {type(exc).__name__}: {exc}")

    def _generate_one(self, r: GenerationRequest) -> Completion:
        common = dict(
            model=self.model, max_tokens=r.max_tokens, temperature=r.temperature,
            top_p=r.top_p, stop=r.stop,
        )
        if r.messages is not None:
            messages = [m.model_dump() for m in r.messages]
            resp = self._call(lambda: self.client.chat.completions.create(
                messages=messages, **common))
            text = resp.choices[0].message.content or ""
        else:
            resp = self._call(lambda: self.client.completions.create(prompt=r.prompt, **common))
            text = resp.choices[0].text or ""
        usage = resp.usage
        return Completion(
            text=text.strip(),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason="length" if resp.choices[0].finish_reason == "length" else "stop",
            model=self.model,
        )

    def _score_echo(self, request: ScoreRequest) -> ScoreResult:
        prompt = chat_tokenizer(self.tokenizer_model).apply_chat_template(
            [m.model_dump() for m in request.messages], tokenize=False, add_generation_prompt=True
        )
        sums, prompt_tokens = [], 0
        for cand in request.candidates:
            text = prompt + cand
            resp = self._call(lambda t=text: self.client.completions.create(
                model=self.model, prompt=t, max_tokens=1, echo=True, logprobs=0,
                temperature=0.0,
            ))
            lp = resp.choices[0].logprobs
            # Candidate tokens start at the prompt's end; max_tokens=1 added one more token.
            span = [i for i, off in enumerate(lp.text_offset) if len(prompt) <= off < len(text)]
            if not span:
                raise BackendError(f"{self.model}: echo returned no candidate tokens",
                                   transient=False)
            prompt_tokens = span[0]
            sums.append(float(sum(lp.token_logprobs[i] or 0.0 for i in span)))
        return ScoreResult(logprobs=sums, prompt_tokens=prompt_tokens)

    def _score_top_logprobs(self, request: ScoreRequest) -> ScoreResult:
        messages = [m.model_dump() for m in request.messages]
        resp = self._call(lambda: self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=1, temperature=0.0,
            logprobs=True, top_logprobs=20,
        ))
        content = resp.choices[0].logprobs.content if resp.choices[0].logprobs else None
        alternatives = content[0].top_logprobs if content else []
        scores = []
        for cand in request.candidates:
            # The first token of a candidate ("Not" of "Not Equal") stands for it.
            head = cand.strip().split()[0].lower() if cand.strip() else ""
            found = [a.logprob for a in alternatives if a.token.strip().lower() == head]
            scores.append(max(found) if found else TOP_LOGPROBS_FLOOR)
        usage = resp.usage
        return ScoreResult(logprobs=scores, prompt_tokens=usage.prompt_tokens if usage else 0)

    # -- batches -----------------------------------------------------------------------

    def _per_item(self, fn, items: list) -> list:
        def one(item):
            try:
                return fn(item)
            except Exception as exc:  # noqa: BLE001 - returned to the caller per item
                return exc

        if len(items) <= 1:
            return [one(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(one, items))

    def generate(self, requests):
        return self._per_item(self._generate_one, requests)

    def score(self, requests):
        if self.score_mode == "top_logprobs":
            return self._per_item(self._score_top_logprobs, requests)
        try:
            chat_tokenizer(self.tokenizer_model)  # once, here, before the threads
        except Exception as exc:  # noqa: BLE001 - every item fails the same way
            return [BackendError(f"{self.model}: cannot load the tokenizer of "
                                 f"{self.tokenizer_model}: {exc}", transient=False)] * len(requests)
        return self._per_item(self._score_echo, requests)

    async def agenerate(self, requests):
        return await asyncio.to_thread(self.generate, requests)

    async def ascore(self, requests):
        return await asyncio.to_thread(self.score, requests)


def _is_openai_api(base_url: str | None) -> bool:
    return base_url is None or "api.openai.com" in base_url


def _ingress_endpoint(cfg, role_cfg, role: str) -> dict:
    # The ingress routes role names to the role's deployment.
    return dict(model=role, base_url=cfg.serve.base_url, key=IngressKey(cfg.serve.api_key_file),
                score_mode="echo", tokenizer_model=role_cfg.model)


def _vllm_endpoint(cfg, role_cfg, role: str) -> dict:
    from serve.backends.vllm_backend import VLLM_ROUTE_PREFIX

    base_url = role_cfg.base_url or (
        f"http://{cfg.serve.host}:{cfg.serve.port}{VLLM_ROUTE_PREFIX}/v1"
    )
    return dict(model=role_cfg.model, base_url=base_url, key=IngressKey(cfg.serve.api_key_file),
                score_mode=_score_mode(role_cfg, base_url), tokenizer_model=role_cfg.model)


def _external_endpoint(cfg, role_cfg, role: str) -> dict:
    return dict(model=role_cfg.model, base_url=role_cfg.base_url,
                key=EnvKey(role_cfg.api_key_env),
                score_mode=_score_mode(role_cfg, role_cfg.base_url))


def _score_mode(role_cfg, base_url: str | None) -> str:
    if role_cfg.score_mode != "auto":
        return role_cfg.score_mode
    return "top_logprobs" if _is_openai_api(base_url) else "echo"


# How each backend's role is reached over HTTP.
_ENDPOINTS = {
    "transformers": _ingress_endpoint,
    "scripted": _ingress_endpoint,
    "vllm": _vllm_endpoint,
    "openai": _external_endpoint,
}
HANDLE_BACKENDS = ("transformers", "scripted")  # served by our LLMServer deployments


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
        ours = role_cfg.backend in HANDLE_BACKENDS
        if transport == "auto":
            import ray

            transport = "handle" if ours and ray.is_initialized() else "http"
        if transport == "handle":
            if not ours:
                raise ValueError(
                    f"models.{role}: backend {role_cfg.backend} is reached over HTTP only"
                )
            return cls(role, HandleTransport.from_config(cfg, role), **sampling)
        return cls(role, HTTPTransport.from_config(cfg, role), **sampling)

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
            from serve.metrics import client_metrics

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
    # The cause first: Ray's wrapper subclasses the cause's class but not its state, so
    # the wrapper itself reads the class default.
    for e in (getattr(exc, "cause", None), exc):
        if isinstance(e, BackendError):
            return e.transient
    return True


def _error_message(exc) -> str:
    try:
        body = exc.response.json()
        return str(body.get("error", {}).get("message") or body)[:500]
    except Exception:  # noqa: BLE001 - a body that is not JSON
        return (exc.response.text or "")[:500]
