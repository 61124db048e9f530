import importlib.util
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rl_system.config import ROLES, ConfigError, load_config
from serve.app import check_key, llm_server_specs, routes, serve_config
from serve.backends.vllm_backend import KEYED_INGRESS, VLLM_ROUTE_PREFIX


def test_demo_roles_share_one_deployment_and_route_by_role_or_model():
    cfg = load_config("configs/demo.yaml")
    specs = llm_server_specs(cfg)
    assert list(specs) == ["llm-transformers-smollm2-135m-instruct"]
    table = routes(cfg)
    assert table["expert"] == table["reviewer"] == table["embedded:smollm2-135m-instruct"]


def test_emitted_serve_config_validates_and_carries_no_secret(monkeypatch):
    monkeypatch.setenv("TEAMS_RL_API_KEY", "do-not-write-me")
    cfg = load_config("configs/demo.yaml", ["serve.port=8100", "serve.autoscaling.max_replicas=3"])
    data = serve_config(cfg)
    text = yaml.safe_dump(data)
    assert "do-not-write-me" not in text
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder"
    assert schema.http_options.port == 8100
    assert app.args["config"]["serve"]["autoscaling"]["max_replicas"] == 3


def test_roles_on_different_models_get_their_own_deployments():
    cfg = load_config(
        None, ["models.reviewer.backend=scripted", "models.reviewer.model=judge"]
    )
    assert len(llm_server_specs(cfg)) == 2
    assert routes(cfg)["reviewer"] == "llm-scripted-judge"


def test_the_ingress_is_bound_with_the_key_files_path_never_the_key(monkeypatch):
    import cloudpickle

    from serve.app import build_app

    monkeypatch.setenv("TEAMS_RL_API_KEY", "never-bound-key")
    cfg = load_config(None, ["models.expert.backend=scripted", "models.expert.model=echo",
                             "serve.api_key_file=/run/secrets/teams-rl",
                             "serve.limits.max_tokens=64"])
    app = build_app(cfg)
    kwargs = app._bound_deployment.init_kwargs
    assert kwargs["api_key_file"] == "/run/secrets/teams-rl"
    assert kwargs["limits"]["max_tokens"] == 64 and kwargs["roles"] == ROLES
    args = app._bound_deployment.init_args
    assert b"never-bound-key" not in cloudpickle.dumps((args[1], kwargs))  # Serve stores these


def test_the_llm_servers_take_the_max_tokens_cap_from_config():
    cfg = load_config("configs/demo.yaml", ["serve.limits.max_tokens=512"])
    assert {s.max_new_tokens_limit for s in llm_server_specs(cfg).values()} == {512}


def test_a_public_host_without_a_key_is_refused_with_the_way_to_set_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TEAMS_RL_API_KEY", raising=False)
    assert check_key(load_config(None)) is False  # loopback: an open ingress is allowed
    with pytest.raises(ConfigError) as err:
        check_key(load_config(None, ["serve.host=0.0.0.0"]))
    assert "TEAMS_RL_API_KEY" in str(err.value) and "serve.api_key_file" in str(err.value)
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert check_key(load_config(None, ["serve.host=0.0.0.0", f"serve.api_key_file={key_file}"]))
    monkeypatch.setenv("TEAMS_RL_API_KEY", "from-env")
    assert check_key(load_config(None, ["serve.host=10.1.2.3"]))


def test_vllm_roles_get_ray_serve_llms_ingress_behind_our_key_check(monkeypatch):
    monkeypatch.setenv("TEAMS_RL_API_KEY", "do-not-write-me")
    cfg = load_config("configs/gpu-cluster.yaml")
    text = yaml.safe_dump(serve_config(cfg))
    assert "do-not-write-me" not in text
    (vllm,) = [a for a in ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
               if a.route_prefix == VLLM_ROUTE_PREFIX]
    ingress = vllm.args["ingress_cls_config"]
    assert ingress["ingress_cls"] == KEYED_INGRESS
    assert ingress["ingress_extra_kwargs"]["host"] == "0.0.0.0"
    module, cls = KEYED_INGRESS.split(":")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    assert f"class {cls}(" in source and "guard(" in source


def test_serves_access_log_is_off_by_default_and_on_when_asked():
    from serve.app import build_app, deployment_options

    cfg = load_config("configs/demo.yaml")
    assert deployment_options(cfg)["logging_config"] == {"enable_access_log": False}
    ingress = build_app(cfg)._bound_deployment
    assert ingress._deployment_config.logging_config["enable_access_log"] is False
    emitted = ServeDeploySchema.model_validate(serve_config(cfg))
    assert emitted.logging_config.enable_access_log is False
    assert all(a.logging_config.enable_access_log is False for a in emitted.applications)
    loud = load_config("configs/demo.yaml", ["serve.access_log=true"])
    assert deployment_options(loud)["logging_config"] == {"enable_access_log": True}
