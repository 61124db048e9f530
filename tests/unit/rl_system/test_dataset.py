"""Stage-2 logic without Ray: cache, episode, dedupe, ids, strategies, config hash."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rl_system.actions import ACTIONS, STOP, action_by_name
from rl_system.config import load_config
from rl_system.dataset import (
    BudgetExhausted,
    CachedRole,
    RequestCache,
    config_hash,
    dedupe,
    pair_id,
    request_key,
    request_seed,
    row_schema,
    run_episode,
)
from rl_system.reviewer import REVIEW_SCORES, Review, Reviewer
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

ROUND_WORDS = [f"(step {i + 1})" for i in range(64)]


class FakeClient:
    """Stands in for ``LLMClient``: appends a word; reviewer prefers 'Not Equal' if texts differ."""

    def __init__(self, role, *, fail_on: str | None = None, empty: bool = False,
                 transient: bool = True, reply: str | None = None):
        self.role = role
        self.defaults = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 16}
        self.usage = Usage()
        self.fail_on, self.empty, self.transient, self.reply = fail_on, empty, transient, reply
        self.requests: list[str] = []
        self.sent: list = []

    def generate(self, requests, return_exceptions=False):
        out = []
        for r in requests:
            self.usage.queries += 1
            text = r.messages[-1].content
            self.requests.append(text)
            self.sent.append(r)
            if self.fail_on and self.fail_on in text:
                self.usage.failures += 1
                out.append(LLMCallError(self.role, "boom", transient=self.transient))
                continue
            if self.reply is not None:
                out.append(Completion(text=self.reply, prompt_tokens=3, completion_tokens=2))
                continue
            inner = text.split("<<<")[-1].split(">>>")[0]
            # a different word each round: a word doubled twice reads as garbled text
            reply = "" if self.empty else f"{inner} {ROUND_WORDS[inner.count(' (')]}"
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
    assert result.candidates[1]["instruction"].endswith("(step 1) (step 2)")
    assert all(c["expert_queries"] == 1 for c in result.candidates)
    assert result.candidates[0]["review"]["info_gain"] > 0.5
    assert result.counts["evolutions_tried"] == 3 and not result.incomplete


def test_stop_ends_episode_without_query(tmp_path):
    result, expert = episode(tmp_path, UniformChooser((STOP,)))
    assert result.candidates == [] and expert.client.usage.queries == 0


def test_rejected_requests_are_failed_evolutions_and_empty_text_is_eliminated(tmp_path):
    result, _ = episode(tmp_path, UniformChooser((0,)), fail_on="sky", transient=False)
    assert result.counts["evolutions_failed"] == 3 and result.candidates == []
    assert not result.incomplete and result.failure == ""
    result, _ = episode(tmp_path / "b", UniformChooser((0,)), empty=True)
    assert result.counts["eliminated/too_short"] == 3 and result.candidates == []
    assert result.counts["evolutions_failed"] == 0


def test_a_transient_failure_stops_the_seed_incomplete_naming_the_role(tmp_path):
    result, expert = episode(tmp_path, UniformChooser((0,)), fail_on="sky")
    assert result.incomplete and result.failure == "expert: boom"
    assert result.candidates == [] and expert.client.usage.queries == 1  # stopped at once
    assert result.counts["evolutions_failed"] == 0 and result.counts["infra_failures"] == 1


def test_a_transient_review_failure_stops_the_seed_too(tmp_path):
    cfg = load_config(None)
    cache, expert, _ = roles(tmp_path)

    class DownReviewer(FakeClient):
        def score_many(self, items, return_exceptions=False):
            self.usage.queries += len(items)
            return [LLMCallError("reviewer", "timed out") for _ in items]

    reviewer = Reviewer(CachedRole(DownReviewer("reviewer"), cache, model="m"),
                        reward=cfg.policy.reward)
    result = run_episode(Seed(id="s", instruction="Explain why the sky is blue."),
                         chooser=UniformChooser((0,)), rounds=3, expert=expert,
                         reviewer=reviewer, rng=np.random.default_rng(0))
    assert result.incomplete and result.failure == "reviewer: timed out"


def test_episode_carries_the_seed_input_and_breadth_drops_it(tmp_path):
    cfg = load_config(None)
    _, expert, reviewer_role = roles(tmp_path)
    memo = "Memo: the launch moved from May 3 to May 17."
    breadth = ACTIONS.index(action_by_name("breadth"))
    steps = iter([0, 1, breadth, 0])

    class Path:
        def choose(self, **kwargs):
            return next(steps)

    result = run_episode(Seed(id="s", instruction="Summarise the memo.", input=memo),
                         chooser=Path(), rounds=4, expert=expert,
                         reviewer=Reviewer(reviewer_role, reward=cfg.policy.reward),
                         rng=np.random.default_rng(0))
    inputs = [(c["actions"][-1], c["input"]) for c in result.candidates]
    assert inputs == [("add_constraints", memo), ("deepening", memo), ("breadth", ""),
                      ("add_constraints", "")]
    assert all(memo in r for r in expert.client.requests[:3])


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
    import pyarrow as pa

    assert row_schema().names == [
        "id", "seed_id", "seed_instruction", "instruction", "input", "response", "actions",
        "evolution_step", "review", "expert_model", "expert_queries", "expert_tokens",
        "strategy", "policy_checkpoint",
    ]
    review = row_schema().field("review").type
    assert [review.field(i).name for i in range(review.num_fields)] == [
        f.name for f in dataclasses.fields(Review)]
    assert review.field("eliminated").type == pa.string()
    assert review.field("query_cost").type == pa.int64()
    assert all(review.field(k).type == pa.float64() for k in REVIEW_SCORES if k != "query_cost")
    assert row_schema().field("input").type == pa.string()


def test_expert_requests_carry_a_seed_from_their_request_hash(tmp_path):
    from serve.protocol import GenerationRequest

    cache, expert, _ = roles(tmp_path)
    a = [{"role": "user", "content": "Name a prime."}]
    b = [{"role": "user", "content": "Name a river."}]
    expert.generate([a, b])
    sent = expert.client.sent
    payload = GenerationRequest(messages=a, **expert.client.defaults).model_dump(
        mode="json", exclude={"role", "seed"})
    key = request_key("generate", "m", payload)
    assert sent[0].seed == request_seed(key) and sent[0].seed != sent[1].seed
    assert cache.get(key) is not None  # the cache key is the request without its seed
    # as configured: the expert's own sampling, not a forced greedy temperature
    assert sent[0].temperature == 0.7 and sent[0].top_p == 0.95
    # the same request asked again (another run) carries the same seed
    _, again, _ = roles(tmp_path / "other")
    again.generate([a])
    assert again.client.sent[0].seed == sent[0].seed


def test_the_stage_2_expert_samples_as_configured(tmp_path):
    from rl_system.dataset.actors import _ModelStage

    cfg = load_config(None, ["models.expert.sampling.temperature=0.9"])
    assert cfg.dataset.expert_temperature is None
    stage = _ModelStage(run_config=cfg.to_portable_dict(), cache_dir=str(tmp_path),
                        budget=None, secrets={})
    assert stage.expert.client.defaults["temperature"] == 0.9
    cfg.dataset.expert_temperature = 0.0  # an explicit override still works
    stage = _ModelStage(run_config=cfg.to_portable_dict(), cache_dir=str(tmp_path),
                        budget=None, secrets={})
    assert stage.expert.client.defaults["temperature"] == 0.0


def _respond(tmp_path, candidates, **expert_kwargs):
    from rl_system.dataset.actors import RespondStage, stage_table

    stage = object.__new__(RespondStage)  # the actor's logic without Ray
    stage.cfg = load_config(None)
    _, stage.expert, _ = roles(tmp_path, **expert_kwargs)
    zero = dict.fromkeys(("queries", "cached", "prompt_tokens", "completion_tokens",
                          "failures"), 0)
    row = {"seed_index": 0, "seed_id": "s", "instruction": "Summarise the memo.",
           "input": "Memo.", "candidates": candidates, "counts": {},
           "incomplete": False, "failure": "", "usage": {"expert": zero, "reviewer": zero}}
    [out] = stage(stage_table([row])).to_pylist()
    out["counts"] = {k: n for k, n in out["counts"].items() if n}
    return out, stage.expert.client


def _candidate(instruction, input_text=""):
    return {"evolution_step": 1, "actions": ["deepening"], "instruction": instruction,
            "input": input_text, "review": None, "expert_queries": 1, "expert_tokens": 5}


def test_the_stage_actors_pass_structs_not_json_strings(tmp_path):
    """evolve -> respond as Ray Data chains them, in one process: every column between the
    stages is typed Arrow (list of structs, structs), none a JSON string to re-parse."""
    import pyarrow as pa

    from rl_system.dataset import EvolveStage, RespondStage

    cfg = load_config(None)
    _, expert, reviewer_role = roles(tmp_path)
    evolve = object.__new__(EvolveStage)  # the actors' logic without Ray
    evolve.cfg, evolve.expert, evolve.reviewer_role = cfg, expert, reviewer_role
    evolve.text_encoder = None
    evolve.chooser, evolve.rounds = STRATEGIES["wizardlm"].chooser(cfg, None), 3
    respond = object.__new__(RespondStage)
    respond.cfg, respond.expert = cfg, expert
    seeds = pa.Table.from_pylist([{"seed_index": 0, "seed_id": "s1", "input": "",
                                   "instruction": "Explain why the sky is blue."}])

    evolved = evolve(seeds)
    answered = respond(evolved)

    review = row_schema().field("review").type
    for table in (evolved, answered):
        candidates = table.schema.field("candidates").type
        assert pa.types.is_list(candidates) and pa.types.is_struct(candidates.value_type)
        assert candidates.value_type.field("review").type == review
        assert pa.types.is_struct(table.schema.field("counts").type)
        assert pa.types.is_struct(table.schema.field("usage").type)
    [row] = answered.to_pylist()
    assert row["candidates"] and all(c["response"] for c in row["candidates"])
    assert row["counts"]["evolutions_kept"] == len(row["candidates"])
    assert row["counts"]["evolutions_tried"] == 3
    paid = row["usage"]["expert"]["queries"] + row["usage"]["reviewer"]["queries"]
    assert paid == expert.client.usage.queries + reviewer_role.client.usage.queries


def test_respond_asks_with_the_input_and_applies_the_response_rules(tmp_path):
    out, expert = _respond(tmp_path, [_candidate("Summarise the memo.", "Memo: Friday.")])
    kept = out["candidates"]
    assert expert.requests == ["Summarise the memo.\n\nMemo: Friday."]
    assert len(kept) == 1 and kept[0]["input"] == "Memo: Friday." and not out["incomplete"]
    out, _ = _respond(tmp_path / "r", [_candidate("Say sorry politely.")],
                      reply="I'm sorry, but I cannot help with that.")
    assert out["candidates"] == []
    assert out["counts"] == {"eliminated/refusal": 1}
    out, _ = _respond(tmp_path / "e", [_candidate("Say sorry politely.")], reply="...")
    assert out["counts"] == {"eliminated/only_punctuation_or_stop_words": 1}


def test_respond_marks_a_transient_answer_failure_incomplete(tmp_path):
    out, _ = _respond(tmp_path, [_candidate("Plan a picnic."), _candidate("Name a sky.")],
                      fail_on="sky")
    assert out["incomplete"] and out["failure"] == "expert: boom"
    assert out["candidates"] == []
    out, _ = _respond(tmp_path / "b", [_candidate("Plan a picnic."),
                                       _candidate("Name a sky.")],
                      fail_on="sky", transient=False)
    assert not out["incomplete"] and out["failure"] == ""
    assert len(out["candidates"]) == 1
    assert out["counts"] == {"responses_failed": 1}


def test_exports_take_the_input_from_the_row_and_agree_with_parquet(tmp_path):
    import pyarrow.parquet as pq

    from rl_system.dataset.outputs import _write_outputs

    base = {"seed_id": "s", "seed_instruction": "Summarise the memo.", "actions": ["deepening"],
            "evolution_step": 1, "review": None, "expert_model": "m", "expert_queries": 1,
            "expert_tokens": 3, "strategy": "wizardlm", "policy_checkpoint": None}
    rows = [{**base, "id": "a", "instruction": "Summarise the memo.", "input": "Memo: Friday.",
             "response": "It moved to Friday."},
            {**base, "id": "b", "instruction": "Plan a picnic.", "input": "",
             "response": "Bring bread."}]
    _write_outputs(tmp_path, rows)
    table = pq.read_table(tmp_path / "data").to_pylist()
    alpaca = json.loads((tmp_path / "alpaca.json").read_text())
    chat = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert [r["input"] for r in table] == [a["input"] for a in alpaca] == ["Memo: Friday.", ""]
    assert [c["messages"][0]["content"] for c in chat] == [
        "Summarise the memo.\n\nMemo: Friday.", "Plan a picnic."]


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


def test_config_hash_counts_seed_columns_only_when_mapped():
    cfg = load_config(None)
    h = config_hash(cfg, None)
    cfg.dataset.seed_columns.input = None
    assert config_hash(cfg, None) == h
    cfg.dataset.seed_columns.instruction = "question"
    assert config_hash(cfg, None) != h


def test_a_count_key_outside_the_catalogue_is_refused_not_dropped():
    from rl_system.dataset.actors import stage_table

    row = {"seed_index": 0, "seed_id": "s", "instruction": "x", "input": "", "candidates": [],
           "counts": {"evolutions_kept": 1, "eliminated/new_rule": 1}, "incomplete": False,
           "failure": "", "usage": None}
    with pytest.raises(KeyError, match="eliminated/new_rule"):
        stage_table([row])
    row["counts"] = {"evolutions_kept": 1}
    [out] = stage_table([row]).to_pylist()
    assert out["counts"]["evolutions_kept"] == 1 and out["counts"]["evolutions_tried"] == 0
