"""What stage 2 writes and reports: pair ids, dedupe, the parquet schema, the exports,
the per-seed tally, the summary table and the Ray metrics it records.

The driver removes exact and near duplicates (MiniLM cosine >=
``dataset.dedupe_threshold``) and writes, under ``runs/<name>/dataset/``:
``data/part-*.parquet`` (one row per pair, :func:`row_schema`, DESIGN §3),
``alpaca.json``, ``chat.jsonl``, ``README.md`` (a Hugging Face dataset card,
:func:`write_card`) and ``manifest.json`` (config hash, counts, query totals, the summary
table of :func:`format_summary`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rl_system.reviewer import INSTRUCTION_RULES, Review
from rl_system.rundir import write_json
from rl_system.tasks import task_text

DATA_DIR = "data"
ROWS_PER_SHARD = 5000
ROLES = ("expert", "reviewer", "instructor")
USAGE_KEYS = ("queries", "cached", "prompt_tokens", "completion_tokens", "failures")


def pair_id(*, seed_id: str, strategy: str, actions: list[str], step: int) -> str:
    """Stable: fixed by the seed and the action path, not by timing or worker."""
    blob = "\0".join([seed_id, strategy, str(step), *actions])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def dedupe(rows: list[dict], *, threshold: float, encode) -> tuple[list[dict], int, int]:
    """Keep the first of exact (normalised text) and near duplicates (cosine >= threshold).

    ``encode``: texts -> unit-norm vectors. Returns (kept, exact removed, near removed).
    """
    import numpy as np

    seen, unique = set(), []
    for r in rows:
        key = _normalise(r["instruction"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    exact = len(rows) - len(unique)
    if not unique:
        return [], exact, 0
    vectors = encode([r["instruction"] for r in unique])
    kept_idx: list[int] = []
    for i in range(len(unique)):
        if kept_idx and float(np.max(vectors[kept_idx] @ vectors[i])) >= threshold:
            continue
        kept_idx.append(i)
    return [unique[i] for i in kept_idx], exact, len(unique) - len(kept_idx)


def row_schema():
    import pyarrow as pa

    types = {"float": pa.float64(), "int": pa.int64(), "str | None": pa.string()}
    review = pa.struct([(f.name, types[str(getattr(f.type, "__name__", f.type))])
                        for f in fields(Review)])
    return pa.schema([
        ("id", pa.string()), ("seed_id", pa.string()), ("seed_instruction", pa.string()),
        ("instruction", pa.string()), ("input", pa.string()), ("response", pa.string()),
        ("actions", pa.list_(pa.string())), ("evolution_step", pa.int64()), ("review", review),
        ("expert_model", pa.string()), ("expert_queries", pa.int64()),
        ("expert_tokens", pa.int64()), ("strategy", pa.string()),
        ("policy_checkpoint", pa.string()),
    ])


def _write_outputs(out_dir: Path, rows: list[dict]) -> dict[str, Any]:
    """Parquet shards, Alpaca JSON and chat JSONL; each replaced atomically as a whole.

    All three come from the same rows: a pair's input is its row's (the seed's, or ""
    after an action that replaced the task), and the chat user turn is ``task_text`` of
    instruction and input, the prompt SFT builds (``train.data``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging = out_dir / f".{DATA_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shards = []
    # An empty build writes no shard: a 0-row parquet file is refused by datasets.load_dataset.
    for n, start in enumerate(range(0, len(rows), ROWS_PER_SHARD)):
        table = pa.Table.from_pylist(rows[start:start + ROWS_PER_SHARD], schema=row_schema())
        name = f"part-{n:05d}.parquet"
        pq.write_table(table, staging / name)
        shards.append(f"{DATA_DIR}/{name}")
    final = out_dir / DATA_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)

    alpaca = [{"instruction": r["instruction"], "input": r["input"], "output": r["response"]}
              for r in rows]
    write_json(out_dir / "alpaca.json", alpaca)
    tmp = out_dir / "chat.jsonl.tmp"
    with tmp.open("w") as f:
        for r in rows:
            user = task_text(r["instruction"], r["input"])
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": r["response"]}]})
                    + "\n")
    os.replace(tmp, out_dir / "chat.jsonl")
    return {"parquet": shards, "alpaca": "alpaca.json", "chat": "chat.jsonl"}


CARD = "README.md"
CARD_TAGS = ("teams-rl", "instruction-tuning", "synthetic")


def card_features(schema) -> list[dict[str, Any]]:
    """``dataset_info.features`` of a dataset card, in the YAML form ``datasets`` writes:
    ``{name, dtype}``, ``{name, list: <element>}``, ``{name, struct: [...]}``."""
    import pyarrow as pa

    def feature(arrow_type) -> dict[str, Any]:
        if pa.types.is_struct(arrow_type):
            return {"struct": [{"name": f.name, **feature(f.type)} for f in arrow_type]}
        if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
            element = feature(arrow_type.value_type)
            return {"list": element.get("dtype", element)}
        # Arrow calls its floats "double"/"float"/"halffloat"; datasets' dtypes say "float64".
        dtype = {pa.float64(): "float64", pa.float32(): "float32",
                 pa.float16(): "float16"}.get(arrow_type)
        return {"dtype": dtype or str(arrow_type)}

    return [{"name": f.name, **feature(f.type)} for f in schema]


def write_card(out_dir: Path, *, license: str, strategy: str, policy_checkpoint: str | None,
               expert_model: str, judge: str, pairs: int, expert_usage: dict[str, int]) -> str:
    """Write ``README.md``, the dataset card: YAML front matter a Hub or ``datasets`` reads
    (configs, features, license, tags) and the lineage of the rows. Returns its file name.

    ``expert_usage``: the expert role's totals (``USAGE_KEYS``) over this build."""
    import yaml

    front = {
        "license": license,
        "tags": list(CARD_TAGS),
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        "dataset_info": {"features": card_features(row_schema()),
                         "splits": [{"name": "train", "num_examples": pairs}]},
    }
    tokens = expert_usage["prompt_tokens"] + expert_usage["completion_tokens"]
    body = "\n".join([
        "# TeaMs-RL instruction dataset", "",
        f"{pairs} instruction-response pairs made by TeaMs-RL's stage 2 "
        "(`teams-rl build-dataset`): seed instructions evolved by the strategy below, "
        "each response written by the expert model.", "",
        "| | |", "|---|---|",
        f"| strategy | `{strategy}` |",
        f"| policy checkpoint | `{policy_checkpoint or 'none'}` |",
        f"| expert model | `{expert_model}` |",
        f"| reviewer judge mode | `{judge}` |",
        f"| pairs | {pairs} |",
        f"| expert queries (paid / cached) | {expert_usage['queries']} / "
        f"{expert_usage['cached']} |",
        f"| expert tokens (prompt + completion) | {tokens} |", "",
        "Files: `data/*.parquet` (one row per pair; `review` a struct, `actions` a list), "
        "`alpaca.json` (instruction / input / output) and `chat.jsonl` (TRL's `messages`). "
        "`manifest.json` holds the full counts.", "",
    ])
    tmp = out_dir / f".{CARD}.tmp"
    tmp.write_text(f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}",
                   encoding="utf-8")
    os.replace(tmp, out_dir / CARD)
    return CARD


@dataclass
class SeedTally:
    """Which seeds finished, and why the others did not (``budget``: the query budget cut
    them short; ``failure``: a call failed transiently; ``stopped``: never reached because
    the build stopped early). Pure bookkeeping over the stage rows, in arrival order."""

    total: int
    max_failure_rate: float
    done: int = 0
    incomplete: Counter = field(default_factory=Counter)
    first_failure: str | None = None  # "<role>: <message>"

    def add(self, row: dict) -> None:
        self.done += 1
        if not row.get("incomplete"):
            return
        failure = row.get("failure")
        self.incomplete["failure" if failure else "budget"] += 1
        if failure and self.first_failure is None:
            self.first_failure = failure

    @property
    def too_many_failures(self) -> bool:
        return self.incomplete["failure"] > self.max_failure_rate * self.total

    def stop_early(self) -> None:
        self.incomplete["stopped"] += self.total - self.done

    @property
    def seeds_incomplete(self) -> int:
        return sum(self.incomplete.values())

    def failure_record(self) -> dict[str, str] | None:
        if self.first_failure is None:
            return None
        role, _, message = self.first_failure.partition(": ")
        return {"role": role, "message": message} if message else {"role": "?",
                                                                    "message": role}

    def failure_message(self) -> str | None:
        """What the command says when seeds failed; None when none did."""
        if not self.incomplete["failure"]:
            return None
        f = self.failure_record()
        stopped = (f"; stopped early: more than dataset.max_failure_rate="
                   f"{self.max_failure_rate:g} of the seeds failed" if self.incomplete["stopped"]
                   else "")
        return (f"dataset incomplete: {self.incomplete['failure']} of {self.total} seeds "
                f"failed, the {f['role']} role said: {f['message']}{stopped}. Bring the "
                f"{f['role']} role back and run the same command again: only unfinished "
                "seeds are asked again (cached answers are replayed, not paid)")


def empty_reason(summary: dict) -> str:
    """Why a build wrote no pairs (an empty build writes no parquet shard)."""
    if summary["seeds_incomplete"]:
        return (f"all {summary['seeds_incomplete']} unfinished seeds are left for the next run "
                "(budget or failed calls)")
    if not summary["evolutions_tried"]:
        return "no evolution was tried (every chosen action was stop)"
    return ("every evolution failed, was eliminated or lost its response "
            f"(failed {summary['evolutions_failed']}, reviews failed "
            f"{summary['reviews_failed']}, eliminated {sum(summary['eliminated'].values())}, "
            f"responses failed {summary['responses_failed']}, duplicates "
            f"{summary['duplicates_exact'] + summary['duplicates_near']})")


def _empty_usage() -> dict[str, dict[str, int]]:
    return {role: dict.fromkeys(USAGE_KEYS, 0) for role in ROLES}


def format_summary(manifest: dict) -> str:
    """The end-of-run table: what was read, tried, dropped and written, and what it cost."""
    s = manifest["summary"]
    lines = [f"dataset build ({manifest['strategy']}): {manifest['status']}",
             f"  {'seeds read':<44}{s['seeds_read']:>8}",
             f"  {'seeds skipped (malformed / empty)':<44}"
             f"{s['seeds_skipped_bad']:>4} /{s['seeds_skipped_empty']:>2}",
             f"  {'seeds unfinished (budget / failed / stopped)':<44}"
             + " /".join(f"{n:>4}" for n in s.get("seeds_incomplete_by_cause", {}).values()),
             f"  {'evolutions tried':<44}{s['evolutions_tried']:>8}",
             f"  {'evolutions failed (model error)':<44}{s['evolutions_failed']:>8}"]
    # The rules that fired (the manifest keeps every rule's count, zeros included).
    fired = {rule: n for rule, n in s["eliminated"].items() if n}
    lines += [f"  {'eliminated: ' + rule:<44}{n:>8}" for rule, n in fired.items()] or [
        f"  {'eliminated (any rule)':<44}{0:>8}"]
    lines += [f"  {'responses failed':<44}{s['responses_failed']:>8}",
              f"  {'duplicates removed (exact / near)':<44}"
              f"{s['duplicates_exact']:>4} /{s['duplicates_near']:>2}",
              f"  {'pairs written':<44}{s['pairs_written']:>8}",
              f"  {'role':<12}{'paid':>8}{'cached':>8}{'prompt tok':>12}{'compl tok':>11}"
              f"{'failed':>8}"]
    for role, u in manifest["queries"][manifest["strategy"]].items():
        lines.append(f"  {role:<12}{u['queries']:>8}{u['cached']:>8}{u['prompt_tokens']:>12}"
                     f"{u['completion_tokens']:>11}{u['failures']:>8}")
    per_pair = manifest["expert_queries_per_pair"]
    lines.append(f"  expert queries per pair: {'n/a' if per_pair is None else f'{per_pair:.2f}'}")
    return "\n".join(lines)


def _metrics():
    try:
        from rl_system.metrics import dataset_metrics

        return dataset_metrics()
    except Exception:  # noqa: BLE001 - metrics are best effort (e.g. Ray not initialised)
        return None


def seed_outcomes(counts: dict) -> tuple[dict[str, int], dict[str, int]]:
    """A seed's counts as (evolution outcomes, reviewer outcomes), zeros left out.

    Evolutions: ``kept``, ``failed`` or ``eliminated/<rule>``; the reviewer's verdicts on
    instructions: ``kept`` or an instruction rule (a failed call was judged by nobody, and a
    response rule judged the expert's answer)."""

    evolutions = {"kept": counts.get("evolutions_kept", 0),
                  "failed": counts.get("evolutions_failed", 0)}
    evolutions |= {key: n for key, n in counts.items() if key.startswith("eliminated/")}
    evolutions = {k: n for k, n in evolutions.items() if n}
    judged = {"kept", *(f"eliminated/{r.name}" for r in INSTRUCTION_RULES)}
    reviews = {k.removeprefix("eliminated/"): n for k, n in evolutions.items() if k in judged}
    return evolutions, reviews


def _record_metrics(metrics, strategy: str, counts: dict, usage: dict, *,
                    incomplete: bool = False, judge: str = "") -> None:
    if metrics is None:
        return
    for role, u in usage.items():
        if u["queries"]:
            metrics.queries.inc(u["queries"], tags={"strategy": strategy, "role": role,
                                                    "source": "paid"})
        if u["cached"]:
            metrics.queries.inc(u["cached"], tags={"strategy": strategy, "role": role,
                                                   "source": "cached"})
    evolutions, reviews = seed_outcomes(counts)
    for outcome, n in evolutions.items():
        metrics.evolutions.inc(n, tags={"strategy": strategy, "outcome": outcome})
    metrics.seeds.inc(tags={"strategy": strategy,
                            "status": "incomplete" if incomplete else "complete"})
    from rl_system.metrics import metric_group

    reviewer = metric_group("reviewer")
    for outcome, n in reviews.items():
        reviewer.reviews.inc(n, tags={"stage": "dataset", "judge": judge, "outcome": outcome})
