"""TRPO and RLlib's PPO, both with 2 env runners, learn a one-good-action toy env.

The env is a stand-in for the instruction-evolution env: of 7 evolution actions only
one ever adds information (reward 1), the others never do (reward 0); episodes last 6
steps. Both algorithms train the same default actor-critic RLModule.

    .venv/bin/python -m pytest tests/integration/rl_system/test_trpo_learning.py -s

prints the per-iteration fraction of sampled steps that took the good action, for
both algorithms.
"""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import pytest

NUM_ACTIONS = 7
GOOD_ACTION = 4
MAX_STEPS = 6
TARGET_FRACTION = 0.9
MAX_ITERATIONS = 40
BATCH_STEPS = 240  # 40 episodes per update, 20 from each env runner

pytestmark = pytest.mark.slow


class OneGoodActionEnv(gym.Env):
    """7 actions, one of which is rewarded; 6-step episodes.

    Observation: one-hot of the last action (zeros at the start) plus the fraction of
    the episode done, like the `action_history` encoder.
    """

    def __init__(self, config: dict | None = None):
        self.observation_space = gym.spaces.Box(0.0, 1.0, (NUM_ACTIONS + 1,), np.float32)
        self.action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self._step = 0
        self._last_action: int | None = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._step, self._last_action = 0, None
        return self._observation(), {}

    def step(self, action):
        self._step += 1
        self._last_action = int(action)
        reward = 1.0 if self._last_action == GOOD_ACTION else 0.0
        return self._observation(), reward, self._step >= MAX_STEPS, False, {}

    def _observation(self) -> np.ndarray:
        obs = np.zeros(NUM_ACTIONS + 1, np.float32)
        if self._last_action is not None:
            obs[self._last_action] = 1.0
        obs[-1] = self._step / MAX_STEPS
        return obs


def count_good_actions(*, metrics_logger, samples, **kwargs) -> None:
    """`on_sample_end` callback: good and total actions in this sample call."""
    actions = np.concatenate([np.asarray(episode.get_actions()) for episode in samples])
    metrics_logger.log_value("good_actions", int((actions == GOOD_ACTION).sum()), reduce="sum")
    metrics_logger.log_value("actions", len(actions), reduce="sum")


@pytest.fixture(scope="module")
def env_classes_by_value(ray_session):
    """Env runners cannot import this test module, so ship its classes by value."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def _configure(config):
    return (
        config.environment(OneGoodActionEnv)
        # Half a CPU each: the session's Ray cluster is shared with Serve test apps.
        .env_runners(num_env_runners=2, num_cpus_per_env_runner=0.5, sample_timeout_s=60.0)
        .callbacks(on_sample_end=count_good_actions)
        .debugging(seed=0)
    )


def _learning_curve(config) -> list[float]:
    """Fraction of good actions sampled per iteration, until TARGET_FRACTION."""
    algo = config.build_algo()
    curve = []
    try:
        for _ in range(MAX_ITERATIONS):
            env_runner_results = algo.train()["env_runners"]
            curve.append(env_runner_results["good_actions"] / env_runner_results["actions"])
            if curve[-1] >= TARGET_FRACTION:
                break
    finally:
        algo.stop()
    return curve


def _report(name: str, curve: list[float]) -> None:
    print(f"\n{name} fraction of good action per iteration: " + " ".join(f"{f:.2f}" for f in curve))


def test_trpo_learns_the_one_good_action(env_classes_by_value):
    from rl_system.trpo import TRPOConfig

    config = _configure(TRPOConfig()).training(
        train_batch_size_per_learner=BATCH_STEPS, max_kl=0.01
    )
    curve = _learning_curve(config)
    _report("TRPO", curve)

    assert curve[0] < 0.5, "the untrained policy should be near uniform (1/7)"
    assert curve[-1] >= TARGET_FRACTION, f"TRPO did not reach {TARGET_FRACTION}: {curve}"


def test_ppo_learns_the_one_good_action_too(env_classes_by_value):
    from ray.rllib.algorithms.ppo import PPOConfig

    config = _configure(PPOConfig()).training(
        train_batch_size_per_learner=BATCH_STEPS,
        minibatch_size=60,
        num_epochs=6,
        lr=1e-3,
    )
    curve = _learning_curve(config)
    _report("PPO", curve)

    assert curve[0] < 0.5, "the untrained policy should be near uniform (1/7)"
    assert curve[-1] >= TARGET_FRACTION, f"PPO did not reach {TARGET_FRACTION}: {curve}"
