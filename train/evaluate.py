"""Stage 4, benchmarks: lm-evaluation-harness on a Hugging Face model directory.

    teams-rl evaluate --config configs/demo.yaml       # runs this, then the report

or directly::

    result = run_lm_eval("runs/demo/sft/final", cfg.eval, out_path=Path("lm_eval.json"))
    result["tasks"]["arc_easy"]["acc"]

lm-eval always runs in its own process (DESIGN §6: its vLLM backend may call
``ray.shutdown()``): a subprocess of ``python -m train.evaluate``, itself inside a Ray task
holding ``eval.num_gpus`` GPUs when that is positive. The default tasks are ARC-Easy,
ARC-Challenge and HellaSwag (what the paper reports); any lm-eval task name works, and
``eval.include_paths`` adds task YAMLs of our own. A task that reads local files
(``dataset_path: json`` + ``dataset_kwargs.data_files``) runs air-gapped; relative
``data_files`` are resolved against the YAML's folder (then the repository root), so the
shipped ``data/eval/teams_rl_mc.yaml`` works from any working directory.

lm-eval is optional: ``pip install 'teams-rl[eval]'``. On the embedded SmolLM2-135M on
2 shared CPU cores, the 24-question local task takes about 15-30 s including start-up.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from rl_system.config import EvalConfig
from serve.errors import MissingExtra, TeamsRLError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRA_HINT = "pip install 'teams-rl[eval]'"
TASK_NOT_FOUND_EXIT = 3
# Metrics copied from lm-eval's results per task; the rest stays in the raw file.
METRICS = ("acc", "acc_norm", "exact_match", "f1", "mc1", "mc2", "perplexity")


class TaskNotFoundError(TeamsRLError, ValueError):
    """An ``eval.tasks`` name is not an lm-eval task; the message gives close matches."""


class LmEvalError(TeamsRLError):
    """lm-eval failed or timed out; the message carries the tail of its output."""


def require_lm_eval() -> Any:
    """Import lm_eval or raise ``MissingExtra`` naming the extra to install."""
    try:
        import lm_eval
    except ImportError as exc:
        raise MissingExtra(
            f"evaluation needs lm-evaluation-harness: {EXTRA_HINT} (or pip install "
            f"'lm-eval>=0.4.5'); import failed with: {exc}"
        ) from exc
    return lm_eval


# ---------------------------------------------------------------------------------------
# Pure helpers


def _resolve_data_files(value: Any, *, base: Path) -> Any:
    """Relative data_files entries -> absolute, against the YAML folder then the repo root."""
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, base=base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_data_files(v, base=base) for v in value]
    if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
        for root in (base, REPO_ROOT, Path.cwd()):
            if (root / value).exists():
                return str((root / value).resolve())
        for root in (base, REPO_ROOT):  # glob patterns are not files; prefer the YAML folder
            if any(root.glob(value)):
                return str(root / value)
    return value


def stage_include_paths(paths: list[str], staging: Path) -> list[str]:
    """Copy task folders to ``staging`` with local ``data_files`` made absolute.

    lm-eval hands ``data_files`` to ``datasets.load_dataset`` as is, which resolves them
    against the process's working directory; resolving here makes a task folder portable.
    YAML files that plain ``yaml.safe_load`` cannot read (``!function`` tags) are copied
    verbatim with their neighbours. Missing folders are skipped.
    """
    staged = []
    for n, path in enumerate(paths):
        src = Path(path)
        if not src.is_absolute() and not src.exists() and (REPO_ROOT / src).exists():
            src = REPO_ROOT / src
        if not src.is_dir():
            continue
        dst = staging / f"include_{n}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.jsonl", "*.parquet"))
        for yml in dst.rglob("*.yaml"):
            try:
                doc = yaml.safe_load(yml.read_text())
            except yaml.YAMLError:
                continue
            files = (doc or {}).get("dataset_kwargs", {}) if isinstance(doc, dict) else {}
            if isinstance(files, dict) and "data_files" in files:
                base = src / yml.parent.relative_to(dst)
                files["data_files"] = _resolve_data_files(files["data_files"], base=base)
                yml.write_text(yaml.safe_dump(doc, sort_keys=False))
        staged.append(str(dst))
    return staged


def summarize_results(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` -> ``{task: {metric: value, metric_stderr: value, n: docs}}``.

    lm-eval keys metrics as ``"acc,none"`` (metric, filter); the ``none`` filter (or the
    first one) is kept.
    """
    out: dict[str, dict[str, float]] = {}
    n_samples = raw.get("n-samples", {})
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            base = name.removesuffix("_stderr")
            if base not in METRICS or not isinstance(value, int | float):
                continue
            row.setdefault(name, float(value))
        if task in n_samples:
            row["n"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        out[task] = row
    return out


def task_not_found_message(missing: dict[str, list[str]]) -> str:
    parts = []
    for task, close in missing.items():
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        parts.append(f"'{task}' ({hint})")
    return (
        f"unknown lm-eval task {'; '.join(parts)}. List every task with `lm-eval ls tasks` "
        "(add `--include_path DIR` for your own YAMLs), or put a task YAML folder in "
        "eval.include_paths (see data/eval/teams_rl_mc.yaml)"
    )


def task_manager(include_paths: list[str], tasks: list[str]):
    """lm-eval's task index for ``tasks``: our include paths alone when they hold every
    task (indexing lm-eval's own ~15,000 tasks took 60 s of a 2-core CPU, ours 0.2 s),
    else the full index with them added."""
    import lm_eval.tasks

    if include_paths:
        ours = lm_eval.tasks.TaskManager(include_path=include_paths, include_defaults=False)
        if all(ours.match_tasks([t]) for t in tasks):
            return ours
    return lm_eval.tasks.TaskManager(include_path=include_paths or None)


def lm_eval_command(
    model_dir: str | Path, cfg: EvalConfig, *, include_paths: list[str], out_path: Path
) -> list[str]:
    """The child process's command line (``python -m train.evaluate ...``)."""
    cmd = [
        sys.executable, "-m", "train.evaluate",
        "--model-dir", str(Path(model_dir).resolve()),
        "--backend", cfg.model_backend,
        "--tasks", ",".join(cfg.tasks),
        "--num-fewshot", str(cfg.num_fewshot),
        "--batch-size", str(cfg.batch_size),
        "--device", cfg.device,
        "--out", str(out_path),
    ]
    if cfg.limit is not None:
        cmd += ["--limit", str(cfg.limit)]
    for path in include_paths:
        cmd += ["--include-path", path]
    return cmd


# ---------------------------------------------------------------------------------------
# Parent side


def _execute(model_dir: str, cfg_data: dict[str, Any]) -> dict[str, Any]:
    """Stage tasks, run the child, return its JSON. Runs in the driver or in a Ray task."""
    cfg = EvalConfig.model_validate(cfg_data)
    env = dict(os.environ)
    # The child imports this package by module name, from wherever it runs.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="teams-rl-lm-eval-") as tmp:
        staging = Path(tmp)
        include = stage_include_paths(cfg.include_paths, staging)
        out_path = staging / "result.json"
        cmd = lm_eval_command(model_dir, cfg, include_paths=include, out_path=out_path)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=cfg.timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""
            raise LmEvalError(
                f"lm-eval on {model_dir} exceeded eval.timeout_s={cfg.timeout_s:g} s; raise it "
                f"or set eval.limit. Output tail:\n{tail}"
            ) from None
        result = json.loads(out_path.read_text()) if out_path.exists() else None
        if proc.returncode == TASK_NOT_FOUND_EXIT and result and "missing" in result:
            raise TaskNotFoundError(task_not_found_message(result["missing"]))
        if proc.returncode != 0 or result is None:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise LmEvalError(
                f"lm-eval on {model_dir} failed (exit {proc.returncode}); output tail:\n{tail}"
            )
        result["elapsed_s"] = round(time.monotonic() - started, 2)
        return result


def run_lm_eval(
    model_dir: str | Path, cfg: EvalConfig, *, out_path: Path | None = None
) -> dict[str, Any]:
    """Benchmark ``model_dir`` on ``cfg.tasks`` in a separate process; return the summary.

    The summary: ``{"model_dir", "tasks": {task: {"acc", "acc_stderr", "acc_norm", ...,
    "n"}}, "num_fewshot", "limit", "lm_eval_version", "elapsed_s" (wall seconds, start-up
    included), "raw_results"}``; written to ``out_path`` when given. Raises
    :class:`TaskNotFoundError` for an unknown task and :class:`LmEvalError` otherwise.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model directory (no config.json); "
            "run `teams-rl sft` first or pass the model directory"
        )
    cfg_data = cfg.model_dump(mode="json")
    if cfg.num_gpus > 0:
        import ray

        # A Ray task owns the GPU; lm-eval still runs in its own child process inside it.
        task = ray.remote(num_gpus=cfg.num_gpus, num_cpus=1)(_execute)
        result = ray.get(task.remote(str(model_dir.resolve()), cfg_data))
    else:
        result = _execute(str(model_dir.resolve()), cfg_data)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------
# Child side: ``python -m train.evaluate``


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run lm-eval once; write a JSON summary.")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--backend", default="hf")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--include-path", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    tasks = [t for t in args.tasks.split(",") if t]

    lm_eval = require_lm_eval()
    manager = task_manager(args.include_path, tasks)
    missing = {
        t: difflib.get_close_matches(t, manager.all_tasks, n=5, cutoff=0.6)
        for t in tasks
        if not manager.match_tasks([t])
    }
    if missing:
        out.write_text(json.dumps({"missing": missing}))
        print(task_not_found_message(missing), file=sys.stderr)
        return TASK_NOT_FOUND_EXIT

    model_args = f"pretrained={args.model_dir}"
    if args.backend == "hf":
        from serve.devices import resolve_dtype

        model_args += f",dtype={resolve_dtype('auto', args.device)}"
    raw = lm_eval.simple_evaluate(
        model=args.backend,
        model_args=model_args,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device if args.backend == "hf" else None,
        task_manager=manager,
        log_samples=False,
    )
    summary = {
        "model_dir": args.model_dir,
        "backend": args.backend,
        "tasks": summarize_results(raw),
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "raw_results": raw.get("results", {}),
    }
    out.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
