"""The files under ``cluster/`` and ``configs/gpu-cluster.yaml`` stay valid and in step.

Checked against Ray's own schemas where Ray ships one (Serve's ``ServeDeploySchema``, the
autoscaler's ``ray-schema.json``, ``RuntimeEnv``) and against this repository's code (the
emitted Serve config, the metric names). No Ray cluster starts; the whole module runs in
seconds.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import ray
import yaml
from click.testing import CliRunner
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from rl_system.cli import main
from rl_system.config import load_config, role_config
from serve.backends.vllm_backend import KEYED_INGRESS

REPO = Path(__file__).resolve().parents[3]
CLUSTER = REPO / "cluster"
GPU_CONFIG = REPO / "configs" / "gpu-cluster.yaml"
SERVE_CONFIG = CLUSTER / "serve_config.yaml"
KUBERAY = CLUSTER / "kuberay"
DASHBOARD = CLUSTER / "grafana" / "teams_rl_dashboard.json"
RAY_PACKAGE = Path(ray.__file__).parent

# A variable name that holds a credential (HF_TOKEN, OPENAI_API_KEY, ...), not TOKENIZERS_*.
SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|KEY|SECRET|PASSWORD)(?:$|_)")

REGENERATE = (
    "regenerate with `teams-rl serve --config configs/gpu-cluster.yaml --emit-config "
    "cluster/serve_config.yaml` and paste the file into serveConfigV2 of "
    "cluster/kuberay/rayservice.yaml (cluster/README.md, 'Keeping the Serve config in step')"
)


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _rayservice_serve_config() -> dict:
    return yaml.safe_load(_yaml(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])


def _ray_cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of every KubeRay manifest that defines one."""
    return {
        "raycluster.yaml": _yaml(KUBERAY / "raycluster.yaml")["spec"],
        "rayservice.yaml": _yaml(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


# Serve configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source", ["cluster/serve_config.yaml", "cluster/kuberay/rayservice.yaml:serveConfigV2"]
)
def test_serve_configs_validate_against_rays_serve_schema(source):
    data = _rayservice_serve_config() if source.endswith("serveConfigV2") else _yaml(SERVE_CONFIG)
    schema = ServeDeploySchema.model_validate(data)
    by_name = {app.name: app for app in schema.applications}
    assert len(by_name) == len(schema.applications), "application names must be unique"
    assert len({app.route_prefix for app in schema.applications}) == len(schema.applications)
    # vLLM roles run as a Ray Serve LLM app; every model autoscales within its bounds.
    vllm = by_name["teams-rl-vllm"]
    assert vllm.import_path == "ray.serve.llm:build_openai_app"
    for llm in vllm.args["llm_configs"]:
        auto = llm["deployment_config"]["autoscaling_config"]
        assert 1 <= auto["min_replicas"] < auto["max_replicas"]
    assert schema.http_options.port == 8000


def test_committed_serve_config_is_what_teams_rl_serve_emits(tmp_path):
    emitted_path = tmp_path / "serve_config.yaml"
    result = CliRunner().invoke(
        main, ["serve", "--config", str(GPU_CONFIG), "--emit-config", str(emitted_path)]
    )
    assert result.exit_code == 0, result.output
    emitted = _yaml(emitted_path)
    assert _yaml(SERVE_CONFIG) == emitted, f"cluster/serve_config.yaml is stale: {REGENERATE}"
    assert _rayservice_serve_config() == emitted, (
        f"serveConfigV2 in cluster/kuberay/rayservice.yaml is stale: {REGENERATE}"
    )


def test_vllm_llm_configs_validate_with_ray_serve_llm():
    # ray.serve.llm refuses to import without vLLM; its LLMConfig model does not need it.
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    configs = [llm for app in _yaml(SERVE_CONFIG)["applications"]
               for llm in app["args"].get("llm_configs", [])]
    assert configs
    for llm in configs:
        LLMConfig(**llm)


@pytest.mark.parametrize(
    "source", ["cluster/serve_config.yaml", "cluster/kuberay/rayservice.yaml:serveConfigV2"]
)
def test_every_public_serve_app_checks_the_key(source):
    data = _rayservice_serve_config() if source.endswith("serveConfigV2") else _yaml(SERVE_CONFIG)
    assert data["http_options"]["host"] == "0.0.0.0"
    for app in data["applications"]:
        if app["import_path"] == "ray.serve.llm:build_openai_app":
            assert app["args"]["ingress_cls_config"]["ingress_cls"] == KEYED_INGRESS, app["name"]
        else:  # our ingress, which reads the key in its replica
            assert app["import_path"] == "serve.app:app_builder", app["name"]


def test_every_pod_requires_the_ingress_key_secret():
    for name, spec in _ray_cluster_specs().items():
        for pod in _pod_specs(spec):
            for container in pod["containers"]:
                env = {v["name"]: v for v in container.get("env", [])}
                ref = env["TEAMS_RL_API_KEY"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "teams-rl-secrets" and not ref.get("optional"), name


def test_the_readme_calls_the_endpoint_with_the_key():
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    calls = [line for line in text.splitlines() if "curl " in line and ":8000" in line]
    assert any("Authorization: Bearer $TEAMS_RL_API_KEY" in c for c in calls), calls


# Run config -------------------------------------------------------------------------------


def test_gpu_cluster_config_validates_and_is_sized_for_gpus():
    cfg = load_config(GPU_CONFIG)
    assert {cfg.models.role(r).backend for r in ("instructor", "reviewer", "expert")} == {"vllm"}
    assert cfg.sft.use_gpu and cfg.sft.strategy == "fsdp" and cfg.sft.num_workers >= 8
    assert cfg.serve.autoscaling.max_replicas > cfg.serve.autoscaling.min_replicas
    assert cfg.serve.host == "0.0.0.0"
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.policy.num_env_runners > demo.policy.num_env_runners
    assert (REPO / cfg.dataset.seeds).is_file()


def test_gpu_cluster_config_starts_with_its_command_and_its_openai_alternative_validates():
    text = GPU_CONFIG.read_text()
    assert text.splitlines()[0].startswith("#")
    assert "teams-rl pipeline --config configs/gpu-cluster.yaml" in text.split("\nrun:")[0]
    # The commented-out expert block: uncomment it and validate it as a role.
    lines = text.splitlines()
    start = lines.index("  # expert:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append(line[len("  # "):])
    role = role_config(yaml.safe_load("\n".join(block))["expert"])
    assert role.backend == "openai" and role.api_key_env == "OPENAI_API_KEY"


# Manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(REPO).as_posix() for p in CLUSTER.rglob("*.yaml")), ids=str
)
def test_every_yaml_manifest_parses(path):
    documents = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


def test_autoscaler_config_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    config = _yaml(CLUSTER / "autoscaler.yaml")
    schema = json.loads((RAY_PACKAGE / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "no GPU worker type"
    assert any(t["resources"].get("GPU", 0) == 0 for t in workers.values()), "no CPU worker type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    ports = {p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]}
    assert {8265, 8000} <= ports
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert any("pip install" in c and ".[vllm" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/teams-rl"] == "."


def test_kuberay_clusters_use_ray_260_token_auth_one_image_and_gpu_workers():
    storage = _yaml(KUBERAY / "storage.yaml")
    for name, spec in _ray_cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["enableInTreeAutoscaling"] is True, name
        pods = _pod_specs(spec)
        images = {c["image"] for pod in pods for c in pod["containers"]}
        assert len(images) == 1, f"{name}: one image for all pods, got {images}"
        head_ports = {p["containerPort"] for p in pods[0]["containers"][0]["ports"]}
        assert {6379, 8265, 8000} <= head_ports, name
        gpu_groups = [
            g for g in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
        ]
        assert gpu_groups, f"{name}: no GPU worker group"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for pod in pods for v in pod.get("volumes", []) if "persistentVolumeClaim" in v
        }
        assert claims == {storage["metadata"]["name"]}, name


def test_rayjob_runs_the_pipeline_entrypoint_on_the_raycluster_with_a_config_in_the_repo():
    job = _yaml(KUBERAY / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["teams-rl", "pipeline"]
    config_path = argv[argv.index("--config") + 1]
    assert (REPO / config_path).is_file(), f"RayJob entrypoint names {config_path}, not in repo"
    load_config(REPO / config_path)
    cluster_name = _yaml(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster_name
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # The image's copy of this checkout; validate the rest of the runtime env against ours.
    assert runtime_env["working_dir"] == "/home/ray/teams-rl"
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})
    image = {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert image == {
        c["image"] for pod in _pod_specs(_ray_cluster_specs()["raycluster.yaml"])
        for c in pod["containers"]
    }


def test_runtime_env_validates_and_sets_no_secret():
    data = _yaml(CLUSTER / "runtime_env.yaml")
    assert data["working_dir"] == "."
    RuntimeEnv(**{**data, "working_dir": str(REPO)})
    env = data["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "0"
    assert not [k for k in env if SECRET_NAME.search(k)]


def test_secrets_reach_pods_only_by_secret_reference():
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for env in _env_lists(doc):
                for var in env:
                    if SECRET_NAME.search(var["name"]):
                        assert "value" not in var and "secretKeyRef" in var["valueFrom"], (
                            f"{path.name}: {var['name']} must come from a Secret"
                        )


def _env_lists(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            else:
                yield from _env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_lists(item)


def test_no_literal_credentials_in_cluster_files():
    credential = re.compile(r"\b(sk-[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{20,})")
    for path in [*CLUSTER.rglob("*"), GPU_CONFIG]:
        if path.is_file():
            assert not credential.search(path.read_text()), f"{path} holds a credential"


def test_every_repository_path_the_cluster_files_mention_exists():
    mention = re.compile(r"(?<![\w/.~-])((?:cluster|configs|data)/[\w./-]*\w)")
    missing = set()
    for path in [*CLUSTER.rglob("*"), GPU_CONFIG]:
        if path.is_file() and path.suffix != ".json":
            for ref in mention.findall(path.read_text()):
                if not (REPO / ref).exists():
                    missing.add(f"{path.relative_to(REPO)} -> {ref}")
    assert not missing


# Grafana ----------------------------------------------------------------------------------

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@lru_cache(maxsize=1)
def _metric_names_in_code() -> frozenset[str]:
    """``teams_rl_*`` names in our sources: literals, plus ``f"teams_rl_x_{k}"`` templates
    expanded with the string keys of the same file (rl_system/policy.py's gauges)."""
    literal = re.compile(r"""["'](teams_rl_[a-z0-9_]*[a-z0-9])["']""")
    template = re.compile(r"""f["'](teams_rl_[a-z0-9_]*)\{\w+\}["']""")
    dict_key = re.compile(r"""^\s*["']([a-z0-9_]+)["']\s*:""", re.MULTILINE)
    names = set()
    for package in ("rl_system", "serve", "train"):
        for source in (REPO / package).rglob("*.py"):
            text = source.read_text()
            names.update(literal.findall(text))
            for prefix in template.findall(text):
                names.update(prefix + key for key in dict_key.findall(text))
    return frozenset(names)


@lru_cache(maxsize=1)
def _ray_source_text() -> str:
    """Ray's own metric definitions: Serve's and the node reporter's."""
    roots = [RAY_PACKAGE / "serve" / "_private", RAY_PACKAGE / "dashboard" / "modules" / "reporter"]
    return "\n".join(p.read_text() for root in roots for p in root.rglob("*.py"))


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    queries.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return queries


def _prometheus_metric_names(query: str) -> set[str]:
    # Ray exports every metric as ray_<name> (its Prometheus namespace is "ray").
    return set(re.findall(r"\bray_[a-z0-9_]+", query))


def test_grafana_dashboard_parses_with_unique_panel_ids():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"


def test_grafana_queries_use_only_metrics_that_exist():
    ours = _metric_names_in_code()
    unknown = set()
    for query in _dashboard_queries():
        for exported in _prometheus_metric_names(query):
            name = exported[len("ray_"):]
            base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
            if name.startswith("teams_rl_"):
                if name not in ours and base not in ours:
                    unknown.add(exported)
            elif f'"{name}"' not in _ray_source_text() and f'"{base}"' not in _ray_source_text():
                unknown.add(exported)
    assert not unknown, f"dashboard queries metrics no code defines: {sorted(unknown)}"


def test_grafana_dashboard_covers_every_stage():
    used = set().union(*(_prometheus_metric_names(q) for q in _dashboard_queries()))
    required = {
        "ray_teams_rl_queries_total", "ray_teams_rl_query_tokens_total",
        "ray_teams_rl_llm_latency_s_bucket", "ray_teams_rl_llm_batch_size_bucket",
        "ray_teams_rl_policy_episode_return_mean", "ray_teams_rl_policy_info_gain",
        "ray_teams_rl_policy_elimination_rate", "ray_serve_deployment_replica_healthy",
        "ray_teams_rl_sft_loss", "ray_teams_rl_sft_tokens_per_second",
        "ray_teams_rl_dataset_evolutions_total", "ray_teams_rl_dataset_pairs_total",
        "ray_teams_rl_dataset_queries_total", "ray_teams_rl_pipeline_stage_running",
        "ray_teams_rl_pipeline_stage_wall_s", "ray_teams_rl_eval_accuracy",
        "ray_teams_rl_eval_mia_auc", "ray_teams_rl_dataset_seeds_total",
        "ray_teams_rl_reviewer_reviews_total", "ray_teams_rl_reviewer_info_gain_bucket",
    }
    assert required <= used, sorted(required - used)
    queries = " ".join(_dashboard_queries())
    assert "histogram_quantile(0.5," in queries and "histogram_quantile(0.95," in queries
