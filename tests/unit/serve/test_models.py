from pathlib import Path

import pytest

from serve.models import ModelNotFoundError, resolve_model


def test_embedded_encoder_resolves_to_package_directory():
    path = Path(resolve_model("embedded:all-minilm-l6-v2"))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()


def test_embedded_llm_resolves_to_converted_safetensors():
    path = Path(resolve_model("embedded:smollm2-135m-instruct", prepare=False))
    config = (path / "config.json").read_text()
    assert "quantization_config" not in config  # reloads as a plain HF model
    assert (path / "tokenizer.json").exists()


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(ModelNotFoundError, match="known: embedded:smollm2-135m-instruct"):
        resolve_model("embedded:gpt-5")


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_ids_pass_through():
    assert resolve_model("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
