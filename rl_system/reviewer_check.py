"""``teams-rl reviewer-check``: how well each judge mode tells good evolutions from bad ones.

    teams-rl reviewer-check --config configs/demo.yaml                  # every mode
    teams-rl reviewer-check --config configs/demo.yaml --modes equality --modes preference

Reads labelled ``(before, after)`` pairs (``data/reviewer_pairs.jsonl``: id, category,
before, after, good, note), scores every pair with each judge mode of ``rl_system.judges``
through the reviewer role, and with a word-count-gain baseline (a reward that pays only
for length must not look good on this set). Per scorer it reports:

- ROC AUC of the value, good evolutions against every other pair (paraphrases and
  degenerate rewrites together), against paraphrases alone and against degenerate rewrites
  alone, each with a 95% bootstrap CI (pairs resampled within each class, 1000 draws,
  seeded; every scorer sees the same draws, so their intervals compare like for like);
- the AUC of the unclipped raw score, and of the value once the textual elimination rules
  have dropped what they catch (what the pipeline actually keeps is rules + judge);
- accuracy at the elimination threshold ``policy.reward.min_info_gain`` (kept = value above
  it), alone and with the elimination rules;
- per-category mean value and kept share, mean position bias |first order - second order|
  (two-order modes), mean self-pair, and the reviewer queries spent.

It also reports, per category, the share the textual elimination rules drop alone. Outputs:
``<run dir>/reviewer_check/reviewer_check.json`` (summaries and every per-pair score, so any
figure can be recomputed) and ``reviewer_check.png``; a compact table goes to stdout.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rl_system.actions import ACTIONS
from rl_system.judges import JUDGE_NAMES, get_judge, judge_many
from serve.errors import TeamsRLError
from train.privacy import roc_auc, roc_curve

DEFAULT_PAIRS = "data/reviewer_pairs.jsonl"
OUT_SUBDIR = "reviewer_check"
JSON_NAME = "reviewer_check.json"
PNG_NAME = "reviewer_check.png"
BOOTSTRAP_DRAWS = 1000
WORD_GAIN = "word_gain"
NOVELTY = "embedding_novelty"
REWARD = "reward"
BASELINES = (WORD_GAIN, NOVELTY)
PARAPHRASE = "paraphrase"
# categories named after an action that writes a new task: off_topic does not apply
NEW_TASK_CATEGORIES = frozenset(a.name for a in ACTIONS if a.replaces_task)
PAIR_FIELDS = ("id", "category", "before", "after", "good")


class PairFileError(TeamsRLError, ValueError):
    """The labelled pair file is missing or malformed; the message names the line."""


@dataclass(frozen=True)
class Pair:
    id: str
    category: str
    before: str
    after: str
    good: bool
    note: str = ""
    # cosine of the two instructions' embeddings, set by ``run_check`` given an encoder
    topic_similarity: float | None = None

    @property
    def new_task(self) -> bool:
        """Whether the rewrite was asked of an action that writes a new task (breadth);
        every other category, degenerate ones included, rewrites the same task."""
        return self.category in NEW_TASK_CATEGORIES


# (name, which pairs are the negatives): positives are always the good evolutions
COMPARISONS: tuple[tuple[str, Callable[[Pair], bool]], ...] = (
    ("all", lambda p: not p.good),
    ("vs_paraphrase", lambda p: not p.good and p.category == PARAPHRASE),
    ("vs_degenerate", lambda p: not p.good and p.category != PARAPHRASE),
)


def load_pairs(path: str | os.PathLike = DEFAULT_PAIRS) -> list[Pair]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PairFileError(f"cannot read the pair file {path}: {exc.strerror}") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PairFileError(f"{path}:{n}: not JSON ({exc.msg})") from None
        missing = [f for f in PAIR_FIELDS if f not in row]
        if not isinstance(row, dict) or missing:
            raise PairFileError(f"{path}:{n}: needs the fields {', '.join(missing)}")
        if not isinstance(row["good"], bool):
            raise PairFileError(f"{path}:{n}: 'good' must be true or false")
        pairs.append(Pair(**{k: row[k] for k in (*PAIR_FIELDS, "note") if k in row}))
    if not any(p.good for p in pairs) or all(p.good for p in pairs):
        raise PairFileError(f"{path}: needs both good and not-good pairs to measure anything")
    return pairs


def resolve_modes(modes: Sequence[str] = ()) -> list[str]:
    """Mode names (comma-separated items allowed); none given = every mode."""
    names = [m.strip() for item in modes for m in item.split(",") if m.strip()]
    return [get_judge(m).name for m in dict.fromkeys(names)] or list(JUDGE_NAMES)


# -- the one call into the elimination rules (its signature is being reworked elsewhere) --


def _eliminated(pair: Pair, *, info_gain: float | None, min_info_gain: float,
                min_topic_similarity: float = 0.0) -> str | None:
    """The rule that drops ``pair.after``: the rules that need no judge (textual, and
    off_topic where the pair has a topic similarity) when ``info_gain`` is None."""
    from rl_system.reviewer import eliminate

    topic = {"topic_similarity": pair.topic_similarity,
             "min_topic_similarity": min_topic_similarity, "new_task": pair.new_task}
    if info_gain is None:
        return eliminate(pair.before, pair.after, **topic)
    return eliminate(pair.before, pair.after, info_gain, min_info_gain=min_info_gain, **topic)


# -- scorers --------------------------------------------------------------------------------


def word_gain(before: str, after: str) -> dict[str, float]:
    """The length-only baseline: raw = words(after) / words(before); value = the share of
    the rewrite's words that are new length, ``max(0, 1 - words(before)/words(after))``."""
    wb, wa = max(1, len(before.split())), max(1, len(after.split()))
    return {"value": max(0.0, 1.0 - wb / wa), "raw": wa / wb}


def embedding_novelty(text_encoder, pairs: Sequence[Pair]) -> list[dict[str, float]]:
    """The reward's ``diversity`` of a one-step episode: 1 - cosine(before, after) of the
    sentence embeddings (no model query)."""
    before = text_encoder.encode([p.before for p in pairs])
    after = text_encoder.encode([p.after for p in pairs])
    novelty = 1.0 - np.sum(before * after, axis=1)
    return [{"value": float(d), "raw": float(d)} for d in novelty]


def with_topic_similarity(pairs: Sequence[Pair], novelty: Sequence[dict]) -> list[Pair]:
    """``pairs`` with their topic similarity (1 - novelty), for the off_topic rule."""
    return [replace(p, topic_similarity=1.0 - d["value"])
            for p, d in zip(pairs, novelty, strict=True)]


def reward_scores(judged: Sequence[dict], novelty: Sequence[dict], reward) -> list[dict]:
    """The configured reward of a one-step episode before any penalty (``RewardConfig``):
    info_gain, raw info_gain and diversity weighted as stage 1 weights them."""
    out = []
    for j, d in zip(judged, novelty, strict=True):
        r = (reward.info_gain_weight * j["value"] + reward.info_gain_raw_weight * j["raw"]
             + reward.diversity_weight * d["value"])
        out.append({"value": r, "raw": r})
    return out


def score_mode(client, mode: str, pairs: Sequence[Pair]) -> tuple[list[dict], int]:
    """Every pair's judge result under ``mode``, and the reviewer queries it cost."""
    before = client.usage.queries
    results = judge_many(client, mode, [(p.before, p.after) for p in pairs])
    return [r.as_dict() for r in results], client.usage.queries - before


# -- statistics -----------------------------------------------------------------------------


def auc_with_ci(
    values: np.ndarray, pos: np.ndarray, neg: np.ndarray, *, draws: int, seed: int
) -> dict[str, Any] | None:
    """AUC of ``values[pos]`` over ``values[neg]`` and its 95% stratified-bootstrap CI."""
    if not len(pos) or not len(neg):
        return None
    rng = np.random.default_rng(seed)
    boot = [
        roc_auc(values[rng.choice(pos, len(pos))], values[rng.choice(neg, len(neg))])
        for _ in range(draws)
    ]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return {"auc": roc_auc(values[pos], values[neg]), "ci95": [float(lo), float(hi)],
            "n_pos": int(len(pos)), "n_neg": int(len(neg))}


def _mean(xs) -> float | None:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def summarise(
    pairs: Sequence[Pair],
    scores: Sequence[dict],
    *,
    queries: int | None,
    two_orders: bool,
    min_info_gain: float,
    min_topic_similarity: float = 0.0,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Figures of one scorer from its per-pair scores (dicts with value and raw at least)."""
    value = np.array([s["value"] for s in scores], dtype=np.float64)
    raw = np.array([s["raw"] for s in scores], dtype=np.float64)
    textual = [_eliminated(p, info_gain=None, min_info_gain=min_info_gain,
                           min_topic_similarity=min_topic_similarity) for p in pairs]
    # rules first, then the judge: what a rule drops ranks below every judged pair
    with_rules = np.where([t is not None for t in textual], -1.0, value)
    good = np.array([p.good for p in pairs])
    pos = np.flatnonzero(good)
    aucs = {}
    for k, (name, is_negative) in enumerate(COMPARISONS):
        neg = np.flatnonzero([is_negative(p) for p in pairs])
        # the same seed per comparison: every scorer is resampled with the same draws
        aucs[name] = auc_with_ci(value, pos, neg, draws=draws, seed=seed + k)
    neg_all = np.flatnonzero(~good)
    kept_with_rules = np.array([
        _eliminated(p, info_gain=float(v), min_info_gain=min_info_gain,
                    min_topic_similarity=min_topic_similarity) is None
        for p, v in zip(pairs, value, strict=True)
    ])
    kept_by_threshold = value > min_info_gain
    per_category = {}
    for cat in dict.fromkeys(p.category for p in pairs):
        idx = [i for i, p in enumerate(pairs) if p.category == cat]
        per_category[cat] = {
            "n": len(idx),
            "mean_value": float(value[idx].mean()),
            "kept_with_rules": float(kept_with_rules[idx].mean()),
        }
    return {
        "auc": aucs,
        "auc_raw_all": roc_auc(raw[pos], raw[neg_all]),
        "auc_all_with_rules": roc_auc(with_rules[pos], with_rules[neg_all]),
        "accuracy_at_threshold": float((kept_by_threshold == good).mean()),
        "accuracy_with_rules": float((kept_with_rules == good).mean()),
        "position_bias": _mean(abs(s["first_order"] - s["second_order"]) for s in scores)
        if two_orders else None,
        "self_pair": _mean(s["self_pair"] for s in scores if "self_pair" in s),
        "queries": queries,
        "queries_per_pair": queries / len(pairs) if queries is not None else None,
        "per_category": per_category,
    }


def rule_summary(pairs: Sequence[Pair], *, min_topic_similarity: float = 0.0) -> dict[str, Any]:
    """Per category: the share the rules that need no judge drop, and by which rule."""
    out = {}
    for cat in dict.fromkeys(p.category for p in pairs):
        fired = [_eliminated(p, info_gain=None, min_info_gain=0.0,
                             min_topic_similarity=min_topic_similarity)
                 for p in pairs if p.category == cat]
        out[cat] = {
            "n": len(fired),
            "dropped": sum(f is not None for f in fired) / len(fired),
            "by_rule": dict(Counter(f for f in fired if f is not None)),
        }
    return out


# -- the check --------------------------------------------------------------------------------


def run_check(
    client,
    pairs: Sequence[Pair],
    *,
    modes: Sequence[str],
    min_info_gain: float,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
    log: Callable[[str], None] = print,
    on_mode_done: Callable[[dict[str, Any]], None] | None = None,
    text_encoder=None,
    reward=None,
) -> dict[str, Any]:
    """Score ``pairs`` with each mode through ``client`` (the reviewer's ``LLMClient``).

    ``text_encoder`` adds the embedding-novelty baseline (the reward's ``diversity``);
    with ``reward`` (``RewardConfig``) too, the configured reward itself is scored once its
    judge mode (``reward.judge``) has been. ``on_mode_done`` gets the report so far after
    each mode (the CLI writes it, so a long run that is interrupted keeps the modes it
    finished).
    """
    from serve.client import LLMCallError

    per_pair: dict[str, list[dict]] = {WORD_GAIN: [word_gain(p.before, p.after) for p in pairs]}
    queries: dict[str, int | None] = {WORD_GAIN: 0}
    min_topic_similarity = reward.min_topic_similarity if reward is not None else 0.0
    if text_encoder is not None:
        per_pair[NOVELTY], queries[NOVELTY] = embedding_novelty(text_encoder, pairs), 0
        pairs = with_topic_similarity(pairs, per_pair[NOVELTY])
    failed: dict[str, str] = {}
    summaries: dict[str, dict] = {}

    def report() -> dict[str, Any]:
        for name, scores in per_pair.items():
            if name not in summaries:  # each scorer's figures depend on its scores alone
                kind = ("baseline" if name in BASELINES else "reward" if name == REWARD
                        else "judge")
                summaries[name] = {
                    "kind": kind,
                    **({"judge": reward.judge} if kind == "reward" else {}),
                    **summarise(
                        pairs, scores, queries=queries[name], min_info_gain=min_info_gain,
                        min_topic_similarity=min_topic_similarity,
                        two_orders=kind == "judge" and get_judge(name).two_orders,
                        draws=draws, seed=seed,
                    ),
                }
        return {
            "pairs_total": len(pairs),
            "categories": dict(Counter(p.category for p in pairs)),
            "min_info_gain": min_info_gain,
            "min_topic_similarity": min_topic_similarity,
            "bootstrap": {"draws": draws, "seed": seed, "resampling": "pairs, within each class"},
            "modes_requested": list(modes),
            "scorers": dict(summaries),
            "failed_modes": dict(failed),
            "rules": rule_summary(pairs, min_topic_similarity=min_topic_similarity),
            "pairs": [
                {"id": p.id, "category": p.category, "good": p.good,
                 "scores": {name: per_pair[name][i] for name in per_pair}}
                for i, p in enumerate(pairs)
            ],
        }

    for mode in modes:
        log(f"reviewer-check: {mode}: scoring {len(pairs)} pairs ...")
        started = time.monotonic()
        try:
            per_pair[mode], queries[mode] = score_mode(client, mode, pairs)
            wall_s = time.monotonic() - started
            log(f"reviewer-check: {mode}: {queries[mode]} queries in {wall_s:.0f} s")
        except LLMCallError as exc:
            # one mode's failed call (e.g. a timeout) must not cost the other modes' figures
            failed[mode] = str(exc)
            log(f"reviewer-check: {mode}: failed: {exc}")
        if reward is not None and mode == reward.judge and mode in per_pair and (
                NOVELTY in per_pair):
            per_pair[REWARD] = reward_scores(per_pair[mode], per_pair[NOVELTY], reward)
            queries[REWARD] = queries[mode]
        if on_mode_done is not None:
            on_mode_done(report())
    if modes and len(failed) == len(modes):
        first = next(iter(failed.values()))
        raise LLMCallError("reviewer", f"every judge mode failed; the first: {first}")
    return report()


# -- outputs ----------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``reviewer_check.json`` and ``reviewer_check.png`` under ``out_dir``, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / JSON_NAME, out_dir / PNG_NAME
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, json_path)  # a crash leaves the previous file, never half of one
    tmp = png_path.with_suffix(".png.tmp")
    _figure(report).savefig(tmp, format="png", dpi=80)
    os.replace(tmp, png_path)
    return {"json": json_path, "png": png_path}


def _figure(report: dict[str, Any]):
    """Per-scorer, per-category mean values (heat map) beside the ROC curves (all pairs)."""
    from matplotlib.figure import Figure

    names = list(report["scorers"])
    cats = list(report["categories"])
    grid = np.array([[report["scorers"][n]["per_category"][c]["mean_value"] for c in cats]
                     for n in names])
    fig = Figure(figsize=(14, 4.5), layout="constrained")
    heat, roc = fig.subplots(1, 2, width_ratios=[2.2, 1])
    image = heat.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    heat.set_xticks(range(len(cats)), cats, rotation=60, ha="right")
    heat.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(cats)):
            heat.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if grid[i, j] < 0.5 else "black")
    heat.set_title("mean value per category")
    fig.colorbar(image, ax=heat, shrink=0.8)
    good = [p["good"] for p in report["pairs"]]
    for n in names:
        values = [p["scores"][n]["value"] for p in report["pairs"]]
        pos = [v for v, g in zip(values, good, strict=True) if g]
        neg = [v for v, g in zip(values, good, strict=True) if not g]
        fpr, tpr = roc_curve(pos, neg)
        roc.plot(fpr, tpr, label=f"{n} ({report['scorers'][n]['auc']['all']['auc']:.2f})")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("good vs all others: ROC (AUC)")
    roc.legend(fontsize=8)
    fig.suptitle(f"reviewer-check on {report['pairs_total']} labelled pairs")
    return fig


def format_table(report: dict[str, Any]) -> str:
    def auc(s, key):
        a = s["auc"][key]
        return "   n/a" if a is None else f"{a['auc']:.2f} [{a['ci95'][0]:.2f},{a['ci95'][1]:.2f}]"

    def num(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    head = (f"{'scorer':<17} {'AUC all [95% CI]':<17} {'vs paraphr.':<17} {'vs degenerate':<17} "
            f"{'+rules':>6} {'acc@thr':>7} {'+rules':>6} {'pos.bias':>8} {'self':>6} "
            f"{'queries':>7}")
    lines = [head, "-" * len(head)]
    for name, s in report["scorers"].items():
        lines.append(
            f"{name:<17} {auc(s, 'all'):<17} {auc(s, 'vs_paraphrase'):<17} "
            f"{auc(s, 'vs_degenerate'):<17} {s['auc_all_with_rules']:>6.2f} "
            f"{s['accuracy_at_threshold']:>7.2f} {s['accuracy_with_rules']:>6.2f} "
            f"{num(s['position_bias']):>8} {num(s['self_pair']):>6} {s['queries']:>7}"
        )
    dropped = ", ".join(f"{c} {r['dropped']:.0%}" for c, r in report["rules"].items()
                        if r["dropped"])
    lines.append(f"textual elimination rules drop: {dropped or 'nothing'} "
                 f"(threshold min_info_gain={report['min_info_gain']})")
    lines += [f"{mode}: not measured: {why}" for mode, why in report["failed_modes"].items()]
    return "\n".join(lines)
