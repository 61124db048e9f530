"""Stage 4, the comparison report: several runs side by side, one table per paper claim.

    teams-rl evaluate --config configs/demo.yaml --compare runs/wizardlm

or from Python::

    evaluate_run(Path("runs/demo"), cfg.eval)            # lm-eval + MIA -> runs/demo/eval/
    build_report([Path("runs/demo"), Path("runs/wizardlm")], Path("runs/demo/eval"))

Claims (TeaMs-RL, arXiv 2403.08694) and where the report answers them:

- the RL policy learns (stage 1 curves)             -> ``policy_training``, policy_training.png
- far fewer expert queries than WizardLM            -> ``queries``, query_accounting.png
- better instructions (info gain, diversity)        -> ``quality``, quality.png
- comparable or better ARC / HellaSwag after SFT    -> ``benchmarks``, benchmarks.png
- better privacy (lower membership-inference AUC)   -> ``privacy``, mia_roc.png

Inputs per run directory (a missing one raises :class:`StageOutputMissing` naming the
run, the stage and the file): ``policy/metrics.jsonl`` (runs whose strategy is
``policy``), ``dataset/`` parquet + ``manifest.json``, ``eval/lm_eval.json`` and
``eval/mia.json`` (written by :func:`evaluate_run`, which needs ``sft/final``).
Outputs in ``out_dir``: ``report.json``, ``report.md`` and the PNGs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rl_system.config import EvalConfig, TeamsRLConfig
from rl_system.progress import Progress
from serve.errors import TeamsRLError

LM_EVAL_FILE = "lm_eval.json"
MIA_FILE = "mia.json"
PLOT_TITLES = {
    "policy_training": "Policy training (stage 1)",
    "query_accounting": "Expert queries by strategy",
    "quality": "Dataset quality",
    "mia_roc": "Membership inference ROC",
    "benchmarks": "Benchmark accuracy after SFT",
}
# stage -> (file under the run directory, the command that writes it)
STAGE_FILES = {
    "policy": ("policy/metrics.jsonl", "teams-rl train-policy"),
    "dataset": ("dataset/data/*.parquet", "teams-rl build-dataset"),
    "sft": ("sft/final/config.json", "teams-rl sft"),
    "benchmarks": (f"eval/{LM_EVAL_FILE}", "teams-rl evaluate"),
    "privacy": (f"eval/{MIA_FILE}", "teams-rl evaluate"),
}


class StageOutputMissing(TeamsRLError, FileNotFoundError):
    """A run directory lacks a stage's output; the message names run, stage, file, fix."""

    def __init__(self, run_dir: Path, stage: str, path: Path, fix: str):
        self.run_dir, self.stage, self.path = run_dir, stage, path
        super().__init__(
            f"run '{run_dir.name}' ({run_dir}): stage '{stage}' output {path} is missing; "
            f"produce it with `{fix}` for that run"
        )


def require(run_dir: Path, stage: str) -> Path:
    """The stage's output path in ``run_dir`` (a directory for ``dataset``) or raise."""
    rel, fix = STAGE_FILES[stage]
    if stage == "dataset":
        from train.quality import dataset_files

        dataset = run_dir / "dataset"
        if not dataset.is_dir() or not dataset_files(dataset):
            raise StageOutputMissing(run_dir, stage, run_dir / rel, fix)
        return dataset
    path = run_dir / rel
    if not path.exists():
        raise StageOutputMissing(run_dir, stage, path, fix)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (crash while appending) is skipped."""
    from rl_system.rundir import read_jsonl as read

    return read(path)


# Which eval keys decide each output; the rest (num_gpus, batch_size, timeout_s, offline,
# compare) change how it runs, not what it measures.
LM_EVAL_KEYS = ("tasks", "num_fewshot", "limit", "include_paths", "model_backend", "device")


def _mia_keys(cfg: EvalConfig) -> tuple[str, ...]:
    return (*(k for k in type(cfg).model_fields if k.startswith("mia_")), "device")


def trained_model_fingerprint(run_dir: Path) -> str | None:
    """The SFT fingerprint that ``run_dir/sft/final`` was trained with (its marker)."""
    from rl_system.rundir import read_json
    from train.recipe import FINAL_MARKER

    marker = read_json(run_dir / "sft" / "final" / FINAL_MARKER)
    return marker.get("plan_key") if isinstance(marker, dict) else None


def part_fingerprints(run_dir: Path, cfg: EvalConfig) -> dict[str, str]:
    """Per evaluation output of one run: its config keys + the model it scored."""
    from rl_system.rundir import fingerprint

    data = cfg.model_dump(mode="json")
    model = {"sft": trained_model_fingerprint(run_dir)}
    return {LM_EVAL_FILE: fingerprint({k: data[k] for k in LM_EVAL_KEYS}, model),
            MIA_FILE: fingerprint({k: data[k] for k in _mia_keys(cfg)}, model)}


# ---------------------------------------------------------------------------------------
# Per-run evaluation (the model side: lm-eval and MIA)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.is_dir() or path.suffix == ".parquet":
        from train.quality import load_rows

        if path.is_dir():
            return load_rows(path)
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return read_jsonl(path)


def mia_items(records: list[dict[str, Any]]) -> list[Any]:
    """Records the attack scores: SFT records as they are (``train.privacy`` tokenizes them
    through SFT's own ``tokenize_example``), else their plain ``text``."""
    items: list[Any] = []
    for r in records:
        if r.get("instruction") is not None and r.get("response") is not None:
            items.append(r)
        elif r.get("text"):
            items.append(str(r["text"]))
    return items


def evaluate_run(
    run_dir: Path,
    cfg: EvalConfig,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """lm-eval and membership inference on ``run_dir/sft/final``; outputs in ``eval/``.

    An output is kept (unless ``force``) when it parses and carries the fingerprint of its
    config keys and of the model it scored (the SFT marker's): a re-trained model or a
    changed key redoes it. With ``eval.num_gpus`` > 0 both parts run in one Ray task holding
    the GPU, lm-eval in its own child process inside it. MIA members are a sample of the
    records SFT trained on (the run's dataset minus SFT's held-out split); non-members are
    ``eval.mia_non_members`` when set, else that held-out split (``sft/heldout.parquet``,
    written when ``sft.eval_fraction`` > 0). With neither, ``mia.json`` says why it was
    skipped.
    Returns ``{"lm_eval": ..., "mia": ..., "timings_s": {...}}``.
    """
    from rl_system.rundir import read_json, write_json

    model_dir = require(run_dir, "sft").parent
    require(run_dir, "dataset")
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    wanted = part_fingerprints(run_dir, cfg)
    outputs = {name: read_json(eval_dir / name) for name in wanted}
    # An output is reused only if it parses and was made from this model with these keys.
    pending = [name for name, fp in wanted.items() if force or not isinstance(
        outputs[name], dict) or outputs[name].get("fingerprint") != fp]
    timings: dict[str, float] = {}
    if pending:
        log(f"evaluate {run_dir.name}: {', '.join(pending)} on {model_dir}"
            + (f" (a Ray task holding {cfg.num_gpus:g} GPU)" if cfg.num_gpus > 0 else ""))
        args = (str(run_dir.resolve()), cfg.model_dump(mode="json"), pending)
        # lm-eval runs minutes without a word: the heartbeat says it is alive.
        with Progress(f"evaluate {run_dir.name}", total=len(pending), unit="parts",
                      log=log) as progress:
            if cfg.num_gpus > 0:
                import ray

                # One task owns the GPU for both lm-eval (its own child process inside the
                # task) and membership inference: the driver never loads the model.
                task = ray.remote(num_gpus=cfg.num_gpus, num_cpus=1)(_evaluate_parts)
                produced = ray.get(task.remote(*args))
            else:
                produced = _evaluate_parts(*args, log=progress.note)
            progress.update(len(produced))
        for name, result in produced.items():
            result["fingerprint"] = wanted[name]
            write_json(eval_dir / name, result)
            outputs[name] = result
            timings[name.removesuffix(".json")] = result.get("elapsed_s")
    return {"lm_eval": outputs[LM_EVAL_FILE], "mia": outputs[MIA_FILE], "timings_s": timings}


def _evaluate_parts(run_dir: str, cfg_data: dict[str, Any], parts: list[str], *,
                    log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """lm-eval and/or MIA on ``run_dir``'s SFT model; in the driver or in one GPU task."""
    from train.evaluate import run_lm_eval

    run = Path(run_dir)
    # Inside the GPU task already: lm-eval must not ask for another GPU task.
    cfg = EvalConfig.model_validate({**cfg_data, "num_gpus": 0})
    model_dir = run / "sft" / "final"
    out: dict[str, dict[str, Any]] = {}
    if LM_EVAL_FILE in parts:
        log(f"evaluate {run.name}: lm-eval {', '.join(cfg.tasks)} on {model_dir}")
        out[LM_EVAL_FILE] = run_lm_eval(model_dir, cfg)
    if MIA_FILE in parts:
        started = time.monotonic()
        mia = _membership_inference(run, model_dir, run / "dataset", cfg, log=log)
        mia["elapsed_s"] = round(time.monotonic() - started, 2)
        out[MIA_FILE] = mia
    for result in out.values():
        result["evaluated_by_pid"] = os.getpid()  # provenance: driver or the GPU task
    return out


def _record_key(record: dict[str, Any]) -> Any:
    return record.get("id") or (record.get("instruction"), record.get("response"))


def _membership_inference(run_dir: Path, model_dir: Path, dataset_dir: Path, cfg: EvalConfig,
                          *, log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np

    from train.privacy import run_mia
    from train.quality import load_rows
    from train.sft import HELDOUT_FILE

    heldout_path = run_dir / "sft" / HELDOUT_FILE
    heldout = _read_records(heldout_path) if heldout_path.exists() else []
    if cfg.mia_non_members is not None:
        non_members, source = _read_records(Path(cfg.mia_non_members)), cfg.mia_non_members
    else:
        non_members, source = heldout, str(heldout_path)
    if len(non_members) < 2:
        return {"skipped": f"fewer than 2 non-member records ({source}); set sft.eval_fraction "
                           "> 0 before SFT, or eval.mia_non_members to held-out records of "
                           "the training distribution"}
    # Members are what SFT trained on: the held-out split never was.
    # Members are never from a held-out seed either: SFT holds out whole seeds.
    heldout_keys = {_record_key(r) for r in heldout}
    heldout_seeds = {r["seed_id"] for r in heldout if r.get("seed_id")}
    members = [r for r in load_rows(dataset_dir)
               if _record_key(r) not in heldout_keys and r.get("seed_id") not in heldout_seeds]
    n = min(cfg.mia_samples, len(members), len(non_members))
    if n < 2:
        return {"skipped": f"fewer than 2 training records left as members in {dataset_dir}"}
    rng = np.random.default_rng(0)
    members = [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]
    non_members = [non_members[i] for i in sorted(rng.choice(len(non_members), n,
                                                              replace=False))]
    log(f"evaluate {run_dir.name}: membership inference, {n} members vs {n} non-members "
        f"from {source}")
    mia = run_mia(model_dir, mia_items(members), mia_items(non_members),
                  min_k=cfg.mia_min_k, max_tokens=cfg.mia_max_tokens, device=cfg.device)
    return {**mia, "non_members_from": source,
            # Which records were scored, so a reader can audit the member/non-member split.
            "member_ids": [r.get("id") for r in members],
            "non_member_ids": [r.get("id") for r in non_members]}


# ---------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no pyplot global state, no display)


def _figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig, out_dir: Path, key: str) -> dict[str, str]:
    title = PLOT_TITLES[key]
    fig.suptitle(title)
    path = out_dir / f"{key}.png"
    fig.savefig(path, dpi=80)
    return {"file": path.name, "title": title}


def plot_policy_training(curves: dict[str, list[dict]], out_dir: Path) -> dict[str, str]:
    fig, axes = _figure(3, width=4.5)
    for run, rows in curves.items():
        it = [r["iteration"] for r in rows]
        for ax, key in zip(axes, ("episode_return_mean", "info_gain", "queries_per_episode"),
                           strict=True):
            ax.plot(it, [r.get(key) if r.get(key) is not None else float("nan") for r in rows],
                    marker="o", label=run)
            ax.set_xlabel("iteration")
            ax.set_title(key)
    axes[0].legend()
    return _save(fig, out_dir, "policy_training")


def plot_query_accounting(queries: dict[str, dict], out_dir: Path) -> dict[str, str]:
    fig, axes = _figure(2, width=4.5)
    runs = list(queries)
    labels = [f"{r}\n({queries[r]['strategy']})" for r in runs]
    axes[0].bar(labels, [queries[r]["expert_queries_total"] or 0 for r in runs])
    axes[0].set_title("expert queries (paid + cached)")
    axes[1].bar(labels, [queries[r]["expert_queries_per_pair"] or 0 for r in runs])
    axes[1].set_title("expert queries per pair")
    return _save(fig, out_dir, "query_accounting")


def plot_quality(quality: dict[str, dict], out_dir: Path) -> dict[str, str]:
    fig, axes = _figure(2, width=4.5)
    for run, q in quality.items():
        for ax, key in zip(axes, ("info_gain", "instruction_words"), strict=True):
            hist = q[key]["histogram"]
            if hist["counts"]:
                ax.stairs(hist["counts"], hist["edges"], label=run)
            ax.set_title(f"{key} (histogram)")
    axes[0].legend()
    return _save(fig, out_dir, "quality")


def plot_mia_roc(privacy: dict[str, dict], out_dir: Path) -> dict[str, str]:
    fig, axes = _figure(1)
    ax = axes[0]
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    for run, mia in privacy.items():
        for name, res in (mia.get("attacks") or {}).items():
            ax.plot(res["roc"]["fpr"], res["roc"]["tpr"],
                    label=f"{run} {name} (AUC {res['auc']:.2f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "mia_roc")


def plot_benchmarks(benchmarks: dict[str, dict], out_dir: Path) -> dict[str, str]:
    import numpy as np

    fig, axes = _figure(1)
    ax = axes[0]
    tasks = sorted({t for b in benchmarks.values() for t in b})
    width = 0.8 / max(1, len(benchmarks))
    for n, (run, b) in enumerate(benchmarks.items()):
        ax.bar(np.arange(len(tasks)) + n * width,
               [b.get(t, {}).get("acc", 0.0) for t in tasks], width, label=run)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(benchmarks) - 1) / 2, tasks)
    ax.set_ylabel("accuracy")
    ax.legend()
    return _save(fig, out_dir, "benchmarks")


# ---------------------------------------------------------------------------------------
# The report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: one side-by-side table per claim, each followed by its plot."""
    runs = list(report["runs"])
    out = ["# TeaMs-RL evaluation report", "",
           "Runs: " + ", ".join(f"`{r}` ({report['runs'][r]['strategy']})" for r in runs), ""]

    def plot(key: str) -> str:
        p = report["plots"].get(key)
        return f"![{p['title']}]({p['file']})\n" if p else ""

    out += ["## Policy training (stage 1)", ""]
    pt = report["policy_training"]
    keys = ["iterations", "episode_return_first", "episode_return_last", "info_gain_last",
            "queries_per_episode_last", "dominant_action_last", "dominant_action_share_last",
            "action_share_alerts", "env_steps"]
    out += [_table(["metric", *runs], [[k, *[pt[r].get(k) if pt[r] else None for r in runs]]
                                       for k in keys]), "", plot("policy_training")]

    out += ["## Expert queries (claim: far fewer than WizardLM)", ""]
    q = report["queries"]
    keys = ["strategy", "pairs", "expert_queries_paid", "expert_queries_cached",
            "expert_queries_total", "expert_queries_per_pair", "relative_to_baseline"]
    out += [_table(["metric", *runs], [[k, *[q[r].get(k) for r in runs]] for k in keys]), "",
            plot("query_accounting")]

    out += ["## Dataset quality", ""]
    ql = report["quality"]
    rows = [
        ["pairs", *[ql[r]["pairs"] for r in runs]],
        ["info_gain mean", *[ql[r]["info_gain"]["mean"] for r in runs]],
        ["info_gain_raw mean", *[ql[r]["info_gain_raw"]["mean"] for r in runs]],
        ["instruction words mean", *[ql[r]["instruction_words"]["mean"] for r in runs]],
        ["distinct-1", *[ql[r]["lexical"]["distinct_1"] for r in runs]],
        ["distinct-2", *[ql[r]["lexical"]["distinct_2"] for r in runs]],
        ["embedding dispersion", *[ql[r]["embedding"]["dispersion"] for r in runs]],
        ["eliminated (all rules)", *[ql[r]["elimination"]["total"] for r in runs]],
    ]
    out += [_table(["metric", *runs], rows), "", plot("quality")]

    out += ["## Benchmarks after SFT (lm-eval accuracy)", ""]
    b = report["benchmarks"]
    tasks = sorted({t for r in runs for t in b[r]})
    out += [_table(["task", *runs], [[t, *[b[r].get(t, {}).get("acc") for r in runs]]
                                     for t in tasks]), "", plot("benchmarks")]

    out += ["## Privacy: membership inference (lower AUC = less leakage)", ""]
    p = report["privacy"]
    attacks = sorted({a for r in runs for a in (p[r].get("attacks") or {})})
    rows = []
    for a in attacks:
        rows.append([f"{a} AUC", *[(p[r].get("attacks") or {}).get(a, {}).get("auc")
                                   for r in runs]])
        rows.append([f"{a} TPR@1%FPR", *[(p[r].get("attacks") or {}).get(a, {})
                                         .get("tpr_at_1pct_fpr") for r in runs]])
    rows.append(["members / non-members scored",
                 *[f"{p[r].get('n_members', 0)} / {p[r].get('n_non_members', 0)}" for r in runs]])
    skipped = [f"- `{r}`: skipped — {p[r]['skipped']}" for r in runs if p[r].get("skipped")]
    out += [_table(["attack", *runs], rows), "", *skipped, "", plot("mia_roc")]

    out += ["## Where the evaluation time went (wall seconds)", ""]
    t = report["eval_timings_s"]
    out += [_table(["part", *runs], [[k, *[t[r].get(k) for r in runs]]
                                     for k in ("lm_eval", "mia")]), ""]
    out += ["Report (all runs): " + ", ".join(f"{k} {v:.1f} s"
                                                for k, v in report["timings_s"].items()), ""]
    return "\n".join(out) + "\n"


def _policy_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def last(key: str) -> Any:
        return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)

    return {
        "iterations": len(rows),
        "episode_return_first": rows[0].get("episode_return_mean") if rows else None,
        "episode_return_last": last("episode_return_mean"),
        "info_gain_last": last("info_gain"),
        "diversity_last": last("diversity"),
        "elimination_rate_last": last("elimination_rate"),
        "queries_per_episode_last": last("queries_per_episode"),
        "dominant_action_last": last("dominant_action"),
        "dominant_action_share_last": last("dominant_action_share"),
        "action_share_alerts": sum(bool(r.get("action_share_alert")) for r in rows),
        "env_steps": last("env_steps"),
        "time_s": sum(float(r.get("time_s") or 0.0) for r in rows),
    }


def build_report(
    run_dirs: list[Path],
    out_dir: Path,
    *,
    encoder: Any = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Read every run's stage outputs, write ``report.json``, ``report.md`` and PNGs.

    ``baseline``: run name the query ratio is relative to (default: the first run whose
    strategy is ``wizardlm``, else none). ``encoder``: text encoder for the quality
    dispersion (default MiniLM). Raises :class:`StageOutputMissing` before writing
    anything when a run lacks an input. Returns the report dict.
    """
    from train.quality import dataset_quality, read_manifest

    started = time.monotonic()
    run_dirs = [Path(r) for r in run_dirs]
    names = [r.name for r in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"run directory names must differ (they label the columns): {names}")
    # Check every input of every run first, so a missing file fails fast and alone.
    strategies, inputs = {}, {}
    for run in run_dirs:
        dataset = require(run, "dataset")
        manifest = read_manifest(dataset) or {}
        strategy = manifest.get("strategy")
        if strategy is None:
            from train.quality import load_rows

            rows = load_rows(dataset)
            strategy = rows[0].get("strategy") if rows else "unknown"
        strategies[run.name] = strategy
        inputs[run.name] = {
            "policy": require(run, "policy") if strategy == "policy" else None,
            "dataset": dataset,
            "benchmarks": require(run, "benchmarks"),
            "privacy": require(run, "privacy"),
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.monotonic()
    curves = {n: read_jsonl(i["policy"]) for n, i in inputs.items() if i["policy"]}
    policy = {n: (_policy_summary(curves[n]) if n in curves else None) for n in names}
    t, timings["policy"] = time.monotonic(), round(time.monotonic() - t, 3)
    quality = {n: dataset_quality(inputs[n]["dataset"], encoder=encoder) for n in names}
    t, timings["quality"] = time.monotonic(), round(time.monotonic() - t, 3)

    if baseline is None:
        baseline = next((n for n in names if strategies[n] == "wizardlm"), None)
    queries = {}
    for n in names:
        qa = dict(quality[n]["queries"], pairs=quality[n]["pairs"])
        queries[n] = qa
    base_total = queries[baseline]["expert_queries_total"] if baseline in queries else None
    for n in names:
        total = queries[n]["expert_queries_total"]
        queries[n]["relative_to_baseline"] = (total / base_total) if base_total else None
    benchmarks_raw = {n: json.loads(inputs[n]["benchmarks"].read_text()) for n in names}
    benchmarks = {n: benchmarks_raw[n].get("tasks", {}) for n in names}
    privacy = {n: json.loads(inputs[n]["privacy"].read_text()) for n in names}

    plots = {}
    if curves:
        plots["policy_training"] = plot_policy_training(curves, out_dir)
    plots["query_accounting"] = plot_query_accounting(queries, out_dir)
    plots["quality"] = plot_quality(quality, out_dir)
    if any(p.get("attacks") for p in privacy.values()):
        plots["mia_roc"] = plot_mia_roc(privacy, out_dir)
    if any(benchmarks.values()):
        plots["benchmarks"] = plot_benchmarks(benchmarks, out_dir)
    timings["plots"] = round(time.monotonic() - t, 3)

    report = {
        "runs": {n: {"dir": str(r), "strategy": strategies[n]} for n, r in zip(names, run_dirs,
                                                                                 strict=True)},
        "baseline": baseline,
        "policy_training": policy,
        "policy_curves": curves,
        "queries": queries,
        "quality": quality,
        "benchmarks": benchmarks,
        "privacy": privacy,
        "plots": plots,
        # lm-eval and MIA each record their wall time in their own output file.
        "eval_timings_s": {n: {"lm_eval": benchmarks_raw[n].get("elapsed_s"),
                               "mia": privacy[n].get("elapsed_s")} for n in names},
        "timings_s": {**timings, "total": round(time.monotonic() - started, 3)},
    }
    from rl_system.rundir import write_json

    write_json(out_dir / "report.json", report)
    tmp = out_dir / f".report.md.{os.getpid()}.tmp"
    tmp.write_text(render_markdown(report))
    os.replace(tmp, out_dir / "report.md")
    return report


def evaluate_and_report(
    cfg: TeamsRLConfig,
    *,
    compare: tuple[str | Path, ...] = (),
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Stage 4 for one config: evaluate this run and every compared run, then report.

    Used by ``teams-rl evaluate`` and the pipeline; the report goes to this run's
    ``eval/`` directory.
    """
    from rl_system.rundir import COMPLETE, run_lock, write_manifest

    with run_lock(cfg.run_dir, what="teams-rl evaluate"):
        runs = _report_runs(cfg, compare)
        for run in runs:
            evaluate_run(run, cfg.eval, force=force, log=log)
        eval_dir = cfg.stage_dir("eval").resolve()
        report = build_report(runs, eval_dir)
        # Written last: a kill before this line leaves the stage not done, so it is redone.
        write_manifest(eval_dir, stage="eval", fingerprint=eval_fingerprint(cfg, compare),
                       status=COMPLETE, inputs=_eval_inputs(runs), files=["report.json"])
    log(f"report: {cfg.stage_dir('eval') / 'report.md'} ({len(report['plots'])} plots)")
    _record_metrics(report)
    return report


def _report_runs(cfg: TeamsRLConfig, compare: tuple[str | Path, ...] = ()) -> list[Path]:
    return [cfg.run_dir.resolve(), *(Path(c).resolve() for c in (*cfg.eval.compare, *compare))]


def _eval_inputs(runs: list[Path]) -> dict[str, str | None]:
    return {f"sft:{run}": trained_model_fingerprint(run) for run in runs}


def eval_fingerprint(cfg: TeamsRLConfig, compare: tuple[str | Path, ...] = ()) -> str:
    """Stage 4's fingerprint: the keys that decide its outputs, this config's SFT
    fingerprint (so a re-trained model is a changed input) and each compared run's model."""
    from rl_system.rundir import fingerprint
    from train.sft import sft_fingerprint

    data = cfg.eval.model_dump(mode="json")
    section = {k: data[k] for k in (*LM_EVAL_KEYS, *_mia_keys(cfg.eval))}
    runs = _report_runs(cfg, compare)
    return fingerprint(section, {"sft": sft_fingerprint(cfg), **_eval_inputs(runs[1:])})


def _record_metrics(report: dict[str, Any]) -> None:
    """The report's headline numbers as gauges, for the dashboard (inside Ray only)."""
    from rl_system.metrics import maybe_pipeline_metrics

    metrics = maybe_pipeline_metrics()
    if metrics is None:
        return
    for run, tasks in report["benchmarks"].items():
        for task, scores in tasks.items():
            if scores.get("acc") is not None:
                metrics.eval_accuracy.set(scores["acc"], tags={"run": run, "task": task})
    for run, privacy in report["privacy"].items():
        for attack, result in (privacy.get("attacks") or {}).items():
            metrics.mia_auc.set(result["auc"], tags={"run": run, "attack": attack})


def report_is_done(cfg: TeamsRLConfig) -> bool:
    """Whether stage 4 finished for this config and this SFT model, and its report reads
    (a report torn by a kill is redone, never crashed on)."""
    from rl_system.rundir import is_done, read_json

    eval_dir = cfg.stage_dir("eval").resolve()
    return (is_done(eval_dir, eval_fingerprint(cfg))
            and isinstance(read_json(eval_dir / "report.json"), dict))
