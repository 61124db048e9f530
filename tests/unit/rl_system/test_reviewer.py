import math

import pytest

from rl_system.actions import REQUEST_PHRASES, depth_and_breadth
from rl_system.config import RewardConfig, TeamsRLConfig
from rl_system.reviewer import (
    ELIMINATION_RULES,
    RESPONSE_RULES,
    REVIEW_SCORES,
    RULE_NAMES,
    Evidence,
    Review,
    Reviewer,
    eliminate,
    eliminate_response,
)
from rl_system.tasks import Task

SEED = "Write a poem about the sea."


@pytest.mark.parametrize(
    ("after", "rule"),
    [
        ("", "too_short"),
        ("... !!! ?", "too_short"),
        ("Sea poem.", "too_short"),
        ("#Rewritten Prompt#: Write a poem about the sea at night.", "template_copied"),
        ("Here is the new instruction: write a sonnet.", "template_copied"),
        ("Original instruction: Write a poem about the sea.", "template_copied"),
        # what the demo kept: the instructor echoing our own request
        ("The new instruction should ask for a sonnet about the sea at night.",
         "template_copied"),
        ("<<<Write a sonnet about the sea at night.>>>", "template_copied"),
        ("write a poem about the sea", "no_info_gain"),
        ("Write a sonnet about the sea at night, in iambic pentameter.", None),
        # Rules 2 and 3 judge the expert's response, not the instruction (WizardLM 3.3).
        ("Explain how to say sorry politely to a colleague you upset.", None),
        # A refusal-shaped *rewrite* is the instructor declining: ours, not rule 2.
        ("I'm sorry, but I cannot help with that request.", "refused"),
        ("As an AI language model, I am unable to change this instruction.", "refused"),
        ("Write an apology note that begins 'I'm sorry, I cannot make it on Friday'.", None),
        ("Write a poem about the sea. Write a poem about the sea. Make it rhyme.",
         "repetitive"),
        ("Write a poem about the sea at night, at night, at night, at night, at night.",
         "repetitive"),
        ("Write write a poem the the about sea sea.", "garbled"),
        ("Write a poem about the sea that mentions gulls, tides and the", "truncated"),
        ("Write a poem about the sea (in the style of", "truncated"),
        ("Write a poem about the sea at dawn in Italian", None),
        ("Write a hello world program in C", None),
        ("Explain what a poem about the sea is made of", None),
        # Code is not a copy of our <<< >>> delimiters.
        ("Write add(a, b) so that this doctest passes:\n>>> add(2, 3)\n5", None),
        ('Explain what `cat <<< "$name"` prints in bash, with an example.', None),
        # Constraints a rewrite may well add are not template words.
        ("In about 30 words and with no preamble, write a poem about the sea at dawn.", None),
    ],
)
def test_instruction_rules(after, rule):
    assert eliminate(SEED, after) == rule


@pytest.mark.parametrize(
    ("response", "rule"),
    [
        ("I'm sorry, but I cannot help with that request.", "refusal"),
        ("As an AI, I can't write poems.", "refusal"),
        ("", "only_punctuation_or_stop_words"),
        ("... !!! ?", "only_punctuation_or_stop_words"),
        ("what is the of and to", "only_punctuation_or_stop_words"),
        ("Sorry is a hard word. " + "The sea rolls in under a grey sky. " * 12, None),
        ("The sea is wide; the waves are grey and the gulls cry over them.", None),
    ],
)
def test_response_rules_are_evol_instructs_2_and_3(response, rule):
    assert eliminate_response(response) == rule


def _project_instructions() -> dict[str, list[str]]:
    import json
    from pathlib import Path

    data = Path(__file__).resolve().parents[3] / "data"
    seeds = [json.loads(line)["instruction"]
             for line in (data / "seed_instructions.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (data / "reviewer_pairs.jsonl").read_text().splitlines()]
    return {"seed": seeds, "good rewrite": [p["after"] for p in pairs if p["good"]]}


@pytest.mark.parametrize("rule", ["refused", "repetitive", "garbled", "truncated"])
def test_our_textual_rules_spare_every_seed_and_every_good_rewrite(rule):
    fires = {r.name: r for r in ELIMINATION_RULES}[rule].fires
    for kind, texts in _project_instructions().items():
        hit = [t for t in texts if fires(Evidence(Task(SEED), Task(t)))]
        assert hit == [], f"{rule} fires on a {kind}: {hit[0][:80]!r}"


def test_rules_are_a_catalogue_that_says_what_each_judges():
    assert RULE_NAMES == tuple(r.name for r in ELIMINATION_RULES)
    by_name = {r.name: r for r in ELIMINATION_RULES}
    assert {r.name for r in RESPONSE_RULES} == {"refusal", "only_punctuation_or_stop_words"}
    assert by_name["no_info_gain"].source == "Evol-Instruct rule 1"
    assert by_name["template_copied"].judges == "instruction"
    sources = {r.source for r in ELIMINATION_RULES}
    assert sources >= {f"Evol-Instruct rule {i}" for i in (1, 2, 3, 4)}


def test_rule_4_phrases_are_words_our_requests_send():
    sent = " ".join(
        m["content"].lower()
        for a in depth_and_breadth()
        for inp in ("", "Memo: the meeting moved to Friday.")
        for m in a.messages("Summarise the memo.", inp)
    )
    assert all(p == p.lower() and p in sent for p in REQUEST_PHRASES)
    # an instructor that echoes any of our requests back is eliminated by rule 4
    for action in depth_and_breadth():
        request = action.messages(SEED, "Some input.")[0]["content"]
        assert eliminate(SEED, request) == "template_copied"


def test_rule_1_threshold_is_the_documented_config_key():
    field = TeamsRLConfig.model_fields["policy"].annotation.model_fields["reward"]
    description = field.annotation.model_fields["min_info_gain"].description
    assert "rule 1" in description and "info_gain" in description
    assert RewardConfig().min_info_gain == 0.0


def test_review_scores_come_from_the_review_dataclass():
    assert REVIEW_SCORES == ("info_gain", "info_gain_raw", "info_gain_first_order",
                             "info_gain_second_order", "self_pair", "diversity", "query_cost",
                             "reward")
    assert "eliminated" not in REVIEW_SCORES and set(REVIEW_SCORES) < set(Review.__annotations__)


def test_low_info_gain_is_eliminated_even_when_text_differs():
    after = "Write a poem about the ocean."
    assert eliminate(SEED, after, info_gain=0.0) == "no_info_gain"
    assert eliminate(SEED, after, info_gain=0.3, min_info_gain=0.5) == "no_info_gain"
    assert eliminate(SEED, after, info_gain=0.3) is None
    assert set(RULE_NAMES) >= {"no_info_gain", "template_copied"}


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
    assert review.query_cost == 4  # one rewrite + two orders + the self-pair
    assert review.reward == pytest.approx(review.info_gain - 0.04)


def test_the_self_pair_is_asked_once_yet_every_step_costs_the_same():
    # A reward must not depend on what an earlier step happened to ask: before, a step
    # whose self-pair was cached cost 3 queries and the first one 4.
    after = "Write a sonnet about the sea at night."
    client = _FixedScores({(SEED, after): 0.9, (after, SEED): 0.7, (SEED, SEED): 0.2})
    reviewer = Reviewer(client, reward=RewardConfig(query_cost_weight=0.01))
    first = reviewer.review(SEED, after)
    asked = client.usage.queries
    second = reviewer.review(SEED, after)
    assert client.usage.queries - asked == 2  # the cached self-pair is not asked again
    assert first.query_cost == second.query_cost == 4
    assert first.reward == pytest.approx(second.reward)


class _PreferenceTable:
    """Algorithm-test double for the preference judge: P("2") by which slot holds what."""

    def __init__(self, p_second_when_after_second: float, p_second_when_after_first: float):
        self.p = (p_second_when_after_second, p_second_when_after_first)
        self.usage = type("U", (), {"queries": 0})()
        self.prompts = []

    def score_many(self, items):
        out = []
        for prompt, labels in items:
            assert labels == ("1", "2")
            self.prompts.append(prompt)
            p2 = self.p[0] if prompt.index(SEED) < prompt.index("sonnet") else self.p[1]
            out.append([math.log(1 - p2), math.log(p2)])
            self.usage.queries += 1
        return out


def test_the_configured_judge_mode_produces_info_gain():
    after = "Write a sonnet about the sea at night."
    client = _PreferenceTable(0.9, 0.3)  # the rewrite wins 0.9 as "2" and 0.7 as "1"
    reward = RewardConfig(judge="preference", diversity_weight=0.0)
    review = Reviewer(client, reward=reward).review(SEED, after)
    assert len(client.prompts) == 2  # both orders; the self-pair is 1/2 by symmetry, not asked
    assert review.info_gain_first_order == pytest.approx(0.9)
    assert review.info_gain_second_order == pytest.approx(0.7)
    assert review.info_gain_raw == pytest.approx(0.8)
    assert review.self_pair == 0.5
    assert review.info_gain == pytest.approx((0.8 - 0.5) / 0.5)
    assert review.query_cost == 3  # one rewrite + two orders


def test_eliminated_rewrite_is_penalised():
    after = "Write a poem about the sea."
    client = _FixedScores({(SEED, after): 0.3, (after, SEED): 0.3, (SEED, SEED): 0.3})
    reward = RewardConfig(diversity_weight=0.0, elimination_penalty=0.5)
    review = Reviewer(client, reward=reward).review(SEED, after)
    assert review.eliminated == "no_info_gain"
    assert review.reward == pytest.approx(-0.5)


def test_the_reviewer_compares_whole_tasks_and_rules_judge_the_instruction():
    """The verdict prompts carry each task's input; rule 4 is not fired by the input."""
    seen = []

    class Client:
        usage = type("U", (), {"queries": 0})()

        def score_many(self, items):
            seen.extend(prompt for prompt, _ in items)
            return [[math.log(0.1), math.log(0.9)] if "sonnet" in p else
                    [math.log(0.9), math.log(0.1)] for p, _ in items]

    memo = "Notes: given prompt engineering, the team met on Friday."
    before, after = Task(SEED, memo), Task("Write a sonnet about the sea in the memo.", memo)
    review = Reviewer(Client(), reward=RewardConfig(diversity_weight=0)).review(before, after)
    assert len(seen) == 3 and all(memo in p for p in seen)
    assert review.eliminated is None and review.info_gain > 0


def test_an_empty_rewrite_is_eliminated_without_asking_the_reviewer():
    client = _FixedScores({})
    review = Reviewer(client, reward=RewardConfig(elimination_penalty=0.5)).review(SEED, "  ")
    assert review.eliminated == "too_short" and client.usage.queries == 0
    assert review.query_cost == 1 and review.reward == pytest.approx(-0.5)


def test_min_info_gain_from_config_eliminates_through_the_reviewer():
    after = "Write a sonnet about the sea at night."
    client = _FixedScores({(SEED, after): 0.6, (after, SEED): 0.6, (SEED, SEED): 0.2})
    kept = Reviewer(client, reward=RewardConfig(diversity_weight=0)).review(SEED, after)
    assert kept.eliminated is None and kept.info_gain == pytest.approx(0.5)
    strict = RewardConfig(diversity_weight=0, min_info_gain=0.5)
    assert Reviewer(client, reward=strict).review(SEED, after).eliminated == "no_info_gain"


class _TopicVectors:
    """Algorithm-test double for the text encoder: fixed unit vectors by text."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        import numpy as np

        return np.array([self.table[t] for t in texts], dtype=np.float64)


def test_a_depth_operation_that_leaves_the_topic_is_eliminated_and_breadth_is_not():
    # A depth operation must enrich *this* task: a rewrite about something else is off
    # topic, however much the judge likes it. Breadth writes a new task by design.
    import numpy as np

    drifted = "List the main exports of Brazil in a table."
    encoder = _TopicVectors({SEED: [1.0, 0.0], drifted: [0.1, float(np.sqrt(0.99))]})
    client = _FixedScores({(SEED, drifted): 0.9, (drifted, SEED): 0.9, (SEED, SEED): 0.1})
    reward = RewardConfig(min_topic_similarity=0.2)
    reviewer = Reviewer(client, reward=reward, text_encoder=encoder)
    depth = reviewer.review(SEED, drifted)
    assert depth.eliminated == "off_topic"
    assert depth.reward < 0
    breadth = reviewer.review(SEED, drifted, new_task=True)
    assert breadth.eliminated is None and breadth.diversity == pytest.approx(0.9)
    assert eliminate(SEED, drifted, 0.9, topic_similarity=0.1, min_topic_similarity=0.2) == (
        "off_topic")
    assert eliminate(SEED, drifted, 0.9, topic_similarity=0.3, min_topic_similarity=0.2) is None
    assert eliminate(SEED, drifted, 0.9, topic_similarity=0.1, min_topic_similarity=0.2,
                     new_task=True) is None
    # without an encoder there is no similarity, and the rule cannot fire
    assert Reviewer(client, reward=reward).review(SEED, drifted).eliminated is None
