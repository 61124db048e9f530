"""Observation encoders of the instruction-evolution environment, and the text encoder.

- ``action_history``: the paper's form — one-hot of the last action (plus a "none yet"
  slot) and the fraction of the episode's steps used.
- ``embedding``: the sentence embedding of the current instruction, then the same
  one-hot and step fraction.

``TextEncoder`` (MiniLM via sentence-transformers) is also what the reviewer's diversity
and the dataset's near-duplicate removal use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rl_system.actions import ACTIONS


class TextEncoder:
    """Unit-norm sentence embeddings; the model loads on first use, in the calling process.

    A sentence-transformers directory that is a transformer, mean pooling and (optionally)
    normalisation, as MiniLM is, runs on plain transformers (``_MeanPooled``): the same
    vectors without importing sentence-transformers, whose import (scikit-learn and more)
    costs about 10 s of CPU in every Ray actor and env runner that embeds text. Any other
    layout goes through sentence-transformers.
    """

    def __init__(self, model: str = "embedded:all-minilm-l6-v2", *, device: str = "cpu"):
        self.model_ref = model
        self.device = device
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    @property
    def dim(self) -> int:
        return self._load().dim

    def _load(self):
        if self._model is None:
            from serve.models import resolve_model

            path = Path(resolve_model(self.model_ref))
            if _MeanPooled.handles(path):
                self._model = _MeanPooled(path, device=self.device)
            else:
                self._model = _SentenceTransformer(path, device=self.device)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised rows (cosine = dot product)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._load().encode(list(texts))
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class _SentenceTransformer:
    def __init__(self, path: Path, *, device: str):
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(path), device=device)
        renamed = getattr(self._model, "get_embedding_dimension", None)  # >= 6 renamed it
        self.dim = renamed() if renamed else self._model.get_sentence_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts, convert_to_numpy=True, show_progress_bar=False)


class _MeanPooled:
    """A transformer's last hidden states averaged over the real (unpadded) tokens."""

    BATCH = 32
    MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling")

    @classmethod
    def handles(cls, path: Path) -> bool:
        try:
            modules = [m["type"] for m in json.loads((path / "modules.json").read_text())]
            pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
        return (tuple(modules[:2]) == cls.MODULES
                and modules[2:] in ([], ["sentence_transformers.models.Normalize"])
                and modes == {"pooling_mode_mean_tokens"})

    def __init__(self, path: Path, *, device: str):
        from transformers import AutoModel, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        try:
            st = json.loads((path / "sentence_bert_config.json").read_text())
            self.max_seq_length = int(st["max_seq_length"])
        except (OSError, ValueError, KeyError):
            self.max_seq_length = self.tokenizer.model_max_length

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.BATCH):
            idx = order[start:start + self.BATCH]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_seq_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = mean.float().cpu().numpy()
        return out


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
