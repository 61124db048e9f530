"""The text encoder's plain-transformers path gives sentence-transformers' vectors."""

from __future__ import annotations

import numpy as np

from rl_system.encoders import TextEncoder, _MeanPooled, _SentenceTransformer
from serve.models import resolve_model

TEXTS = ["How do tides work?", "x", "Write a haiku about autumn rain.",
         "Compare TCP and UDP, with an example of when each is the better choice. " * 12]


def test_minilm_runs_without_sentence_transformers_and_matches_it():
    encoder = TextEncoder("embedded:all-minilm-l6-v2")
    fast = encoder.encode(TEXTS)
    assert isinstance(encoder._model, _MeanPooled)
    reference = _SentenceTransformer(resolve_model("embedded:all-minilm-l6-v2"), device="cpu")
    expected = reference.encode(TEXTS)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert fast.shape == (len(TEXTS), 384) and fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(fast, expected, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_the_off_topic_rule_drops_every_drift_and_no_good_pair_of_the_project_set():
    # The default min_topic_similarity against the labelled pairs, through the real MiniLM:
    # the rule must catch the off-topic rewrites and spare every good evolution.
    from rl_system.config import RewardConfig
    from rl_system.encoders import TextEncoder
    from rl_system.reviewer_check import (
        _eliminated,
        embedding_novelty,
        load_pairs,
        with_topic_similarity,
    )

    pairs = load_pairs()
    pairs = with_topic_similarity(pairs, embedding_novelty(TextEncoder(), pairs))
    threshold = RewardConfig().min_topic_similarity
    fired = {p.id: _eliminated(p, info_gain=None, min_info_gain=0.0,
                               min_topic_similarity=threshold) for p in pairs}
    drift = [p.id for p in pairs if p.category == "off_topic"]
    assert drift and all(fired[i] == "off_topic" for i in drift)
    assert not [p.id for p in pairs if p.good and fired[p.id] == "off_topic"]
