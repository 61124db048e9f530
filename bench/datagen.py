"""Stage-2 data generation: the trained policy vs the WizardLM (Evol-Instruct) baseline.

    .venv/bin/python bench/datagen.py [--seeds 4] [--max-steps 2] [--rounds 2]

Starts a local Ray, serves the embedded SmolLM2 (expert and reviewer), trains a short
stage-1 policy (1 iteration, tiny batch; or ``--policy-checkpoint DIR``), then builds the
dataset from the same seeds with ``policy`` and with ``wizardlm`` and prints one JSON line:

    {"bench": "datagen", "figures": {"policy": {...}, "wizardlm": {...}}, "ratio": ...}

Figures per strategy: expert queries per accepted pair, pairs per minute, mean reviewer
info_gain of the kept instructions. ``ratio`` = wizardlm's expert queries per pair over
the policy's (> 1: the policy needs fewer expert queries per pair); ``ratios`` gives
policy / wizardlm for every figure. Outputs go under a temporary run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _figures(manifest: dict, cfg) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(cfg.stage_dir("dataset") / "data")
    gains = [r["info_gain"] for r in table.column("review").to_pylist()]
    pairs = manifest["summary"]["pairs_written"]
    minutes = manifest["elapsed_s"] / 60
    return {
        "pairs": pairs,
        "expert_queries": manifest["expert_queries"] + manifest["expert_queries_cached"],
        "expert_queries_per_pair": manifest["expert_queries_per_pair"],
        "pairs_per_minute": pairs / minutes if minutes else None,
        "mean_info_gain": sum(gains) / len(gains) if gains else None,
        "elapsed_s": manifest["elapsed_s"],
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="wizardlm rounds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--policy-checkpoint", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from rl_system.config import load_config
    from rl_system.dataset import build_dataset
    from rl_system.policy import latest_checkpoint, train_policy
    from serve.app import deploy

    run_dir = tempfile.mkdtemp(prefix="bench-datagen-")
    base = [
        f"serve.port={_free_port()}", f"run.dir={run_dir}", "policy.num_env_runners=0",
        "policy.iterations=1", "policy.train_batch_size=8", f"policy.max_steps={args.max_steps}",
        f"dataset.num_seeds={args.seeds}", f"dataset.wizardlm_rounds={args.rounds}",
        f"models.expert.sampling.max_tokens={args.max_tokens}",
        f"models.instructor.sampling.max_tokens={args.max_tokens}",
    ]
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        deploy(load_config("configs/demo.yaml", base))
        checkpoint = args.policy_checkpoint
        if checkpoint is None:
            stage1 = load_config("configs/demo.yaml", [*base, "run.name=stage1"])
            train_policy(stage1, log=lambda _: None)
            checkpoint = str(latest_checkpoint(stage1))
        figures = {}
        for strategy in ("policy", "wizardlm"):
            cfg = load_config("configs/demo.yaml", [
                *base, f"run.name={strategy}", f"dataset.strategy={strategy}",
                f"dataset.policy_checkpoint={checkpoint}",
            ])
            started = time.monotonic()
            manifest = build_dataset(cfg, log=lambda _: None)
            figures[strategy] = _figures(manifest, cfg)
            figures[strategy]["wall_s"] = round(time.monotonic() - started, 1)
    finally:
        ray.shutdown()
    p, w = figures["policy"], figures["wizardlm"]
    ratios = {k: _ratio(p[k], w[k]) for k in
              ("expert_queries_per_pair", "pairs_per_minute", "mean_info_gain")}
    print(json.dumps({
        "bench": "datagen", "figures": figures, "ratios_policy_over_wizardlm": ratios,
        "ratio": _ratio(w["expert_queries_per_pair"], p["expert_queries_per_pair"]),
    }))


if __name__ == "__main__":
    main()
