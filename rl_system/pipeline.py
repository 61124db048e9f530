"""All four stages from one config: policy -> dataset -> SFT -> evaluation.

    teams-rl pipeline --config configs/demo.yaml
    ray job submit --working-dir . -- teams-rl pipeline --config configs/gpu-cluster.yaml

Each stage is skipped when its manifest (``rl_system.rundir``) is complete with the
fingerprint this config gives it, a fingerprint that covers its inputs' (eval <- SFT final
<- dataset <- policy checkpoint), so a changed stage makes every later one stale; partial
stages are resumed (the stages own that logic; this module only orders them). One run at a
time holds the run directory's lock. The role applications are deployed only when a
pending stage needs a model; this run takes a lease on them and releases it once no stage
left needs them, and they are deleted only when no other run holds a lease (two runs on
one cluster share them safely). The resolved config goes to ``runs/<name>/config.yaml``;
per-stage wall times go to ``pipeline.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rl_system.config import TeamsRLConfig, save_resolved
from rl_system.progress import Progress, summary_table
from rl_system.rundir import read_json, read_jsonl, read_manifest, run_lock, write_json

logger = logging.getLogger(__name__)
Log = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    name: str
    needs_models: bool  # whether it calls the served roles
    is_done: Callable[[TeamsRLConfig], bool]
    run: Callable[[TeamsRLConfig, Log], object]
    figures: Callable[[Path], dict]  # the end-of-run table's figures, read from its outputs


def _policy_done(cfg: TeamsRLConfig) -> bool:
    from rl_system.policy import policy_is_done

    return cfg.dataset.strategy != "policy" or policy_is_done(cfg)


def _run_policy(cfg: TeamsRLConfig, log: Log):
    from rl_system.policy import train_policy

    return train_policy(cfg, log=log)


def _dataset_done(cfg: TeamsRLConfig) -> bool:
    from rl_system.dataset import dataset_is_done

    return dataset_is_done(cfg)


def _run_dataset(cfg: TeamsRLConfig, log: Log):
    from rl_system.dataset import build_dataset

    return build_dataset(cfg, log=log)


def _sft_done(cfg: TeamsRLConfig) -> bool:
    from train.sft import sft_is_done

    return sft_is_done(cfg)


def _run_sft(cfg: TeamsRLConfig, log: Log):
    from train.sft import run_sft

    final = run_sft(cfg, log=log)
    log(f"sft: model at {final}")
    return final


def _eval_done(cfg: TeamsRLConfig) -> bool:
    from train.report import report_is_done

    return report_is_done(cfg)


def _run_eval(cfg: TeamsRLConfig, log: Log):
    from train.report import evaluate_and_report

    return evaluate_and_report(cfg, log=log)


def _records(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []  # a stage that never ran


def _policy_figures(stage_dir: Path) -> dict:
    manifest, rows = read_manifest(stage_dir) or {}, _records(stage_dir / "metrics.jsonl")
    last = rows[-1] if rows else {}
    return {"iterations": manifest.get("iterations_done"),
            "return": last.get("episode_return_mean"), "info_gain": last.get("info_gain"),
            "eliminated": last.get("elimination_rate")}


def _dataset_figures(stage_dir: Path) -> dict:
    manifest = read_manifest(stage_dir) or {}
    summary = manifest.get("summary") or {}
    return {"pairs written": summary.get("pairs_written"),
            "expert queries": manifest.get("expert_queries"),
            "eliminations": sum((summary.get("eliminated") or {}).values()),
            "seeds unfinished": summary.get("seeds_incomplete")}


def _sft_figures(stage_dir: Path) -> dict:
    rows = _records(stage_dir / "metrics.jsonl")
    steps = [r for r in rows if r.get("event") == "step"]
    evals = [r for r in rows if r.get("event") == "eval"]
    return {"steps": steps[-1]["step"] if steps else None,
            "final loss": steps[-1].get("loss") if steps else None,
            "eval loss": evals[-1].get("eval_loss") if evals else None}


def _eval_figures(stage_dir: Path) -> dict:
    report = read_json(stage_dir / "report.json")
    if not isinstance(report, dict):
        return {}
    run = stage_dir.parent.resolve().name
    figures = {f"{task} acc": scores.get("acc")
               for task, scores in (report.get("benchmarks") or {}).get(run, {}).items()}
    attacks = ((report.get("privacy") or {}).get(run) or {}).get("attacks") or {}
    figures |= {f"MIA {name} AUC": a.get("auc") for name, a in attacks.items()}
    return figures


STAGES: tuple[Stage, ...] = (
    Stage("policy", needs_models=True, is_done=_policy_done, run=_run_policy,
          figures=_policy_figures),
    Stage("dataset", needs_models=True, is_done=_dataset_done, run=_run_dataset,
          figures=_dataset_figures),
    Stage("sft", needs_models=False, is_done=_sft_done, run=_run_sft, figures=_sft_figures),
    Stage("eval", needs_models=False, is_done=_eval_done, run=_run_eval,
          figures=_eval_figures),
)


def stage_summary(cfg: TeamsRLConfig, timings: dict, ran: set[str]) -> str:
    """The end-of-run table: per stage its wall time, whether it ran now or was already
    done, and the key figures its outputs hold."""
    rows = []
    for stage in STAGES:
        stage_dir = cfg.stage_dir(stage.name).resolve()
        if stage.name == "policy" and cfg.dataset.strategy != "policy":
            continue  # no policy is trained for this strategy
        rows.append({"stage": stage.name, "wall_s": timings.get(stage.name),
                     "status": "ran" if stage.name in ran else "reused",
                     "figures": {k: v for k, v in stage.figures(stage_dir).items()
                                 if v is not None}})
    return summary_table(rows)


def run_pipeline(cfg: TeamsRLConfig, *, log: Log = logger.info) -> dict:
    """Run every pending stage in order; Ray must be initialised. Returns the timings."""
    with run_lock(cfg.run_dir, what="teams-rl pipeline") as run_dir:
        return _run_pipeline(cfg, run_dir, log=log)


def _run_pipeline(cfg: TeamsRLConfig, run_dir: Path, *, log: Log) -> dict:
    save_resolved(cfg, run_dir / "config.yaml")
    pending = [s for s in STAGES if not s.is_done(cfg)]
    done = [s.name for s in STAGES if s not in pending]
    if done:
        log(f"pipeline: already done for this config: {', '.join(done)}")
    if not pending:
        log(f"pipeline: nothing to do; outputs in {run_dir}")
        timings = _read_state(run_dir).get("stage_wall_s", {})
        log(stage_summary(cfg, timings, ran=set()))
        return timings
    needs_models = any(s.needs_models for s in pending)
    from rl_system.placement import check_gpu_demands

    # Before any stage: a GPU request the cluster can never hold would hang stage N later.
    check_gpu_demands(cfg, stages=[s.name for s in pending] + (["serve"] if needs_models else []))
    # The lease is keyed by the run directory (one run holds it at a time): a re-run after
    # an interruption takes the same lease again and releases it.
    holder = str(run_dir)
    leased = False
    if needs_models:
        from serve.app import ensure_deployed, is_deployed

        log("pipeline: reusing the running model roles" if is_deployed(cfg)
            else "pipeline: deploying the model roles ...")
        # Loading the models takes a minute or more on a laptop: the heartbeat says so.
        with Progress("pipeline", total=None, unit="deploying the model roles", log=log):
            ensure_deployed(cfg, holder=holder)
        leased = True
    from rl_system.metrics import maybe_pipeline_metrics

    metrics = maybe_pipeline_metrics()
    timings = _read_state(run_dir).get("stage_wall_s", {})
    for i, stage in enumerate(pending):
        if leased and not any(s.needs_models for s in pending[i:]):
            # SFT and evaluation need the CPUs, GPUs and memory the idle replicas hold; on a
            # fixed-size GPU cluster SFT would otherwise wait for them forever.
            leased = _release(cfg, holder, log)
        tags = {"run": cfg.run.name, "stage": stage.name}
        log(f"pipeline: stage {stage.name} started")
        if metrics:
            metrics.stage_running.set(1, tags=tags)
        started = time.monotonic()
        stage.run(cfg, log)
        timings[stage.name] = round(time.monotonic() - started, 1)
        _write_state(run_dir, stage_wall_s=timings)
        if metrics:
            metrics.stage_running.set(0, tags=tags)
            metrics.stage_wall_s.set(timings[stage.name], tags=tags)
        log(f"pipeline: stage {stage.name} finished in {timings[stage.name]:.0f} s")
    if leased:
        leased = _release(cfg, holder, log)
    log(stage_summary(cfg, timings, ran={s.name for s in pending}))
    return timings


def _release(cfg: TeamsRLConfig, holder: str, log: Log) -> bool:
    """Give back this run's lease on the roles; returns the new ``leased`` (False)."""
    from serve.app import undeploy

    deleted = undeploy(cfg, holder=holder)
    log("pipeline: no stage left needs the model roles; "
        + ("released their replicas" if deleted
           else "released this run's lease (another run or `teams-rl serve` keeps them)"))
    return False


def _read_state(run_dir: Path) -> dict:
    """``pipeline.json``: ``stage_wall_s`` per stage."""
    state = read_json(run_dir / "pipeline.json")
    return state if isinstance(state, dict) else {}


def _write_state(run_dir: Path, **updates) -> None:
    write_json(run_dir / "pipeline.json", {**_read_state(run_dir), **updates})
