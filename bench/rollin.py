"""Guided roll-in on the scripted environment: plain TRPO vs restart vs mixture, one budget.

    nice -n 10 .venv/bin/python bench/rollin.py [--budget 1500] [--seeds 3] [--guide schedule]
        [--out DIR]

The environment is the real ``InstructionEvolutionEnv`` with the scripted backend (a
deterministic test double, the same script as ``tests/integration/rl_system/
test_policy_learning.py``) called in-process: only ``increase_reasoning_steps`` adds
information, a repeat of it or any other rewrite is eliminated, so the optimal episode is
that action then ``stop`` and its return is known (played once and measured here).

Each arm trains TRPO (no Ray cluster: one in-process env runner and learner) with the
same budget of env steps (a restart's hidden guide steps count: they are paid),
evaluating the policy after every iteration on ``--eval-episodes`` plain episodes from
reset (sampled actions, as stage 2 plays them).
Guide (``--guide``): ``schedule`` = always ``increase_reasoning_steps`` (a guide that knows
the good action but never stops), or any of ``rl_system.rollin.GUIDES`` that needs no
checkpoint. Per arm, over ``--seeds`` seeds with bootstrap 95% CIs: env steps until the
evaluated return first reaches 90% of the optimum (``None`` for a seed that never does;
counted as the budget in the mean), the final return and reward per query (training
queries included: the guide's and the hidden steps'). Prints one JSON line, writes
``rollin.png`` (return against env steps) and ``curves.json`` into ``--out``.
A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from rl_system.env import InstructionEvolutionEnv

GOOD_ACTION = "increase_reasoning_steps"
SCRIPT = {
    "rules": [{"contains": "several explicit steps", "reply": "{instruction} Show each step."}],
    "default": "{instruction}",
    "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
}
TARGET = 0.9
BOOTSTRAP_SAMPLES = 2000
MODES = ("learner", "restart", "mixture")
# Env steps and queries of the arm training now. Module state, not env_config: RLlib
# deep-copies its config, and with no remote env runners the envs live in this process.
COUNTER = {"env_steps": 0, "queries": 0.0}


class InProcess:
    """An ``LLMClient`` transport that calls a backend in this process (bench only)."""

    name = "in_process"

    def __init__(self, backend):
        self.backend = backend

    def generate(self, requests):
        return self.backend.generate(requests)

    def score(self, requests):
        return self.backend.score(requests)


class ScriptedEvolutionEnv(InstructionEvolutionEnv):
    """The evolution env on the scripted backend, without Serve; counts every env step it
    takes (learner's and hidden roll-in steps) and every model query, for the budget."""

    def __init__(self, config):
        super().__init__(config)
        self.counter = COUNTER if config.get("count") else None

    def _clients(self):
        if self._reviewer is None:
            from rl_system.reviewer import Reviewer
            from serve.backends.scripted import ScriptedBackend
            from serve.client import LLMClient

            backend = ScriptedBackend("scripted", script=SCRIPT)
            self._instructor = LLMClient("instructor", InProcess(backend))
            self._reviewer = Reviewer(LLMClient("reviewer", InProcess(backend)),
                                      reward=self.cfg.policy.reward, text_encoder=None)
        return self._instructor, self._reviewer

    def _advance(self, index):
        out = super()._advance(index)
        if self.counter is not None:
            self.counter["env_steps"] += 1
            self.counter["queries"] += out[3]["query_cost"]
        return out

    def step(self, action):
        out = super().step(action)
        if self.counter is not None:
            self.counter["queries"] += out[4]["guide_queries"]
        return out


def _cfg(mode: str, args, seed: int):
    from rl_system.config import load_config

    return load_config(None, [
        "policy.algorithm=trpo", "policy.num_env_runners=0", "policy.max_kl=0.05",
        f"policy.train_batch_size={args.batch}", f"policy.max_steps={args.max_steps}",
        "policy.reward.diversity_weight=0", f"policy.seed={seed}", "dataset.num_seeds=30",
        f"policy.rollin.mode={mode}", f"policy.rollin.guide={args.guide}",
        f"policy.rollin.schedule=[{GOOD_ACTION}]", f"policy.rollin.beta={args.beta}",
        f"policy.rollin.max_rollin_steps={args.max_rollin_steps}",
        f"run.dir={args.out / 'runs'}", f"run.name={mode}-{seed}",
    ])


def _play(env, choose, episodes: int) -> tuple[float, float]:
    """Mean return and queries per episode of ``episodes`` plain episodes."""
    returns, queries = [], []
    for _ in range(episodes):
        obs, _ = env.reset()
        total = spent = 0.0
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(choose(obs))
            total += reward
            spent += info["query_cost"]
            done = terminated or truncated
        returns.append(total)
        queries.append(spent)
    return float(np.mean(returns)), float(np.mean(queries))


def optimal_return(args) -> float:
    from rl_system.actions import ACTION_NAMES, STOP
    from rl_system.policy import load_policy_seeds

    cfg = _cfg("learner", args, 0)
    env = ScriptedEvolutionEnv(_env_config(cfg, load_policy_seeds(cfg), False))
    plan = iter([])

    def choose(obs):
        return next(plan, STOP)

    best = []
    for _ in range(8):
        plan = iter([ACTION_NAMES.index(GOOD_ACTION)])
        best.append(_play(env, choose, 1)[0])
    return float(np.mean(best))


def _env_config(cfg, seeds, counter):
    from rl_system.tasks import Task

    return {"run_config": cfg.to_portable_dict(), "count": counter,
            "seeds": [{"instruction": t.instruction, "input": t.input}
                      for t in map(Task.of, seeds)]}


def train_arm(mode: str, seed: int, args) -> list[dict]:
    """One arm, one seed: [{env_steps, return, reward_per_query, train_queries}] per
    iteration, until the env-step budget is spent."""
    import torch
    from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from rl_system.policy import algorithm_config, load_policy_seeds
    from rl_system.strategies import env_action

    cfg = _cfg(mode, args, seed)
    seeds = load_policy_seeds(cfg)
    counter = COUNTER
    counter.update(env_steps=0, queries=0.0)
    config = algorithm_config(cfg, seeds)
    env_config = {**config.env_config, "count": True}
    config = (config.environment(ScriptedEvolutionEnv, env_config=env_config)
              .rl_module(model_config={"fcnet_hiddens": [32, 32]}))
    # No Ray: one in-process env runner and learner, the loop TRPO.training_step runs.
    env_runner = SingleAgentEnvRunner(config=config)
    spaces = (env_runner.env.single_observation_space, env_runner.env.single_action_space)
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: spaces})
    eval_cfg = _cfg("learner", args, seed)
    eval_env = ScriptedEvolutionEnv(_env_config(eval_cfg, seeds, False))
    eval_env.reset(seed=10_000 + seed)
    rng = np.random.default_rng(seed)
    curve = []
    module = env_runner.module

    def choose(obs):
        with torch.no_grad():
            out = module.forward_inference({"obs": torch.as_tensor(obs[None])})
        logits = out["action_dist_inputs"][0].double().numpy()
        return env_action(logits, "discrete", greedy=False, rng=rng)

    try:
        while counter["env_steps"] < args.budget:
            learner.update(episodes=env_runner.sample(num_timesteps=args.batch))
            state = learner.get_state(components=COMPONENT_RL_MODULE)[COMPONENT_RL_MODULE]
            env_runner.set_state({COMPONENT_RL_MODULE: state})
            ret, queries = _play(eval_env, choose, args.eval_episodes)
            curve.append({"env_steps": counter["env_steps"], "return": ret,
                          "reward_per_query": ret / queries if queries else 0.0,
                          "train_queries": counter["queries"]})
    finally:
        env_runner.stop()
    return curve


def _ci(values, rng) -> dict:
    v = np.asarray(values, float)
    boot = v[rng.integers(len(v), size=(BOOTSTRAP_SAMPLES, len(v)))].mean(1)
    return {"mean": round(float(v.mean()), 4),
            "ci95": [round(float(q), 4) for q in np.quantile(boot, [0.025, 0.975])]}


def steps_to(curve: list[dict], threshold: float, budget: int) -> int | None:
    """Env steps at the first evaluation at or above ``threshold`` within the budget (the
    last update may overshoot it: a restart's hidden steps come in whole episodes)."""
    return next((p["env_steps"] for p in curve
                 if p["return"] >= threshold and p["env_steps"] <= budget), None)


def _on_grid(curve: list[dict], grid: np.ndarray, key: str) -> np.ndarray:
    """The last evaluation at or before each grid point (nan before the first)."""
    steps = np.array([p["env_steps"] for p in curve])
    values = np.array([p[key] for p in curve])
    idx = np.searchsorted(steps, grid, side="right") - 1
    return np.where(idx >= 0, values[np.maximum(idx, 0)], np.nan)


def plot(curves: dict, optimum: float, budget: int, path: Path, rng) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.linspace(0, budget, 60)
    fig = Figure(figsize=(9, 4))
    canvas = FigureCanvasAgg(fig)
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "return", "evaluated return"),
                           (fig.add_subplot(1, 2, 2), "reward_per_query", "reward per query")):
        for mode, per_seed in curves.items():
            rows = np.array([_on_grid(c, grid, key) for c in per_seed])
            mean = np.nanmean(rows, 0)
            boot = rows[rng.integers(len(rows), size=(BOOTSTRAP_SAMPLES, len(rows)))]
            low, high = np.nanquantile(np.nanmean(boot, 1), [0.025, 0.975], axis=0)
            ax.plot(grid, mean, label=mode)
            ax.fill_between(grid, low, high, alpha=0.2)
        if key == "return":
            ax.axhline(TARGET * optimum, ls="--", c="gray", lw=1, label="90% of optimum")
        ax.set_xlabel("env steps (incl. hidden roll-in steps)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.print_png(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1500, help="env steps per arm and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=60, help="env steps per TRPO update")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--guide", default="schedule")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--max-rollin-steps", type=int, default=2)
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-curves", type=Path, default=None,
                        help="summarise a curves.json of an earlier run instead of training")
    args = parser.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-rollin-"))
    args.out.mkdir(parents=True, exist_ok=True)

    optimum = optimal_return(args)
    if args.from_curves:
        curves = json.loads(args.from_curves.read_text())
    else:
        curves = {mode: [] for mode in MODES}
        # Seed by seed, each arm's curve written as soon as it is done: a cut-short run
        # still leaves whole seeds to summarise (--from-curves).
        for seed in range(args.seeds):
            for mode in MODES:
                curves[mode].append(train_arm(mode, seed, args))
                (args.out / "curves.json").write_text(json.dumps(curves))
    seeds_done = min(len(c) for c in curves.values())
    curves = {mode: c[:seeds_done] for mode, c in curves.items()}
    rng = np.random.default_rng(0)
    figures = {}
    for mode, per_seed in curves.items():
        reached = [steps_to(c, TARGET * optimum, args.budget) for c in per_seed]
        figures[mode] = {
            "steps_to_90pct": {**_ci([args.budget if s is None else s for s in reached], rng),
                               "per_seed": reached},
            "final_return": _ci([c[-1]["return"] for c in per_seed], rng),
            "final_reward_per_query": _ci([c[-1]["reward_per_query"] for c in per_seed], rng),
            "train_queries": _ci([c[-1]["train_queries"] for c in per_seed], rng),
        }
    plain = figures["learner"]["steps_to_90pct"]["mean"]
    guided = {m: figures[m]["steps_to_90pct"]["mean"] for m in ("restart", "mixture")}
    plot(curves, optimum, args.budget, args.out / "rollin.png", rng)
    print(json.dumps({
        "bench": "rollin",
        "env": "scripted",
        "guide": args.guide,
        "budget_env_steps": args.budget,
        "seeds": seeds_done,
        "optimal_return": round(optimum, 4),
        "figures": figures,
        # > 1: the guided arm reached 90% of the optimum in fewer env steps than plain TRPO.
        "ratio": {m: round(plain / s, 3) if s else None for m, s in guided.items()},
        "out": str(args.out),
    }))


if __name__ == "__main__":
    main()
