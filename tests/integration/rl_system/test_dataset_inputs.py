"""Seeds with inputs, end to end (scripted expert and reviewer): every kept row of a seed
whose action path has no ``breadth`` carries the seed's input in parquet, the Alpaca and
chat exports and the SFT example built from it; after ``breadth`` the input is gone."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from rl_system.config import SeedColumns
from rl_system.dataset import build_dataset
from rl_system.tasks import task_text

pytestmark = pytest.mark.slow

SEEDS = [
    {"id": "memo", "instruction": "Summarise the memo for the sales team.",
     "input": "Memo: the launch moved from May 3 to May 17 because QA needs two more weeks."},
    {"id": "code", "instruction": "Explain what this function returns for n = 4.",
     "input": "def f(n):\n    return n * f(n - 1) if n else 1"},
    {"id": "table", "instruction": "Which city in the table is the warmest in July?",
     "input": "city | July mean\nOslo | 17 C\nMadrid | 26 C\nLima | 15 C"},
    {"id": "plain", "instruction": "Describe how a bicycle gear works."},
]
# One reply per action (keyed by words of its request), so rewrites differ.
SCRIPT = {
    "rules": [
        {"contains": "requirement or limit", "reply": "{instruction} Use at most five lines."},
        {"contains": "causes, trade-offs", "reply": "{instruction} Explain the reasons behind it."},
        {"contains": "specific, concrete case", "reply": "{instruction} Take a real example."},
        {"contains": "several explicit steps", "reply": "{instruction} Show each step in order."},
        {"contains": "small piece of input data", "reply": "{instruction} Add a worked number."},
        {"contains": "rarer, less obvious topic",
         "reply": "Write a short guide to repairing a torn kite sail at the beach."},
    ],
    "default": "Answer to: {last_user}",
    "score": {"prefer": "Not Equal", "when_bracketed_differ": True},
}


@pytest.fixture(scope="module")
def built(scripted_roles, tmp_path_factory):
    """The seeds as users have them: a CSV with its own column names, mapped by
    ``dataset.seed_columns`` (the inputs hold commas, quotes' worth of code and newlines)."""
    root = tmp_path_factory.mktemp("inputs")
    seeds = root / "seeds.csv"
    with seeds.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "prompt", "context"])
        writer.writeheader()
        writer.writerows({"key": s["id"], "prompt": s["instruction"],
                          "context": s.get("input", "")} for s in SEEDS)
    with scripted_roles(
        "dsinputs", SCRIPT, f"run.dir={root / 'runs'}",
        "dataset.strategy=wizardlm", "dataset.wizardlm_rounds=4", f"dataset.seeds={seeds}",
        "dataset.seed_columns={instruction: prompt, input: context, id: key}",
        "dataset.dedupe_threshold=1.0", "serve.batch_wait_timeout_s=0",
    ) as cfg:
        manifest = build_dataset(cfg)
        # Alpaca's alpaca_data.json as it is (its own field names, an `output` we ignore)
        alpaca = cfg.model_copy(deep=True)
        alpaca.run.name, alpaca.dataset.seed_columns = "alpaca", SeedColumns()
        alpaca.dataset.seeds = str(root / "alpaca_data.json")
        alpaca.dataset.wizardlm_rounds = 1
        (root / "alpaca_data.json").write_text(json.dumps(
            [{"instruction": s["instruction"], "input": s.get("input", ""), "output": "-"}
             for s in SEEDS[:2]]))
        build_dataset(alpaca)
    return cfg, manifest


def test_every_output_carries_the_input_of_its_seed(built):
    cfg, manifest = built
    assert manifest["status"] == "complete"
    out = cfg.stage_dir("dataset")
    rows = pq.read_table(out / "data").to_pylist()
    # ids come from the CSV's key column; every seed with an input kept rows
    assert {s["id"] for s in SEEDS if s.get("input")} <= {r["seed_id"] for r in rows}
    assert {r["seed_id"] for r in rows} <= {s["id"] for s in SEEDS}
    inputs = {s["id"]: s.get("input", "") for s in SEEDS}
    with_input = [r for r in rows if inputs[r["seed_id"]]]
    assert any("breadth" in r["actions"] for r in with_input)  # both kinds of path occur
    assert any("breadth" not in r["actions"] for r in with_input)
    for r in rows:
        expected = "" if "breadth" in r["actions"] else inputs[r["seed_id"]]
        assert r["input"] == expected, r
        # the expert answered the task with its input (the scripted expert echoes it,
        # its words joined by single spaces)
        asked = f"Answer to: {task_text(r['instruction'], expected)}"
        assert r["response"] == " ".join(asked.split())

    by_id = {r["id"]: r for r in rows}
    alpaca = json.loads((out / "alpaca.json").read_text())
    chat = [json.loads(line) for line in (out / "chat.jsonl").read_text().splitlines()]
    assert len(alpaca) == len(chat) == len(rows)
    for r, a, c in zip(rows, alpaca, chat, strict=True):
        assert (a["instruction"], a["input"], a["output"]) == (
            r["instruction"], r["input"], r["response"])
        assert c["messages"][0]["content"] == task_text(r["instruction"], r["input"])
    assert set(by_id) == {r["id"] for r in rows}


def test_the_sft_examples_show_the_input(built):
    from rl_system.config import EMBEDDED_LLM
    from train.data import load_sft_datasets, load_tokenizer

    cfg, _ = built
    rows = pq.read_table(cfg.stage_dir("dataset") / "data").to_pylist()
    data = load_sft_datasets(cfg.stage_dir("dataset") / "data", model_ref=EMBEDDED_LLM,
                             max_seq_len=512, packing=False, eval_fraction=0.0, seed=0)
    tokenizer = load_tokenizer(EMBEDDED_LLM)
    prompts = [tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"], strict=True)
                                 if lab == -100])
               for r in data.train.take_all()]
    assert len(prompts) == len(rows)
    for r in rows:
        user_turn = task_text(r["instruction"], r["input"])
        assert sum(f"user\n{user_turn}<|im_end|>" in p for p in prompts) == 1, user_turn


def test_the_build_loads_with_datasets_card_and_chat_in_the_hub_forms(built, tmp_path):
    """A real build, read as Hugging Face users read it: ``datasets`` gives struct and list
    features, the card's YAML ``dataset_info.features`` match the parquet, and chat.jsonl is
    TRL's conversational form, ``{"messages": [{"role", "content"}, ...]}`` with roles
    system/user/assistant (https://huggingface.co/docs/trl/dataset_formats)."""
    datasets = pytest.importorskip("datasets")
    import yaml

    cfg, _ = built
    out = cfg.stage_dir("dataset")
    data_files = sorted(str(p) for p in (out / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=data_files, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["review"], dict)  # datasets' form of a struct
    assert isinstance(ds.features["review"]["info_gain"], datasets.Value)
    assert isinstance(ds.features["actions"], datasets.List | datasets.Sequence)
    assert ds.num_rows == pq.read_metadata(data_files[0]).num_rows
    assert isinstance(ds[0]["review"], dict) and isinstance(ds[0]["actions"], list)

    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front = yaml.safe_load(text[4:].partition("\n---\n")[0])
    assert front["dataset_info"]["features"] == ds.features._to_yaml_list()
    assert front["dataset_info"]["splits"] == [{"name": "train", "num_examples": ds.num_rows}]

    chat = datasets.load_dataset("json", data_files=str(out / "chat.jsonl"), split="train",
                                 cache_dir=str(tmp_path / "hf"))
    assert chat.column_names == ["messages"]
    assert chat.num_rows == ds.num_rows
    for example in chat:
        turns = example["messages"]
        assert all(set(t) == {"role", "content"} for t in turns)
        assert all(isinstance(t["content"], str) and t["content"] for t in turns)
        roles = [t["role"] for t in turns]
        assert set(roles) <= {"system", "user", "assistant"}
        assert roles[-1] == "assistant" and "user" in roles


def test_alpaca_json_as_it_is_builds_a_dataset(built):
    cfg, _ = built
    out = cfg.run_dir.parent / "alpaca" / "dataset"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    rows = pq.read_table(out / "data").to_pylist()
    seeds = {s["instruction"]: s.get("input", "") for s in SEEDS[:2]}
    assert rows and {r["seed_instruction"] for r in rows} <= set(seeds)
    for r in rows:  # one round: the input stays unless the round was breadth
        assert r["input"] == ("" if "breadth" in r["actions"] else seeds[r["seed_instruction"]])
