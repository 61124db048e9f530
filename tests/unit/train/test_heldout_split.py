"""SFT's held-out split is by seed: no evolution of a held-out seed is ever trained on.

Several rows of one dataset come from one seed (its evolutions). A per-row split puts some
of them on each side, so the membership-inference "non-members" share a seed (often most
of their words) with trained rows, and the attack's AUC is biased towards "no leak".
"""

from __future__ import annotations

from collections import Counter

from train.data import heldout_groups


def _groups(sizes: dict[str, int]) -> list[str]:
    return [g for g, n in sizes.items() for _ in range(n)]


def test_whole_groups_are_held_out():
    groups = _groups({f"seed-{i}": 1 + i % 4 for i in range(30)})
    held = heldout_groups(groups, eval_fraction=0.2, seed=0)
    rows = Counter(groups)
    held_rows = sum(rows[g] for g in held)
    assert held and held < set(groups)
    # About the asked fraction of rows, never all of them.
    assert abs(held_rows / len(groups) - 0.2) <= max(rows.values()) / len(groups)


def test_split_is_reproducible_and_seeded():
    groups = _groups({f"s{i}": 2 for i in range(40)})
    assert heldout_groups(groups, eval_fraction=0.25, seed=3) == heldout_groups(
        list(reversed(groups)), eval_fraction=0.25, seed=3)
    assert heldout_groups(groups, eval_fraction=0.25, seed=3) != heldout_groups(
        groups, eval_fraction=0.25, seed=4)


def test_one_group_cannot_be_split_and_a_train_side_always_remains():
    assert heldout_groups(["only"] * 5, eval_fraction=0.5, seed=0) == set()
    assert heldout_groups(["a", "b"], eval_fraction=0.9, seed=0) in ({"a"}, {"b"})
    assert heldout_groups(_groups({"a": 3, "b": 3}), eval_fraction=0.0, seed=0) == set()
