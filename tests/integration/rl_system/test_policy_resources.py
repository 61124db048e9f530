"""A policy config the cluster can never place fails with a message, not a hang."""

import pytest

from rl_system.config import load_config
from rl_system.policy import InsufficientResources, train_policy


def test_too_many_env_runners_is_a_clear_error(ray_session, tmp_path):
    cfg = load_config(None, ["policy.num_env_runners=1000", f"run.dir={tmp_path}"])
    with pytest.raises(InsufficientResources, match="policy.num_env_runners=1000 needs 500 CPUs"):
        train_policy(cfg)
