"""Stage 3: supervised fine-tuning of a Llama-family model on Ray Train (FSDP2 or DDP).

Run it through the CLI (``teams-rl sft --config configs/demo.yaml``, which calls
:func:`run_sft`). On the demo config (SmolLM2-135M, 2 CPU workers) expect a few seconds
per optimizer step and a Hugging Face model directory at ``runs/demo/sft/final``.

The recipe reads top to bottom, in torchtune's shape:

- driver, :func:`run_sft`: validate the data and the cluster *before* anything trains,
  tokenize with Ray Data (``train.data``), size the schedule, start a ``TorchTrainer``;
- each worker, :class:`SFTRecipe`: ``setup`` (model sharded with FSDP2 ``fully_shard``
  per decoder layer then the root, or wrapped in DDP; AdamW; resume from the newest
  checkpoint), ``train`` (gradient accumulation, token-weighted loss, clipping, linear
  warm-up + cosine learning rate, eval loss every K steps, progress reports),
  ``save_checkpoint`` (sharded, torch.distributed.checkpoint) and ``export_hf``.

Run directory ``runs/<name>/sft/``::

    ray_train/step_000050/  Ray Train storage: one DCP checkpoint (each rank's shard +
                            .metadata + trainer_state.json); the newest keep_checkpoints
    metrics.jsonl           one JSON object per event: data (driver); start, memory,
                            step, eval, checkpoint, done, export (rank 0)
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

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rl_system.config import ConfigError, SFTConfig, TeamsRLConfig
from train.data import IGNORE_INDEX, collate, load_sft_datasets, load_tokenizer

logger = logging.getLogger(__name__)

STAGE = "sft"
RAY_TRAIN_NAME = "ray_train"
FINAL_MARKER = "teams_rl_sft.json"
TRAINER_STATE = "trainer_state.json"
FAIL_ONCE_MARKER = "fail_once_at_step.done"
# The records held out of training (sft.eval_fraction): the eval loss scores them, and
# stage 4's membership-inference attack uses them as non-members.
HELDOUT_FILE = "heldout.parquet"


# ---------------------------------------------------------------------------------------
# Pure pieces (no Ray, no process group)


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, cosine decay to 0.

    ``lr = peak * (step + 1) / warmup`` for ``step < warmup``, then
    ``peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy over loss-bearing tokens.

    logits: (B, L, V); labels: (B, L) with -100 on ignored positions. Position t predicts
    label t+1. Summing (not averaging) lets the step normalise by the token count of every
    micro-batch on every rank, so each loss token weighs the same.
    """
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What every worker needs besides ``SFTConfig``; sized on the driver from row counts."""

    run_name: str
    stage_dir: str  # absolute runs/<name>/sft
    checkpoint_root: str  # absolute Ray Train storage of this run (stage_dir/ray_train)
    final_dir: str
    plan_key: str
    train_rows: int
    eval_rows: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def metrics_path(self) -> Path:
        return Path(self.stage_dir) / "metrics.jsonl"


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


# ---------------------------------------------------------------------------------------
# Driver


def run_sft(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None = None) -> Path:
    """Fine-tune ``cfg.sft.base_model`` on the stage-2 records; return the final HF dir.

    ``dataset_path``: a parquet file or a directory of them (default: stage 2's
    ``runs/<name>/dataset/data/``). Raises ``SFTDataError`` (missing column, empty data) or
    ``ConfigError`` (more workers than the cluster can place, too little data for one
    step) before any worker starts.
    """
    from rl_system.rundir import run_lock

    with run_lock(cfg.run_dir, what="teams-rl sft"):
        return _run_sft(cfg, dataset_path=dataset_path)


def _run_sft(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None) -> Path:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rl_system.rundir import COMPLETE, write_manifest
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
    check_resources(sft, needed=scaling.total_resources)

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
    _append_jsonl(plan.metrics_path, {"event": "data", **data.summary(), "time": time.time()})
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
    trainer.fit()  # raises TrainingFailedError once max_failures restarts are spent
    if not _final_matches(final, key):
        raise RuntimeError(f"sft finished but {final} was not written; see {plan.metrics_path}")
    write_manifest(stage, stage=STAGE, fingerprint=key, status=COMPLETE,
                   inputs=sft_inputs(cfg, files), final=str(final))
    return final


def sft_is_done(cfg: TeamsRLConfig, *, dataset_path: str | os.PathLike | None = None) -> bool:
    """Whether ``runs/<name>/sft/final`` was trained with this config on this data."""
    key = sft_fingerprint(cfg, dataset_path=dataset_path)
    return key is not None and _final_matches(cfg.stage_dir("sft").resolve() / "final", key)


def default_dataset_path(cfg: TeamsRLConfig) -> Path:
    """Where stage 2 writes its records (``dataset/data/part-*.parquet``)."""
    parts = cfg.stage_dir("dataset") / "data"
    return parts if parts.is_dir() else cfg.stage_dir("dataset")


def check_resources(sft: SFTConfig, *, needed: dict[str, float]) -> None:
    """Refuse a worker count the cluster cannot place (it would wait forever)."""
    import ray

    total = ray.cluster_resources()
    available = ray.available_resources()
    for resource, amount in needed.items():
        have = total.get(resource, 0.0)
        if amount <= have:
            continue
        per_worker = amount / sft.num_workers
        fits = int(have // per_worker) if per_worker else 0
        fix = f"lower sft.num_workers to at most {fits}" if fits else "add nodes"
        if resource == "CPU":
            fix += " or lower sft.cpus_per_worker"
        elif resource == "GPU":
            fix += " or set sft.use_gpu=false"
        raise ConfigError(
            f"sft.num_workers={sft.num_workers} needs {amount:g} {resource} "
            f"({per_worker:g} per worker) but the Ray cluster has {have:g} {resource} "
            f"({available.get(resource, 0.0):g} available now); {fix}"
        )


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


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    from rl_system.rundir import append_jsonl

    append_jsonl(path, record)


# ---------------------------------------------------------------------------------------
# Workers


@functools.lru_cache(maxsize=1)
def sft_metrics() -> SimpleNamespace:
    """Ray metrics of the SFT stage (rank 0 records them), tagged by run name."""
    from ray.util.metrics import Counter, Gauge

    tags = ("run",)
    return SimpleNamespace(
        loss=Gauge("teams_rl_sft_loss", description="Train loss per token.", tag_keys=tags),
        eval_loss=Gauge(
            "teams_rl_sft_eval_loss", description="Held-out loss per token.", tag_keys=tags
        ),
        tokens_per_second=Gauge(
            "teams_rl_sft_tokens_per_second",
            description="Input tokens per second over all workers.",
            tag_keys=tags,
        ),
        learning_rate=Gauge("teams_rl_sft_learning_rate", description="AdamW lr.", tag_keys=tags),
        step=Gauge("teams_rl_sft_step", description="Optimizer steps done.", tag_keys=tags),
        tokens=Counter(
            "teams_rl_sft_tokens_total", description="Input tokens trained on.", tag_keys=tags
        ),
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker."""
    recipe = SFTRecipe(SFTConfig(**config["sft"]), TrainPlan(**config["plan"]))
    recipe.setup()
    recipe.train()
    recipe.export_hf()


class SFTRecipe:
    """One worker's share of the fine-tune: setup / train / save_checkpoint / export_hf."""

    def __init__(self, sft: SFTConfig, plan: TrainPlan) -> None:
        self.sft = sft
        self.plan = plan
        self.step = 0  # optimizer steps done

    # -- setup ----------------------------------------------------------------------

    def setup(self) -> None:
        import ray.train
        import ray.train.torch
        import torch
        import torch.distributed as dist

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives use the current device
        else:
            # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved.
            torch.set_num_threads(max(1, int(self.sft.cpus_per_worker)))
        torch.manual_seed(self.sft.seed)
        self.log = _worker_logger(self.rank)
        self.tokenizer = load_tokenizer(self.sft.base_model)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0

        self.model = self._setup_model()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.sft.learning_rate,
            weight_decay=self.sft.weight_decay,
        )
        resumed_from = self.load_checkpoint()

        self.train_shard = ray.train.get_dataset_shard("train")
        self.eval_shard = ray.train.get_dataset_shard("eval") if self.plan.eval_rows else None

        per_rank: list[Any] = [None] * self.world
        dist.all_gather_object(per_rank, sum(_local(p).numel() for p in self.model.parameters()))
        self._event(
            "start",
            start_step=self.step,
            resumed_from=resumed_from,
            total_steps=self.plan.total_steps,
            world_size=self.world,
            strategy=self.sft.strategy,
            device=self.device.type,
            param_numel=sum(p.numel() for p in self.model.parameters()),
            local_param_numel=per_rank,
        )
        self.log.info(
            "rank %d/%d %s on %s; params held locally %s; starting at step %d of %d",
            self.rank, self.world, self.sft.strategy, self.device, per_rank, self.step,
            self.plan.total_steps,
        )

    def _setup_model(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        from serve.models import resolve_model

        # Every rank reads the full fp32 weights once before sharding; fine for models
        # that fit in host memory (a meta-device + broadcast load would lift that).
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(self.sft.base_model), dtype=torch.float32
        )
        model, self._autocast = wrap_for_training(
            model, strategy=self.sft.strategy, device=self.device, world_size=self.world,
            activation_checkpointing=self.sft.activation_checkpointing,
        )
        return model

    # -- checkpoints ----------------------------------------------------------------

    def load_checkpoint(self) -> str | None:
        """Restore model, optimizer and step from Ray Train's newest checkpoint, if any."""
        import ray.train
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / TRAINER_STATE).read_text())
            if state["base_model"] != self.sft.base_model:
                raise ConfigError(
                    f"{directory} holds a fine-tune of {state['base_model']}, not "
                    f"sft.base_model={self.sft.base_model}; use another run.name"
                )
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            target = {"model": model_sd, "optim": optim_sd}
            dcp.load(target, checkpoint_id=directory)  # reshards if the layout changed
            set_state_dict(
                self.model, self.optimizer,
                model_state_dict=target["model"], optim_state_dict=target["optim"],
            )
        self.step = int(state["step"])
        return str(checkpoint.path)

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank writes its shard into Ray Train storage; then all report it."""
        import ray.train
        import torch.distributed.checkpoint as dcp
        from ray.train import Checkpoint, CheckpointUploadMode
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step_{self.step:06d}"
        directory = Path(self.plan.checkpoint_root) / name
        started = time.monotonic()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
        if self.rank == 0:
            state = {
                "step": self.step,
                "base_model": self.sft.base_model,
                "strategy": self.sft.strategy,
                "world_size": self.world,
            }
            (directory / TRAINER_STATE).write_text(json.dumps(state))
        self._event("checkpoint", step=self.step, path=str(directory),
                    seconds=round(time.monotonic() - started, 2))
        ray.train.report(
            _reportable(metrics),
            checkpoint=Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    # -- train ----------------------------------------------------------------------

    def train(self) -> None:
        import ray.train

        sft, plan = self.sft, self.plan
        accum = sft.gradient_accumulation_steps
        if self.step == 0:
            # The base model's held-out loss: the yardstick for every later eval_loss.
            baseline = self.evaluate()
            if baseline is not None:
                self._event("eval", step=0, eval_loss=baseline)
        window = {"tokens": 0, "since": time.monotonic()}
        epoch, done_in_epoch = divmod(self.step, plan.steps_per_epoch)
        while self.step < plan.total_steps:
            # After a resume, skip what the interrupted epoch already consumed.
            batches = self._train_batches(epoch, skip=done_in_epoch * accum)
            steps_this_pass = 0
            for _ in range(min(plan.steps_per_epoch - done_in_epoch,
                               plan.total_steps - self.step)):
                micro = [self._next_in_lockstep(batches) for _ in range(accum)]
                if any(b is None for b in micro):
                    break  # some rank ran out of rows: every rank ends the epoch together
                step_started = time.monotonic()
                stats = self.train_step(micro)
                self.step += 1
                steps_this_pass += 1
                window["tokens"] += stats["tokens"]
                metrics = self._step_metrics(stats, epoch, window, step_started)
                last = self.step == plan.total_steps
                if self.step % sft.eval_every_steps == 0 or last:
                    metrics["eval_loss"] = self.evaluate()
                    if metrics["eval_loss"] is not None:
                        self._event("eval", step=self.step, eval_loss=metrics["eval_loss"])
                self._record(metrics)
                if self.step % sft.checkpoint_every_steps == 0 or last:
                    self.save_checkpoint(metrics)
                elif self.step % sft.log_every_steps == 0:
                    ray.train.report(_reportable(metrics))
                self._maybe_inject_failure()
            if steps_this_pass == 0:
                raise RuntimeError(
                    f"rank {self.rank}: epoch {epoch} gave no training batch; the train "
                    "split is smaller than planned"
                )
            epoch, done_in_epoch = epoch + 1, 0
        self._event("done", step=self.step)

    def train_step(self, micro: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over ``micro`` batches; returns global loss/tokens/grad_norm.

        Gradients are summed per token, then scaled by ``world / global_label_tokens``:
        DDP and FSDP average over ranks, so the result is the mean gradient over every
        loss token of the step on every rank, however tokens fall across micro-batches.
        """
        import torch
        import torch.distributed as dist

        self.model.train()
        local = torch.zeros(3, dtype=torch.float64)  # loss sum, label tokens, input tokens
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            labels = batch["labels"].to(self.device)
            with self._grad_sync(sync):  # DDP's no_sync must span the backward
                loss = self._loss_sum(batch, labels)
                loss.backward()
            local[0] += loss.detach().double().cpu()
            local[1] += int((labels[:, 1:] != IGNORE_INDEX).sum())
            local[2] += batch["num_tokens"]
        total = local.to(self.device) if self.device.type == "cuda" else local.clone()
        dist.all_reduce(total)
        total = total.cpu()
        scale = self.world / max(1.0, float(total[1]))
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.sft.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = lr_at(self.step, peak=self.sft.learning_rate,
                   warmup_steps=self.plan.warmup_steps, total_steps=self.plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if not getattr(self, "_memory_logged", False):
            self._log_model_state_memory()  # grads and optimizer state exist only now
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(total[0] / max(1.0, float(total[1]))),
            "label_tokens": int(total[1]),
            "tokens": int(total[2]),
            "grad_norm": float(grad_norm),
            "lr": lr,
        }

    def _loss_sum(self, batch: dict[str, Any], labels: Any) -> Any:
        """Summed token loss of one collated batch (the caller divides by label tokens)."""
        with self._autocast():
            logits = self.model(
                input_ids=batch["input_ids"].to(self.device),
                position_ids=batch["position_ids"].to(self.device),
                use_cache=False,  # a KV cache would switch off packed attention
            ).logits
            return token_loss_sum(logits, labels)

    @contextlib.contextmanager
    def _grad_sync(self, enabled: bool) -> Iterator[None]:
        # DDP skips the all-reduce on non-final micro-batches. FSDP keeps reduce-scattering
        # every micro-batch: skipping it would hold unsharded gradients, FSDP's whole saving.
        if self.sft.strategy == "ddp" and not enabled:
            with self.model.no_sync():
                yield
        else:
            yield

    def evaluate(self) -> float | None:
        """Mean loss per response token over the whole eval split (all ranks)."""
        import torch
        import torch.distributed as dist

        if self.eval_shard is None:
            return None
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        # The eval split is not sharded by Ray Train (an equal split would drop the
        # remainder, all of a tiny split); every rank reads it and keeps every world-th batch.
        batches = (
            collate(b, pad_id=self.pad_id)
            for i, b in enumerate(self.eval_shard.iter_batches(
                batch_size=self.sft.batch_size_per_worker, batch_format="numpy"
            ))
            if i % self.world == self.rank
        )
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                # Every rank runs the same number of forwards (FSDP all-gathers inside);
                # a rank that is out of rows feeds a one-token batch that counts nothing.
                more = self._all_reduce_flag(batch is not None, op="max")
                if not more:
                    break
                if batch is None:
                    batch = collate({"input_ids": [[self.pad_id]], "labels": [[IGNORE_INDEX]]},
                                    pad_id=self.pad_id)
                labels = batch["labels"].to(self.device)
                totals[0] += float(self._loss_sum(batch, labels))
                totals[1] += int((labels[:, 1:] != IGNORE_INDEX).sum())
        reduced = totals.to(self.device) if self.device.type == "cuda" else totals
        dist.all_reduce(reduced)
        self.model.train()
        return float(reduced[0] / reduced[1]) if reduced[1] > 0 else None

    # -- export ---------------------------------------------------------------------

    def export_hf(self) -> None:
        """Gather the full weights to rank 0 and write a from_pretrained-loadable dir."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )  # collective: every rank takes part, rank 0 receives
        if self.rank != 0:
            return
        from transformers import AutoModelForCausalLM, GenerationConfig

        from serve.models import resolve_model

        base = resolve_model(self.sft.base_model)
        final = Path(self.plan.final_dir)
        staging = final.with_name(final.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(base)  # architecture + config carrier
        model.load_state_dict(full)
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(base)
        model.save_pretrained(staging, safe_serialization=True)
        self.tokenizer.save_pretrained(staging)
        marker = {
            "plan_key": self.plan.plan_key,
            "step": self.step,
            "base_model": self.sft.base_model,
            "strategy": self.sft.strategy,
            "world_size": self.world,
        }
        (staging / FINAL_MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # a reader sees no final dir or a complete one
        self._event("export", step=self.step, path=str(final))
        self.log.info("wrote %s", final)

    # -- helpers --------------------------------------------------------------------

    def _train_batches(self, epoch: int, *, skip: int) -> Iterator[dict[str, Any]]:
        rows = self.train_shard.iter_batches(
            batch_size=self.sft.batch_size_per_worker,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=4 * self.sft.batch_size_per_worker,
            local_shuffle_seed=self.sft.seed + epoch * 1000 + self.rank,
        )
        for i, batch in enumerate(rows):
            if i >= skip:
                yield collate(batch, pad_id=self.pad_id)

    def _next_in_lockstep(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        batch = next(batches, None)
        return batch if self._all_reduce_flag(batch is not None, op="min") else None

    def _all_reduce_flag(self, flag: bool, *, op: str) -> bool:
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return bool(t.item())

    def _step_metrics(
        self, stats: dict[str, float], epoch: int, window: dict[str, float], started: float
    ) -> dict[str, Any]:
        now = time.monotonic()
        tokens_per_s = window["tokens"] / max(1e-9, now - window["since"])
        window["tokens"], window["since"] = 0, now
        return {
            "step": self.step,
            "epoch": epoch,
            "loss": stats["loss"],
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "tokens": stats["tokens"],
            "label_tokens": stats["label_tokens"],
            "tokens_per_s": tokens_per_s,
            "step_time_s": now - started,
        }

    def _record(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self._event("step", **metrics)
        if self.step % self.sft.log_every_steps == 0 or self.step == self.plan.total_steps:
            eval_part = (f" eval_loss {metrics['eval_loss']:.4f}"
                         if metrics.get("eval_loss") is not None else "")
            self.log.info(
                "step %d/%d loss %.4f%s lr %.2e grad_norm %.3f tokens/s %.1f",
                self.step, self.plan.total_steps, metrics["loss"], eval_part, metrics["lr"],
                metrics["grad_norm"], metrics["tokens_per_s"],
            )
        m, tags = sft_metrics(), {"run": self.plan.run_name}
        m.loss.set(metrics["loss"], tags=tags)
        m.tokens_per_second.set(metrics["tokens_per_s"], tags=tags)
        m.learning_rate.set(metrics["lr"], tags=tags)
        m.step.set(self.step, tags=tags)
        m.tokens.inc(metrics["tokens"], tags=tags)
        if metrics.get("eval_loss") is not None:
            m.eval_loss.set(metrics["eval_loss"], tags=tags)

    def _log_model_state_memory(self) -> None:
        """Bytes of parameters, gradients and optimizer state this rank holds (its shards)."""
        import torch.distributed as dist

        params = list(self.model.parameters())
        held = {
            "param_bytes": sum(_nbytes(p) for p in params),
            "grad_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optim_bytes": sum(
                _nbytes(v)
                for state in self.optimizer.state.values()
                for v in state.values()
                if hasattr(v, "element_size")
            ),
        }
        held["model_state_bytes"] = sum(held.values())
        per_rank: list[Any] = [None] * self.world
        dist.all_gather_object(per_rank, held)
        self._memory_logged = True
        self._event(
            "memory",
            step=self.step + 1,
            **{k: [r[k] for r in per_rank] for k in held},
        )

    def _maybe_inject_failure(self) -> None:
        """TEST ONLY (``sft.fail_once_at_step``): the last rank raises once, ever, per run dir."""
        at = self.sft.fail_once_at_step
        if at is None or self.step != at or self.rank != self.world - 1:
            return
        marker = Path(self.plan.stage_dir) / FAIL_ONCE_MARKER
        if marker.exists():
            return
        marker.write_text(json.dumps({"step": self.step, "time": time.time()}))
        raise RuntimeError(
            f"injected failure at step {self.step} (sft.fail_once_at_step, test only)"
        )

    def _event(self, event: str, **fields: Any) -> None:
        if self.rank == 0:
            _append_jsonl(self.plan.metrics_path, {"event": event, **fields, "time": time.time()})


def wrap_for_training(
    model: Any, *, strategy: str, device: Any, world_size: int, activation_checkpointing: bool
) -> tuple[Any, Callable[[], Any]]:
    """Shard (FSDP2) or replicate (DDP) ``model`` over the process group; on CUDA, compute
    in bf16 with fp32 master weights. Returns the model and the autocast context factory
    each forward pass runs under. The process group must be initialised."""
    import torch

    model.config.use_cache = False
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = device.type == "cuda"
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        # bf16 compute with fp32 master weights and fp32 gradient reduction on GPU.
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None,
            reduce_dtype=torch.float32 if bf16 else None,
        )
        # One FSDP unit per decoder layer: only one layer is unsharded at a time.
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # embeddings, final norm, lm_head
        return model, contextlib.nullcontext
    from torch.nn.parallel import DistributedDataParallel

    model.to(device)
    model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext)
    return model, autocast


def _reportable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if v is not None}


def _local(t: Any) -> Any:
    """The part of a (possibly sharded DTensor) tensor that this rank stores."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: Any) -> int:
    local = _local(t)
    return local.numel() * local.element_size()


def _decoder_layers(model: Any) -> list[Any]:
    """The repeated transformer blocks, by the class names HF marks as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard")
    return layers


def _worker_logger(rank: int) -> logging.Logger:
    log = logging.getLogger(f"{__name__}.rank{rank}")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s sft %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
