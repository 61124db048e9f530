"""One evolution step: rewrite -> review -> eliminate -> advance.

Both stages evolve through :func:`evolve`: the training env (``rl_system.env``, stage 1)
and stage 2's episodes (``rl_system.dataset.actors.run_episode``), so an evolution means the
same thing where the policy learns and where the dataset is built. The step is pure: the
rewriting and reviewing clients are passed in, it keeps no state between calls, and a
failed model call is an outcome, not an exception.

1. *rewrite*: the action's request (``EvolutionAction.messages``: the instruction and
   its input) goes to the rewriter (the instructor in stage 1, the expert in stage 2);
2. *review*: ``Reviewer.review`` scores the rewrite against the task it came from (both
   with their inputs) and applies the instruction rules of ``rl_system.reviewer`` (an
   empty rewrite is eliminated without a review);
3. *eliminate / advance*: a surviving rewrite is the task the episode continues from; an
   eliminated one leaves the task as it was. The rewrite keeps the task's input unless
   the action replaces the task (``breadth``).

A model call that fails is ``failed`` when the server rejected the request as it stands
(``LLMCallError.transient`` false: retrying cannot help, so it is the evolution's
failure) and ``infra_failure`` when it may succeed later (overload, timeout, a dead
replica, the network): that one says nothing about the action and must not be learned
from or recorded as done. Anything else a client raises (stage 2's ``BudgetExhausted``)
propagates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rl_system.actions import EvolutionAction
from rl_system.reviewer import Review
from rl_system.tasks import Task

Outcome = Literal["kept", "eliminated", "failed", "infra_failure"]


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    task: Task  # what the episode continues from: the rewrite if kept, else the old task
    rewrite: Task | None  # the rewrite (None when the rewrite call failed)
    review: Review | None  # None when no review was made (a failed call)
    error: Exception | None = None  # the LLMCallError of a failed / infra_failure step
    queries: int = 0  # rewrite queries spent (the review's are in review.query_cost)
    tokens: int = 0  # prompt + completion tokens of the rewrite

    @property
    def kept(self) -> bool:
        return self.outcome == "kept"

    @property
    def failure(self) -> str:
        """``"role: message"`` of a failed call, else ``""``."""
        return str(self.error) if self.error is not None else ""


def _failed(exc, **kwargs) -> StepResult:
    outcome: Outcome = "infra_failure" if getattr(exc, "transient", True) else "failed"
    return StepResult(outcome=outcome, review=None, error=exc, **kwargs)


def evolve(task: Task, action: EvolutionAction, *, rewriter, reviewer,
           history: Sequence = ()) -> StepResult:
    """Apply ``action`` to ``task`` once. ``rewriter``: anything with the ``LLMClient``
    ``generate`` API; ``reviewer``: a ``Reviewer``; ``history``: the episode's tasks so far
    (for the reviewer's diversity; defaults to ``[task]``)."""
    from serve.client import LLMCallError

    if not action.queries_model:
        raise ValueError(f"action {action.name!r} is not an evolution")
    task = Task.of(task)
    try:
        [completion] = rewriter.generate([action.messages(task.instruction, task.input)])
    except LLMCallError as exc:
        return _failed(exc, task=task, rewrite=None, queries=1)
    tokens = completion.prompt_tokens + completion.completion_tokens
    rewrite = Task(completion.text.strip(), action.input_after(task.input))
    try:
        review = reviewer.review(task, rewrite, history=list(history) or [task],
                                 new_task=action.replaces_task)
    except LLMCallError as exc:
        return _failed(exc, task=task, rewrite=rewrite, queries=1, tokens=tokens)
    if review.eliminated:
        return StepResult("eliminated", task, rewrite, review, queries=1, tokens=tokens)
    return StepResult("kept", rewrite, rewrite, review, queries=1, tokens=tokens)
