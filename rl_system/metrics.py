"""Ray metrics shared by every stage; names start with ``teams_rl_`` (DESIGN §5).

Metric objects are created on first use in the process that records them (an actor, a
Serve replica, the driver), never at import. They appear on each node's Prometheus
endpoint and in the Grafana dashboard under ``cluster/grafana/``.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


@lru_cache(maxsize=1)
def llm_metrics() -> SimpleNamespace:
    """Server-side counters of ``LLMServer`` replicas, tagged by deployment and role."""
    from ray.util.metrics import Counter, Histogram

    return SimpleNamespace(
        requests=Counter(
            "teams_rl_llm_requests_total",
            description="LLM requests served, by outcome.",
            tag_keys=("deployment", "role", "kind", "status"),
        ),
        tokens=Counter(
            "teams_rl_llm_tokens_total",
            description="Tokens processed by LLM replicas.",
            tag_keys=("deployment", "role", "type"),
        ),
        latency=Histogram(
            "teams_rl_llm_latency_s",
            description="Time from request arrival to answer, seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("deployment", "kind"),
        ),
        batch_size=Histogram(
            "teams_rl_llm_batch_size",
            description="Requests per dynamic batch.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("deployment", "kind"),
        ),
    )


@lru_cache(maxsize=1)
def client_metrics() -> SimpleNamespace:
    """Caller-side query accounting of ``LLMClient``, by role (what the run paid for)."""
    from ray.util.metrics import Counter

    return SimpleNamespace(
        queries=Counter(
            "teams_rl_queries_total",
            description="Model queries made, by role and outcome.",
            tag_keys=("role", "status"),
        ),
        tokens=Counter(
            "teams_rl_query_tokens_total",
            description="Prompt and completion tokens of model queries, by role.",
            tag_keys=("role", "type"),
        ),
    )


@lru_cache(maxsize=1)
def dataset_metrics() -> SimpleNamespace:
    """Stage-2 accounting, by strategy: queries paid and answered from the resume cache."""
    from ray.util.metrics import Counter

    return SimpleNamespace(
        queries=Counter(
            "teams_rl_dataset_queries_total",
            description="Stage-2 model queries by role; source=paid or cached (resume cache).",
            tag_keys=("strategy", "role", "source"),
        ),
        evolutions=Counter(
            "teams_rl_dataset_evolutions_total",
            description="Stage-2 evolutions by outcome (kept, failed, or the eliminating rule).",
            tag_keys=("strategy", "outcome"),
        ),
        pairs=Counter(
            "teams_rl_dataset_pairs_total",
            description="Instruction/response pairs written.",
            tag_keys=("strategy",),
        ),
    )


@lru_cache(maxsize=1)
def pipeline_metrics() -> SimpleNamespace:
    """Driver-side progress of ``teams-rl pipeline`` and stage 4's headline results."""
    from ray.util.metrics import Gauge

    return SimpleNamespace(
        stage_running=Gauge(
            "teams_rl_pipeline_stage_running",
            description="1 while the pipeline stage runs, 0 once it has finished.",
            tag_keys=("run", "stage"),
        ),
        stage_wall_s=Gauge(
            "teams_rl_pipeline_stage_wall_s",
            description="Wall seconds the pipeline stage took.",
            tag_keys=("run", "stage"),
        ),
        eval_accuracy=Gauge(
            "teams_rl_eval_accuracy",
            description="lm-eval accuracy of a run's SFT model, by task.",
            tag_keys=("run", "task"),
        ),
        mia_auc=Gauge(
            "teams_rl_eval_mia_auc",
            description="Membership-inference ROC AUC of a run's SFT model, by attack.",
            tag_keys=("run", "attack"),
        ),
    )


def maybe_pipeline_metrics() -> SimpleNamespace | None:
    """``pipeline_metrics()`` inside a Ray driver or worker, else ``None`` (e.g. a plain
    ``teams-rl evaluate``, which runs without Ray)."""
    try:
        import ray

        return pipeline_metrics() if ray.is_initialized() else None
    except ImportError:
        return None
