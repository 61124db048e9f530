"""Exact resume: the request-hash cache, request seeds and the expert query budget.

Every model call of stage 2 goes through a request-hash cache in ``cache/`` (one
append-only JSONL file per actor; a torn last line is skipped). Each expert request
carries a sampling ``seed`` derived from its request hash (the expert samples as
``models.expert.sampling`` says, yet a request asked again gets the same answer); action
choices use a per-seed RNG (``rl_system.strategies.seed_rng``). A re-run with the same
config replays cached answers (counted as ``expert_queries_cached``, not paid) and yields
the same rows. ``dataset.max_expert_queries`` caps the expert calls *paid* by one
invocation (one ``QueryBudget`` actor shared by every stage actor): seeds it cuts short
are left out and finished by the next invocation.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_DIR = "cache"


class BudgetExhausted(RuntimeError):
    """``dataset.max_expert_queries`` is spent; the build stops and can be resumed."""


class RequestCache:
    """Answers by request hash, stored as JSONL files under ``directory``.

    Each writer appends to its own file (no two processes share one), so lines never
    interleave; a line torn by SIGKILL fails to parse and is skipped on load.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._entries: dict[str, Any] = {}
        self._file = None
        self.torn_lines = 0
        if self.directory.is_dir():
            for path in sorted(self.directory.glob("*.jsonl")):
                with path.open("rb") as f:
                    for raw in f:
                        try:
                            entry = json.loads(raw)
                            self._entries[entry["key"]] = entry["value"]
                        except (ValueError, KeyError, TypeError):
                            self.torn_lines += 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._file = (self.directory / name).open("a", buffering=1)  # line-buffered
        self._entries[key] = value
        self._file.write(json.dumps({"key": key, "value": value}) + "\n")


def request_key(kind: str, model: str, payload: dict) -> str:
    blob = json.dumps({"kind": kind, "model": model, "payload": payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def request_seed(key: str) -> int:
    """The sampling seed of a request: fixed by its hash, so asking again (a resumed run,
    a lost answer) samples the same completion."""
    return int(key[:8], 16)


class CachedRole:
    """An ``LLMClient`` behind the resume cache and (for the expert) the query budget.

    ``usage`` counts every logical query (paid or cached), so ``Review.query_cost`` is the
    same in a fresh and a resumed run; ``client.usage`` is what was paid; ``cached`` the rest.
    """

    def __init__(self, client, cache: RequestCache, *, model: str, budget=None):
        from serve.client import Usage

        self.client = client
        self.role = client.role
        self.cache = cache
        self.model = model
        self.budget = budget
        self.usage = Usage()
        self.cached = Usage()

    def snapshot(self) -> dict[str, int]:
        paid = self.client.usage
        return {"queries": paid.queries, "cached": self.cached.queries,
                "prompt_tokens": paid.prompt_tokens + self.cached.prompt_tokens,
                "completion_tokens": paid.completion_tokens + self.cached.completion_tokens,
                "failures": paid.failures}

    def _grant(self, wanted: int) -> int:
        if self.budget is None or wanted == 0:
            return wanted
        import ray

        return ray.get(self.budget.acquire.remote(wanted))

    def _run(self, kind: str, payloads: list[dict], call: Callable[[list[int]], list],
             decode: Callable[[Any], Any], encode: Callable[[Any], Any], tokens) -> list:
        keys = [request_key(kind, self.model, p) for p in payloads]
        results: list[Any] = [None] * len(keys)
        misses = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is None:
                misses.append(i)
            else:
                results[i] = decode(hit)
                prompt, completion = tokens(results[i])
                self.cached.queries += 1
                self.cached.prompt_tokens += prompt
                self.cached.completion_tokens += completion
        granted = self._grant(len(misses))
        paid, refused = misses[:granted], misses[granted:]
        for i in refused:
            results[i] = BudgetExhausted(
                f"dataset.max_expert_queries reached; run again to continue (role {self.role})"
            )
        # Nothing to pay for: the HTTP transport refuses an empty batch (no worker threads).
        for i, answer in zip(paid, call(paid) if paid else [], strict=True):
            results[i] = answer
            if not isinstance(answer, BaseException):
                self.cache.put(keys[i], encode(answer))
        for r in results:
            self.usage.queries += 1
            if not isinstance(r, BaseException):
                prompt, completion = tokens(r)
                self.usage.prompt_tokens += prompt
                self.usage.completion_tokens += completion
        return results

    @staticmethod
    def _raise_first(results: list, return_exceptions: bool) -> list:
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    def generate(self, messages_list: list[list[dict]], *, return_exceptions: bool = False):
        from serve.protocol import Completion, GenerationRequest

        requests = [GenerationRequest(messages=m, role=self.role, **self.client.defaults)
                    for m in messages_list]
        payloads = [r.model_dump(mode="json", exclude={"role", "seed"}) for r in requests]
        requests = [r.model_copy(update={"seed": request_seed(request_key(
            "generate", self.model, p))}) for r, p in zip(requests, payloads, strict=True)]
        results = self._run(
            "generate", payloads,
            call=lambda idx: self.client.generate([requests[i] for i in idx],
                                                  return_exceptions=True),
            decode=lambda v: Completion(**v), encode=lambda c: c.model_dump(mode="json"),
            tokens=lambda c: (c.prompt_tokens, c.completion_tokens),
        )
        return self._raise_first(results, return_exceptions)

    def score_many(self, items, *, return_exceptions: bool = False):
        payloads = [{"messages": p if not isinstance(p, str) else [{"role": "user", "content": p}],
                     "candidates": list(c)} for p, c in items]
        results = self._run(
            "score", payloads,
            call=lambda idx: self.client.score_many([items[i] for i in idx],
                                                    return_exceptions=True),
            decode=lambda v: list(v), encode=lambda lp: list(lp), tokens=lambda lp: (0, 0),
        )
        return self._raise_first(results, return_exceptions)


def _make_budget(limit: int):
    import ray

    @ray.remote(num_cpus=0)
    class QueryBudget:
        def __init__(self, limit: int):
            self.left = limit

        def acquire(self, wanted: int) -> int:
            granted = min(wanted, self.left)
            self.left -= granted
            return granted

    return QueryBudget.remote(limit)
