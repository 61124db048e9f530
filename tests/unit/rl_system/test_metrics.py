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
