"""Observation encoders of the instruction-evolution environment, and the text encoder.

- ``action_history``: the paper's form — one-hot of the last action (plus a "none yet"
  slot) and the fraction of the episode's steps used.
- ``embedding``: the sentence embedding of the current instruction, then the same
  one-hot and step fraction.

``TextEncoder`` (MiniLM via sentence-transformers) is also what the reviewer's diversity
and the dataset's near-duplicate removal use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rl_system.actions import ACTIONS


class TextEncoder:
    """Unit-norm sentence embeddings; the model loads on first use, in the calling process."""

    def __init__(self, model: str = "embedded:all-minilm-l6-v2", *, device: str = "cpu"):
        self.model_ref = model
        self.device = device
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    @property
    def dim(self) -> int:
        model = self._load()
        # sentence-transformers >= 6 renamed the method; older releases have only the old name
        renamed = getattr(model, "get_embedding_dimension", None)
        return renamed() if renamed else model.get_sentence_embedding_dimension()

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            from rl_system.models import resolve_model

            self._model = SentenceTransformer(resolve_model(self.model_ref), device=self.device)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised rows (cosine = dot product)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._load().encode(
            texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32)


@dataclass
class ActionHistoryEncoder:
    max_steps: int
    n_actions: int = len(ACTIONS)

    @property
    def size(self) -> int:
        return self.n_actions + 2  # actions + "none yet" + step fraction

    def encode(self, *, instruction: str, last_action: int | None, step: int) -> np.ndarray:
        obs = np.zeros(self.size, dtype=np.float32)
        obs[self.n_actions if last_action is None else last_action] = 1.0
        obs[-1] = step / self.max_steps
        return obs


@dataclass
class EmbeddingEncoder:
    max_steps: int
    text_encoder: TextEncoder = field(default_factory=TextEncoder)
    n_actions: int = len(ACTIONS)

    @property
    def size(self) -> int:
        return self.text_encoder.dim + self.n_actions + 2

    def encode(self, *, instruction: str, last_action: int | None, step: int) -> np.ndarray:
        history = ActionHistoryEncoder(self.max_steps, self.n_actions).encode(
            instruction=instruction, last_action=last_action, step=step
        )
        return np.concatenate([self.text_encoder.encode([instruction])[0], history])


def build_encoder(name: str, *, max_steps: int, text_model: str):
    if name == "action_history":
        return ActionHistoryEncoder(max_steps)
    if name == "embedding":
        return EmbeddingEncoder(max_steps, TextEncoder(text_model))
    raise ValueError(f"unknown observation encoder {name!r}; use action_history or embedding")
