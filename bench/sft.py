"""Benchmark: FSDP vs DDP for the SFT stage, 2 Ray Train workers, same model, data, steps.

Run: ``python bench/sft.py`` (``make bench`` runs every bench). Takes a few minutes on
a 2-core CPU machine. Prints one JSON line::

    {"bench": "sft", "figures": {"fsdp": {...}, "ddp": {...}, ...}, "ratio": <float>}

``ratio`` is FSDP's model-state bytes per worker over DDP's: parameters + gradients +
AdamW state, summed from the tensors (FSDP: the local shards) each rank holds right
after its first optimizer step, as logged by ``train.recipe``. Expect about 0.5 with two
workers. ``tokens_per_s`` counts input tokens of all workers over the steps after the
first (warm-up) one; compare the two strategies by ``tokens_per_s_ratio``, not by
absolute figures, since these machines are shared.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

NUM_WORKERS = 2
STEPS = 6
MAX_SEQ_LEN = 128
BATCH_SIZE = 2


def write_dataset(path: Path, n: int = 64) -> Path:
    """Deterministic instruction/response records (DESIGN §3 columns that SFT reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(n):
        a, b = 3 * i + 7, 5 * i + 11
        rows.append({
            "id": f"bench-{i:03d}",
            "instruction": f"Add {a} and {b}, then explain each step of the sum briefly.",
            "response": (
                f"Start with {a}. Adding {b} gives {a + b}. The tens and the units were "
                f"added separately and carried where needed, so the total is {a + b}."
            ),
        })
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def measure(strategy: str, *, root: Path, data: Path) -> dict[str, float]:
    from rl_system.config import TeamsRLConfig
    from train.sft import run_sft

    cfg = TeamsRLConfig.model_validate({
        "run": {"name": f"bench-{strategy}", "dir": str(root)},
        "sft": {
            "num_workers": NUM_WORKERS,
            "strategy": strategy,
            "max_seq_len": MAX_SEQ_LEN,
            "batch_size_per_worker": BATCH_SIZE,
            "max_steps": STEPS,
            "eval_fraction": 0.0,
            "checkpoint_every_steps": 10 * STEPS,  # only the final one
            "learning_rate": 1e-5,
        },
    })
    started = time.monotonic()
    run_sft(cfg, dataset_path=data)
    wall = time.monotonic() - started
    log = [json.loads(line) for line in
           (cfg.stage_dir("sft") / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["event"] == "step" and e["step"] > 1]
    memory = next(e for e in log if e["event"] == "memory")
    tokens = sum(e["tokens"] for e in steps)
    seconds = sum(e["step_time_s"] for e in steps)
    return {
        "tokens_per_s": round(tokens / seconds, 2),
        "model_state_bytes_per_worker": max(memory["model_state_bytes"]),
        "param_bytes_per_worker": max(memory["param_bytes"]),
        "grad_bytes_per_worker": max(memory["grad_bytes"]),
        "optim_bytes_per_worker": max(memory["optim_bytes"]),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    if not ray.is_initialized():
        # Logical CPUs may exceed physical ones (DESIGN §5): the workers need 2, Ray Data a few.
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="teams-rl-bench-sft-") as tmp:
        root = Path(tmp)
        data = write_dataset(root / "records.parquet")
        figures = {s: measure(s, root=root / "runs", data=data) for s in ("fsdp", "ddp")}
    fsdp, ddp = figures["fsdp"], figures["ddp"]
    figures["tokens_per_s_ratio"] = round(fsdp["tokens_per_s"] / ddp["tokens_per_s"], 3)
    figures["setup"] = {"model": "embedded:smollm2-135m-instruct", "workers": NUM_WORKERS,
                        "steps": STEPS, "max_seq_len": MAX_SEQ_LEN, "batch_size": BATCH_SIZE}
    ratio = fsdp["model_state_bytes_per_worker"] / ddp["model_state_bytes_per_worker"]
    print(json.dumps({"bench": "sft", "figures": figures, "ratio": round(ratio, 4)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
