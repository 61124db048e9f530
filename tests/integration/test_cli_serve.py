"""`teams-rl serve` as a user runs it: prints the endpoint, serves, stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.auth import API_KEY_ENV
from tests.integration.conftest import TEST_API_KEY, free_port

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "rl_system.cli"]


def test_emit_config_writes_a_valid_serve_config(tmp_path):
    out = tmp_path / "serve_config.yaml"
    subprocess.run(
        [*CLI, "serve", "--config", "configs/demo.yaml", "--emit-config", str(out)],
        check=True, capture_output=True, text=True,
    )
    ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))


def test_invalid_config_fails_before_ray_starts():
    proc = subprocess.run(
        [*CLI, "serve", "--config", "configs/demo.yaml", "--set", "serve.port=0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "serve.port: Input should be greater than or equal to 1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr


def test_a_public_host_without_a_key_is_refused_before_ray_starts():
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    proc = subprocess.run(
        [*CLI, "serve", "--config", "configs/demo.yaml", "--set", "serve.host=0.0.0.0"],
        capture_output=True, text=True, timeout=60, env={**env, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "serve.host is 0.0.0.0" in proc.stderr and API_KEY_ENV in proc.stderr
    assert "serve.api_key_file" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr


def test_serve_until_interrupted(tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", API_KEY_ENV: TEST_API_KEY}
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", "configs/demo.yaml", "--set", f"serve.port={port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "serving roles at" in line:
                break
        assert any(f"http://127.0.0.1:{port}/v1" in ln and "auth on" in ln for ln in lines), (
            "".join(lines[-30:])
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TEST_API_KEY)
        reply = client.chat.completions.create(
            model="expert", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-3000:]
        assert "shutting down Serve" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_a_gpu_count_no_node_has():
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*CLI, "serve", "--config", "configs/demo.yaml", "--set", "serve.num_gpus=64",
         "--set", f"serve.port={free_port()}"],
        capture_output=True, text=True, env=env, timeout=180,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "asks for 64 GPU on one node (serve.num_gpus)" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
