"""Role configs are discriminated on ``backend``: each backend's fields on its own model."""

from __future__ import annotations

import pytest

from rl_system.config import load_config
from serve.config import (
    OpenAIRoleConfig,
    ScriptedRoleConfig,
    ServingConfig,
    TransformersRoleConfig,
    role_config,
)
from serve.errors import ConfigError, TeamsRLError


def test_a_role_without_backend_is_served_by_transformers():
    role = role_config({"model": "embedded:smollm2-135m-instruct"})
    assert isinstance(role, TransformersRoleConfig)
    assert role.dtype == "auto"
    assert not hasattr(role, "base_url")


def test_each_backend_gets_its_own_fields():
    cfg = load_config(None, ["models.expert.backend=openai", "models.expert.model=gpt-4o-mini",
                             "models.instructor.backend=scripted"])
    assert isinstance(cfg.models.expert, OpenAIRoleConfig)
    assert cfg.models.expert.api_key_env == "OPENAI_API_KEY"
    assert isinstance(cfg.models.instructor, ScriptedRoleConfig)
    assert cfg.models.instructor.script == {}


def test_a_field_of_another_backend_is_refused_with_its_path():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["models.expert.base_url=http://localhost:9000/v1"])
    message = str(err.value)
    assert ("models.expert.base_url: a field of backend vllm / openai, not of transformers"
            in message)
    assert "transformers.base_url" not in message  # the union's tag is not part of the path


def test_an_unknown_backend_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"models.reviewer.backend: expected one of "
                                          r"transformers, vllm, openai, scripted"):
        load_config(None, ["models.reviewer.backend=llamacpp"])


def test_the_reviewer_stays_greedy_when_an_override_sets_another_field():
    # Before: `--set models.reviewer.dtype=...` alone rebuilt the reviewer from that one key,
    # and its sampling fell back to temperature 0.7.
    cfg = load_config(None, ["models.reviewer.dtype=float32"])
    assert cfg.models.reviewer.sampling.temperature == 0.0
    assert cfg.models.reviewer.dtype == "float32"
    assert load_config(None).models.reviewer.sampling.temperature == 0.0
    sampled = load_config(None, ["models.reviewer.sampling.temperature=0.3"])
    assert sampled.models.reviewer.sampling.temperature == 0.3
    assert load_config(None).models.expert.sampling.temperature == 0.7


def test_the_serving_part_of_a_run_config_reads_only_its_sections():
    run = load_config(None, ["serve.port=8123", "policy.iterations=3"])
    serving = ServingConfig.from_run_config(run.model_dump(mode="json"))
    assert serving.serve.port == 8123
    assert serving.models == run.models


def test_config_errors_are_the_one_user_error_type():
    assert issubclass(ConfigError, TeamsRLError) and issubclass(ConfigError, ValueError)
