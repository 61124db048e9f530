"""Stage 1: train the evolution policy with RLlib (TRPO by default, PPO as baseline).

    teams-rl train-policy --config configs/demo.yaml

Writes under ``runs/<name>/policy/``: RLlib checkpoints (``checkpoints/iter_NNNN``), a
``state.json`` naming the latest one, and ``metrics.jsonl`` with one line per iteration
(return, info_gain, elimination rate, queries). Re-running continues from the latest
checkpoint up to ``policy.iterations``; a changed policy or model config is refused
rather than mixed into the old run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_system.actions import ACTION_NAMES
from rl_system.config import TeamsRLConfig
from rl_system.seeds import Seed, load_seeds

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
ENV_RUNNER_CPUS = 0.5  # env runners mostly wait on model calls


class PolicyRunMismatch(RuntimeError):
    """The run directory holds a policy trained with a different config."""


class InsufficientResources(RuntimeError):
    """The cluster cannot place what the config asks for."""


def _lineage_hash(cfg: TeamsRLConfig) -> str:
    data = cfg.to_portable_dict()
    lineage = {"models": data["models"], "policy": data["policy"]}
    lineage["policy"].pop("iterations")  # may grow between runs of the same experiment
    for role in ("instructor", "reviewer", "expert"):
        lineage["models"][role].pop("timeout_s")  # operational, not part of the experiment
    blob = json.dumps(lineage, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_policy_seeds(cfg: TeamsRLConfig) -> list[Seed]:
    """Read and check the seeds before any Ray work (an empty set is refused).

    The env gets whole seeds: an episode evolves an instruction together with its input.
    """
    seed_set = load_seeds(
        cfg.dataset.seeds, limit=cfg.dataset.num_seeds, skip_bad_lines=cfg.dataset.skip_bad_lines
    )
    if seed_set.skipped_bad or seed_set.skipped_empty:
        logger.warning(
            "seeds %s: skipped %d malformed and %d empty records",
            cfg.dataset.seeds,
            seed_set.skipped_bad,
            seed_set.skipped_empty,
        )
    return list(seed_set.seeds)


def load_seed_instructions(cfg: TeamsRLConfig) -> list[str]:
    """The seeds' instructions only (a check before Ray starts); training uses
    :func:`load_policy_seeds`."""
    return [s.instruction for s in load_policy_seeds(cfg)]


def evolution_metrics_callback():
    """An ``RLlibCallback`` that logs the reviewer's components per episode."""
    from ray.rllib.callbacks.callbacks import RLlibCallback

    from rl_system.reviewer import REVIEW_SCORES

    class EvolutionMetrics(RLlibCallback):
        def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
            infos = [i for i in episode.get_infos() if i and "action" in i]
            if not infos or metrics_logger is None:
                return
            evolved = [i for i in infos if i["queried"]]
            log = metrics_logger.log_value
            log("evolution/steps", len(infos), reduce="mean")
            log("evolution/queries", sum(i["query_cost"] for i in infos), reduce="mean")
            log("evolution/failed", sum(i["failed"] for i in infos), reduce="mean")
            for name_index, name in enumerate(ACTION_NAMES):
                share = sum(1 for i in infos if i["action"] == name_index) / len(infos)
                log(f"evolution/action_share/{name}", share, reduce="mean")
            if evolved:
                n = len(evolved)
                log(
                    "evolution/elimination_rate",
                    sum(i["eliminated"] for i in evolved) / n,
                    reduce="mean",
                )
                for key in REVIEW_SCORES:
                    if key != "query_cost":  # logged above, as queries per episode
                        log(f"evolution/{key}", sum(i[key] for i in evolved) / n, reduce="mean")
            log("evolution/infra_failures", sum(i.get("infra_failure", 0.0) for i in infos),
                reduce="mean")

    return EvolutionMetrics


def algorithm_config(cfg: TeamsRLConfig, seeds: Sequence[Seed | str]):
    """The RLlib ``AlgorithmConfig`` for ``policy.algorithm`` on the evolution env.

    ``seeds``: ``Seed``s (instruction and input) or bare instructions."""
    from rl_system.env import InstructionEvolutionEnv
    from rl_system.tasks import Task

    p = cfg.policy
    if p.algorithm == "trpo":
        from rl_system.trpo import TRPOConfig

        config = TRPOConfig().training(max_kl=p.max_kl, damping=p.damping, cg_iters=p.cg_iters)
    else:
        from ray.rllib.algorithms.ppo import PPOConfig

        config = PPOConfig().training(
            lr=p.lr, num_epochs=6, minibatch_size=min(60, p.train_batch_size)
        )
    env_config = {
        "run_config": cfg.to_portable_dict(),
        "seeds": [{"instruction": t.instruction, "input": t.input} for t in map(Task.of, seeds)],
    }
    return (
        config.environment(InstructionEvolutionEnv, env_config=env_config)
        .env_runners(
            num_env_runners=p.num_env_runners,
            num_envs_per_env_runner=p.num_envs_per_env_runner,
            num_cpus_per_env_runner=ENV_RUNNER_CPUS,
            sample_timeout_s=p.sample_timeout_s,
            rollout_fragment_length="auto",
        )
        .training(
            gamma=p.gamma, lambda_=p.gae_lambda, train_batch_size_per_learner=p.train_batch_size
        )
        .fault_tolerance(
            restart_failed_env_runners=True,
            max_num_env_runner_restarts=10,
        )
        .callbacks(evolution_metrics_callback())
        .debugging(seed=p.seed)
    )


@dataclass
class IterationSummary:
    iteration: int
    episode_return_mean: float | None
    info_gain: float | None
    info_gain_raw: float | None
    info_gain_first_order: float | None  # reviewer shown (before, after)
    info_gain_second_order: float | None  # reviewer shown (after, before)
    diversity: float | None
    elimination_rate: float | None
    queries_per_episode: float | None
    action_share: dict[str, float]
    env_steps: int
    time_s: float

    @classmethod
    def from_result(cls, iteration: int, result: dict, time_s: float) -> IterationSummary:
        env = result.get("env_runners", {})
        evo = {
            k.split("/", 1)[1]: v for k, v in _flatten(env).items() if k.startswith("evolution/")
        }
        share = {
            k.split("/", 1)[1]: float(v) for k, v in evo.items() if k.startswith("action_share/")
        }
        return cls(
            iteration=iteration,
            episode_return_mean=_float(env.get("episode_return_mean")),
            info_gain=_float(evo.get("info_gain")),
            info_gain_raw=_float(evo.get("info_gain_raw")),
            info_gain_first_order=_float(evo.get("info_gain_first_order")),
            info_gain_second_order=_float(evo.get("info_gain_second_order")),
            diversity=_float(evo.get("diversity")),
            elimination_rate=_float(evo.get("elimination_rate")),
            queries_per_episode=_float(evo.get("queries")),
            action_share=share,
            env_steps=int(_float(env.get("num_env_steps_sampled_lifetime")) or 0),
            time_s=time_s,
        )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _float(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _policy_gauges():
    from ray.util.metrics import Gauge

    names = {
        "episode_return_mean": "Mean episode return of the evolution policy.",
        "info_gain": "Mean calibrated reviewer info_gain per evolution.",
        "elimination_rate": "Share of evolutions eliminated by the rules.",
        "queries_per_episode": "Model queries per episode.",
    }
    return {k: Gauge(f"teams_rl_policy_{k}", description=d) for k, d in names.items()}


def _read_state(policy_dir: Path) -> dict | None:
    path = policy_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(policy_dir: Path, state: dict) -> None:
    tmp = policy_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, policy_dir / STATE_FILE)  # atomic: a crash leaves the old state


def check_resources(cfg: TeamsRLConfig) -> None:
    """Fail with a clear message, instead of waiting forever, when the cluster can never
    place ``policy.num_env_runners`` env runners (RLlib would block on them)."""
    import ray

    needed = cfg.policy.num_env_runners * ENV_RUNNER_CPUS
    total = ray.cluster_resources().get("CPU", 0.0)
    free = ray.available_resources().get("CPU", 0.0)
    if needed > free:
        raise InsufficientResources(
            f"policy.num_env_runners={cfg.policy.num_env_runners} needs {needed:g} CPUs but "
            f"only {free:g} of the cluster's {total:g} are free (Serve replicas hold the rest); "
            "lower policy.num_env_runners or add CPUs"
        )


def policy_is_done(cfg: TeamsRLConfig) -> bool:
    """Whether ``policy.iterations`` iterations of this same experiment are on disk."""
    state = _read_state(cfg.stage_dir("policy").resolve())
    return bool(
        state
        and state.get("lineage") == _lineage_hash(cfg)
        and state.get("iterations_done", 0) >= cfg.policy.iterations
    )


def latest_checkpoint(cfg: TeamsRLConfig) -> Path | None:
    state = _read_state(cfg.stage_dir("policy").resolve())
    return Path(state["checkpoint"]) if state and state.get("checkpoint") else None


def train_policy(
    cfg: TeamsRLConfig, *, log: Callable[[str], None] = logger.info
) -> list[IterationSummary]:
    """Train (or continue) the policy up to ``policy.iterations``; Ray and the role
    applications must be up. Returns the summaries of the iterations run now."""
    seeds = load_policy_seeds(cfg)
    policy_dir = cfg.stage_dir("policy").resolve()
    policy_dir.mkdir(parents=True, exist_ok=True)
    lineage = _lineage_hash(cfg)
    state = _read_state(policy_dir) or {"iterations_done": 0, "checkpoint": None}
    if state.get("lineage") not in (None, lineage):
        raise PolicyRunMismatch(
            f"{policy_dir} holds a policy trained with a different models/policy config; "
            "set run.name to a new name (or delete that directory) to start over"
        )
    if state["iterations_done"] >= cfg.policy.iterations:
        log(f"policy: {state['iterations_done']} iterations already done in {policy_dir}")
        return []

    check_resources(cfg)
    algo = algorithm_config(cfg, seeds).build_algo()
    try:
        if state["checkpoint"]:
            algo.restore_from_path(state["checkpoint"])
            log(f"policy: resumed from {state['checkpoint']}")
        gauges = _policy_gauges()
        summaries = []
        for iteration in range(state["iterations_done"] + 1, cfg.policy.iterations + 1):
            started = time.monotonic()
            result = algo.train()
            summary = IterationSummary.from_result(iteration, result, time.monotonic() - started)
            checkpoint = policy_dir / "checkpoints" / f"iter_{iteration:04d}"
            algo.save_to_path(str(checkpoint))
            with open(policy_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(summary.__dict__) + "\n")
            state = {
                "iterations_done": iteration,
                "checkpoint": str(checkpoint),
                "lineage": lineage,
                "algorithm": cfg.policy.algorithm,
            }
            _write_state(policy_dir, state)
            for key, gauge in gauges.items():
                value = getattr(summary, key)
                if value is not None:
                    gauge.set(value)
            log(
                f"policy iter {iteration}/{cfg.policy.iterations}: "
                f"return {_fmt(summary.episode_return_mean)}, info_gain {_fmt(summary.info_gain)}, "
                f"eliminated {_fmt(summary.elimination_rate)}, "
                f"queries/episode {_fmt(summary.queries_per_episode)}, {summary.time_s:.0f} s"
            )
            summaries.append(summary)
        return summaries
    finally:
        algo.stop()


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
