"""Ray metrics as data: one :class:`MetricRow` per metric, built on first use.

Every metric of the project is a row (group, attribute, kind, name, description, tags,
histogram boundaries); :func:`metric_group` turns one group's rows into a namespace of
``ray.util.metrics`` objects (``metric_group("llm").latency.observe(...)``) the first time
the process (a Serve replica, an actor, the driver) asks for it, never at import. Names
start with ``teams_rl_`` (DESIGN §5); they appear on each node's Prometheus endpoint as
``ray_<name>`` and in the Grafana dashboard under ``cluster/grafana/``.

This module holds the builder and serve's own rows (the ``LLMServer`` replicas and the
``LLMClient`` callers); the stages' rows live in ``rl_system.metrics``, since serve is the
bottom layer and imports nothing from ``rl_system``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

LATENCY_BOUNDARIES_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64)
KINDS = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class MetricRow:
    """One metric: ``metric_group(group).<attribute>`` is its ``ray.util.metrics`` object."""

    group: str
    attribute: str
    kind: Literal["counter", "gauge", "histogram"]
    name: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] | None = None  # histograms only: bucket upper bounds

    def build(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        if self.kind == "histogram":
            return Histogram(self.name, description=self.description,
                             boundaries=list(self.boundaries or ()), tag_keys=self.tag_keys)
        cls = {"counter": Counter, "gauge": Gauge}[self.kind]
        return cls(self.name, description=self.description, tag_keys=self.tag_keys)


_SERVER_TAGS = ("deployment", "kind")

SERVE_METRICS: tuple[MetricRow, ...] = (
    # Server side: LLMServer replicas, by deployment and role.
    MetricRow("llm", "requests", "counter", "teams_rl_llm_requests_total",
              "LLM requests served, by outcome.", ("deployment", "role", "kind", "status")),
    MetricRow("llm", "tokens", "counter", "teams_rl_llm_tokens_total",
              "Tokens processed by LLM replicas.", ("deployment", "role", "type")),
    MetricRow("llm", "latency", "histogram", "teams_rl_llm_latency_s",
              "Time from request arrival to answer, seconds.", _SERVER_TAGS,
              LATENCY_BOUNDARIES_S),
    MetricRow("llm", "batch_size", "histogram", "teams_rl_llm_batch_size",
              "Requests per dynamic batch.", _SERVER_TAGS, BATCH_BOUNDARIES),
    # Caller side: LLMClient's query accounting, by role (what the run paid for).
    MetricRow("client", "queries", "counter", "teams_rl_queries_total",
              "Model queries made, by role and outcome.", ("role", "status")),
    MetricRow("client", "tokens", "counter", "teams_rl_query_tokens_total",
              "Prompt and completion tokens of model queries, by role.", ("role", "type")),
)

_built: dict[str, SimpleNamespace] = {}
_lock = threading.Lock()


def metric_group(group: str, *, table: Sequence[MetricRow] = SERVE_METRICS) -> SimpleNamespace:
    """The metric objects of ``group``'s rows in ``table``, created once per process.

    Group names are unique across tables, so the cache is keyed by the group alone."""
    built = _built.get(group)
    if built is not None:
        return built
    with _lock:  # replicas record from several threads; create each metric once
        if group not in _built:
            rows = [r for r in table if r.group == group]
            if not rows:
                known = sorted({r.group for r in table})
                raise KeyError(f"no metric group {group!r}; the table has {known}")
            _built[group] = SimpleNamespace(**{r.attribute: r.build() for r in rows})
        return _built[group]


def llm_metrics() -> SimpleNamespace:
    """Server-side counters of ``LLMServer`` replicas, tagged by deployment and role."""
    return metric_group("llm")


def client_metrics() -> SimpleNamespace:
    """Caller-side query accounting of ``LLMClient``, by role (what the run paid for)."""
    return metric_group("client")
