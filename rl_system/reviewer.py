"""The reviewer: how much an evolution added, whether it survives, and its reward.

``info_gain`` comes from the judge mode ``policy.reward.judge`` (``rl_system.judges``, a
catalogue): the reviewer LLM's label log-probabilities, normalised over the labels (RLAIF's
token-probability labelling), averaged over the mode's presentation orders to cancel
position bias and calibrated against what the same judge says when nothing changed:

    info_gain = max(0, raw - self_pair) / (1 - self_pair)      in [0, 1]

``equality`` (the paper's) asks whether the two instructions are equal; ``preference``
which one demands more; ``rating`` how much each demands; ``cot`` writes a short rationale
before it answers. A measured self-pair is asked once per original and cached.

The elimination rules are Evol-Instruct's (WizardLM, Xu et al. 2023, section 3.3), kept
here as one catalogue (:data:`ELIMINATION_RULES`) that the environment and the dataset
filter share. Each rule says what it judges:

1. ``no_info_gain`` (the instruction): the evolution adds no information: its text is
   the instruction it came from, or its calibrated ``info_gain`` is at most
   ``policy.reward.min_info_gain`` (default 0: dropped only when the reviewer finds the
   pair no more unequal than the instruction paired with itself).
2. ``refusal`` (the expert's response, stage 2): the response is refusal-like ("sorry",
   "I cannot" ...) and under 80 words, i.e. the evolved instruction is hard to answer.
3. ``only_punctuation_or_stop_words`` (the expert's response, stage 2): the response
   has no content word.
4. ``template_copied`` (the instruction): it copies words of the rewriting request —
   Evol-Instruct's own ("#Rewritten Prompt#", "given prompt") and ours
   (``rl_system.actions.REQUEST_PHRASES``), or comes back inside our ``<<< >>>``
   delimiters. Code inside an instruction (a Python doctest's ``>>>``) is not a copy.

Ours, not the paper's, all judging the instruction by its text alone (a 135M reviewer
cannot tell these rewrites from good ones; ``teams-rl reviewer-check`` measures it):
``too_short`` (empty, or under three words); ``refused`` (the instructor declined or
apologised instead of rewriting: the text opens with a first-person refusal);
``repetitive`` (a sentence repeated, or one word 3-gram four times or more, the kind of
loop a small model falls into); ``garbled`` (two or more doubled adjacent words, "the
the"); ``truncated`` (cut off: an unclosed code fence or bracket, or a last word that
cannot end a sentence: an article, a conjunction, a possessive). None of them fires on any of the
project's 333 seed instructions or on the good rewrites of ``data/reviewer_pairs.jsonl``
(``tests/unit/rl_system/test_reviewer.py``).
One more of ours judges by embedding: ``off_topic``, a depth operation whose rewrite's
sentence-embedding cosine to its source is below ``policy.reward.min_topic_similarity``
(it wrote about something else); ``breadth``, which writes a new task, is exempt.

A surviving evolution's reward is the weighted sum of info_gain and diversity less its
query cost; an eliminated one earns only ``-elimination_penalty`` less its query cost.
Stage 1 has no response, so only the instruction rules apply there (as in WizardLM, where
rules 2 and 3 can only be checked once the response exists).
"""

from __future__ import annotations

import re
import string
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np

from rl_system.actions import REQUEST_PHRASES
from rl_system.judges import (
    JudgeResult,
    get_judge,
    judge_requests,
    judge_value,
    rationale_requests,
    self_pair_request,
    self_pair_value,
)
from rl_system.tasks import Task

# Rule 4: the words of Evol-Instruct's prompts (its own list and the labels its
# templates use) plus labels an instructor writes when it echoes a rewriting request;
# ``REQUEST_PHRASES`` are the words our request itself sends.
EVOL_INSTRUCT_PHRASES = (
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "#given",
    "#rewritten",
    "#created",
)
LABEL_PHRASES = ("new instruction:", "rewritten instruction", "original instruction")
TEMPLATE_PHRASES: tuple[str, ...] = EVOL_INSTRUCT_PHRASES + LABEL_PHRASES + REQUEST_PHRASES
# Our request's delimiters around the whole reply: an echo of the request, not code.
_DELIMITED = re.compile(r"^\s*<<<|>>>\s*$")

REFUSAL_PHRASES = ("sorry", "i cannot", "i can't", "i am unable", "as an ai", "i'm unable")
REFUSAL_MAX_WORDS = 80  # Evol-Instruct: a refusal-like response shorter than this is dropped
MIN_WORDS = 3
REFUSAL_OPENERS = ("i'm sorry", "i am sorry", "sorry,", "i cannot", "i can't", "i am unable",
                   "i'm unable", "as an ai")
REPEATED_TRIGRAM_COUNT = 4  # one word 3-gram this often: a loop, not emphasis
DOUBLED_WORDS_COUNT = 2  # "the the" twice in one instruction: not a typo any more
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CLEAN_ENDING = tuple(".?!:)]}\"'`*")
# Words a finished sentence does not end on (an article, a conjunction, a possessive...);
# prepositions are left out: "what is it made of" is a whole question.
DANGLING_WORDS = frozenset(
    "the an and or but nor its their his my your our whose including between than as".split())

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
class Evidence:
    """What the rules judge: an evolution ``before`` -> ``after`` with its calibrated
    ``info_gain`` (1 = no reviewer score), and, in stage 2, the expert's ``response``."""

    before: Task
    after: Task
    info_gain: float = 1.0
    min_info_gain: float = 0.0
    response: str = ""
    # Cosine of the two instructions' sentence embeddings (None without an encoder), and
    # whether the action writes a new task (breadth), which may leave the topic.
    topic_similarity: float | None = None
    min_topic_similarity: float = 0.0
    new_task: bool = False


@dataclass(frozen=True)
class EliminationRule:
    name: str
    judges: Literal["instruction", "response"]
    source: str  # "Evol-Instruct rule N", or "ours"
    description: str
    fires: Callable[[Evidence], bool]


def refusal_like(response: str) -> bool:
    low = response.lower()
    return any(p in low for p in REFUSAL_PHRASES) and len(_words(response)) < REFUSAL_MAX_WORDS


def only_filler(text: str) -> bool:
    stripped = text.translate(str.maketrans("", "", string.punctuation)).strip()
    return not stripped or all(w in STOP_WORDS for w in _words(text))


def copies_template(instruction: str) -> bool:
    low = instruction.lower()
    return any(p in low for p in TEMPLATE_PHRASES) or bool(_DELIMITED.search(instruction))


def refused_rewrite(instruction: str) -> bool:
    low = instruction.strip().lstrip("\"'\u201c ").lower()
    return low.startswith(REFUSAL_OPENERS) or "as an ai language model" in low


def repetitive(text: str) -> bool:
    words = _words(text)
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) >= REPEATED_TRIGRAM_COUNT:
        return True
    sentences = [s.strip().lower() for s in _SENTENCE_END.split(text) if len(s.split()) >= 3]
    return len(sentences) > len(set(sentences))


def garbled(text: str) -> bool:
    words = _words(text)
    return sum(a == b for a, b in zip(words, words[1:], strict=False)) >= DOUBLED_WORDS_COUNT


def truncated(text: str) -> bool:
    text = text.rstrip()
    if text.count("```") % 2 or text.count("(") > text.count(")") or (
            text.count("[") > text.count("]")):
        return True
    words = _words(text)
    if not words or text.endswith(_CLEAN_ENDING):
        return False
    return words[-1] in DANGLING_WORDS


def _off_topic(e: Evidence) -> bool:
    return (not e.new_task and e.topic_similarity is not None
            and e.topic_similarity < e.min_topic_similarity)


def _no_gain(e: Evidence) -> bool:
    return _normalise(e.after.text) == _normalise(e.before.text) or e.info_gain <= e.min_info_gain


ELIMINATION_RULES: tuple[EliminationRule, ...] = (
    EliminationRule(
        "too_short", "instruction", "ours",
        f"the evolved instruction is empty or under {MIN_WORDS} words",
        lambda e: len(_words(e.after.instruction)) < MIN_WORDS,
    ),
    EliminationRule(
        "template_copied", "instruction", "Evol-Instruct rule 4",
        "the evolved instruction copies words of the rewriting request",
        lambda e: copies_template(e.after.instruction),
    ),
    EliminationRule(
        "refused", "instruction", "ours",
        "the instructor declined or apologised instead of rewriting",
        lambda e: refused_rewrite(e.after.instruction),
    ),
    EliminationRule(
        "repetitive", "instruction", "ours",
        f"a sentence repeated, or a word 3-gram {REPEATED_TRIGRAM_COUNT} times or more",
        lambda e: repetitive(e.after.instruction),
    ),
    EliminationRule(
        "garbled", "instruction", "ours",
        f"{DOUBLED_WORDS_COUNT} or more doubled adjacent words",
        lambda e: garbled(e.after.instruction),
    ),
    EliminationRule(
        "truncated", "instruction", "ours",
        "cut off: an unclosed code fence or bracket, or it ends on an article, a conjunction "
        "or a possessive",
        lambda e: truncated(e.after.instruction),
    ),
    EliminationRule(
        "off_topic", "instruction", "ours",
        "a depth operation whose rewrite is about something else: the instructions' "
        "embedding cosine is below policy.reward.min_topic_similarity (breadth, which "
        "writes a new task, is exempt)",
        _off_topic,
    ),
    EliminationRule(
        "no_info_gain", "instruction", "Evol-Instruct rule 1",
        "identical to the task it came from, or calibrated info_gain at most "
        "policy.reward.min_info_gain",
        _no_gain,
    ),
    EliminationRule(
        "refusal", "response", "Evol-Instruct rule 2",
        f"the expert's response is refusal-like and under {REFUSAL_MAX_WORDS} words",
        lambda e: refusal_like(e.response),
    ),
    EliminationRule(
        "only_punctuation_or_stop_words", "response", "Evol-Instruct rule 3",
        "the expert's response has only punctuation and stop words",
        lambda e: only_filler(e.response),
    ),
)
RULE_NAMES = tuple(r.name for r in ELIMINATION_RULES)
INSTRUCTION_RULES = tuple(r for r in ELIMINATION_RULES if r.judges == "instruction")
RESPONSE_RULES = tuple(r for r in ELIMINATION_RULES if r.judges == "response")


def eliminate(before, after, info_gain: float = 1.0, *, min_info_gain: float = 0.0,
              topic_similarity: float | None = None, min_topic_similarity: float = 0.0,
              new_task: bool = False):
    """The first instruction rule that drops the evolution ``before`` -> ``after``, or
    ``None``. ``before`` / ``after``: a ``Task`` or an instruction string; ``info_gain``
    is the calibrated one; without a reviewer score (left at 1) only the textual rules
    can fire, and without ``topic_similarity`` not ``off_topic``."""
    evidence = Evidence(Task.of(before), Task.of(after), info_gain, min_info_gain,
                        topic_similarity=topic_similarity,
                        min_topic_similarity=min_topic_similarity, new_task=new_task)
    return next((r.name for r in INSTRUCTION_RULES if r.fires(evidence)), None)


def eliminate_response(response: str, task=None):
    """The first response rule (Evol-Instruct's 2 and 3) that drops the pair, or ``None``."""
    task = Task.of(task) if task is not None else Task("")
    evidence = Evidence(task, task, response=response)
    return next((r.name for r in RESPONSE_RULES if r.fires(evidence)), None)


@dataclass(frozen=True)
class Review:
    info_gain: float  # calibrated, in [0, 1]
    info_gain_raw: float  # the judge's score, averaged over its presentation orders
    info_gain_first_order: float  # e.g. (before, after)
    info_gain_second_order: float  # e.g. (after, before); = first for one-order judges
    self_pair: float  # the judge's score when nothing changed (the calibration reference)
    eliminated: str | None
    diversity: float  # 1 - max cosine to the episode's earlier instructions; 0 without any
    query_cost: int  # queries one step costs: the rewrite and the judge's (constant per mode)
    reward: float

    def as_dict(self) -> dict:
        return asdict(self)


# The review's numeric fields, by name (env info keys, metrics, the parquet struct).
REVIEW_SCORES: tuple[str, ...] = tuple(
    f.name for f in fields(Review) if f.type in (float, int, "float", "int")
)


class Reviewer:
    def __init__(self, client, *, reward, text_encoder=None, self_pair_cache_size: int = 4096):
        """``client``: an ``LLMClient`` for the reviewer role; ``reward``: ``RewardConfig``."""
        self.client = client
        self.reward_cfg = reward
        self.judge = get_judge(reward.judge)
        self.text_encoder = text_encoder
        self._self_pair: OrderedDict[str, float] = OrderedDict()
        self._cache_size = self_pair_cache_size

    def info_gain(self, before: str, after: str) -> JudgeResult:
        """The judge's verdict on ``before`` -> ``after``: its rationales (``cot``) in one
        generate call, then one batched scoring call (with the self-pair, unless cached)."""
        judge = self.judge
        rationales = []
        if judge.rationale is not None:
            requests = rationale_requests(judge, before, after)
            rationales = [c.text for c in self.client.generate(requests)]
        items = judge_requests(judge, before, after, rationales=rationales)
        reference = self._self_pair.get(before) if judge.measures_self_pair else None
        ask_self_pair = judge.measures_self_pair and reference is None
        if ask_self_pair:
            items.append(self_pair_request(judge, before))
        answers = self.client.score_many(items)
        if ask_self_pair:
            reference = self_pair_value(judge, answers.pop())
            self._self_pair[before] = reference
            if len(self._self_pair) > self._cache_size:
                self._self_pair.popitem(last=False)
        elif reference is not None:
            self._self_pair.move_to_end(before)
        return judge_value(judge, answers, self_pair=reference)

    def embedding_scores(self, before: str, after: str,
                         history: Sequence[str]) -> tuple[float | None, float]:
        """(topic similarity: cosine of ``after`` to ``before``; diversity: 1 - the largest
        cosine of ``after`` to the episode's earlier instructions), from one encode call.
        Without an encoder: (None, 0)."""
        if self.text_encoder is None:
            return None, 0.0
        vectors = self.text_encoder.encode([after, before, *history])
        diversity = float(1.0 - np.max(vectors[2:] @ vectors[0])) if history else 0.0
        return float(vectors[1] @ vectors[0]), diversity

    def _reward(self, *, calibrated: float, raw: float, diversity: float, query_cost: int,
                eliminated: str | None) -> float:
        w = self.reward_cfg
        cost = w.query_cost_weight * query_cost
        if eliminated:
            # A dropped evolution adds nothing to the dataset, so none of its scores are
            # paid: an off-topic drift scores high on both the judge and diversity.
            return -w.elimination_penalty - cost
        return (
            w.info_gain_weight * calibrated
            + w.info_gain_raw_weight * raw
            + w.diversity_weight * diversity
            - cost
        )

    def review(
        self, before, after, *, history: Sequence = (), generation_queries: int = 1,
        new_task: bool = False,
    ) -> Review:
        """Score ``after`` (an evolution of ``before``); ``history`` = the episode so far;
        ``new_task``: the action wrote a new task (breadth), so it may leave the topic.

        ``before`` / ``after`` / ``history`` items: ``Task`` or instruction strings. The
        reviewer compares whole tasks (instruction and input); diversity compares the
        instructions. An empty rewrite is eliminated without asking the reviewer.
        """
        before, after = Task.of(before), Task.of(after)
        history = [Task.of(h).instruction for h in history] or [before.instruction]
        if not after.instruction.strip():
            eliminated = eliminate(before, after, 0.0,
                                   min_info_gain=self.reward_cfg.min_info_gain)
            return Review(
                info_gain=0.0, info_gain_raw=0.0, info_gain_first_order=0.0,
                info_gain_second_order=0.0, self_pair=0.0, eliminated=eliminated,
                diversity=0.0, query_cost=generation_queries,
                reward=self._reward(calibrated=0.0, raw=0.0, diversity=0.0,
                                    query_cost=generation_queries, eliminated=eliminated),
            )
        verdict = self.info_gain(before.text, after.text)
        calibrated, raw = verdict.value, verdict.raw
        topic_similarity, diversity = self.embedding_scores(
            before.instruction, after.instruction, history)
        eliminated = eliminate(
            before, after, calibrated, min_info_gain=self.reward_cfg.min_info_gain,
            topic_similarity=topic_similarity,
            min_topic_similarity=self.reward_cfg.min_topic_similarity, new_task=new_task,
        )
        # The cost a step *asks*, the same whether the self-pair came from the cache or not:
        # a reward must not depend on what an earlier step happened to ask.
        query_cost = generation_queries + self.judge.queries_per_pair()
        return Review(
            info_gain=calibrated,
            info_gain_raw=raw,
            info_gain_first_order=verdict.first_order,
            info_gain_second_order=verdict.second_order,
            self_pair=verdict.self_pair,
            eliminated=eliminated,
            diversity=diversity,
            query_cost=query_cost,
            reward=self._reward(calibrated=calibrated, raw=raw, diversity=diversity,
                                query_cost=query_cost, eliminated=eliminated),
        )
