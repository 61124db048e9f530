"""Build the role applications from a run config, deploy them, or write a Serve config.

One Serve application (``serve.app_name``, route ``/``) holds an ``LLMServer`` deployment
per distinct (backend, model) among the roles plus the OpenAI-compatible ingress.
Roles on ``vllm`` go to a Ray Serve LLM application under ``/vllm``; roles on ``openai``
call their external endpoint directly and need no deployment.

The same builder serves ``serve run`` / ``serve deploy``::

    teams-rl serve --config configs/demo.yaml --emit-config serve_config.yaml
    serve deploy serve_config.yaml
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from serve.auth import check_exposure, load_api_key
from serve.backends import backend_kwargs
from serve.backends.vllm_backend import (
    VLLM_ROUTE_PREFIX,
    build_vllm_app,
    llm_config_dict,
    vllm_app_args,
)
from serve.config import ROLES, SERVING_SECTIONS, ServingConfig, load_yaml_config
from serve.deployment import LLMServerSpec
from serve.errors import ConfigError

SERVED_IN_LLMSERVER = ("transformers", "scripted")


@dataclass(frozen=True)
class GpuDemand:
    """GPUs something asks Ray for; ``rl_system.placement`` checks them against the cluster."""

    what: str  # who asks, for the message
    config_key: str  # the setting the count comes from
    gpus_per_unit: float  # one replica, worker or task: must fit on a single node
    units: int  # how many run at once

    @property
    def total(self) -> float:
        return self.gpus_per_unit * self.units


def gpu_demands(cfg: ServingConfig) -> list[GpuDemand]:
    """GPUs of the role applications' first replicas (``initial_replicas`` each)."""
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


def llm_server_specs(cfg: ServingConfig) -> dict[str, LLMServerSpec]:
    """One spec per deployment; roles with the same backend and model share it."""
    specs: dict[str, LLMServerSpec] = {}
    for role in ROLES:
        role_cfg = cfg.models.role(role)
        if role_cfg.backend not in SERVED_IN_LLMSERVER:
            continue
        name = role_cfg.deployment_name
        spec = LLMServerSpec(
            deployment_name=name,
            backend=role_cfg.backend,
            backend_kwargs=backend_kwargs(role_cfg, cfg.serve),
            max_batch_size=cfg.serve.max_batch_size,
            batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
            request_timeout_s=cfg.serve.request_timeout_s,
            max_new_tokens_limit=cfg.serve.limits.max_tokens,
        )
        if name in specs and specs[name] != spec:
            raise ConfigError(
                f"models.{role}: shares deployment {name} with another role but differs in "
                "its script; give it a different model name"
            )
        specs[name] = spec
    return specs


def deployment_options(cfg: ServingConfig) -> dict[str, Any]:
    auto = cfg.serve.autoscaling
    return {
        "ray_actor_options": {"num_cpus": cfg.serve.num_cpus, "num_gpus": cfg.serve.num_gpus},
        "autoscaling_config": {
            "min_replicas": auto.min_replicas,
            "initial_replicas": max(auto.min_replicas, 1),
            "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s,
            "downscale_delay_s": auto.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        },
        "max_ongoing_requests": cfg.serve.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "logging_config": logging_config(cfg),
    }


def logging_config(cfg: ServingConfig) -> dict[str, Any]:
    """Serve's ``LoggingConfig`` for the proxy, the controller and every replica of ours."""
    return {"enable_access_log": cfg.serve.access_log}


def routes(cfg: ServingConfig) -> dict[str, str]:
    """Ingress routing: a role name or a model reference -> deployment name."""
    table: dict[str, str] = {}
    for role in ROLES:
        role_cfg = cfg.models.role(role)
        if role_cfg.backend in SERVED_IN_LLMSERVER:
            table[role] = role_cfg.deployment_name
            table.setdefault(role_cfg.model, role_cfg.deployment_name)
    return table


def build_app(cfg: ServingConfig):
    """The main application: LLMServer deployments behind the OpenAI ingress."""
    from ray import serve

    from serve.deployment import LLMServer
    from serve.openai_api import OpenAIIngress

    options = deployment_options(cfg)
    servers = {
        name: serve.deployment(LLMServer).options(name=name, **options).bind(spec)
        for name, spec in llm_server_specs(cfg).items()
    }
    # The key file's path, never the key: bind arguments are stored in Serve's checkpoint.
    ingress = OpenAIIngress.options(logging_config=logging_config(cfg))
    return ingress.bind(
        servers, routes(cfg), roles=ROLES, limits=cfg.serve.limits.model_dump(),
        host=cfg.serve.host, api_key_file=cfg.serve.api_key_file,
    )


def vllm_llm_configs(cfg: ServingConfig) -> list[dict[str, Any]]:
    """Ray Serve LLM ``LLMConfig`` mappings, one per distinct model among the vllm roles."""
    from serve.models import resolve_model

    seen, configs = set(), []
    for role in ROLES:
        role_cfg = cfg.models.role(role)
        if role_cfg.backend == "vllm" and role_cfg.model not in seen:
            seen.add(role_cfg.model)
            configs.append(
                llm_config_dict(
                    role_cfg=role_cfg,
                    model_source=resolve_model(role_cfg.model, prepare=False),
                    serve_cfg=cfg.serve,
                )
            )
    return configs


def app_builder(args: dict[str, Any]):
    """Entry for Serve config files: ``import_path: serve.app:app_builder``.

    ``args`` holds either ``config`` (a run config as a mapping; its ``models`` and
    ``serve`` sections are read) or ``config_path`` plus optional ``overrides``. The API
    key comes from ``$TEAMS_RL_API_KEY``.
    """
    if "config" in args:
        cfg = ServingConfig.from_run_config(args["config"])
    else:
        cfg = load_yaml_config(ServingConfig, args["config_path"],
                               list(args.get("overrides", [])), sections=SERVING_SECTIONS)
    return build_app(cfg)


def serve_config(cfg: ServingConfig) -> dict[str, Any]:
    """A Serve config (``ServeDeploySchema``) equivalent to ``teams-rl serve``.

    The API key is never written: the replicas read ``$TEAMS_RL_API_KEY`` (the cluster
    manifests put it in every pod from a secret) or ``serve.api_key_file``.
    """
    applications = []
    if llm_server_specs(cfg):  # roles all on vllm/openai need no ingress of ours
        applications.append(
            {
                "name": cfg.serve.app_name,
                "route_prefix": "/",
                "import_path": "serve.app:app_builder",
                "args": {"config": cfg.model_dump(mode="json", include=set(SERVING_SECTIONS))},
                "logging_config": logging_config(cfg),
            }
        )
    llm_configs = vllm_llm_configs(cfg)
    if llm_configs:
        applications.append(
            {
                "name": f"{cfg.serve.app_name}-vllm",
                "route_prefix": VLLM_ROUTE_PREFIX,
                "import_path": "ray.serve.llm:build_openai_app",
                "args": vllm_app_args(llm_configs, cfg.serve),
                "logging_config": logging_config(cfg),
            }
        )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "logging_config": logging_config(cfg),
        "applications": applications,
    }


def check_key(cfg: ServingConfig) -> bool:
    """Whether this process finds the ingress key; a ``serve.host`` other machines can
    reach without one raises ``ConfigError`` (before anything is deployed)."""
    try:
        key = load_api_key(cfg.serve.api_key_file)
        check_exposure(cfg.serve.host, key)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return key is not None


def is_deployed(cfg: ServingConfig) -> bool:
    """Whether the role application already runs on the connected cluster, built from this
    config's roles; one built from other roles under the same name raises ``ConfigError``."""
    from ray import serve

    try:
        app = serve.status().applications.get(cfg.serve.app_name)
    except Exception:  # noqa: BLE001 - Serve not started yet
        return False
    if app is None or app.status != "RUNNING":
        return False
    built_from = _leases().built_from(cfg.serve.app_name)
    if built_from not in (None, role_fingerprint(cfg)):
        raise ConfigError(
            f"serve.app_name={cfg.serve.app_name!r} already runs on this cluster with other "
            "role models or serving settings (another run's); set serve.app_name to a name "
            "of its own for this run, or use the same models.* and serve.* settings"
        )
    return True


def ensure_deployed(cfg: ServingConfig, *, holder: str | None = None) -> str:
    """Deploy the roles unless they already run (a stage reuses a running ``teams-rl serve``).

    ``holder`` (a run directory) takes a lease on the application: ``undeploy`` with the
    same holder deletes it only once no other run holds a lease, so one run never tears
    down the roles another run is using.
    """
    running = is_deployed(cfg)
    if not running:
        deploy(cfg)
    if holder is not None or not running:
        _leases().acquire(cfg.serve.app_name, role_fingerprint(cfg), holder,
                          started=not running)
    return cfg.serve.base_url


def deploy(cfg: ServingConfig) -> str:
    """Start Serve on the connected Ray cluster and run every role application.

    Returns the ingress base URL once every replica is ready. Ray must be initialised.
    Callers check ``gpu_demands`` against the cluster first (``rl_system.placement``): a
    replica no node can hold would never start.
    """
    from ray import serve

    check_key(cfg)  # the replicas check again, with their own environment
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port},
                logging_config=logging_config(cfg))
    if llm_server_specs(cfg):
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/", blocking=False)
    llm_configs = vllm_llm_configs(cfg)
    if llm_configs:
        serve.run(build_vllm_app(vllm_app_args(llm_configs, cfg.serve)),
                  name=f"{cfg.serve.app_name}-vllm",
                  route_prefix=VLLM_ROUTE_PREFIX, blocking=False,
                  logging_config=logging_config(cfg))
    return cfg.serve.base_url



def undeploy(cfg: ServingConfig, *, holder: str | None = None) -> bool:
    """Release ``holder``'s lease; delete the role applications (freeing their CPUs, GPUs
    and memory) once no run holds one and a run of ours started them. Returns whether
    they were deleted."""
    from ray import serve

    if not _leases().release(cfg.serve.app_name, holder):
        return False
    deployed = serve.status().applications
    for name in (cfg.serve.app_name, f"{cfg.serve.app_name}-vllm"):
        if name in deployed:
            serve.delete(name)
    return True


def role_fingerprint(cfg: ServingConfig) -> str:
    """What the role applications are built from (not how clients reach them)."""
    data = cfg.model_dump(mode="json", include=set(SERVING_SECTIONS))
    # Fields a backend lacks count as their old defaults, so fingerprints stay stable.
    built_from = {"script": {}, "engine_kwargs": {}, "accelerator_type": None}
    roles = {r: {"backend": data["models"][r]["backend"], "model": data["models"][r]["model"],
                 **{k: data["models"][r].get(k, d) for k, d in built_from.items()}}
             for r in ROLES}
    serving = {k: v for k, v in data["serve"].items()
               if k not in ("host", "port", "api_key", "api_key_file", "app_name")}
    blob = json.dumps({"roles": roles, "serve": serving}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


LEASES_ACTOR = "teams-rl-role-leases"
LEASES_NAMESPACE = "teams-rl"


def _leases():
    """The cluster-wide lease table (a small detached actor, created on first use)."""
    import ray

    @ray.remote(num_cpus=0)
    class RoleLeases:
        """app name -> {"fingerprint", "started" (by a run of ours), "holders"}."""

        def __init__(self):
            self.apps: dict[str, dict] = {}

        def built_from(self, app: str) -> str | None:
            return self.apps.get(app, {}).get("fingerprint")

        def acquire(self, app: str, fp: str, holder: str | None, started: bool) -> None:
            entry = self.apps.setdefault(app, {"fingerprint": None, "started": False,
                                               "holders": set()})
            if started:  # only an app we deployed is known to be built from ``fp``
                entry["fingerprint"], entry["started"] = fp, True
            if holder is not None:
                entry["holders"].add(holder)

        def release(self, app: str, holder: str | None) -> bool:
            entry = self.apps.get(app)
            if entry is None:
                return False
            entry["holders"].discard(holder)
            if entry["holders"]:
                return False
            del self.apps[app]
            return entry["started"]  # someone else's `teams-rl serve` is never deleted

    actor = RoleLeases.options(name=LEASES_ACTOR, namespace=LEASES_NAMESPACE,
                               lifetime="detached", get_if_exists=True).remote()

    class _Sync:  # plain calls: every lease operation is one short round trip
        def __getattr__(self, method):
            return lambda *a, **kw: ray.get(getattr(actor, method).remote(*a, **kw))

    return _Sync()
