"""Environment mechanics that need no model: spaces, observations, stop, truncation."""

import gymnasium as gym
import numpy as np

from rl_system.actions import ACTIONS, STOP
from rl_system.config import load_config
from rl_system.env import InstructionEvolutionEnv

SEEDS = ["Name three rivers in Africa.", "Explain what a hash table is."]


def _env(*overrides: str) -> InstructionEvolutionEnv:
    cfg = load_config(None, list(overrides))
    return InstructionEvolutionEnv(
        {"run_config": cfg.to_portable_dict(), "seed_instructions": SEEDS}
    )


def test_action_history_observation_is_the_papers_one_hot_and_step_fraction():
    env = _env("policy.max_steps=6")
    assert env.action_space == gym.spaces.Discrete(len(ACTIONS))
    obs, _ = env.reset(seed=3)
    assert env.instruction in SEEDS
    assert obs.shape == (len(ACTIONS) + 2,)
    assert obs[len(ACTIONS)] == 1.0 and obs[-1] == 0.0  # "no action yet", step 0


def test_stop_ends_the_episode_without_a_query():
    env = _env()
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(STOP)
    assert terminated and not truncated and reward == 0.0
    assert info["queried"] == 0.0
    assert env._reviewer is None  # no model client was even built
    assert obs[STOP] == 1.0


def test_continuous_actions_are_decoded_by_arg_max():
    env = _env("policy.action_space=continuous")
    assert isinstance(env.action_space, gym.spaces.Box)
    scores = np.full(len(ACTIONS), -1.0, dtype=np.float32)
    scores[STOP] = 0.5
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(scores)
    assert terminated and info["action"] == STOP


def test_seed_order_differs_between_env_copies():
    cfg = load_config(None).to_portable_dict()

    class Context(dict):
        worker_index = 0
        vector_index = 0

    picks = []
    for worker in (1, 2):
        ctx = Context(run_config=cfg, seed_instructions=[f"instruction {i}" for i in range(50)])
        ctx.worker_index = worker
        env = InstructionEvolutionEnv(ctx)
        picks.append([env.reset()[0] is not None and env.instruction for _ in range(5)])
    assert picks[0] != picks[1]
