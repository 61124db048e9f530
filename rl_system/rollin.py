"""Guided roll-in for the evolution policy (RLGF: Chang et al. 2023, "Learning to Generate
Better Than Your LLM", arXiv 2306.11816).

RL that interacts with a *guide* policy learns faster than plain on-policy RL. Two of the
paper's schemes are here, chosen by ``policy.rollin.mode``:

- ``restart`` (PPO++): an episode starts from the state the guide reaches after
  ``n ~ U{0..max_rollin_steps}`` of its own steps. The env takes those steps at reset; they
  are not part of the learner's trajectory (their queries are still paid and counted).
- ``mixture`` (the mixture roll-in of AggreVaTeD / D2LOLS): each of the first
  ``n ~ U{0..max_rollin_steps}`` steps takes the guide's action with probability ``beta``,
  the rest are the learner's. Guide steps carry ``info["guided"] = 1``, and
  :class:`MaskGuideSteps` (a learner connector) clears their loss mask, so the
  policy-gradient terms of TRPO and PPO sum over the learner's actions only.

Guides are a catalogue (``GUIDES``) of builders returning a ``Chooser`` (the protocol stage 2's
strategies share): ``schedule`` (a fixed action list), ``wizardlm`` (stage 2's Evol-Instruct
chooser, reused), ``checkpoint`` (an earlier RLModule) and ``llm`` (:class:`LLMGuide`: the
instructor, asked which operation of the catalogue would most enrich the instruction, as a
distribution over action names from the label log-probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rl_system.actions import ACTION_NAMES, ACTIONS, EvolutionAction, depth_and_breadth
from rl_system.config import RollinConfig, TeamsRLConfig
from rl_system.judges import label_distribution

# Step-info keys the roll-in adds (numeric, so RLlib aggregates them): a mixture step taken
# by the guide; the guide's own model queries; a restart's hidden steps and their queries,
# reported on the learner's first step.
ROLLIN_INFO_KEYS = ("guided", "guide_queries", "rollin_steps", "rollin_query_cost")

LLM_GUIDE_PROMPT = (
    "You help make instructions for an AI assistant more demanding and informative. Below "
    "is an instruction, inside triple angle brackets, and a list of operations that rewrite "
    "an instruction. Pick the one operation that would enrich this instruction the most.\n\n"
    "<<<{instruction}>>>\n\nOperations:\n{operations}\n\n"
    "Answer with the operation's name only."
)


def llm_guide_prompt(instruction: str, actions: Sequence[EvolutionAction]) -> str:
    """The guide's request: the instruction and one ``- name: what it changes`` line per
    operation of the catalogue (so adding an action adds a line)."""
    operations = "\n".join(f"- {a.name}: {a.change}" for a in actions)
    return LLM_GUIDE_PROMPT.format(instruction=instruction, operations=operations)


class _MemoryCache:
    """``RequestCache``'s get/put without a directory (a run with nowhere to persist)."""

    def __init__(self):
        self._entries: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = value


class LLMGuide:
    """The instructor as a policy over the catalogue's evolving operations.

    ``client``: the instructor's ``LLMClient`` (anything with its ``role``, ``usage`` and
    ``score_many``); it is wrapped in stage 2's request cache (``CachedRole``), so asking
    about the same instruction twice is paid once. ``queries`` counts every request made
    (paid or cached, as ``Review.query_cost`` counts); the paid ones are also the client's
    instructor queries (its usage and the ``teams_rl_queries_total`` metric).
    """

    def __init__(self, client, *, model: str, cache_dir: str | None = None,
                 actions: Sequence[EvolutionAction] | None = None):
        from rl_system.dataset.cache import CachedRole, RequestCache

        cache = RequestCache(cache_dir) if cache_dir else _MemoryCache()
        self.role = CachedRole(client, cache, model=model)
        self.actions = tuple(actions) if actions is not None else depth_and_breadth()
        self._indices = np.array([ACTIONS.index(a) for a in self.actions])

    @property
    def queries(self) -> int:
        return self.role.usage.queries

    def distribution(self, instruction: str) -> np.ndarray:
        """P(action) over ``ACTIONS`` (length ``len(ACTIONS)``, sums to 1): the softmax of
        the operation names' log-probabilities as the answer; actions not offered get 0."""
        [logprobs] = self.role.score_many(
            [(llm_guide_prompt(instruction, self.actions), [a.name for a in self.actions])]
        )
        probs = np.zeros(len(ACTIONS))
        probs[self._indices] = label_distribution(logprobs)
        return probs

    def choose(self, *, instruction, last_action, step, rng: np.random.Generator) -> int:
        return int(rng.choice(len(ACTIONS), p=self.distribution(instruction)))


@dataclass(frozen=True)
class ScheduleGuide:
    """A fixed sequence of action indices, taken in turn and repeated from the start."""

    indices: tuple[int, ...]

    def choose(self, *, instruction, last_action, step, rng) -> int:
        return self.indices[step % len(self.indices)]


@dataclass(frozen=True)
class GuideContext:
    """What a guide may need from the env that builds it (lazily: only ``llm`` calls it)."""

    instructor: Callable[[], Any]  # -> the instructor's LLMClient
    cache_dir: str | None = None


@dataclass(frozen=True)
class GuideSpec:
    name: str
    description: str
    build: Callable[[TeamsRLConfig, GuideContext], Any]  # -> a strategies.Chooser


def _wizardlm(cfg: TeamsRLConfig, ctx: GuideContext):
    from rl_system.strategies import STRATEGIES

    return STRATEGIES["wizardlm"].chooser(cfg, None)


def _checkpoint(cfg: TeamsRLConfig, ctx: GuideContext):
    from rl_system.strategies import PolicyChooser

    return PolicyChooser(cfg, cfg.policy.rollin.checkpoint)


def _llm(cfg: TeamsRLConfig, ctx: GuideContext):
    return LLMGuide(ctx.instructor(), model=cfg.models.instructor.model, cache_dir=ctx.cache_dir)


GUIDES: dict[str, GuideSpec] = {
    g.name: g
    for g in (
        GuideSpec("llm", "the instructor picks the operation that enriches most", _llm),
        GuideSpec("wizardlm", "Evol-Instruct: a uniform depth/breadth operation", _wizardlm),
        GuideSpec(
            "schedule", "policy.rollin.schedule's actions in turn",
            lambda cfg, ctx: ScheduleGuide(
                tuple(ACTION_NAMES.index(n) for n in cfg.policy.rollin.schedule)),
        ),
        GuideSpec("checkpoint", "an earlier stage-1 policy (policy.rollin.checkpoint)",
                  _checkpoint),
    )
}


def build_guide(cfg: TeamsRLConfig, ctx: GuideContext):
    return GUIDES[cfg.policy.rollin.guide].build(cfg, ctx)


def guide_queries(guide) -> int:
    """Model queries the guide has made so far (0 for guides that ask no model)."""
    return int(getattr(guide, "queries", 0))


def sample_rollin_steps(rollin: RollinConfig, rng: np.random.Generator) -> int:
    """This episode's roll-in length: uniform on 0..max_rollin_steps (0 in learner mode)."""
    if rollin.mode == "learner":
        return 0
    return int(rng.integers(rollin.max_rollin_steps + 1))


# -- the learner side: policy-gradient terms on learner steps only ----------------------------


def learner_step_flags(infos: Sequence[dict | None], num_steps: int) -> list[bool]:
    """Per action of an episode (``num_steps`` of them), whether the learner chose it.

    ``infos``: the episode's infos as RLlib keeps them, aligned with observations: the reset
    info first, then step t's info at index t + 1. Steps past the infos count as learner's.
    """
    flags = []
    for t in range(num_steps):
        info = infos[t + 1] if t + 1 < len(infos) else None
        flags.append(not (info or {}).get("guided"))
    return flags


def mask_guide_steps(loss_mask: Sequence[bool], infos: Sequence[dict | None]) -> list[bool]:
    """``loss_mask`` with every guide step cleared (same length; its last entry, RLlib's
    bootstrap timestep, is already False and stays so)."""
    flags = learner_step_flags(infos, len(loss_mask))
    return [bool(m) and f for m, f in zip(loss_mask, flags, strict=True)]


def mask_guide_steps_connector():
    """A learner-connector factory (``config.training(learner_connector=...)``) whose piece
    clears the loss mask of guide steps. Built lazily: importing this module needs no Ray."""
    from ray.rllib.connectors.connector_v2 import ConnectorV2
    from ray.rllib.core.columns import Columns

    class MaskGuideSteps(ConnectorV2):
        """Runs right after ``AddOneTsToEpisodesAndTruncate`` (custom pieces come before the
        default ones, which the Learner's build puts that one ahead of), while the batch is
        still ``{LOSS_MASK: {(episode_id,): [bool, ...]}}``. Both TRPO's and PPO's losses
        (and their value losses) average over the loss mask, so a cleared step adds no
        policy-gradient term, whatever action the env runner recorded for it."""

        def __call__(self, *, rl_module, batch, episodes, **kwargs):
            masks = batch.get(Columns.LOSS_MASK)
            if not masks:
                return batch
            for episode in self.single_agent_episode_iterator(
                    episodes, agents_that_stepped_only=False):
                key = ((episode.id_,) if episode.multi_agent_episode_id is None else
                       (episode.multi_agent_episode_id, episode.agent_id, episode.module_id))
                if key in masks:
                    masks[key] = mask_guide_steps(masks[key], list(episode.get_infos()))
            return batch

    return lambda *args, **kwargs: MaskGuideSteps()
