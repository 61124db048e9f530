"""Regenerate the Serve configs committed under cluster/ from configs/gpu-cluster.yaml.

    .venv/bin/python cluster/sync_serve_config.py

Writes cluster/serve_config.yaml and the serveConfigV2 block of
cluster/kuberay/rayservice.yaml; tests/unit/cluster/test_manifests.py fails when they drift.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rl_system.config import load_config
from serve.app import serve_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    cfg = load_config(ROOT / "configs" / "gpu-cluster.yaml")
    body = yaml.safe_dump(serve_config(cfg), sort_keys=False).rstrip("\n")
    (ROOT / "cluster" / "serve_config.yaml").write_text(body + "\n")
    service = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
    block = "\n".join("    " + line if line else line for line in body.split("\n"))
    text = re.sub(
        r"(  serveConfigV2: \|\n)(?:(?:    .*)?\n)+?(?=  rayClusterConfig:)",
        lambda m: m.group(1) + block + "\n",
        service.read_text(),
    )
    service.write_text(text)
    print("wrote cluster/serve_config.yaml and the serveConfigV2 of", service.relative_to(ROOT))


if __name__ == "__main__":
    main()
