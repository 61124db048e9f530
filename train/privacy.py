"""Membership-inference attacks on a causal LM: loss, zlib ratio, min-k% token probability.

The paper's privacy claim is that a model fine-tuned on TeaMs-RL data leaks less about its
training set than one fine-tuned on the baseline's data. We measure it the standard way:
score texts the model was trained on (*members*) and held-out texts of the same
distribution (*non-members*) with an attack statistic, and report how well the statistic
separates them — ROC AUC (0.5 = no leak) and TPR at 1% FPR (the low-FPR regime that
matters for privacy, Carlini et al. 2022, "Membership Inference Attacks From First
Principles").

Every attack returns a *membership score*: higher means "more likely a member".

- ``loss`` (Yeom et al. 2018): mean token log-probability, i.e. minus the loss.
- ``zlib`` (Carlini et al. 2021, "Extracting Training Data from LLMs"): minus the ratio of
  the loss (nats per token) to the zlib-compressed size of the text (bytes); it discounts
  texts that are easy for any model because they are repetitive.
- ``min_k`` (Shi et al. 2023, "Detecting Pretraining Data", Min-K% Prob): mean of the k%
  lowest token log-probabilities; members have fewer surprising tokens.

Run :func:`run_mia` on a Hugging Face model dir; the other functions are pure numpy and
easy to test against known answers.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A member is plain text (every token but the first scored) or an SFT record
# (``instruction``, ``response``, optional ``input``): tokenized by SFT's own
# ``train.data.tokenize_example`` and scored on exactly the tokens that carried SFT's loss.
MIAItem = str | Mapping[str, Any]

TARGET_FPR = 0.01


# ---------------------------------------------------------------------------------------
# Attack statistics (pure): per-token log-probs (nats) -> membership score


def loss_score(token_logprobs: np.ndarray, text: str = "") -> float:
    """Minus the mean token NLL (nats/token); ``text`` is unused (uniform signature)."""
    return float(np.mean(token_logprobs)) if len(token_logprobs) else float("nan")


def zlib_score(token_logprobs: np.ndarray, text: str) -> float:
    """Minus (mean NLL in nats/token) / (zlib-compressed size of ``text`` in bytes)."""
    if not len(token_logprobs):
        return float("nan")
    zlib_bytes = len(zlib.compress(text.encode("utf-8")))
    return float(np.mean(token_logprobs)) / max(1, zlib_bytes)


def min_k_score(token_logprobs: np.ndarray, text: str = "", *, k: float = 0.2) -> float:
    """Mean of the ``ceil(k * n)`` lowest token log-probs (nats); ``k`` in (0, 1]."""
    if not 0 < k <= 1:
        raise ValueError(f"min-k fraction must be in (0, 1], got {k}")
    n = len(token_logprobs)
    if not n:
        return float("nan")
    lowest = np.sort(np.asarray(token_logprobs, dtype=np.float64))[: max(1, int(np.ceil(k * n)))]
    return float(np.mean(lowest))


def attacks(min_k: float = 0.2) -> dict[str, Callable[[np.ndarray, str], float]]:
    """The attack catalogue: name -> (token log-probs, scored text) -> membership score."""
    return {
        "loss": loss_score,
        "zlib": zlib_score,
        "min_k": lambda lp, text: min_k_score(lp, text, k=min_k),
    }


# ---------------------------------------------------------------------------------------
# ROC (pure numpy; no sklearn dependency)


def roc_auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """Area under the ROC curve = P(score(member) > score(non-member)), ties counted 1/2.

    Computed exactly as the Mann-Whitney U statistic over all pairs via ranks.
    """
    pos = np.asarray(member_scores, dtype=np.float64)
    neg = np.asarray(non_member_scores, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs at least one member and one non-member score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (1-based), so tied pairs count 1/2.
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def roc_curve(
    member_scores: Sequence[float], non_member_scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); predict member when
    ``score >= threshold``."""
    pos = np.asarray(member_scores, dtype=np.float64)
    neg = np.asarray(non_member_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = np.array([0.0, *[(pos >= t).mean() for t in thresholds]])
    fpr = np.array([0.0, *[(neg >= t).mean() for t in thresholds]])
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float = TARGET_FPR) -> float:
    """Highest TPR among thresholds whose FPR is at most ``target`` (a fraction)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def evaluate_scores(
    member_scores: Sequence[float], non_member_scores: Sequence[float]
) -> dict[str, Any]:
    """AUC, TPR at 1% FPR and the ROC points of one attack; NaN scores are dropped."""
    pos = np.asarray(member_scores, dtype=np.float64)
    neg = np.asarray(non_member_scores, dtype=np.float64)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    fpr, tpr = roc_curve(pos, neg)
    return {
        "auc": roc_auc(pos, neg),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr),
        # FPR resolution is 1/len(neg): with fewer than 100 non-members "1% FPR" is FPR 0.
        "fpr_resolution": 1.0 / len(neg),
        "roc": {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()},
        "member_score_mean": float(pos.mean()),
        "non_member_score_mean": float(neg.mean()),
    }


# ---------------------------------------------------------------------------------------
# Model side


def token_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[MIAItem],
    *,
    max_tokens: int = 256,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Log-probability (nats) of every scored token of each item under ``model``.

    Items are encoded by :func:`encode_items`. Returns one float64 array per item
    (possibly empty).
    """
    import torch

    encoded = encode_items(tokenizer, items, max_tokens=max_tokens)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[np.ndarray] = []
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(encoded), batch_size):
            chunk = encoded[b : b + batch_size]
            width = max(1, max(len(ids) for ids, _ in chunk))
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            input_ids, mask = input_ids.to(model.device), mask.to(model.device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
            for row, (ids, start) in enumerate(chunk):
                # picked[:, t - 1] is log p(token t | tokens < t)
                out.append(picked[row, start - 1 : max(start - 1, len(ids) - 1)].double().numpy())
    return out


def encode_items(
    tokenizer: Any, items: Sequence[MIAItem], *, max_tokens: int
) -> list[tuple[list[int], int]]:
    """``(token ids, index of the first scored token)`` per item, cut to ``max_tokens``.

    A record goes through SFT's tokenization, so ids and scored positions are the ones SFT
    trained on (a record truncated to no response token scores nothing).
    """
    from train.data import IGNORE_INDEX, end_of_turn_id, tokenize_example

    eot = None
    encoded: list[tuple[list[int], int]] = []
    for item in items:
        if isinstance(item, str):
            encoded.append((tokenizer(item, add_special_tokens=False)["input_ids"][:max_tokens], 1))
            continue
        eot = end_of_turn_id(tokenizer) if eot is None else eot
        example = tokenize_example(item, tokenizer, max_seq_len=max_tokens, eot_id=eot)
        if example is None:
            encoded.append(([], 1))
            continue
        start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        encoded.append((list(example.input_ids), max(1, start)))
    return encoded


def _scored_text(item: MIAItem) -> str:
    return item if isinstance(item, str) else str(item["response"])


def mia_from_logprobs(
    member_lps: Sequence[np.ndarray],
    non_member_lps: Sequence[np.ndarray],
    *,
    member_texts: Sequence[str],
    non_member_texts: Sequence[str],
    min_k: float = 0.2,
) -> dict[str, dict[str, Any]]:
    """Every attack's AUC / TPR@1%FPR / ROC from precomputed token log-probs."""
    results = {}
    for name, attack in attacks(min_k).items():
        pos = [attack(lp, t) for lp, t in zip(member_lps, member_texts, strict=True)]
        neg = [attack(lp, t) for lp, t in zip(non_member_lps, non_member_texts, strict=True)]
        results[name] = evaluate_scores(pos, neg)
    return results


def run_mia(
    model_dir: str | Path,
    members: Sequence[MIAItem],
    non_members: Sequence[MIAItem],
    *,
    min_k: float = 0.2,
    max_tokens: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score ``members`` against ``non_members`` under the causal LM in ``model_dir``.

    Returns ``{"attacks": {name: {auc, tpr_at_1pct_fpr, roc, ...}}, "n_members",
    "n_non_members", "min_k", "max_tokens", "model_dir", "elapsed_s"}``. Use members and
    non-members of the same distribution (same strategy, same template), or the AUC
    measures a distribution shift instead of memorisation.
    """
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not members or not non_members:
        raise ValueError(
            f"run_mia needs members and non-members (got {len(members)} and {len(non_members)})"
        )
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from serve.devices import resolve_dtype, torch_dtype

    dtype = torch_dtype(resolve_dtype("auto", str(device)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    kwargs = {"max_tokens": max_tokens, "batch_size": batch_size}
    member_lps = token_logprobs(model, tokenizer, members, **kwargs)
    non_member_lps = token_logprobs(model, tokenizer, non_members, **kwargs)
    results = mia_from_logprobs(
        member_lps,
        non_member_lps,
        member_texts=[_scored_text(m) for m in members],
        non_member_texts=[_scored_text(m) for m in non_members],
        min_k=min_k,
    )
    return {
        "model_dir": str(model_dir),
        "attacks": results,
        "n_members": len(members),
        "n_non_members": len(non_members),
        "min_k": min_k,
        "max_tokens": max_tokens,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
