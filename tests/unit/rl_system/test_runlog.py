"""What reaches the console and what reaches the run directory's logs (no Ray started)."""

from __future__ import annotations

import io
import logging

import pytest

from rl_system.runlog import DRIVER_LOG, LOGS_DIR, copy_ray_logs, run_logs


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def ray_console():
    """What Ray's driver console handler prints (a buffer in place of its stream); its
    level, filters and stream, and Serve's logger, restored afterwards."""
    import ray.data  # noqa: F401 - installs Ray's and Ray Data's console handlers

    from rl_system.runlog import CONSOLE_LOGGERS

    handlers = {h: None for name in CONSOLE_LOGGERS for h in logging.getLogger(name).handlers
                if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)}  # one handler may serve two
    buffer = io.StringIO()
    saved = [(h, h.level, list(h.filters), h.setStream(buffer)) for h in handlers]
    serve_logger = logging.getLogger("ray.serve")
    serve_saved = (list(serve_logger.handlers), serve_logger.propagate)
    yield buffer
    for h, level, filters, stream in saved:
        h.setLevel(level)
        h.filters[:] = filters
        h.setStream(stream)
    serve_logger.handlers[:], serve_logger.propagate = serve_saved


def test_rllibs_own_rlmodule_deprecation_reaches_the_file_not_the_console(ray_console):
    """Building our TRPO module the way stage 1 and 2 do (RLModuleSpec with spaces, the new
    API stack's form) still logs RLlib's deprecation: RLlib's own RLModule.__init__ builds
    the deprecated RLModuleConfig. It was printed from every process that built a module."""
    import gymnasium as gym
    from ray.util import debug

    from rl_system.runlog import quiet_console
    from rl_system.trpo import TRPOConfig

    quiet_console(verbose=False)
    file_side = _Records()
    deprecation = logging.getLogger("ray._common.deprecation")
    deprecation.addHandler(file_side)
    debug._logged.discard("RLModule(config=[RLModuleConfig object])")  # it logs once a process
    try:
        spec = TRPOConfig().get_default_rl_module_spec()
        spec.observation_space = gym.spaces.Box(0.0, 1.0, (4,))
        spec.action_space = gym.spaces.Discrete(3)
        spec.build()
    finally:
        deprecation.removeHandler(file_side)
    assert any("RLModuleConfig" in m for m in file_side.messages)  # it still fires
    assert "RLModuleConfig" not in ray_console.getvalue()


def test_ray_info_is_off_the_console_unless_verbose(ray_console):
    from rl_system.runlog import quiet_console

    quiet_console(verbose=False)
    logging.getLogger("ray.serve").info("Started Serve in namespace serve")
    logging.getLogger("ray.serve").warning("a replica died")
    logging.getLogger("ray.data").info("Execution plan of Dataset x")
    logging.getLogger("ray.data").warning("Progress bars disabled. To enable, set ...")
    assert "Started Serve" not in ray_console.getvalue()
    assert "Execution plan" not in ray_console.getvalue()
    assert "Progress bars disabled" not in ray_console.getvalue()
    assert "a replica died" in ray_console.getvalue()
    quiet_console(verbose=True)
    logging.getLogger("ray.serve").info("Started Serve in namespace serve")
    assert "Started Serve" in ray_console.getvalue()


def test_run_logs_keeps_printed_lines_and_log_records(tmp_path, capsys):
    with run_logs(tmp_path) as log:
        log("policy: iteration 1/2 · return 0.400")
        logging.getLogger("rl_system.policy").warning("checkpoint does not load")
        logging.getLogger("ray.rllib").warning("an RLlib warning")
    text = (tmp_path / LOGS_DIR / DRIVER_LOG).read_text()
    assert "policy: iteration 1/2" in text
    assert "checkpoint does not load" in text and "an RLlib warning" in text
    assert capsys.readouterr().out.count("policy: iteration 1/2") == 1  # printed once
    # the handler is gone once the run ends
    logging.getLogger("rl_system.policy").warning("after the run")
    assert "after the run" not in (tmp_path / LOGS_DIR / DRIVER_LOG).read_text()


def test_copy_ray_logs_copies_the_session_logs(tmp_path):
    session = tmp_path / "session" / "logs"
    (session / "events").mkdir(parents=True)
    (session / "worker-1.out").write_text("a worker line\n")
    (session / "events" / "e.log").write_text("{}\n")
    dest = copy_ray_logs(tmp_path / "run", session)
    assert (dest / "worker-1.out").read_text() == "a worker line\n"
    assert (dest / "events" / "e.log").exists()
