"""Publish a built dataset (stage 2's parquet shards + dataset card) as a Hugging Face
dataset repository, or write the same layout to a local folder.

    teams-rl export --config configs/demo.yaml --to-hub user/teams-rl-demo   # HF_TOKEN from env
    teams-rl export --config configs/demo.yaml --to-dir /tmp/teams-rl-demo   # offline, same files

The repository gets ``data/part-*.parquet`` and ``README.md``: the card's front matter
(``configs`` -> ``data/*.parquet``, ``dataset_info.features``) is what the Hub's viewer and
``datasets.load_dataset(repo_or_dir)`` read. Only a dataset whose manifest says
``complete`` is exported; a partial or running build is refused.

The token comes from ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``) and is passed to
``huggingface_hub`` only: never logged, written or put in a message. The hub is probed
with a short TCP timeout first, so an unreachable hub is a message in seconds, not a hang.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from rl_system.dataset.outputs import CARD, DATA_DIR
from rl_system.hub import hub_endpoint, hub_unreachable
from rl_system.rundir import COMPLETE, read_manifest
from serve.errors import MissingExtra, TeamsRLError

logger = logging.getLogger(__name__)

TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class ExportError(TeamsRLError):
    """The dataset cannot be exported: not complete, no token, hub unreachable or refusing."""


def export_files(dataset_dir: str | os.PathLike) -> list[str]:
    """The files to publish, relative to ``dataset_dir``: parquet shards and the card.

    Raises ``ExportError`` unless the stage's manifest says ``complete`` and its files are
    there (an empty build has no shard, so it has nothing to publish either)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    fix = "run `teams-rl build-dataset` with the same config until it completes"
    if manifest is None:
        raise ExportError(f"no built dataset in {dataset_dir} (no manifest.json); {fix}")
    if manifest.get("status") != COMPLETE:
        raise ExportError(
            f"the dataset in {dataset_dir} is {manifest.get('status')!r}, not complete; "
            f"{fix} (it resumes), then export"
        )
    shards = list(manifest.get("files", {}).get("parquet") or [])
    if not shards:
        raise ExportError(f"the dataset in {dataset_dir} has no pairs (no parquet shard); "
                          "nothing to export")
    files = [*shards, CARD]
    missing = [f for f in files if not (dataset_dir / f).is_file()]
    if missing:
        raise ExportError(f"the dataset in {dataset_dir} lacks {', '.join(missing)}; {fix}")
    return files


def export_to_dir(dataset_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the repository layout (``data/*.parquet`` + ``README.md``) under ``target``.

    Earlier shards under ``target/data`` are replaced, so a re-export is not mixed with an
    older build. ``target`` may be a ``file://`` URL."""
    dataset_dir = Path(dataset_dir)
    files = export_files(dataset_dir)
    target = Path(_local_path(str(target)))
    if target.resolve() == dataset_dir.resolve():
        raise ExportError(f"--to-dir {target} is the dataset directory itself; pick another")
    try:
        shutil.rmtree(target / DATA_DIR, ignore_errors=True)
        (target / DATA_DIR).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(dataset_dir / name, target / name)
    except OSError as exc:
        raise ExportError(f"cannot write {target} ({exc.strerror or exc}); choose a folder "
                          "you can write") from None
    return target


def export_to_hub(dataset_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
                  log: Callable[[str], None] = logger.info) -> str:
    """Create (or reuse) the dataset repo ``repo_id`` and upload the parquet + card.

    Returns the repository URL. Raises ``ExportError`` before any upload when the dataset
    is not complete, no token is set, the hub is offline or unreachable."""
    dataset_dir = Path(dataset_dir)
    files = export_files(dataset_dir)
    token = _token()
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as exc:
        raise MissingExtra("exporting to the Hub needs huggingface_hub: pip install "
                           "huggingface_hub (transformers brings it)") from exc
    endpoint = hub_endpoint()
    _check_hub_reachable(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        log(f"export: uploading {len(files)} files to {url}")
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=dataset_dir,
                          allow_patterns=files, delete_patterns=[f"{DATA_DIR}/*.parquet"],
                          commit_message="teams-rl export")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = (" (check that HF_TOKEN has write access to it)" if status in (401, 403)
                else "")
        raise ExportError(f"the Hub refused the export to {repo_id}: HTTP {status}{hint}"
                          ) from None
    except OSError as exc:  # connection dropped mid-upload
        raise ExportError(f"the Hub at {endpoint} became unreachable during the export "
                          f"({type(exc).__name__}); run the same command again") from None
    return str(url)


def _local_path(target: str) -> str:
    return urlparse(target).path if target.startswith("file://") else target


def _token() -> str:
    for name in TOKEN_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    raise ExportError("no Hugging Face token: export HF_TOKEN (a token with write access, "
                      "https://huggingface.co/settings/tokens), or use --to-dir PATH")


def _check_hub_reachable(endpoint: str) -> None:
    """Fail in seconds where ``huggingface_hub`` would retry: offline mode or no route."""
    why = hub_unreachable(endpoint)
    if why is None:
        return
    fix = ("unset it" if why.startswith("HF_HUB_OFFLINE") else
           "check the network (or HF_ENDPOINT)")
    raise ExportError(f"{why}; {fix}, or use --to-dir PATH to write the same files locally")
