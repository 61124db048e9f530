"""Stage 3/4 "done" is a fingerprint chain: eval <- SFT final <- dataset manifest (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from rl_system.config import load_config
from rl_system.dataset import row_schema
from rl_system.rundir import write_manifest
from train.recipe import FINAL_MARKER
from train.report import eval_fingerprint, report_is_done
from train.sft import sft_fingerprint, sft_is_done


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.dir={tmp_path}", "dataset.strategy=wizardlm", *extra])


def _finished_run(tmp_path):
    """A run whose dataset, SFT and evaluation all finished, as the stages leave them."""
    cfg = _cfg(tmp_path)
    data = cfg.stage_dir("dataset") / "data"
    data.mkdir(parents=True)
    row = {"id": "a", "seed_id": "s", "seed_instruction": "x", "instruction": "y",
           "response": "z", "actions": ["deepening"], "evolution_step": 1, "review": None,
           "expert_model": "m", "expert_queries": 1, "expert_tokens": 2,
           "strategy": "wizardlm", "policy_checkpoint": None}
    pq.write_table(pa.Table.from_pylist([row], schema=row_schema()), data / "part-00000.parquet")
    write_manifest(cfg.stage_dir("dataset"), stage="dataset", fingerprint="d1",
                   status="complete", summary={"pairs_written": 1},
                   files={"parquet": ["data/part-00000.parquet"]})
    final = cfg.stage_dir("sft") / "final"
    final.mkdir(parents=True)
    (final / FINAL_MARKER).write_text(json.dumps({"plan_key": sft_fingerprint(cfg)}))
    eval_dir = cfg.stage_dir("eval")
    eval_dir.mkdir()
    for name in ("lm_eval.json", "mia.json", "report.json"):  # what main's check looked at
        (eval_dir / name).write_text(json.dumps({"runs": {}}))
    write_manifest(eval_dir, stage="eval", fingerprint=eval_fingerprint(cfg), status="complete")
    return cfg


def test_finished_run_is_done(tmp_path):
    cfg = _finished_run(tmp_path)
    assert sft_is_done(cfg) and report_is_done(cfg)
    # operational keys do not make evaluation stale
    assert report_is_done(_cfg(tmp_path, "eval.num_gpus=1", "eval.timeout_s=10"))


def test_retrained_sft_makes_evaluation_stale(tmp_path):
    _finished_run(tmp_path)
    changed = _cfg(tmp_path, "sft.max_steps=7")
    assert not sft_is_done(changed)
    assert not report_is_done(changed)


def test_a_dataset_that_grew_makes_sft_and_evaluation_stale(tmp_path):
    cfg = _finished_run(tmp_path)
    # same dataset config, but a resumed build wrote more pairs
    write_manifest(cfg.stage_dir("dataset"), stage="dataset", fingerprint="d1",
                   status="complete", summary={"pairs_written": 2},
                   files={"parquet": ["data/part-00000.parquet"]})
    assert not sft_is_done(cfg) and not report_is_done(cfg)


def test_truncated_report_is_redone_not_crashed_on(tmp_path):
    cfg = _finished_run(tmp_path)
    path = cfg.stage_dir("eval") / "report.json"
    path.write_text(path.read_text()[:5])
    assert not report_is_done(cfg)


def test_a_changed_eval_key_is_stale(tmp_path):
    _finished_run(tmp_path)
    assert not report_is_done(_cfg(tmp_path, "eval.mia_samples=3"))
