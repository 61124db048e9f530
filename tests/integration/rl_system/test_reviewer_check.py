"""reviewer-check through a real Serve deployment of the scripted reviewer.

The scripted backend (a deterministic test double) prefers "Not Equal" exactly when the
prompt holds a marker phrase that only the good rewrites contain, so the equality judge
must separate the classes perfectly, and every reported AUC must be the one the per-pair
values in the JSON give.
"""

from __future__ import annotations

import json

import pytest

from rl_system.judges import JUDGES
from rl_system.reviewer_check import load_pairs, roc_auc, run_check, write_report

APP = "rvcheck"
MARKER = "at least three"
PAIRS = [
    ("deepening-1", "deepening", True, "Explain tides.",
     f"Explain tides, giving {MARKER} causes of their timing."),
    ("add_constraints-1", "add_constraints", True, "Write a poem about rain.",
     f"Write a poem about rain with {MARKER} stanzas."),
    ("concretizing-1", "concretizing", True, "Describe a city.",
     f"Describe Lisbon, naming {MARKER} districts."),
    ("paraphrase-1", "paraphrase", False, "Explain tides.", "Describe how tides work."),
    ("refusal-1", "refusal", False, "Write a poem about rain.", "Sorry, I cannot write poems."),
    ("repetition-1", "repetition", False, "Describe a city.", "Describe a city city city city."),
]
SCRIPT = {"score": {"prefer": "Not Equal", "when_contains": MARKER}, "default": "Fine."}


@pytest.fixture(scope="module")
def reviewer(scripted_roles, tmp_path_factory):
    from serve.client import LLMClient

    root = tmp_path_factory.mktemp("rvcheck")
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(
        json.dumps({"id": i, "category": c, "good": g, "before": b, "after": a, "note": "t"}) + "\n"
        for i, c, g, b, a in PAIRS
    ))
    with scripted_roles(APP, SCRIPT, f"run.dir={root / 'runs'}",
                        "serve.batch_wait_timeout_s=0") as cfg:
        yield cfg, LLMClient.from_config(cfg, "reviewer", transport="handle"), pairs_file


def test_reviewer_check_json_recomputes_from_its_per_pair_values(reviewer):
    cfg, client, pairs_file = reviewer
    report = run_check(client, load_pairs(pairs_file), modes=list(JUDGES), min_info_gain=0.0,
                       draws=50, log=lambda _: None)
    paths = write_report(report, cfg.run_dir / "reviewer_check")
    data = json.loads(paths["json"].read_text())
    assert paths["png"].stat().st_size > 0

    good = [p["good"] for p in data["pairs"]]
    degenerate = [not p["good"] and p["category"] != "paraphrase" for p in data["pairs"]]
    for name, summary in data["scorers"].items():
        values = [p["scores"][name]["value"] for p in data["pairs"]]
        pos = [v for v, g in zip(values, good, strict=True) if g]
        neg = [v for v, g in zip(values, good, strict=True) if not g]
        deg = [v for v, d in zip(values, degenerate, strict=True) if d]
        assert summary["auc"]["all"]["auc"] == roc_auc(pos, neg), name
        assert summary["auc"]["vs_degenerate"]["auc"] == roc_auc(pos, deg), name
        lo, hi = summary["auc"]["all"]["ci95"]
        assert lo <= summary["auc"]["all"]["auc"] <= hi, name
    assert data["scorers"]["equality"]["auc"]["all"]["auc"] == 1.0
    # the scripted reviewer never answers "1"/"2" apart: preference learns nothing
    assert data["scorers"]["preference"]["auc"]["all"]["auc"] == 0.5
    # queries as the reviewer would spend them: self-pairs once per distinct original (3)
    n = len(PAIRS)
    assert data["scorers"]["equality"]["queries"] == 2 * n + 3
    assert data["scorers"]["cot"]["queries"] == 4 * n
    assert data["scorers"]["rating"]["queries"] == n + 3
