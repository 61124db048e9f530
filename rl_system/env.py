"""``InstructionEvolutionEnv``: the MDP of TeaMs-RL's stage 1 (gymnasium).

An episode starts from a seed instruction. Each step the policy picks an evolution
action (``rl_system.actions``); the instructor LLM rewrites the instruction with it and
the reviewer scores the rewrite (``rl_system.reviewer``): the reward is the review's
weighted sum. A surviving rewrite becomes the current instruction; an eliminated one is
dropped. ``stop`` ends the episode without a query; ``max_steps`` truncates it (paper: 6).

A model call that fails or times out does not crash the run: the step becomes a failed
evolution with ``reward.failure_penalty`` and is counted in the step's info.
"""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np

from rl_system.actions import ACTIONS
from rl_system.config import TeamsRLConfig
from rl_system.encoders import TextEncoder, build_encoder

logger = logging.getLogger(__name__)

# Keys of every step's info dict, numeric so RLlib can aggregate them.
INFO_KEYS = (
    "queried", "failed", "eliminated", "info_gain", "info_gain_raw", "info_gain_first_order",
    "info_gain_second_order", "self_pair", "diversity", "query_cost",
)


class InstructionEvolutionEnv(gym.Env):
    """``config``: ``{"run_config": <TeamsRLConfig as a mapping>, "seed_instructions": [...]}``.

    RLlib passes an ``EnvContext`` (a dict with ``worker_index`` / ``vector_index``); the
    seed order differs per copy so parallel env runners explore different seeds.
    """

    metadata: dict = {}

    def __init__(self, config: dict):
        cfg = TeamsRLConfig.model_validate(config["run_config"])
        seeds = list(config["seed_instructions"])
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
        if cfg.policy.action_space == "continuous":
            # The paper's form: a score per action, the arg-max is applied.
            self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(len(ACTIONS),), dtype=np.float32)
        else:
            self.action_space = gym.spaces.Discrete(len(ACTIONS))
        copy_index = 1000 * int(getattr(config, "worker_index", 0)) + int(
            getattr(config, "vector_index", 0)
        )
        self._rng = np.random.default_rng(cfg.policy.seed + copy_index)
        self._instructor = None
        self._reviewer = None
        self.instruction = ""
        self.history: list[str] = []
        self.step_count = 0
        self.last_action: int | None = None

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

    def _obs(self) -> np.ndarray:
        return self.encoder.encode(
            instruction=self.instruction, last_action=self.last_action, step=self.step_count
        )

    def _decode(self, action) -> int:
        if isinstance(self.action_space, gym.spaces.Box):
            return int(np.argmax(np.asarray(action)))
        return int(action)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        if options and "instruction" in options:
            self.instruction = str(options["instruction"])
        else:
            self.instruction = self.seeds[int(self._rng.integers(len(self.seeds)))]
        self.history = [self.instruction]
        self.step_count = 0
        self.last_action = None
        return self._obs(), {}

    def step(self, action):
        index = self._decode(action)
        chosen = ACTIONS[index]
        self.step_count += 1
        self.last_action = index
        info = dict.fromkeys(INFO_KEYS, 0.0)
        info["action"] = index
        reward, terminated = 0.0, False
        if not chosen.queries_model:
            terminated = True
        else:
            reward = self._evolve(chosen, info)
        truncated = not terminated and self.step_count >= self.max_steps
        return self._obs(), float(reward), terminated, truncated, info

    def _evolve(self, chosen, info: dict) -> float:
        from serve.client import LLMCallError

        instructor, reviewer = self._clients()
        info["queried"] = 1.0
        before = self.instruction
        try:
            [completion] = instructor.generate([chosen.messages(before)])
            review = reviewer.review(before, completion.text, history=self.history)
        except LLMCallError as exc:
            logger.warning("failed evolution (%s): %s", chosen.name, exc)
            info["failed"] = 1.0
            info["query_cost"] = 1.0
            return -self.cfg.policy.reward.failure_penalty
        for key in ("info_gain", "info_gain_raw", "info_gain_first_order",
                    "info_gain_second_order", "self_pair", "diversity", "query_cost"):
            info[key] = float(getattr(review, key))
        info["eliminated"] = float(review.eliminated is not None)
        if review.eliminated is None:
            self.instruction = completion.text
            self.history.append(completion.text)
        return review.reward
