"""lm-eval end to end with the shipped local task (offline), on a tiny random-weight Llama:
these assertions are plumbing (files, counts, the Ray task, reuse); lm-eval on the real
fine-tuned SmolLM2 runs in ``tests/integration/test_strategy_comparison.py``."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rl_system.config import EvalConfig
from serve.models import resolve_model
from tests.integration.test_report import check_lm_eval_task, check_mia_attacks, make_run
from train.evaluate import TaskNotFoundError, run_lm_eval
from train.report import build_report, evaluate_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("lm_eval", reason="needs the [eval] extra: pip install 'teams-rl[eval]'")


def _cfg(tmp_path, **kw) -> EvalConfig:
    non_members = tmp_path / "heldout.jsonl"
    non_members.write_text("".join(
        json.dumps({"instruction": f"Describe how {x} are made.", "response": f"{x} are made "
                    "by hand, step by step."}) + "\n"
        for x in ("candles", "bricks", "ropes", "baskets", "kites", "boats")))
    return EvalConfig(tasks=["teams_rl_mc"], limit=8, batch_size=8, offline=True,
                      mia_non_members=str(non_members), mia_samples=6, mia_max_tokens=64, **kw)


@pytest.mark.slow
def test_local_task_end_to_end_into_the_report(tmp_path, ray_session, tiny_llama):
    """lm-eval (child process) -> eval/lm_eval.json; MIA -> eval/mia.json; report.json.

    ``eval.num_gpus=1`` (a fake GPU on the test cluster): both run in one Ray task, never
    in the driver, as on the GPU cluster."""
    run = make_run(tmp_path, "smol", strategy="wizardlm", queries_per_pair=4)
    shutil.rmtree(run / "eval")
    (run / "sft").mkdir()
    (run / "sft" / "final").symlink_to(tiny_llama)
    out = evaluate_run(run, _cfg(tmp_path, num_gpus=1), log=lambda _: None)
    task = out["lm_eval"]["tasks"]["teams_rl_mc"]
    assert task["n"] == 8
    check_lm_eval_task(task, out["lm_eval"]["raw_results"]["teams_rl_mc"])
    check_mia_attacks(out["mia"])
    pids = {out["lm_eval"]["evaluated_by_pid"], out["mia"]["evaluated_by_pid"]}
    assert len(pids) == 1 and os.getpid() not in pids
    print("timings_s", out["timings_s"], "lm_eval elapsed_s", out["lm_eval"]["elapsed_s"])
    # Made from this model with these keys: reused, not run again.
    again = evaluate_run(run, _cfg(tmp_path, num_gpus=1), log=lambda _: None)
    assert again["timings_s"] == {} and again["lm_eval"] == out["lm_eval"]

    report = build_report([run], tmp_path / "report")
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["benchmarks"]["smol"]["teams_rl_mc"]["acc"] == pytest.approx(task["acc"])
    assert "mia_roc" in report["plots"] and "benchmarks" in report["plots"]


@pytest.mark.slow
def test_unknown_task_lists_close_matches(tmp_path):
    model = resolve_model("embedded:smollm2-135m-instruct")
    with pytest.raises(TaskNotFoundError) as err:
        run_lm_eval(model, EvalConfig(tasks=["arc_eazy"], offline=True))
    msg = str(err.value)
    assert "arc_eazy" in msg and "arc_easy" in msg and "lm-eval ls tasks" in msg


def test_not_a_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        run_lm_eval(tmp_path, EvalConfig(tasks=["teams_rl_mc"]))
