"""How stage 2 chooses evolution actions: one table of strategies (DESIGN §3, Dataset).

The strategies differ *only* in how the next action is chosen; the expert rewrite, the
review and the filter are the same for all of them (``rl_system.dataset``):

- ``policy``: the stage-1 RLlib module picks actions, observing the evolving instruction
  exactly as the training env does (same encoder, last action, step fraction) and decoding
  its output with the env's own ``decode_action``, until ``stop`` or ``policy.max_steps``;
- ``wizardlm``: the Evol-Instruct baseline, ``dataset.wizardlm_rounds`` rounds of a
  uniformly random depth/breadth operation (never ``stop``);
- ``random``: uniform over every action including ``stop``, the policy's step budget.

Choices draw from a per-seed RNG (:func:`seed_rng`), so a re-run asks the same requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rl_system.actions import ACTIONS, decode_action, depth_and_breadth
from rl_system.config import TeamsRLConfig
from serve.errors import TeamsRLError

# Where ``Algorithm.save_to_path`` puts the single-agent module (checked on RLlib 2.60).
MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / "default_policy"


class PolicyCheckpointError(TeamsRLError):
    """The policy checkpoint is missing or does not fit the configured env."""


class Chooser(Protocol):
    def choose(self, *, instruction: str, last_action: int | None, step: int,
               rng: np.random.Generator) -> int:
        """Index into ``ACTIONS``; ``step`` = actions already taken in this episode."""


def seed_rng(cfg: TeamsRLConfig, seed_id: str) -> np.random.Generator:
    """A generator that depends only on the config's seed, the strategy and the seed id."""
    key = f"{cfg.policy.seed}\0{cfg.dataset.strategy}\0{seed_id}".encode()
    return np.random.default_rng(int(hashlib.sha256(key).hexdigest()[:16], 16))


@dataclass(frozen=True)
class UniformChooser:
    """Uniform over a fixed set of action indices."""

    indices: tuple[int, ...]

    def choose(self, *, instruction, last_action, step, rng) -> int:
        return int(self.indices[int(rng.integers(len(self.indices)))])


class PolicyChooser:
    """The trained RLModule, fed the observation the training env would produce."""

    def __init__(self, cfg: TeamsRLConfig, checkpoint: str | Path):
        from rl_system.encoders import build_encoder

        self.module = load_policy_module(cfg, checkpoint)
        self.encoder = build_encoder(
            cfg.policy.observation, max_steps=cfg.policy.max_steps, text_model=cfg.models.encoder
        )
        self.action_kind = cfg.policy.action_space
        self.greedy = cfg.dataset.policy_sampling == "greedy"

    def choose(self, *, instruction, last_action, step, rng) -> int:
        import torch

        obs = self.encoder.encode(instruction=instruction, last_action=last_action, step=step)
        with torch.no_grad():
            out = self.module.forward_inference({"obs": torch.as_tensor(obs[None])})
        inputs = out["action_dist_inputs"][0].double().numpy()
        return decode_action(env_action(inputs, self.action_kind, greedy=self.greedy, rng=rng),
                             self.action_kind)


def env_action(dist_inputs: np.ndarray, kind: str, *, greedy: bool, rng: np.random.Generator):
    """What RLlib's env runner would hand the env for these action-distribution inputs:
    a sample (or, ``greedy``, the distribution's mode). Decode it with ``decode_action``.

    ``continuous``: a diagonal Gaussian over one score per action (means, then log-stds),
    sampled as RLlib's ``TorchDiagGaussian`` does; the action space is unbounded, so
    nothing squashes or clips it on the way to the env. ``discrete``: a categorical over
    the logits.
    """
    if kind == "continuous":
        mean, log_std = np.split(np.asarray(dist_inputs, dtype=np.float64), 2)
        return mean if greedy else mean + np.exp(log_std) * rng.standard_normal(len(mean))
    logits = np.asarray(dist_inputs, dtype=np.float64)
    if greedy:
        return int(np.argmax(logits))
    probs = np.exp(logits - logits.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    needs_policy: bool
    rounds: Callable[[TeamsRLConfig], int]  # most actions per episode
    chooser: Callable[[TeamsRLConfig, str | None], Chooser]


_EVOLVING = tuple(ACTIONS.index(a) for a in depth_and_breadth())

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "policy", "stage-1 policy picks actions until stop or policy.max_steps", True,
            lambda cfg: cfg.policy.max_steps, lambda cfg, ckpt: PolicyChooser(cfg, ckpt),
        ),
        Strategy(
            "wizardlm", "Evol-Instruct: dataset.wizardlm_rounds uniform depth/breadth rounds",
            False, lambda cfg: cfg.dataset.wizardlm_rounds,
            lambda cfg, ckpt: UniformChooser(_EVOLVING),
        ),
        Strategy(
            "random", "uniform actions incl. stop, policy.max_steps budget", False,
            lambda cfg: cfg.policy.max_steps,
            lambda cfg, ckpt: UniformChooser(tuple(range(len(ACTIONS)))),
        ),
    )
}


def resolve_policy_checkpoint(cfg: TeamsRLConfig) -> Path:
    """``dataset.policy_checkpoint``, else the latest checkpoint of this run's stage 1."""
    from rl_system.rundir import latest_checkpoint

    if cfg.dataset.policy_checkpoint:
        path = Path(cfg.dataset.policy_checkpoint)
    else:
        path = latest_checkpoint(cfg)
        if path is None:
            raise PolicyCheckpointError(
                f"strategy 'policy' needs a stage-1 checkpoint, and {cfg.stage_dir('policy')} "
                "has none: run `teams-rl train-policy` first, set dataset.policy_checkpoint, "
                "or use dataset.strategy=wizardlm|random"
            )
    if not (path / MODULE_SUBDIR).is_dir():
        raise PolicyCheckpointError(
            f"policy checkpoint {path} not found or not an RLlib algorithm checkpoint "
            f"(no {MODULE_SUBDIR}); point dataset.policy_checkpoint at a "
            "runs/<name>/policy/checkpoints/iter_NNNN directory"
        )
    return path.resolve()


def load_policy_module(cfg: TeamsRLConfig, checkpoint: str | Path):
    """Load only the RLModule (no Algorithm, no env runners) and check it fits the env
    that ``cfg`` describes: observation size and action space."""
    import gymnasium as gym
    from ray.rllib.core.rl_module.rl_module import RLModule

    from rl_system.encoders import build_encoder

    path = Path(checkpoint) / MODULE_SUBDIR
    try:
        module = RLModule.from_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - RLlib raises many types for a bad directory
        raise PolicyCheckpointError(f"cannot load the policy module from {path}: {exc}") from None
    p = cfg.policy
    expected_obs = build_encoder(p.observation, max_steps=p.max_steps,
                                 text_model=cfg.models.encoder).size
    got_obs = getattr(module.observation_space, "shape", None)
    if got_obs != (expected_obs,):
        raise PolicyCheckpointError(
            f"policy checkpoint {checkpoint} observes shape {got_obs}, but policy.observation="
            f"{p.observation} gives ({expected_obs},); use the policy settings it was trained "
            "with, or train a new policy"
        )
    space = module.action_space
    fits = (isinstance(space, gym.spaces.Discrete) and space.n == len(ACTIONS)
            and p.action_space == "discrete") or (
        isinstance(space, gym.spaces.Box) and space.shape == (len(ACTIONS),)
        and p.action_space == "continuous")
    if not fits:
        raise PolicyCheckpointError(
            f"policy checkpoint {checkpoint} has action space {space}, but the catalogue has "
            f"{len(ACTIONS)} actions and policy.action_space={p.action_space}; train a new "
            "policy for this catalogue"
        )
    return module
