"""The labelled pair set `teams-rl reviewer-check` scores judges on (issue 14, item 3).

A judge mode is only as well measured as this set is built: every category present in
force, labels that follow the category, and length that does not tell good from bad (so a
reward that pays for words alone cannot look good on it).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from rl_system.actions import depth_and_breadth

PAIRS = Path(__file__).resolve().parents[2] / "data" / "reviewer_pairs.jsonl"

OPERATIONS = ("add_constraints", "deepening", "concretizing", "increase_reasoning_steps",
              "complicate_input")
DEGENERATE = ("prompt_leak", "truncation", "off_topic", "repetition", "verbose_padding",
              "gibberish", "refusal")
MIN_COUNT = {"paraphrase": 12, **dict.fromkeys(OPERATIONS, 6), "breadth": 8,
             **dict.fromkeys(DEGENERATE, 4)}
GOOD = set(OPERATIONS) | {"breadth"}
FIELDS = {"id", "category", "before", "after", "good", "note"}


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    lines = PAIRS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_good_categories_are_the_catalogue_operations():
    # reviewer-check reports per action, so the category names must be the action names
    assert GOOD == {a.name for a in depth_and_breadth()}


def test_rows_are_well_formed_and_ids_unique(pairs):
    assert len(pairs) >= 90
    for row in pairs:
        assert set(row) == FIELDS, row.get("id")
        assert row["id"].startswith(f"{row['category']}-"), row["id"]
        assert isinstance(row["good"], bool) and row["note"].strip(), row["id"]
        assert row["before"].strip() and row["after"].strip(), row["id"]
        assert row["before"].strip() != row["after"].strip(), row["id"]
    ids = [row["id"] for row in pairs]
    assert len(set(ids)) == len(ids)
    befores = [row["before"] for row in pairs]
    assert len(set(befores)) >= 0.9 * len(befores)  # varied seeds, not a few reused


def test_every_category_present_in_force_and_labelled_by_it(pairs):
    counts: dict[str, int] = {}
    for row in pairs:
        assert row["category"] in MIN_COUNT, row["id"]
        assert row["good"] is (row["category"] in GOOD), row["id"]
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    short = {c: n for c, n in MIN_COUNT.items() if counts.get(c, 0) < n}
    assert not short, f"categories below their minimum: {short}"


def test_length_does_not_separate_good_from_bad(pairs):
    operations = [r for r in pairs if r["category"] in OPERATIONS]
    brief = [r["id"] for r in operations if words(r["after"]) <= 1.2 * words(r["before"])]
    assert len(brief) >= 10, brief
    for op in OPERATIONS:  # short rewrites that still demand more, in every operation
        assert sum(i.startswith(f"{op}-") for i in brief) >= 2, op
    median_good = statistics.median(words(r["after"]) for r in pairs if r["good"])
    padded = [r["id"] for r in pairs if r["category"] in ("verbose_padding", "off_topic")
              and words(r["after"]) > median_good]
    assert len(padded) >= 5, padded
