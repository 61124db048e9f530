import yaml
from ray.serve.schema import ServeDeploySchema

from rl_system.config import load_config
from serve.app import llm_server_specs, routes, serve_config


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
