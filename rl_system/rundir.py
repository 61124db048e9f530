"""The run-directory contract every stage follows (DESIGN §3, Run directory).

- :func:`write_json` replaces a file atomically (a kill leaves the old file or the new
  one, never half of one); :func:`read_json` treats a torn or missing file as absent.
- :func:`append_jsonl` appends one record per line; :func:`read_jsonl` skips a torn line.
- Each stage writes ``<stage>/manifest.json``: ``{stage, fingerprint, status, inputs,
  ...}``. The fingerprint covers the stage's own config (operational keys left out) and
  its inputs' fingerprints, so a changed input makes every later stage stale. A stage is
  done when its manifest says ``complete`` and the fingerprint matches (:func:`is_done`).
- :func:`run_lock` holds an OS lock on the run directory: one run at a time; a second
  one fails at once naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve.errors import TeamsRLError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
COMPLETE, INCOMPLETE, RUNNING = "complete", "incomplete", "running"


class RunMismatch(TeamsRLError):
    """A stage directory holds outputs made with a different config; refused, not mixed in."""


class RunDirLocked(TeamsRLError):
    """Another process holds this run directory."""


class RunDirUnwritable(TeamsRLError, OSError):
    """The run directory cannot be created or written."""


# -- files ----------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON, atomically; the temporary name is unique per writer."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON (torn by a kill)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        logger.warning("%s is not valid JSON (torn by an interrupted write?); ignoring it", path)
        return None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as one line (flushed at once, so a kill tears at most that line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; unparsable (torn) lines are skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# -- stage manifests ------------------------------------------------------------------------


def fingerprint(section: Any, inputs: dict[str, str | None] | None = None) -> str:
    """Hash of a stage's config ``section`` and its ``inputs``' fingerprints."""
    blob = json.dumps({"section": section, "inputs": inputs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_fingerprint(manifest: dict[str, Any]) -> str:
    """What a later stage records of this one: its fingerprint *and* what it produced, so a
    partial build that later completes (same config, more rows) is a changed input."""
    return fingerprint({k: manifest.get(k) for k in ("fingerprint", "status", "files",
                                                       "summary")})


def read_manifest(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    manifest = read_json(Path(stage_dir) / MANIFEST)
    return manifest if isinstance(manifest, dict) else None


def latest_checkpoint(cfg) -> Path | None:
    """The checkpoint stage 1's manifest names (``cfg``: a ``TeamsRLConfig``), or None."""
    state = read_manifest(cfg.stage_dir("policy").resolve())
    return Path(state["checkpoint"]) if state and state.get("checkpoint") else None


def write_manifest(stage_dir: str | os.PathLike, *, stage: str, fingerprint: str, status: str,
                   inputs: dict[str, str | None] | None = None, **fields: Any) -> dict[str, Any]:
    manifest = {"stage": stage, "fingerprint": fingerprint, "status": status,
                "inputs": inputs or {}, **fields}
    write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def is_done(stage_dir: str | os.PathLike, expected: str) -> bool:
    """Whether the stage's manifest is complete and made with the ``expected`` fingerprint."""
    manifest = read_manifest(stage_dir)
    return bool(manifest and manifest.get("status") == COMPLETE
                and manifest.get("fingerprint") == expected)


def check_same_run(stage_dir: str | os.PathLike, expected: str, *, what: str) -> dict | None:
    """The stage's previous manifest, or raise ``RunMismatch`` if it was made differently."""
    previous = read_manifest(stage_dir)
    if previous and previous.get("fingerprint") not in (None, expected):
        raise RunMismatch(
            f"{stage_dir} holds {what} made with a different config (fingerprint "
            f"{previous.get('fingerprint')}, now {expected}); set run.name to a new name "
            "(or delete that directory) to start over"
        )
    return previous


# -- the run lock ---------------------------------------------------------------------------

_held: dict[Path, list] = {}  # run dir -> [open lock file, depth]; re-entrant per process


def check_writable(run_dir: str | os.PathLike) -> Path:
    """Create ``run_dir`` and prove a file can be written there (before Ray starts)."""
    run_dir = Path(run_dir).resolve()
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirUnwritable(
            f"run directory {run_dir} is not writable ({exc.strerror or exc}); set run.dir "
            "(or run.name) to a folder you can write"
        ) from None
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, *, what: str = "a run") -> Iterator[Path]:
    """Hold the run directory's lock for the block; fail at once if another process does.

    Re-entrant within one process (the pipeline holds it while each stage takes it too).
    The OS drops the lock when the holder dies, so a killed run never blocks the next.
    """
    run_dir = check_writable(run_dir)
    held = _held.get(run_dir)
    if held is not None:
        held[1] += 1
        try:
            yield run_dir
        finally:
            held[1] -= 1
        return
    path = run_dir / LOCK_FILE
    f = open(path, "a+")  # noqa: SIM115 - kept open for as long as the lock is held
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise RunDirLocked(
            f"run directory {run_dir} is in use by {holder}; wait for it to finish or use "
            "another run.name"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} ({what})")
    f.flush()
    _held[run_dir] = [f, 1]
    try:
        yield run_dir
    finally:
        del _held[run_dir]
        f.seek(0)
        f.truncate()
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
