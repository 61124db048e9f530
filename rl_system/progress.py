"""Progress a person reads: one reporter every stage uses, and the end-of-run table.

On a terminal :class:`Progress` keeps one live line (rewritten with ``\\r``) and prints the
lines worth keeping (a finished policy iteration, the last unit) above it; when stdout
is a file or a pipe (``make demo > demo.log``, CI, ``ray job submit``) it prints plain lines
instead: one per completed unit where the stage asks for it (``force=True``: a policy
iteration), otherwise at most one every ``interval_s``, and a heartbeat with the elapsed time
when nothing was printed for ``heartbeat_s`` (a unit that takes minutes still shows life)::

    policy: iteration 1/2 · return 0.412 · info_gain 0.231 · queries 4.2 · 38 s
    dataset: seeds 4/12 · pairs kept 9 · expert queries 31/∞ · ETA 2m10s · 61 s
    sft: step 6/10 · loss 2.314 · tokens/s 412 · ETA 14 s · 33 s

Everything here is plain Python (no Ray): the stages feed it figures.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

Log = Callable[[str], None]

INTERVAL_S = 15.0  # non-TTY: at most one throttled line this often
HEARTBEAT_S = 28.0  # non-TTY: a line at least this often while a stage runs (under 30 s)
SEP = " · "


def format_duration(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``: short enough for a progress line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_s(*, done: int, total: int | None, elapsed_s: float, start_done: int = 0) -> float | None:
    """Seconds left at the rate of the units finished in this run (``start_done`` were
    already done when it began, e.g. a resume); None until a unit has finished."""
    finished = done - start_done
    if total is None or finished <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, (total - done) * elapsed_s / finished)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


class Progress:
    """One stage's progress: ``update`` with the figures after each unit (or step).

    ``total``: units expected (None: unknown); ``unit``: their name in the line
    (``iteration``, ``seeds``, ``step``). Lines go to ``log`` off a terminal; on one
    (``tty``, default: whether ``stream`` is a terminal) the live line is drawn on
    ``stream``. Use it as a context manager to run the heartbeat thread (``tick`` is what
    that thread calls; tests call it with a fake ``clock``).
    """

    def __init__(self, stage: str, *, total: int | None, unit: str, log: Log,
                 start_done: int = 0, interval_s: float = INTERVAL_S,
                 heartbeat_s: float = HEARTBEAT_S, clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None, tty: bool | None = None):
        self.stage, self.total, self.unit, self.log = stage, total, unit, log
        self.start_done = self.done = start_done
        self.interval_s, self.heartbeat_s, self.clock = interval_s, heartbeat_s, clock
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self.figures: dict[str, Any] = {}
        self.started = self.last_line = clock()
        self.rate_started: float | None = None  # None: the ETA counts from ``started``
        self.unit_at: float | None = None  # when ``done`` last moved: the rate's end
        self._live_width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a stage calls

    def update(self, done: int | None = None, *, force: bool = False, **figures: Any) -> None:
        """New figures (and units done). A line is printed (to ``log``) when ``force`` (a
        completed unit worth its own line) or when the last unit is done; otherwise, on a
        terminal the live line is redrawn, off one a line is printed when ``interval_s``
        passed since the last."""
        with self._lock:
            now = self.clock()
            if done is not None and done != self.done:
                self.done, self.unit_at = done, now
            self.figures.update(figures)
            final = self.total is not None and self.done >= self.total
            if self.tty and (force or final):
                # A line to keep (and for the run's log file): printed, not drawn over.
                self._clear_live()
                self.last_line = now
                self.log(self.line(now))
            elif self.tty or force or final or now - self.last_line >= self.interval_s:
                self._emit(now)

    def count_rate_from(self, done: int) -> None:
        """Time the ETA's rate from now, ``done`` units done: what came before (start-up,
        units of an earlier run) is no measure of what is left."""
        with self._lock:
            self.start_done = self.done = done
            self.rate_started, self.unit_at = self.clock(), None

    def note(self, message: str) -> None:
        """A line of its own (a warning, a resume) without tearing the live line."""
        with self._lock:
            self._clear_live()
            self.log(message)
            if self.tty:
                self._emit(self.clock())

    def tick(self) -> None:
        """Heartbeat: redraw the live line (elapsed time), or off a terminal print the
        line when nothing was printed for ``heartbeat_s``."""
        with self._lock:
            now = self.clock()
            if self.tty or now - self.last_line >= self.heartbeat_s:
                self._emit(now)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self.tty and self._live_width:
                self.stream.write("\n")
                self.stream.flush()
                self._live_width = 0

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"progress-{self.stage}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the line

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.started
        if self.total is not None:
            parts = [f"{self.stage}: {self.unit} {self.done}/{self.total}"]
        else:  # a step without units (deploying): its name and the time only
            parts = [f"{self.stage}: {self.unit}" + (f" {self.done}" if self.done else "")]
        parts += [f"{k} {_fmt(v)}" for k, v in self.figures.items()]
        # The rate of the units finished so far, counted down since the last one finished
        # (a heartbeat between units must not dilute the rate with the unit in progress).
        rate_from = self.started if self.rate_started is None else self.rate_started
        last_unit = now if self.unit_at is None else self.unit_at
        left = eta_s(done=self.done, total=self.total, elapsed_s=last_unit - rate_from,
                     start_done=self.start_done)
        if left is not None:
            left = max(0.0, left - (now - last_unit))
        if left is not None and self.done < (self.total or 0):
            parts.append(f"ETA {format_duration(left)}")
        parts.append(format_duration(elapsed))
        return SEP.join(parts)

    def _emit(self, now: float) -> None:
        text = self.line(now)
        self.last_line = now
        if self.tty:
            pad = max(0, self._live_width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._live_width = len(text)
        else:
            self.log(text)

    def _clear_live(self) -> None:
        if self.tty and self._live_width:
            self.stream.write("\r" + " " * self._live_width + "\r")
            self.stream.flush()
            self._live_width = 0

    def _beat(self) -> None:
        # Off a terminal, wake when the heartbeat falls due (not on a fixed tick, which
        # would stretch the gap between lines by up to a tick).
        while not self._stop.wait(1.0 if self.tty else max(
                0.05, self.last_line + self.heartbeat_s - self.clock())):
            self.tick()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class JsonlFollower:
    """Reads the records appended to a JSONL file since it was opened (a background
    thread's job: the SFT driver follows rank 0's ``metrics.jsonl``). ``poll`` returns the
    complete new lines; a half-written last line waits for the next poll."""

    def __init__(self, path: Path, *, from_start: bool = False):
        self.path = Path(path)
        self.offset = 0 if from_start or not self.path.exists() else self.path.stat().st_size
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        records = []
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # a torn line from a killed writer: skip it, as the readers do
            if isinstance(record, dict):
                records.append(record)
        return records


def summary_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The end-of-run table, one row per stage: ``stage``, ``wall_s``, ``status`` and
    ``figures`` (name -> value, in order)."""
    rows = list(rows)
    width = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [f"{'stage':<{width}}  {'wall s':>7}  {'status':<8}  figures"]
    for r in rows:
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        figures = SEP.join(f"{k} {_fmt(v)}" for k, v in r.get("figures", {}).items())
        lines.append(f"{r['stage']:<{width}}  {wall:>7}  {r.get('status', ''):<8}  {figures}")
    return "\n".join(lines)
