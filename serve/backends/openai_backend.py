"""Any OpenAI-compatible endpoint: the OpenAI API, a vLLM server, Ray Serve LLM, our ingress.

The key is read from an environment variable at ``load`` and handed only to the
``openai`` client; it never appears in a message, a log line or a file we write.
Retries with exponential backoff and timeouts are the ``openai`` client's own; the
rate limit is ours (a token bucket shared by the threads of this process).

``score`` has two modes: ``echo`` (completions with ``echo`` + ``logprobs``, exact
candidate log-probabilities; vLLM and our ingress support it) and ``top_logprobs`` (the
first answer token's top alternatives; the OpenAI API's chat models allow only this).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from serve.protocol import (
    BackendError,
    Completion,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprobs,
)

# A candidate that is not among the returned alternatives gets this log-probability:
# below anything the API reports, but finite so averages stay defined.
TOP_LOGPROBS_FLOOR = -30.0


class RateLimiter:
    """Token bucket: at most ``per_minute`` acquisitions per minute, bursts of one."""

    def __init__(self, per_minute: float | None):
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = max(0.0, self._next - now)
            self._next = max(now, self._next) + self._interval
        if wait:
            time.sleep(wait)


class OpenAIBackend:
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        api_key: str | None = None,
        score_mode: str = "auto",
        timeout_s: float = 120.0,
        max_retries: int = 3,
        requests_per_minute: float | None = None,
        max_concurrency: int = 16,
        tokenizer_model: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ):
        self.model_id = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._api_key = api_key  # explicit key (our ingress's); else read from api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.tokenizer_model = tokenizer_model or model
        self.extra_headers = extra_headers or {}
        self.requests_per_minute = requests_per_minute
        if score_mode == "auto":
            score_mode = (
                "top_logprobs" if "api.openai.com" in (base_url or "api.openai.com") else "echo"
            )
        self.score_mode = score_mode
        self._client = None
        self._tokenizer = None
        self._limiter = RateLimiter(requests_per_minute)

    # The openai client holds locks and sockets: rebuild it after pickling.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_client=None, _tokenizer=None, _limiter=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._limiter = RateLimiter(self.requests_per_minute)

    def load(self) -> None:
        import openai

        key = self._api_key or os.environ.get(self.api_key_env)
        if not key:
            if self.base_url is None or "api.openai.com" in self.base_url:
                raise BackendError(
                    f"the OpenAI API needs a key: set the environment variable {self.api_key_env}"
                )
            key = "unused"  # local servers without auth still need a non-empty value
        self._client = openai.OpenAI(
            api_key=key,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
            default_headers=self.extra_headers or None,
        )

    @property
    def client(self):
        if self._client is None:
            self.load()
        return self._client

    def _map(self, fn, items):
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _call(self, fn, **kwargs):
        import openai

        self._limiter.acquire()
        try:
            return fn(**kwargs)
        except openai.APITimeoutError:
            raise BackendError(
                f"{self.model_id}: no answer within {self.timeout_s:.0f} s "
                f"(after {self.max_retries} retries)"
            ) from None
        except openai.APIStatusError as exc:
            raise BackendError(
                f"{self.model_id}: HTTP {exc.status_code} from {self.base_url or 'OpenAI'}: "
                f"{_error_message(exc)}"
            ) from None
        except openai.APIConnectionError:
            raise BackendError(
                f"{self.model_id}: cannot connect to {self.base_url or 'the OpenAI API'}"
            ) from None

    # -- protocol ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        return self._map(self._generate_one, requests)

    def _generate_one(self, r: GenerationRequest) -> Completion:
        common = dict(
            model=self.model_id,
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop=r.stop,
            extra_headers={"X-Teams-RL-Role": r.role},
        )
        if r.seed is not None:  # the OpenAI API's and vLLM's per-request sampling seed
            common["seed"] = r.seed
        if r.messages is not None:
            resp = self._call(
                self.client.chat.completions.create,
                messages=[m.model_dump() for m in r.messages],
                **common,
            )
            text = resp.choices[0].message.content or ""
        else:
            resp = self._call(self.client.completions.create, prompt=r.prompt, **common)
            text = resp.choices[0].text or ""
        usage = resp.usage
        return Completion(
            text=text.strip(),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason="length" if resp.choices[0].finish_reason == "length" else "stop",
            model=self.model_id,
        )

    def token_logprobs(self, texts: list[str]) -> list[TokenLogprobs]:
        return self._map(self._token_logprobs_one, texts)

    def _token_logprobs_one(self, text: str) -> TokenLogprobs:
        resp = self._call(
            self.client.completions.create,
            model=self.model_id,
            prompt=text,
            max_tokens=1,
            echo=True,
            logprobs=0,
            temperature=0.0,
        )
        lp = resp.choices[0].logprobs
        n = len(lp.text_offset)
        # max_tokens=1 appends one generated token; keep only the echoed prompt.
        keep = [i for i in range(n) if lp.text_offset[i] < len(text)]
        return TokenLogprobs(
            tokens=[lp.tokens[i] for i in keep],
            logprobs=[lp.token_logprobs[i] for i in keep],
            text_offsets=[lp.text_offset[i] for i in keep],
        )

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if self.score_mode == "top_logprobs":
            return self._map(self._score_top_logprobs, requests)
        return self._map(self._score_echo, requests)

    def _render_chat(self, request: ScoreRequest) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from rl_system.models import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_model))
        return self._tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], tokenize=False, add_generation_prompt=True
        )

    def _score_echo(self, request: ScoreRequest) -> ScoreResult:
        prompt = self._render_chat(request)
        sums, prompt_tokens = [], 0
        for lp in self.token_logprobs([prompt + c for c in request.candidates]):
            start = [i for i, off in enumerate(lp.text_offsets) if off >= len(prompt)]
            if not start:
                raise BackendError(f"{self.model_id}: echo returned no candidate tokens")
            prompt_tokens = start[0]
            sums.append(float(sum(lp.logprobs[i] or 0.0 for i in start)))
        return ScoreResult(logprobs=sums, prompt_tokens=prompt_tokens)

    def _score_top_logprobs(self, request: ScoreRequest) -> ScoreResult:
        resp = self._call(
            self.client.chat.completions.create,
            model=self.model_id,
            messages=[m.model_dump() for m in request.messages],
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=20,
        )
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

    def check_health(self) -> None:
        self.client.models.list()


def _error_message(exc) -> str:
    try:
        body = exc.response.json()
        return str(body.get("error", {}).get("message") or body)[:500]
    except Exception:  # noqa: BLE001 - a body that is not JSON
        return (exc.response.text or "")[:500]
