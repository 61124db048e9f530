"""One evolution step for both stages: the env (stage 1) and stage 2's episode agree."""

from __future__ import annotations

import numpy as np
import pytest

from rl_system.actions import ACTIONS, action_by_name
from rl_system.config import load_config
from rl_system.dataset import CachedRole, RequestCache, run_episode
from rl_system.env import InstructionEvolutionEnv
from rl_system.evolution import evolve
from rl_system.reviewer import Reviewer
from rl_system.seeds import Seed
from rl_system.strategies import UniformChooser
from rl_system.tasks import Task

from .fakes import Scripted, rejected, transient

SEED = "Explain why the sky is blue."
MEMO = "Memo: the launch moved from May 3 to May 17."


def _env(instructor, reviewer_client, *overrides):
    cfg = load_config(None, ["policy.reward.diversity_weight=0", *overrides])
    env = InstructionEvolutionEnv({"run_config": cfg.to_portable_dict(),
                                   "seed_instructions": [SEED]})
    env._instructor = instructor
    env._reviewer = Reviewer(reviewer_client, reward=cfg.policy.reward)
    env.reset(seed=0)
    return env


def _stage2(tmp_path, expert, reviewer_client, rounds=1):
    cfg = load_config(None, ["policy.reward.diversity_weight=0"])
    cache = RequestCache(tmp_path / "cache")
    return run_episode(
        Seed(id="s", instruction=SEED), chooser=UniformChooser((0,)), rounds=rounds,
        expert=CachedRole(expert, cache, model="m"),
        reviewer=Reviewer(CachedRole(reviewer_client, cache, model="r"),
                          reward=cfg.policy.reward),
        rng=np.random.default_rng(0),
    )


def _outcomes(tmp_path, reply):
    env = _env(Scripted("instructor", reply), Scripted("reviewer"))
    _, _, _, _, info = env.step(0)
    result = _stage2(tmp_path, Scripted("expert", reply), Scripted("reviewer"))
    env_outcome = ("failed" if info["failed"] else
                   "eliminated" if info["eliminated"] else "kept")
    stage2_outcome = ("failed" if result.counts["evolutions_failed"] or result.incomplete else
                      "eliminated" if any(k.startswith("eliminated/") for k in result.counts)
                      else "kept")
    return env_outcome, stage2_outcome


def test_an_empty_rewrite_is_the_same_outcome_in_the_env_and_in_stage_2(tmp_path):
    """The two copies of the step disagreed: the env reviewed an empty rewrite (and the
    rules eliminated it), stage 2 counted it a failed evolution without a review."""
    env_outcome, stage2_outcome = _outcomes(tmp_path, lambda text: "")
    assert env_outcome == stage2_outcome == "eliminated"


@pytest.mark.parametrize(("reply", "expected"), [
    (lambda text: "Explain why the sky is blue, for a child of six.", "kept"),
    (lambda text: "Explain why the sky is blue.", "eliminated"),  # no information gain
    (lambda text: "The new instruction asks why the sky is blue at noon.", "eliminated"),
    (lambda text: rejected(), "failed"),
])
def test_both_stages_share_every_outcome(tmp_path, reply, expected):
    assert _outcomes(tmp_path, reply) == (expected, expected)


def _reviewer():
    return Reviewer(Scripted("reviewer"), reward=load_config(None).policy.reward)


def test_evolve_keeps_the_input_unless_the_action_replaces_the_task():
    task = Task("Summarise the memo.", MEMO)
    rewriter = Scripted("expert")
    kept = evolve(task, action_by_name("deepening"), rewriter=rewriter, reviewer=_reviewer())
    assert kept.outcome == "kept" and kept.task == Task("Summarise the memo. now", MEMO)
    assert MEMO in rewriter.requests[-1] and kept.queries == 1 and kept.tokens == 5
    new = evolve(task, action_by_name("breadth"), rewriter=rewriter, reviewer=_reviewer())
    assert MEMO in rewriter.requests[-1]  # shown for context...
    assert new.task == Task("Summarise the memo. now", "")  # ...and dropped from the new task


def test_evolve_tells_a_rejected_request_from_an_outage():
    task, action = Task(SEED), ACTIONS[0]
    down = evolve(task, action, rewriter=Scripted("expert", lambda t: transient("expert")),
                  reviewer=_reviewer())
    assert down.outcome == "infra_failure" and down.task == task and down.review is None
    assert down.failure == "expert: 503 overloaded"
    bad = evolve(task, action, rewriter=Scripted("expert", lambda t: rejected("expert")),
                 reviewer=_reviewer())
    assert bad.outcome == "failed" and bad.failure.startswith("expert: 400")

    class DownReviewer:
        def review(self, *a, **k):
            raise transient("reviewer")

    mid = evolve(task, action, rewriter=Scripted("expert"), reviewer=DownReviewer())
    assert mid.outcome == "infra_failure" and mid.rewrite is not None
    assert mid.failure.startswith("reviewer: ")
    with pytest.raises(ValueError, match="stop"):
        evolve(task, action_by_name("stop"), rewriter=Scripted("expert"), reviewer=_reviewer())


def test_one_module_and_one_observation_give_one_action_in_training_and_stage_2(tmp_path):
    """``continuous``: RLlib's env runner (what training does) and stage 2's
    ``PolicyChooser`` decode the same module output to the same action. With the old
    ``Box(-1, 1)`` the runner clipped every score above 1 to a tie at 1.0 and the env's
    arg-max fell to index 0, while stage 2 took the arg-max of the unclipped scores."""
    import torch
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from rl_system.actions import STOP
    from rl_system.policy import algorithm_config
    from rl_system.strategies import MODULE_SUBDIR, PolicyChooser

    cfg = load_config(None, ["policy.action_space=continuous", "policy.num_env_runners=0",
                             "dataset.policy_sampling=greedy"])
    runner = SingleAgentEnvRunner(config=algorithm_config(cfg, [SEED]))
    try:
        module = runner.module
        head = [m for m in module.pi.modules() if isinstance(m, torch.nn.Linear)][-1]
        means = torch.tensor([2.0, 1.5, 1.2, 1.1, 3.0, 1.3, 4.0])  # all above 1, stop highest
        assert head.out_features == 2 * len(ACTIONS) and means.argmax() == STOP
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.cat([means, torch.full((len(ACTIONS),), -1.0)]))
        episodes = runner.sample(num_timesteps=1, explore=False)
        trained = [i for i in episodes[0].get_infos() if "action" in i][0]["action"]
        module.save_to_path(str(tmp_path / MODULE_SUBDIR))
    finally:
        runner.stop()
    chosen = PolicyChooser(cfg, tmp_path).choose(
        instruction=SEED, last_action=None, step=0, rng=np.random.default_rng(0))
    assert trained == chosen == STOP
