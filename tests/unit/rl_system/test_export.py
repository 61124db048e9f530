"""``teams-rl export``: a complete dataset's parquet + card, to a local folder (round-tripped
through ``datasets``) or to the Hub (``huggingface_hub`` stubbed: these tests are offline)."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from rl_system.cli import main
from rl_system.dataset.export import ExportError, export_files, export_to_dir, export_to_hub
from rl_system.dataset.outputs import _write_outputs, write_card
from rl_system.rundir import COMPLETE, INCOMPLETE, write_manifest
from tests.unit.rl_system.test_dataset_card import USAGE, _row

SECRET = "hf_not-a-real-token-but-never-print-it"


def _built(dataset_dir, *, status=COMPLETE, rows=3):
    dataset_dir.mkdir(parents=True, exist_ok=True)
    files = _write_outputs(dataset_dir, [_row(n) for n in range(rows)])
    files["card"] = write_card(dataset_dir, license="apache-2.0", strategy="policy",
                               policy_checkpoint=None, expert_model="embedded:tiny",
                               judge="equality", pairs=rows, expert_usage=USAGE)
    write_manifest(dataset_dir, stage="dataset", fingerprint="f" * 16, status=status,
                   files=files)
    return dataset_dir


def test_export_to_dir_round_trips_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = _built(tmp_path / "run" / "dataset")

    out = export_to_dir(src, f"file://{tmp_path / 'repo'}")

    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "data/part-00000.parquet"]
    for ds in (datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c")),
               datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"),
                                     split="train", cache_dir=str(tmp_path / "c"))):
        assert ds.num_rows == 3
        assert sorted(ds["id"]) == ["p0", "p1", "p2"]
        assert isinstance(ds.features["review"], dict)  # a struct, not a JSON string
        assert ds.features["review"]["info_gain"].dtype == "float64"
        assert isinstance(ds.features["actions"], datasets.List | datasets.Sequence)
        assert ds[0]["actions"] == ["deepening"]


def test_reexport_replaces_older_shards(tmp_path):
    src = _built(tmp_path / "dataset")
    stale = tmp_path / "repo" / "data" / "part-00007.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    export_to_dir(src, tmp_path / "repo")
    assert not stale.exists()


@pytest.mark.parametrize("status", [INCOMPLETE, "running"])
def test_an_unfinished_dataset_is_refused(tmp_path, status):
    src = _built(tmp_path / "dataset", status=status)
    with pytest.raises(ExportError, match=f"'{status}', not complete"):
        export_to_dir(src, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_no_dataset_and_an_empty_one_are_refused(tmp_path):
    with pytest.raises(ExportError, match="no built dataset"):
        export_files(tmp_path / "nothing")
    with pytest.raises(ExportError, match="no pairs"):
        export_files(_built(tmp_path / "empty", rows=0))


def test_hub_without_token_is_refused_before_any_call(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ExportError, match="export HF_TOKEN"):
        export_to_hub(_built(tmp_path / "dataset"), "user/demo")


def test_hub_offline_or_unreachable_fails_fast_without_the_token(tmp_path, monkeypatch):
    src = _built(tmp_path / "dataset")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE") as offline:
        export_to_hub(src, "user/demo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    started = time.monotonic()
    with pytest.raises(ExportError, match="cannot reach the Hugging Face Hub") as down:
        export_to_hub(src, "user/demo")
    assert time.monotonic() - started < 10
    assert SECRET not in str(offline.value) + str(down.value)


def test_hub_path_creates_the_dataset_repo_and_uploads_parquet_and_card(tmp_path,
                                                                         monkeypatch):
    import huggingface_hub

    import rl_system.dataset.export as export

    calls = {}

    class FakeApi:
        def __init__(self, *, endpoint, token):
            calls["init"] = {"endpoint": endpoint, "token": token}

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, **kwargs):
            calls["upload_folder"] = kwargs

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(export, "_check_hub_reachable", lambda endpoint: None)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    logged: list[str] = []
    src = _built(tmp_path / "dataset")

    url = export_to_hub(src, "user/demo", private=True, log=logged.append)

    assert url == "https://huggingface.co/datasets/user/demo"
    assert calls["init"]["token"] == SECRET
    assert calls["create_repo"] == ("user/demo", {"repo_type": "dataset", "private": True,
                                                  "exist_ok": True})
    up = calls["upload_folder"]
    assert up["repo_type"] == "dataset" and up["folder_path"] == src
    assert up["allow_patterns"] == ["data/part-00000.parquet", "README.md"]
    assert SECRET not in "".join(logged)


def test_cli_export_to_dir_and_option_checks(tmp_path):
    _built(tmp_path / "runs" / "demo" / "dataset")
    run_dir = [f"--set=run.dir={tmp_path / 'runs'}"]

    ok = CliRunner().invoke(main, ["export", *run_dir, "--to-dir", str(tmp_path / "repo")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "repo" / "README.md").is_file()

    both = CliRunner().invoke(main, ["export", *run_dir, "--to-dir", "x", "--to-hub", "u/d"])
    neither = CliRunner().invoke(main, ["export", *run_dir])
    assert both.exit_code == neither.exit_code == 2
    assert "exactly one of --to-hub" in neither.output

    missing = CliRunner().invoke(main, ["export", "--set=run.name=other", *run_dir,
                                        "--to-dir", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "no built dataset" in missing.output
