"""Whether the connected Ray cluster can place what a config asks for: every stage's CPU
and GPU demands, checked in this one module.

Ray waits without end for a request that no node can hold: a Serve replica stays
PENDING_ALLOCATION, an env runner or a Train worker group never starts, an lm-eval task
never runs. Before a stage starts, its requests (and, for the pipeline, every GPU request
of the stages still to run) are compared with the cluster, and a request that can never
fit fails at once with ``InsufficientResources``, naming the config key that made it.
The role applications state their own GPU demands (``serve.app.gpu_demands``).

On a cluster that adds nodes on demand (the Ray autoscaler, KubeRay with autoscaling),
the nodes present now are not all there will be: with ``run.autoscaling_cluster: true``
the check is left to the autoscaler, which reports requests no node type can hold.
"""

from __future__ import annotations

from collections.abc import Iterable

from rl_system.config import SFTConfig, TeamsRLConfig
from serve.app import GpuDemand
from serve.app import gpu_demands as serve_gpu_demands
from serve.errors import TeamsRLError

ENV_RUNNER_CPUS = 0.5  # per stage-1 env runner: they mostly wait on model calls


class InsufficientResources(TeamsRLError):
    """The cluster can never place what the config asks for; it would wait forever."""


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
    """Raise :class:`InsufficientResources` for a GPU request the cluster can never place."""
    demands = gpu_demands(cfg, stages=stages)
    if not demands or cfg.run.autoscaling_cluster:
        return
    largest, total = cluster_gpus()
    fixes = ("lower it, add GPU nodes, or set run.autoscaling_cluster=true when the cluster "
             "adds nodes on demand")
    for d in demands:
        if d.gpus_per_unit > largest:
            raise InsufficientResources(
                f"{d.what} asks for {d.gpus_per_unit:g} GPU on one node ({d.config_key}), but "
                f"the largest node of this Ray cluster has {largest:g}; Ray would wait for it "
                f"forever: {fixes}"
            )
        if d.total > total:
            raise InsufficientResources(
                f"{d.what} asks for {d.units} x {d.gpus_per_unit:g} = {d.total:g} GPUs at once "
                f"({d.config_key}), but this Ray cluster has {total:g}; Ray would wait for "
                f"them forever: {fixes}"
            )


def check_env_runner_cpus(cfg: TeamsRLConfig) -> None:
    """Stage 1: refuse ``policy.num_env_runners`` env runners the cluster cannot place now
    (RLlib would block on them)."""
    import ray

    needed = cfg.policy.num_env_runners * ENV_RUNNER_CPUS
    total = ray.cluster_resources().get("CPU", 0.0)
    free = ray.available_resources().get("CPU", 0.0)
    if needed > free:
        raise InsufficientResources(
            f"policy.num_env_runners={cfg.policy.num_env_runners} needs {needed:g} CPUs but "
            f"only {free:g} of the cluster's {total:g} are free (Serve replicas hold the rest); "
            "lower policy.num_env_runners or add CPUs"
        )


def check_sft_workers(sft: SFTConfig, *, needed: dict[str, float]) -> None:
    """Stage 3: refuse a Ray Train worker group the cluster cannot place (``needed``: the
    group's total resources, e.g. ``ScalingConfig.total_resources``)."""
    import ray

    total = ray.cluster_resources()
    available = ray.available_resources()
    for resource, amount in needed.items():
        have = total.get(resource, 0.0)
        if amount <= have:
            continue
        per_worker = amount / sft.num_workers
        fits = int(have // per_worker) if per_worker else 0
        fix = f"lower sft.num_workers to at most {fits}" if fits else "add nodes"
        if resource == "CPU":
            fix += " or lower sft.cpus_per_worker"
        elif resource == "GPU":
            fix += " or set sft.use_gpu=false"
        raise InsufficientResources(
            f"sft.num_workers={sft.num_workers} needs {amount:g} {resource} "
            f"({per_worker:g} per worker) but the Ray cluster has {have:g} {resource} "
            f"({available.get(resource, 0.0):g} available now); {fix}"
        )
