"""Stage 3's worker side: one rank's share of the fine-tune, in torchtune's shape.

:func:`train_loop_per_worker` is the ``TorchTrainer`` entry point the driver
(``train.sft.run_sft``) starts on every worker; it runs :class:`SFTRecipe` top to bottom:

- ``setup``: the model sharded with FSDP2 ``fully_shard`` per decoder layer then the
  root, or wrapped in DDP (``train.parallel.wrap_for_training``); AdamW; resume from Ray
  Train's newest checkpoint;
- ``train``: gradient accumulation, token-weighted loss (:func:`token_loss_sum`),
  clipping, linear warm-up + cosine learning rate (:func:`lr_at`), eval loss every K
  steps, progress reports to ``metrics.jsonl`` and Ray metrics (rank 0);
- ``save_checkpoint``: sharded, torch.distributed.checkpoint, into Ray Train's storage;
- ``export_hf``: the full weights gathered to rank 0, a ``from_pretrained``-loadable dir.

Torch, transformers and Ray Train are imported where used: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rl_system.config import ConfigError, SFTConfig
from rl_system.metrics import sft_metrics
from train.data import IGNORE_INDEX, collate, load_tokenizer
from train.parallel import _local, _nbytes, wrap_for_training

FINAL_MARKER = "teams_rl_sft.json"
TRAINER_STATE = "trainer_state.json"
FAIL_ONCE_MARKER = "fail_once_at_step.done"


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


def _reportable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if v is not None}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    from rl_system.rundir import append_jsonl

    append_jsonl(path, record)


def _worker_logger(rank: int) -> logging.Logger:
    log = logging.getLogger(f"{__name__}.rank{rank}")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s sft %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
