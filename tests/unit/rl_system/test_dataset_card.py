"""The dataset card stage 2 writes beside its parquet: front matter a Hub reads, lineage."""

from __future__ import annotations

import pytest
import yaml

from rl_system.dataset.outputs import _write_outputs, card_features, row_schema, write_card

USAGE = {"queries": 7, "cached": 3, "prompt_tokens": 400, "completion_tokens": 200,
         "failures": 0}


def _row(n: int) -> dict:
    return {
        "id": f"p{n}", "seed_id": "s1", "seed_instruction": "Explain tides.",
        "instruction": f"Explain tides in {n} steps.", "input": "", "response": "The moon.",
        "actions": ["deepening"], "evolution_step": 1,
        "review": {"info_gain": 0.5, "info_gain_raw": 0.5, "info_gain_first_order": 0.1,
                   "info_gain_second_order": 0.4, "self_pair": 0.0, "eliminated": None,
                   "diversity": 0.2, "query_cost": 1, "reward": 0.5},
        "expert_model": "embedded:tiny", "expert_queries": 2, "expert_tokens": 90,
        "strategy": "policy", "policy_checkpoint": "runs/x/policy/checkpoint",
    }


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    front, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(front)


def test_card_front_matter_parses_and_lists_every_column(tmp_path):
    _write_outputs(tmp_path, [_row(1), _row(2)])
    name = write_card(tmp_path, license="apache-2.0", strategy="policy",
                      policy_checkpoint="runs/x/policy/checkpoint", expert_model="embedded:tiny",
                      judge="rating", pairs=2, expert_usage=USAGE)

    text = (tmp_path / name).read_text(encoding="utf-8")
    front = _front_matter(text)
    assert name == "README.md"
    assert front["license"] == "apache-2.0"
    assert front["tags"] == ["teams-rl", "instruction-tuning", "synthetic"]
    assert front["configs"] == [{"config_name": "default",
                                 "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    features = {f["name"]: f for f in front["dataset_info"]["features"]}
    assert list(features) == row_schema().names
    assert features["actions"] == {"name": "actions", "list": "string"}
    assert features["evolution_step"]["dtype"] == "int64"
    review = row_schema().field("review").type
    assert [f["name"] for f in features["review"]["struct"]] == [f.name for f in review]
    for lineage in ("`policy`", "runs/x/policy/checkpoint", "`embedded:tiny`", "`rating`",
                    "| pairs | 2 |", "| 7 / 3 |", "| 600 |"):
        assert lineage in text
    assert not list(tmp_path.glob(".*.tmp"))


def test_card_features_are_what_datasets_reads_from_the_parquet():
    datasets = pytest.importorskip("datasets")

    expected = datasets.Features.from_arrow_schema(row_schema())._to_yaml_list()
    assert card_features(row_schema()) == expected


def test_card_license_defaults_to_other_and_is_not_in_the_fingerprint():
    from rl_system.config import load_config
    from rl_system.dataset.build import config_hash

    cfg = load_config(None)
    assert cfg.dataset.card_license == "other"
    h = config_hash(cfg, None)
    cfg.dataset.card_license = "cc-by-4.0"
    assert config_hash(cfg, None) == h
