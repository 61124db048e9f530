"""The progress reporter: how often it prints off a terminal, the live line on one, ETA."""

from __future__ import annotations

import io
import json

import pytest

from rl_system.progress import JsonlFollower, Progress, eta_s, format_duration, summary_table


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _plain(clock: Clock, *, total: int | None = 100, **kw) -> tuple[Progress, list[str]]:
    lines: list[str] = []
    progress = Progress("dataset", total=total, unit="seeds", log=lines.append, clock=clock,
                        tty=False, interval_s=15, heartbeat_s=30, **kw)
    return progress, lines


def test_off_a_terminal_updates_are_throttled_to_one_line_per_interval():
    clock = Clock()
    progress, lines = _plain(clock)
    for i in range(1, 61):  # one update a second for a minute
        clock.t += 1
        progress.update(i, **{"pairs kept": i * 2})
    # at 15, 30, 45 and 60 s after the start: one line per interval, never more
    assert len(lines) == 4
    assert lines[0].startswith("dataset: seeds 15/100 · pairs kept 30 · ETA ")


def test_forced_units_add_one_line_each_on_top_of_the_interval():
    clock = Clock()
    lines: list[str] = []
    progress = Progress("policy", total=3, unit="iteration", log=lines.append, clock=clock,
                        tty=False)
    for i in range(1, 4):
        clock.t += 2
        progress.update(i, force=True, info_gain=0.25)
    assert [line.split(" · ")[0] for line in lines] == [
        "policy: iteration 1/3", "policy: iteration 2/3", "policy: iteration 3/3"]
    assert "info_gain 0.250" in lines[-1]


def test_the_last_unit_always_prints():
    clock = Clock()
    progress, lines = _plain(clock, total=3)
    for i in range(1, 4):
        clock.t += 1
        progress.update(i)
    assert lines == ["dataset: seeds 3/3 · 3 s"]  # done: no ETA


def test_heartbeat_prints_when_a_unit_runs_past_the_heartbeat():
    clock = Clock()
    progress, lines = _plain(clock)
    clock.t += 29
    progress.tick()
    assert lines == []
    clock.t += 1
    progress.tick()
    assert lines == ["dataset: seeds 0/100 · 30 s"]
    clock.t += 10
    progress.tick()  # only 10 s since the last line
    assert len(lines) == 1
    clock.t += 20
    progress.tick()
    assert lines[-1] == "dataset: seeds 0/100 · 1m00s"


def test_on_a_terminal_one_line_is_rewritten_in_place():
    clock = Clock()
    stream = io.StringIO()
    logged: list[str] = []
    progress = Progress("sft", total=10, unit="step", log=logged.append, clock=clock,
                        stream=stream, tty=True)
    for i in range(1, 4):
        clock.t += 1
        progress.update(i, loss=2.5 - i / 10)
    frames = [f for f in stream.getvalue().split("\r") if f.strip()]
    assert [f.split(" · ")[0] for f in frames] == ["sft: step 1/10", "sft: step 2/10",
                                                  "sft: step 3/10"]
    assert frames[-1].startswith("sft: step 3/10 · loss 2.200")
    assert "\n" not in stream.getvalue()  # one line, drawn over
    progress.note("sft: checkpoint written")
    clock.t += 1
    progress.update(4, force=True)  # a line to keep goes to the log, above the live line
    clock.t += 1
    progress.update(5)
    progress.close()
    assert logged == ["sft: checkpoint written", "sft: step 4/10 · loss 2.200 · ETA 6 s · 4 s"]
    assert stream.getvalue().endswith("\n")  # the live line ends once, at close
    assert stream.getvalue().count("\n") == 1


def test_eta_counts_the_rate_of_this_run_only():
    assert eta_s(done=0, total=10, elapsed_s=50) is None
    assert eta_s(done=5, total=10, elapsed_s=50) == pytest.approx(50)
    # a resume: 4 units were done before, 2 in 20 s now -> 4 left take 40 s
    assert eta_s(done=6, total=10, elapsed_s=20, start_done=4) == pytest.approx(40)
    assert eta_s(done=3, total=None, elapsed_s=10) is None


def test_eta_rate_can_start_after_start_up():
    clock = Clock()
    progress, lines = _plain(clock, total=10)
    clock.t += 100  # workers starting, model loading: not a step's cost
    progress.count_rate_from(0)
    clock.t += 10
    progress.update(1, force=True)
    assert "ETA 1m30s" in lines[-1] and lines[-1].endswith("1m50s")


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 185, 3725)] == ["0 s", "42 s", "3m05s",
                                                                    "1h02m"]


def test_follower_returns_only_complete_new_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "step", "step": 1}) + "\n")  # an earlier run
    follower = JsonlFollower(path)
    assert follower.poll() == []
    with path.open("a") as f:
        f.write(json.dumps({"event": "step", "step": 2}) + "\n" + '{"event": "st')
    assert follower.poll() == [{"event": "step", "step": 2}]
    with path.open("a") as f:
        f.write('ep", "step": 3}\n')
    assert follower.poll() == [{"event": "step", "step": 3}]


def test_summary_table_has_one_row_per_stage():
    table = summary_table([
        {"stage": "policy", "wall_s": 61.2, "status": "ran",
         "figures": {"iterations": 2, "return": 0.4125}},
        {"stage": "dataset", "wall_s": None, "status": "reused", "figures": {"pairs kept": 9}},
    ])
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["policy", "61", "ran", "iterations", "2", "·", "return",
                                "0.412"]
    assert lines[2].split()[:3] == ["dataset", "-", "reused"]


def test_heartbeat_thread_prints_on_time_with_a_real_clock():
    import time

    lines: list[str] = []
    with Progress("policy", total=2, unit="iteration", log=lines.append, tty=False,
                  heartbeat_s=0.2):
        time.sleep(1.0)  # one long unit, nothing reported
    assert 1 <= len(lines) <= 6  # about one per heartbeat, never a stream of them
    assert lines[0].startswith("policy: iteration 0/2 · ")


def test_a_step_without_units_shows_its_name_and_time():
    clock = Clock()
    lines: list[str] = []
    progress = Progress("pipeline", total=None, unit="deploying the model roles",
                        log=lines.append, clock=clock, tty=False, heartbeat_s=25)
    clock.t += 25
    progress.tick()
    assert lines == ["pipeline: deploying the model roles · 25 s"]


def test_the_eta_counts_down_between_units():
    # One unit of three took 10 s: 20 s left. A heartbeat 10 s later, with no new unit,
    # has 10 s left, not the 40 s of a rate diluted by the time the next unit is taking.
    clock = Clock()
    progress, lines = _plain(clock, total=3)
    clock.t += 10
    progress.update(1, force=True)
    assert lines == ["dataset: seeds 1/3 · ETA 20 s · 10 s"]
    clock.t += 10
    assert progress.line() == "dataset: seeds 1/3 · ETA 10 s · 20 s"
    clock.t += 25  # late: the estimate stops at zero
    assert progress.line() == "dataset: seeds 1/3 · ETA 0 s · 45 s"
