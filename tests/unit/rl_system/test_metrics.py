"""rl_system.metrics: the whole metric table, and the Grafana dashboard it must cover."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rl_system import metrics
from rl_system.metrics import METRICS, STAGE_METRICS, metric_group
from serve.metrics import SERVE_METRICS
from tests.unit.serve.test_metrics import check_table

DASHBOARD = Path(__file__).parents[3] / "cluster" / "grafana" / "teams_rl_dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def test_the_whole_table_is_valid_and_serve_rows_are_not_redefined():
    check_table(METRICS)
    assert METRICS == SERVE_METRICS + STAGE_METRICS
    assert not {r.group for r in SERVE_METRICS} & {r.group for r in STAGE_METRICS}


def test_every_teams_rl_metric_in_the_dashboard_is_in_the_table():
    # Ray exports a metric as ray_<name>; a histogram also as <name>_bucket/_sum/_count.
    exported = set(re.findall(r"\bray_(teams_rl_[a-z0-9_]*[a-z0-9])\b", DASHBOARD.read_text()))
    assert exported, "the dashboard queries no teams_rl_ metric"
    defined = {r.name for r in METRICS}
    histograms = {r.name for r in METRICS if r.kind == "histogram"}

    def known(name: str) -> bool:
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        return name in defined or base in histograms

    unknown = sorted(n for n in exported if not known(n))
    assert not unknown, f"the dashboard queries metrics the table does not define: {unknown}"


def test_the_accessors_are_the_groups():
    for group in ("policy", "dataset", "sft", "pipeline"):
        assert getattr(metrics, f"{group}_metrics")() is metric_group(group)
    # stage 1 sets each policy gauge from the IterationSummary field of the same name
    from dataclasses import fields

    from rl_system.policy import IterationSummary

    gauges = set(vars(metrics.policy_metrics()))
    assert gauges >= {"episode_return_mean", "info_gain", "elimination_rate",
                      "queries_per_episode", "dominant_action_share"}
    assert gauges <= {f.name for f in fields(IterationSummary)}
    assert json.loads(DASHBOARD.read_text())  # the dashboard parses


def _review(eliminated):
    from rl_system.reviewer import Review

    return Review(info_gain=0.4, info_gain_raw=0.5, info_gain_first_order=0.6,
                  info_gain_second_order=0.4, self_pair=0.1, eliminated=eliminated,
                  diversity=0.2, query_cost=3, reward=0.3)


def test_a_review_is_tagged_with_its_stage_judge_mode_and_eliminating_rule():
    from rl_system.metrics import review_tags

    assert review_tags(_review(None), stage="policy", judge="preference") == {
        "stage": "policy", "judge": "preference", "outcome": "kept"}
    assert review_tags(_review("no_info_gain"), stage="policy", judge="equality") == {
        "stage": "policy", "judge": "equality", "outcome": "no_info_gain"}
    # the tags are the table's, so Ray accepts them
    row = next(r for r in METRICS if r.name == "teams_rl_reviewer_reviews_total")
    assert set(review_tags(_review(None), stage="dataset", judge="cot")) == set(row.tag_keys)


def test_a_stage2_seed_counts_as_evolution_and_reviewer_outcomes():
    from rl_system.dataset.outputs import seed_outcomes

    counts = {"evolutions_tried": 5, "evolutions_kept": 2, "evolutions_failed": 1,
              "reviews_failed": 1, "eliminated/no_info_gain": 1, "eliminated/truncated": 0,
              "eliminated/refusal": 1, "responses_failed": 1}
    evolutions, reviews = seed_outcomes(counts)
    assert evolutions == {"kept": 2, "failed": 1, "eliminated/no_info_gain": 1,
                          "eliminated/refusal": 1}
    # the reviewer's verdicts on instructions: kept, or an instruction rule; a failed call
    # is no verdict, and a response rule judged the expert's answer, not the instruction
    assert reviews == {"kept": 2, "no_info_gain": 1}


def test_the_dashboard_shows_progress_and_the_judge_mode_figures():
    text = DASHBOARD.read_text()
    for name in ("teams_rl_dataset_seeds_total", "teams_rl_dataset_pairs_total",
                 "teams_rl_reviewer_reviews_total", "teams_rl_reviewer_info_gain_bucket"):
        assert f"ray_{name}" in text, name
    queries = [t["expr"] for p in json.loads(text)["panels"] for t in p.get("targets", [])]
    judged = [q for q in queries if "teams_rl_reviewer_" in q]
    assert judged and all(re.search(r"by \([^)]*\bjudge\b", q) for q in judged)
    assert any(re.search(r"by \([^)]*\boutcome\b", q) for q in judged)  # eliminations by rule
    assert any('role="expert", source="paid"' in q for q in queries)  # expert queries paid
