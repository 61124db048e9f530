"""reviewer-check's statistics and outputs on hand-made scores (no Ray, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rl_system import reviewer_check as rc
from rl_system.reviewer_check import Pair, PairFileError, load_pairs, resolve_modes, summarise

GOOD = [
    Pair("deepening-1", "deepening", "Explain tides.", "Explain tides and why there are two a day.",
         True),
    Pair("add_constraints-1", "add_constraints", "Write a poem.", "Write a poem of four lines.",
         True),
]
PARA = [Pair("paraphrase-1", "paraphrase", "Explain tides.", "Describe the tides.", False)]
DEGEN = [
    Pair("prompt_leak-1", "prompt_leak", "Write a poem.",
         "The new instruction should ask for a poem of four lines.", False),
    Pair("repetition-1", "repetition", "Explain tides.", "Explain tides tides tides tides.", False),
]
PAIRS = GOOD + PARA + DEGEN


def scores(values):
    return [{"value": v, "raw": v, "first_order": v, "second_order": v, "self_pair": 0.0}
            for v in values]


def test_aucs_split_paraphrases_from_degenerate_rewrites():
    # good 0.5, 0.6; paraphrase 0.1; degenerate 0.9 (prompt leak), 0.0
    s = summarise(PAIRS, scores([0.5, 0.6, 0.1, 0.9, 0.0]), queries=10, two_orders=True,
                  min_info_gain=0.0, draws=50)
    assert s["auc"]["vs_paraphrase"]["auc"] == 1.0
    assert s["auc"]["vs_paraphrase"]["ci95"] == [1.0, 1.0]  # separable in every draw
    assert s["auc"]["vs_degenerate"]["auc"] == 0.5
    assert s["auc"]["all"]["auc"] == pytest.approx(4 / 6)
    lo, hi = s["auc"]["all"]["ci95"]
    assert lo < 4 / 6 < hi
    # the copied-template rule drops the leak: rules + judge separate every pair
    assert s["auc_all_with_rules"] == 1.0
    # kept = value > 0: both good kept, paraphrase and leak wrongly kept, repetition not
    assert s["accuracy_at_threshold"] == pytest.approx(3 / 5)
    assert s["accuracy_with_rules"] == pytest.approx(4 / 5)
    assert s["per_category"]["prompt_leak"] == {"n": 1, "mean_value": 0.9,
                                                "kept_with_rules": 0.0}
    assert s["queries_per_pair"] == 2.0 and s["position_bias"] == 0.0
    one_order = summarise(PAIRS, scores([0.5] * 5), queries=0, two_orders=False,
                          min_info_gain=0.0, draws=0)
    assert one_order["position_bias"] is None


def test_bootstrap_is_seeded():
    many = [Pair(f"p{i}", "paraphrase" if i % 2 else "deepening", f"b{i}", f"a{i} x y", i % 2 == 0)
            for i in range(40)]
    values = scores(np.random.default_rng(0).random(40).tolist())

    def ci(seed):
        s = summarise(many, values, queries=0, two_orders=False, min_info_gain=0.0, draws=100,
                      seed=seed)
        return s["auc"]["all"]["ci95"]

    assert ci(7) == ci(7)
    assert ci(7) != ci(8)


def test_word_gain_pays_for_length_only():
    assert rc.word_gain("a b", "a b c d") == {"value": 0.5, "raw": 2.0}
    assert rc.word_gain("a b c d", "a b")["value"] == 0.0


def test_a_missing_class_gives_no_auc_rather_than_a_number():
    s = summarise(GOOD + DEGEN, scores([0.5, 0.6, 0.9, 0.0]), queries=0, two_orders=True,
                  min_info_gain=0.0, draws=10)
    assert s["auc"]["vs_paraphrase"] is None
    assert s["auc"]["all"]["auc"] == 0.5


class _FakeReviewer:
    """Algorithm-test double: P(second label) = 0.9 when the prompt says 'four lines', else
    0.2; generates a fixed rationale. Counts queries like LLMClient."""

    def __init__(self):
        self.usage = type("U", (), {"queries": 0})()

    def score_many(self, items):
        self.usage.queries += len(items)
        out = []
        for prompt, labels in items:
            text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
            p = 0.9 if "four lines" in text else 0.2
            rest = (1 - p) / (len(labels) - 1)
            out.append([float(np.log(rest))] * (len(labels) - 1) + [float(np.log(p))])
        return out

    def generate(self, requests):
        self.usage.queries += len(requests)
        return [type("C", (), {"text": "The second asks for more."})() for _ in requests]


def test_run_check_writes_json_that_recomputes_and_a_png(tmp_path):
    report = rc.run_check(_FakeReviewer(), PAIRS, modes=resolve_modes(()), min_info_gain=0.0,
                          draws=20, log=lambda _: None)
    paths = rc.write_report(report, tmp_path / "reviewer_check")
    data = json.loads(paths["json"].read_text())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(paths["json"].parent.glob("*.tmp"))
    assert list(data["scorers"]) == ["word_gain", "equality", "preference", "rating", "cot"]
    # distinct originals: 2 ("Explain tides.", "Write a poem.")
    n = len(PAIRS)
    assert {m: data["scorers"][m]["queries"] for m in data["scorers"]} == {
        "word_gain": 0, "equality": 2 * n + 2, "preference": 2 * n, "cot": 4 * n,
        "rating": n + 2,
    }
    good = [p["good"] for p in data["pairs"]]
    for name, s in data["scorers"].items():
        values = [p["scores"][name]["value"] for p in data["pairs"]]
        pos = [v for v, g in zip(values, good, strict=True) if g]
        neg = [v for v, g in zip(values, good, strict=True) if not g]
        assert s["auc"]["all"]["auc"] == rc.roc_auc(pos, neg), name
    assert data["rules"]["prompt_leak"]["by_rule"] == {"template_copied": 1}
    assert data["rules"]["deepening"]["dropped"] == 0.0
    table = rc.format_table(report)
    assert table.splitlines()[2].startswith("word_gain") and "prompt_leak 100%" in table


def test_load_pairs_reads_the_project_set_and_names_bad_lines(tmp_path):
    pairs = load_pairs("data/reviewer_pairs.jsonl")
    assert len(pairs) >= 90 and {p.category for p in pairs} >= {"paraphrase", "breadth"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "category": "c", "before": "a", "after": "b", "good": true}\n'
                   '{"id": "y", "before": "a"}\n')
    with pytest.raises(PairFileError, match=r"bad.jsonl:2: needs the fields category, after"):
        load_pairs(bad)
    with pytest.raises(PairFileError, match="cannot read"):
        load_pairs(tmp_path / "none.jsonl")


def test_resolve_modes_splits_commas_and_refuses_unknown_names():
    assert resolve_modes(["preference,equality", "preference"]) == ["preference", "equality"]
    with pytest.raises(ValueError, match="unknown judge mode 'equal'"):
        resolve_modes(["equal"])


def test_cli_refuses_bad_modes_and_pair_files_before_ray_starts(tmp_path, ray_init_calls):
    from click.testing import CliRunner

    from rl_system.cli import main

    result = CliRunner().invoke(main, ["reviewer-check", "--modes", "equality,nope"])
    assert result.exit_code == 1 and "unknown judge mode 'nope'" in result.output
    result = CliRunner().invoke(main, ["reviewer-check", "--pairs", str(tmp_path / "no.jsonl")])
    assert result.exit_code == 1 and "cannot read the pair file" in result.output
    assert ray_init_calls == []


def test_a_failing_mode_is_reported_and_the_others_still_measured():
    from serve.client import LLMCallError

    class _NoGenerate(_FakeReviewer):
        def generate(self, requests):
            raise LLMCallError("reviewer", "no answer within 120 s")

    partial: list[dict] = []
    report = rc.run_check(_NoGenerate(), PAIRS, modes=["equality", "cot"], min_info_gain=0.0,
                          draws=5, log=lambda _: None, on_mode_done=partial.append)
    assert report["failed_modes"] == {"cot": "reviewer: no answer within 120 s"}
    assert list(report["scorers"]) == ["word_gain", "equality"]
    assert "cot: not measured: reviewer: no answer" in rc.format_table(report)
    # after each mode the report so far, so an interrupted run keeps what it finished
    assert [(list(r["scorers"]), list(r["failed_modes"])) for r in partial] == [
        (["word_gain", "equality"], []), (["word_gain", "equality"], ["cot"])
    ]
    with pytest.raises(LLMCallError, match="every judge mode failed"):
        rc.run_check(_NoGenerate(), PAIRS, modes=["cot"], min_info_gain=0.0, draws=5,
                     log=lambda _: None)


class _BagOfWordsEncoder:
    """Algorithm-test double for TextEncoder: unit vectors of word counts (fixed words)."""

    VOCAB = sorted({w for p in PAIRS for t in (p.before, p.after) for w in t.lower().split()})

    def encode(self, texts):
        rows = np.array([[t.lower().split().count(w) for w in self.VOCAB] for t in texts], float)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_the_configured_reward_and_embedding_novelty_are_scored_beside_the_judges():
    from rl_system.config import RewardConfig

    reward = RewardConfig(judge="preference", info_gain_weight=2.0, diversity_weight=0.5)
    report = rc.run_check(_FakeReviewer(), PAIRS, modes=["preference", "equality"],
                          min_info_gain=0.0, draws=5, log=lambda _: None,
                          text_encoder=_BagOfWordsEncoder(), reward=reward)
    assert list(report["scorers"]) == ["word_gain", "embedding_novelty", "preference",
                                       "reward", "equality"]
    assert report["scorers"]["reward"]["kind"] == "reward"
    assert report["scorers"]["reward"]["judge"] == "preference"
    assert report["scorers"]["embedding_novelty"]["queries"] == 0
    for pair in report["pairs"]:
        s = pair["scores"]
        expected = 2.0 * s["preference"]["value"] + 0.5 * s["embedding_novelty"]["value"]
        assert s["reward"]["value"] == pytest.approx(expected)
    same = next(p for p in report["pairs"] if p["id"] == "paraphrase-1")
    assert 0.0 < same["scores"]["embedding_novelty"]["value"] < 1.0


def test_off_topic_drift_counts_against_depth_operations_but_not_breadth():
    # The same unrelated rewrite: a rule drop when a depth operation wrote it, a new task
    # when breadth did. The check reads which from the pair's category.
    from rl_system.config import RewardConfig

    before, after = "Write a poem about the sea.", "List Brazilian exports by tonnage."
    pairs = [rc.Pair("d", "deepening", before, after, True),
             rc.Pair("b", "breadth", before, after, True),
             rc.Pair("p", "paraphrase", before, "Write a poem about the ocean.", False)]

    class Encoder(_BagOfWordsEncoder):
        VOCAB = sorted({w for p in pairs for t in (p.before, p.after) for w in t.lower().split()})

    report = rc.run_check(_FakeReviewer(), pairs, modes=[], min_info_gain=0.0, draws=5,
                          log=lambda _: None, text_encoder=Encoder(),
                          reward=RewardConfig(min_topic_similarity=0.2))
    assert report["rules"]["deepening"]["by_rule"] == {"off_topic": 1}
    assert report["rules"]["breadth"]["by_rule"] == {}
    assert report["min_topic_similarity"] == 0.2
