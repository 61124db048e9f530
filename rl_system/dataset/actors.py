"""Stage 2's work per seed: one episode, and the Ray Data stage actors that run it.

Seeds stream through two actor-pool stages (``map_batches``):

1. ``evolve`` (:class:`EvolveStage`): per seed, the strategy (``rl_system.strategies``)
   picks actions and each is one step of ``rl_system.evolution.evolve`` (the training
   env's step): the *expert* role rewrites the instruction (shown with the seed's input),
   the *reviewer* role reviews it and the instruction rules of ``rl_system.reviewer`` drop
   failures. Every surviving rewrite is a candidate; it becomes the task the next round
   evolves. The seed's input stays attached unless an action replaces the task
   (``breadth``).
2. ``respond`` (:class:`RespondStage`): the expert answers every candidate (instruction
   and input, rendered by ``rl_system.tasks.task_text``); Evol-Instruct's response rules
   (refusal-like and short, only punctuation / stop words) drop the pair.

A seed whose model call failed *transiently* (overload, timeout, a dead replica, the
network: ``LLMCallError.transient``) stops there and is ``incomplete``, with the failing
role and message in its ``failure`` column: the next run redoes it (its cached calls
replayed). A call rejected as it stands is a counted failed evolution or response.

We call models through our own ``LLMClient`` inside ``map_batches`` actors rather than
``ray.data.llm`` processors: the cache lookup, the budget check and the call must be one
step per request, and an episode's next request depends on the previous answer, which a
processor stage (one request per row, fixed in advance) cannot express without
unrolling every round into separate cache/processor/cache stages.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from rl_system.actions import ACTIONS
from rl_system.config import TeamsRLConfig
from rl_system.dataset.cache import BudgetExhausted, CachedRole, RequestCache
from rl_system.dataset.outputs import USAGE_KEYS, row_schema
from rl_system.reviewer import RULE_NAMES, eliminate_response
from rl_system.seeds import Seed
from rl_system.tasks import Task, user_messages

# Every key a seed's counts may hold; the stage schema's ``counts`` struct has one field each.
COUNT_KEYS: tuple[str, ...] = (
    "evolutions_tried", "evolutions_kept", "evolutions_failed", "reviews_failed",
    "infra_failures", "responses_failed", *(f"eliminated/{rule}" for rule in RULE_NAMES),
)
CANDIDATE_FIELDS = ("evolution_step", "actions", "instruction", "input", "review",
                    "expert_queries", "expert_tokens", "response")
STAGE_ROLES = ("expert", "reviewer")


def stage_schema():
    """The rows passed between the stage actors and to the driver: one per seed, its
    candidates a list of structs typed as the parquet's columns (``response`` null until
    the respond stage), counts and usage structs: no JSON strings to re-parse."""
    import pyarrow as pa

    pairs = row_schema()
    usage = pa.struct([(k, pa.int64()) for k in USAGE_KEYS])
    return pa.schema([
        ("seed_index", pa.int64()), ("seed_id", pa.string()), ("instruction", pa.string()),
        ("input", pa.string()),
        ("candidates", pa.list_(pa.struct([pairs.field(f) for f in CANDIDATE_FIELDS]))),
        ("counts", pa.struct([(k, pa.int64()) for k in COUNT_KEYS])),
        ("incomplete", pa.bool_()), ("failure", pa.string()),
        ("usage", pa.struct([(role, usage) for role in STAGE_ROLES])),
    ])


def stage_table(rows: list[dict]):
    """``rows`` as a table of :func:`stage_schema`; a count key outside ``COUNT_KEYS`` is a
    bug (Arrow would drop it silently), so it raises."""
    import pyarrow as pa

    for row in rows:
        unknown = set(row["counts"]) - set(COUNT_KEYS)
        if unknown:
            raise KeyError(f"counts {sorted(unknown)} are not in COUNT_KEYS; add them there")
    rows = [{**row, "counts": {k: row["counts"].get(k, 0) for k in COUNT_KEYS}}
            for row in rows]
    return pa.Table.from_pylist(rows, schema=stage_schema())


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


class _Secret:
    """Carries an API key to actors without ever printing it."""

    def __init__(self, value: str):
        self._value = value

    def __repr__(self) -> str:
        return "_Secret(***)"

    def get(self) -> str:
        return self._value


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

    def _usage(self, roles: dict[str, CachedRole], before: dict) -> dict:
        return {role: {k: v - before[role][k] for k, v in r.snapshot().items()}
                for role, r in roles.items()}


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
            out.append({**row, "candidates": episode.candidates, "counts": episode.counts,
                        "incomplete": episode.incomplete, "failure": episode.failure,
                        "usage": self._usage(roles, before)})
        return stage_table(out)


class RespondStage(_ModelStage):
    def __call__(self, batch):
        from serve.client import LLMCallError

        out = []
        for row in batch.to_pylist():
            before = {"expert": self.expert.snapshot()}
            candidates, counts = row["candidates"], Counter(row["counts"])
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
            usage = row["usage"]
            mine = self._usage({"expert": self.expert}, before)["expert"]
            usage["expert"] = {k: usage["expert"][k] + mine[k] for k in mine}
            out.append({**row, "candidates": [] if incomplete else kept, "counts": counts,
                        "incomplete": incomplete, "failure": failure, "usage": usage})
        return stage_table(out)
