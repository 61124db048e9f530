"""Stage 2's driver bookkeeping: why seeds are unfinished, when to stop, what to say."""

from __future__ import annotations

from rl_system.dataset import SeedTally, empty_reason


def _row(incomplete=False, failure=None):
    return {"incomplete": incomplete, "failure": failure}


def test_causes_are_counted_and_the_first_failure_kept():
    t = SeedTally(total=5, max_failure_rate=1.0)
    for row in (_row(), _row(True), _row(True, "expert: connection refused"),
                _row(True, "reviewer: 503 overloaded")):
        t.add(row)
    assert dict(t.incomplete) == {"budget": 1, "failure": 2}
    assert t.failure_record() == {"role": "expert", "message": "connection refused"}
    msg = t.failure_message()
    assert "2 of 5 seeds failed, the expert role said: connection refused" in msg
    assert "run the same command again" in msg and "stopped early" not in msg


def test_a_row_without_the_failure_column_is_a_budget_stop():
    t = SeedTally(total=2, max_failure_rate=0.5)
    t.add({"incomplete": True})
    assert dict(t.incomplete) == {"budget": 1} and t.failure_message() is None


def test_past_the_failure_rate_the_rest_is_stopped():
    t = SeedTally(total=6, max_failure_rate=0.5)
    for _ in range(3):
        t.add(_row(True, "expert: timed out"))
        assert not t.too_many_failures  # 3 of 6 is not past 0.5
    t.add(_row(True, "expert: timed out"))
    assert t.too_many_failures
    t.stop_early()
    assert dict(t.incomplete) == {"failure": 4, "stopped": 2} and t.seeds_incomplete == 6
    assert "stopped early: more than dataset.max_failure_rate=0.5" in t.failure_message()


def test_empty_build_says_why():
    summary = {"seeds_incomplete": 0, "evolutions_tried": 4, "evolutions_failed": 1,
               "reviews_failed": 0, "eliminated": {"no_info_gain": 3}, "responses_failed": 0,
               "duplicates_exact": 0, "duplicates_near": 0}
    assert "eliminated 3" in empty_reason(summary)
    assert "next run" in empty_reason({**summary, "seeds_incomplete": 2})


def test_the_build_table_lists_only_the_rules_that_fired():
    from rl_system.dataset.outputs import format_summary

    summary = {"seeds_read": 3, "seeds_skipped_bad": 0, "seeds_skipped_empty": 0,
               "seeds_incomplete_by_cause": {"budget": 0, "failure": 0, "stopped": 0},
               "evolutions_tried": 9, "evolutions_failed": 0, "responses_failed": 0,
               "eliminated": {"too_short": 0, "template_copied": 4, "truncated": 3},
               "duplicates_exact": 0, "duplicates_near": 0, "pairs_written": 1}
    usage = {"expert": {"queries": 10, "cached": 0, "prompt_tokens": 5, "completion_tokens": 7,
                        "failures": 0}}
    manifest = {"strategy": "policy", "status": "complete", "summary": summary,
                "queries": {"policy": usage}, "expert_queries_per_pair": 10.0}
    table = format_summary(manifest)
    assert "eliminated: template_copied" in table and "eliminated: truncated" in table
    assert "too_short" not in table
    none_fired = format_summary({**manifest, "summary": {**summary, "eliminated": {"x": 0}}})
    assert "eliminated (any rule)" in none_fired and "eliminated: x" not in none_fired
