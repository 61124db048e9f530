"""SFT's data loading on Ray Data: the held-out split keeps every seed on one side."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from rl_system.config import EMBEDDED_LLM
from train.data import load_sft_datasets


def test_heldout_split_never_shares_a_seed_with_training(ray_session, tmp_path):
    rows = [{"id": f"s{s}-{k}", "seed_id": f"s{s}", "instruction": f"Task {s}, variant {k}.",
             "response": f"Answer {s}.{k}."} for s in range(10) for k in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-00000.parquet")
    data = load_sft_datasets(tmp_path, model_ref=EMBEDDED_LLM, max_seq_len=64, packing=False,
                             eval_fraction=0.3, seed=0)
    held_seeds = {r["seed_id"] for r in data.heldout}
    assert held_seeds
    # Every evolution of a held-out seed is held out, and nothing else is.
    assert sorted(r["id"] for r in data.heldout) == sorted(
        r["id"] for r in rows if r["seed_id"] in held_seeds)
    assert data.train_rows + len(data.heldout) == len(rows)
    assert 0 < len(data.heldout) < len(rows)
