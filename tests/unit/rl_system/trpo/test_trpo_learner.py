"""TRPOConfig validation and the TRPO Learner's trust region on real gymnasium envs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

MAX_KL = 0.01
NUM_UPDATES = 4
BATCH_STEPS = 400
# Smaller than RLlib's default [256, 256]: the trust-region logic is the same and
# the tests stay fast on a 2-core machine.
HIDDEN = [64, 64]


def _value(stat):
    return stat.peek() if hasattr(stat, "peek") else stat


def _trpo_config(env: str, **training):
    from rl_system.trpo import TRPOConfig

    return (
        TRPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0)
        .training(train_batch_size_per_learner=BATCH_STEPS, **training)
        .rl_module(model_config={"fcnet_hiddens": HIDDEN})
        .debugging(seed=0)
    )


def _learner_and_env_runner(config):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    env_runner = SingleAgentEnvRunner(config=config)
    spaces = (env_runner.env.single_observation_space, env_runner.env.single_action_space)
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: spaces})
    return learner, env_runner


def _sync_weights(learner, env_runner) -> None:
    from ray.rllib.core import COMPONENT_RL_MODULE

    state = learner.get_state(components=COMPONENT_RL_MODULE)[COMPONENT_RL_MODULE]
    env_runner.set_state({COMPONENT_RL_MODULE: state})


def _action_dist(module, obs: torch.Tensor):
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        inputs = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    return module.get_train_action_dist_cls().from_logits(inputs)


def test_defaults_follow_the_paper_code():
    from rl_system.trpo import TRPOConfig

    config = TRPOConfig()
    assert (config.gamma, config.lambda_, config.max_kl, config.damping) == (
        0.995,
        0.97,
        0.01,
        0.1,
    )
    assert config.faithful_single_episode_batch is False


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"max_kl": 0.0}, r"`max_kl` \(0.0\) must be > 0"),
        ({"damping": -1.0}, r"`damping`"),
        ({"cg_iters": 0}, r"config.training\(cg_iters=10\)"),
        ({"line_search_backtrack": 1.0}, r"`line_search_backtrack` \(1.0\) must be in"),
        ({"line_search_accept_ratio": -0.1}, r"`line_search_accept_ratio`"),
        ({"vf_lr": 0.0}, r"`vf_lr`"),
        ({"vf_minibatch_size": 0}, r"`vf_minibatch_size`"),
        ({"lambda_": 1.5}, r"`lambda_`"),
    ],
)
def test_validate_names_the_field_and_the_fix(training, message):
    config = _trpo_config("CartPole-v1", **training)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_validate_rejects_value_layers_shared_with_the_policy():
    config = _trpo_config("CartPole-v1").rl_module(model_config={"vf_share_layers": True})
    with pytest.raises(ValueError, match="vf_share_layers"):
        config.validate()


def test_learner_refuses_a_module_whose_policy_and_value_share_parameters():
    config = (
        _trpo_config("CartPole-v1")
        .rl_module(model_config={"fcnet_hiddens": HIDDEN, "vf_share_layers": True})
        .experimental(_validate_config=False)
    )
    learner, env_runner = _learner_and_env_runner(config)
    episodes = env_runner.sample(num_timesteps=50)
    with pytest.raises(ValueError, match="feed both the action distribution and the value"):
        learner.update(episodes=episodes)


@pytest.mark.parametrize(
    ("env", "dist_name"),
    [("CartPole-v1", "TorchCategorical"), ("Pendulum-v1", "TorchDiagGaussian")],
)
def test_every_update_stays_inside_the_trust_region(env, dist_name):
    from ray.rllib.core import DEFAULT_MODULE_ID

    learner, env_runner = _learner_and_env_runner(_trpo_config(env, max_kl=MAX_KL))
    module = learner.module[DEFAULT_MODULE_ID]
    assert module.get_train_action_dist_cls().__name__ == dist_name

    accepted = 0
    for _ in range(NUM_UPDATES):
        _sync_weights(learner, env_runner)
        episodes = env_runner.sample(num_timesteps=BATCH_STEPS)
        # Observations the actions were taken in (the last one of each chunk has none).
        obs = torch.from_numpy(np.concatenate([ep.get_observations()[:-1] for ep in episodes]))
        old_dist = _action_dist(module, obs)
        value_params_before = [p.detach().clone() for p in module.vf.parameters()]

        results = learner.update(episodes=episodes)[DEFAULT_MODULE_ID]

        measured_kl = old_dist.kl(_action_dist(module, obs)).mean().item()
        assert measured_kl <= 1.5 * MAX_KL
        # The value regression after the policy step left the policy where the step
        # put it, and the learner reports the KL it actually took.
        assert measured_kl == pytest.approx(_value(results["mean_kl"]), rel=1e-3, abs=1e-7)
        assert any(
            not torch.equal(before, after)
            for before, after in zip(value_params_before, module.vf.parameters(), strict=True)
        )
        if _value(results["line_search_accepted"]):
            accepted += 1
            assert measured_kl > 0
            assert _value(results["surrogate_improvement"]) > 0
        for key in ("vf_loss", "entropy", "line_search_steps", "policy_loss"):
            assert np.isfinite(_value(results[key])), key

    # The bound must hold for steps actually taken, not only for rejected ones.
    assert accepted >= NUM_UPDATES - 1
