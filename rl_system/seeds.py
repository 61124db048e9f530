"""Seed instructions: where every evolution episode (stage 1) and dataset row (stage 2) starts.

``load_seeds`` reads a seed file, checks every record and returns a :class:`SeedSet`.
Callers load seeds on the driver *before* starting Ray, so a bad file fails in a second
with a message naming the file and line, not minutes later inside an actor.

Supported formats, chosen by extension:

* ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are ignored.
* ``.json``: a list of objects, or an object ``{"data": [...]}`` (Alpaca's
  ``alpaca_data.json`` as it is: its ``output`` is ignored, stage 2 writes responses).
* ``.csv``: UTF-8, a header row, one row per seed.
* ``.parquet`` / ``.pq``: one row per seed (needs ``pyarrow``, which ``ray[data]`` brings).
* ``hf://owner/name[:split]`` (split ``train`` by default): a Hugging Face dataset, streamed
  with ``datasets.load_dataset`` when the Hub is reachable; offline (``HF_HUB_OFFLINE``) or
  unreachable it is a :class:`SeedHubError` in seconds, not a hang.

Each record needs an ``instruction`` string. ``input`` (a string or null) and ``id`` (a
string or integer) are optional; other fields (``category`` ...) are ignored. A record
without an id gets :func:`stable_seed_id` of its text, so re-runs give the same ids.
``columns`` (``dataset.seed_columns``) names other columns for these three fields, in
every format; a column it names must be there.

Example::

    seeds = load_seeds("data/seed_instructions.jsonl", limit=8)
    for seed in seeds:
        print(seed.id, seed.instruction)
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from serve.errors import MissingExtra, TeamsRLError

__all__ = [
    "SUPPORTED_SUFFIXES", "HubSeeds", "Seed", "SeedFileError", "SeedHubError", "SeedSet",
    "load_seeds", "seeds_from_rows", "stable_seed_id",
]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv",)
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    _JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES + _CSV_SUFFIXES
)
SEED_FIELDS: tuple[str, ...] = ("instruction", "input", "id")

_SKIP_HINT = "fix it, or skip malformed records with skip_bad_lines=True (dataset.skip_bad_lines)"


class SeedFileError(TeamsRLError, ValueError):
    """A seed file is missing, unreadable, malformed, or leaves no usable seed."""


class SeedHubError(SeedFileError):
    """``dataset.seeds`` names a Hugging Face dataset that is malformed, out of reach or
    unreadable."""


@dataclass(frozen=True)
class Seed:
    """One seed instruction.

    Attributes:
        id: Unique within its file; from the record, or :func:`stable_seed_id`.
        instruction: The instruction text, surrounding whitespace removed.
        input: Optional context the instruction refers to (a passage, code, data); ``""``
            when there is none.
        source: Where the record came from: ``"path:line"`` (JSONL, 1-based),
            ``"path item i"`` (JSON list, 0-based), ``"path row i"`` (parquet, 0-based)
            or ``"path:line"`` (CSV, the file line where the row ends).
    """

    id: str
    instruction: str
    input: str = ""
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class SeedSet:
    """The result of :func:`load_seeds`: the seeds in file order plus what was skipped.

    Attributes:
        path: The file the seeds were read from, or ``"hf://owner/name:split"``.
        seeds: Usable seeds, in file order (at most ``limit`` of them).
        skipped_bad: Malformed records skipped because ``skip_bad_lines=True``.
        skipped_empty: Records whose instruction was empty or whitespace only.
    """

    path: Path | str
    seeds: list[Seed]
    skipped_bad: int = 0
    skipped_empty: int = 0

    def __len__(self) -> int:
        return len(self.seeds)

    def __iter__(self) -> Iterator[Seed]:
        return iter(self.seeds)

    def __getitem__(self, index: int) -> Seed:
        return self.seeds[index]


def stable_seed_id(instruction: str, input: str = "") -> str:
    """Return a short id derived from the text alone: ``"seed-"`` + 12 hex digits of SHA-256.

    The instruction and input are joined with a NUL byte so that moving text between
    the two fields changes the id.
    """
    digest = hashlib.sha256(f"{instruction}\0{input}".encode()).hexdigest()
    return f"seed-{digest[:12]}"


def load_seeds(
    path: str | Path,
    *,
    limit: int | None = None,
    skip_bad_lines: bool = False,
    columns: Mapping[str, str | None] | None = None,
) -> SeedSet:
    """Load and check the seed instructions in ``path``.

    Args:
        path: A ``.jsonl``/``.ndjson``, ``.json``, ``.csv`` or ``.parquet``/``.pq`` file, or
            a Hugging Face dataset ``hf://owner/name[:split]``.
        limit: Keep only the first ``limit`` usable seeds; reading stops there, so records
            after them are not checked. ``None`` keeps all.
        skip_bad_lines: Skip and count malformed records instead of raising.
        columns: ``{"instruction": col, "input": col, "id": col}``, each optional; a
            missing or ``None`` entry reads the field's own name (``dataset.seed_columns``).

    Returns:
        A :class:`SeedSet` with at least one seed.

    Raises:
        SeedFileError: The file is missing or has an unsupported extension; a record is
            malformed (not valid JSON, not an object, ``instruction`` missing or not a
            string, ``input``/``id`` of the wrong type) and ``skip_bad_lines`` is false;
            two records share an id (always an error: which one is right cannot be
            guessed); or no usable seed is left.
        SeedHubError: a ``hf://`` id is malformed, the Hub is out of reach, or the dataset
            cannot be read.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    names = _Columns.of(columns)
    hub = HubSeeds.parse(str(path))
    if hub is not None:
        return seeds_from_rows(hub.open(), source=hub, limit=limit,
                               skip_bad_lines=skip_bad_lines, columns=columns)
    path = Path(path)
    return _collect(path, _open_records(path, names), names, limit=limit,
                    skip_bad_lines=skip_bad_lines)


@dataclass(frozen=True)
class HubSeeds:
    """A Hugging Face dataset given as ``dataset.seeds: hf://owner/name[:split]``."""

    repo_id: str
    split: str = "train"

    PREFIX: ClassVar[str] = "hf://"

    @classmethod
    def parse(cls, value: str) -> HubSeeds | None:
        """The id in ``value``, or ``None`` when ``value`` is a file path."""
        if not value.startswith(cls.PREFIX):
            return None
        repo_id, colon, split = value[len(cls.PREFIX):].partition(":")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")) or (colon and not split):
            raise SeedHubError(
                f"dataset.seeds: {value!r} is not a Hugging Face dataset id; write "
                "hf://owner/name or hf://owner/name:split (e.g. hf://tatsu-lab/alpaca)"
            )
        return cls(repo_id, split or "train")

    def __str__(self) -> str:
        return f"{self.PREFIX}{self.repo_id}:{self.split}"

    def open(self):
        """Stream the split's rows with ``datasets``; refuse in seconds when the Hub is out
        of reach (offline mode, no route), where ``datasets`` would retry for minutes."""
        from rl_system.hub import hub_unreachable

        why = hub_unreachable()
        if why:
            raise SeedHubError(
                f"dataset.seeds: cannot load the Hugging Face dataset {self.repo_id!r}: {why}; "
                "download it where the Hub is reachable and point dataset.seeds at a "
                "JSONL / JSON / CSV / parquet copy"
            )
        try:
            import datasets
        except ImportError as exc:
            raise MissingExtra("seeds from the Hugging Face Hub need the datasets package: "
                               "pip install datasets") from exc
        try:
            # Streaming reads only the rows the limit keeps, not the whole dataset.
            return datasets.load_dataset(self.repo_id, split=self.split, streaming=True)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for one cause
            raise SeedHubError(
                f"dataset.seeds: the Hugging Face dataset {self.repo_id!r} (split "
                f"{self.split!r}) cannot be read: {type(exc).__name__}: {exc}"
            ) from None


def seeds_from_rows(
    rows,
    *,
    source: HubSeeds,
    limit: int | None = None,
    skip_bad_lines: bool = False,
    columns: Mapping[str, str | None] | None = None,
) -> SeedSet:
    """Seeds from the rows of a ``datasets`` (Iterable)Dataset, checked as a file's are.

    Alpaca's own fields (instruction / input / output) need no mapping; ``output`` is
    ignored. ``source`` names the rows in messages and in :attr:`SeedSet.path`."""
    names = _Columns.of(columns)
    header = getattr(rows, "column_names", None)
    if header is not None:  # a streamed dataset may not know its columns up front
        _check_header(str(source), str(source), list(header), names)
    records = ((f"{source} row {i}", row) for i, row in enumerate(rows))
    return _collect(str(source), records, names, limit=limit, skip_bad_lines=skip_bad_lines)


def _collect(
    path: Path | str, records, names: _Columns, *, limit: int | None, skip_bad_lines: bool,
) -> SeedSet:
    """Check every ``(location, record)`` pair and gather the usable seeds."""
    seeds: list[Seed] = []
    first_seen: dict[str, str] = {}
    skipped_bad = skipped_empty = total = 0
    with closing(records):
        for where, record in records:
            total += 1
            try:
                seed = _parse_record(record, where, names)
            except _BadRecord as bad:
                if not skip_bad_lines:
                    raise SeedFileError(f"{where}: {bad}; {_SKIP_HINT}") from None
                skipped_bad += 1
                continue
            if seed is None:
                skipped_empty += 1
                continue
            if seed.id in first_seen:
                raise SeedFileError(
                    f"{where}: duplicate seed id {seed.id!r}, first used at "
                    f"{first_seen[seed.id]}; give each record a unique 'id' "
                    "(or drop the repeated record)"
                )
            first_seen[seed.id] = where
            seeds.append(seed)
            if limit is not None and len(seeds) >= limit:
                break

    if not seeds:
        raise SeedFileError(
            f"{path}: no usable seed instructions ({total} records read: {skipped_bad} malformed "
            f"and skipped, {skipped_empty} with an empty instruction); every record needs a "
            "non-empty 'instruction' string"
        )
    return SeedSet(path=path, seeds=seeds, skipped_bad=skipped_bad, skipped_empty=skipped_empty)


class _BadRecord(Exception):
    """One record is malformed; the message says what is wrong with it."""


@dataclass(frozen=True)
class _Columns:
    """Which record key holds each seed field, and which of them the user mapped."""

    names: dict[str, str]
    mapped: frozenset[str]

    @classmethod
    def of(cls, columns: Mapping[str, str | None] | None) -> _Columns:
        columns = dict(columns or {})
        unknown = sorted(set(columns) - set(SEED_FIELDS))
        if unknown:
            raise ValueError(
                f"seed columns: unknown field(s) {unknown}; map only {', '.join(SEED_FIELDS)}"
            )
        mapped = frozenset(f for f, col in columns.items() if col is not None)
        return cls({f: columns.get(f) or f for f in SEED_FIELDS}, mapped)

    def __getitem__(self, field_name: str) -> str:
        return self.names[field_name]

    def label(self, field_name: str) -> str:
        """How an error names the field: ``'input'``, or the mapped column and the setting."""
        if field_name in self.mapped:
            return f"column {self.names[field_name]!r} (dataset.seed_columns.{field_name})"
        return repr(field_name)

    def required(self) -> list[str]:
        """Fields a file's header must have: the instruction and every mapped one."""
        return [f for f in SEED_FIELDS if f == "instruction" or f in self.mapped]


@dataclass(frozen=True)
class _Unparsable:
    """Stands in for a record that could not be decoded at all."""

    reason: str


def _open_records(path: Path, names: _Columns) -> Generator[tuple[str, Any], None, None]:
    """Check ``path`` and return an iterator of ``(location, record)`` pairs."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise SeedFileError(
            f"{path}: unsupported seed file type {path.suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise SeedFileError(f"seed file {path} {what} (resolved to {path.resolve()})")
    if suffix in _JSONL_SUFFIXES:
        return _jsonl_records(path)
    if suffix in _JSON_SUFFIXES:
        return _json_records(path)
    if suffix in _CSV_SUFFIXES:
        return _csv_records(path, names)
    return _parquet_records(path, names)


def _jsonl_records(path: Path) -> Generator[tuple[str, Any], None, None]:
    # Decode line by line so that one bad byte costs one line, not the whole file.
    try:
        f = path.open("rb")
    except OSError as exc:
        raise SeedFileError(f"cannot read seed file {path}: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, _Unparsable(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as exc:
                yield where, _Unparsable(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _json_records(path: Path) -> Generator[tuple[str, Any], None, None]:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise SeedFileError(f"cannot read seed file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SeedFileError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise SeedFileError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    items = document.get("data") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise SeedFileError(
            f'{path}: a .json seed file must hold a list of objects or {{"data": [...]}}, '
            f"got {_type_name(document)}"
            + (" without a 'data' list" if isinstance(document, dict) else "")
        )
    for index, item in enumerate(items):
        yield f"{path} item {index}", item


def _csv_records(path: Path, names: _Columns) -> Generator[tuple[str, Any], None, None]:
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SeedFileError(f"cannot read seed file {path}: {exc.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            _check_header(path, f"{path}:1", header, names)
            for row in reader:
                # A short row leaves its last columns None: the record check calls them missing.
                yield f"{path}:{reader.line_num}", row
        except UnicodeDecodeError as exc:
            raise SeedFileError(
                f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        except csv.Error as exc:
            raise SeedFileError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _check_header(path: Path, where: str, header: list[str], names: _Columns) -> None:
    """Refuse a file whose columns lack the instruction or a mapped column."""
    for field_name in names.required():
        if names[field_name] not in header:
            what = names.label(field_name) if field_name in names.mapped else "'instruction' column"
            raise SeedFileError(
                f"{where}: no {what} (the file's columns: {', '.join(header) or 'none'})"
            )


def _parquet_records(path: Path, names: _Columns) -> Generator[tuple[str, Any], None, None]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingExtra(
            "reading parquet seed files needs pyarrow: pip install pyarrow "
            "(it comes with ray[data])"
        ) from exc
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SeedFileError(f"{path}: not a readable parquet file ({exc})") from None
    header = parquet.schema_arrow.names
    _check_header(path, str(path), header, names)
    columns = [names[f] for f in SEED_FIELDS if names[f] in header]
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def _parse_record(record: Any, where: str, names: _Columns) -> Seed | None:
    """Turn one decoded record into a Seed; ``None`` if its instruction is empty.

    Raises:
        _BadRecord: the record is malformed.
    """
    if isinstance(record, _Unparsable):
        raise _BadRecord(record.reason)
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {_type_name(record)}")
    for field_name in names.required():
        if field_name != "instruction" and names[field_name] not in record:
            raise _BadRecord(f"missing {names.label(field_name)}")
    instruction = record.get(names["instruction"])
    if instruction is None:
        raise _BadRecord(f"missing {names.label('instruction')}")
    if not isinstance(instruction, str):
        raise _BadRecord(
            f"{names.label('instruction')} must be a string, got {_type_name(instruction)}"
        )
    input_text = record.get(names["input"])
    if input_text is None:
        input_text = ""
    elif not isinstance(input_text, str):
        raise _BadRecord(
            f"{names.label('input')} must be a string or null, got {_type_name(input_text)}"
        )
    raw_id = record.get(names["id"])
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        raise _BadRecord(
            f"{names.label('id')} must be a string or an integer, got {_type_name(raw_id)}"
        )
    if isinstance(raw_id, str) and not raw_id.strip():
        raise _BadRecord(f"{names.label('id')} is an empty string; remove it to get a generated id")

    instruction = instruction.strip()
    if not instruction:
        return None
    input_text = input_text.strip()
    seed_id = str(raw_id).strip() if raw_id is not None else stable_seed_id(instruction, input_text)
    return Seed(id=seed_id, instruction=instruction, input=input_text, source=where)


def _type_name(value: Any) -> str:
    """Name a decoded value's type in JSON's words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
