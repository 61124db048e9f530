"""Stage 2's driver: check the inputs, run the two stages on Ray Data, write the outputs.

    teams-rl build-dataset --config configs/demo.yaml

:func:`build_dataset` streams the seeds through ``EvolveStage`` then ``RespondStage``
(``rl_system.dataset.actors``), tallies the rows as they arrive (stopping early when more
than ``dataset.max_failure_rate`` of the seeds failed), dedupes and writes the outputs
(``rl_system.dataset.outputs``) and the stage manifest. The manifest's fingerprint is
:func:`config_hash`: a re-run of a changed config is refused, a re-run of the same one
resumes (``rl_system.dataset.cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable

from rl_system.config import TeamsRLConfig
from rl_system.dataset.actors import EvolveStage, RespondStage, _secrets
from rl_system.dataset.cache import CACHE_DIR, _make_budget
from rl_system.dataset.outputs import (
    SeedTally,
    _empty_usage,
    _metrics,
    _record_metrics,
    _write_outputs,
    dedupe,
    empty_reason,
    format_summary,
    pair_id,
    write_card,
)
from rl_system.progress import Progress
from rl_system.reviewer import RULE_NAMES
from rl_system.rundir import (
    COMPLETE,
    INCOMPLETE,
    RUNNING,
    RunMismatch,
    check_same_run,
    read_manifest,
    run_lock,
    write_manifest,
)
from rl_system.seeds import SeedSet, load_seeds
from serve.errors import TeamsRLError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE = "dataset"


DatasetRunMismatch = RunMismatch  # the run directory holds a dataset of another config


class DatasetIncomplete(TeamsRLError):
    """Seeds failed transiently (a role down, overloaded, timing out): the build is not
    complete; the same command retries them. ``manifest`` is what was written."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


def config_hash(cfg: TeamsRLConfig, policy_checkpoint: str | None) -> str:
    """What decides the rows: a change here is refused, never mixed into the old run.

    The budget, concurrency, card license and transport details (timeouts, endpoints,
    keys) are left out: changing them resumes the same build.
    """
    data = cfg.to_portable_dict()
    dataset = {k: v for k, v in data["dataset"].items()
               if k not in ("max_expert_queries", "concurrency", "actor_num_cpus",
                            "card_license")}
    # Only the columns a user mapped: builds made before the setting keep their fingerprint.
    seed_columns = {k: v for k, v in dataset.pop("seed_columns").items() if v is not None}
    if seed_columns:
        dataset["seed_columns"] = seed_columns
    models = {role: {k: data["models"][role][k] for k in ("model", "sampling")}
              for role in ("expert", "reviewer")}
    p = data["policy"]
    lineage = {
        "dataset": dataset, "models": models, "encoder": data["models"]["encoder"],
        "policy": {k: p[k] for k in ("max_steps", "observation", "action_space", "seed")},
        "reward": p["reward"], "policy_checkpoint": policy_checkpoint,
    }
    return hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


def check_inputs(cfg: TeamsRLConfig) -> tuple[SeedSet, str | None]:
    """Everything that can fail without a model call: seeds, strategy, policy checkpoint.

    Raises ``SeedFileError`` / ``PolicyCheckpointError`` before any query is spent.
    """
    from rl_system.strategies import STRATEGIES, load_policy_module, resolve_policy_checkpoint

    seeds = load_seeds(cfg.dataset.seeds, limit=cfg.dataset.num_seeds,
                       skip_bad_lines=cfg.dataset.skip_bad_lines,
                       columns=cfg.dataset.seed_columns.model_dump())
    checkpoint = None
    if STRATEGIES[cfg.dataset.strategy].needs_policy:
        path = resolve_policy_checkpoint(cfg)
        load_policy_module(cfg, path)
        checkpoint = str(path)
    return seeds, checkpoint


def dataset_is_done(cfg: TeamsRLConfig) -> bool:
    """Whether this run's dataset is complete for this same config (cheap: no model call).

    A missing policy checkpoint means stage 1 has not run yet, so the dataset is not done.
    """
    from rl_system.strategies import STRATEGIES, PolicyCheckpointError, resolve_policy_checkpoint

    manifest = read_manifest(cfg.stage_dir("dataset").resolve())
    if not manifest or manifest.get("status") != COMPLETE:
        return False
    checkpoint = None
    if STRATEGIES[cfg.dataset.strategy].needs_policy:
        try:
            checkpoint = str(resolve_policy_checkpoint(cfg))
        except PolicyCheckpointError:
            return False
    return manifest.get("fingerprint") == config_hash(cfg, checkpoint)


def build_dataset(cfg: TeamsRLConfig, *, log: Callable[[str], None] = logger.info) -> dict:
    """Run (or resume) stage 2; Ray and the role applications must be up.

    Returns the manifest (also written to ``runs/<name>/dataset/manifest.json``); its status
    is ``incomplete`` while any seed is unfinished. Raises ``DatasetIncomplete`` (naming the
    role and its error) when seeds failed transiently, after writing what was finished, and
    ``RunMismatch`` when the directory holds a dataset of another config.
    """
    with run_lock(cfg.run_dir, what="teams-rl build-dataset"):
        return _build_dataset(cfg, log=log)


def _build_dataset(cfg: TeamsRLConfig, *, log: Callable[[str], None]) -> dict:
    import ray

    started = time.monotonic()
    seeds, checkpoint = check_inputs(cfg)
    strategy = cfg.dataset.strategy
    out_dir = cfg.stage_dir("dataset").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(cfg, checkpoint)
    inputs = {"policy_checkpoint": checkpoint}
    previous = check_same_run(out_dir, digest, what="a dataset")
    if previous and previous.get("status") == COMPLETE:
        log(f"dataset: already complete in {out_dir}")
        return previous
    write_manifest(out_dir, stage=STAGE, fingerprint=digest, status=RUNNING, inputs=inputs,
                   strategy=strategy)

    budget = (_make_budget(cfg.dataset.max_expert_queries)
              if cfg.dataset.max_expert_queries else None)
    stage_kwargs = {"run_config": cfg.to_portable_dict(), "cache_dir": str(out_dir / CACHE_DIR),
                    "budget": budget, "secrets": _secrets(cfg)}
    actor_opts = {"batch_size": 1, "batch_format": "pyarrow",
                  "compute": ray.data.ActorPoolStrategy(
                      size=min(cfg.dataset.concurrency, len(seeds))),
                  "num_cpus": cfg.dataset.actor_num_cpus}
    items = [{"seed_index": i, "seed_id": s.id, "instruction": s.instruction, "input": s.input}
             for i, s in enumerate(seeds)]
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(EvolveStage, fn_constructor_kwargs={
            **stage_kwargs, "strategy": strategy, "checkpoint": checkpoint}, **actor_opts)
        .map_batches(RespondStage, fn_constructor_kwargs=stage_kwargs, **actor_opts)
    )
    counts: Counter = Counter()
    usage = _empty_usage()
    results = []
    tally = SeedTally(total=len(seeds), max_failure_rate=cfg.dataset.max_failure_rate)
    metrics = _metrics()
    rows_iter = ds.iter_rows()
    budget_text = cfg.dataset.max_expert_queries or "∞"
    pairs_kept = 0  # answered pairs before dedupe
    with Progress("dataset", total=len(seeds), unit="seeds", log=log) as progress:
        for row in rows_iter:
            results.append(row)
            tally.add(row)
            seed_counts = row["counts"]
            counts.update(seed_counts)
            for role, u in row["usage"].items():
                for k, v in u.items():
                    usage[role][k] += v
            _record_metrics(metrics, strategy, seed_counts, row["usage"],
                            incomplete=row["incomplete"], judge=cfg.policy.reward.judge)
            pairs_kept += 0 if row["incomplete"] else len(row["candidates"])
            progress.update(len(results), **{
                "pairs kept": pairs_kept,
                "expert queries": f"{usage['expert']['queries']}/{budget_text}"})
            if tally.too_many_failures and tally.done < tally.total:
                # The role is down or overloaded: the remaining seeds would fail the same way.
                tally.stop_early()
                break
    del rows_iter, ds  # stops the stage actors when the build stopped early
    results.sort(key=lambda r: r["seed_index"])
    if budget is not None:
        ray.kill(budget)

    rows = []
    for r in results:
        if r["incomplete"]:
            continue
        for c in r["candidates"]:
            rows.append({
                "id": pair_id(seed_id=r["seed_id"], strategy=strategy, actions=c["actions"],
                              step=c["evolution_step"]),
                "seed_id": r["seed_id"], "seed_instruction": r["instruction"],
                "instruction": c["instruction"], "input": c["input"],
                "response": c["response"], "actions": c["actions"],
                "evolution_step": c["evolution_step"],
                "review": c["review"], "expert_model": cfg.models.expert.model,
                "expert_queries": c["expert_queries"], "expert_tokens": c["expert_tokens"],
                "strategy": strategy, "policy_checkpoint": checkpoint,
            })
    from rl_system.encoders import TextEncoder

    encoder = TextEncoder(cfg.models.encoder)
    kept, exact, near = dedupe(rows, threshold=cfg.dataset.dedupe_threshold,
                               encode=encoder.encode)
    files = _write_outputs(out_dir, kept)
    if metrics is not None and kept:
        metrics.pairs.inc(len(kept), tags={"strategy": strategy})

    expert = usage["expert"]
    summary = {
        "seeds_read": len(seeds), "seeds_skipped_bad": seeds.skipped_bad,
        "seeds_skipped_empty": seeds.skipped_empty,
        "seeds_incomplete": tally.seeds_incomplete,
        "seeds_incomplete_by_cause": {c: tally.incomplete[c]
                                      for c in ("budget", "failure", "stopped")},
        "first_failure": tally.failure_record(),
        "evolutions_tried": counts["evolutions_tried"],
        "evolutions_failed": counts["evolutions_failed"],
        "reviews_failed": counts["reviews_failed"],
        "eliminated": {rule: counts[f"eliminated/{rule}"] for rule in RULE_NAMES},
        "evolutions_kept": counts["evolutions_kept"],
        "responses_failed": counts["responses_failed"],
        "duplicates_exact": exact, "duplicates_near": near, "pairs_written": len(kept),
    }
    if not kept:
        summary["empty_reason"] = empty_reason(summary)
    files["card"] = write_card(
        out_dir, license=cfg.dataset.card_license, strategy=strategy,
        policy_checkpoint=checkpoint, expert_model=cfg.models.expert.model,
        judge=cfg.policy.reward.judge, pairs=len(kept), expert_usage=expert)
    logical = expert["queries"] + expert["cached"]
    manifest = write_manifest(
        out_dir, stage=STAGE, fingerprint=digest,
        status=INCOMPLETE if tally.seeds_incomplete else COMPLETE, inputs=inputs,
        strategy=strategy, policy_checkpoint=checkpoint,
        seeds=str(seeds.path), expert_model=cfg.models.expert.model,
        summary=summary,
        queries={strategy: usage},
        expert_queries=expert["queries"], expert_queries_cached=expert["cached"],
        expert_queries_per_pair=(logical / len(kept)) if kept else None,
        elapsed_s=round(time.monotonic() - started, 2),
        files=files,
    )
    log(format_summary(manifest))
    if not kept:
        log(f"dataset: no pairs written, so no parquet shard: {summary['empty_reason']}")
    failure = tally.failure_message()
    if failure:
        raise DatasetIncomplete(failure, manifest)
    if tally.incomplete["budget"]:
        log(f"dataset: budget dataset.max_expert_queries={cfg.dataset.max_expert_queries} "
            f"reached; {tally.incomplete['budget']} seeds left for the next run (same command "
            "resumes)")
    return manifest
