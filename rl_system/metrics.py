"""Every stage's Ray metrics, as rows of one table; names start with ``teams_rl_`` (DESIGN §5).

A metric is a ``serve.metrics.MetricRow`` (group, attribute, kind, name, description,
tags, boundaries) and a group's objects are created by ``serve.metrics.metric_group`` on
first use in the process that records them (an actor, a Ray Train worker, the driver),
never at import. They appear on each node's Prometheus endpoint and in the Grafana
dashboard under ``cluster/grafana/``.

The serving rows (the ``llm`` server group and the ``client`` group) live in
``serve/metrics.py``, with the builder: serve is the bottom layer and imports nothing from
``rl_system``. :data:`METRICS` is the whole table, serve's rows included.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from serve.metrics import SERVE_METRICS, MetricRow
from serve.metrics import metric_group as _metric_group

if TYPE_CHECKING:
    from rl_system.reviewer import Review

_RUN_STAGE = ("run", "stage")
INFO_GAIN_BOUNDARIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_RUN = ("run",)

STAGE_METRICS: tuple[MetricRow, ...] = (
    # Stage 1: the evolution policy, one value per training iteration.
    MetricRow("policy", "episode_return_mean", "gauge", "teams_rl_policy_episode_return_mean",
              "Mean episode return of the evolution policy."),
    MetricRow("policy", "info_gain", "gauge", "teams_rl_policy_info_gain",
              "Mean calibrated reviewer info_gain per evolution."),
    MetricRow("policy", "elimination_rate", "gauge", "teams_rl_policy_elimination_rate",
              "Share of evolutions eliminated by the rules."),
    MetricRow("policy", "queries_per_episode", "gauge", "teams_rl_policy_queries_per_episode",
              "Model queries per episode."),
    MetricRow("policy", "dominant_action_share", "gauge",
              "teams_rl_policy_dominant_action_share",
              "Largest share one action took of the iteration's steps (policy.max_action_share "
              "is the alert ceiling)."),
    # Stage 2, by strategy: queries paid and answered from the resume cache.
    MetricRow("dataset", "queries", "counter", "teams_rl_dataset_queries_total",
              "Stage-2 model queries by role; source=paid or cached (resume cache).",
              ("strategy", "role", "source")),
    MetricRow("dataset", "evolutions", "counter", "teams_rl_dataset_evolutions_total",
              "Stage-2 evolutions by outcome (kept, failed, or the eliminating rule).",
              ("strategy", "outcome")),
    MetricRow("dataset", "pairs", "counter", "teams_rl_dataset_pairs_total",
              "Instruction/response pairs written.", ("strategy",)),
    MetricRow("dataset", "seeds", "counter", "teams_rl_dataset_seeds_total",
              "Stage-2 seeds through the pipeline, by status (complete, or incomplete: the "
              "budget or a transient failure left them for the next run).",
              ("strategy", "status")),
    # The reviewer's verdicts in both stages, by judge mode (policy.reward.judge).
    MetricRow("reviewer", "reviews", "counter", "teams_rl_reviewer_reviews_total",
              "Evolutions the reviewer judged, by stage, judge mode and outcome (kept, or the "
              "elimination rule that dropped it).", ("stage", "judge", "outcome")),
    MetricRow("reviewer", "info_gain", "histogram", "teams_rl_reviewer_info_gain",
              "Calibrated info_gain of each evolution stage 1's env step reviewed.",
              ("stage", "judge"), INFO_GAIN_BOUNDARIES),
    # Stage 3 (rank 0 records them), by run name.
    MetricRow("sft", "loss", "gauge", "teams_rl_sft_loss", "Train loss per token.", _RUN),
    MetricRow("sft", "eval_loss", "gauge", "teams_rl_sft_eval_loss",
              "Held-out loss per token.", _RUN),
    MetricRow("sft", "tokens_per_second", "gauge", "teams_rl_sft_tokens_per_second",
              "Input tokens per second over all workers.", _RUN),
    MetricRow("sft", "learning_rate", "gauge", "teams_rl_sft_learning_rate", "AdamW lr.", _RUN),
    MetricRow("sft", "step", "gauge", "teams_rl_sft_step", "Optimizer steps done.", _RUN),
    MetricRow("sft", "tokens", "counter", "teams_rl_sft_tokens_total",
              "Input tokens trained on.", _RUN),
    # The pipeline driver's progress and stage 4's headline results.
    MetricRow("pipeline", "stage_running", "gauge", "teams_rl_pipeline_stage_running",
              "1 while the pipeline stage runs, 0 once it has finished.", _RUN_STAGE),
    MetricRow("pipeline", "stage_wall_s", "gauge", "teams_rl_pipeline_stage_wall_s",
              "Wall seconds the pipeline stage took.", _RUN_STAGE),
    MetricRow("pipeline", "eval_accuracy", "gauge", "teams_rl_eval_accuracy",
              "lm-eval accuracy of a run's SFT model, by task.", ("run", "task")),
    MetricRow("pipeline", "mia_auc", "gauge", "teams_rl_eval_mia_auc",
              "Membership-inference ROC AUC of a run's SFT model, by attack.",
              ("run", "attack")),
)

METRICS: tuple[MetricRow, ...] = SERVE_METRICS + STAGE_METRICS


def metric_group(group: str) -> SimpleNamespace:
    """``group``'s metric objects (any group of :data:`METRICS`), created once per process."""
    return _metric_group(group, table=METRICS)


def policy_metrics() -> SimpleNamespace:
    """Stage 1's gauges, set once per training iteration (attributes: summary fields)."""
    return metric_group("policy")


def dataset_metrics() -> SimpleNamespace:
    """Stage-2 accounting, by strategy: queries paid and answered from the resume cache."""
    return metric_group("dataset")


def sft_metrics() -> SimpleNamespace:
    """Ray metrics of the SFT stage (rank 0 records them), tagged by run name."""
    return metric_group("sft")


def pipeline_metrics() -> SimpleNamespace:
    """Driver-side progress of ``teams-rl pipeline`` and stage 4's headline results."""
    return metric_group("pipeline")


def maybe_pipeline_metrics() -> SimpleNamespace | None:
    """``pipeline_metrics()`` inside a Ray driver or worker, else ``None`` (e.g. a plain
    ``teams-rl evaluate``, which runs without Ray)."""
    return maybe_metric_group("pipeline")


def maybe_metric_group(group: str) -> SimpleNamespace | None:
    """``metric_group(group)`` inside a Ray driver or worker, else ``None``."""
    try:
        import ray

        return metric_group(group) if ray.is_initialized() else None
    except ImportError:
        return None


def review_tags(review: Review, *, stage: str, judge: str) -> dict[str, str]:
    """The ``teams_rl_reviewer_reviews_total`` tags of one review: ``kept`` or its rule."""
    return {"stage": stage, "judge": judge, "outcome": review.eliminated or "kept"}


def record_review(review: Review, *, stage: str, judge: str) -> None:
    """Count one review and observe its info_gain (no-op outside Ray, e.g. unit tests)."""
    metrics = maybe_metric_group("reviewer")
    if metrics is None:
        return
    tags = review_tags(review, stage=stage, judge=judge)
    metrics.reviews.inc(tags=tags)
    metrics.info_gain.observe(review.info_gain, tags={"stage": stage, "judge": judge})
