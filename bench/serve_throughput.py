"""The embedded model through our transformers backend: generate tokens/s and score items/s,
the previous settings against today's, in one run, beside the memory-bandwidth bound.

    .venv/bin/python bench/serve_throughput.py [--rounds 3] [--max-tokens 64]

- ``generate``: greedy, ``--max-tokens`` new tokens, batch 1 and batch 8, in fp32 (the
  previous backend) and in the dtype ``models.<role>.dtype: auto`` picks on this machine
  (bf16 where the CPU has native bf16, else fp32 again). The greedy texts are compared.
- ``score``: the reviewer's requests (an equality prompt per pair, two labels), batches
  of 8, with the LM head over every position (the previous backend) and over the
  candidate positions only (today's); the largest log-prob difference is reported.
- the bound: a decode step reads every weight once, so batch-1 decode cannot beat
  copy bandwidth / weight bytes (a copy is measured here: read plus write).

In-process (no Serve hop): the figures are the backend's, the ceiling for what Serve
delivers. Prints one JSON line; ratios are the ones to read, absolute figures move with
the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# The same prompts as bench/serve_batching.py (this folder is on sys.path when run).
from serve_batching import PROMPTS  # noqa: E402


def copy_bandwidth_gb_s(size_mb: int = 512, rounds: int = 5) -> float:
    src = np.ones(size_mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9  # bytes read plus bytes written


def _best_of(fn, rounds: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def generate_figures(backend, *, max_tokens: int, rounds: int) -> dict:
    from serve.protocol import ChatMessage, GenerationRequest

    def requests(n):
        return [GenerationRequest(messages=[ChatMessage(role="user", content=p)],
                                  temperature=0.0, max_tokens=max_tokens)
                for p in (PROMPTS * 2)[:n]]

    out = {}
    for batch in (1, 8):
        wall_s, completions = _best_of(lambda b=batch: backend.generate(requests(b)), rounds)
        tokens = sum(c.completion_tokens for c in completions)
        out[f"batch_{batch}"] = {"tokens_per_s": round(tokens / wall_s, 1),
                                 "texts": [c.text for c in completions]}
    return out


def score_requests(n: int):
    from rl_system.judges import judge_requests
    from serve.protocol import ChatMessage, ScoreRequest

    pairs = [(p, p.rstrip(".") + ", for a reader of twelve, in under 100 words.")
             for p in PROMPTS]
    items = [item for b, a in pairs for item in judge_requests("equality", b, a)][:n]
    return [ScoreRequest(messages=[ChatMessage(role="user", content=prompt)],
                         candidates=list(labels)) for prompt, labels in items]


def full_projection_score(backend, requests) -> list[list[float]]:
    """The previous score path: log-softmax over the vocabulary at every position."""
    rows, spans = [], []
    for req in requests:
        prompt = backend._encode(backend._render(req))
        for cand in req.candidates:
            ids = backend._encode(cand)
            rows.append(prompt + ids)
            spans.append((len(prompt), len(prompt) + len(ids)))
    logp, input_ids = backend._forward_logp(rows)
    flat = [float(logp[r, s - 1:e - 1].gather(-1, input_ids[r, s:e, None]).sum())
            for r, (s, e) in enumerate(spans)]
    out, k = [], 0
    for req in requests:
        out.append(flat[k:k + len(req.candidates)])
        k += len(req.candidates)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3, help="Best of N per figure.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from serve.backends.transformers_backend import TransformersBackend
    from serve.devices import cpu_has_native_bf16, resolve_dtype

    auto = resolve_dtype("auto", "cpu")
    backends = {}
    for dtype in dict.fromkeys(["float32", auto]):
        b = TransformersBackend(args.model, device="cpu", dtype=dtype, torch_threads=args.threads)
        b.load()
        backends[dtype] = b
    fp32 = backends["float32"]
    weight_bytes = {d: sum(p.numel() * p.element_size() for p in b._model.parameters())
                    for d, b in backends.items()}

    generate = {d: generate_figures(b, max_tokens=args.max_tokens, rounds=args.rounds)
                for d, b in backends.items()}
    requests = score_requests(8)
    old_s, old = _best_of(lambda: full_projection_score(fp32, requests), args.rounds)
    new_s, new = _best_of(lambda: [r.logprobs for r in fp32.score(requests)], args.rounds)
    drift = max(abs(a - b) for o, n in zip(old, new, strict=True)
                for a, b in zip(o, n, strict=True))

    bandwidth = copy_bandwidth_gb_s()
    texts_equal = generate["float32"]["batch_8"]["texts"] == generate[auto]["batch_8"]["texts"]
    for figures in generate.values():
        for batch in figures.values():
            batch.pop("texts")
    print(json.dumps({
        "bench": "serve_throughput",
        "model": args.model,
        "threads": args.threads,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "auto_dtype": auto,
        "generate_tokens_per_s": generate,
        "generate_greedy_texts_equal_fp32_vs_auto": texts_equal,
        "score_items_per_s": {"full_projection": round(len(requests) / old_s, 2),
                              "candidate_positions": round(len(requests) / new_s, 2)},
        "score_speedup": round(old_s / new_s, 2),
        "score_max_abs_logprob_drift": drift,
        "copy_bandwidth_gb_s": round(bandwidth, 1),
        "weight_bytes": weight_bytes,
        # one read of the weights per step at between half and all of the copy rate
        "batch1_decode_bound_tokens_per_s": {
            d: [round(bandwidth * 1e9 / 2 / n, 1), round(bandwidth * 1e9 / n, 1)]
            for d, n in weight_bytes.items()},
    }))


if __name__ == "__main__":
    main()
