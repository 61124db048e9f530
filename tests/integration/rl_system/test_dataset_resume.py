"""Stage 2 resume, budget and bad input, with the scripted backend as expert and reviewer.

The scripted backend (a deterministic test double with a fixed latency) makes the kill
timing reliable; the real-model paths are in ``test_dataset_real_model.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from rl_system.config import load_config
from rl_system.dataset import DatasetRunMismatch, build_dataset, check_inputs
from rl_system.seeds import SeedFileError
from rl_system.strategies import PolicyCheckpointError

pytestmark = pytest.mark.slow

SEEDS = [
    "How do tides work?", "Write a haiku about autumn rain.", "Explain binary search.",
    "What causes inflation?", "Describe how vaccines train the immune system.",
    "Compare TCP and UDP.",
]
SCRIPT = {
    "rules": [
        {"contains": "EMPTYME", "reply": ""},
        {"contains": "<<<", "reply": "{instruction} Give one concrete example too."},
    ],
    "default": "Answer to: {last_user}",
    "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
    "latency_s": 0.1,  # enough for the SIGKILL test to land mid-build
}


def _scripted_cfg(serve_port, run_dir, app, extra=(), script=SCRIPT, reviewer_script=SCRIPT):
    cfg = load_config(None, [
        f"serve.port={serve_port}", f"serve.app_name={app}", f"run.dir={run_dir}",
        "models.expert.backend=scripted", f"models.expert.model={app}-expert",
        "models.reviewer.backend=scripted", f"models.reviewer.model={app}-reviewer",
        "models.instructor.backend=scripted", f"models.instructor.model={app}-expert",
        "policy.max_steps=2", "dataset.strategy=wizardlm", "dataset.wizardlm_rounds=2",
        "serve.batch_wait_timeout_s=0", *extra,
    ])
    cfg.models.expert.script = cfg.models.instructor.script = script
    cfg.models.reviewer.script = reviewer_script
    return cfg


@pytest.fixture(scope="module")
def scripted(serve_port, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("ds")
    seeds = root / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "instruction": t}) + "\n"
                             for i, t in enumerate(SEEDS)))
    cfg = _scripted_cfg(serve_port, root / "runs", "dsresume", [f"dataset.seeds={seeds}"])
    serve.run(build_app(cfg), name="dsresume", route_prefix="/dsresume")
    yield cfg
    serve.delete("dsresume")


def _ids(cfg):
    table = pq.read_table(cfg.stage_dir("dataset") / "data")
    return sorted(table.column("id").to_pylist())


def _expert_cache_lines(cache_dir) -> int:
    if not cache_dir.is_dir():
        return 0
    return sum(len(f.read_text().splitlines()) for f in cache_dir.glob("*.jsonl"))


def test_sigkill_then_resume_gives_same_rows_without_repaying(scripted, tmp_path):
    import ray

    full = scripted.model_copy(deep=True)
    full.run.name = "full"
    started = time.monotonic()
    reference = build_dataset(full)
    assert reference["status"] == "complete" and reference["summary"]["pairs_written"] > 0
    assert reference["expert_queries_cached"] == 0

    killed = scripted.model_copy(deep=True)
    killed.run.name = "killed"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(killed.to_portable_dict()))
    code = (
        "import json, sys, ray\n"
        "from rl_system.config import TeamsRLConfig\n"
        "from rl_system.dataset import build_dataset\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "build_dataset(TeamsRLConfig.model_validate(json.load(open(sys.argv[2]))))\n"
    )
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", code, address, str(cfg_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    cache_dir = killed.stage_dir("dataset") / "cache"
    deadline = time.monotonic() + 180
    while _expert_cache_lines(cache_dir) < 8 and time.monotonic() < deadline:
        assert proc.poll() is None, "the build finished before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed.stage_dir("dataset") / "manifest.json").read_text())
    assert manifest["status"] == "running"
    at_kill = [json.loads(line)["key"] for f in cache_dir.glob("*.jsonl")
               for line in f.read_text().splitlines() if line.endswith("}")]

    resumed = build_dataset(killed)
    assert resumed["status"] == "complete"
    assert _ids(killed) == _ids(full)
    assert len(set(_ids(killed))) == len(_ids(killed))
    seeds_in_rows = set(pq.read_table(killed.stage_dir("dataset") / "data")
                        .column("seed_id").to_pylist())
    assert seeds_in_rows == set(pq.read_table(full.stage_dir("dataset") / "data")
                                .column("seed_id").to_pylist())
    # cached answers are replayed, not paid again; the logical total is unchanged
    total = reference["expert_queries"] + reference["expert_queries_cached"]
    assert resumed["expert_queries_cached"] > 0
    assert resumed["expert_queries"] + resumed["expert_queries_cached"] == total
    assert resumed["expert_queries"] <= total - resumed["expert_queries_cached"]
    assert len(at_kill) >= 8
    print(f"resume: {len(at_kill)} cache lines at kill; resumed paid "
          f"{resumed['expert_queries']} cached {resumed['expert_queries_cached']} of {total}; "
          f"{time.monotonic() - started:.0f} s")

    # a finished run is not redone; a changed experiment is refused, naming run.name
    assert build_dataset(killed)["status"] == "complete"
    changed = killed.model_copy(deep=True)
    changed.dataset.dedupe_threshold = 0.5
    with pytest.raises(DatasetRunMismatch, match="run.name"):
        build_dataset(changed)


def test_budget_stops_cleanly_and_resumes(scripted):
    cfg = scripted.model_copy(deep=True)
    cfg.run.name = "budget"
    cfg.dataset.max_expert_queries = 4
    first = build_dataset(cfg)
    assert first["status"] == "incomplete" and first["summary"]["seeds_incomplete"] > 0
    assert first["expert_queries"] <= 4
    cfg.dataset.max_expert_queries = None  # the budget is not part of the config hash
    second = build_dataset(cfg)
    assert second["status"] == "complete" and second["expert_queries_cached"] >= 1
    full = scripted.model_copy(deep=True)
    full.run.name = "budget-ref"
    build_dataset(full)
    assert _ids(cfg) == _ids(full)


def test_bad_seeds_and_empty_rewrites(scripted, tmp_path):
    seeds = tmp_path / "bad.jsonl"
    seeds.write_text(
        '{"id": "a", "instruction": "Explain photosynthesis."}\n'
        '{"id": "b", "instruction": \n'
        '{"id": "c", "instruction": "   "}\n'
        '{"id": "d", "instruction": "EMPTYME rewrite me"}\n'
    )
    cfg = scripted.model_copy(deep=True)
    cfg.run.name = "badseeds"
    cfg.dataset.seeds = str(seeds)
    with pytest.raises(SeedFileError, match=r"bad\.jsonl:2"):
        check_inputs(cfg)
    cfg.dataset.skip_bad_lines = True
    manifest = build_dataset(cfg)
    s = manifest["summary"]
    assert (s["seeds_read"], s["seeds_skipped_bad"], s["seeds_skipped_empty"]) == (2, 1, 1)
    assert s["eliminated"]["too_short"] == 2  # seed d: both rewrites came back empty
    seeds_in_rows = set(pq.read_table(cfg.stage_dir("dataset") / "data")
                        .column("seed_id").to_pylist())
    assert seeds_in_rows == {"a"}


def test_erroring_expert_is_counted_and_run_continues(serve_port, scripted, tmp_path):
    from ray import serve

    from serve.app import build_app

    cfg = _scripted_cfg(serve_port, tmp_path, "dserr",
                        [f"dataset.seeds={scripted.dataset.seeds}", "dataset.num_seeds=2"],
                        script={"error": "expert is down"})
    serve.run(build_app(cfg), name="dserr", route_prefix="/dserr")
    try:
        manifest = build_dataset(cfg)
    finally:
        serve.delete("dserr")
    s = manifest["summary"]
    assert manifest["status"] == "complete" and s["pairs_written"] == 0
    assert s["evolutions_failed"] == s["evolutions_tried"] == 4
    assert manifest["queries"]["wizardlm"]["expert"]["failures"] == 4


def test_missing_or_incompatible_checkpoint_fails_before_any_query(scripted, tmp_path):
    cfg = scripted.model_copy(deep=True)
    cfg.run.name = "nockpt"
    cfg.dataset.strategy = "policy"
    with pytest.raises(PolicyCheckpointError, match="train-policy"):
        build_dataset(cfg)
    assert not (cfg.stage_dir("dataset") / "cache").exists()
    assert not (cfg.stage_dir("dataset") / "manifest.json").exists()
