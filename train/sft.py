"""Stage 3: supervised fine-tuning of a Llama-family model on Ray Train (FSDP2 or DDP).

Run it through the CLI (``teams-rl sft --config configs/demo.yaml``, which calls
:func:`run_sft`). On the demo config (SmolLM2-135M, 2 CPU workers) expect a few seconds
per optimizer step and a Hugging Face model directory at ``runs/demo/sft/final``.

The recipe reads top to bottom, in torchtune's shape:

- driver, :func:`run_sft` (this module): validate the data and the cluster *before*
  anything trains, tokenize with Ray Data (``train.data``), size the schedule, start a
  ``TorchTrainer``;
- each worker, ``train.recipe.SFTRecipe``: ``setup`` (the model wrapped by
  ``train.parallel``; AdamW; resume from the newest checkpoint), ``train``,
  ``save_checkpoint`` and ``export_hf``.

Run directory ``runs/<name>/sft/``::

    ray_train/step_000050/  Ray Train storage: one DCP checkpoint (each rank's shard +
                            .metadata + trainer_state.json); the newest keep_checkpoints
    metrics.jsonl           one JSON object per event: data (driver); start, memory,
                            step, eval, checkpoint, done, export (rank 0)
    heldout.parquet         the records held out of training (sft.eval_fraction)
    final/                  HF model dir: config, safetensors, tokenizer, teams_rl_sft.json

Resume: a worker group restarted after a failure (``sft.max_failures``), or a re-run of
a stopped run with the same ``run.name``, continues from the newest checkpoint. A re-run
of a finished run with an unchanged ``sft`` section and data returns ``final`` at once.

Checkpoints are written by every rank straight into Ray Train's storage (the run dir,
a filesystem path by design) and reported with ``CheckpointUploadMode.NO_UPLOAD``:
the DCP shards are written once instead of staged and copied. Multi-node runs need
the run directory on a shared filesystem (Ray Train asks the same of ``storage_path``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rl_system.config import ConfigError, SFTConfig, TeamsRLConfig
from rl_system.placement import check_sft_workers
from rl_system.progress import JsonlFollower, Progress
from train.data import load_sft_datasets
from train.recipe import FINAL_MARKER, TrainPlan, train_loop_per_worker

logger = logging.getLogger(__name__)

STAGE = "sft"
RAY_TRAIN_NAME = "ray_train"
# The records held out of training (sft.eval_fraction): the eval loss scores them, and
# stage 4's membership-inference attack uses them as non-members.
HELDOUT_FILE = "heldout.parquet"


def plan_steps(sft: SFTConfig, *, train_rows: int) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, warmup_steps) for ``train_rows`` tokenized rows.

    Ray Data splits the rows equally over workers; a worker's leftover rows that do not
    fill a whole optimizer step are skipped in that epoch.
    """
    rows_per_step = sft.batch_size_per_worker * sft.gradient_accumulation_steps
    steps_per_epoch = (train_rows // sft.num_workers) // rows_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the SFT train split has {train_rows} rows but one optimizer step takes "
            f"sft.batch_size_per_worker ({sft.batch_size_per_worker}) x "
            f"sft.gradient_accumulation_steps ({sft.gradient_accumulation_steps}) x "
            f"sft.num_workers ({sft.num_workers}) = {rows_per_step * sft.num_workers}; "
            "lower one of them or add data"
        )
    total = sft.max_steps or sft.epochs * steps_per_epoch
    warmup = math.ceil(sft.warmup_ratio * total)
    return steps_per_epoch, total, warmup


def sft_inputs(cfg: TeamsRLConfig, files: list[Path]) -> dict[str, str]:
    """The data SFT reads, as a fingerprint: stage 2's output fingerprint when the files are
    this run's dataset (its manifest), else the files' identity (path, size, mtime)."""
    from rl_system.rundir import fingerprint, output_fingerprint, read_manifest

    dataset_dir = cfg.stage_dir("dataset").resolve()
    manifest = read_manifest(dataset_dir)
    if manifest and manifest.get("fingerprint") and all(
            f.resolve().is_relative_to(dataset_dir) for f in files):
        return {"dataset": output_fingerprint(manifest)}
    data = [(str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    return {"files": fingerprint(data)}


def plan_key(cfg: TeamsRLConfig, files: list[Path]) -> str:
    """SFT's fingerprint: the sft fields that shape the weights + its input's fingerprint."""
    from rl_system.rundir import fingerprint

    bookkeeping = {"fail_once_at_step", "log_every_steps", "eval_every_steps",
                   "checkpoint_every_steps", "keep_checkpoints", "max_failures"}
    sft = cfg.sft.model_dump(mode="json", exclude=bookkeeping)
    return fingerprint(sft, sft_inputs(cfg, files))


def sft_fingerprint(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None = None
                    ) -> str | None:
    """This config's SFT fingerprint (None while its data does not exist)."""
    from train.data import SFTDataError, parquet_files

    try:
        files = parquet_files(dataset_path or default_dataset_path(cfg))
    except SFTDataError:
        return None
    return plan_key(cfg, files)


def run_sft(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None = None,
            log: Callable[[str], None] = logger.info) -> Path:
    """Fine-tune ``cfg.sft.base_model`` on the stage-2 records; return the final HF dir.

    ``dataset_path``: a parquet file or a directory of them (default: stage 2's
    ``runs/<name>/dataset/data/``). Raises ``SFTDataError`` (missing column, empty data),
    ``ConfigError`` (too little data for one step) or ``InsufficientResources`` (more
    workers than the cluster can place) before any worker starts. ``log`` gets the
    progress lines (step, loss, tokens/s, ETA), read from rank 0's ``metrics.jsonl``.
    """
    from rl_system.rundir import run_lock

    with run_lock(cfg.run_dir, what="teams-rl sft"):
        return _run_sft(cfg, dataset_path=dataset_path, log=log)


def _run_sft(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None,
             log: Callable[[str], None]) -> Path:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rl_system.rundir import COMPLETE, append_jsonl, write_manifest
    from train.data import parquet_files, validate_files

    sft = cfg.sft
    stage = cfg.stage_dir("sft").resolve()
    final = stage / "final"
    dataset_path = dataset_path or default_dataset_path(cfg)
    files = parquet_files(dataset_path)
    validate_files(files)
    key = plan_key(cfg, files)
    if _final_matches(final, key):
        logger.info("sft: %s is already trained with this config and data; reusing it", final)
        write_manifest(stage, stage=STAGE, fingerprint=key, status=COMPLETE,
                       inputs=sft_inputs(cfg, files), final=str(final))
        return final

    if not ray.is_initialized():
        ray.init()
    scaling = ScalingConfig(
        num_workers=sft.num_workers,
        use_gpu=sft.use_gpu,
        resources_per_worker={"CPU": sft.cpus_per_worker},
    )
    check_sft_workers(sft, needed=scaling.total_resources)

    data = load_sft_datasets(
        dataset_path,
        model_ref=sft.base_model,
        max_seq_len=sft.max_seq_len,
        packing=sft.packing,
        eval_fraction=sft.eval_fraction,
        seed=sft.seed,
    )
    steps_per_epoch, total, warmup = plan_steps(sft, train_rows=data.train_rows)
    logger.info(
        "sft: %d records -> %d train / %d eval rows; %d examples truncated to %d tokens "
        "(%d dropped); %d steps (%d per epoch) on %d %s workers",
        data.records, data.train_rows, data.eval_rows, data.truncated, sft.max_seq_len,
        data.dropped, total, steps_per_epoch, sft.num_workers, sft.strategy,
    )
    plan = TrainPlan(
        run_name=cfg.run.name,
        stage_dir=str(stage),
        checkpoint_root=str(stage / RAY_TRAIN_NAME),
        final_dir=str(final),
        plan_key=key,
        train_rows=data.train_rows,
        eval_rows=data.eval_rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
    )
    stage.mkdir(parents=True, exist_ok=True)
    append_jsonl(plan.metrics_path, {"event": "data", **data.summary(), "time": time.time()})
    write_heldout(stage / HELDOUT_FILE, data.heldout)
    datasets = {"train": data.train}
    if data.eval is not None:
        datasets["eval"] = data.eval
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"sft": sft.model_dump(mode="json"), "plan": dataclasses.asdict(plan)},
        torch_config=TorchConfig(backend="nccl" if sft.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=RAY_TRAIN_NAME,
            storage_path=str(stage),  # absolute: Ray Train resolves relative paths elsewhere
            failure_config=FailureConfig(max_failures=sft.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=sft.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    with follow_steps(plan.metrics_path, total=total, log=log):
        trainer.fit()  # raises TrainingFailedError once max_failures restarts are spent
    if not _final_matches(final, key):
        raise RuntimeError(f"sft finished but {final} was not written; see {plan.metrics_path}")
    write_manifest(stage, stage=STAGE, fingerprint=key, status=COMPLETE,
                   inputs=sft_inputs(cfg, files), final=str(final))
    return final


@contextmanager
def follow_steps(metrics_path: Path, *, total: int, log: Callable[[str], None],
                 poll_s: float = 2.0) -> Iterator[Progress]:
    """Progress lines from rank 0's ``step`` records while the block runs: the workers
    write ``metrics.jsonl`` and the driver, which prints, follows it from its current end
    (a resumed run appends; the first new step sets where the ETA counts from)."""
    follower = JsonlFollower(metrics_path)
    stop = threading.Event()
    progress = Progress("sft", total=total, unit="step", log=log)

    def apply(records: list[dict[str, Any]]) -> None:
        for r in records:
            if r.get("event") != "step":
                continue
            if progress.rate_started is None:
                # The ETA counts from the first step: worker start-up and model load are
                # not a step's cost, and on a resume earlier steps were not timed here.
                progress.count_rate_from(int(r["step"]) - 1)
            progress.update(int(r["step"]), loss=r.get("loss"),
                            **{"tokens/s": round(r.get("tokens_per_s") or 0)})

    def follow() -> None:
        while not stop.wait(poll_s):
            apply(follower.poll())

    thread = threading.Thread(target=follow, daemon=True, name="sft-progress")
    with progress:
        thread.start()
        try:
            yield progress
        finally:
            stop.set()
            thread.join(timeout=poll_s + 5)
            apply(follower.poll())  # the last steps, written just before fit() returned


def sft_is_done(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None = None) -> bool:
    """Whether ``runs/<name>/sft/final`` was trained with this config on this data."""
    key = sft_fingerprint(cfg, dataset_path=dataset_path)
    return key is not None and _final_matches(cfg.stage_dir("sft").resolve() / "final", key)


def default_dataset_path(cfg: TeamsRLConfig) -> Path:
    """Where stage 2 writes its records (``dataset/data/part-*.parquet``)."""
    parts = cfg.stage_dir("dataset") / "data"
    return parts if parts.is_dir() else cfg.stage_dir("dataset")


def write_heldout(path: Path, records: list[dict[str, Any]]) -> None:
    """The held-out records as parquet (atomically); no file when nothing was held out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, path)


def _final_matches(final: Path, key: str) -> bool:
    marker = final / FINAL_MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("plan_key") == key
    except (OSError, ValueError):
        return False
