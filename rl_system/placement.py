"""Whether the connected Ray cluster can ever place the GPUs a config asks for.

Ray waits without end for a request that no node can hold: a Serve replica stays
PENDING_ALLOCATION, a Train worker group never starts, an lm-eval task never runs. Before
a stage starts, every GPU request of the stages still to run is compared with the
cluster's live nodes, and a request that can never fit fails at once, naming the config
key that made it.

On a cluster that adds nodes on demand (the Ray autoscaler, KubeRay with autoscaling),
the nodes present now are not all there will be: with ``run.autoscaling_cluster: true``
the check is left to the autoscaler, which reports requests no node type can hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rl_system.config import ROLES, ConfigError, TeamsRLConfig


class UnplaceableRequest(ConfigError):
    """A GPU request larger than anything the cluster has; it would wait forever."""


@dataclass(frozen=True)
class GpuDemand:
    what: str  # who asks, for the message
    config_key: str  # the setting the count comes from
    gpus_per_unit: float  # one replica, worker or task: must fit on a single node
    units: int  # how many run at once

    @property
    def total(self) -> float:
        return self.gpus_per_unit * self.units


def serve_gpu_demands(cfg: TeamsRLConfig) -> list[GpuDemand]:
    """GPUs of the role applications' first replicas (``initial_replicas`` each)."""
    from serve.app import llm_server_specs

    replicas = max(cfg.serve.autoscaling.min_replicas, 1)
    demands = []
    if cfg.serve.num_gpus > 0:
        for name in llm_server_specs(cfg):
            demands.append(GpuDemand(f"Serve deployment '{name}'", "serve.num_gpus",
                                     cfg.serve.num_gpus, replicas))
    seen = set()
    for role in ROLES:
        role_cfg = cfg.models.role(role)
        if role_cfg.backend != "vllm" or role_cfg.model in seen:
            continue
        seen.add(role_cfg.model)
        engine = role_cfg.engine_kwargs
        gpus = int(engine.get("tensor_parallel_size", 1)) * int(
            engine.get("pipeline_parallel_size", 1))
        demands.append(GpuDemand(
            f"vLLM replica of models.{role} ({role_cfg.model})",
            f"models.{role}.engine_kwargs.tensor_parallel_size x pipeline_parallel_size",
            gpus, replicas))
    return demands


def gpu_demands(cfg: TeamsRLConfig, *, stages: Iterable[str]) -> list[GpuDemand]:
    """GPU requests of ``stages`` (names from ``rl_system.pipeline.STAGES`` plus "serve")."""
    stages = set(stages)
    demands = serve_gpu_demands(cfg) if "serve" in stages else []
    if "sft" in stages and cfg.sft.use_gpu:
        demands.append(GpuDemand("SFT (one GPU per Ray Train worker)",
                                 "sft.num_workers with sft.use_gpu", 1.0, cfg.sft.num_workers))
    if "eval" in stages and cfg.eval.num_gpus > 0:
        demands.append(GpuDemand("the lm-eval task", "eval.num_gpus", cfg.eval.num_gpus, 1))
    return demands


def cluster_gpus() -> tuple[float, float]:
    """(GPUs of the largest live node, GPUs of all live nodes) of the connected cluster."""
    import ray

    per_node = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(per_node, default=0.0), sum(per_node)


def check_gpu_demands(cfg: TeamsRLConfig, *, stages: Iterable[str]) -> None:
    """Raise :class:`UnplaceableRequest` for a request the cluster can never place."""
    demands = gpu_demands(cfg, stages=stages)
    if not demands or cfg.run.autoscaling_cluster:
        return
    largest, total = cluster_gpus()
    fixes = ("lower it, add GPU nodes, or set run.autoscaling_cluster=true when the cluster "
             "adds nodes on demand")
    for d in demands:
        if d.gpus_per_unit > largest:
            raise UnplaceableRequest(
                f"{d.what} asks for {d.gpus_per_unit:g} GPU on one node ({d.config_key}), but "
                f"the largest node of this Ray cluster has {largest:g}; Ray would wait for it "
                f"forever: {fixes}"
            )
        if d.total > total:
            raise UnplaceableRequest(
                f"{d.what} asks for {d.units} x {d.gpus_per_unit:g} = {d.total:g} GPUs at once "
                f"({d.config_key}), but this Ray cluster has {total:g}; Ray would wait for "
                f"them forever: {fixes}"
            )
