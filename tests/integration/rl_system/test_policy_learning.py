"""Stage 1 learns: one action always adds information, the others never do.

Applied twice, the informative rewrite repeats its sentence and the ``repetitive`` rule
drops it, and a dropped evolution earns only the penalty; so the best episode is that
action then ``stop``, and the test follows its share among the evolution actions.

The instructor and reviewer are the scripted backend (a deterministic test double,
only for this algorithm test) served through Serve, reached by the real env and client.
"""

from __future__ import annotations

import pytest

from rl_system.policy import IterationSummary, algorithm_config, load_seed_instructions

pytestmark = pytest.mark.slow

GOOD_ACTION = "increase_reasoning_steps"
MAX_ITERATIONS = 25
TARGET_SHARE = 0.9


# Only the reasoning-steps request adds anything; every other rewrite echoes.
SCRIPT = {
    "rules": [{"contains": "several explicit steps", "reply": "{instruction} Show each step."}],
    "default": "{instruction}",
    "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
}


@pytest.fixture(scope="module")
def scripted_cfg(scripted_roles, tmp_path_factory):
    with scripted_roles(
        "learning", SCRIPT, "serve.batch_wait_timeout_s=0",
        "policy.num_env_runners=2", "policy.train_batch_size=120", "policy.max_kl=0.05",
        "dataset.num_seeds=30", f"run.dir={tmp_path_factory.mktemp('runs')}",
    ) as cfg:
        yield cfg


@pytest.mark.parametrize("algorithm", ["trpo", "ppo"])
def test_policy_learns_the_informative_action(scripted_cfg, algorithm):
    cfg = scripted_cfg.model_copy(deep=True)
    cfg.policy.algorithm = algorithm
    algo = algorithm_config(cfg, load_seed_instructions(cfg)).build_algo()
    curve = []
    try:
        for iteration in range(1, MAX_ITERATIONS + 1):
            summary = IterationSummary.from_result(iteration, algo.train(), 0.0)
            shares = {a: v for a, v in summary.action_share.items() if a != "stop"}
            curve.append(round(shares[GOOD_ACTION] / max(sum(shares.values()), 1e-9), 3))
            if curve[-1] >= TARGET_SHARE:
                break
    finally:
        algo.stop()
    print(f"{algorithm} share of {GOOD_ACTION} among evolutions per iteration: {curve}")
    assert curve[0] < 0.5, "starts near uniform (1/6), not already trained"
    assert curve[-1] >= TARGET_SHARE, curve
