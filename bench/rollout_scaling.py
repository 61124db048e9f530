"""Environment steps per second with 1 vs 4 env runners against an I/O-bound model.

    .venv/bin/python bench/rollout_scaling.py [--latency-s 0.2] [--steps 240]

The instructor and reviewer are a Serve deployment of the scripted backend with a fixed
per-call latency (like a remote GPU model: waiting, not computing). Same env, same
number of steps, same algorithm (TRPO); only ``policy.num_env_runners`` changes. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def run_case(num_env_runners: int, *, steps: int, latency_s: float, run_dir: str) -> dict:
    from ray import serve

    from rl_system.config import load_config
    from rl_system.policy import algorithm_config, load_seed_instructions
    from serve.app import build_app

    cfg = load_config(None, [
        "serve.app_name=rollout-bench", "models.instructor.backend=scripted",
        "models.instructor.model=rollout-bench", f"policy.num_env_runners={num_env_runners}",
        f"policy.train_batch_size={steps}", "dataset.num_seeds=50", f"run.dir={run_dir}",
        "serve.max_batch_size=16", "serve.autoscaling.target_ongoing_requests=64",
    ])
    cfg.models.instructor.script = {
        "latency_s": latency_s,
        "rules": [{"contains": "several explicit steps", "reply": "{instruction} Show each step."}],
        "default": "{instruction} Be brief.",
        "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
    }
    cfg.models.reviewer = cfg.models.expert = cfg.models.instructor
    serve.run(build_app(cfg), name="rollout-bench", route_prefix="/rollout-bench")
    algo = algorithm_config(cfg, load_seed_instructions(cfg)).build_algo()
    try:
        algo.train()  # warm-up: env runners load the encoder, handles connect
        started = time.perf_counter()
        result = algo.train()
        wall_s = time.perf_counter() - started
    finally:
        algo.stop()
        serve.delete("rollout-bench")
    sampled = result["env_runners"]["num_env_steps_sampled"]
    return {"env_steps": int(sampled), "wall_s": wall_s, "env_steps_per_s": sampled / wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=240)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            kwargs = dict(steps=args.steps, latency_s=args.latency_s, run_dir=run_dir)
            one = run_case(1, **kwargs)
            four = run_case(4, **kwargs)
    finally:
        ray.shutdown()
    print(json.dumps({
        "bench": "rollout_scaling",
        "figures": {"env_runners_1": one, "env_runners_4": four, "latency_s": args.latency_s},
        "ratio": round(four["env_steps_per_s"] / one["env_steps_per_s"], 2),
    }))


if __name__ == "__main__":
    main()
