"""Environment mechanics: spaces, observations, stop, terminal states, failures, inputs."""

import gymnasium as gym
import numpy as np
import pytest

from rl_system.actions import ACTIONS, STOP, action_by_name
from rl_system.config import load_config
from rl_system.env import INFO_KEYS, InstructionEvolutionEnv
from rl_system.reviewer import REVIEW_SCORES, Reviewer
from rl_system.seeds import Seed

from .fakes import Scripted, rejected, transient

SEEDS = ["Name three rivers in Africa.", "Explain what a hash table is."]
DEEPEN = ACTIONS.index(action_by_name("deepening"))
BREADTH = ACTIONS.index(action_by_name("breadth"))


def _env(*overrides: str, seeds=SEEDS) -> InstructionEvolutionEnv:
    cfg = load_config(None, list(overrides))
    return InstructionEvolutionEnv({"run_config": cfg.to_portable_dict(), "seeds": seeds})


def _scripted_env(*overrides, reply=None, seeds=SEEDS):
    env = _env("policy.reward.diversity_weight=0", *overrides, seeds=seeds)
    env._instructor = Scripted("instructor", reply)
    env._reviewer = Reviewer(Scripted("reviewer"), reward=env.cfg.policy.reward)
    return env


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


def test_continuous_actions_are_decoded_by_arg_max_of_unclipped_scores():
    env = _env("policy.action_space=continuous")
    assert isinstance(env.action_space, gym.spaces.Box)
    assert not env.action_space.bounded_above.any()  # nothing clips the scores
    scores = np.full(len(ACTIONS), 2.0, dtype=np.float32)
    scores[STOP] = 5.0  # both above the old Box(-1, 1) bound: no tie at 1.0 any more
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(scores)
    assert terminated and info["action"] == STOP


def test_reaching_max_steps_is_terminated_not_truncated():
    """The step count is in the observation, so the last step is a true terminal state
    (GAE must not bootstrap from a state the policy never acts in)."""
    env = _scripted_env("policy.max_steps=2")
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(DEEPEN)
    assert not terminated and not truncated and info["queried"] == 1.0
    _, _, terminated, truncated, _ = env.step(DEEPEN)
    assert terminated and not truncated


def test_a_transient_failure_ends_the_episode_unlearned():
    env = _scripted_env("policy.max_steps=4", reply=lambda text: transient())
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(DEEPEN)
    assert truncated and not terminated and reward == 0.0
    assert info["failed"] == 1.0 and info["infra_failure"] == 1.0


def test_a_rejected_request_is_a_penalised_failed_evolution():
    env = _scripted_env("policy.max_steps=4", "policy.reward.failure_penalty=0.3",
                        reply=lambda text: rejected())
    env.reset(seed=0)
    before = env.instruction
    _, reward, terminated, truncated, info = env.step(DEEPEN)
    assert not terminated and not truncated and reward == pytest.approx(-0.3)
    assert info["failed"] == 1.0 and info["infra_failure"] == 0.0
    assert env.instruction == before


def test_info_carries_every_numeric_review_field():
    env = _scripted_env()
    env.reset(seed=0)
    _, reward, _, _, info = env.step(DEEPEN)
    assert set(INFO_KEYS) >= set(REVIEW_SCORES) and set(info) == {*INFO_KEYS, "action"}
    assert info["reward"] == pytest.approx(reward) and info["info_gain"] > 0.5


def test_episodes_carry_the_seed_input_and_breadth_drops_it():
    memo = "Memo: the launch moved from May 3 to May 17."
    env = _scripted_env("policy.max_steps=4",
                        seeds=[Seed(id="m", instruction="Summarise the memo.", input=memo)])
    env.reset(seed=0)
    assert env.task.input == memo
    env.step(DEEPEN)
    assert memo in env._instructor.requests[-1]  # the rewrite request shows the input
    assert all(memo in p for p in env._reviewer.client.scored)  # and so do the verdicts
    assert env.instruction == "Summarise the memo. now" and env.task.input == memo
    env.step(BREADTH)
    assert memo in env._instructor.requests[-1] and env.task.input == ""


def test_env_config_takes_seed_dicts_and_plain_instructions():
    for seeds in (SEEDS, [{"instruction": s, "input": None} for s in SEEDS]):
        env = _env(seeds=seeds)
        env.reset(seed=1)
        assert env.instruction in SEEDS and env.task.input == ""
    cfg = load_config(None).to_portable_dict()
    legacy = InstructionEvolutionEnv({"run_config": cfg, "seed_instructions": SEEDS})
    assert [t.instruction for t in legacy.seeds] == SEEDS


def test_seed_order_differs_between_env_copies():
    cfg = load_config(None).to_portable_dict()

    class Context(dict):
        worker_index = 0
        vector_index = 0

    picks = []
    for worker in (1, 2):
        ctx = Context(run_config=cfg, seeds=[f"instruction {i}" for i in range(50)])
        ctx.worker_index = worker
        env = InstructionEvolutionEnv(ctx)
        picks.append([env.reset()[0] is not None and env.instruction for _ in range(5)])
    assert picks[0] != picks[1]


def test_train_policy_gives_the_env_whole_seeds(tmp_path):
    import json

    from rl_system.policy import algorithm_config, load_policy_seeds

    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps({"instruction": "Summarise the memo.", "input": "Memo."}) + "\n"
                    + json.dumps({"instruction": "Name a bird."}) + "\n")
    cfg = load_config(None, [f"dataset.seeds={path}"])
    seeds = load_policy_seeds(cfg)
    env_config = algorithm_config(cfg, seeds).env_config
    assert env_config["seeds"] == [{"instruction": "Summarise the memo.", "input": "Memo."},
                                   {"instruction": "Name a bird.", "input": ""}]
    env = InstructionEvolutionEnv(env_config)
    assert [t.input for t in env.seeds] == ["Memo.", ""]
