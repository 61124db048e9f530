"""Stage 1 against the embedded SmolLM2 served by the foundation layer."""

from __future__ import annotations

import json

import pytest

from rl_system.config import load_config
from rl_system.policy import PolicyRunMismatch, latest_checkpoint, train_policy

pytestmark = pytest.mark.slow


@pytest.fixture()
def cfg(demo_app, demo_cfg, tmp_path):
    overrides = [
        f"serve.port={demo_cfg.serve.port}", f"run.dir={tmp_path}", "run.name=real",
        "policy.num_env_runners=2", "policy.iterations=2", "policy.train_batch_size=8",
        "policy.max_steps=3", "dataset.num_seeds=8",
        "models.instructor.sampling.max_tokens=40",
    ]
    return load_config("configs/demo.yaml", overrides)


def test_two_env_runners_train_resume_and_record_both_orders(cfg):
    summaries = train_policy(cfg)
    assert [s.iteration for s in summaries] == [1, 2]
    assert all(s.env_steps > 0 for s in summaries)
    first = latest_checkpoint(cfg)
    assert first is not None and first.name == "iter_0002" and first.exists()

    # the reviewer saw both presentation orders, and they score differently
    orders = [(s.info_gain_first_order, s.info_gain_second_order) for s in summaries]
    assert all(a is not None and b is not None for a, b in orders)
    assert any(abs(a - b) > 1e-4 for a, b in orders), orders

    # re-running with more iterations restores the checkpoint and continues from it
    more = cfg.model_copy(deep=True)
    more.policy.iterations = 3
    resumed = train_policy(more)
    assert [s.iteration for s in resumed] == [3]
    assert latest_checkpoint(more).name == "iter_0003"
    lines = (cfg.stage_dir("policy") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3]

    # a finished run does nothing; a changed experiment is refused, not mixed in
    assert train_policy(more) == []
    changed = more.model_copy(deep=True)
    changed.policy.max_kl = 0.05
    with pytest.raises(PolicyRunMismatch, match="different models/policy config"):
        train_policy(changed)
