"""The run-directory contract: atomic JSON, JSONL, manifests, fingerprints, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from rl_system import rundir


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.json"
    rundir.write_json(path, {"a": 1})
    rundir.write_json(path, {"a": 2})
    assert rundir.read_json(path) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_torn_json_reads_as_absent(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"runs": {"demo": ')
    assert rundir.read_json(path) is None
    assert rundir.read_json(tmp_path / "missing.json") is None


def test_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rundir.append_jsonl(path, {"i": 1})
    rundir.append_jsonl(path, {"i": 2})
    with path.open("a") as f:
        f.write('{"i": 3')
    assert rundir.read_jsonl(path) == [{"i": 1}, {"i": 2}]


def test_fingerprint_covers_section_and_inputs():
    base = rundir.fingerprint({"max_steps": 4}, {"dataset": "abc"})
    assert base == rundir.fingerprint({"max_steps": 4}, {"dataset": "abc"})
    assert base != rundir.fingerprint({"max_steps": 5}, {"dataset": "abc"})
    assert base != rundir.fingerprint({"max_steps": 4}, {"dataset": "abd"})


def test_done_needs_complete_status_and_matching_fingerprint(tmp_path):
    assert not rundir.is_done(tmp_path, "f1")
    rundir.write_manifest(tmp_path, stage="eval", fingerprint="f1", status="incomplete")
    assert not rundir.is_done(tmp_path, "f1")
    rundir.write_manifest(tmp_path, stage="eval", fingerprint="f1", status="complete")
    assert rundir.is_done(tmp_path, "f1")
    assert not rundir.is_done(tmp_path, "f2")
    (tmp_path / rundir.MANIFEST).write_text('{"stage": "ev')  # torn
    assert not rundir.is_done(tmp_path, "f1")


def test_a_changed_config_is_refused(tmp_path):
    rundir.write_manifest(tmp_path, stage="dataset", fingerprint="f1", status="incomplete")
    assert rundir.check_same_run(tmp_path, "f1", what="a dataset")["status"] == "incomplete"
    with pytest.raises(rundir.RunMismatch, match="different config"):
        rundir.check_same_run(tmp_path, "f2", what="a dataset")


def test_unwritable_run_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(rundir.RunDirUnwritable, match="run.dir"):
        rundir.check_writable(blocker / "run")


def test_second_process_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with rundir.run_lock(run, what="teams-rl build-dataset"):
        with rundir.run_lock(run):  # re-entrant in the holding process
            pass
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c",
             "import sys; from rl_system import rundir\n"
             "try:\n"
             f"    with rundir.run_lock({str(run)!r}): pass\n"
             "except rundir.RunDirLocked as e:\n"
             "    print(e); sys.exit(3)\n"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert proc.returncode == 3, proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout
        assert "teams-rl build-dataset" in proc.stdout
        assert time.monotonic() - started < 30
    # Released: the next holder gets it.
    with rundir.run_lock(run):
        pass
