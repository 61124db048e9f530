"""GPU requests the cluster can never hold are refused up front (the session Ray: one node,
2 fake GPUs), instead of leaving a replica, worker group or task pending forever."""

from __future__ import annotations

import pytest

from rl_system.config import load_config
from rl_system.placement import InsufficientResources, check_gpu_demands, gpu_demands

ALL_STAGES = ("serve", "policy", "dataset", "sft", "eval")


def _cfg(*overrides: str):
    return load_config("configs/demo.yaml", list(overrides))


def test_demands_name_the_config_key_they_come_from():
    cfg = _cfg("serve.num_gpus=1", "serve.autoscaling.min_replicas=2",
               "serve.autoscaling.max_replicas=2", "sft.use_gpu=true",
               "sft.num_workers=4", "eval.num_gpus=0.5")
    demands = [(d.config_key, d.gpus_per_unit, d.units)
               for d in gpu_demands(cfg, stages=ALL_STAGES)]
    # the demo's three roles share one deployment: one entry, two replicas of 1 GPU
    assert demands == [("serve.num_gpus", 1.0, 2), ("sft.num_workers with sft.use_gpu", 1.0, 4),
                       ("eval.num_gpus", 0.5, 1)]
    # stages that are done ask for nothing
    assert gpu_demands(cfg, stages=["eval"]) == [d for d in gpu_demands(cfg, stages=ALL_STAGES)
                                                 if d.config_key == "eval.num_gpus"]
    assert gpu_demands(_cfg(), stages=ALL_STAGES) == []


def test_vllm_replica_needs_tensor_times_pipeline_parallel_gpus():
    cfg = _cfg("models.expert.backend=vllm", "models.expert.model=org/big-model",
               "models.expert.engine_kwargs.tensor_parallel_size=4",
               "models.expert.engine_kwargs.pipeline_parallel_size=2")
    [vllm] = [d for d in gpu_demands(cfg, stages=["serve"]) if "vLLM" in d.what]
    assert vllm.gpus_per_unit == 8 and "models.expert" in vllm.what


@pytest.mark.parametrize(("overrides", "message"), [
    (["serve.num_gpus=3"],
     r"asks for 3 GPU on one node \(serve.num_gpus\), but the largest node .* has 2"),
    (["serve.num_gpus=1", "serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=3"],
     r"3 x 1 = 3 GPUs at once \(serve.num_gpus\), but this Ray cluster has 2"),
    (["sft.use_gpu=true", "sft.num_workers=3"], r"SFT .* 3 x 1 = 3 GPUs at once"),
    (["eval.num_gpus=4"], r"lm-eval task asks for 4 GPU on one node \(eval.num_gpus\)"),
])
def test_requests_beyond_the_cluster_are_refused_with_the_key(ray_session, overrides, message):
    with pytest.raises(InsufficientResources, match=message) as err:
        check_gpu_demands(_cfg(*overrides), stages=ALL_STAGES)
    assert "run.autoscaling_cluster=true" in str(err.value)


def test_requests_that_fit_or_may_be_autoscaled_pass(ray_session):
    check_gpu_demands(_cfg("serve.num_gpus=1", "sft.use_gpu=true", "sft.num_workers=2"),
                      stages=ALL_STAGES)
    check_gpu_demands(_cfg("serve.num_gpus=8", "run.autoscaling_cluster=true"),
                      stages=ALL_STAGES)
