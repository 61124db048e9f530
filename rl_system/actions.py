"""The evolution-action catalogue: what the policy can ask the instructor to do.

Six instruction manipulations (the depth and breadth operations of Evol-Instruct that
TeaMs-RL's policy chooses among) plus ``stop``. Each entry is data — a name, the
rewrite request sent to the instructor, whether it costs a model query. Adding an action
is adding an entry; the environment, the dataset strategies and the reports read this
table and nothing else.

The instruction being rewritten travels between ``<<<`` and ``>>>`` so the request and
the instruction cannot be confused (and so tests can find it). A seed's ``input`` (the
memo, code or table the instruction refers to) follows it, so the instructor rewrites
an instruction it can read in context. Every action keeps that input attached to the new
instruction unless the entry says ``replaces_task`` (``breadth`` writes a brand-new task,
which comes without the old input).

:func:`action_space` and :func:`decode_action` are the one place where a policy's output
becomes an index into ``ACTIONS``: the training env and stage 2's ``PolicyChooser`` both
call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

_FRAME = (
    "You improve instructions for training an AI assistant. Rewrite the instruction "
    "given at the end, inside triple angle brackets, as follows: {change}\n"
    "The new instruction must stay sensible, answerable by a capable assistant, and "
    "readable on its own; it should add no more than about 30 words. Reply with the new "
    "instruction only, with no preamble, labels or quotation marks.\n\n"
    "<<<{instruction}>>>{input_block}"
)
# The seed's input, when it has one: kept with the new instruction, or (replaces_task)
# shown for context only.
_INPUT_KEPT = (
    "\n\nThe instruction refers to the input below. The input stays as it is and is "
    "given together with the new instruction, so do not repeat it:\n{input}"
)
_INPUT_REPLACED = (
    "\n\nThe instruction refers to the input below. The new instruction replaces both "
    "and comes without any input, so it must be complete on its own:\n{input}"
)

# Words of the request above that a rewrite must not echo (Evol-Instruct's elimination
# rule 4, ``rl_system.reviewer``). Each occurs in what ``messages`` sends (tested), so the
# list follows the template; a demo rewrite began "The new instruction should ...". Only
# words about the rewriting itself: "about 30 words" or "no preamble" are constraints a
# good rewrite may well ask for.
REQUEST_PHRASES: tuple[str, ...] = (
    "the new instruction",
    "new instruction only",
    "the instruction given",
    "triple angle brackets",
    "rewrite the instruction",
    "the instruction refers to the input",
    "comes without any input",
)


@dataclass(frozen=True)
class EvolutionAction:
    name: str
    kind: Literal["depth", "breadth", "stop"]
    change: str  # what the instructor is asked to change; empty for stop
    queries_model: bool = True
    # The rewrite is a new task, not the old one changed: the seed's input is dropped.
    replaces_task: bool = False

    def messages(self, instruction: str, input: str = "") -> list[dict[str, str]]:
        """The chat request that asks the instructor to apply this action to the
        instruction (and, for context, the input it refers to)."""
        if not self.queries_model:
            raise ValueError(f"action {self.name!r} sends no request")
        block = ""
        if input:
            block = (_INPUT_REPLACED if self.replaces_task else _INPUT_KEPT).format(input=input)
        return [{"role": "user", "content": _FRAME.format(
            change=self.change, instruction=instruction, input_block=block)}]

    def input_after(self, input: str) -> str:
        """The input that goes with this action's rewrite."""
        return "" if self.replaces_task else input


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
        replaces_task=True,
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


ACTION_SPACES = ("discrete", "continuous")


def action_space(kind: str):
    """The gymnasium action space of ``policy.action_space``.

    ``continuous`` is the paper's form, a score per action whose arg-max is applied. The
    Box is unbounded on purpose: RLlib squashes and clips samples into a bounded Box
    (``normalize_actions`` / ``clip_actions``), which made scores above 1 tie and the
    arg-max fall to the lowest index, while stage 2 took the arg-max of unclipped scores.
    Nothing clips an unbounded Box, so both paths decode the same scores.
    """
    import gymnasium as gym

    if kind == "continuous":
        return gym.spaces.Box(-np.inf, np.inf, shape=(len(ACTIONS),), dtype=np.float32)
    if kind == "discrete":
        return gym.spaces.Discrete(len(ACTIONS))
    raise ValueError(f"unknown action space {kind!r}; expected one of {ACTION_SPACES}")


def decode_action(action, kind: str) -> int:
    """An env action (what the policy sampled) -> index into ``ACTIONS``."""
    if kind == "continuous":
        return int(np.argmax(np.asarray(action, dtype=np.float64).reshape(-1)))
    return int(np.asarray(action).reshape(()))
