"""Serve autoscaling of a GPU-asking LLM deployment on a node that advertises fake GPUs."""

from __future__ import annotations

import threading
import time

import pytest

from serve.client import LLMClient

pytestmark = pytest.mark.slow  # ~30 s of scaling up and down, on the session Ray: no `ray start`


def _running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_scales_to_two_gpu_replicas_under_load_and_back(scripted_roles):
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 2, "the test session advertises 2 fake GPUs"
    with scripted_roles(
        "autoscale", {"latency_s": 0.25},
        "serve.num_gpus=1", "serve.num_cpus=0.1", "serve.max_batch_size=1",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.target_ongoing_requests=2",
        "serve.autoscaling.upscale_delay_s=1", "serve.autoscaling.downscale_delay_s=3",
    ) as cfg:
        name = cfg.models.expert.deployment_name
        assert _running_replicas("autoscale", name) == 1

        client = LLMClient.from_config(cfg, "expert", transport="handle")
        stop = threading.Event()

        def load():  # 16 requests in flight at a time, bounded by the stop event
            while not stop.is_set():
                client.generate([f"request {i}" for i in range(16)])

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            scaled_up = _wait_for(lambda: _running_replicas("autoscale", name) == 2, timeout_s=90)
            # both fake GPUs are held by the two replicas while the load lasts
            gpus_free_at_peak = ray.available_resources().get("GPU", 0.0)
        finally:
            stop.set()
            worker.join(timeout=60)
        assert scaled_up, "two replicas under sustained load"
        assert gpus_free_at_peak == 0.0, "each replica holds one GPU"
        assert _wait_for(lambda: _running_replicas("autoscale", name) == 1, timeout_s=90), (
            "back to one replica once the load stops"
        )
        assert client.usage.failures == 0
