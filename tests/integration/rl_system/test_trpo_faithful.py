"""TRPO's faithful mode (one episode per update, as the paper's code) on a real RLlib run."""

from __future__ import annotations

from tests.unit.rl_system.trpo.test_trpo_learner import _trpo_config


def test_faithful_mode_updates_from_exactly_one_episode(ray_session):
    config = _trpo_config("CartPole-v1", faithful_single_episode_batch=True)
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
            env_runners = result["env_runners"]
            assert env_runners["num_episodes"] == 1
            assert env_runners["num_env_steps_sampled"] == env_runners["episode_len_mean"]
            trained = result["learners"]["default_policy"]["num_module_steps_trained"]
            assert trained == env_runners["num_env_steps_sampled"] + 1  # + bootstrap ts
    finally:
        algo.stop()
