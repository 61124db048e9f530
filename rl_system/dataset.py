"""Stage 2: build the instruction/response dataset on Ray Data.

    teams-rl build-dataset --config configs/demo.yaml

Seeds (``dataset.seeds``) stream through two actor-pool stages:

1. ``evolve``: per seed, the strategy (``rl_system.strategies``) picks actions and each
   is one step of ``rl_system.evolution.evolve`` (the training env's step): the *expert*
   role rewrites the instruction (shown with the seed's input), the *reviewer* role
   reviews it and the instruction rules of ``rl_system.reviewer`` drop failures. Every
   surviving rewrite is a candidate; it becomes the task the next round evolves. The
   seed's input stays attached unless an action replaces the task (``breadth``).
2. ``respond``: the expert answers every candidate (instruction and input, rendered by
   ``rl_system.tasks.task_text``); Evol-Instruct's response rules (refusal-like and
   short, only punctuation / stop words) drop the pair.

A seed whose model call failed *transiently* (overload, timeout, a dead replica, the
network: ``LLMCallError.transient``) stops there and is ``incomplete``, with the failing
role and message in its ``failure`` column: the next run redoes it (its cached calls
replayed). A call rejected as it stands is a counted failed evolution or response.

The driver then removes exact and near duplicates (MiniLM cosine >=
``dataset.dedupe_threshold``) and writes, under ``runs/<name>/dataset/``:
``data/part-*.parquet`` (one row per pair, DESIGN §3), ``alpaca.json``, ``chat.jsonl``
and ``manifest.json`` (config hash, counts, query totals, the summary table).

Exact resume: every model call goes through a request-hash cache in ``cache/`` (one
append-only JSONL file per actor; a torn last line is skipped), each expert request
carries a sampling ``seed`` derived from its request hash (the expert samples as
``models.expert.sampling`` says, yet a request asked again gets the same answer) and
action choices use a per-seed RNG. A
re-run with the same config replays cached answers (counted as
``expert_queries_cached``, not paid) and yields the same rows; a changed config is
refused. ``dataset.max_expert_queries`` caps the expert calls *paid* by one invocation:
seeds it cuts short are left out and finished by the next invocation.

We call models through our own ``LLMClient`` inside ``map_batches`` actors rather than
``ray.data.llm`` processors: the cache lookup, the budget check and the call must be one
step per request, and an episode's next request depends on the previous answer, which a
processor stage (one request per row, fixed in advance) cannot express without
unrolling every round into separate cache/processor/cache stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rl_system.actions import ACTIONS
from rl_system.config import TeamsRLConfig
from rl_system.reviewer import RULE_NAMES, Review, eliminate_response
from rl_system.rundir import (
    COMPLETE,
    INCOMPLETE,
    RUNNING,
    RunMismatch,
    check_same_run,
    read_manifest,
    run_lock,
    write_json,
    write_manifest,
)
from rl_system.seeds import Seed, SeedSet, load_seeds
from rl_system.tasks import Task, task_text, user_messages

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE = "dataset"
CACHE_DIR = "cache"
DATA_DIR = "data"
ROWS_PER_SHARD = 5000
ROLES = ("expert", "reviewer", "instructor")
USAGE_KEYS = ("queries", "cached", "prompt_tokens", "completion_tokens", "failures")


DatasetRunMismatch = RunMismatch  # the run directory holds a dataset of another config


class DatasetIncomplete(RuntimeError):
    """Seeds failed transiently (a role down, overloaded, timing out): the build is not
    complete; the same command retries them. ``manifest`` is what was written."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


class BudgetExhausted(RuntimeError):
    """``dataset.max_expert_queries`` is spent; the build stops and can be resumed."""


# -- the resume cache ----------------------------------------------------------------------


class RequestCache:
    """Answers by request hash, stored as JSONL files under ``directory``.

    Each writer appends to its own file (no two processes share one), so lines never
    interleave; a line torn by SIGKILL fails to parse and is skipped on load.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._entries: dict[str, Any] = {}
        self._file = None
        self.torn_lines = 0
        if self.directory.is_dir():
            for path in sorted(self.directory.glob("*.jsonl")):
                with path.open("rb") as f:
                    for raw in f:
                        try:
                            entry = json.loads(raw)
                            self._entries[entry["key"]] = entry["value"]
                        except (ValueError, KeyError, TypeError):
                            self.torn_lines += 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._file = (self.directory / name).open("a", buffering=1)  # line-buffered
        self._entries[key] = value
        self._file.write(json.dumps({"key": key, "value": value}) + "\n")


def request_key(kind: str, model: str, payload: dict) -> str:
    blob = json.dumps({"kind": kind, "model": model, "payload": payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def request_seed(key: str) -> int:
    """The sampling seed of a request: fixed by its hash, so asking again (a resumed run,
    a lost answer) samples the same completion."""
    return int(key[:8], 16)


class CachedRole:
    """An ``LLMClient`` behind the resume cache and (for the expert) the query budget.

    ``usage`` counts every logical query (paid or cached), so ``Review.query_cost`` is the
    same in a fresh and a resumed run; ``client.usage`` is what was paid; ``cached`` the rest.
    """

    def __init__(self, client, cache: RequestCache, *, model: str, budget=None):
        from serve.client import Usage

        self.client = client
        self.role = client.role
        self.cache = cache
        self.model = model
        self.budget = budget
        self.usage = Usage()
        self.cached = Usage()

    def snapshot(self) -> dict[str, int]:
        paid = self.client.usage
        return {"queries": paid.queries, "cached": self.cached.queries,
                "prompt_tokens": paid.prompt_tokens + self.cached.prompt_tokens,
                "completion_tokens": paid.completion_tokens + self.cached.completion_tokens,
                "failures": paid.failures}

    def _grant(self, wanted: int) -> int:
        if self.budget is None or wanted == 0:
            return wanted
        import ray

        return ray.get(self.budget.acquire.remote(wanted))

    def _run(self, kind: str, payloads: list[dict], call: Callable[[list[int]], list],
             decode: Callable[[Any], Any], encode: Callable[[Any], Any], tokens) -> list:
        keys = [request_key(kind, self.model, p) for p in payloads]
        results: list[Any] = [None] * len(keys)
        misses = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is None:
                misses.append(i)
            else:
                results[i] = decode(hit)
                prompt, completion = tokens(results[i])
                self.cached.queries += 1
                self.cached.prompt_tokens += prompt
                self.cached.completion_tokens += completion
        granted = self._grant(len(misses))
        paid, refused = misses[:granted], misses[granted:]
        for i in refused:
            results[i] = BudgetExhausted(
                f"dataset.max_expert_queries reached; run again to continue (role {self.role})"
            )
        # Nothing to pay for: the HTTP transport refuses an empty batch (no worker threads).
        for i, answer in zip(paid, call(paid) if paid else [], strict=True):
            results[i] = answer
            if not isinstance(answer, BaseException):
                self.cache.put(keys[i], encode(answer))
        for r in results:
            self.usage.queries += 1
            if not isinstance(r, BaseException):
                prompt, completion = tokens(r)
                self.usage.prompt_tokens += prompt
                self.usage.completion_tokens += completion
        return results

    @staticmethod
    def _raise_first(results: list, return_exceptions: bool) -> list:
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    def generate(self, messages_list: list[list[dict]], *, return_exceptions: bool = False):
        from serve.protocol import Completion, GenerationRequest

        requests = [GenerationRequest(messages=m, role=self.role, **self.client.defaults)
                    for m in messages_list]
        payloads = [r.model_dump(mode="json", exclude={"role", "seed"}) for r in requests]
        requests = [r.model_copy(update={"seed": request_seed(request_key(
            "generate", self.model, p))}) for r, p in zip(requests, payloads, strict=True)]
        results = self._run(
            "generate", payloads,
            call=lambda idx: self.client.generate([requests[i] for i in idx],
                                                  return_exceptions=True),
            decode=lambda v: Completion(**v), encode=lambda c: c.model_dump(mode="json"),
            tokens=lambda c: (c.prompt_tokens, c.completion_tokens),
        )
        return self._raise_first(results, return_exceptions)

    def score_many(self, items, *, return_exceptions: bool = False):
        payloads = [{"messages": p if not isinstance(p, str) else [{"role": "user", "content": p}],
                     "candidates": list(c)} for p, c in items]
        results = self._run(
            "score", payloads,
            call=lambda idx: self.client.score_many([items[i] for i in idx],
                                                    return_exceptions=True),
            decode=lambda v: list(v), encode=lambda lp: list(lp), tokens=lambda lp: (0, 0),
        )
        return self._raise_first(results, return_exceptions)


# -- one seed's episode (pure logic; unit-tested with fake clients) --------------------------


def response_messages(instruction: str, input_text: str = "") -> list[dict[str, str]]:
    """The expert's request for an answer: the task as the chat export and SFT show it."""
    return user_messages(instruction, input_text)


@dataclass
class EpisodeResult:
    candidates: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    # The seed must be redone by the next run (budget spent, or a transient failure).
    incomplete: bool = False
    failure: str = ""  # "role: message" of the transient failure that stopped it, else ""


def run_episode(
    seed: Seed, *, chooser, rounds: int, expert: CachedRole, reviewer, rng,
) -> EpisodeResult:
    """Evolve ``seed`` for at most ``rounds`` actions; every survivor is a candidate.

    Each action is one ``rl_system.evolution.evolve`` step with the expert as rewriter.
    ``reviewer``: a ``Reviewer`` over the reviewer role. The observation follows the
    training env: ``step`` = actions taken so far, ``last_action`` = the last one chosen
    (whether or not its rewrite survived). A candidate's ``expert_queries`` counts the
    rewrites spent since the previous survivor, so a seed's cost is split over its pairs.
    A transient failure ends the episode ``incomplete`` (``failure`` says where).
    """
    from rl_system.evolution import evolve

    result = EpisodeResult()
    counts = result.counts
    task = Task.of(seed)
    history, taken = [task], []
    last_action: int | None = None
    spent_queries = spent_tokens = 0
    for step in range(rounds):
        index = chooser.choose(instruction=task.instruction, last_action=last_action,
                               step=step, rng=rng)
        action = ACTIONS[index]
        last_action = index
        taken.append(action.name)
        if not action.queries_model:
            break
        counts["evolutions_tried"] += 1
        try:
            outcome = evolve(task, action, rewriter=expert, reviewer=reviewer, history=history)
        except BudgetExhausted:
            result.incomplete = True
            counts["evolutions_tried"] -= 1
            break
        spent_queries += outcome.queries
        spent_tokens += outcome.tokens
        if outcome.outcome == "infra_failure":
            counts["infra_failures"] += 1
            result.incomplete, result.failure = True, outcome.failure
            break
        if outcome.outcome == "failed":
            counts["evolutions_failed" if outcome.rewrite is None else "reviews_failed"] += 1
            continue
        if outcome.outcome == "eliminated":
            counts[f"eliminated/{outcome.review.eliminated}"] += 1
            continue
        counts["evolutions_kept"] += 1
        task = outcome.task
        result.candidates.append({
            "evolution_step": step + 1, "actions": list(taken),
            "instruction": task.instruction, "input": task.input,
            "review": outcome.review.as_dict(), "expert_queries": spent_queries,
            "expert_tokens": spent_tokens,
        })
        spent_queries = spent_tokens = 0
        history.append(task)
    return result


# -- Ray Data stages ------------------------------------------------------------------------


class _Secret:
    """Carries an API key to actors without ever printing it."""

    def __init__(self, value: str):
        self._value = value

    def __repr__(self) -> str:
        return "_Secret(***)"

    def get(self) -> str:
        return self._value


class _ModelStage:
    """Common set-up of the actor stages: config, secrets, cache, expert client."""

    def __init__(self, *, run_config: dict, cache_dir: str, budget, secrets: dict):
        from serve.client import LLMClient

        for name, secret in secrets.items():
            os.environ[name] = secret.get()  # this actor's process only; never logged
        self.cfg = cfg = TeamsRLConfig.model_validate(run_config)
        self.cache = RequestCache(cache_dir)
        client = LLMClient.from_config(cfg, "expert")
        if cfg.dataset.expert_temperature is not None:
            client.defaults["temperature"] = cfg.dataset.expert_temperature
        self.expert = CachedRole(client, self.cache, model=cfg.models.expert.model, budget=budget)

    def _usage(self, roles: dict[str, CachedRole], before: dict) -> str:
        return json.dumps({
            role: {k: v - before[role][k] for k, v in r.snapshot().items()}
            for role, r in roles.items()
        })


class EvolveStage(_ModelStage):
    def __init__(self, *, strategy: str, checkpoint: str | None, **kwargs):
        from rl_system.encoders import TextEncoder
        from rl_system.strategies import STRATEGIES
        from serve.client import LLMClient

        super().__init__(**kwargs)
        cfg = self.cfg
        self.strategy = STRATEGIES[strategy]
        self.chooser = self.strategy.chooser(cfg, checkpoint)
        self.rounds = self.strategy.rounds(cfg)
        self.reviewer_role = CachedRole(LLMClient.from_config(cfg, "reviewer"), self.cache,
                                        model=cfg.models.reviewer.model)
        self.text_encoder = TextEncoder(cfg.models.encoder)

    def __call__(self, batch):
        import pyarrow as pa

        from rl_system.reviewer import Reviewer
        from rl_system.strategies import seed_rng

        out = []
        roles = {"expert": self.expert, "reviewer": self.reviewer_role}
        for row in batch.to_pylist():
            before = {k: r.snapshot() for k, r in roles.items()}
            seed = Seed(id=row["seed_id"], instruction=row["instruction"], input=row["input"])
            # A fresh Reviewer per seed: its self-pair memo must not depend on which seeds
            # shared this actor, or query costs would differ between runs.
            reviewer = Reviewer(self.reviewer_role, reward=self.cfg.policy.reward,
                                text_encoder=self.text_encoder)
            episode = run_episode(seed, chooser=self.chooser, rounds=self.rounds,
                                  expert=self.expert, reviewer=reviewer,
                                  rng=seed_rng(self.cfg, seed.id))
            out.append({**row, "candidates": json.dumps(episode.candidates),
                        "counts": json.dumps(episode.counts), "incomplete": episode.incomplete,
                        "failure": episode.failure, "usage": self._usage(roles, before)})
        return pa.Table.from_pylist(out)


class RespondStage(_ModelStage):
    def __call__(self, batch):
        import pyarrow as pa

        from serve.client import LLMCallError

        out = []
        for row in batch.to_pylist():
            before = {"expert": self.expert.snapshot()}
            candidates, counts = json.loads(row["candidates"]), Counter(json.loads(row["counts"]))
            incomplete, failure = row["incomplete"], row["failure"]
            kept = []
            if candidates and not incomplete:
                answers = self.expert.generate(
                    [response_messages(c["instruction"], c["input"]) for c in candidates],
                    return_exceptions=True,
                )
                for c, answer in zip(candidates, answers, strict=True):
                    if isinstance(answer, BudgetExhausted):
                        incomplete = True
                        continue
                    if isinstance(answer, LLMCallError) and answer.transient:
                        incomplete, failure = True, failure or str(answer)
                        continue
                    c["expert_queries"] += 1
                    if isinstance(answer, LLMCallError):
                        if answer.transient:  # the seed is redone by the next run
                            counts["infra_failures"] += 1
                            incomplete, failure = True, failure or str(answer)
                        else:
                            counts["responses_failed"] += 1
                        continue
                    c["expert_tokens"] += answer.prompt_tokens + answer.completion_tokens
                    response = answer.text.strip()
                    rule = eliminate_response(response, Task(c["instruction"], c["input"]))
                    if rule:
                        counts[f"eliminated/{rule}"] += 1
                        continue
                    kept.append({**c, "response": response})
            # Usage from the evolve stage plus this one's expert calls.
            usage = json.loads(row["usage"])
            mine = json.loads(self._usage({"expert": self.expert}, before))["expert"]
            usage["expert"] = {k: usage["expert"][k] + mine[k] for k in mine}
            out.append({**row, "candidates": json.dumps([] if incomplete else kept),
                        "counts": json.dumps(counts), "incomplete": incomplete,
                        "failure": failure, "usage": json.dumps(usage)})
        return pa.Table.from_pylist(out)


# -- driver ---------------------------------------------------------------------------------


def config_hash(cfg: TeamsRLConfig, policy_checkpoint: str | None) -> str:
    """What decides the rows: a change here is refused, never mixed into the old run.

    The budget, concurrency and transport details (timeouts, endpoints, keys) are left
    out: changing them resumes the same build.
    """
    data = cfg.to_portable_dict()
    dataset = {k: v for k, v in data["dataset"].items()
               if k not in ("max_expert_queries", "concurrency", "actor_num_cpus")}
    models = {role: {k: data["models"][role][k] for k in ("model", "sampling")}
              for role in ("expert", "reviewer")}
    p = data["policy"]
    lineage = {
        "dataset": dataset, "models": models, "encoder": data["models"]["encoder"],
        "policy": {k: p[k] for k in ("max_steps", "observation", "action_space", "seed")},
        "reward": p["reward"], "policy_checkpoint": policy_checkpoint,
    }
    return hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


def pair_id(*, seed_id: str, strategy: str, actions: list[str], step: int) -> str:
    """Stable: fixed by the seed and the action path, not by timing or worker."""
    blob = "\0".join([seed_id, strategy, str(step), *actions])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def dedupe(rows: list[dict], *, threshold: float, encode) -> tuple[list[dict], int, int]:
    """Keep the first of exact (normalised text) and near duplicates (cosine >= threshold).

    ``encode``: texts -> unit-norm vectors. Returns (kept, exact removed, near removed).
    """
    import numpy as np

    seen, unique = set(), []
    for r in rows:
        key = _normalise(r["instruction"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    exact = len(rows) - len(unique)
    if not unique:
        return [], exact, 0
    vectors = encode([r["instruction"] for r in unique])
    kept_idx: list[int] = []
    for i in range(len(unique)):
        if kept_idx and float(np.max(vectors[kept_idx] @ vectors[i])) >= threshold:
            continue
        kept_idx.append(i)
    return [unique[i] for i in kept_idx], exact, len(unique) - len(kept_idx)


def row_schema():
    import pyarrow as pa

    types = {"float": pa.float64(), "int": pa.int64(), "str | None": pa.string()}
    review = pa.struct([(f.name, types[str(getattr(f.type, "__name__", f.type))])
                        for f in fields(Review)])
    return pa.schema([
        ("id", pa.string()), ("seed_id", pa.string()), ("seed_instruction", pa.string()),
        ("instruction", pa.string()), ("input", pa.string()), ("response", pa.string()),
        ("actions", pa.list_(pa.string())), ("evolution_step", pa.int64()), ("review", review),
        ("expert_model", pa.string()), ("expert_queries", pa.int64()),
        ("expert_tokens", pa.int64()), ("strategy", pa.string()),
        ("policy_checkpoint", pa.string()),
    ])



@dataclass
class SeedTally:
    """Which seeds finished, and why the others did not (``budget``: the query budget cut
    them short; ``failure``: a call failed transiently; ``stopped``: never reached because
    the build stopped early). Pure bookkeeping over the stage rows, in arrival order."""

    total: int
    max_failure_rate: float
    done: int = 0
    incomplete: Counter = field(default_factory=Counter)
    first_failure: str | None = None  # "<role>: <message>"

    def add(self, row: dict) -> None:
        self.done += 1
        if not row.get("incomplete"):
            return
        failure = row.get("failure")
        self.incomplete["failure" if failure else "budget"] += 1
        if failure and self.first_failure is None:
            self.first_failure = failure

    @property
    def too_many_failures(self) -> bool:
        return self.incomplete["failure"] > self.max_failure_rate * self.total

    def stop_early(self) -> None:
        self.incomplete["stopped"] += self.total - self.done

    @property
    def seeds_incomplete(self) -> int:
        return sum(self.incomplete.values())

    def failure_record(self) -> dict[str, str] | None:
        if self.first_failure is None:
            return None
        role, _, message = self.first_failure.partition(": ")
        return {"role": role, "message": message} if message else {"role": "?",
                                                                    "message": role}

    def failure_message(self) -> str | None:
        """What the command says when seeds failed; None when none did."""
        if not self.incomplete["failure"]:
            return None
        f = self.failure_record()
        stopped = (f"; stopped early: more than dataset.max_failure_rate="
                   f"{self.max_failure_rate:g} of the seeds failed" if self.incomplete["stopped"]
                   else "")
        return (f"dataset incomplete: {self.incomplete['failure']} of {self.total} seeds "
                f"failed, the {f['role']} role said: {f['message']}{stopped}. Bring the "
                f"{f['role']} role back and run the same command again: only unfinished "
                "seeds are asked again (cached answers are replayed, not paid)")


def empty_reason(summary: dict) -> str:
    """Why a build wrote no pairs (an empty build writes no parquet shard)."""
    if summary["seeds_incomplete"]:
        return (f"all {summary['seeds_incomplete']} unfinished seeds are left for the next run "
                "(budget or failed calls)")
    if not summary["evolutions_tried"]:
        return "no evolution was tried (every chosen action was stop)"
    return ("every evolution failed, was eliminated or lost its response "
            f"(failed {summary['evolutions_failed']}, reviews failed "
            f"{summary['reviews_failed']}, eliminated {sum(summary['eliminated'].values())}, "
            f"responses failed {summary['responses_failed']}, duplicates "
            f"{summary['duplicates_exact'] + summary['duplicates_near']})")


def _secrets(cfg: TeamsRLConfig) -> dict[str, _Secret]:
    """Keys the actors need, from the driver's environment (never from config files).

    The ingress key is not among them: actors inherit ``$TEAMS_RL_API_KEY`` from the
    node's environment or read ``serve.api_key_file`` themselves (``serve.auth``)."""
    out = {}
    for role in ("expert", "reviewer"):
        role_cfg = cfg.models.role(role)
        if role_cfg.backend == "openai" and os.environ.get(role_cfg.api_key_env):
            out[role_cfg.api_key_env] = _Secret(os.environ[role_cfg.api_key_env])
    return out


def _make_budget(limit: int):
    import ray

    @ray.remote(num_cpus=0)
    class QueryBudget:
        def __init__(self, limit: int):
            self.left = limit

        def acquire(self, wanted: int) -> int:
            granted = min(wanted, self.left)
            self.left -= granted
            return granted

    return QueryBudget.remote(limit)


def check_inputs(cfg: TeamsRLConfig) -> tuple[SeedSet, str | None]:
    """Everything that can fail without a model call: seeds, strategy, policy checkpoint.

    Raises ``SeedFileError`` / ``PolicyCheckpointError`` before any query is spent.
    """
    from rl_system.strategies import STRATEGIES, load_policy_module, resolve_policy_checkpoint

    seeds = load_seeds(cfg.dataset.seeds, limit=cfg.dataset.num_seeds,
                       skip_bad_lines=cfg.dataset.skip_bad_lines)
    checkpoint = None
    if STRATEGIES[cfg.dataset.strategy].needs_policy:
        path = resolve_policy_checkpoint(cfg)
        load_policy_module(cfg, path)
        checkpoint = str(path)
    return seeds, checkpoint


def dataset_is_done(cfg: TeamsRLConfig) -> bool:
    """Whether this run's dataset is complete for this same config (cheap: no model call).

    A missing policy checkpoint means stage 1 has not run yet, so the dataset is not done.
    """
    from rl_system.strategies import STRATEGIES, PolicyCheckpointError, resolve_policy_checkpoint

    manifest = read_manifest(cfg.stage_dir("dataset").resolve())
    if not manifest or manifest.get("status") != COMPLETE:
        return False
    checkpoint = None
    if STRATEGIES[cfg.dataset.strategy].needs_policy:
        try:
            checkpoint = str(resolve_policy_checkpoint(cfg))
        except PolicyCheckpointError:
            return False
    return manifest.get("fingerprint") == config_hash(cfg, checkpoint)


def _empty_usage() -> dict[str, dict[str, int]]:
    return {role: dict.fromkeys(USAGE_KEYS, 0) for role in ROLES}


def build_dataset(cfg: TeamsRLConfig, *, log: Callable[[str], None] = logger.info) -> dict:
    """Run (or resume) stage 2; Ray and the role applications must be up.

    Returns the manifest (also written to ``runs/<name>/dataset/manifest.json``); its status
    is ``incomplete`` while any seed is unfinished. Raises ``DatasetIncomplete`` (naming the
    role and its error) when seeds failed transiently, after writing what was finished, and
    ``RunMismatch`` when the directory holds a dataset of another config.
    """
    with run_lock(cfg.run_dir, what="teams-rl build-dataset"):
        return _build_dataset(cfg, log=log)


def _build_dataset(cfg: TeamsRLConfig, *, log: Callable[[str], None]) -> dict:
    import ray

    started = time.monotonic()
    seeds, checkpoint = check_inputs(cfg)
    strategy = cfg.dataset.strategy
    out_dir = cfg.stage_dir("dataset").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(cfg, checkpoint)
    inputs = {"policy_checkpoint": checkpoint}
    previous = check_same_run(out_dir, digest, what="a dataset")
    if previous and previous.get("status") == COMPLETE:
        log(f"dataset: already complete in {out_dir}")
        return previous
    write_manifest(out_dir, stage=STAGE, fingerprint=digest, status=RUNNING, inputs=inputs,
                   strategy=strategy)

    budget = (_make_budget(cfg.dataset.max_expert_queries)
              if cfg.dataset.max_expert_queries else None)
    stage_kwargs = {"run_config": cfg.to_portable_dict(), "cache_dir": str(out_dir / CACHE_DIR),
                    "budget": budget, "secrets": _secrets(cfg)}
    actor_opts = {"batch_size": 1, "batch_format": "pyarrow",
                  "compute": ray.data.ActorPoolStrategy(
                      size=min(cfg.dataset.concurrency, len(seeds))),
                  "num_cpus": cfg.dataset.actor_num_cpus}
    items = [{"seed_index": i, "seed_id": s.id, "instruction": s.instruction, "input": s.input}
             for i, s in enumerate(seeds)]
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(EvolveStage, fn_constructor_kwargs={
            **stage_kwargs, "strategy": strategy, "checkpoint": checkpoint}, **actor_opts)
        .map_batches(RespondStage, fn_constructor_kwargs=stage_kwargs, **actor_opts)
    )
    counts: Counter = Counter()
    usage = _empty_usage()
    results = []
    tally = SeedTally(total=len(seeds), max_failure_rate=cfg.dataset.max_failure_rate)
    metrics = _metrics()
    rows_iter = ds.iter_rows()
    for row in rows_iter:
        results.append(row)
        tally.add(row)
        seed_counts = json.loads(row["counts"])
        counts.update(seed_counts)
        for role, u in json.loads(row["usage"]).items():
            for k, v in u.items():
                usage[role][k] += v
        _record_metrics(metrics, strategy, seed_counts, json.loads(row["usage"]))
        if tally.too_many_failures and tally.done < tally.total:
            # The role is down or overloaded: the remaining seeds would fail the same way.
            tally.stop_early()
            break
    del rows_iter, ds  # stops the stage actors when the build stopped early
    results.sort(key=lambda r: r["seed_index"])
    if budget is not None:
        ray.kill(budget)

    rows = []
    for r in results:
        if r["incomplete"]:
            continue
        for c in json.loads(r["candidates"]):
            rows.append({
                "id": pair_id(seed_id=r["seed_id"], strategy=strategy, actions=c["actions"],
                              step=c["evolution_step"]),
                "seed_id": r["seed_id"], "seed_instruction": r["instruction"],
                "instruction": c["instruction"], "input": c["input"],
                "response": c["response"], "actions": c["actions"],
                "evolution_step": c["evolution_step"],
                "review": c["review"], "expert_model": cfg.models.expert.model,
                "expert_queries": c["expert_queries"], "expert_tokens": c["expert_tokens"],
                "strategy": strategy, "policy_checkpoint": checkpoint,
            })
    from rl_system.encoders import TextEncoder

    encoder = TextEncoder(cfg.models.encoder)
    kept, exact, near = dedupe(rows, threshold=cfg.dataset.dedupe_threshold,
                               encode=encoder.encode)
    files = _write_outputs(out_dir, kept)
    if metrics is not None and kept:
        metrics.pairs.inc(len(kept), tags={"strategy": strategy})

    expert = usage["expert"]
    summary = {
        "seeds_read": len(seeds), "seeds_skipped_bad": seeds.skipped_bad,
        "seeds_skipped_empty": seeds.skipped_empty,
        "seeds_incomplete": tally.seeds_incomplete,
        "seeds_incomplete_by_cause": {c: tally.incomplete[c]
                                      for c in ("budget", "failure", "stopped")},
        "first_failure": tally.failure_record(),
        "evolutions_tried": counts["evolutions_tried"],
        "evolutions_failed": counts["evolutions_failed"],
        "reviews_failed": counts["reviews_failed"],
        "eliminated": {rule: counts[f"eliminated/{rule}"] for rule in RULE_NAMES},
        "evolutions_kept": counts["evolutions_kept"],
        "responses_failed": counts["responses_failed"],
        "duplicates_exact": exact, "duplicates_near": near, "pairs_written": len(kept),
    }
    if not kept:
        summary["empty_reason"] = empty_reason(summary)
    logical = expert["queries"] + expert["cached"]
    manifest = write_manifest(
        out_dir, stage=STAGE, fingerprint=digest,
        status=INCOMPLETE if tally.seeds_incomplete else COMPLETE, inputs=inputs,
        strategy=strategy, policy_checkpoint=checkpoint,
        seeds=str(seeds.path), expert_model=cfg.models.expert.model,
        summary=summary,
        queries={strategy: usage},
        expert_queries=expert["queries"], expert_queries_cached=expert["cached"],
        expert_queries_per_pair=(logical / len(kept)) if kept else None,
        elapsed_s=round(time.monotonic() - started, 2),
        files=files,
    )
    log(format_summary(manifest))
    if not kept:
        log(f"dataset: no pairs written, so no parquet shard: {summary['empty_reason']}")
    failure = tally.failure_message()
    if failure:
        raise DatasetIncomplete(failure, manifest)
    if tally.incomplete["budget"]:
        log(f"dataset: budget dataset.max_expert_queries={cfg.dataset.max_expert_queries} "
            f"reached; {tally.incomplete['budget']} seeds left for the next run (same command "
            "resumes)")
    return manifest


def _write_outputs(out_dir: Path, rows: list[dict]) -> dict[str, Any]:
    """Parquet shards, Alpaca JSON and chat JSONL; each replaced atomically as a whole.

    All three come from the same rows: a pair's input is its row's (the seed's, or ""
    after an action that replaced the task), and the chat user turn is ``task_text`` of
    instruction and input, the prompt SFT builds (``train.data``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging = out_dir / f".{DATA_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shards = []
    # An empty build writes no shard: a 0-row parquet file is refused by datasets.load_dataset.
    for n, start in enumerate(range(0, len(rows), ROWS_PER_SHARD)):
        table = pa.Table.from_pylist(rows[start:start + ROWS_PER_SHARD], schema=row_schema())
        name = f"part-{n:05d}.parquet"
        pq.write_table(table, staging / name)
        shards.append(f"{DATA_DIR}/{name}")
    final = out_dir / DATA_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)

    alpaca = [{"instruction": r["instruction"], "input": r["input"], "output": r["response"]}
              for r in rows]
    write_json(out_dir / "alpaca.json", alpaca)
    tmp = out_dir / "chat.jsonl.tmp"
    with tmp.open("w") as f:
        for r in rows:
            user = task_text(r["instruction"], r["input"])
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": r["response"]}]})
                    + "\n")
    os.replace(tmp, out_dir / "chat.jsonl")
    return {"parquet": shards, "alpaca": "alpaca.json", "chat": "chat.jsonl"}


def _metrics():
    try:
        from rl_system.metrics import dataset_metrics

        return dataset_metrics()
    except Exception:  # noqa: BLE001 - metrics are best effort (e.g. Ray not initialised)
        return None


def _record_metrics(metrics, strategy: str, counts: dict, usage: dict) -> None:
    if metrics is None:
        return
    for role, u in usage.items():
        if u["queries"]:
            metrics.queries.inc(u["queries"], tags={"strategy": strategy, "role": role,
                                                    "source": "paid"})
        if u["cached"]:
            metrics.queries.inc(u["cached"], tags={"strategy": strategy, "role": role,
                                                   "source": "cached"})
    for key, n in counts.items():
        outcome = {"evolutions_kept": "kept", "evolutions_failed": "failed"}.get(key)
        if key.startswith("eliminated/"):
            outcome = key
        if outcome and n:
            metrics.evolutions.inc(n, tags={"strategy": strategy, "outcome": outcome})


def format_summary(manifest: dict) -> str:
    """The end-of-run table: what was read, tried, dropped and written, and what it cost."""
    s = manifest["summary"]
    lines = [f"dataset build ({manifest['strategy']}): {manifest['status']}",
             f"  {'seeds read':<44}{s['seeds_read']:>8}",
             f"  {'seeds skipped (malformed / empty)':<44}"
             f"{s['seeds_skipped_bad']:>4} /{s['seeds_skipped_empty']:>2}",
             f"  {'seeds unfinished (budget / failed / stopped)':<44}"
             + " /".join(f"{n:>4}" for n in s.get("seeds_incomplete_by_cause", {}).values()),
             f"  {'evolutions tried':<44}{s['evolutions_tried']:>8}",
             f"  {'evolutions failed (model error)':<44}{s['evolutions_failed']:>8}"]
    lines += [f"  {'eliminated: ' + rule:<44}{n:>8}" for rule, n in s["eliminated"].items()]
    lines += [f"  {'responses failed':<44}{s['responses_failed']:>8}",
              f"  {'duplicates removed (exact / near)':<44}"
              f"{s['duplicates_exact']:>4} /{s['duplicates_near']:>2}",
              f"  {'pairs written':<44}{s['pairs_written']:>8}",
              f"  {'role':<12}{'paid':>8}{'cached':>8}{'prompt tok':>12}{'compl tok':>11}"
              f"{'failed':>8}"]
    for role, u in manifest["queries"][manifest["strategy"]].items():
        lines.append(f"  {role:<12}{u['queries']:>8}{u['cached']:>8}{u['prompt_tokens']:>12}"
                     f"{u['completion_tokens']:>11}{u['failures']:>8}")
    per_pair = manifest["expert_queries_per_pair"]
    lines.append(f"  expert queries per pair: {'n/a' if per_pair is None else f'{per_pair:.2f}'}")
    return "\n".join(lines)
