"""Dataset quality figures: known answers on tiny inputs (no model loads)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.quality import (
    dataset_quality,
    distinct_n,
    distribution,
    mean_pairwise_cosine_distance,
)


class HashEncoder:
    """Deterministic stand-in for MiniLM: identical texts get identical vectors."""

    def encode(self, texts):
        return np.array([[len(t), t.count("a") + 1.0, 1.0] for t in texts], dtype=np.float32)


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["one"], 2) is None


def test_dispersion_known_answers():
    assert mean_pairwise_cosine_distance(np.array([[1.0, 0], [2.0, 0]])) == pytest.approx(0.0)
    assert mean_pairwise_cosine_distance(np.array([[1.0, 0], [0, 1.0]])) == pytest.approx(1.0)
    v = np.random.default_rng(0).normal(size=(7, 5))
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    brute = np.mean([1 - u[i] @ u[j] for i in range(7) for j in range(i + 1, 7)])
    assert mean_pairwise_cosine_distance(v) == pytest.approx(brute)
    assert mean_pairwise_cosine_distance(v[:1]) is None


def test_distribution_histogram():
    d = distribution([0.05, 0.15, 0.95, None], bins=10, value_range=(0, 1))
    assert d["n"] == 3 and sum(d["histogram"]["counts"]) == 3
    assert d["histogram"]["counts"][0] == 1 and d["histogram"]["counts"][-1] == 1
    assert distribution([])["mean"] is None


def _write(tmp_path, rows, manifest=None):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "part-00000.parquet")
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))


def _row(i, text, gain):
    return {"id": str(i), "instruction": text, "response": f"answer {i}", "strategy": "policy",
            "evolution_step": 1 + i % 2, "expert_queries": 2, "expert_tokens": 30,
            "review": {"info_gain": gain, "info_gain_raw": gain / 2, "eliminated": None}}


def test_dataset_quality_with_and_without_manifest(tmp_path):
    rows = [_row(0, "write a poem about rain", 0.2), _row(1, "write a poem about snow", 0.6),
            _row(2, "explain how a bridge carries weight", 0.9)]
    _write(tmp_path, rows)
    q = dataset_quality(tmp_path, encoder=HashEncoder())
    assert q["pairs"] == 3 and q["strategy"] == "policy"
    assert q["info_gain"]["mean"] == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert q["queries"]["source"] == "rows" and q["queries"]["expert_queries_per_pair"] == 2
    assert q["elimination"]["total"] is None
    assert 0 <= q["embedding"]["dispersion"] <= 1

    (tmp_path / "manifest.json").write_text(json.dumps({
        "strategy": "policy", "expert_queries": 9, "expert_queries_cached": 3,
        "summary": {"eliminated": {"no_gain": 4, "too_short": 1}, "evolutions_tried": 12},
    }))
    q = dataset_quality(tmp_path, encoder=HashEncoder())
    assert q["queries"]["expert_queries_total"] == 12
    assert q["queries"]["expert_queries_per_pair"] == pytest.approx(4.0)
    assert q["elimination"]["total"] == 5


def test_dataset_quality_names_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no parquet shard"):
        dataset_quality(tmp_path)
