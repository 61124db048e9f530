"""A real multi-node Ray cluster started with ``ray start``, with token authentication.

Unlike the session's ``ray.init`` (tests/conftest.py) this cluster is a set of daemons
that ``ray job submit`` talks to over HTTP, as on a real cluster: a head node with CPUs
and a second node advertising one fake GPU. The test process never joins it (it already
holds the session's Ray); it drives it with the ``ray`` CLI and small Python children
that carry the cluster's token in their environment.

``ray stop`` would also kill the session's Ray, so :meth:`LocalCluster.stop` ends only
the processes this cluster started (their process groups and every descendant).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class LocalCluster:
    def __init__(self) -> None:
        # Short root: Ray's socket paths under it must stay below 107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="trl-", dir="/tmp"))
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.metrics_ports = {"head": free_port(), "gpu": free_port()}
        self._groups: list[int] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_metrics_report_interval_ms": "2000",  # series show up within seconds
            # `ray start` gives a raylet this long to register with the GCS (default 30 s);
            # on a loaded 2-core machine a node took longer and the whole module errored.
            "RAY_raylet_start_wait_time_s": "120",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start_node(self, *args: str) -> None:
        # Its own session: every daemon `ray start` leaves behind is in this group.
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env, cwd=self.root, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._groups.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")

    def start(self) -> None:
        self._start_node(
            "--head", f"--port={self.gcs_port}", f"--temp-dir={self.root / 'ray'}",
            "--num-cpus=6", "--num-gpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_ports['head']}",
            f"--ray-client-server-port={free_port()}",
        )
        # A temp dir of its own, as on a separate machine: two nodes sharing one would
        # both manage (and clean up) the same unpacked working_dir of a job.
        self._start_node(
            f"--address={self.address}", f"--temp-dir={self.root / 'ray-gpu-node'}",
            "--num-cpus=2", "--num-gpus=1",
            f"--metrics-export-port={self.metrics_ports['gpu']}",
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if len(nodes) == 2:
                return
            time.sleep(2)
        raise RuntimeError(f"the GPU node did not join: {nodes}")

    def run(self, *args: str, timeout: float = 300, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=env or self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def query(self, code: str) -> object:
        """Run ``code`` in a Python child joined to the cluster; it prints one JSON value."""
        env = {**self.env, "RAY_ADDRESS": self.address}
        script = "import json, ray\nray.init(log_to_driver=False)\n" + textwrap.dedent(code)
        out = self.run(sys.executable, "-c", script, env=env, timeout=120).stdout
        return json.loads(out.strip().splitlines()[-1])

    def nodes(self) -> list[dict]:
        return self.query("""
            print(json.dumps([{"id": n["NodeID"], "gpus": n["Resources"].get("GPU", 0)}
                              for n in ray.nodes() if n["Alive"]]))
        """)

    def ray_cli(self, *args: str, timeout: float = 300, check: bool = True):
        return self.run(str(BIN / "ray"), *args, timeout=timeout, check=check)

    def job_status(self, job_id: str) -> str:
        """The job's status from the Jobs REST API (the token goes in the bearer header)."""
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/{job_id}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["status"]

    def stop(self) -> None:
        import psutil

        procs = {}
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) in self._groups:
                    procs[p.pid] = p
                    for child in p.children(recursive=True):  # workers run in own groups
                        procs[child.pid] = child
            except (psutil.Error, ProcessLookupError):
                continue
        for p in procs.values():
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
