"""The entropy floor: an iteration where one action takes most steps raises an alert."""

from __future__ import annotations

from rl_system.config import load_config
from rl_system.policy import POLICY_OPERATIONAL_KEYS, IterationSummary
from train.report import _policy_summary


def _result(shares: dict[str, float]) -> dict:
    evolution = {"action_share": shares, "info_gain": 0.1}
    return {"env_runners": {"episode_return_mean": 0.2, "evolution": evolution,
                            "num_env_steps_sampled_lifetime": 12}}


def test_one_action_above_the_ceiling_is_an_alert():
    summary = IterationSummary.from_result(
        3, _result({"breadth": 0.75, "deepening": 0.25}), 1.0).check_action_share(0.6)
    assert summary.dominant_action == "breadth" and summary.dominant_action_share == 0.75
    assert summary.action_share_alert


def test_spread_actions_are_not_an_alert():
    summary = IterationSummary.from_result(
        1, _result({"breadth": 0.3, "deepening": 0.3, "stop": 0.4}), 1.0).check_action_share(0.6)
    assert summary.dominant_action == "stop" and not summary.action_share_alert


def test_the_report_counts_alerts_and_the_ceiling_does_not_change_the_policy_lineage():
    rows = [IterationSummary.from_result(i, _result(s), 1.0).check_action_share(0.6).__dict__
            for i, s in enumerate([{"breadth": 0.5, "stop": 0.5}, {"breadth": 0.9, "stop": 0.1},
                                   {"breadth": 0.7, "stop": 0.3}], start=1)]
    summary = _policy_summary(rows)
    assert summary["action_share_alerts"] == 2
    assert summary["dominant_action_last"] == "breadth"
    assert summary["dominant_action_share_last"] == 0.7
    assert "max_action_share" in POLICY_OPERATIONAL_KEYS
    assert load_config(None).policy.max_action_share == 0.6
