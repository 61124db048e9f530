import math

import pytest

from rl_system.config import RewardConfig
from rl_system.reviewer import RULE_NAMES, Reviewer, eliminate, p_not_equal

SEED = "Write a poem about the sea."


@pytest.mark.parametrize(
    ("after", "rule"),
    [
        ("", "only_punctuation_or_stop_words"),
        ("... !!! ?", "only_punctuation_or_stop_words"),
        ("what is the of and to", "only_punctuation_or_stop_words"),
        ("I'm sorry, but I cannot help with that request.", "refusal_or_too_short"),
        ("Sea poem.", "refusal_or_too_short"),
        ("#Rewritten Prompt#: Write a poem about the sea at night.", "template_copied"),
        ("Here is the new instruction: write a sonnet.", "template_copied"),
        ("Original instruction: Write a poem about the sea.", "template_copied"),
        ("write a poem about the sea", "no_info_gain"),
        ("Write a sonnet about the sea at night, in iambic pentameter.", None),
    ],
)
def test_elimination_rules(after, rule):
    assert eliminate(SEED, after) == rule


def test_low_info_gain_is_eliminated_even_when_text_differs():
    after = "Write a poem about the ocean."
    assert eliminate(SEED, after, info_gain=0.0) == "no_info_gain"
    assert eliminate(SEED, after, info_gain=0.3, min_info_gain=0.5) == "no_info_gain"
    assert eliminate(SEED, after, info_gain=0.3) is None
    assert set(RULE_NAMES) >= {"no_info_gain", "template_copied"}


def test_p_not_equal_normalises_over_the_two_verdicts():
    assert p_not_equal([math.log(0.2), math.log(0.6)]) == pytest.approx(0.75)
    assert p_not_equal([-1000.0, 0.0]) == pytest.approx(1.0)


class _FixedScores:
    """Algorithm-test double: answers score_many from a table keyed by the two texts."""

    def __init__(self, table):
        self.table = table
        self.usage = type("U", (), {"queries": 0})()

    def score_many(self, items):
        out = []
        for prompt, _ in items:
            first = prompt.split("First instruction: <<<")[1].split(">>>")[0]
            second = prompt.split("Second instruction: <<<")[1].split(">>>")[0]
            p = self.table[(first, second)]
            out.append([math.log(1 - p), math.log(p)])
            self.usage.queries += 1
        return out


def test_review_averages_orders_calibrates_and_weights():
    after = "Write a sonnet about the sea at night."
    client = _FixedScores({(SEED, after): 0.9, (after, SEED): 0.7, (SEED, SEED): 0.2})
    reward = RewardConfig(info_gain_weight=1.0, diversity_weight=0.0, query_cost_weight=0.01)
    review = Reviewer(client, reward=reward).review(SEED, after)
    assert review.info_gain_first_order == pytest.approx(0.9)
    assert review.info_gain_second_order == pytest.approx(0.7)
    assert review.info_gain_raw == pytest.approx(0.8)
    assert review.info_gain == pytest.approx((0.8 - 0.2) / 0.8)
    assert review.query_cost == 4  # one rewrite + three verdicts
    assert review.reward == pytest.approx(review.info_gain - 0.04)
    # the self-pair of an instruction is asked once, then cached
    again = Reviewer(client, reward=reward)
    again.review(SEED, after)
    assert again.review(SEED, after).query_cost == 3


def test_eliminated_rewrite_is_penalised():
    after = "Write a poem about the sea."
    client = _FixedScores({(SEED, after): 0.3, (after, SEED): 0.3, (SEED, SEED): 0.3})
    reward = RewardConfig(diversity_weight=0.0, elimination_penalty=0.5)
    review = Reviewer(client, reward=reward).review(SEED, after)
    assert review.eliminated == "no_info_gain"
    assert review.reward == pytest.approx(-0.5)
