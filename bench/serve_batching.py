"""Completions per second through Serve at 16 concurrent requests: batch 8 vs batch 1.

    .venv/bin/python bench/serve_batching.py [--requests 48] [--max-tokens 32]

Same prompts, same greedy ``max_tokens``, same replica (embedded SmolLM2 on CPU); only
``serve.max_batch_size`` changes. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

PROMPTS = [
    "Describe how a bicycle gear works.",
    "Write a short note inviting a friend to lunch.",
    "Explain why the sky looks blue.",
    "List three ways to save water at home.",
    "Summarise the plot of a detective story in two sentences.",
    "Give advice to someone learning to cook.",
    "Explain what a prime number is.",
    "Describe the smell of rain.",
]


async def _drive(client, n_requests: int, concurrency: int, max_tokens: int) -> dict:
    from serve.protocol import ChatMessage, GenerationRequest

    gate = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with gate:
            req = GenerationRequest(
                messages=[ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])],
                max_tokens=max_tokens, temperature=0.0,
            )
            return (await client.agenerate([req]))[0]

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n_requests)))
    elapsed = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"completions_per_s": n_requests / elapsed, "tokens_per_s": tokens / elapsed,
            "wall_s": elapsed, "completion_tokens": tokens}


def run_case(max_batch_size: int, *, n_requests: int, concurrency: int, max_tokens: int) -> dict:
    from ray import serve

    from rl_system.config import load_config
    from serve.app import build_app
    from serve.client import LLMClient

    name = f"bench-batch{max_batch_size}"
    cfg = load_config("configs/demo.yaml", [
        f"serve.app_name={name}", f"serve.max_batch_size={max_batch_size}",
        "serve.batch_wait_timeout_s=0.02", f"serve.max_ongoing_requests={concurrency * 2}",
    ])
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    client = LLMClient.from_config(cfg, "expert", transport="handle")
    asyncio.run(_drive(client, concurrency, concurrency, max_tokens))  # warm-up
    figures = asyncio.run(_drive(client, n_requests, concurrency, max_tokens))
    serve.delete(name)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        kwargs = dict(n_requests=args.requests, concurrency=args.concurrency,
                      max_tokens=args.max_tokens)
        batched = run_case(8, **kwargs)
        unbatched = run_case(1, **kwargs)
    finally:
        ray.shutdown()
    print(json.dumps({
        "bench": "serve_batching",
        "figures": {"max_batch_size_8": batched, "max_batch_size_1": unbatched, **kwargs},
        "ratio": round(batched["completions_per_s"] / unbatched["completions_per_s"], 2),
    }))


if __name__ == "__main__":
    main()
