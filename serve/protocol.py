"""The messages that cross the serving seam, and the protocol every backend implements.

Stage code never sees a backend: it builds ``GenerationRequest`` / ``ScoreRequest`` and
hands them to ``serve.client.LLMClient``, which reaches an ``LLMServer`` replica (or an
OpenAI-compatible endpoint) that runs a backend.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, model_validator


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(BaseModel):
    """One completion: chat ``messages`` or, for raw completions, a ``prompt`` string."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(
        None, ge=0,
        description="Sampling seed of this request alone: the same request with the same "
        "seed samples the same completion, whatever it is batched with.",
    )
    role: str = Field("default", description="Who asks (instructor, reviewer, expert, http).")

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class Completion(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"] = "stop"
    model: str = ""


class ScoreRequest(BaseModel):
    """Log-probability of each candidate continuation of a chat prompt's answer."""

    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)
    role: str = "default"


class ScoreResult(BaseModel):
    logprobs: list[float]  # summed log-probability per candidate, same order
    prompt_tokens: int


class TokenLogprobs(BaseModel):
    """Per-token log-probabilities of a text (the first token has none)."""

    tokens: list[str]
    logprobs: list[float | None]
    text_offsets: list[int]


@runtime_checkable
class LLMBackend(Protocol):
    """What ``LLMServer`` runs. Construction is cheap; ``load`` does the heavy work."""

    model_id: str

    def load(self) -> None: ...

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...

    def token_logprobs(self, texts: list[str]) -> list[TokenLogprobs]: ...

    def check_health(self) -> None: ...


class BackendError(RuntimeError):
    """A backend could not serve a request; the message is safe to show to the caller.

    ``transient``: whether the same request may succeed later (overload, timeout, a dead
    replica, a network error). A request the server rejects as it stands (too long, bad
    field) is not transient: retrying it, now or in a resumed run, cannot help.
    """

    transient: bool = True

    def __init__(self, message: str = "", *, transient: bool | None = None):
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class BackendTimeoutError(BackendError):
    """A request did not finish within its time limit."""
