"""SFT examples from dataset records: template, tokenization, prompt-masked labels, packing.

A record (DESIGN §3; one parquet row) carries at least ``instruction`` and ``response``,
optionally ``input`` (stage 2 writes it: the seed's input, "" when there is none). One
record becomes one training example::

    input_ids = prompt tokens + response tokens + end-of-turn token
    labels    = -100 on every prompt token, else the token itself

The prompt is the tokenizer's chat template (a single user turn, the instruction and
input as ``rl_system.tasks.task_text`` renders them for the expert and the chat export,
then the generation prompt) when the model has one, else the Alpaca template (with its
``### Input:`` section, as the Alpaca export is read). Examples longer than
``max_seq_len`` are cut from the right and counted; one with no response token left is
dropped. With packing, consecutive examples share one row of at most ``max_seq_len``
tokens; ``seq_lens`` records their lengths and :func:`collate` turns it into position ids
that restart at 0 for every example. transformers (>= 4.57) reads restarting position ids
with no attention mask and no KV cache (call the model with ``use_cache=False``) as packed
sequences and builds a block-diagonal causal mask for the SDPA and eager kernels
(``masking_utils.find_packed_sequence_indices``) and varlen calls for flash-attention, so
examples in one row never attend to each other (tests/integration/train/test_packing.py
checks the logits against each example run alone).

On the Ray side, :func:`load_sft_datasets` reads the parquet, holds out an eval split,
tokenizes (and packs) and puts the result in Ray Data's object store, so the trainer knows
exact row counts before it starts; the train loop then reads its share with
``ray.train.get_dataset_shard("train")`` and :func:`collate`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_system.tasks import task_text
from serve.errors import TeamsRLError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
ROWS_PER_BLOCK = 4096  # records per tokenized Ray Data block
REQUIRED_COLUMNS = ("instruction", "response")
OPTIONAL_COLUMNS = ("input",)

# Stanford Alpaca's prompt format, kept verbatim: stage 2 exports Alpaca JSON and tools
# that read it (and models tuned on it) expect exactly these headers.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class SFTDataError(TeamsRLError, ValueError):
    """The SFT dataset cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Example:
    """One tokenized record. ``input_ids`` and ``labels`` have the same length (<= max_seq_len)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


@dataclass
class TokenizeStats:
    """Counts over a set of records; ``dropped`` had no response token left after truncation."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _user_content(record: Mapping[str, Any]) -> str:
    """The user turn: instruction and input rendered as stage 2's chat export and the
    expert's request render them (``rl_system.tasks.task_text``)."""
    return task_text(record["instruction"], record.get("input") or "")


def prompt_text(record: Mapping[str, Any], tokenizer: Any) -> str:
    """The text the model sees before its answer: chat template if any, else Alpaca."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": _user_content(record)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(
            instruction=record["instruction"], input=record["input"]
        )
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the assistant's turn (what generation stops on).

    With a chat template it is the first special token the template writes after the
    answer (``<|im_end|>`` for SmolLM2/ChatML, ``<|eot_id|>`` for Llama 3); otherwise,
    or if the template hides it, the tokenizer's EOS.
    """
    if has_chat_template(tokenizer):
        probe = "PROBE-ANSWER"
        user = [{"role": "user", "content": "hi"}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": probe}], tokenize=False
        )
        if full.startswith(prompt + probe):
            suffix = full[len(prompt) + len(probe):]
            ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
            # Turn markers are often added tokens that are not registered as "special".
            marker_ids = {*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()}
            if ids and ids[0] in marker_ids:
                return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise SFTDataError(
            "the tokenizer has neither a chat template nor an EOS token, so an answer "
            "cannot be terminated; choose another sft.base_model"
        )
    return int(tokenizer.eos_token_id)


def tokenize_example(
    record: Mapping[str, Any], tokenizer: Any, *, max_seq_len: int, eot_id: int | None = None
) -> Example | None:
    """Tokenize one record; ``None`` when truncation leaves no response token to learn.

    Prompt and response are tokenized apart, as at inference time the prompt is encoded
    and the response generated after it. The chat template already writes its BOS; the
    Alpaca prompt gets the tokenizer's BOS (if it has one) by hand.
    """
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    prompt_ids = tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"]
    if not has_chat_template(tokenizer) and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    answer_ids = [*tokenizer(str(record["response"]), add_special_tokens=False)["input_ids"], eot]
    input_ids = [*prompt_ids, *answer_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    truncated = len(input_ids) > max_seq_len
    if truncated:
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            return None
    return Example(input_ids=input_ids, labels=labels, truncated=truncated)


def tokenize_records(
    records: Iterable[Mapping[str, Any]], tokenizer: Any, *, max_seq_len: int
) -> tuple[list[Example], TokenizeStats]:
    stats = TokenizeStats()
    eot = end_of_turn_id(tokenizer)
    examples = []
    for record in records:
        stats.records += 1
        example = tokenize_example(record, tokenizer, max_seq_len=max_seq_len, eot_id=eot)
        if example is None:
            stats.dropped += 1
            stats.truncated += 1
            continue
        examples.append(example)
        stats.examples += 1
        stats.truncated += example.truncated
        stats.tokens += len(example.input_ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in example.labels)
    return examples, stats


def pack_examples(examples: Iterable[Example], *, max_seq_len: int) -> Iterator[dict[str, Any]]:
    """Greedy packing in arrival order: start a new row when the next example won't fit.

    Yields rows ``{input_ids, labels, seq_lens, num_examples, num_truncated}``; the sum of
    ``seq_lens`` is the row length (<= max_seq_len).
    """
    row: list[Example] = []
    used = 0
    for example in examples:
        if row and used + len(example.input_ids) > max_seq_len:
            yield _row(row)
            row, used = [], 0
        row.append(example)
        used += len(example.input_ids)
    if row:
        yield _row(row)


def _row(examples: Sequence[Example]) -> dict[str, Any]:
    return {
        "input_ids": [t for e in examples for t in e.input_ids],
        "labels": [t for e in examples for t in e.labels],
        "seq_lens": [len(e.input_ids) for e in examples],
        "num_examples": len(examples),
        "num_truncated": sum(e.truncated for e in examples),
    }


def collate(batch: Mapping[str, Sequence[Sequence[int]]], *, pad_id: int) -> dict[str, Any]:
    """Right-pad rows into tensors for a causal LM; no attention mask is returned on purpose.

    Returns ``input_ids``, ``labels``, ``position_ids`` of shape (B, L) with L the longest
    row, plus ``num_tokens`` (non-pad tokens, int). Position ids restart at 0 for every
    packed example, which is what keeps packed examples apart (module docstring). Padding
    continues the last example's positions: causality already stops real tokens from
    seeing the pads that follow them, their labels are -100, and an unpacked batch then
    keeps SDPA's fast ``is_causal`` path.
    """
    import torch

    rows = [list(map(int, r)) for r in batch["input_ids"]]
    width = max(len(r) for r in rows)
    bsz = len(rows)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((bsz, width), dtype=torch.long)
    seq_lens = batch.get("seq_lens")
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.as_tensor(row)
        labels[i, :n] = torch.as_tensor(list(map(int, batch["labels"][i])))
        lens = [int(s) for s in seq_lens[i]] if seq_lens is not None else [n]
        lens[-1] += width - n  # the pad tail continues the last example
        position_ids[i] = torch.cat([torch.arange(s) for s in lens])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "num_tokens": sum(len(r) for r in rows),
    }


# ---------------------------------------------------------------------------------------
# Files and Ray Data


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet file itself, or every ``*.parquet`` under a directory (hidden ones skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise SFTDataError(
            f"SFT dataset {path} does not exist; build it first (teams-rl build-dataset) "
            "or pass the path of a parquet file or directory"
        )
    files = sorted(
        p for p in path.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise SFTDataError(f"SFT dataset {path} holds no *.parquet file")
    return files


def validate_files(files: Sequence[Path]) -> int:
    """Check every file's schema and count rows from the parquet footers (no data read).

    Returns the total number of rows. Raises :class:`SFTDataError` naming the file and the
    missing column, or saying the dataset is empty.
    """
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        try:
            meta = pq.ParquetFile(file).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types here
            raise SFTDataError(f"SFT dataset file {file} is not readable parquet: {exc}") from None
        names = set(meta.schema.names)
        for column in REQUIRED_COLUMNS:
            if column not in names:
                raise SFTDataError(
                    f"SFT dataset file {file} has no '{column}' column (it has: "
                    f"{', '.join(sorted(names))}); SFT needs 'instruction' and 'response' "
                    "per row (DESIGN §3 dataset records)"
                )
        total += meta.num_rows
    if total == 0:
        raise SFTDataError(
            f"SFT dataset ({', '.join(map(str, files))}) has no rows: nothing to train on; "
            "check that stage 2 accepted some pairs, or pass another dataset"
        )
    return total


def heldout_groups(groups: Sequence[str], *, eval_fraction: float, seed: int) -> set[str]:
    """The groups (seed ids) whose rows form the held-out split.

    ``groups``: one entry per record. Whole groups are drawn in a ``seed``-ed order until
    they cover ``round(len(groups) * eval_fraction)`` rows (at least one group when the
    fraction is positive); at least one group always stays on the training side, so one
    group cannot be split at all. Every evolution of a held-out seed is then unseen in
    training, which is what membership inference assumes of its non-members.
    """
    import numpy as np

    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    if eval_fraction <= 0 or len(sizes) < 2:
        return set()
    target = max(1, round(len(groups) * eval_fraction))
    order = sorted(sizes)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    held_rows = 0
    for i in rng.permutation(len(order)):
        if held_rows >= target or len(held) == len(order) - 1:
            break
        held.add(order[i])
        held_rows += sizes[order[i]]
    return held


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_ref: str) -> Any:
    """Tokenizer of ``model_ref`` (embedded name, path or HF id), once per process."""
    from transformers import AutoTokenizer

    from serve.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_ref))


def tokenize_batch(
    batch: Mapping[str, Any], *, model_ref: str, max_seq_len: int, packing: bool
) -> Any:
    """Record columns (``{name: values}``) -> training rows (a pyarrow table, one block).

    Packing happens inside the batch only, so rows never mix examples of two batches.
    """
    import pyarrow as pa

    tokenizer = load_tokenizer(model_ref)
    columns = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in batch]
    rows_of_values = zip(*(batch[c] for c in columns), strict=True)
    records = [dict(zip(columns, values, strict=True)) for values in rows_of_values]
    examples, _ = tokenize_records(records, tokenizer, max_seq_len=max_seq_len)
    if packing:
        rows = list(pack_examples(examples, max_seq_len=max_seq_len))
    else:
        rows = [_row([e]) for e in examples]
    ids = pa.list_(pa.int32())
    return pa.table(
        {
            "input_ids": pa.array([r["input_ids"] for r in rows], ids),
            "labels": pa.array([r["labels"] for r in rows], ids),
            "seq_lens": pa.array([r["seq_lens"] for r in rows], ids),
            "num_examples": pa.array([r["num_examples"] for r in rows], pa.int32()),
            "num_truncated": pa.array([r["num_truncated"] for r in rows], pa.int32()),
        }
    )


@dataclass
class SFTDatasets:
    """Materialized, tokenized splits and what it took to make them."""

    train: Any  # ray.data.MaterializedDataset of training rows
    eval: Any | None  # same, or None when no record was held out
    heldout: list[dict[str, Any]]  # the held-out source records (never trained on)
    files: list[Path]
    records: int  # rows read from parquet
    train_rows: int  # rows after tokenization (and packing)
    eval_rows: int
    examples: int  # examples kept (train + eval)
    truncated: int  # examples cut to max_seq_len (incl. dropped ones)
    dropped: int  # examples with no response token left after truncation

    def summary(self) -> dict[str, int]:
        return {
            "records": self.records,
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped,
        }


def load_sft_datasets(
    path: str | Path,
    *,
    model_ref: str,
    max_seq_len: int,
    packing: bool,
    eval_fraction: float,
    seed: int,
) -> SFTDatasets:
    """Validate, read, split, tokenize and materialize the SFT data for Ray Train.

    The eval split is about ``round(records * eval_fraction)`` records (at least one when
    the fraction is positive and there are two records or more), drawn with ``seed`` so a
    re-run holds out the same records. Records that carry a ``seed_id`` (stage 2's parquet)
    are held out by whole seeds (:func:`heldout_groups`); others one by one.

    Stage 2 writes thousands to a hundred thousand records (kilobytes each), so the driver
    reads, splits, shuffles and tokenizes them in one pass and hands Ray Data the tokenized
    blocks (``ROWS_PER_BLOCK`` rows each); the trainers stream their shards from there.
    Done as a Ray Data plan (read tasks, a global shuffle, tokenize tasks, an aggregate),
    the same ten records took 75 s on 2 cores, nearly all of it starting worker processes.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray.data

    files = parquet_files(path)
    n_records = validate_files(files)
    columns = [*REQUIRED_COLUMNS]
    # "id" and "seed_id" travel along (tokenization ignores them) so held-out records can
    # be named later and held out by seed.
    for optional in (*OPTIONAL_COLUMNS, "id", "seed_id"):
        if all(optional in pq.read_schema(f).names for f in files):
            columns.append(optional)
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    rng = np.random.default_rng(seed)
    if "seed_id" in columns:
        groups = [str(g) for g in table.column("seed_id").to_pylist()]
        held = heldout_groups(groups, eval_fraction=eval_fraction, seed=seed)
        is_held = np.array([g in held for g in groups], dtype=bool)
    else:
        is_held = np.zeros(n_records, dtype=bool)
        if eval_fraction > 0 and n_records >= 2:
            n_eval = min(n_records - 1, max(1, round(n_records * eval_fraction)))
            is_held[rng.permutation(n_records)[:n_eval]] = True
    raw_eval = table.filter(pa.array(is_held)) if is_held.any() else None
    raw_train = table.filter(pa.array(~is_held))
    # One global shuffle here; each epoch's trainers also shuffle locally.
    raw_train = raw_train.take(pa.array(rng.permutation(raw_train.num_rows)))

    def tokenized(records: Any) -> tuple[Any, dict[str, int]]:
        blocks = [
            tokenize_batch(
                {c: records.column(c).slice(i, ROWS_PER_BLOCK).to_pylist()
                 for c in records.column_names},
                model_ref=model_ref, max_seq_len=max_seq_len, packing=packing,
            )
            for i in range(0, records.num_rows, ROWS_PER_BLOCK)
        ]
        blocks = [b for b in blocks if b.num_rows]
        stats = {
            "rows": sum(b.num_rows for b in blocks),
            "examples": sum(pc.sum(b.column("num_examples")).as_py() or 0
                            for b in blocks),
            "truncated": sum(pc.sum(b.column("num_truncated")).as_py() or 0
                             for b in blocks),
        }
        return (ray.data.from_arrow(blocks) if blocks else None), stats

    train, train_stats = tokenized(raw_train)
    eval_ds, eval_stats = tokenized(raw_eval) if raw_eval is not None else (None, {})
    examples = train_stats["examples"] + eval_stats.get("examples", 0)
    dropped = n_records - examples
    if train_stats["rows"] == 0:
        raise SFTDataError(
            f"no training example of {path} keeps a response token within "
            f"sft.max_seq_len={max_seq_len}; raise sft.max_seq_len"
        )
    return SFTDatasets(
        train=train,
        eval=eval_ds if eval_stats.get("rows") else None,
        # The held-out split is a small fraction by construction; it is what the
        # membership-inference attack later scores as non-members.
        heldout=raw_eval.to_pylist() if raw_eval is not None else [],
        files=list(files),
        records=n_records,
        train_rows=train_stats["rows"],
        eval_rows=eval_stats.get("rows", 0),
        examples=examples,
        # Dropped examples were truncated too, but emit no row to count them by.
        truncated=train_stats["truncated"] + eval_stats.get("truncated", 0) + dropped,
        dropped=dropped,
    )
