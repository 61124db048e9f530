"""The evolution-action catalogue: what the policy can ask the instructor to do.

Six instruction manipulations (the depth and breadth operations of Evol-Instruct that
TeaMs-RL's policy chooses among) plus ``stop``. Each entry is data — a name, the
rewrite request sent to the instructor, whether it costs a model query. Adding an action
is adding an entry; the environment, the dataset strategies and the reports read this
table and nothing else.

The instruction being rewritten travels between ``<<<`` and ``>>>`` so the request and
the instruction cannot be confused (and so tests can find it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_FRAME = (
    "You improve instructions for training an AI assistant. Rewrite the instruction "
    "given at the end, inside triple angle brackets, as follows: {change}\n"
    "The new instruction must stay sensible, answerable by a capable assistant, and "
    "readable on its own; it should add no more than about 30 words. Reply with the new "
    "instruction only, with no preamble, labels or quotation marks.\n\n"
    "<<<{instruction}>>>"
)


@dataclass(frozen=True)
class EvolutionAction:
    name: str
    kind: Literal["depth", "breadth", "stop"]
    change: str  # what the instructor is asked to change; empty for stop
    queries_model: bool = True

    def messages(self, instruction: str) -> list[dict[str, str]]:
        """The chat request that asks the instructor to apply this action."""
        if not self.queries_model:
            raise ValueError(f"action {self.name!r} sends no request")
        return [{"role": "user", "content": _FRAME.format(change=self.change,
                                                          instruction=instruction)}]


ACTIONS: tuple[EvolutionAction, ...] = (
    EvolutionAction(
        name="add_constraints",
        kind="depth",
        change="add one more requirement or limit the answer must respect, such as a "
        "format, a length, an audience or a condition.",
    ),
    EvolutionAction(
        name="deepening",
        kind="depth",
        change="ask for more depth: make the question probe causes, trade-offs or "
        "underlying principles instead of a surface answer.",
    ),
    EvolutionAction(
        name="concretizing",
        kind="depth",
        change="replace general wording with a specific, concrete case: name the "
        "situation, the objects or the numbers involved.",
    ),
    EvolutionAction(
        name="increase_reasoning_steps",
        kind="depth",
        change="make the task need several explicit steps of reasoning, so that a "
        "one-line answer no longer suffices.",
    ),
    EvolutionAction(
        name="complicate_input",
        kind="depth",
        change="attach a small piece of input data the answer must use, such as a "
        "table, a code snippet, a list or a short text.",
    ),
    EvolutionAction(
        name="breadth",
        kind="breadth",
        change="write a brand-new instruction in the same domain that covers a rarer, "
        "less obvious topic of similar difficulty; do not reuse its wording.",
    ),
    EvolutionAction(name="stop", kind="stop", change="", queries_model=False),
)

ACTION_NAMES: tuple[str, ...] = tuple(a.name for a in ACTIONS)
STOP = ACTION_NAMES.index("stop")


def action_by_name(name: str) -> EvolutionAction:
    for action in ACTIONS:
        if action.name == name:
            return action
    raise KeyError(f"unknown action {name!r}; known: {', '.join(ACTION_NAMES)}")


def depth_and_breadth() -> tuple[EvolutionAction, ...]:
    """The operations that query a model (what the WizardLM baseline samples from)."""
    return tuple(a for a in ACTIONS if a.queries_model)
