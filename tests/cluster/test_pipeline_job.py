"""`teams-rl pipeline` submitted with `ray job submit` to a two-node cluster (token auth on).

One tiny pipeline config is submitted three times to the cluster of
``conftest.LocalCluster``. Its assertions are about orchestration, so the roles are the
scripted backend (a test double with a fixed latency, so that the stop lands in stage 2)
and SFT, lm-eval and the MIA run on a tiny random-weight Llama (``tests.tiny_model``); the
real-model paths of each stage are in ``tests/integration``.

1. stopped with ``ray job stop`` once stage 2 has cached some model answers;
2. submitted again: it skips stage 1, resumes stage 2 from its cache, finishes 3 and 4;
3. submitted once more on the finished run: no stage runs and no model is queried.

The role deployment asks for one GPU per replica (``serve.num_gpus=1``), so Serve must
place it on the node with the fake GPU; lm-eval asks for that same GPU
(``eval.num_gpus=1``), so the pipeline must release the role replicas once no stage needs
them, or stage 4 would wait forever. While the jobs run, both nodes' Prometheus endpoints
are scraped for ``teams_rl_`` series.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

JOB_TIMEOUT_S = 900
STAGE_OUTPUTS = {
    "policy": ["policy/metrics.jsonl"],
    "dataset": ["dataset/manifest.json", "dataset/alpaca.json", "dataset/chat.jsonl"],
    "sft": ["sft/final/model.safetensors", "sft/final/tokenizer.json"],
    "eval": ["eval/lm_eval.json", "eval/mia.json", "eval/report.json", "eval/report.md"],
}


# Every role is one scripted deployment: rewrites add a clause, the reviewer calls every
# changed instruction "Not Equal", the expert echoes. 0.3 s per backend call keeps stage 2
# running long enough to be stopped in the middle.
ROLE_SCRIPT = {
    "rules": [{"contains": "<<<", "reply": "{instruction} Give one concrete example too."}],
    "default": "Here is an answer to: {last_user}",
    "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
    "latency_s": 0.3,
}


def pipeline_overrides(run_root: Path, serve_port: int, base_model: Path) -> list[str]:
    roles = [f"models.{role}.{key}={value}" for role in ("instructor", "reviewer", "expert")
             for key, value in (("backend", "scripted"), ("model", "cluster-roles"),
                                ("script", json.dumps(ROLE_SCRIPT)))]
    return [
        f"run.dir={run_root}", "run.name=cluster", *roles, f"sft.base_model={base_model}",
        # the scripted reviewer answers the equality judge's labels (Equal / Not Equal)
        "policy.reward.judge=equality",
        f"serve.port={serve_port}", "serve.num_gpus=1", "serve.num_cpus=1",
        "policy.iterations=1", "policy.num_env_runners=1", "policy.train_batch_size=4",
        "policy.max_steps=4",
        "dataset.num_seeds=8", "models.expert.sampling.max_tokens=32",
        "sft.num_workers=1", "sft.max_steps=2", "sft.max_seq_len=128",
        "sft.eval_fraction=0.0", "sft.checkpoint_every_steps=2",
        "eval.limit=4", "eval.num_gpus=1",
    ]


class MetricsScraper:
    """Polls every node's Prometheus endpoint; keeps the ``teams_rl_`` series it sees."""

    def __init__(self, ports: dict[str, int], period_s: float = 3.0):
        self.ports, self.period_s = ports, period_s
        self.series: set[str] = set()
        self.requests_total: dict[str, float] = {}  # series (with tags) -> last value
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> None:
        for port in self.ports.values():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("ray_teams_rl_"):
                    self.series.add(re.split(r"[{ ]", line, maxsplit=1)[0])
                    if line.startswith("ray_teams_rl_llm_requests_total{"):
                        series, value = line.rsplit(" ", 1)
                        self.requests_total[series] = float(value)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.scrape()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.scrape()


def submit(cluster, overrides: list[str], job_id: str) -> None:
    cluster.ray_cli(
        "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
        "--submission-id", job_id, "--no-wait", "--",
        "teams-rl", "pipeline", "--config", "configs/demo.yaml",
        *[arg for o in overrides for arg in ("--set", o)],
    )


def wait_for(cluster, job_id: str, *, until=None, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll until the job ends (or ``until()`` holds); returns the last status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster.job_status(job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or (until and until()):
            return status
        time.sleep(3)
    raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s:\n"
                       + logs(cluster, job_id)[-5000:])


def logs(cluster, job_id: str) -> str:
    return cluster.ray_cli("job", "logs", "--address", cluster.dashboard, job_id).stdout


def serve_replicas(cluster) -> list[dict]:
    """Live Serve replicas: class name, node and the GPUs they asked for."""
    return cluster.query("""
        from ray.util.state import list_actors
        print(json.dumps([{"name": a.class_name, "node": a.node_id,
                           "gpus": (a.required_resources or {}).get("GPU", 0)}
                          for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True,
                                               limit=10000)
                          if a.class_name.startswith("ServeReplica")]))
    """)


def cached_answers(run: Path) -> int:
    cache = run / "dataset" / "cache"
    return sum(len(p.read_text().splitlines()) for p in cache.glob("*.jsonl")) if cache.is_dir() \
        else 0


@pytest.fixture(scope="module")
def jobs(local_cluster, tiny_llama):
    cluster = local_cluster
    run_root = cluster.root / "runs"
    run = run_root / "cluster"
    overrides = pipeline_overrides(run_root, free_port(), tiny_llama)
    out: dict = {"run": run, "overrides": overrides}
    with MetricsScraper(cluster.metrics_ports) as scraper:
        # 1. interrupted in stage 2, once a few model answers are cached
        submit(cluster, overrides, "teams-rl-interrupted")
        status = wait_for(cluster, "teams-rl-interrupted", until=lambda: cached_answers(run) >= 4)
        assert status == "RUNNING", logs(cluster, "teams-rl-interrupted")[-5000:]
        out["replicas_in_stage_2"] = serve_replicas(cluster)
        cluster.ray_cli("job", "stop", "--address", cluster.dashboard, "teams-rl-interrupted")
        out["interrupted_status"] = wait_for(cluster, "teams-rl-interrupted", timeout_s=120)
        out["cached_at_stop"] = cached_answers(run)
        out["interrupted_logs"] = logs(cluster, "teams-rl-interrupted")

        # 2. resumed to the end
        started = time.monotonic()
        submit(cluster, overrides, "teams-rl-resumed")
        out["resumed_status"] = wait_for(cluster, "teams-rl-resumed")
        out["resumed_wall_s"] = time.monotonic() - started
        out["resumed_logs"] = logs(cluster, "teams-rl-resumed")
        assert out["resumed_status"] == "SUCCEEDED", out["resumed_logs"][-8000:]
        out["replicas_after"] = serve_replicas(cluster)
        time.sleep(5)  # one more metrics report interval
        scraper.scrape()
        out["requests_before_rerun"] = dict(scraper.requests_total)

        # 3. the finished run again
        submit(cluster, overrides, "teams-rl-rerun")
        out["rerun_status"] = wait_for(cluster, "teams-rl-rerun")
        out["rerun_logs"] = logs(cluster, "teams-rl-rerun")
        time.sleep(5)
    out["requests_after_rerun"] = dict(scraper.requests_total)
    out["series"] = scraper.series
    print("resumed job wall s", round(out["resumed_wall_s"]), "timings",
          (run / "pipeline.json").read_text())
    return out


def test_resumed_job_succeeds_with_every_stage_output(jobs):
    run = jobs["run"]
    for stage, files in STAGE_OUTPUTS.items():
        for rel in files:
            assert (run / rel).is_file(), f"stage {stage}: {rel} missing"
    assert list(run.glob("dataset/data/*.parquet")), "no dataset parquet"
    assert json.loads((run / "pipeline.json").read_text())["stage_wall_s"].keys() == {
        "policy", "dataset", "sft", "eval"}
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["runs"]["cluster"]["strategy"] == "policy"
    assert report["benchmarks"]["cluster"]["teams_rl_mc"]["n"] == 4
    # the job's log shows every stage and the final summary
    text = jobs["resumed_logs"]
    for stage in ("dataset", "sft", "eval"):
        assert f"pipeline: stage {stage} started" in text
        assert re.search(rf"pipeline: stage {stage} finished in \d+ s", text)
    assert "pipeline: done; report at" in text


def test_a_job_stopped_in_stage_2_resumes_there(jobs):
    assert jobs["interrupted_status"] == "STOPPED"
    assert "pipeline: stage dataset started" in jobs["interrupted_logs"]
    assert jobs["cached_at_stop"] >= 4
    resumed = jobs["resumed_logs"]
    assert "pipeline: already done for this config: policy" in resumed
    assert "pipeline: stage policy started" not in resumed
    manifest = json.loads((jobs["run"] / "dataset" / "manifest.json").read_text())
    replayed = sum(u["cached"] for u in manifest["queries"]["policy"].values())
    assert replayed > 0, manifest["queries"]  # answers paid before the stop were not re-paid


def test_rerun_of_a_finished_run_does_nothing(jobs):
    assert jobs["rerun_status"] == "SUCCEEDED"
    text = jobs["rerun_logs"]
    assert "already done for this config: policy, dataset, sft, eval" in text
    assert "pipeline: nothing to do" in text
    after = text.split("nothing to do")[1]
    assert "pipeline: stage" not in after  # no stage started
    # the end-of-run table lists every stage as reused, none as ran
    rows = [line.split() for line in after.splitlines()
            if line.split()[:1] and line.split()[0] in ("policy", "dataset", "sft", "eval")]
    assert [r[0] for r in rows] == ["policy", "dataset", "sft", "eval"]
    assert all("reused" in r and "ran" not in r for r in rows)
    assert "deploying the model roles" not in text
    assert jobs["requests_after_rerun"] == jobs["requests_before_rerun"]  # no model query


def test_teams_rl_series_reach_prometheus(jobs):
    series = jobs["series"]
    for name in ("ray_teams_rl_llm_requests_total", "ray_teams_rl_queries_total",
                 "ray_teams_rl_dataset_pairs_total", "ray_teams_rl_sft_loss",
                 "ray_teams_rl_pipeline_stage_running", "ray_teams_rl_pipeline_stage_wall_s",
                 "ray_teams_rl_eval_accuracy"):
        assert name in series, sorted(series)
    assert any(s.startswith("ray_teams_rl_policy_") for s in series), sorted(series)
    assert sum(jobs["requests_before_rerun"].values()) > 0


def test_gpu_replicas_run_on_the_fake_gpu_node_until_released(jobs, local_cluster):
    gpu_nodes = {n["id"] for n in local_cluster.nodes() if n["gpus"] > 0}
    asking = [r for r in jobs["replicas_in_stage_2"] if r["gpus"] > 0]
    assert asking, jobs["replicas_in_stage_2"]
    assert all(r["node"] in gpu_nodes for r in asking), (asking, gpu_nodes)
    # the resumed job released them before SFT, so lm-eval could take the one GPU
    assert "no stage left needs the model roles; released their replicas" in \
        jobs["resumed_logs"]
    assert not [r for r in jobs["replicas_after"] if r["gpus"] > 0], jobs["replicas_after"]


def test_a_gpu_count_the_cluster_never_has_fails_with_a_message(jobs, local_cluster):
    cluster = local_cluster
    base = [arg for o in jobs["overrides"] for arg in ("--set", o)]
    for extra, expected in (
        ("serve.num_gpus=2", r"asks for 2 GPU on one node \(serve.num_gpus\).*largest node "
                             r"of this Ray cluster has 1"),
        ("sft.use_gpu=true", r"SFT .*asks for 2 x 1 = 2 GPUs at once .*cluster has 1"),
    ):
        started = time.monotonic()
        proc = cluster.run(
            "teams-rl", "pipeline", "--config", "configs/demo.yaml", "--address",
            cluster.address, *base, "--set", "run.name=too-many-gpus", "--set", extra,
            *(("--set", "sft.num_workers=2") if extra.startswith("sft") else ()),
            check=False, timeout=180)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(expected, proc.stderr), proc.stderr[-3000:]
        assert time.monotonic() - started < 120


def test_a_missing_token_is_named(local_cluster, tmp_path):
    cluster = local_cluster
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    without = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    for mode, expected in (("token", "no authentication token was found"),
                           (None, "check the token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")):
        env = {**without, "HOME": str(home)}
        env.pop("RAY_AUTH_MODE")
        if mode:
            env["RAY_AUTH_MODE"] = mode
        started = time.monotonic()
        proc = cluster.run("teams-rl", "train-policy", "--config", "configs/demo.yaml",
                           "--address", cluster.address, env=env, check=False, timeout=120)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert expected in proc.stderr, proc.stderr[-3000:]
        assert time.monotonic() - started < 90
