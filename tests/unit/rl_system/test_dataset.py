"""Stage-2 logic without Ray: cache, episode, dedupe, ids, strategies, config hash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rl_system.actions import ACTIONS, STOP
from rl_system.config import load_config
from rl_system.dataset import (
    BudgetExhausted,
    CachedRole,
    RequestCache,
    config_hash,
    dedupe,
    pair_id,
    row_schema,
    run_episode,
)
from rl_system.reviewer import Reviewer
from rl_system.seeds import Seed
from rl_system.strategies import (
    STRATEGIES,
    PolicyCheckpointError,
    UniformChooser,
    resolve_policy_checkpoint,
    seed_rng,
)
from serve.client import LLMCallError, Usage
from serve.protocol import Completion


class FakeClient:
    """Stands in for ``LLMClient``: appends a word; reviewer prefers 'Not Equal' if texts differ."""

    def __init__(self, role, *, fail_on: str | None = None, empty: bool = False,
                 transient: bool = False):
        self.role = role
        self.defaults = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16}
        self.usage = Usage()
        self.fail_on, self.empty, self.transient = fail_on, empty, transient

    def generate(self, requests, return_exceptions=False):
        out = []
        for r in requests:
            self.usage.queries += 1
            text = r.messages[-1].content
            if self.fail_on and self.fail_on in text:
                self.usage.failures += 1
                out.append(LLMCallError(self.role, "boom", transient=self.transient))
                continue
            inner = text.split("<<<")[-1].split(">>>")[0]
            reply = "" if self.empty else f"{inner} carefully"
            out.append(Completion(text=reply, prompt_tokens=3, completion_tokens=2))
        return out

    def score_many(self, items, return_exceptions=False):
        out = []
        for prompt, _ in items:
            self.usage.queries += 1
            texts = prompt.split("<<<")[1:]
            differ = len({t.split(">>>")[0] for t in texts}) > 1
            out.append([-3.0, -0.05] if differ else [-0.05, -3.0])
        return out


def roles(tmp_path, budget=None, **expert_kwargs):
    cache = RequestCache(tmp_path / "cache")
    expert = CachedRole(FakeClient("expert", **expert_kwargs), cache, model="m", budget=budget)
    reviewer = CachedRole(FakeClient("reviewer"), cache, model="m")
    return cache, expert, reviewer


def episode(tmp_path, chooser, rounds=3, **kwargs):
    cfg = load_config(None)
    _, expert, reviewer_role = roles(tmp_path, **kwargs)
    reviewer = Reviewer(reviewer_role, reward=cfg.policy.reward)
    seed = Seed(id="s1", instruction="Explain why the sky is blue.")
    return run_episode(seed, chooser=chooser, rounds=rounds, expert=expert, reviewer=reviewer,
                       rng=np.random.default_rng(0)), expert


def test_episode_keeps_every_survivor_and_splits_cost():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        result, expert = episode(Path(d), UniformChooser((0,)), rounds=3)
    assert [c["evolution_step"] for c in result.candidates] == [1, 2, 3]
    assert result.candidates[-1]["actions"] == ["add_constraints"] * 3
    assert result.candidates[1]["instruction"].endswith("carefully carefully")
    assert all(c["expert_queries"] == 1 for c in result.candidates)
    assert result.candidates[0]["review"]["info_gain"] > 0.5
    assert result.counts["evolutions_tried"] == 3 and not result.incomplete


def test_stop_ends_episode_without_query(tmp_path):
    result, expert = episode(tmp_path, UniformChooser((STOP,)))
    assert result.candidates == [] and expert.client.usage.queries == 0


def test_errors_and_empty_text_are_failed_evolutions(tmp_path):
    result, _ = episode(tmp_path, UniformChooser((0,)), fail_on="sky")
    assert result.counts["evolutions_failed"] == 3 and result.candidates == []
    assert not result.incomplete


def test_a_transient_error_leaves_the_seed_incomplete(tmp_path):
    result, _ = episode(tmp_path, UniformChooser((0,)), fail_on="sky", transient=True)
    assert result.incomplete and result.failure == "expert: boom"
    assert result.counts["evolutions_failed"] == 0 and result.candidates == []
    result, _ = episode(tmp_path / "b", UniformChooser((0,)), empty=True)
    assert result.counts["evolutions_failed"] == 3 and result.candidates == []


def test_cache_replays_without_paying_and_tolerates_torn_line(tmp_path):
    first, expert = episode(tmp_path, UniformChooser((1,)))
    paid = expert.client.usage.queries
    assert paid == 3
    # a SIGKILL mid-write leaves a torn last line
    [path] = list((tmp_path / "cache").glob("*.jsonl"))
    with path.open("a") as f:
        f.write('{"key": "abc", "val')
    again, expert2 = episode(tmp_path, UniformChooser((1,)))
    assert expert2.client.usage.queries == 0 and expert2.cached.queries == 3
    assert again.candidates == first.candidates
    assert RequestCache(tmp_path / "cache").torn_lines == 1


def test_budget_refusal_marks_incomplete(tmp_path):
    class Budget:  # the Ray actor's logic, called directly
        def __init__(self):
            self.left = 1

    # CachedRole asks the budget through ray.get; patch the grant for a unit test
    _, expert, reviewer_role = roles(tmp_path)
    budget = Budget()

    def grant(wanted):
        granted = min(wanted, budget.left)
        budget.left -= granted
        return granted

    expert._grant = grant
    cfg = load_config(None)
    result = run_episode(Seed(id="s", instruction="Name three rivers in Asia."),
                         chooser=UniformChooser((0,)), rounds=3, expert=expert,
                         reviewer=Reviewer(reviewer_role, reward=cfg.policy.reward),
                         rng=np.random.default_rng(0))
    assert result.incomplete and len(result.candidates) == 1
    with pytest.raises(BudgetExhausted):
        expert.generate([[{"role": "user", "content": "x"}]])


def test_dedupe_exact_then_near():
    rows = [{"instruction": t} for t in ["A cat.", "a cat", "A dog!", "A dog!!", "Zebra"]]
    vecs = {"A cat.": [1, 0], "a cat": [1, 0], "A dog!": [0.6, 0.8], "A dog!!": [0.6, 0.8],
            "Zebra": [0, 1]}
    kept, exact, near = dedupe(rows, threshold=0.95,
                               encode=lambda ts: np.array([vecs[t] for t in ts], float))
    assert [r["instruction"] for r in kept] == ["A cat.", "A dog!", "Zebra"]
    assert (exact, near) == (2, 0)
    kept, exact, near = dedupe(rows, threshold=0.5,
                               encode=lambda ts: np.array([vecs[t] for t in ts], float))
    assert [r["instruction"] for r in kept] == ["A cat.", "Zebra"] and near == 1


def test_pair_id_is_stable_and_distinct():
    a = pair_id(seed_id="s", strategy="policy", actions=["deepening"], step=1)
    assert a == pair_id(seed_id="s", strategy="policy", actions=["deepening"], step=1)
    assert a != pair_id(seed_id="s", strategy="policy", actions=["breadth"], step=1)


def test_strategies_are_a_table():
    cfg = load_config(None, ["dataset.wizardlm_rounds=5", "policy.max_steps=3"])
    assert set(STRATEGIES) == {"policy", "wizardlm", "random"}
    assert STRATEGIES["wizardlm"].rounds(cfg) == 5 and STRATEGIES["random"].rounds(cfg) == 3
    wiz = STRATEGIES["wizardlm"].chooser(cfg, None)
    rng = seed_rng(cfg, "x")
    picks = {wiz.choose(instruction="", last_action=None, step=0, rng=rng) for _ in range(200)}
    assert STOP not in picks and len(picks) == len(ACTIONS) - 1
    # the same seed id gives the same choices
    a = [wiz.choose(instruction="", last_action=None, step=0, rng=seed_rng(cfg, "x"))]
    assert a == [wiz.choose(instruction="", last_action=None, step=0, rng=seed_rng(cfg, "x"))]


def test_missing_policy_checkpoint_is_clear(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    with pytest.raises(PolicyCheckpointError, match="train-policy"):
        resolve_policy_checkpoint(cfg)
    cfg.dataset.policy_checkpoint = str(tmp_path / "nope")
    with pytest.raises(PolicyCheckpointError, match="not found"):
        resolve_policy_checkpoint(cfg)


def test_config_hash_ignores_budget_but_not_experiment():
    cfg = load_config(None)
    h = config_hash(cfg, None)
    cfg.dataset.max_expert_queries = 5
    cfg.models.expert.timeout_s = 3
    assert config_hash(cfg, None) == h
    cfg.dataset.dedupe_threshold = 0.9
    assert config_hash(cfg, None) != h


def test_row_schema_matches_design():
    assert row_schema().names == [
        "id", "seed_id", "seed_instruction", "instruction", "response", "actions",
        "evolution_step", "review", "expert_model", "expert_queries", "expert_tokens",
        "strategy", "policy_checkpoint",
    ]
    assert json.dumps(row_schema().field("review").type.names)


def test_cli_build_dataset_bad_seeds_fail_before_ray(tmp_path, ray_init_calls):
    from click.testing import CliRunner

    from rl_system.cli import main

    seeds = tmp_path / "s.jsonl"
    seeds.write_text('{"instruction": "ok"}\n{"instruction": 3}\n')
    result = CliRunner().invoke(main, ["build-dataset", "--set", f"dataset.seeds={seeds}",
                                       "--set", "dataset.strategy=wizardlm"])
    assert result.exit_code != 0 and "s.jsonl:2" in result.output
    result = CliRunner().invoke(main, ["build-dataset", "--set", f"dataset.seeds={seeds}",
                                       "--set", f"run.dir={tmp_path}",
                                       "--set", "dataset.skip_bad_lines=true"])
    assert result.exit_code != 0 and "train-policy" in result.output  # no checkpoint
    assert ray_init_calls == []
