"""The pipeline's end-of-run table reads each stage's figures from its outputs (no Ray)."""

from __future__ import annotations

from rl_system.config import load_config
from rl_system.pipeline import stage_summary
from rl_system.rundir import append_jsonl, write_json, write_manifest


def test_summary_has_each_stages_figures(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r"])
    policy, dataset = cfg.stage_dir("policy"), cfg.stage_dir("dataset")
    sft, evaluation = cfg.stage_dir("sft"), cfg.stage_dir("eval")
    for d in (policy, dataset, sft, evaluation):
        d.mkdir(parents=True)
    write_manifest(policy, stage="policy", fingerprint="p", status="complete",
                   iterations_done=2)
    append_jsonl(policy / "metrics.jsonl", {"iteration": 2, "episode_return_mean": 0.5,
                                            "info_gain": 0.25, "elimination_rate": 0.1})
    write_manifest(dataset, stage="dataset", fingerprint="d", status="complete",
                   expert_queries=31, summary={"pairs_written": 9, "seeds_incomplete": 0,
                                               "eliminated": {"no_gain": 3, "copied": 1}})
    append_jsonl(sft / "metrics.jsonl", {"event": "step", "step": 10, "loss": 2.25})
    append_jsonl(sft / "metrics.jsonl", {"event": "eval", "step": 10, "eval_loss": 2.5})
    write_json(evaluation / "report.json", {
        "benchmarks": {"r": {"teams_rl_mc": {"acc": 0.375}}},
        "privacy": {"r": {"attacks": {"loss": {"auc": 0.5}}}}})
    rows = {line.split()[0]: line for line in
            stage_summary(cfg, {"policy": 61.0, "sft": 30.4}, ran={"policy"}).splitlines()}
    assert rows["policy"].split()[1:3] == ["61", "ran"]
    assert "iterations 2 · return 0.500 · info_gain 0.250 · eliminated 0.100" in rows["policy"]
    assert rows["dataset"].split()[1:3] == ["-", "reused"]
    assert "pairs written 9 · expert queries 31 · eliminations 4" in rows["dataset"]
    assert "steps 10 · final loss 2.250 · eval loss 2.500" in rows["sft"]
    assert "teams_rl_mc acc 0.375 · MIA loss AUC 0.500" in rows["eval"]


def test_a_strategy_without_policy_has_no_policy_row(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "dataset.strategy=wizardlm"])
    table = stage_summary(cfg, {}, ran=set())
    assert [line.split()[0] for line in table.splitlines()] == ["stage", "dataset", "sft",
                                                                "eval"]
