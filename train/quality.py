"""Dataset quality of a stage-2 run: what the pairs look like, and what they cost.

    q = dataset_quality(Path("runs/demo/dataset"))
    q["info_gain"]["mean"], q["lexical"]["distinct_2"], q["embedding"]["dispersion"]

Figures, per dataset directory (``runs/<name>/dataset``: ``data/part-*.parquet`` +
``manifest.json``):

- ``pairs``; reviewer ``info_gain`` (calibrated) and ``info_gain_raw``: mean, quantiles and
  a histogram on [0, 1];
- instruction length in words (whitespace-separated) and characters, with a histogram;
- lexical diversity, distinct-1 / distinct-2 (Li et al. 2016): distinct n-grams / all
  n-grams over every instruction (and response), lower-cased word tokens;
- embedding dispersion: mean pairwise cosine distance ``1 - cos`` of MiniLM embeddings
  (0 = all the same, ~1 = unrelated), on at most ``max_embed`` instructions;
- eliminations by rule and duplicate removals (from the manifest; stage 2 keeps only
  accepted pairs, so the rows cannot tell);
- expert queries: total (paid + cached) per pair, by role when the manifest has them.

The manifest is read defensively: missing keys give ``None``, not errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / total n-grams over ``texts`` (lower-cased words); None if none."""
    total, seen = 0, set()
    for text in texts:
        words = _WORD.findall(text.lower())
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def mean_pairwise_cosine_distance(vectors: np.ndarray) -> float | None:
    """Mean of ``1 - cos(u, v)`` over unordered pairs of rows; rows need not be unit-norm.

    (n, d) -> float; None for fewer than two rows.
    """
    n = len(vectors)
    if n < 2:
        return None
    v = np.asarray(vectors, dtype=np.float64)
    v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    # sum over all pairs of cos = (|sum v|^2 - n) / 2, so no n x n matrix is needed
    total = v.sum(axis=0)
    pair_cos = (float(total @ total) - n) / 2.0
    return 1.0 - pair_cos / (n * (n - 1) / 2.0)


def distribution(
    values: Sequence[float], *, bins: int = 10, value_range: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Mean, quantiles and a histogram (``counts`` over ``edges``) of finite ``values``."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not len(arr):
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None,
                "histogram": {"counts": [], "edges": []}}
    counts, edges = np.histogram(arr, bins=bins, range=value_range)
    return {
        "n": int(len(arr)),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p10": float(np.quantile(arr, 0.1)),
        "p90": float(np.quantile(arr, 0.9)),
        "histogram": {"counts": counts.tolist(), "edges": edges.round(6).tolist()},
    }


def dataset_files(dataset_dir: Path) -> list[Path]:
    """Parquet shards of a stage-2 directory (``data/`` first; hidden / cache dirs skipped)."""
    root = dataset_dir / "data" if (dataset_dir / "data").is_dir() else dataset_dir
    return sorted(
        p for p in root.rglob("*.parquet")
        if not any(part.startswith((".", "_")) or part == "cache"
                   for part in p.relative_to(root).parts)
    )


def read_manifest(dataset_dir: Path) -> dict[str, Any] | None:
    path = dataset_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def load_rows(dataset_dir: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for file in dataset_files(dataset_dir):
        rows.extend(pq.read_table(file).to_pylist())
    return rows


def _review(row: dict[str, Any], key: str) -> float | None:
    review = row.get("review") or {}
    value = review.get(key) if isinstance(review, dict) else None
    return float(value) if value is not None else None


def query_accounting(manifest: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict:
    """Expert queries: from the manifest when it has them, else summed from the rows."""
    pairs = len(rows)
    m = manifest or {}
    strategy = m.get("strategy") or (rows[0].get("strategy") if rows else None)
    paid = m.get("expert_queries")
    cached = m.get("expert_queries_cached") or 0
    by_role = (m.get("queries") or {}).get(strategy) if strategy else None
    from_rows = sum(int(r.get("expert_queries") or 0) for r in rows)
    total = (paid + cached) if paid is not None else from_rows
    per_pair = m.get("expert_queries_per_pair")
    if per_pair is None and pairs:
        per_pair = total / pairs
    return {
        "strategy": strategy,
        "source": "manifest" if paid is not None else "rows",
        "expert_queries_paid": paid,
        "expert_queries_cached": cached if paid is not None else None,
        "expert_queries_total": total,
        "expert_queries_in_rows": from_rows,
        "expert_queries_per_pair": per_pair,
        "expert_tokens": sum(int(r.get("expert_tokens") or 0) for r in rows),
        "by_role": by_role,
    }


def dataset_quality(
    dataset_dir: str | Path,
    *,
    encoder: Any = None,
    bins: int = 10,
    max_embed: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Quality figures of one stage-2 dataset directory (see the module docstring).

    ``encoder``: anything with ``encode(texts) -> (n, d) array`` (default: a MiniLM
    ``TextEncoder``, loaded only when there are two or more pairs). Raises
    ``FileNotFoundError`` when the directory holds no parquet shard.
    """
    import time

    started = time.monotonic()
    dataset_dir = Path(dataset_dir)
    files = dataset_files(dataset_dir)
    if not files:
        raise FileNotFoundError(
            f"{dataset_dir} holds no parquet shard (expected data/part-*.parquet); "
            "build it with `teams-rl build-dataset`"
        )
    manifest = read_manifest(dataset_dir)
    rows = load_rows(dataset_dir)
    instructions = [r.get("instruction") or "" for r in rows]
    responses = [r.get("response") or "" for r in rows]

    dispersion = None
    sample = instructions
    if len(instructions) >= 2:
        if len(instructions) > max_embed:
            pick = np.random.default_rng(seed).choice(len(instructions), max_embed, replace=False)
            sample = [instructions[i] for i in sorted(pick)]
        if encoder is None:
            from rl_system.encoders import TextEncoder

            encoder = TextEncoder()
        dispersion = mean_pairwise_cosine_distance(encoder.encode(list(sample)))

    summary = (manifest or {}).get("summary") or {}
    steps = [r.get("evolution_step") for r in rows if r.get("evolution_step") is not None]
    return {
        "dataset_dir": str(dataset_dir),
        "pairs": len(rows),
        "strategy": query_accounting(manifest, rows)["strategy"],
        "info_gain": distribution([_review(r, "info_gain") for r in rows],
                                  bins=bins, value_range=(0.0, 1.0)),
        "info_gain_raw": distribution([_review(r, "info_gain_raw") for r in rows],
                                      bins=bins, value_range=(0.0, 1.0)),
        "instruction_words": distribution([len(t.split()) for t in instructions], bins=bins),
        "instruction_chars": distribution([len(t) for t in instructions], bins=bins),
        "response_words": distribution([len(t.split()) for t in responses], bins=bins),
        "evolution_step": distribution(steps, bins=max(1, int(max(steps, default=1)))),
        "lexical": {
            "distinct_1": distinct_n(instructions, 1),
            "distinct_2": distinct_n(instructions, 2),
            "response_distinct_1": distinct_n(responses, 1),
            "response_distinct_2": distinct_n(responses, 2),
        },
        "embedding": {"dispersion": dispersion, "sampled": len(sample) if dispersion else 0},
        "elimination": {
            "source": "manifest" if summary.get("eliminated") is not None else None,
            "by_rule": summary.get("eliminated"),
            "total": sum(summary["eliminated"].values()) if summary.get("eliminated") else None,
            "evolutions_tried": summary.get("evolutions_tried"),
            "duplicates_exact": summary.get("duplicates_exact"),
            "duplicates_near": summary.get("duplicates_near"),
        },
        "queries": query_accounting(manifest, rows),
        "elapsed_s": round(time.monotonic() - started, 2),
    }
