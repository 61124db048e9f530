import pytest
import yaml

from rl_system.config import ConfigError, load_config, save_resolved


def test_demo_config_loads_with_overrides():
    cfg = load_config("configs/demo.yaml", ["serve.max_batch_size=4", "run.name=try2"])
    assert cfg.serve.max_batch_size == 4
    assert cfg.run_dir.as_posix() == "runs/try2"
    # one deployment plays all three roles in the demo
    names = {cfg.models.role(r).deployment_name for r in ("instructor", "reviewer", "expert")}
    assert names == {"llm-transformers-smollm2-135m-instruct"}


def test_errors_name_every_bad_field():
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", ["serve.max_batch_size=0", "serve.prot=1"])
    text = str(err.value)
    assert "serve.max_batch_size: Input should be greater than or equal to 1" in text
    assert "serve.prot: unknown key" in text


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="'port' is a value, not a section"):
        load_config("configs/demo.yaml", ["serve.port.x=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["serve.port"])


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\nserve: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_autoscaling_bounds_checked():
    with pytest.raises(ConfigError, match="min_replicas .* exceeds max_replicas"):
        load_config(None, ["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"])


def test_the_ingress_key_is_never_a_config_value(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAMS_RL_API_KEY", "s3cret-value")
    for source, overrides in ((None, ["serve.api_key=s3cret-value"]),
                              (_write(tmp_path, "serve:\n  api_key: s3cret-value\n"), [])):
        with pytest.raises(ConfigError) as err:
            load_config(source, overrides)
        text = str(err.value)
        assert "serve.api_key" in text and "TEAMS_RL_API_KEY" in text
        assert "serve.api_key_file" in text and "s3cret-value" not in text
    cfg = load_config(None, ["serve.api_key_file=/run/secrets/key"])
    out = tmp_path / "config.yaml"
    save_resolved(cfg, out)
    assert "s3cret-value" not in out.read_text() and "s3cret-value" not in repr(cfg)
    assert yaml.safe_load(out.read_text())["serve"]["api_key_file"] == "/run/secrets/key"


def _write(tmp_path, text: str):
    path = tmp_path / "with_key.yaml"
    path.write_text(text)
    return path


def test_section_hash_changes_only_with_its_sections():
    a = load_config(None)
    b = load_config(None, ["sft.learning_rate=0.1"])
    assert a.section_hash("dataset", "models") == b.section_hash("dataset", "models")
    assert a.section_hash("sft") != b.section_hash("sft")
