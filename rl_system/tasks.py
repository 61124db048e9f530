"""A task: an instruction and the input it refers to, and how a model is shown it.

A seed (``rl_system.seeds.Seed``) may carry an ``input`` — a memo, code, a table — that
its instruction is about. Every place that shows a task to a model renders it with
:func:`task_text`: the expert answering it (stage 2), the reviewer comparing two tasks,
the chat export (``chat.jsonl``) and the SFT prompt (``train.data``), so what the
fine-tuned model is trained on is what the expert answered.

This module imports nothing heavy: ``train.data`` uses it inside Ray Data tasks.
"""

from __future__ import annotations

from dataclasses import dataclass


def task_text(instruction: str, input: str | None = "") -> str:
    """One user message: the instruction, then (if any) a blank line and the input."""
    instruction = str(instruction)
    return f"{instruction}\n\n{input}" if input else instruction


def user_messages(instruction: str, input: str | None = "") -> list[dict[str, str]]:
    """The chat request that asks a model to carry out the task."""
    return [{"role": "user", "content": task_text(instruction, input)}]


@dataclass(frozen=True)
class Task:
    """What an evolution episode evolves: an instruction and its (unchanged) input."""

    instruction: str
    input: str = ""

    @property
    def text(self) -> str:
        return task_text(self.instruction, self.input)

    @classmethod
    def of(cls, item) -> Task:
        """A ``Task`` from a ``Task``, a ``Seed``, a mapping or an instruction string."""
        if isinstance(item, Task):
            return item
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, dict):
            return cls(str(item["instruction"]), str(item.get("input") or ""))
        return cls(str(item.instruction), str(getattr(item, "input", "") or ""))
