"""Stage 2 with the embedded SmolLM2 as expert and reviewer, served by the demo app.

The policy and wizardlm builds through SmolLM2 run in ``test_strategy_comparison`` (they
feed its SFT and report); this file keeps stage 2's own edge cases. The policy checkpoint
here comes from a one-iteration stage-1 run on the scripted backend (seconds, not minutes).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rl_system.actions import ACTION_NAMES
from rl_system.config import load_config
from rl_system.dataset import build_dataset, row_schema
from rl_system.strategies import PolicyCheckpointError

from ..conftest import TEST_API_KEY

pytestmark = pytest.mark.slow

KEY_ENV = "TEAMS_RL_DATASET_TEST_KEY"


@pytest.fixture(scope="module")
def policy_checkpoint(scripted_roles, tmp_path_factory):
    from rl_system.policy import latest_checkpoint, train_policy

    script = {
        "default": "{instruction} Explain each step.",
        "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
    }
    with scripted_roles(
        "dsckpt", script, "serve.batch_wait_timeout_s=0",
        "policy.num_env_runners=0", "policy.iterations=1", "policy.train_batch_size=8",
        "policy.max_steps=2", "dataset.num_seeds=4",
        f"run.dir={tmp_path_factory.mktemp('ckpt')}", "run.name=ckpt",
    ) as cfg:
        train_policy(cfg)
    return str(latest_checkpoint(cfg))


def _cfg(demo_cfg, tmp_path, name, extra=()):
    return load_config("configs/demo.yaml", [
        f"serve.port={demo_cfg.serve.port}", f"run.dir={tmp_path}", f"run.name={name}",
        "policy.max_steps=2", "dataset.num_seeds=4", "dataset.wizardlm_rounds=2",
        "models.expert.sampling.max_tokens=32", *extra,
    ])


def check_dataset_outputs(cfg, manifest, *, strategy, checkpoint):
    """Stage 2's files agree with DESIGN §3 and the manifest; returns the rows."""
    out = cfg.stage_dir("dataset")
    table = pq.read_table(out / "data")
    assert table.schema.names == row_schema().names
    assert table.schema.field("review").type == row_schema().field("review").type
    rows = table.to_pylist()
    assert manifest["summary"]["pairs_written"] == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["strategy"] == strategy and r["policy_checkpoint"] == checkpoint
        assert r["expert_model"] == "embedded:smollm2-135m-instruct"
        assert r["actions"] and set(r["actions"]) <= set(ACTION_NAMES)
        assert r["evolution_step"] == len(r["actions"])
        assert r["response"] and r["instruction"] and r["expert_queries"] >= 2
        assert r["review"]["eliminated"] is None and r["review"]["info_gain"] > 0
    alpaca = json.loads((out / "alpaca.json").read_text())
    assert [set(a) for a in alpaca] == [{"instruction", "input", "output"}] * len(rows)
    chat = [json.loads(line) for line in (out / "chat.jsonl").read_text().splitlines()]
    assert [[m["role"] for m in c["messages"]] for c in chat] == [["user", "assistant"]] * len(rows)
    return rows


def test_incompatible_checkpoint_fails_before_any_query(demo_cfg, policy_checkpoint, tmp_path):
    cfg = _cfg(demo_cfg, tmp_path, "incompatible", [
        "dataset.strategy=policy", f"dataset.policy_checkpoint={policy_checkpoint}",
        "policy.observation=embedding",
    ])
    with pytest.raises(PolicyCheckpointError, match="observes shape"):
        build_dataset(cfg)
    assert not (cfg.stage_dir("dataset") / "cache").exists()


def test_openai_backend_key_from_env_never_written(demo_app, demo_cfg, tmp_path, monkeypatch,
                                                   capfd, caplog):
    monkeypatch.setenv(KEY_ENV, TEST_API_KEY)
    monkeypatch.delenv("TEAMS_RL_API_KEY", raising=False)
    cfg = _cfg(demo_cfg, tmp_path, "openai", [
        "dataset.strategy=wizardlm", "dataset.num_seeds=2", "dataset.wizardlm_rounds=1",
        "models.expert.backend=openai", f"models.expert.base_url={demo_cfg.serve.base_url}",
        f"models.expert.api_key_env={KEY_ENV}",
    ])
    logged = []
    manifest = build_dataset(cfg, log=logged.append)
    expert = manifest["queries"]["wizardlm"]["expert"]
    assert expert["queries"] > 0 and expert["failures"] == 0, expert
    assert manifest["status"] == "complete"
    captured = capfd.readouterr()
    for text in (*logged, captured.out, captured.err, caplog.text):
        assert TEST_API_KEY not in text
    for path in cfg.run_dir.rglob("*"):
        if path.is_file():
            assert TEST_API_KEY.encode() not in path.read_bytes(), path
