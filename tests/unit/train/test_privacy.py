"""Membership-inference attacks: ROC math against known answers, and the tokens they score.

The attacks on a trained model are in ``tests/integration/train/test_privacy_model.py``."""

from __future__ import annotations

import os

import numpy as np
import pytest

from train.privacy import (
    evaluate_scores,
    min_k_score,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    zlib_score,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_auc_known_answers():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5  # ties count one half
    # 3 of 4 pairs ordered correctly, one tie: (3 + 0.5) / 4
    assert roc_auc([2, 1], [1, 0]) == pytest.approx(0.875)


def test_auc_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 50).round(1)  # with ties
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert roc_auc(pos, neg) == pytest.approx(metrics.roc_auc_score(labels, np.r_[pos, neg]))
    fpr, tpr = roc_curve(pos, neg)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(pos, neg))


def test_tpr_at_low_fpr():
    fpr, tpr = roc_curve([5, 4, 0.5], [3, 2, 1, 0])
    assert tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(fpr, tpr, 0.5) == pytest.approx(2 / 3)
    assert tpr_at_fpr(fpr, tpr, 0.75) == pytest.approx(1.0)
    out = evaluate_scores([5, 4, float("nan")], [3, 2])
    assert out["auc"] == 1.0 and out["tpr_at_1pct_fpr"] == 1.0


def test_attack_statistics():
    lp = np.log(np.array([0.5, 0.1, 0.9, 0.01]))
    assert min_k_score(lp, k=0.25) == pytest.approx(np.log(0.01))
    assert min_k_score(lp, k=0.5) == pytest.approx((np.log(0.01) + np.log(0.1)) / 2)
    # same loss, more compressible (repetitive) text -> lower (less member-like) zlib score
    assert zlib_score(lp, "ab" * 50) < zlib_score(lp, "the quick brown fox jumps over it")
    with pytest.raises(ValueError):
        min_k_score(lp, k=0)


def test_records_are_scored_on_exactly_the_tokens_sft_trains_on():
    """The attack must see the sequence SFT trained on (template, BOS, end-of-turn), and
    score exactly the positions that carried loss; with a different tokenization the
    member/non-member gap is measured on text the model never saw in that form."""
    import copy

    from rl_system.config import EMBEDDED_LLM
    from train.data import IGNORE_INDEX, load_tokenizer, tokenize_example
    from train.privacy import encode_items

    chat = load_tokenizer(EMBEDDED_LLM)
    plain = copy.deepcopy(chat)
    plain.chat_template = None  # the Alpaca path, where SFT adds BOS by hand
    record = {"instruction": "Summarise the memo.", "input": "Staff meet at 9 on Monday.",
              "response": "There is a staff meeting on Monday at 9."}
    for tok in (chat, plain):
        example = tokenize_example(record, tok, max_seq_len=256)
        [(ids, start)] = encode_items(tok, [record], max_tokens=256)
        assert ids == example.input_ids
        assert start == next(i for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX)
    # Plain text stays plain: every token but the first is scored.
    [(ids, start)] = encode_items(chat, ["Hello there friend"], max_tokens=256)
    assert start == 1 and ids == chat("Hello there friend", add_special_tokens=False)["input_ids"]
