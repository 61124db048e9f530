"""Seed loading: the shipped seed set, the four formats, column mapping, every refusal's message."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from rl_system.seeds import (
    SUPPORTED_SUFFIXES,
    Seed,
    SeedFileError,
    load_seeds,
    stable_seed_id,
)

SHIPPED = Path(__file__).resolve().parents[3] / "data" / "seed_instructions.jsonl"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(instruction, **fields) -> str:
    return json.dumps({"instruction": instruction, **fields})


# ------------------------------------------------------------------ the shipped seed set


def test_shipped_seed_file_loads_cleanly():
    seeds = load_seeds(SHIPPED)

    assert len(seeds) >= 250
    assert seeds.skipped_bad == 0 and seeds.skipped_empty == 0
    ids = [s.id for s in seeds]
    assert len(set(ids)) == len(ids)
    instructions = [s.instruction.casefold() for s in seeds]
    assert len(set(instructions)) == len(instructions)
    assert all(s.instruction.strip() for s in seeds)


def test_shipped_seed_file_follows_its_documented_schema():
    rows = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]

    for lineno, row in enumerate(rows, start=1):
        assert set(row) == {"id", "instruction", "input", "category"}, lineno
        assert all(isinstance(value, str) for value in row.values()), lineno
        assert re.fullmatch(r"seed-\d{4}", row["id"]), lineno
        assert row["category"], lineno
    # Varied on purpose: many task types, mostly without an input text.
    assert len({row["category"] for row in rows}) >= 15
    assert sum(bool(row["input"]) for row in rows) < len(rows) / 2


# ------------------------------------------------------------------ malformed records


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"instruction": "unterminated', "invalid JSON"),
        ('["a list", "not an object"]', "expected a JSON object, got an array"),
        ('{"input": "no instruction here"}', "missing 'instruction'"),
        ('{"instruction": null}', "missing 'instruction'"),
        ('{"instruction": 42}', "'instruction' must be a string, got a number"),
        ('{"instruction": "ok", "input": ["x"]}', "'input' must be a string or null"),
        ('{"instruction": "ok", "id": {"a": 1}}', "'id' must be a string or an integer"),
    ],
)
def test_malformed_jsonl_line_is_refused_naming_file_and_line(tmp_path, bad_line, reason):
    # Blank lines count towards the line number even though they are ignored.
    path = write_lines(tmp_path / "seeds.jsonl", [record("Name three rivers."), "", bad_line])

    with pytest.raises(SeedFileError) as info:
        load_seeds(path)

    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert reason in message
    assert "skip_bad_lines" in message


def test_skip_bad_lines_skips_and_counts(tmp_path):
    path = write_lines(
        tmp_path / "seeds.jsonl",
        [
            record("First good one."),
            "{broken",
            "17",
            record("Second good one."),
            '{"instruction": 3}',
        ],
    )

    seeds = load_seeds(path, skip_bad_lines=True)

    assert [s.instruction for s in seeds] == ["First good one.", "Second good one."]
    assert seeds.skipped_bad == 3
    assert seeds.skipped_empty == 0
    assert [s.source for s in seeds] == [f"{path}:1", f"{path}:4"]


def test_invalid_utf8_line_is_a_bad_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(
        record("Fine.").encode()
        + b"\n"
        + b'{"instruction": "caf\xe9"}\n'
        + record("Also fine.").encode()
    )

    with pytest.raises(SeedFileError, match=re.escape(f"{path}:2: not valid UTF-8")):
        load_seeds(path)
    assert load_seeds(path, skip_bad_lines=True).skipped_bad == 1


def test_empty_instructions_are_skipped_and_counted_not_errors(tmp_path):
    path = write_lines(
        tmp_path / "seeds.jsonl",
        [record(""), record("Keep me."), record("   \t "), record("\n")],
    )

    seeds = load_seeds(path)

    assert [s.instruction for s in seeds] == ["Keep me."]
    assert seeds.skipped_empty == 3
    assert seeds.skipped_bad == 0


def test_text_is_stripped_and_null_input_becomes_empty(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", [record("  Sort these.  ", input=None, id=7)])

    (seed,) = load_seeds(path)

    assert seed == Seed(id="7", instruction="Sort these.", input="")


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    path = write_lines(
        tmp_path / "seeds.jsonl",
        [record("One.", id="a"), record("Two.", id="b"), record("Three.", id="a")],
    )

    with pytest.raises(SeedFileError) as info:
        load_seeds(path, skip_bad_lines=True)

    message = str(info.value)
    assert f"{path}:3" in message and f"{path}:1" in message
    assert "duplicate seed id 'a'" in message


def test_repeated_record_without_id_is_a_duplicate(tmp_path):
    path = write_lines(
        tmp_path / "seeds.jsonl", [record("Same."), record("Other."), record("Same.")]
    )

    with pytest.raises(SeedFileError, match="duplicate seed id"):
        load_seeds(path)


# ------------------------------------------------------------------ nothing usable


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("", encoding="utf-8")

    with pytest.raises(SeedFileError, match="no usable seed instructions") as info:
        load_seeds(path)
    assert str(path) in str(info.value)
    assert "0 records read" in str(info.value)


def test_blank_lines_only_is_refused(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", ["", "   ", ""])

    with pytest.raises(SeedFileError, match="no usable seed instructions"):
        load_seeds(path)


def test_all_bad_or_empty_is_refused_with_counts(tmp_path):
    path = write_lines(tmp_path / "seeds.jsonl", ["{nope", "[]", record("  ")])

    with pytest.raises(SeedFileError) as info:
        load_seeds(path, skip_bad_lines=True)

    message = str(info.value)
    assert "no usable seed instructions" in message
    assert "3 records read" in message
    assert "2 malformed" in message
    assert "1 with an empty instruction" in message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "seeds.jsonl"

    with pytest.raises(SeedFileError, match="does not exist") as info:
        load_seeds(path)
    assert str(path) in str(info.value)


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "seeds.tsv"
    path.write_text("instruction\nHello\n", encoding="utf-8")

    with pytest.raises(SeedFileError) as info:
        load_seeds(path)

    message = str(info.value)
    assert "'.tsv'" in message
    assert all(suffix in message for suffix in SUPPORTED_SUFFIXES)


# ------------------------------------------------------------------ JSON and parquet

ROWS = [
    {"id": "x1", "instruction": "Explain tides.", "input": ""},
    {"instruction": "Summarise this.", "input": "A short text."},
    {"id": 3, "instruction": "Add 2 and 2.", "input": None, "category": "math"},
]
EXPECTED = [
    Seed(id="x1", instruction="Explain tides."),
    Seed(
        id=stable_seed_id("Summarise this.", "A short text."),
        instruction="Summarise this.",
        input="A short text.",
    ),
    Seed(id="3", instruction="Add 2 and 2."),
]


@pytest.mark.parametrize("wrap", [False, True], ids=["list", "data-object"])
def test_json_round_trip(tmp_path, wrap):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS), encoding="utf-8")

    seeds = load_seeds(path)

    assert seeds.seeds == EXPECTED
    assert seeds[1].source == f"{path} item 1"


def test_json_bad_item_names_its_index(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps([ROWS[0], {"instruction": False}]), encoding="utf-8")

    with pytest.raises(SeedFileError, match=re.escape(f"{path} item 1: 'instruction' must be")):
        load_seeds(path)


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text('[\n  {"instruction": "a"},\n  {"instruction": }\n]', encoding="utf-8")

    with pytest.raises(SeedFileError, match=re.escape(f"{path}:3: invalid JSON")):
        load_seeds(path)


def test_json_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps({"items": ROWS}), encoding="utf-8")

    with pytest.raises(SeedFileError, match="list of objects"):
        load_seeds(path)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "seeds.parquet"
    table = pa.table(
        {
            "id": ["x1", None, "3"],
            "instruction": [row["instruction"] for row in ROWS],
            "input": [row["input"] for row in ROWS],
        }
    )
    pq.write_table(table, path)

    seeds = load_seeds(path)

    assert seeds.seeds == EXPECTED
    assert seeds[2].source == f"{path} row 2"


def test_parquet_bad_row_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"instruction": ["Fine.", None, "Fine too."]}), path)

    with pytest.raises(SeedFileError, match=re.escape(f"{path} row 1: missing 'instruction'")):
        load_seeds(path)
    assert len(load_seeds(path, skip_bad_lines=True)) == 2


def test_parquet_without_instruction_column_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"prompt": ["Hello."]}), path)

    with pytest.raises(SeedFileError, match="no 'instruction' column .*prompt"):
        load_seeds(path)


# ------------------------------------------------------------------ limit and ids


def test_limit_keeps_the_first_usable_seeds(tmp_path):
    path = write_lines(
        tmp_path / "seeds.jsonl",
        [record("a"), record(" "), record("b"), record("c"), "{this line is never read"],
    )

    seeds = load_seeds(path, limit=2)

    assert [s.instruction for s in seeds] == ["a", "b"]
    assert seeds.skipped_empty == 1
    assert [s.instruction for s in load_seeds(path, limit=3)] == ["a", "b", "c"]


def test_limit_applies_to_the_shipped_file():
    assert len(load_seeds(SHIPPED, limit=8)) == 8


@pytest.mark.parametrize("limit", [0, -1])
def test_non_positive_limit_is_rejected(tmp_path, limit):
    path = write_lines(tmp_path / "seeds.jsonl", [record("a")])

    with pytest.raises(ValueError, match="limit"):
        load_seeds(path, limit=limit)


def test_generated_ids_are_stable_across_runs_and_formats(tmp_path):
    rows = [{"instruction": "Name a prime."}, {"instruction": "Name a prime.", "input": "under 10"}]
    jsonl = write_lines(tmp_path / "a.jsonl", [json.dumps(row) for row in rows])
    as_json = tmp_path / "b.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")

    first = [s.id for s in load_seeds(jsonl)]

    assert first == [s.id for s in load_seeds(jsonl)]
    assert first == [s.id for s in load_seeds(as_json)]
    assert first[0] != first[1]  # the input is part of the id
    assert all(re.fullmatch(r"seed-[0-9a-f]{12}", seed_id) for seed_id in first)
    assert first[0] == stable_seed_id("Name a prime.")
    # Surrounding whitespace does not change the id.
    assert (
        stable_seed_id("Name a prime.")
        == load_seeds(write_lines(tmp_path / "c.jsonl", [record("  Name a prime. ")]))[0].id
    )


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes("\ufeff".encode() + record("With a BOM.").encode() + b"\n")

    assert load_seeds(path)[0].instruction == "With a BOM."


# ------------------------------------------------------------------ Alpaca, CSV, column mapping


def test_alpaca_json_loads_as_it_is_and_its_output_is_ignored(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat."},
        {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."},
    ]), encoding="utf-8")

    seeds = load_seeds(path)

    assert seeds.seeds == [
        Seed(id=stable_seed_id("Give three tips for staying healthy."),
             instruction="Give three tips for staying healthy."),
        Seed(id=stable_seed_id("Translate to French.", "Good morning."),
             instruction="Translate to French.", input="Good morning."),
    ]


CSV_TEXT = (
    'qid,question,context,answer\nq1,"Explain tides, briefly.",,x\n'
    'q2,Summarise this.,"A\nshort text.",y\n'
)
MAPPING = {"instruction": "question", "input": "context", "id": "qid"}


def test_csv_with_a_column_mapping_loads_the_mapped_fields(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text(CSV_TEXT, encoding="utf-8")

    seeds = load_seeds(path, columns=MAPPING)

    assert seeds.seeds == [
        Seed(id="q1", instruction="Explain tides, briefly."),
        Seed(id="q2", instruction="Summarise this.", input="A\nshort text."),
    ]
    assert seeds[0].source == f"{path}:2"


def test_csv_with_our_own_header_needs_no_mapping(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("\ufeffinstruction,input\nExplain tides.,\n", encoding="utf-8")

    assert load_seeds(path).seeds == [
        Seed(id=stable_seed_id("Explain tides."), instruction="Explain tides.")]


def test_a_missing_mapped_column_names_file_line_and_setting(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("qid,question\nq1,Fine.\nq2\n", encoding="utf-8")

    with pytest.raises(SeedFileError, match=re.escape(
            f"{path}:3: missing column 'question' (dataset.seed_columns.instruction)")):
        load_seeds(path, columns={"instruction": "question", "id": "qid"})


def test_a_mapped_column_absent_from_the_header_is_refused_at_once(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("qid,question\nq1,Fine.\n", encoding="utf-8")

    with pytest.raises(SeedFileError, match=re.escape(
            f"{path}:1: no column 'context' (dataset.seed_columns.input) "
            "(the file's columns: qid, question)")):
        load_seeds(path, columns={"instruction": "question", "input": "context"})


def test_the_mapping_applies_to_json_and_parquet_too(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"question": "Explain tides.", "qid": "q1"}, {"qid": "q2"}]
    jsonl = write_lines(tmp_path / "seeds.jsonl", [json.dumps(r) for r in rows])
    parquet = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"question": ["Explain tides.", None], "qid": ["q1", "q2"]}), parquet)
    columns = {"instruction": "question", "id": "qid"}

    for path, where in ((jsonl, f"{jsonl}:2"), (parquet, f"{parquet} row 1")):
        with pytest.raises(SeedFileError, match=re.escape(
                f"{where}: missing column 'question' (dataset.seed_columns.instruction)")):
            load_seeds(path, columns=columns)
        assert load_seeds(path, columns=columns, skip_bad_lines=True).seeds == [
            Seed(id="q1", instruction="Explain tides.")]


def test_an_unknown_mapped_field_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        load_seeds(SHIPPED, columns={"prompt": "text"})


def test_config_seed_columns_default_reads_the_shipped_file_and_refuses_clashes():
    from rl_system.config import DatasetConfig

    default = DatasetConfig()
    assert default.seed_columns.model_dump() == {"instruction": None, "input": None, "id": None}
    mapped = load_seeds(SHIPPED, columns=default.seed_columns.model_dump())
    assert mapped.seeds == load_seeds(SHIPPED).seeds
    with pytest.raises(ValueError, match="two fields to one column"):
        DatasetConfig(seed_columns={"instruction": "text", "input": "text"})


# ------------------------------------------------------------------ a Hugging Face dataset id


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_a_hub_id_offline_or_unreachable_fails_fast_naming_the_setting_and_id(env, monkeypatch):
    from rl_system.seeds import SeedHubError
    from serve.errors import TeamsRLError

    for name, value in env.items():
        monkeypatch.setenv(name, value)  # port 9: nothing listens there
    started = time.monotonic()
    with pytest.raises(SeedHubError) as refused:
        load_seeds("hf://tatsu-lab/alpaca", limit=4)
    assert time.monotonic() - started < 5
    assert isinstance(refused.value, TeamsRLError)
    message = str(refused.value)
    assert "dataset.seeds" in message and "tatsu-lab/alpaca" in message
    assert ("HF_HUB_OFFLINE" if env["HF_HUB_OFFLINE"] == "1" else "127.0.0.1:9") in message


@pytest.mark.parametrize("spec", ["hf://alpaca", "hf://", "hf://a/b/c", "hf://a/b:"])
def test_a_malformed_hub_id_is_refused_before_any_network(spec, monkeypatch):
    from rl_system.seeds import SeedHubError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an id check must come first
    with pytest.raises(SeedHubError, match=r"dataset\.seeds.*hf://owner/name"):
        load_seeds(spec)


def test_hub_id_and_split_are_read_from_the_setting():
    from rl_system.seeds import HubSeeds

    assert HubSeeds.parse("hf://tatsu-lab/alpaca") == HubSeeds("tatsu-lab/alpaca", "train")
    assert HubSeeds.parse("hf://o/n:validation") == HubSeeds("o/n", "validation")
    assert HubSeeds.parse("data/seeds.jsonl") is None


def test_rows_of_a_hub_dataset_in_alpaca_form_become_seeds_with_their_inputs():
    datasets = pytest.importorskip("datasets")
    from rl_system.seeds import HubSeeds, seeds_from_rows

    alpaca = datasets.Dataset.from_list([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat."},
        {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."},
        {"instruction": "  ", "input": "", "output": "-"},
    ])
    seeds = seeds_from_rows(alpaca, source=HubSeeds("tatsu-lab/alpaca", "train"))

    assert seeds.path == "hf://tatsu-lab/alpaca:train"
    assert seeds.skipped_empty == 1
    assert seeds.seeds == [
        Seed(id=stable_seed_id("Give three tips for staying healthy."),
             instruction="Give three tips for staying healthy."),
        Seed(id=stable_seed_id("Translate to French.", "Good morning."),
             instruction="Translate to French.", input="Good morning."),
    ]
    assert seeds[1].source == "hf://tatsu-lab/alpaca:train row 1"
    mapped = datasets.Dataset.from_list([{"question": "Why is the sky blue?", "qid": 7}])
    [seed] = seeds_from_rows(mapped, source=HubSeeds("o/n", "train"),
                             columns={"instruction": "question", "id": "qid"})
    assert (seed.id, seed.instruction) == ("7", "Why is the sky blue?")
    with pytest.raises(SeedFileError, match="no 'instruction' column"):
        seeds_from_rows(mapped, source=HubSeeds("o/n", "train"))
