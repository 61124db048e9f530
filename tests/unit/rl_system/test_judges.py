"""The judge catalogue's arithmetic on fixed log-probs (no Ray, no model)."""

from __future__ import annotations

import math
from typing import get_args

import pytest

from rl_system import judges
from rl_system.config import RewardConfig
from rl_system.judges import (
    EQUALITY_PROMPT,
    JUDGES,
    judge_many,
    judge_requests,
    judge_value,
    rationale_requests,
    self_pair_request,
    self_pair_value,
)
from rl_system.reviewer import Reviewer

BEFORE = "Write a poem about the sea."
AFTER = "Write a sonnet about the sea at night, in iambic pentameter, with an ABAB rhyme."


def lp(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def test_config_literal_lists_every_catalogue_mode():
    assert set(get_args(RewardConfig.model_fields["judge"].annotation)) == set(JUDGES)
    assert RewardConfig().judge == "equality"


def test_equality_prompts_are_todays_reviewer_prompts():
    eq = JUDGES["equality"]
    prompts = [p for p, _ in judge_requests(eq, BEFORE, AFTER)]
    assert prompts == [EQUALITY_PROMPT.format(first=BEFORE, second=AFTER),
                       EQUALITY_PROMPT.format(first=AFTER, second=BEFORE)]
    assert self_pair_request(eq, BEFORE) == (
        EQUALITY_PROMPT.format(first=BEFORE, second=BEFORE), eq.labels)
    assert all(c == ("Equal", "Not Equal") for _, c in judge_requests(eq, BEFORE, AFTER))


@pytest.mark.parametrize(
    ("first", "second", "self_lp"),
    [
        (lp(0.3, 0.6), lp(0.5, 0.2), lp(0.9, 0.05)),
        ([-12.0, -9.5], [-7.25, -8.0], [-2.0, -6.0]),  # unnormalised, as the model returns them
        (lp(0.9, 0.1), lp(0.8, 0.2), lp(0.4, 0.6)),  # judged less unequal than the self-pair
    ],
)
def test_equality_reproduces_the_papers_info_gain_and_calibration(first, second, self_lp):
    # P(Not Equal) normalised over the two verdicts, both orders, calibrated: spelled out
    def p_not_equal(logprobs):
        equal, not_equal = (math.exp(x) for x in logprobs)
        return not_equal / (equal + not_equal)

    p1, p2, sp = p_not_equal(first), p_not_equal(second), p_not_equal(self_lp)
    raw = (p1 + p2) / 2
    calibrated = max(0.0, raw - sp) / max(1e-6, 1.0 - sp)

    got = judge_value("equality", [first, second], self_pair=self_pair_value("equality", self_lp))
    assert got.first_order == pytest.approx(p1, abs=1e-15)
    assert got.second_order == pytest.approx(p2, abs=1e-15)
    assert got.self_pair == pytest.approx(sp, abs=1e-15)
    assert got.raw == pytest.approx(raw, abs=1e-15)
    assert got.value == pytest.approx(calibrated, abs=1e-15)


class _TableClient:
    """Algorithm-test double: log-probs looked up by prompt; counts queries."""

    def __init__(self, table):
        self.table = table
        self.queries = 0
        self.calls = 0

    def score_many(self, items):
        self.calls += 1
        self.queries += len(items)
        return [self.table[prompt] for prompt, _ in items]


def test_equality_through_judge_many_matches_reviewer_info_gain_on_the_same_client():
    eq = JUDGES["equality"]
    table = {
        EQUALITY_PROMPT.format(first=BEFORE, second=AFTER): lp(0.3, 0.7),
        EQUALITY_PROMPT.format(first=AFTER, second=BEFORE): lp(0.45, 0.55),
        EQUALITY_PROMPT.format(first=BEFORE, second=BEFORE): lp(0.92, 0.08),
    }

    class _Usage:
        queries = 0

    client = _TableClient(table)
    client.usage = _Usage()
    review = Reviewer(client, reward=RewardConfig(judge="equality")).info_gain(BEFORE, AFTER)
    (got,) = judge_many(client, eq, [(BEFORE, AFTER)])
    assert got == review
    assert got.value == pytest.approx(
        max(0.0, got.raw - got.self_pair) / (1 - got.self_pair), abs=1e-15)


@pytest.mark.parametrize("mode", ["equality", "preference", "rating", "cot"])
def test_label_normalisation_ignores_a_common_offset(mode):
    judge = JUDGES[mode]
    weights = [1.0, 3.0, 2.0, 5.0, 4.0][: len(judge.labels)]
    row = lp(*(w / sum(weights) for w in weights))
    normalised = [row, row[::-1]][: len(judge.orders)]
    very_negative = [[x - 40.0 for x in row] for row in normalised]  # as a model returns them
    ref = {"self_pair": 0.1} if judge.measures_self_pair else {}
    a, b = judge_value(judge, normalised, **ref), judge_value(judge, very_negative, **ref)
    assert a.value > 0
    assert (a.value, a.raw, a.first_order, a.second_order) == pytest.approx(
        (b.value, b.raw, b.first_order, b.second_order), abs=1e-12
    )


def test_preference_reads_the_label_at_the_rewrites_position_and_averages_orders():
    pref = JUDGES["preference"]
    (p1, c1), (p2, c2) = judge_requests(pref, BEFORE, AFTER)
    # order 1 shows the rewrite second, order 2 shows it first
    assert p1.index(BEFORE) < p1.index(AFTER) and p2.index(AFTER) < p2.index(BEFORE)
    assert c1 == c2 == ("1", "2")
    # order 1: P("2") = 0.8; order 2: P("1") = 0.6 -> raw 0.7
    got = judge_value(pref, [lp(0.2, 0.8), lp(0.6, 0.4)])
    assert (got.first_order, got.second_order) == pytest.approx((0.8, 0.6))
    assert got.raw == pytest.approx(0.7)
    assert got.self_pair == 0.5
    assert got.value == pytest.approx((0.7 - 0.5) / 0.5)


def test_preference_cancels_a_pure_position_bias():
    # a judge that always says "2" with p=0.9, whatever the texts: no preference at all
    got = judge_value("preference", [lp(0.1, 0.9), lp(0.1, 0.9)])
    assert got.raw == pytest.approx(0.5)
    assert got.value == 0.0
    assert abs(got.first_order - got.second_order) == pytest.approx(0.8)


def test_preference_self_pair_is_one_half_by_construction():
    # the two orders of (before, before) are one prompt: whatever its log-probs, the mean
    # of P(label at the rewrite's position) over both orders is 1/2
    pref = JUDGES["preference"]
    (p1, _), (p2, _) = judge_requests(pref, BEFORE, BEFORE)
    assert p1 == p2
    for answer in (lp(0.97, 0.03), [-30.0, -2.0], lp(0.5, 0.5)):
        assert judge_value(pref, [answer, answer]).raw == pytest.approx(0.5)
    assert self_pair_request(pref, BEFORE) is None
    with pytest.raises(ValueError, match="constant self-pair"):
        self_pair_value(pref, lp(0.5, 0.5))


def test_rating_is_the_rise_of_the_expected_rating_over_the_headroom():
    rating = JUDGES["rating"]
    ((prompt, labels),) = judge_requests(rating, BEFORE, AFTER)
    assert AFTER in prompt and BEFORE not in prompt and labels == ("1", "2", "3", "4", "5")
    assert BEFORE in self_pair_request(rating, BEFORE)[0]
    before_lp = lp(0.5, 0.5, 1e-12, 1e-12, 1e-12)  # E[rating] = 1.5
    after_lp = lp(1e-12, 1e-12, 0.5, 0.5, 1e-12)  # E[rating] = 3.5
    ref = self_pair_value(rating, before_lp)
    assert ref == pytest.approx((1.5 - 1) / 4)
    got = judge_value(rating, [after_lp], self_pair=ref)
    assert got.raw == pytest.approx((3.5 - 1) / 4)
    assert got.value == pytest.approx((3.5 - 1.5) / (5 - 1.5))
    assert got.first_order == got.second_order == got.raw
    # a rewrite rated lower than its original adds nothing
    assert judge_value(rating, [before_lp], self_pair=self_pair_value(rating, after_lp)).value == 0


def test_cot_asks_a_greedy_rationale_per_order_then_scores_the_conversation():
    cot = JUDGES["cot"]
    gens = rationale_requests(cot, BEFORE, AFTER)
    assert len(gens) == 2 and all(g.temperature == 0.0 and g.max_tokens > 8 for g in gens)
    assert gens[0].messages[0].content.index(BEFORE) < gens[0].messages[0].content.index(AFTER)
    with pytest.raises(ValueError, match="needs 2 rationales"):
        judge_requests(cot, BEFORE, AFTER)
    items = judge_requests(cot, BEFORE, AFTER, rationales=["R1", "R2"])
    for (conv, labels), gen, rationale in zip(items, gens, ("R1", "R2"), strict=True):
        assert [m["role"] for m in conv] == ["user", "assistant", "user"]
        assert conv[0]["content"] == gen.messages[0].content
        assert conv[1]["content"] == rationale
        assert labels == ("1", "2")
    got = judge_value(cot, [lp(0.3, 0.7), lp(0.9, 0.1)])
    assert got.raw == pytest.approx(0.8) and got.value == pytest.approx(0.6)
    assert rationale_requests("preference", BEFORE, AFTER) == []


def test_judge_many_batches_one_score_call_and_asks_each_self_pair_once():
    eq = JUDGES["equality"]
    other = "Explain recursion."
    rewrites = [(BEFORE, AFTER), (BEFORE, AFTER + " Add a title."), (other, other + " In Python.")]
    table = {}
    for b, a in rewrites:
        table[EQUALITY_PROMPT.format(first=b, second=a)] = lp(0.2, 0.8)
        table[EQUALITY_PROMPT.format(first=a, second=b)] = lp(0.4, 0.6)
        table[EQUALITY_PROMPT.format(first=b, second=b)] = lp(0.9, 0.1)
    client = _TableClient(table)
    cache: dict[str, float] = {}
    results = judge_many(client, eq, rewrites, self_pairs=cache)
    assert client.calls == 1
    assert client.queries == 2 * 3 + 2  # two orders per pair, one self-pair per distinct original
    assert set(cache) == {BEFORE, other}
    assert all(r.value == pytest.approx((0.7 - 0.1) / 0.9) for r in results)
    judge_many(client, eq, rewrites[:1], self_pairs=cache)
    assert client.queries == 8 + 2  # cached self-pair: two more queries only
    assert eq.queries_per_pair() == 3 and eq.queries_per_pair(self_pair_cached=True) == 2
    assert JUDGES["cot"].queries_per_pair() == 4 and JUDGES["rating"].queries_per_pair() == 2


def test_wrong_answer_count_and_unknown_mode_are_refused():
    with pytest.raises(ValueError, match="asks 2 orders"):
        judge_value("preference", [lp(0.5, 0.5)])
    with pytest.raises(ValueError, match="needs the measured self_pair"):
        judge_value("equality", [lp(0.5, 0.5), lp(0.5, 0.5)])
    with pytest.raises(ValueError, match="unknown judge mode 'nope'.*equality"):
        judges.get_judge("nope")
