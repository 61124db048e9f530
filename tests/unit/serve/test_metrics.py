"""serve.metrics: metric rows are data, built once per process on first use (no Ray)."""

from __future__ import annotations

import pytest

from serve import metrics
from serve.metrics import KINDS, SERVE_METRICS, MetricRow, metric_group


def check_table(table: tuple[MetricRow, ...]) -> None:
    """What every metric table must satisfy (rl_system's tests run it on the whole one)."""
    names = [r.name for r in table]
    assert len(names) == len(set(names)), "a metric name is defined twice"
    keys = [(r.group, r.attribute) for r in table]
    assert len(keys) == len(set(keys)), "an attribute is defined twice in one group"
    for r in table:
        assert r.name.startswith("teams_rl_"), r
        assert r.kind in KINDS, r
        assert r.description, r
        assert isinstance(r.tag_keys, tuple), r
        if r.kind == "histogram":
            assert r.boundaries and list(r.boundaries) == sorted(r.boundaries), r
            assert all(b > 0 for b in r.boundaries), r
        else:
            assert r.boundaries is None, r
        if r.kind == "counter":
            assert r.name.endswith("_total"), r


def test_serve_rows_are_a_valid_table():
    check_table(SERVE_METRICS)
    assert {r.group for r in SERVE_METRICS} == {"llm", "client"}


def test_a_group_is_built_once_from_its_rows_without_starting_ray():
    import ray

    # the whole suite runs the integration tests (one shared ray.init) first
    ray_was_up = ray.is_initialized()
    group = metric_group("llm")
    assert metric_group("llm") is group and metrics.llm_metrics() is group
    for row in (r for r in SERVE_METRICS if r.group == "llm"):
        built = getattr(group, row.attribute)
        assert type(built).__name__.lower() == row.kind
        assert built.info["name"] == row.name and built.info["description"] == row.description
        assert tuple(built.info["tag_keys"]) == row.tag_keys
        if row.kind == "histogram":
            assert built.boundaries == list(row.boundaries)
    assert set(vars(metrics.client_metrics())) == {"queries", "tokens"}
    assert ray.is_initialized() == ray_was_up


def test_an_unknown_group_names_the_known_ones():
    with pytest.raises(KeyError, match="no metric group 'nope'.*client"):
        metric_group("nope")
