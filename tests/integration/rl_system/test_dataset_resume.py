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


def _overrides(app, run_dir, *extra):
    """Expert and instructor share a deployment; the reviewer has its own, as a judge model."""
    return (
        f"run.dir={run_dir}", f"models.expert.model={app}-expert",
        f"models.reviewer.model={app}-reviewer", f"models.instructor.model={app}-expert",
        "policy.max_steps=2", "dataset.strategy=wizardlm", "dataset.wizardlm_rounds=2",
        # One actor per stage: each costs seconds of imports on 2 cores, and these tests
        # are about resume and failure, not the pool (the budget test keeps two).
        "serve.batch_wait_timeout_s=0", "dataset.concurrency=1", *extra,
    )


@pytest.fixture(scope="module")
def scripted(scripted_roles, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    seeds = root / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "instruction": t}) + "\n"
                             for i, t in enumerate(SEEDS)))
    with scripted_roles("dsresume", SCRIPT,
                        *_overrides("dsresume", root / "runs", f"dataset.seeds={seeds}")) as cfg:
        yield cfg


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
    cfg.dataset.concurrency = 2  # two actors draw on the one budget
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


def _expert_down(cfg, name):
    """The expert behind an OpenAI-compatible URL where nothing listens."""
    from serve.config import role_config
    from tests.integration.conftest import free_port

    down = cfg.model_copy(deep=True)
    down.run.name = name
    expert = down.models.expert
    # a role of another backend is a new role config (each backend has its own fields)
    down.models.expert = role_config(
        backend="openai", model=expert.model, sampling=expert.sampling.model_dump(),
        base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0, timeout_s=5.0)
    return down


def test_expert_down_is_incomplete_then_resumes_without_repaying(scripted):
    from rl_system.dataset import DatasetIncomplete

    ref = scripted.model_copy(deep=True)
    ref.run.name = "down-ref"
    reference = build_dataset(ref)
    # 1. a partial build (budget) leaves cached answers
    cfg = scripted.model_copy(deep=True)
    cfg.run.name = "down"
    cfg.dataset.max_expert_queries = 3
    first = build_dataset(cfg)
    assert first["status"] == "incomplete"
    # 2. the expert is down for the whole build: incomplete, the role named, stopped early
    down = _expert_down(cfg, "down")
    down.dataset.max_expert_queries = None
    with pytest.raises(DatasetIncomplete, match=r"the expert role said: .+stopped early") as e:
        build_dataset(down)
    assert e.value.manifest["status"] == "incomplete"
    manifest = json.loads((cfg.stage_dir("dataset") / "manifest.json").read_text())
    s = manifest["summary"]
    assert manifest["status"] == "incomplete" and s["first_failure"]["role"] == "expert"
    # No seed finishes from the cache alone (each needs 4 expert calls, 3 were paid), so
    # every seed fails; past dataset.max_failure_rate=0.5 (more than 3 of 6) it stops.
    assert s["seeds_incomplete_by_cause"] == {"budget": 0, "failure": 4, "stopped": 2}
    # 3. back up: completes with the reference rows; what was cached is not paid again
    cfg.dataset.max_expert_queries = None
    resumed = build_dataset(cfg)
    assert resumed["status"] == "complete"
    assert _ids(cfg) == _ids(ref)
    logical = reference["expert_queries"]
    assert resumed["expert_queries"] + resumed["expert_queries_cached"] == logical
    assert first["expert_queries"] + resumed["expert_queries"] == logical
    assert resumed["expert_queries_cached"] == first["expert_queries"]


def test_expert_down_for_the_whole_build_writes_no_shard_and_says_why(scripted):
    from rl_system.dataset import DatasetIncomplete

    down = _expert_down(scripted, "alldown")
    down.dataset.max_failure_rate = 1.0  # never stop early: every seed is tried
    with pytest.raises(DatasetIncomplete, match="6 of 6 seeds failed, the expert role"):
        build_dataset(down)
    manifest = json.loads((down.stage_dir("dataset") / "manifest.json").read_text())
    assert manifest["summary"]["seeds_incomplete_by_cause"] == {
        "budget": 0, "failure": 6, "stopped": 0}
    assert manifest["files"]["parquet"] == []
    assert not list((down.stage_dir("dataset") / "data").glob("*.parquet"))
    assert "unfinished seeds" in manifest["summary"]["empty_reason"]


def test_missing_or_incompatible_checkpoint_fails_before_any_query(scripted, tmp_path):
    cfg = scripted.model_copy(deep=True)
    cfg.run.name = "nockpt"
    cfg.dataset.strategy = "policy"
    with pytest.raises(PolicyCheckpointError, match="train-policy"):
        build_dataset(cfg)
    assert not (cfg.stage_dir("dataset") / "cache").exists()
    assert not (cfg.stage_dir("dataset") / "manifest.json").exists()


@pytest.fixture()
def lease_app(scripted_roles, scripted, tmp_path):
    """A scripted role app, recorded as started by a run (what ``ensure_deployed`` does
    when it deploys), on a route of its own so it cannot clash with other test apps."""
    from serve.app import _leases, role_fingerprint

    with scripted_roles("dslease", SCRIPT, *_overrides(
            "dslease", tmp_path / "runs", f"dataset.seeds={scripted.dataset.seeds}",
            "dataset.num_seeds=3")) as cfg:
        _leases().acquire("dslease", role_fingerprint(cfg), None, started=True)
        yield cfg
    _leases().release("dslease", None)


def test_a_run_releasing_its_lease_keeps_the_roles_another_run_uses(lease_app):
    from ray import serve

    from rl_system.config import ConfigError
    from serve.app import ensure_deployed, undeploy

    a, b = lease_app.model_copy(deep=True), lease_app.model_copy(deep=True)
    a.run.name, b.run.name = "lease-a", "lease-b"
    ensure_deployed(a, holder=str(a.run_dir))
    ensure_deployed(b, holder=str(b.run_dir))
    assert undeploy(a, holder=str(a.run_dir)) is False  # b still holds a lease
    assert serve.status().applications["dslease"].status == "RUNNING"
    assert build_dataset(b)["status"] == "complete"  # b's roles still answer
    # Other roles under the same app name are refused, not silently reused.
    other = b.model_copy(deep=True)
    other.models.expert.script = {"default": "something else"}
    with pytest.raises(ConfigError, match="serve.app_name='dslease' already runs"):
        ensure_deployed(other, holder="other")
    assert undeploy(b, holder=str(b.run_dir)) is True  # the last lease: deleted
    assert "dslease" not in serve.status().applications


def test_two_pipelines_on_one_cluster_both_finish(lease_app, monkeypatch):
    import threading

    from rl_system import pipeline

    # The stages that call the roles (policy is skipped: strategy wizardlm).
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:2])
    cfgs = []
    for name in ("pipe-a", "pipe-b"):
        c = lease_app.model_copy(deep=True)
        c.run.name = name
        cfgs.append(c)
    errors = []

    def run(c):
        try:
            pipeline.run_pipeline(c, log=lambda _: None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == []
    from ray import serve

    assert "dslease" not in serve.status().applications  # the last lease deleted them
    for c in cfgs:
        manifest = json.loads((c.stage_dir("dataset") / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["summary"]["pairs_written"] > 0


def _cli(cfg, tmp_path, name):
    import ray

    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg.to_portable_dict()))  # JSON is YAML
    return [sys.executable, "-m", "rl_system.cli", "build-dataset", "--config", str(path),
            "--address", ray.get_runtime_context().gcs_address]


def test_cli_one_build_per_run_dir_and_a_down_expert_exits_nonzero(scripted, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cfg = scripted.model_copy(deep=True)
    cfg.run.name = "cli"
    cmd = _cli(cfg, tmp_path, "cli")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
    lock = cfg.run_dir / ".lock"
    deadline = time.monotonic() + 120
    while f"pid {first.pid}" not in (lock.read_text() if lock.exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.1)
    started = time.monotonic()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    waited = time.monotonic() - started
    assert second.returncode == 1
    assert f"in use by pid {first.pid} (teams-rl build-dataset)" in second.stderr
    assert waited < 30, waited
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert "dataset build (wizardlm): complete" in out

    down = _expert_down(cfg, "cli-down")
    proc = subprocess.run(_cli(down, tmp_path, "down"), capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 1
    assert "Error: dataset incomplete" in proc.stderr and "the expert role said" in proc.stderr
    manifest = json.loads((down.stage_dir("dataset") / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert manifest["summary"]["first_failure"]["role"] == "expert"
