"""``InstructionEvolutionEnv``: the MDP of TeaMs-RL's stage 1 (gymnasium).

An episode starts from a seed task (an instruction and the input it refers to, if any).
Each step the policy picks an evolution action (``rl_system.actions``); the step itself
(the instructor's rewrite, the reviewer's score, elimination) is ``rl_system.evolution``'s,
the same one stage 2 takes, and the reward is the review's weighted sum. A surviving
rewrite becomes the current task; an eliminated one is dropped. ``stop`` ends the episode
without a query, and so does reaching ``max_steps`` (paper: 6): both are *terminated*,
since the step count is part of the observation, so a value estimate never bootstraps
from a state the policy never acts in.

A model call that fails does not crash the run. Rejected as it stands (a non-transient
``LLMCallError``): a failed evolution with ``reward.failure_penalty``, counted in the
step's info (``failed``). Failed transiently (overload, timeout, a dead replica, the
network): the episode ends *truncated* with reward 0 and ``infra_failure`` in the info,
so an outage never teaches the policy anything.

Guided roll-in (``policy.rollin``, ``rl_system.rollin``): in ``restart`` mode, ``reset`` takes
the guide's first steps itself and the episode the learner sees starts where they left
off; in ``mixture`` mode a roll-in step may run the guide's action instead of the
learner's (``info["guided"]``). The guide's queries and a restart's hidden steps are
reported in the step infos (``ROLLIN_INFO_KEYS``): they are stage 1's cost too.
"""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np

from rl_system.actions import ACTIONS, action_space, decode_action
from rl_system.config import TeamsRLConfig
from rl_system.encoders import TextEncoder, build_encoder
from rl_system.metrics import record_review
from rl_system.reviewer import REVIEW_SCORES
from rl_system.rollin import (
    ROLLIN_INFO_KEYS,
    GuideContext,
    build_guide,
    guide_queries,
    sample_rollin_steps,
)
from rl_system.tasks import Task

logger = logging.getLogger(__name__)

# Keys of every step's info dict, numeric so RLlib can aggregate them.
INFO_KEYS = ("queried", "failed", "infra_failure", "eliminated", *REVIEW_SCORES,
             *ROLLIN_INFO_KEYS)


def env_seeds(config) -> list[Task]:
    """The seed tasks of an env config: ``seeds`` (``Seed``s, ``{"instruction", "input"}``
    mappings or strings), or the older ``seed_instructions`` (strings)."""
    items = config.get("seeds")
    if items is None:
        items = config.get("seed_instructions", [])
    return [Task.of(item) for item in items]


class InstructionEvolutionEnv(gym.Env):
    """``config``: ``{"run_config": <TeamsRLConfig as a mapping>, "seeds": [...]}``.

    RLlib passes an ``EnvContext`` (a dict with ``worker_index`` / ``vector_index``); the
    seed order differs per copy so parallel env runners explore different seeds.
    """

    metadata: dict = {}

    def __init__(self, config: dict):
        cfg = TeamsRLConfig.model_validate(config["run_config"])
        seeds = env_seeds(config)
        if not seeds:
            raise ValueError("InstructionEvolutionEnv needs at least one seed instruction")
        self.cfg = cfg
        self.seeds = seeds
        self.max_steps = cfg.policy.max_steps
        self.encoder = build_encoder(
            cfg.policy.observation, max_steps=self.max_steps, text_model=cfg.models.encoder
        )
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, shape=(self.encoder.size,), dtype=np.float32
        )
        self.action_kind = cfg.policy.action_space
        self.action_space = action_space(self.action_kind)
        copy_index = 1000 * int(getattr(config, "worker_index", 0) or 0) + int(
            getattr(config, "vector_index", 0) or 0
        )
        self._rng = np.random.default_rng(cfg.policy.seed + copy_index)
        self._instructor = None
        self._reviewer = None
        self.rollin = cfg.policy.rollin
        self._guide = None
        self._guide_cache_dir = config.get("rollin_cache_dir")
        self._rollin_left = 0  # mixture: roll-in steps still to come in this episode
        self._pending: dict[str, float] = {}  # roll-in costs reported on the next step
        self.task = Task("")
        self.history: list[Task] = []
        self.step_count = 0
        self.last_action: int | None = None

    @property
    def instruction(self) -> str:
        return self.task.instruction

    # Model clients are built on first use, inside the env runner process.
    def _clients(self):
        if self._reviewer is None:
            from rl_system.reviewer import Reviewer
            from serve.client import LLMClient

            self._instructor = LLMClient.from_config(self.cfg, "instructor")
            text_encoder = getattr(self.encoder, "text_encoder", None) or TextEncoder(
                self.cfg.models.encoder
            )
            self._reviewer = Reviewer(
                LLMClient.from_config(self.cfg, "reviewer"),
                reward=self.cfg.policy.reward,
                text_encoder=text_encoder,
            )
        return self._instructor, self._reviewer

    def guide(self):
        """The roll-in guide, built on first use (the llm guide asks the instructor)."""
        if self._guide is None:
            self._guide = build_guide(self.cfg, GuideContext(
                instructor=lambda: self._clients()[0], cache_dir=self._guide_cache_dir))
        return self._guide

    def _guide_action(self) -> tuple[int, float]:
        """The guide's next action and the model queries choosing it cost."""
        guide = self.guide()
        before = guide_queries(guide)
        index = guide.choose(instruction=self.task.instruction, last_action=self.last_action,
                             step=self.step_count, rng=self._rng)
        return int(index), float(guide_queries(guide) - before)

    def _obs(self) -> np.ndarray:
        return self.encoder.encode(
            instruction=self.task.instruction, last_action=self.last_action, step=self.step_count
        )

    def _decode(self, action) -> int:
        return decode_action(action, self.action_kind)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        if options and "instruction" in options:
            self.task = Task(str(options["instruction"]), str(options.get("input") or ""))
        else:
            self.task = self.seeds[int(self._rng.integers(len(self.seeds)))]
        self.history = [self.task]
        self.step_count = 0
        self.last_action = None
        self._pending = {}
        rollin_steps = sample_rollin_steps(self.rollin, self._rng)
        self._rollin_left = rollin_steps if self.rollin.mode == "mixture" else 0
        if self.rollin.mode == "restart":
            self.restart(rollin_steps)
        return self._obs(), {}

    def restart(self, num_steps: int) -> None:
        """PPO++'s restart: take up to ``num_steps`` of the guide's steps from the current
        state. The roll-in ends early at the guide's ``stop``, a failed call or the episode's
        end; the learner always keeps at least one step. Their queries (and the guide's) go
        into the next step's info."""
        taken = cost = asked = 0.0
        for _ in range(min(num_steps, self.max_steps - 1)):
            index, queries = self._guide_action()
            asked += queries
            if not ACTIONS[index].queries_model:
                break
            _, terminated, truncated, info = self._advance(index)
            taken += 1
            cost += info["query_cost"]
            if terminated or truncated or info["failed"]:
                break
        self._pending = {"rollin_steps": taken, "rollin_query_cost": cost,
                         "guide_queries": asked}

    def step(self, action):
        index, guided, asked = self._decode(action), 0.0, 0.0
        if self._rollin_left > 0:
            self._rollin_left -= 1
            if self._rng.random() < self.rollin.beta:
                (index, asked), guided = self._guide_action(), 1.0
        reward, terminated, truncated, info = self._advance(index)
        info.update(self._pending)
        self._pending = {}
        info["guided"] = guided
        info["guide_queries"] = info["guide_queries"] + asked
        return self._obs(), float(reward), terminated, truncated, info

    def _advance(self, index: int) -> tuple[float, bool, bool, dict]:
        """Apply action ``index`` to the state: (reward, terminated, truncated, info)."""
        chosen = ACTIONS[index]
        self.step_count += 1
        self.last_action = index
        info = dict.fromkeys(INFO_KEYS, 0.0)
        info["action"] = index
        reward, terminated, truncated = 0.0, False, False
        if not chosen.queries_model:
            terminated = True
        else:
            reward, truncated = self._evolve(chosen, info)
        terminated = terminated or (not truncated and self.step_count >= self.max_steps)
        return float(reward), terminated, truncated, info

    def _evolve(self, chosen, info: dict) -> tuple[float, bool]:
        """One evolution; returns (reward, truncated)."""
        from rl_system.evolution import evolve

        instructor, reviewer = self._clients()
        info["queried"] = 1.0
        step = evolve(self.task, chosen, rewriter=instructor, reviewer=reviewer,
                      history=self.history)
        if step.outcome == "infra_failure":
            logger.warning("evolution (%s) hit a transient failure; the episode ends "
                           "unlearned: %s", chosen.name, step.error)
            info["failed"] = info["infra_failure"] = 1.0
            info["query_cost"] = float(step.queries)
            return 0.0, True
        if step.outcome == "failed":
            logger.warning("failed evolution (%s): %s", chosen.name, step.error)
            info["failed"] = 1.0
            info["query_cost"] = float(step.queries)
            return -self.cfg.policy.reward.failure_penalty, False
        for key in REVIEW_SCORES:
            info[key] = float(getattr(step.review, key))
        info["eliminated"] = float(step.outcome == "eliminated")
        record_review(step.review, stage="policy", judge=self.cfg.policy.reward.judge)
        if step.kept:
            self.task = step.task
            self.history.append(step.task)
        return step.review.reward, False
