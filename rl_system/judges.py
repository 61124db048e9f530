"""Judge modes: how the reviewer turns label log-probabilities into ``info_gain``.

A mode is an entry of data in ``JUDGES`` (chosen by ``policy.reward.judge``): a prompt
template, the answer labels scored after it, the presentation orders it asks, a self-pair
reference, and for ``cot`` a rationale generated before the labels are scored. Adding a
mode is adding an entry; the arithmetic below is shared by all of them.

Per score request the labels' log-probabilities are normalised over the labels alone
(RLAIF's token-probability labelling; the label strings differ in token count, so only
their ratio means anything) and read as an expected score

    s = sum_i w_i * softmax(logprobs)_i,   w_i in [0, 1] = how much label i says that
                                           the rewrite asks more than the original;

``raw`` is the mean of ``s`` over the mode's orders (asking both presentation orders
cancels position bias), and the value is calibrated against a self-pair reference ``r``,
the score the same judge gives when nothing changed:

    value = max(0, raw - r) / (1 - r)          in [0, 1], higher = the rewrite adds more

- ``equality`` (the paper's, WizardLM's): "Equal" / "Not Equal", w = (0, 1) in both orders;
  r = P(not equal | before, before), measured (a small judge calls identical texts unequal).
- ``preference`` (RLAIF's pairwise): which of two instructions demands more, labels "1" /
  "2", w = 1 on the label at the rewrite's position. r = 0.5 exactly, not measured: the two
  orders of (before, before) are one and the same prompt, so its two scores are P("2") and
  P("1") of one normalised distribution and average to 1/2 whatever the model says.
- ``cot``: ``preference`` after a short rationale the reviewer writes first (RLAIF found
  rationales help strong labelers); one greedy generate per order, then the scoring call
  with the rationale in the conversation. r = 0.5 by the same argument (greedy, so both
  orders of the self-pair see the same rationale).
- ``rating``: an absolute 1-5 rating of one instruction, s = (E[rating] - 1) / 4; raw is
  the rewrite's, r the original's (cacheable per original like equality's self-pair), so
  value = the rise in rating as a share of the headroom the original left. One order: no
  position bias to cancel.

The reviewer batches ``judge_requests`` with ``self_pair_request`` in one
``client.score_many`` call; ``judge_many`` does that (and the rationale step) for many pairs.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from serve.errors import ConfigError
from serve.protocol import GenerationRequest

Slot = Literal["before", "after"]

EQUALITY_PROMPT = (
    "Compare two instructions for an AI assistant. They are equal only if they ask for "
    "the same thing with the same constraints and requirements, the same depth of "
    "inquiry and the same breadth of topic. Answer with exactly one of: Equal, Not Equal.\n\n"
    "First instruction: <<<{first}>>>\n"
    "Second instruction: <<<{second}>>>"
)
EQUALITY_LABELS = ("Equal", "Not Equal")

_DEMANDS = (
    "Two instructions for an AI assistant follow. Decide which one demands more of the "
    "assistant: more constraints or requirements to meet, deeper inquiry, more reasoning "
    "steps, more concrete details to work with. Extra words that add no requirement do not "
    "count, and an instruction that is garbled, cut off, repeats itself or declines to ask "
    "anything demands little.\n\n"
    "Instruction 1: <<<{first}>>>\n"
    "Instruction 2: <<<{second}>>>"
)
PREFERENCE_PROMPT = _DEMANDS + "\n\nAnswer with one character, 1 or 2."
COT_PROMPT = (
    _DEMANDS + "\n\nBefore answering, explain in at most three short sentences what each "
    "instruction requires and which requires more. Do not carry out either instruction."
)
COT_VERDICT = (
    "So which instruction demands more of the assistant? Answer with one character, 1 or 2."
)
RATING_PROMPT = (
    "Rate how much the instruction below demands of an AI assistant, from 1 (a simple "
    "request with no constraints) to 5 (several constraints, deep or multi-step reasoning "
    "and concrete details to handle). Extra words that add no requirement do not raise the "
    "rating; a garbled, cut-off, repetitive or refused instruction rates 1. Answer with one "
    "digit from 1 to 5.\n\n"
    "Instruction: <<<{first}>>>"
)


@dataclass(frozen=True)
class Order:
    """One presentation: the texts that fill the template's slots, in order, and each
    label's weight (how much that label says the rewrite asks more than the original)."""

    slots: tuple[Slot, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Rationale:
    """A generate step before scoring: the reviewer answers ``prompt`` in free text (at
    most ``max_tokens``, greedy so a re-run reproduces it), then ``verdict`` is asked."""

    verdict: str
    max_tokens: int = 64  # three short sentences; the demo's CPU pays per token


@dataclass(frozen=True)
class Judge:
    name: str
    description: str
    prompt: str  # {first}, {second}: the texts named by an order's slots
    labels: tuple[str, ...]
    orders: tuple[Order, ...]
    self_pair: Order | float  # an Order over the original only (measured), or a constant
    rationale: Rationale | None = None

    @property
    def measures_self_pair(self) -> bool:
        return isinstance(self.self_pair, Order)

    @property
    def two_orders(self) -> bool:
        return len(self.orders) == 2

    def queries_per_pair(self, *, self_pair_cached: bool = False) -> int:
        """Reviewer queries one (before, after) costs: rationales, scores, the self-pair."""
        rationales = len(self.orders) if self.rationale else 0
        self_pair = int(self.measures_self_pair and not self_pair_cached)
        return rationales + len(self.orders) + self_pair


def _rating_weights(n: int) -> tuple[float, ...]:
    return tuple(i / (n - 1) for i in range(n))  # labels 1..n -> (rating - 1) / (n - 1)


_RATING = _rating_weights(5)

JUDGES: dict[str, Judge] = {
    j.name: j
    for j in (
        Judge(
            name="equality",
            description="P(Not Equal) over both orders, calibrated against the self-pair",
            prompt=EQUALITY_PROMPT,
            labels=EQUALITY_LABELS,
            orders=(Order(("before", "after"), (0.0, 1.0)), Order(("after", "before"), (0.0, 1.0))),
            self_pair=Order(("before", "before"), (0.0, 1.0)),
        ),
        Judge(
            name="preference",
            description="P(the rewrite demands more), pairwise, both orders averaged",
            prompt=PREFERENCE_PROMPT,
            labels=("1", "2"),
            orders=(Order(("before", "after"), (0.0, 1.0)), Order(("after", "before"), (1.0, 0.0))),
            self_pair=0.5,
        ),
        Judge(
            name="rating",
            description="rise of the expected 1-5 demand rating, as a share of the headroom",
            prompt=RATING_PROMPT,
            labels=("1", "2", "3", "4", "5"),
            orders=(Order(("after",), _RATING),),
            self_pair=Order(("before",), _RATING),
        ),
        Judge(
            name="cot",
            description="preference after a short rationale the reviewer writes first",
            prompt=COT_PROMPT,
            labels=("1", "2"),
            orders=(Order(("before", "after"), (0.0, 1.0)), Order(("after", "before"), (1.0, 0.0))),
            self_pair=0.5,
            rationale=Rationale(verdict=COT_VERDICT),
        ),
    )
}
JUDGE_NAMES = tuple(JUDGES)


@dataclass(frozen=True)
class JudgeResult:
    value: float  # calibrated, in [0, 1]
    raw: float  # mean score over the orders
    first_order: float  # the first order's score (the only one for one-order modes)
    second_order: float  # the second order's score (= first_order for one-order modes)
    self_pair: float  # the reference the value is calibrated against

    def as_dict(self) -> dict:
        return asdict(self)


def get_judge(mode: str | Judge) -> Judge:
    if isinstance(mode, Judge):
        return mode
    try:
        return JUDGES[mode]
    except KeyError:
        raise ConfigError(
            f"unknown judge mode {mode!r}; expected one of {', '.join(JUDGE_NAMES)}"
        ) from None


# -- arithmetic (pure) ---------------------------------------------------------------------


def label_distribution(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the labels' log-probabilities alone (any common offset cancels)."""
    top = max(logprobs)
    exp = [math.exp(lp - top) for lp in logprobs]
    total = sum(exp)
    return [e / total for e in exp]


def expected_score(logprobs: Sequence[float], weights: Sequence[float]) -> float:
    if len(logprobs) != len(weights):
        raise ValueError(f"{len(logprobs)} log-probs for {len(weights)} labels")
    return sum(w * p for w, p in zip(weights, label_distribution(logprobs), strict=True))


def calibrate(raw: float, self_pair: float) -> float:
    """``max(0, raw - self_pair) / (1 - self_pair)``: 0 at or below "nothing changed"."""
    return max(0.0, raw - self_pair) / max(1e-6, 1.0 - self_pair)


def self_pair_value(mode: str | Judge, logprobs: Sequence[float]) -> float:
    """The self-pair reference from its request's log-probs (modes that measure it)."""
    judge = get_judge(mode)
    if not judge.measures_self_pair:
        raise ValueError(f"judge {judge.name!r} has a constant self-pair ({judge.self_pair})")
    return expected_score(logprobs, judge.self_pair.weights)


def judge_value(
    mode: str | Judge,
    logprobs_per_request: Sequence[Sequence[float]],
    *,
    self_pair: float | None = None,
) -> JudgeResult:
    """Combine the log-probs of ``judge_requests``' answers (same order) into a result.

    ``self_pair``: the measured reference (``self_pair_value``) for modes that measure it;
    leave it ``None`` for modes with a constant one.
    """
    judge = get_judge(mode)
    if len(logprobs_per_request) != len(judge.orders):
        raise ValueError(
            f"judge {judge.name!r} asks {len(judge.orders)} orders; "
            f"got {len(logprobs_per_request)} answers"
        )
    if judge.measures_self_pair:
        if self_pair is None:
            raise ValueError(f"judge {judge.name!r} needs the measured self_pair")
        reference = self_pair
    else:
        reference = judge.self_pair
    scores = [
        expected_score(lp, order.weights)
        for lp, order in zip(logprobs_per_request, judge.orders, strict=True)
    ]
    raw = sum(scores) / len(scores)
    return JudgeResult(
        value=calibrate(raw, reference),
        raw=raw,
        first_order=scores[0],
        second_order=scores[-1],
        self_pair=reference,
    )


# -- requests (pure) -----------------------------------------------------------------------


def _fill(template: str, slots: Sequence[Slot], texts: dict[str, str]) -> str:
    names = ("first", "second")[: len(slots)]
    return template.format(**{n: texts[s] for n, s in zip(names, slots, strict=True)})


def rationale_requests(mode: str | Judge, before: str, after: str) -> list[GenerationRequest]:
    """The generate step that comes first (one per order); empty for modes without one."""
    judge = get_judge(mode)
    if judge.rationale is None:
        return []
    texts = {"before": before, "after": after}
    return [
        GenerationRequest(
            messages=[{"role": "user", "content": _fill(judge.prompt, o.slots, texts)}],
            temperature=0.0,
            top_p=1.0,
            max_tokens=judge.rationale.max_tokens,
        )
        for o in judge.orders
    ]


def judge_requests(
    mode: str | Judge, before: str, after: str, *, rationales: Sequence[str] = ()
) -> list[tuple[str | list[dict[str, str]], tuple[str, ...]]]:
    """The score requests ``(prompt, candidates)``, one per order, for ``score_many``.

    Modes with a rationale need its texts (the completions of ``rationale_requests``, same
    order); the scoring prompt is then the conversation that holds it plus the verdict.
    """
    judge = get_judge(mode)
    texts = {"before": before, "after": after}
    prompts = [_fill(judge.prompt, o.slots, texts) for o in judge.orders]
    if judge.rationale is None:
        return [(p, judge.labels) for p in prompts]
    if len(rationales) != len(prompts):
        raise ValueError(
            f"judge {judge.name!r} needs {len(prompts)} rationales, got {len(rationales)}"
        )
    return [
        (
            [
                {"role": "user", "content": p},
                {"role": "assistant", "content": r},
                {"role": "user", "content": judge.rationale.verdict},
            ],
            judge.labels,
        )
        for p, r in zip(prompts, rationales, strict=True)
    ]


def self_pair_request(mode: str | Judge, before: str) -> tuple[str, tuple[str, ...]] | None:
    """The self-pair's score request (cache its value per ``before``), or ``None``."""
    judge = get_judge(mode)
    if not judge.measures_self_pair:
        return None
    return _fill(judge.prompt, judge.self_pair.slots, {"before": before}), judge.labels


# -- batched scoring through a client ------------------------------------------------------


def judge_many(
    client,
    mode: str | Judge,
    pairs: Sequence[tuple[str, str]],
    *,
    self_pairs: MutableMapping[str, float] | None = None,
    chunk_size: int = 16,
) -> list[JudgeResult]:
    """Judge every ``(before, after)`` with one generate pass (rationale modes) and one
    scoring pass through ``client`` (an ``LLMClient``), ``chunk_size`` requests per call
    (small: a server-side request timeout counts the time queued behind the chunk).

    ``self_pairs``: a cache of measured self-pair values by ``before``, read and filled
    here; each distinct original's self-pair is asked once.
    """
    judge = get_judge(mode)
    self_pairs = {} if self_pairs is None else self_pairs
    rationales: list[list[str]] = [[] for _ in pairs]
    if judge.rationale is not None:
        gens = [r for b, a in pairs for r in rationale_requests(judge, b, a)]
        texts = [c.text for c in _chunked(client.generate, gens, chunk_size)]
        n = len(judge.orders)
        rationales = [texts[i * n : (i + 1) * n] for i in range(len(pairs))]
    items = [
        item
        for (b, a), rs in zip(pairs, rationales, strict=True)
        for item in judge_requests(judge, b, a, rationales=rs)
    ]
    missing: list[str] = []
    if judge.measures_self_pair:
        missing = list(dict.fromkeys(b for b, _ in pairs if b not in self_pairs))
        items += [self_pair_request(judge, b) for b in missing]
    answers = _chunked(client.score_many, items, chunk_size)
    n = len(judge.orders)
    if judge.measures_self_pair:
        for b, lp in zip(missing, answers[len(pairs) * n :], strict=True):
            self_pairs[b] = self_pair_value(judge, lp)
    return [
        judge_value(
            judge,
            answers[i * n : (i + 1) * n],
            self_pair=self_pairs[b] if judge.measures_self_pair else None,
        )
        for i, (b, _) in enumerate(pairs)
    ]


def _chunked(call, items: list, size: int) -> list:
    out: list = []
    for start in range(0, len(items), size):
        out.extend(call(items[start : start + size]))
    return out
