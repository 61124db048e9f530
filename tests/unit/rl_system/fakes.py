"""Test doubles for the model roles (algorithm tests only)."""

from __future__ import annotations

from serve.client import LLMCallError, Usage
from serve.protocol import Completion


def bracketed(text: str) -> str:
    return text.split("<<<")[-1].split(">>>")[0]


class Scripted:
    """Stands in for an ``LLMClient``. ``reply(text) -> str | Exception`` answers each
    generate request (default: the bracketed instruction + " now"); the reviewer's
    verdict prefers 'Not Equal' when the bracketed texts of its prompt differ."""

    def __init__(self, role, reply=None):
        self.role = role
        self.reply = reply or (lambda text: bracketed(text) + " now")
        self.defaults = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16}
        self.usage = Usage()
        self.requests: list[str] = []  # generate request texts
        self.seeds: list = []  # GenerationRequest.seed of each (None for plain messages)
        self.scored: list[str] = []  # score prompts

    def generate(self, requests, return_exceptions=False):
        out = []
        for r in requests:
            self.usage.queries += 1
            text = r[-1]["content"] if isinstance(r, list) else r.messages[-1].content
            self.requests.append(text)
            self.seeds.append(getattr(r, "seed", None))
            answer = self.reply(text)
            if isinstance(answer, BaseException):
                self.usage.failures += 1
                if not return_exceptions:
                    raise answer
                out.append(answer)
            else:
                out.append(Completion(text=answer, prompt_tokens=3, completion_tokens=2))
        return out

    def score_many(self, items, return_exceptions=False):
        out = []
        for prompt, _ in items:
            self.usage.queries += 1
            self.scored.append(prompt)
            texts = [t.split(">>>")[0] for t in prompt.split("<<<")[1:]]
            out.append([-3.0, -0.05] if len(set(texts)) > 1 else [-0.05, -3.0])
        return out


def transient(role="instructor"):
    return LLMCallError(role, "503 overloaded", transient=True)


def rejected(role="instructor"):
    return LLMCallError(role, "400 prompt too long", transient=False)
