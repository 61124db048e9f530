"""Stage 1: train the evolution policy with RLlib (TRPO by default, PPO as baseline).

    teams-rl train-policy --config configs/demo.yaml

Writes under ``runs/<name>/policy/``: RLlib checkpoints (``checkpoints/iter_NNNN``), the
stage manifest ``manifest.json`` (``rl_system.rundir``: fingerprint, status, iterations done,
the latest checkpoint) and ``metrics.jsonl`` with one line per iteration (return, info_gain,
elimination rate, queries). Re-running continues from the latest checkpoint up to
``policy.iterations`` (a checkpoint that fails to load falls back to the one before, with a
warning); a changed policy or model config is refused rather than mixed into the old run.
Operational keys (iterations, env-runner counts, timeouts, retries, rate limits) are not
part of the fingerprint: changing them continues the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_system.actions import ACTION_NAMES
from rl_system.config import TeamsRLConfig
from rl_system.metrics import policy_metrics
from rl_system.placement import (  # noqa: F401 - InsufficientResources: raised by train_policy
    ENV_RUNNER_CPUS,
    InsufficientResources,
    check_env_runner_cpus,
)
from rl_system.progress import Progress
from rl_system.rundir import (
    COMPLETE,
    INCOMPLETE,
    MANIFEST,
    RunMismatch,
    append_jsonl,
    fingerprint,
    latest_checkpoint,  # noqa: F401 - part of this module's API (stage 1's output)
    read_manifest,
    run_lock,
    write_manifest,
)
from rl_system.seeds import Seed, load_seeds

logger = logging.getLogger(__name__)

STATE_FILE = MANIFEST  # the stage manifest is stage 1's state
STAGE = "policy"
METRICS_FILE = "metrics.jsonl"


PolicyRunMismatch = RunMismatch  # the run directory holds a policy of another config


# What decides the policy; everything else is operational (how fast or how robustly it
# runs: iterations may grow, env runners, timeouts, retries, rate limits, endpoints).
ROLE_LINEAGE_KEYS = ("model", "sampling", "score_mode", "script")
ROLE_LINEAGE_DEFAULTS = {"score_mode": "auto", "script": {}}
POLICY_OPERATIONAL_KEYS = ("iterations", "num_env_runners", "num_envs_per_env_runner",
                           "sample_timeout_s", "max_action_share")


def _lineage_hash(cfg: TeamsRLConfig) -> str:
    data = cfg.to_portable_dict()
    # A field the role's backend lacks counts as its old default: fingerprints stay stable.
    models = {role: {k: data["models"][role].get(k, ROLE_LINEAGE_DEFAULTS.get(k))
                     for k in ROLE_LINEAGE_KEYS}
              for role in ("instructor", "reviewer", "expert")}
    policy = {k: v for k, v in data["policy"].items() if k not in POLICY_OPERATIONAL_KEYS}
    # No roll-in (the default) keeps the fingerprints of runs made before it existed.
    if policy["rollin"]["mode"] == "learner":
        del policy["rollin"]
    return fingerprint({"models": models, "encoder": data["models"]["encoder"],
                        "policy": policy})


def load_policy_seeds(cfg: TeamsRLConfig) -> list[Seed]:
    """Read and check the seeds before any Ray work (an empty set is refused).

    The env gets whole seeds: an episode evolves an instruction together with its input.
    """
    seed_set = load_seeds(
        cfg.dataset.seeds, limit=cfg.dataset.num_seeds, skip_bad_lines=cfg.dataset.skip_bad_lines,
        columns=cfg.dataset.seed_columns.model_dump(),
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
            # Stage 1's cost includes a guided roll-in's: its hidden restart steps and the
            # guide's own queries (rl_system.rollin).
            guide = sum(i.get("guide_queries", 0.0) for i in infos)
            log("evolution/queries", guide + sum(
                i["query_cost"] + i.get("rollin_query_cost", 0.0) for i in infos), reduce="mean")
            log("evolution/guide_queries", guide, reduce="mean")
            log("evolution/guided_steps", sum(i.get("guided", 0.0) for i in infos),
                reduce="mean")
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
        # Resolved here: env runners may run in another working directory.
        "rollin_cache_dir": str(cfg.stage_dir("policy").resolve() / "cache" / "rollin"),
    }
    if p.rollin.mode == "mixture":
        from rl_system.rollin import mask_guide_steps_connector

        config = config.learners(learner_connector=mask_guide_steps_connector())
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
    dominant_action: str | None = None  # the action with the largest share of the steps
    dominant_action_share: float | None = None
    action_share_alert: bool = False  # dominant_action_share > policy.max_action_share

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
            **_dominant(share),
        )

    def check_action_share(self, ceiling: float) -> IterationSummary:
        """This summary with ``action_share_alert`` set against ``ceiling``."""
        share = self.dominant_action_share
        return dataclasses.replace(self, action_share_alert=share is not None and share > ceiling)


def _dominant(share: dict[str, float]) -> dict[str, Any]:
    if not share:
        return {}
    name = max(share, key=share.get)
    return {"dominant_action": name, "dominant_action_share": share[name]}


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


def _read_state(policy_dir: Path) -> dict | None:
    return read_manifest(policy_dir)


def _write_state(policy_dir: Path, cfg: TeamsRLConfig, *, lineage: str, iterations_done: int,
                 checkpoint: str | None) -> dict:
    return write_manifest(
        policy_dir, stage=STAGE, fingerprint=lineage,
        status=COMPLETE if iterations_done >= cfg.policy.iterations else INCOMPLETE,
        iterations_done=iterations_done, checkpoint=checkpoint,
        algorithm=cfg.policy.algorithm,
    )


_ITER = re.compile(r"iter_(\d+)$")


def checkpoint_candidates(policy_dir: Path, newest: str | None) -> list[Path]:
    """Checkpoints to resume from, best first: the manifest's, then older ``iter_NNNN``."""
    root = policy_dir / "checkpoints"
    found = sorted((p for p in root.glob("iter_*") if _ITER.search(p.name)),
                   key=lambda p: int(_ITER.search(p.name).group(1)), reverse=True)
    if newest is None:
        return []
    limit = _iteration_of(Path(newest))
    return [Path(newest)] + [p for p in found
                             if _iteration_of(p) < limit and p != Path(newest)]


def _iteration_of(path: Path) -> int:
    m = _ITER.search(path.name)
    return int(m.group(1)) if m else 0


def restore_newest_loadable(algo, candidates: list[Path], *, log: Callable[[str], None]
                            ) -> Path | None:
    """Restore ``algo`` from the first candidate that loads; a corrupt one (a kill while
    it was written, a full disk) is skipped with a warning. None: start from scratch."""
    for path in candidates:
        try:
            algo.restore_from_path(str(path))
            return path
        except Exception as exc:  # noqa: BLE001 - any load failure means: try the previous
            logger.warning("policy checkpoint %s does not load (%s); trying the one before",
                           path, exc)
            log(f"policy: WARNING checkpoint {path} does not load ({type(exc).__name__}); "
                "falling back to the previous one")
    return None


def policy_is_done(cfg: TeamsRLConfig) -> bool:
    """Whether ``policy.iterations`` iterations of this same experiment are on disk."""
    state = _read_state(cfg.stage_dir("policy").resolve())
    return bool(
        state
        and state.get("fingerprint") == _lineage_hash(cfg)
        and state.get("iterations_done", 0) >= cfg.policy.iterations
    )


def train_policy(
    cfg: TeamsRLConfig, *, log: Callable[[str], None] = logger.info
) -> list[IterationSummary]:
    """Train (or continue) the policy up to ``policy.iterations``; Ray and the role
    applications must be up. Returns the summaries of the iterations run now."""
    with run_lock(cfg.run_dir, what="teams-rl train-policy"):
        return _train_policy(cfg, log=log)


def _train_policy(cfg: TeamsRLConfig, *, log: Callable[[str], None]) -> list[IterationSummary]:
    seeds = load_policy_seeds(cfg)
    policy_dir = cfg.stage_dir("policy").resolve()
    policy_dir.mkdir(parents=True, exist_ok=True)
    lineage = _lineage_hash(cfg)
    state = _read_state(policy_dir) or {"iterations_done": 0, "checkpoint": None}
    if state.get("fingerprint") not in (None, lineage):
        raise PolicyRunMismatch(
            f"{policy_dir} holds a policy trained with a different models/policy config; "
            "set run.name to a new name (or delete that directory) to start over"
        )
    if state["iterations_done"] >= cfg.policy.iterations:
        log(f"policy: {state['iterations_done']} iterations already done in {policy_dir}")
        return []

    check_env_runner_cpus(cfg)
    # The heartbeat covers the build too: env runners and their model clients take a
    # minute to start on a laptop.
    with Progress("policy", total=cfg.policy.iterations, unit="iteration", log=log,
                  start_done=state["iterations_done"]) as progress:
        algo = algorithm_config(cfg, seeds).build_algo()
        try:
            state = _restore(algo, state, policy_dir, log=progress.note)
            # The ETA counts iterations from here: building is no iteration's cost.
            progress.count_rate_from(state["iterations_done"])
            gauges = vars(policy_metrics())
            return [_one_iteration(cfg, algo, iteration, policy_dir=policy_dir,
                                   lineage=lineage, gauges=gauges, progress=progress)
                    for iteration in range(state["iterations_done"] + 1,
                                           cfg.policy.iterations + 1)]
        finally:
            algo.stop()


def _restore(algo, state: dict, policy_dir: Path, *, log: Callable[[str], None]) -> dict:
    """``state`` after restoring ``algo`` from its newest loadable checkpoint, if any."""
    if not state["checkpoint"]:
        return state
    restored = restore_newest_loadable(
        algo, checkpoint_candidates(policy_dir, state["checkpoint"]), log=log)
    if restored is None:
        log("policy: WARNING no checkpoint loads; starting from scratch")
    else:
        log(f"policy: resumed from {restored}")
    return {**state, "iterations_done": _iteration_of(restored) if restored else 0,
            "checkpoint": str(restored) if restored else None}


def _one_iteration(cfg: TeamsRLConfig, algo, iteration: int, *, policy_dir: Path,
                   lineage: str, gauges: dict, progress: Progress) -> IterationSummary:
    started = time.monotonic()
    result = algo.train()
    summary = IterationSummary.from_result(
        iteration, result, time.monotonic() - started
    ).check_action_share(cfg.policy.max_action_share)
    checkpoint = policy_dir / "checkpoints" / f"iter_{iteration:04d}"
    algo.save_to_path(str(checkpoint))
    # State first: a kill between the two loses one metrics line, never repeats an
    # iteration on top of a checkpoint the state does not name.
    _write_state(policy_dir, cfg, lineage=lineage, iterations_done=iteration,
                 checkpoint=str(checkpoint))
    append_jsonl(policy_dir / METRICS_FILE, summary.__dict__)
    for key, gauge in gauges.items():
        value = getattr(summary, key)
        if value is not None:
            gauge.set(value)
    progress.update(iteration, force=True, **{
        "return": summary.episode_return_mean, "info_gain": summary.info_gain,
        "eliminated": summary.elimination_rate,
        "queries/episode": summary.queries_per_episode})
    if summary.action_share_alert:
        message = (
            f"policy iter {iteration}: action '{summary.dominant_action}' took "
            f"{summary.dominant_action_share:.2f} of the steps, above "
            f"policy.max_action_share={cfg.policy.max_action_share}: the policy is "
            "collapsing onto one action (check the reward: is it paying that action "
            "for noise?)"
        )
        logger.warning(message)
        progress.note(f"WARNING {message}")
    return summary
