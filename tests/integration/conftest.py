"""Integration fixtures: real Ray, real Serve, real embedded models."""

from __future__ import annotations

import socket

import pytest

from rl_system.config import TeamsRLConfig, load_config

TEST_API_KEY = "test-key-not-a-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """Serve's HTTP options are fixed once per Ray session: every test app shares them."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def demo_cfg(serve_port) -> TeamsRLConfig:
    return load_config(
        "configs/demo.yaml",
        [f"serve.port={serve_port}", f"serve.api_key={TEST_API_KEY}", "serve.max_batch_size=8"],
    )


@pytest.fixture(scope="session")
def demo_app(demo_cfg):
    """The demo's role application (SmolLM2 behind the ingress), deployed once."""
    from serve.app import deploy

    return deploy(demo_cfg)
