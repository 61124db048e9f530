"""Stage 1's run-directory state: lineage fingerprint, checkpoint fall-back (no Ray)."""

from __future__ import annotations

import pytest

from rl_system.config import load_config
from rl_system.policy import (
    _lineage_hash,
    checkpoint_candidates,
    policy_is_done,
    restore_newest_loadable,
)


@pytest.mark.parametrize("override", [
    "policy.iterations=50", "policy.num_env_runners=7", "policy.num_envs_per_env_runner=3",
    "policy.sample_timeout_s=5", "models.expert.timeout_s=3", "models.expert.max_retries=9",
    "models.instructor.requests_per_minute=30", "dataset.concurrency=8",
    "dataset.max_expert_queries=10",
])
def test_operational_keys_leave_the_lineage(override):
    assert _lineage_hash(load_config(None, [override])) == _lineage_hash(load_config(None, []))


@pytest.mark.parametrize("override", [
    "policy.max_steps=3", "policy.max_kl=0.02", "models.reviewer.model=other",
    "models.instructor.sampling.temperature=0.3", "policy.reward.diversity_weight=0.1",
])
def test_experiment_keys_stay_in_the_lineage(override):
    assert _lineage_hash(load_config(None, [override])) != _lineage_hash(load_config(None, []))


def test_candidates_are_the_newest_then_older(tmp_path):
    for i in (1, 2, 3, 4):
        (tmp_path / "checkpoints" / f"iter_{i:04d}").mkdir(parents=True)
    newest = tmp_path / "checkpoints" / "iter_0003"  # iter_0004: saved, never recorded
    assert [p.name for p in checkpoint_candidates(tmp_path, str(newest))] == [
        "iter_0003", "iter_0002", "iter_0001"]
    assert checkpoint_candidates(tmp_path, None) == []


class _Loader:
    """Stands in for an RLlib Algorithm's restore_from_path: fails on the corrupt dirs."""

    def __init__(self, corrupt: set[str]):
        self.corrupt, self.restored = corrupt, None

    def restore_from_path(self, path: str) -> None:
        if path.endswith(tuple(self.corrupt)):
            raise ValueError("truncated checkpoint")
        self.restored = path


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    paths = [tmp_path / f"iter_{i:04d}" for i in (3, 2, 1)]
    logged = []
    algo = _Loader({"iter_0003"})
    assert restore_newest_loadable(algo, paths, log=logged.append) == paths[1]
    assert algo.restored == str(paths[1])
    assert "iter_0003 does not load" in logged[0] and "WARNING" in logged[0]
    assert restore_newest_loadable(_Loader({"iter_0003", "iter_0002", "iter_0001"}), paths,
                                   log=logged.append) is None


def test_done_needs_the_same_fingerprint_and_enough_iterations(tmp_path):
    from rl_system.policy import _write_state

    cfg = load_config(None, [f"run.dir={tmp_path}", "policy.iterations=2"])
    policy_dir = cfg.stage_dir("policy")
    policy_dir.mkdir(parents=True)
    _write_state(policy_dir, cfg, lineage=_lineage_hash(cfg), iterations_done=1,
                 checkpoint="c1")
    assert not policy_is_done(cfg)
    _write_state(policy_dir, cfg, lineage=_lineage_hash(cfg), iterations_done=2,
                 checkpoint="c2")
    assert policy_is_done(cfg)
    assert policy_is_done(load_config(None, [f"run.dir={tmp_path}", "policy.iterations=2",
                                             "policy.num_env_runners=5"]))
    assert not policy_is_done(load_config(None, [f"run.dir={tmp_path}", "policy.iterations=2",
                                                 "policy.max_steps=3"]))
