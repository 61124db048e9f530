"""Integration fixtures: real Ray, real Serve, real embedded models."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import pytest

from rl_system.config import ROLES, TeamsRLConfig, load_config
from serve.auth import API_KEY_ENV

TEST_API_KEY = "test-key-not-a-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def ingress_key():
    """The ingress key, in the environment before Ray starts: a local Ray's workers (and
    so the ingress replicas) inherit the driver's environment, as under `teams-rl serve`."""
    before = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = TEST_API_KEY
    yield TEST_API_KEY
    if before is None:
        os.environ.pop(API_KEY_ENV, None)
    else:
        os.environ[API_KEY_ENV] = before


@pytest.fixture(scope="session")
def serve_port(ingress_key, ray_session) -> int:
    """Serve's HTTP options are fixed once per Ray session: every test app shares them."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def demo_cfg(serve_port) -> TeamsRLConfig:
    return load_config(
        "configs/demo.yaml",
        [f"serve.port={serve_port}", "serve.max_batch_size=8",
         # One CPU replica serves every test of the session, two pipelines at once in the
         # comparison: a request's queue time on 2 loaded cores can pass the 120 s default,
         # and a timed-out call now (rightly) leaves a build incomplete.
         "serve.request_timeout_s=600", "models.expert.timeout_s=600",
         "models.reviewer.timeout_s=600", "models.instructor.timeout_s=600"],
    )


@pytest.fixture(scope="session")
def demo_app(demo_cfg):
    """The demo's role application (SmolLM2 behind the ingress), deployed once."""
    from serve.app import deploy

    return deploy(demo_cfg)


@pytest.fixture(scope="session")
def scripted_roles(serve_port):
    """Deploys every role on the scripted backend (a test double) as an app of its own.

    ``with scripted_roles(name, script, *overrides) as cfg:`` runs the app ``name`` under
    ``/<name>`` and deletes it (without waiting) on leaving the block. Each role gets
    backend ``scripted``, model ``name`` and ``script``, and keeps its other defaults (the
    reviewer samples at temperature 0, which the scripted backend ignores); roles with the
    same model and script share one deployment. ``overrides`` are ``load_config``'s
    ``key=value`` items, applied after those: ``models.reviewer.model=other`` gives the
    reviewer a deployment of its own.
    Not ``serve.app.deploy``: that serves at ``/``, where the demo app already is.
    """
    from ray import serve

    from serve.app import build_app

    @contextmanager
    def deploy(name: str, script: dict, *overrides: str):
        cfg = load_config(None, [
            f"serve.port={serve_port}", f"serve.app_name={name}",
            *(f"models.{role}.{key}={value}" for role in ROLES
              for key, value in (("backend", "scripted"), ("model", name))),
            *overrides,
        ])
        for role in ROLES:
            cfg.models.role(role).script = script
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
        try:
            yield cfg
        finally:
            # Not waiting for the replicas to drain (seconds an app) keeps the suite as
            # fast as when test apps were never deleted; their CPUs free up soon after.
            if name in serve.status().applications:
                serve.delete(name, _blocking=False)

    return deploy
