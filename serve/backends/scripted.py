"""A deterministic backend for algorithm tests and benchmarks; never a default.

Behaviour comes from the role's ``script`` mapping:

- ``rules``: list of ``{"contains": str, "reply": str}``; the first rule whose text
  occurs in the prompt gives the reply. ``{last_user}`` in a reply is the last user
  message, ``{instruction}`` the text between the first pair of ``<<<`` / ``>>>``.
- ``default``: reply when no rule matches (default ``"{last_user}"``).
- ``score``: ``{"prefer": str, "when_contains": str | None, "when_bracketed_differ": bool}``;
  the candidate equal to ``prefer`` gets log-probability -0.05 and the others -3.0 when
  the condition holds (``when_contains`` occurs in the prompt; or the first two
  ``<<<...>>>`` texts of the prompt differ), otherwise the preference is reversed.
- ``latency_s``: fixed wait per backend call (an I/O-bound model, like a remote GPU).
- ``error``: raise ``BackendError(error)`` on every call (for failure-path tests).
- ``reject_when_contains``: a request whose prompt holds this text gets a non-transient
  ``BackendError`` in its place; the rest of its batch is served (per-request isolation).
"""

from __future__ import annotations

import re
import time
from typing import Any

from serve.protocol import (
    BackendError,
    Completion,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprobs,
)

_BRACKETED = re.compile(r"<<<(.*?)>>>", re.S)


class ScriptedBackend:
    def __init__(self, model: str = "scripted", *, script: dict[str, Any] | None = None):
        self.model_id = model
        self.script = script or {}

    @classmethod
    def config_kwargs(cls, role_cfg, serve_cfg) -> dict[str, Any]:
        return {"model": role_cfg.model, "script": dict(role_cfg.script)}

    def load(self) -> None:
        pass

    def _wait_or_fail(self, cancelled=None) -> None:
        if self.script.get("error"):
            raise BackendError(str(self.script["error"]))
        # One wait per call, whatever the batch size: an I/O-bound model (a remote GPU
        # server) answers a batch of concurrent requests in about the time of one.
        # It ends early once no caller waits, as a real backend's generate does.
        deadline = time.monotonic() + float(self.script.get("latency_s", 0.0))
        while (left := deadline - time.monotonic()) > 0:
            if cancelled is not None and cancelled():
                return
            time.sleep(min(left, 0.05))

    def _rejected(self, request) -> BackendError | None:
        marker = self.script.get("reject_when_contains")
        if marker and marker in self._prompt_text(request)[0]:
            return BackendError(f"rejected: the prompt contains {marker!r}", transient=False)
        return None

    @staticmethod
    def _prompt_text(request: GenerationRequest | ScoreRequest) -> tuple[str, str]:
        if getattr(request, "prompt", None) is not None:
            return request.prompt, request.prompt
        users = [m.content for m in request.messages if m.role == "user"]
        text = "\n".join(m.content for m in request.messages)
        return text, (users[-1] if users else text)

    def _reply(self, request: GenerationRequest) -> str:
        text, last_user = self._prompt_text(request)
        match = _BRACKETED.search(text)
        fields = {"last_user": last_user, "instruction": match.group(1).strip() if match else ""}
        for rule in self.script.get("rules", []):
            if rule["contains"] in text:
                return rule["reply"].format(**fields)
        return self.script.get("default", "{last_user}").format(**fields)

    def generate(self, requests: list[GenerationRequest], *, cancelled=None) -> list:
        self._wait_or_fail(cancelled)
        out = []
        for r in requests:
            if (rejected := self._rejected(r)) is not None:
                out.append(rejected)
                continue
            text = self._reply(r)
            words = text.split()[: r.max_tokens]
            out.append(
                Completion(
                    text=" ".join(words),
                    prompt_tokens=len(self._prompt_text(r)[0].split()),
                    completion_tokens=len(words),
                    finish_reason="stop",
                    model=self.model_id,
                )
            )
        return out

    def score(self, requests: list[ScoreRequest], *, cancelled=None) -> list:
        self._wait_or_fail(cancelled)
        rule = self.script.get("score", {})
        results = []
        for r in requests:
            if (rejected := self._rejected(r)) is not None:
                results.append(rejected)
                continue
            text, _ = self._prompt_text(r)
            prefer = rule.get("prefer")
            active = rule.get("when_contains") is None or rule["when_contains"] in text
            if rule.get("when_bracketed_differ"):
                texts = [t.strip() for t in _BRACKETED.findall(text)[:2]]
                active = active and len(texts) == 2 and texts[0] != texts[1]
            logprobs = [
                (-0.05 if (c == prefer) == active else -3.0) if prefer else -1.0
                for c in r.candidates
            ]
            results.append(ScoreResult(logprobs=logprobs, prompt_tokens=len(text.split())))
        return results

    def token_logprobs(self, texts: list[str], *, cancelled=None) -> list[TokenLogprobs]:
        self._wait_or_fail(cancelled)
        out = []
        for t in texts:
            words = t.split(" ")
            offsets, pos = [], 0
            for w in words:
                offsets.append(pos)
                pos += len(w) + 1
            out.append(
                TokenLogprobs(
                    tokens=words, logprobs=[None] + [-1.0] * (len(words) - 1), text_offsets=offsets
                )
            )
        return out

    def check_health(self) -> None:
        pass
