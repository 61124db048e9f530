"""Does stage 1 learn on the demo models? The trained policy against uniform random actions.

    .venv/bin/python bench/policy_learning.py [--iterations 8] [--episodes 24] [--set KEY=VALUE]

Trains the stage-1 policy on ``configs/demo.yaml`` (the embedded SmolLM2 as instructor and
reviewer, the demo's reward) for ``--iterations`` iterations, then plays ``--episodes``
episodes with the trained policy (sampling, as stage 2 does) and as many with uniform
random actions (every catalogue action, ``stop`` included), from the same seeds and under
the same reward, in the same run. Per arm: mean reward per model query, the kept-evolution
rate and the action shares, each with a bootstrap 95% CI over episodes; per training
iteration: return, info_gain, elimination rate and action shares. Prints one JSON line.
Tens of minutes on a 2-core CPU; the figures are reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def ratio_ci(numerators, denominators, *, rng) -> dict:
    """sum(num) / sum(den) with a bootstrap 95% CI over episodes (resampled together)."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    if den.sum() == 0:
        return {"mean": None, "ci95": None}
    idx = rng.integers(len(num), size=(BOOTSTRAP_SAMPLES, len(num)))
    boot = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    return {"mean": round(float(num.sum() / den.sum()), 4),
            "ci95": [round(float(q), 4) for q in np.quantile(boot, [0.025, 0.975])]}


def diff_ci(a: tuple, b: tuple, *, rng) -> dict:
    """Difference of two ratios of sums (arm a minus arm b), bootstrap 95% CI."""
    (an, ad), (bn, bd) = [(np.asarray(n, float), np.asarray(d, float)) for n, d in (a, b)]
    ia = rng.integers(len(an), size=(BOOTSTRAP_SAMPLES, len(an)))
    ib = rng.integers(len(bn), size=(BOOTSTRAP_SAMPLES, len(bn)))
    boot = an[ia].sum(1) / np.maximum(ad[ia].sum(1), 1e-12) - bn[ib].sum(1) / np.maximum(
        bd[ib].sum(1), 1e-12)
    point = an.sum() / max(ad.sum(), 1e-12) - bn.sum() / max(bd.sum(), 1e-12)
    return {"mean": round(float(point), 4),
            "ci95": [round(float(q), 4) for q in np.quantile(boot, [0.025, 0.975])]}


def play(env, choose, *, episodes: int, rng) -> list[dict]:
    """``episodes`` episodes; episode i starts from the seed ``env.reset(seed=i)`` picks."""
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        ret, queries, kept, evolved, actions = 0.0, 0.0, 0, 0, []
        done = False
        while not done:
            action = choose(env, rng)
            obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            ret += reward
            queries += info["query_cost"]
            actions.append(int(info["action"]))
            if info["queried"] and not info["failed"]:
                evolved += 1
                kept += int(not info["eliminated"])
        out.append({"return": ret, "queries": queries, "kept": kept, "evolved": evolved,
                    "actions": actions})
    return out


def summarise(name: str, episodes: list[dict], action_names, *, rng) -> dict:
    steps = [len(e["actions"]) for e in episodes]
    shares = {}
    for index, action in enumerate(action_names):
        counts = [sum(a == index for a in e["actions"]) for e in episodes]
        shares[action] = ratio_ci(counts, steps, rng=rng)
    return {
        "arm": name,
        "episodes": len(episodes),
        "reward_per_query": ratio_ci([e["return"] for e in episodes],
                                     [e["queries"] for e in episodes], rng=rng),
        "kept_rate": ratio_ci([e["kept"] for e in episodes], [e["evolved"] for e in episodes],
                              rng=rng),
        "return_per_episode": ratio_ci([e["return"] for e in episodes], [1] * len(episodes),
                                       rng=rng),
        "action_share": shares,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=24, help="Evaluation episodes per arm.")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="Config override (repeatable).")
    args = parser.parse_args()

    import ray

    from rl_system.actions import ACTION_NAMES, ACTIONS
    from rl_system.config import load_config
    from rl_system.env import InstructionEvolutionEnv
    from rl_system.placement import check_gpu_demands
    from rl_system.policy import latest_checkpoint, load_policy_seeds, train_policy
    from rl_system.strategies import PolicyChooser
    from serve.app import ensure_deployed, undeploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(args.config, [
            f"run.dir={run_dir}", "run.name=bench-policy", f"policy.iterations={args.iterations}",
            "dataset.policy_sampling=sample", *args.overrides,
        ])
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            check_gpu_demands(cfg, stages=["serve"])
            ensure_deployed(cfg, holder=run_dir)
            summaries = train_policy(cfg, log=lambda _m: None)
            train_s = time.perf_counter() - started

            env = InstructionEvolutionEnv({"run_config": cfg.to_portable_dict(),
                                           "seeds": load_policy_seeds(cfg)})
            chooser = PolicyChooser(cfg, latest_checkpoint(cfg))

            def policy_action(env, rng):
                return chooser.choose(instruction=env.instruction, last_action=env.last_action,
                                      step=env.step_count, rng=rng)

            def random_action(env, rng):
                return int(rng.integers(len(ACTIONS)))

            policy_eps = play(env, policy_action, episodes=args.episodes,
                              rng=np.random.default_rng(1))
            random_eps = play(env, random_action, episodes=args.episodes,
                              rng=np.random.default_rng(2))
        finally:
            try:
                undeploy(cfg, holder=run_dir)
            finally:
                ray.shutdown()

    rng = np.random.default_rng(0)
    arms = [summarise("policy", policy_eps, ACTION_NAMES, rng=rng),
            summarise("random", random_eps, ACTION_NAMES, rng=rng)]
    print(json.dumps({
        "bench": "policy_learning",
        "config": args.config,
        "judge": cfg.policy.reward.judge,
        "iterations": [
            {"iteration": s.iteration, "episode_return_mean": s.episode_return_mean,
             "info_gain": s.info_gain, "elimination_rate": s.elimination_rate,
             "queries_per_episode": s.queries_per_episode,
             "action_share": {k: round(v, 3) for k, v in s.action_share.items()}}
            for s in summaries
        ],
        "arms": arms,
        "policy_minus_random": {
            "reward_per_query": diff_ci(
                ([e["return"] for e in policy_eps], [e["queries"] for e in policy_eps]),
                ([e["return"] for e in random_eps], [e["queries"] for e in random_eps]), rng=rng),
            "kept_rate": diff_ci(
                ([e["kept"] for e in policy_eps], [e["evolved"] for e in policy_eps]),
                ([e["kept"] for e in random_eps], [e["evolved"] for e in random_eps]), rng=rng),
        },
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
