"""The comparison report from two small, schema-true run directories (no model runs)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl_system.dataset import row_schema
from train.report import PLOT_TITLES, StageOutputMissing, build_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _review(gain: float) -> dict:
    return {"info_gain": gain, "info_gain_raw": 0.5 + gain / 2, "info_gain_first_order": 0.6,
            "info_gain_second_order": 0.7, "self_pair": 0.4, "eliminated": None,
            "diversity": 0.3, "query_cost": 3, "reward": gain}


def make_run(root: Path, name: str, *, strategy: str, queries_per_pair: int) -> Path:
    run = root / name
    texts = [f"Explain step {i} of baking {food} and give {i + 2} reasons why it matters."
             for i, food in enumerate(["bread", "cake", "pie", "scones", "bagels", "muffins"])]
    rows = [{
        "id": f"{name}-{i}", "seed_id": f"s{i % 3}", "seed_instruction": "Explain baking.",
        "instruction": t, "response": f"Step {i}: mix, knead, rest and bake.",
        "actions": ["deepening", "add_constraints"][: 1 + i % 2], "evolution_step": 1 + i % 2,
        "review": _review(0.1 + 0.15 * i), "expert_model": "embedded:smollm2-135m-instruct",
        "expert_queries": queries_per_pair, "expert_tokens": 40, "strategy": strategy,
        "policy_checkpoint": "ckpt" if strategy == "policy" else None,
    } for i, t in enumerate(texts)]
    (run / "dataset" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=row_schema()),
                   run / "dataset" / "data" / "part-00000.parquet")
    total = queries_per_pair * len(rows)
    (run / "dataset" / "manifest.json").write_text(json.dumps({
        "status": "complete", "strategy": strategy,
        "summary": {"eliminated": {"no_information_gain": 2, "too_short": 1},
                    "evolutions_tried": 12, "duplicates_exact": 0, "duplicates_near": 1,
                    "pairs_written": len(rows)},
        "queries": {strategy: {"expert": {"queries": total, "cached": 0}}},
        "expert_queries": total, "expert_queries_cached": 0,
        "expert_queries_per_pair": float(queries_per_pair),
    }))
    if strategy == "policy":
        (run / "policy").mkdir()
        with open(run / "policy" / "metrics.jsonl", "w") as f:
            for it in range(1, 4):
                f.write(json.dumps({
                    "iteration": it, "episode_return_mean": 0.1 * it, "info_gain": 0.2 * it,
                    "info_gain_raw": 0.5, "info_gain_first_order": 0.5,
                    "info_gain_second_order": 0.5, "diversity": 0.3, "elimination_rate": 0.1,
                    "queries_per_episode": 6.0 - it, "action_share": {"deepening": 1.0},
                    "env_steps": 60 * it, "time_s": 10.0}) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "lm_eval.json").write_text(json.dumps({
        "tasks": {"teams_rl_mc": {"acc": 0.5 + queries_per_pair / 100, "acc_stderr": 0.1,
                                  "n": 24}}}))
    roc = {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.75, 1.0]}
    (run / "eval" / "mia.json").write_text(json.dumps({
        "attacks": {a: {"auc": 0.6, "tpr_at_1pct_fpr": 0.0, "roc": roc}
                    for a in ("loss", "zlib", "min_k")}, "n_members": 6, "n_non_members": 6}))
    return run


def check_lm_eval_task(task: dict, raw: dict) -> None:
    """The summary agrees with lm-eval's own numbers and with its sample stderr."""
    n, acc = task["n"], task["acc"]
    assert acc == raw["acc,none"]
    assert acc * n == pytest.approx(round(acc * n))  # a share of n scored documents
    assert task["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)), abs=1e-9)


def check_mia_attacks(mia: dict) -> None:
    """Each attack's AUC is the area under the ROC points it wrote (recomputed)."""
    import numpy as np

    assert set(mia["attacks"]) == {"loss", "zlib", "min_k"}
    for attack in mia["attacks"].values():
        roc = attack["roc"]
        area = float(np.trapezoid(roc["tpr"], roc["fpr"]))
        assert attack["auc"] == pytest.approx(area, abs=1e-5)


@pytest.fixture()
def two_runs(tmp_path):
    return (make_run(tmp_path, "policy-run", strategy="policy", queries_per_pair=2),
            make_run(tmp_path, "wizardlm-run", strategy="wizardlm", queries_per_pair=8))


def test_report_fills_every_section(two_runs, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    report = build_report(list(two_runs), out)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["baseline"] == "wizardlm-run"
    assert set(on_disk["plots"]) == set(PLOT_TITLES)
    for key, plot in on_disk["plots"].items():
        assert plot["title"] == PLOT_TITLES[key]
        with Image.open(out / plot["file"]) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    q = report["queries"]
    assert q["policy-run"]["relative_to_baseline"] == pytest.approx(0.25)
    assert report["policy_training"]["policy-run"]["iterations"] == 3
    assert report["policy_training"]["wizardlm-run"] is None  # wizardlm trains no policy
    assert report["benchmarks"]["policy-run"]["teams_rl_mc"]["acc"] == pytest.approx(0.52)
    assert report["quality"]["wizardlm-run"]["elimination"]["total"] == 3
    assert report["quality"]["policy-run"]["embedding"]["dispersion"] > 0
    md = (out / "report.md").read_text()
    for heading in ("Policy training", "Expert queries", "Dataset quality", "Benchmarks",
                    "membership inference", "Where the evaluation time went"):
        assert heading in md
    assert "teams_rl_mc" in md and "policy-run" in md and "wizardlm-run" in md


@pytest.mark.parametrize(("remove", "stage"), [
    ("policy/metrics.jsonl", "policy"),
    ("eval/lm_eval.json", "benchmarks"),
    ("eval/mia.json", "privacy"),
    ("dataset/data/part-00000.parquet", "dataset"),
])
def test_missing_stage_output_is_named(two_runs, tmp_path, remove, stage):
    policy_run = two_runs[0]
    (policy_run / remove).unlink()
    with pytest.raises(StageOutputMissing) as err:
        build_report(list(two_runs), tmp_path / "report")
    msg = str(err.value)
    assert "'policy-run'" in msg and f"stage '{stage}'" in msg and "teams-rl" in msg
    assert not (tmp_path / "report" / "report.json").exists()
