"""The reviewer: how much an evolution added, whether it survives, and its reward.

``info_gain`` follows RLAIF's token-probability labelling: the reviewer LLM is asked
whether two instructions are equal in constraints, depth and breadth, and the
probability it gives "Not Equal" (normalised over the two verdicts) is averaged over both
presentation orders to cancel position bias. A small reviewer also finds *identical*
instructions somewhat unequal, so the score is calibrated against the same reviewer's
self-pair P(not equal | before, before):

    info_gain = max(0, raw - self_pair) / (1 - self_pair)

The elimination rules are Evol-Instruct's, kept here as one table that the environment
and the dataset filter share.
"""

from __future__ import annotations

import math
import re
import string
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("Equal", "Not Equal")

JUDGE_PROMPT = (
    "Compare two instructions for an AI assistant. They are equal only if they ask for "
    "the same thing with the same constraints and requirements, the same depth of "
    "inquiry and the same breadth of topic. Answer with exactly one of: Equal, Not Equal.\n\n"
    "First instruction: <<<{first}>>>\n"
    "Second instruction: <<<{second}>>>"
)

# Words of our instructor request and of Evol-Instruct's prompts that a rewrite must not echo.
TEMPLATE_PHRASES = (
    "given prompt",
    "rewritten prompt",
    "#given",
    "#rewritten",
    "new instruction:",
    "original instruction",
    "rewrite the instruction",
    "<<<",
    ">>>",
)
REFUSAL_PHRASES = ("sorry", "i cannot", "i can't", "i am unable", "as an ai", "i'm unable")
REFUSAL_MAX_WORDS = 80  # Evol-Instruct: a refusal-like reply shorter than this is dropped
MIN_WORDS = 3

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves""".split()
)
_WORD = re.compile(r"[A-Za-z0-9']+")


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class EliminationRule:
    name: str
    description: str
    fires: Callable[[str, str, float], bool]  # (before, after, info_gain) -> eliminated?


def _refusal(after: str) -> bool:
    low = after.lower()
    return any(p in low for p in REFUSAL_PHRASES) and len(_words(after)) < REFUSAL_MAX_WORDS


def _only_filler(after: str) -> bool:
    stripped = after.translate(str.maketrans("", "", string.punctuation)).strip()
    return not stripped or all(w in STOP_WORDS for w in _words(after))


ELIMINATION_RULES: tuple[EliminationRule, ...] = (
    EliminationRule(
        "only_punctuation_or_stop_words",
        "the rewrite has no content words",
        lambda before, after, gain: _only_filler(after),
    ),
    EliminationRule(
        "refusal_or_too_short",
        f"refusal-like and under {REFUSAL_MAX_WORDS} words, or under {MIN_WORDS} words",
        lambda before, after, gain: _refusal(after) or len(_words(after)) < MIN_WORDS,
    ),
    EliminationRule(
        "template_copied",
        "the rewrite repeats words of the rewriting prompt",
        lambda before, after, gain: any(p in after.lower() for p in TEMPLATE_PHRASES),
    ),
    EliminationRule(
        "no_info_gain",
        "identical to the instruction it came from, or judged no richer",
        lambda before, after, gain: _normalise(after) == _normalise(before) or gain <= 0.0,
    ),
)
RULE_NAMES = tuple(r.name for r in ELIMINATION_RULES)


def eliminate(before: str, after: str, info_gain: float = 1.0, *, min_info_gain: float = 0.0):
    """The first rule that drops ``after``, or ``None``. ``info_gain`` is the calibrated one.

    Without a reviewer score (``info_gain`` left at 1) only the textual rules apply.
    """
    gain = info_gain - min_info_gain
    for rule in ELIMINATION_RULES:
        if rule.fires(before, after, gain):
            return rule.name
    return None


@dataclass(frozen=True)
class Review:
    info_gain: float  # calibrated, in [0, 1]
    info_gain_raw: float  # P(not equal), averaged over both orders
    info_gain_first_order: float  # (before, after)
    info_gain_second_order: float  # (after, before)
    self_pair: float  # P(not equal | before, before)
    eliminated: str | None
    diversity: float  # 1 - max cosine to the episode's earlier instructions; 0 without any
    query_cost: int  # model queries spent on this evolution and its review
    reward: float

    def as_dict(self) -> dict:
        return asdict(self)


def p_not_equal(logprobs: Sequence[float]) -> float:
    """P("Not Equal") normalised over the two verdicts, from their log-probabilities."""
    lp_equal, lp_not = logprobs
    top = max(lp_equal, lp_not)
    e, n = math.exp(lp_equal - top), math.exp(lp_not - top)
    return n / (e + n)


class Reviewer:
    def __init__(self, client, *, reward, text_encoder=None, self_pair_cache_size: int = 4096):
        """``client``: an ``LLMClient`` for the reviewer role; ``reward``: ``RewardConfig``."""
        self.client = client
        self.reward_cfg = reward
        self.text_encoder = text_encoder
        self._self_pair: OrderedDict[str, float] = OrderedDict()
        self._cache_size = self_pair_cache_size

    @staticmethod
    def judge_prompt(first: str, second: str) -> str:
        return JUDGE_PROMPT.format(first=first, second=second)

    def info_gain(self, before: str, after: str) -> tuple[float, float, float, float]:
        """(first order, second order, self pair, raw mean) — one batched scoring call."""
        items = [
            (self.judge_prompt(before, after), VERDICTS),
            (self.judge_prompt(after, before), VERDICTS),
        ]
        cached = self._self_pair.get(before)
        if cached is None:
            items.append((self.judge_prompt(before, before), VERDICTS))
        scores = [p_not_equal(lp) for lp in self.client.score_many(items)]
        if cached is None:
            cached = scores[2]
            self._self_pair[before] = cached
            if len(self._self_pair) > self._cache_size:
                self._self_pair.popitem(last=False)
        else:
            self._self_pair.move_to_end(before)
        first, second = scores[0], scores[1]
        return first, second, cached, (first + second) / 2

    def diversity(self, after: str, history: Sequence[str]) -> float:
        if self.text_encoder is None or not history:
            return 0.0
        vectors = self.text_encoder.encode([after, *history])
        return float(1.0 - np.max(vectors[1:] @ vectors[0]))

    def review(
        self, before: str, after: str, *, history: Sequence[str] = (), generation_queries: int = 1
    ) -> Review:
        """Score ``after`` (an evolution of ``before``); ``history`` = the episode so far."""
        queries_before = self.client.usage.queries
        first, second, self_pair, raw = self.info_gain(before, after)
        calibrated = max(0.0, raw - self_pair) / max(1e-6, 1.0 - self_pair)
        eliminated = eliminate(
            before, after, calibrated, min_info_gain=self.reward_cfg.min_info_gain
        )
        diversity = self.diversity(after, history or [before])
        query_cost = generation_queries + (self.client.usage.queries - queries_before)
        w = self.reward_cfg
        reward = (
            w.info_gain_weight * calibrated
            + w.info_gain_raw_weight * raw
            + w.diversity_weight * diversity
            - w.query_cost_weight * query_cost
            - (w.elimination_penalty if eliminated else 0.0)
        )
        return Review(
            info_gain=calibrated,
            info_gain_raw=raw,
            info_gain_first_order=first,
            info_gain_second_order=second,
            self_pair=self_pair,
            eliminated=eliminated,
            diversity=diversity,
            query_cost=query_cost,
            reward=reward,
        )
