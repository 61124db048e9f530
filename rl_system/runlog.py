"""What a run prints, and what it keeps: a short console, full logs in the run directory.

``runs/<name>/logs/driver.log`` gets every line the command printed and every log record
of the driver at DEBUG (Ray's and Serve's INFO lines included); ``runs/<name>/logs/ray/``
gets a copy of the Ray session's logs (every worker's stdout/stderr, raylet, GCS, Serve)
when the command started Ray itself. Without ``--verbose`` the console shows our progress
and warnings only: Ray workers' output is not forwarded (``log_to_driver``), Ray's own driver
records below WARNING stay in the file, and the known messages below, which no user can act
on, are kept off the console.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

LOGS_DIR = "logs"
DRIVER_LOG = "driver.log"
RAY_LOGS = "ray"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# RLlib's own RLModule.__init__ (Ray 2.5x-2.60) builds the deprecated RLModuleConfig for old
# custom modules, so every module it builds logs this once per process, whichever
# constructor form the caller used: it names no call of ours to change.
# Ray Data's note that its progress bars are off: we turned them off (-v turns them on).
# Ray Tune's advice to install gputil, on any machine (RLlib's Algorithm is a Tune Trainable).
KNOWN_NOISE = ("`RLModule(config=[RLModuleConfig object])` has been deprecated",
               "Progress bars disabled. To enable",
               "Install gputil for GPU system monitoring")
# The driver-side loggers with console handlers of their own (``ray.data`` configures its
# logging when imported; ``ray.serve``'s is re-routed below).
CONSOLE_LOGGERS = ("ray", "ray.data")


class DropKnownNoise(logging.Filter):
    """Drops records whose message holds one of ``fragments`` (a console handler's filter:
    the file handler still keeps them)."""

    def __init__(self, fragments: tuple[str, ...] = KNOWN_NOISE):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_console(*, verbose: bool) -> None:
    """Ray's driver-side console: WARNING and up, known noise off (``-v``: all of it).

    Call after ``ray.init`` (``import ray`` installs Ray's handler); idempotent. Serve's
    driver logger, which keeps a console handler of its own and does not propagate, is
    routed through Ray's (so the run's ``driver.log`` gets its records too)."""
    import ray.data  # noqa: F401 - the imports install Ray Data's and Serve's driver loggers
    from ray import serve  # noqa: F401

    serve_logger = logging.getLogger("ray.serve")
    for handler in _console_handlers(serve_logger):
        serve_logger.removeHandler(handler)
    serve_logger.propagate = True
    for name in CONSOLE_LOGGERS:
        for handler in _console_handlers(logging.getLogger(name)):
            handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
            noise = [f for f in handler.filters if isinstance(f, DropKnownNoise)]
            if verbose:
                for f in noise:
                    handler.removeFilter(f)
            elif not noise:
                handler.addFilter(DropKnownNoise())


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def quiet_model_loading(*, verbose: bool) -> None:
    """transformers' and the hub's tqdm bars ("Loading weights") off unless ``-v``; set
    before Ray starts so the local cluster's workers inherit it. A user's own setting wins."""
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextmanager
def run_logs(run_dir: Path) -> Iterator[Callable[[str], None]]:
    """Tee the driver's log records and printed lines into ``run_dir/logs/driver.log``.

    Yields the ``log`` callable stages print with (console and file)."""
    logs = Path(run_dir) / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / DRIVER_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    # Ray's and RLlib's loggers do not propagate to their parents: the file hangs on each.
    targets = [logging.getLogger(name) for name in (None, "ray", "ray.rllib")]
    console = logging.getLogger("teams_rl.console")
    console.propagate = False  # the console has its line already (click.echo)
    console.setLevel(logging.INFO)
    for target in (*targets, console):
        target.addHandler(handler)

    def log(message: str) -> None:
        click.echo(message)
        console.info(message)

    try:
        yield log
    finally:
        for target in (*targets, console):
            target.removeHandler(handler)
        handler.close()


def copy_ray_logs(run_dir: Path, session_logs: Path) -> Path | None:
    """Copy the Ray session's ``logs/`` into ``run_dir/logs/ray`` (what is there so far);
    None when the copy failed (a warning says why: the logs stay in the session dir)."""
    dest = Path(run_dir) / LOGS_DIR / RAY_LOGS
    try:
        shutil.copytree(session_logs, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("*.sock", "*.lock"))
    except (OSError, shutil.Error) as exc:
        logging.getLogger(__name__).warning(
            "could not copy Ray's logs from %s to %s: %s", session_logs, dest, exc)
        return None
    return dest
