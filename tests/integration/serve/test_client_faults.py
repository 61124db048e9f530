"""``LLMClient`` against real Serve: a fresh process over HTTP, a request that fails alone,
a replica killed mid-request, and one rate limit for a role across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from serve.client import LLMCallError, LLMClient, RateLimit
from tests.integration.conftest import TEST_API_KEY


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_a_fresh_process_scores_many_at_once_over_http(demo_app, demo_cfg):
    """The first concurrent score in a new process (it loads the tokenizer in threads)."""
    script = textwrap.dedent(f"""
        from rl_system.config import load_config
        from serve.client import LLMClient

        cfg = load_config("configs/demo.yaml", ["serve.port={demo_cfg.serve.port}"])
        client = LLMClient.from_config(cfg, "reviewer", transport="http")
        items = [(f"Is {{n}} an even number? Answer Yes or No.", ["Yes", "No"])
                 for n in (2, 3, 4, 5)]
        scores = client.score_many(items)
        assert len(scores) == 4 and all(len(s) == 2 for s in scores), scores
        print("OK", client.usage.queries)
    """)
    env = {**os.environ, "TEAMS_RL_API_KEY": TEST_API_KEY, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK 4" in done.stdout


@pytest.mark.slow  # demo_app: SmolLM2 behind Serve, ~50 s to start on 2 cores
def test_an_over_long_request_fails_alone_among_valid_ones(demo_app, demo_cfg):
    client = LLMClient.from_config(demo_cfg, "reviewer", transport="handle")
    short = "Say yes."
    results = client.generate([short, "word " * 9000, short], return_exceptions=True)
    assert isinstance(results[1], LLMCallError) and not results[1].transient, results[1]
    assert "tokens" in str(results[1])
    assert results[0].text and results[2].text


def _alive_replicas(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    ]


def test_a_call_whose_replica_is_killed_succeeds_on_retry(scripted_roles):
    import ray

    with scripted_roles("killed", {"latency_s": 2.0}, "serve.num_cpus=0.1",
                        "serve.autoscaling.min_replicas=2", "serve.autoscaling.max_replicas=2",
                        "models.expert.retry_backoff_s=0.5") as cfg:
        replicas = _alive_replicas("killed", cfg.models.expert.deployment_name)
        assert len(replicas) == 2, replicas
        client = LLMClient.from_config(cfg, "expert", transport="handle")
        results: list = []
        caller = threading.Thread(target=lambda: results.extend(
            client.generate([f"question {i}" for i in range(4)], return_exceptions=True)))
        started = time.monotonic()
        caller.start()
        time.sleep(1.0)  # the four requests are on the replicas, mid-way through their latency
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        caller.join(timeout=30)
        assert [r.text for r in results] == [f"question {i}" for i in range(4)], results
        assert client.transport.retries >= 1
        assert time.monotonic() - started < 15


def test_a_timed_out_call_stops_its_work_in_the_replica(scripted_roles):
    """The caller gives up after 1 s; the batch behind it must not wait out the first."""
    latency_s = 4.0
    with scripted_roles("gaveup", {"latency_s": latency_s}, "serve.num_cpus=0.1",
                        "models.expert.timeout_s=1", "models.expert.max_retries=0") as cfg:
        client = LLMClient.from_config(cfg, "expert", transport="handle")
        with pytest.raises(LLMCallError, match="no answer within"):
            client.generate(["first"])
        client.transport.timeout_s = 30
        started = time.monotonic()
        assert client.generate(["second"])[0].text == "second"
        # without cancellation the second waits out the first call's remaining ~3 s as well
        assert time.monotonic() - started < latency_s + 1.5


def test_one_rate_limit_for_a_role_across_processes(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    def take(n: int) -> list[float]:
        limit = RateLimit("ratelimit-test", 300)  # one permit per 0.2 s, cluster-wide
        stamps = []
        for _ in range(n):
            limit.acquire()
            stamps.append(time.time())
        return stamps

    stamps = sorted(s for part in ray.get([take.remote(3) for _ in range(2)]) for s in part)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert min(gaps) >= 0.15, gaps  # six permits spaced as one bucket, not two


@pytest.fixture(autouse=True, scope="module")
def _no_detached_leftovers(ray_session):
    yield
    import ray

    for name in ("teams-rl-rate-ratelimit-test-300",):
        try:
            ray.kill(ray.get_actor(name, namespace="teams-rl"))
        except ValueError:
            pass
