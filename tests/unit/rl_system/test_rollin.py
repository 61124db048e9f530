"""Guided roll-in (rl_system.rollin): restart states, the mixture's learner-only loss, the
llm guide's distribution, and the config that selects them."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_system.actions import ACTION_NAMES, ACTIONS, STOP, depth_and_breadth
from rl_system.config import ConfigError, load_config
from rl_system.env import InstructionEvolutionEnv
from rl_system.reviewer import Reviewer
from rl_system.rollin import LLMGuide, learner_step_flags, mask_guide_steps
from rl_system.trpo.cg import masked_mean, surrogate_advantage
from serve.client import Usage

from .fakes import Scripted

SEEDS = ["Name three rivers in Africa.", "Explain what a hash table is."]
SCHEDULE = ["deepening", "add_constraints", "concretizing"]


def _env(*overrides: str) -> InstructionEvolutionEnv:
    cfg = load_config(None, ["policy.reward.diversity_weight=0", *overrides])
    env = InstructionEvolutionEnv({"run_config": cfg.to_portable_dict(), "seeds": SEEDS})
    env._instructor = Scripted("instructor")  # each rewrite appends " now": all distinct
    env._reviewer = Reviewer(Scripted("reviewer"), reward=env.cfg.policy.reward)
    return env


def _state(env):
    return (env.task, list(env.history), env.step_count, env.last_action)


def test_restart_states_are_the_states_the_guides_steps_reach_from_reset():
    restart = _env("policy.rollin.mode=restart", "policy.rollin.guide=schedule",
                   f"policy.rollin.schedule={SCHEDULE}", "policy.rollin.max_rollin_steps=3")
    lengths = set()
    for seed in range(12):
        obs, _ = restart.reset(seed=seed)
        n = restart.step_count
        lengths.add(n)
        plain = _env()
        plain_obs, _ = plain.reset(options={"instruction": restart.history[0].instruction})
        for name in SCHEDULE[:n]:
            plain.step(ACTION_NAMES.index(name))
        assert _state(restart) == _state(plain)
        np.testing.assert_array_equal(obs, plain._obs())
        # The hidden steps are paid and reported on the learner's first step.
        _, _, _, _, info = restart.step(STOP)
        assert info["rollin_steps"] == n
        assert (info["rollin_query_cost"] > 0) == (n > 0)
    assert lengths == {0, 1, 2, 3}, "lengths are drawn from 0..max_rollin_steps"


def test_learner_mode_is_todays_env():
    env, other = _env(), _env()
    for seed in range(4):
        env.reset(seed=seed)
        other.reset(seed=seed)
        assert env.step_count == 0 and _state(env) == _state(other)
        _, _, _, _, info = env.step(ACTION_NAMES.index("deepening"))
        assert info["guided"] == 0 and info["rollin_steps"] == 0


def test_mixture_roll_in_runs_the_guides_actions_and_flags_them():
    env = _env("policy.rollin.mode=mixture", "policy.rollin.guide=schedule",
               f"policy.rollin.schedule={SCHEDULE}", "policy.rollin.beta=1",
               "policy.rollin.max_rollin_steps=2", "policy.max_steps=5")
    learner_action = ACTION_NAMES.index("breadth")
    seen = set()
    for seed in range(10):
        env.reset(seed=seed)
        rollin = env._rollin_left
        seen.add(rollin)
        for t in range(4):
            _, _, _, _, info = env.step(learner_action)
            guided = t < rollin  # beta = 1: every roll-in step is the guide's
            assert info["guided"] == float(guided)
            assert info["action"] == (ACTION_NAMES.index(SCHEDULE[t]) if guided
                                      else learner_action)
    assert seen == {0, 1, 2}


def test_mixture_loss_and_gradient_count_learner_steps_only():
    """The TRPO surrogate (and PPO's masked mean) over the batch with guide steps masked
    equals the same loss on the learner's steps alone, value and gradient."""
    torch.manual_seed(0)
    policy = torch.nn.Linear(4, len(ACTIONS))
    obs = torch.randn(7, 4)
    actions = torch.randint(len(ACTIONS), (7,))
    advantages = torch.randn(7)
    # RLlib's infos: the reset info, then one per step; the last row is its bootstrap slot.
    guided = [0, 1, 1, 0, 0, 1]
    infos = [{}] + [{"guided": float(g)} for g in guided]
    mask = torch.tensor(mask_guide_steps([True] * 6 + [False], infos))
    assert learner_step_flags(infos, 6) == [not g for g in guided]

    def loss(rows):
        logp = torch.distributions.Categorical(logits=policy(obs[rows])).log_prob(actions[rows])
        return -surrogate_advantage(logp, logp.detach(), advantages[rows])

    everything = torch.arange(7)
    masked = masked_mean(loss(everything), mask)
    g_masked = torch.autograd.grad(masked, list(policy.parameters()))
    learner_rows = torch.tensor([t for t, g in enumerate(guided) if not g])
    alone = loss(learner_rows).mean()
    g_alone = torch.autograd.grad(alone, list(policy.parameters()))
    assert torch.allclose(masked, alone)
    for a, b in zip(g_masked, g_alone, strict=True):
        assert torch.allclose(a, b)
    unmasked = masked_mean(loss(everything), torch.tensor([True] * 6 + [False]))
    assert not torch.allclose(unmasked, alone), "the guide steps do change an unmasked loss"


class FixedLogprobs:
    """An instructor double whose score answers fixed log-probs (one per candidate)."""

    role = "instructor"

    def __init__(self, logprobs):
        self.logprobs = list(logprobs)
        self.usage = Usage()
        self.prompts: list = []

    def score_many(self, items, return_exceptions=False):
        self.usage.queries += len(items)
        self.prompts += [prompt for prompt, _ in items]
        return [self.logprobs[: len(candidates)] for _, candidates in items]


def test_llm_guide_distribution_sums_to_one_and_follows_the_label_logprobs():
    logprobs = [-0.5, -2.0, -1.0, -4.0, -0.1, -3.0]
    client = FixedLogprobs(logprobs)
    guide = LLMGuide(client, model="m")
    probs = guide.distribution("Explain what a hash table is.")
    assert math.isclose(probs.sum(), 1.0)
    offered = [ACTIONS.index(a) for a in depth_and_breadth()]
    softmax = np.exp(logprobs) / np.exp(logprobs).sum()
    np.testing.assert_allclose(probs[offered], softmax)
    assert probs[STOP] == 0.0
    assert int(np.argmax(probs)) == offered[int(np.argmax(logprobs))]
    prompt = client.prompts[0]
    assert all(f"- {a.name}:" in prompt for a in depth_and_breadth())
    assert "<<<Explain what a hash table is.>>>" in prompt


def test_llm_guide_is_cached_and_counted():
    client = FixedLogprobs([0.0] * 6)
    guide = LLMGuide(client, model="m")
    for _ in range(3):
        guide.distribution("Name three rivers in Africa.")
    guide.distribution("Explain what a hash table is.")
    assert client.usage.queries == 2, "the same request is paid once"
    assert guide.queries == 4, "every request counts, paid or cached"


def test_the_envs_llm_guide_queries_are_reported_as_stage_one_cost():
    env = _env("policy.rollin.mode=mixture", "policy.rollin.guide=llm", "policy.rollin.beta=1",
               "policy.rollin.max_rollin_steps=1")
    env._instructor = client = FixedLogprobs([0.0, -9, -9, -9, -9, -9])
    env._instructor.generate = Scripted("instructor").generate  # the rewrites
    while True:
        env.reset()
        if env._rollin_left:
            break
    _, _, _, _, info = env.step(STOP)
    assert info["guided"] == 1.0 and info["guide_queries"] == 1.0
    assert info["action"] == ACTION_NAMES.index("add_constraints")  # P ~ 1 by its logprob
    assert client.usage.queries >= 1


@pytest.mark.parametrize(("overrides", "field"), [
    (["policy.rollin.mode=restart", "policy.rollin.guide=checkpoint"],
     "policy.rollin.checkpoint"),
    (["policy.rollin.mode=mixture", "policy.rollin.guide=schedule"], "policy.rollin.schedule"),
    (["policy.rollin.schedule=[deepen]"], "policy.rollin.schedule"),
    (["policy.rollin.mode=restart", "policy.rollin.max_rollin_steps=6", "policy.max_steps=6"],
     "policy.rollin.max_rollin_steps"),
    (["policy.rollin.mode=sometimes"], "policy.rollin.mode"),
])
def test_rollin_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_no_rollin_leaves_the_policy_fingerprint_as_before():
    from rl_system.policy import _lineage_hash

    base = load_config(None, [])
    assert _lineage_hash(base) == _lineage_hash(load_config(None, ["policy.rollin.beta=0.9"]))
    assert _lineage_hash(base) != _lineage_hash(load_config(None, [
        "policy.rollin.mode=restart", "policy.rollin.guide=wizardlm"]))


class AlternatingGuideEnv(gym.Env):
    """5-step episodes whose odd steps say they were the guide's (``info["guided"]``)."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, config=None):
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([self.t / 5, 0.0], np.float32)
        return obs, 1.0, self.t >= 5, False, {"guided": float(self.t % 2 == 1)}


@pytest.mark.parametrize("algorithm", ["trpo", "ppo"])
def test_the_learner_pipeline_clears_the_loss_mask_of_guide_steps(algorithm):
    """The connector sits in TRPO's and PPO's real learner pipelines (no Ray cluster) and
    leaves exactly the learner's steps in the loss mask the losses average over."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from rl_system.rollin import mask_guide_steps_connector
    from rl_system.trpo import TRPOConfig

    config = ((TRPOConfig() if algorithm == "trpo" else PPOConfig())
              .environment(AlternatingGuideEnv).env_runners(num_env_runners=0)
              .training(train_batch_size_per_learner=20)
              .learners(learner_connector=mask_guide_steps_connector())
              .rl_module(model_config={"fcnet_hiddens": [8]}))
    env_runner = SingleAgentEnvRunner(config=config)
    spaces = (env_runner.env.single_observation_space, env_runner.env.single_action_space)
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: spaces})
    episodes = env_runner.sample(num_episodes=3)
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes,
                                       shared_data={}, metrics=learner.metrics)
    mask = batch[DEFAULT_MODULE_ID][Columns.LOSS_MASK].tolist()
    # Per episode: 5 steps (guide, learner, guide, learner, guide) + RLlib's bootstrap slot.
    assert mask == [False, True, False, True, False, False] * 3
    env_runner.stop()


def test_every_guide_the_config_accepts_is_in_the_catalogue_and_back():
    import typing

    from rl_system.config import RollinConfig
    from rl_system.rollin import GUIDES

    accepted = typing.get_args(RollinConfig.model_fields["guide"].annotation)
    assert set(accepted) == set(GUIDES)
