"""SFT examples: what the model learns from, how long rows get, and that packing isolates."""

from __future__ import annotations

import copy

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl_system.config import EMBEDDED_LLM
from train.data import (
    IGNORE_INDEX,
    SFTDataError,
    collate,
    end_of_turn_id,
    load_tokenizer,
    pack_examples,
    parquet_files,
    prompt_text,
    tokenize_batch,
    tokenize_example,
    tokenize_records,
    validate_files,
)

RECORD = {
    "instruction": "Name the largest planet of the solar system.",
    "response": "Jupiter is the largest planet; it is a gas giant.",
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_LLM)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template, as a base (non-instruct) model has."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def _learned(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def _prompt(example, tokenizer) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True)
                             if lab == IGNORE_INDEX])


def test_chat_template_loss_is_on_the_response_and_end_of_turn_only(tokenizer):
    example = tokenize_example(RECORD, tokenizer, max_seq_len=512)

    assert _learned(example, tokenizer) == RECORD["response"] + "<|im_end|>"
    assert example.labels[-1] == example.input_ids[-1] == end_of_turn_id(tokenizer)
    # Everything before the answer is the template's prompt, and none of it is learned.
    assert _prompt(example, tokenizer) == prompt_text(RECORD, tokenizer)
    assert _prompt(example, tokenizer).endswith("<|im_start|>assistant\n")
    assert RECORD["instruction"] in _prompt(example, tokenizer)
    assert not example.truncated


def test_optional_input_goes_into_the_prompt(tokenizer):
    record = {**RECORD, "input": "Planets: Mars, Jupiter, Venus."}
    example = tokenize_example(record, tokenizer, max_seq_len=512)

    assert "Planets: Mars, Jupiter, Venus." in _prompt(example, tokenizer)
    assert _learned(example, tokenizer) == RECORD["response"] + "<|im_end|>"


def test_the_sft_prompt_is_the_chat_exports_user_turn(tokenizer, tmp_path):
    """One rendering of instruction + input: what stage 2's chat export (and the expert)
    show is what SFT trains the model to answer."""
    import json

    from rl_system.dataset.outputs import _write_outputs
    from rl_system.tasks import task_text

    row = {"id": "a", "seed_id": "s", "seed_instruction": "x", "actions": ["deepening"],
           "evolution_step": 1, "review": None, "expert_model": "m", "expert_queries": 1,
           "expert_tokens": 1, "strategy": "wizardlm", "policy_checkpoint": None,
           "instruction": "Summarise the memo in one line.",
           "input": "Memo: the launch moved to May 17.", "response": "Launch: May 17."}
    _write_outputs(tmp_path, [row])
    [chat] = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    user_turn = chat["messages"][:1]
    assert user_turn[0]["content"] == task_text(row["instruction"], row["input"])
    assert prompt_text(row, tokenizer) == tokenizer.apply_chat_template(
        user_turn, add_generation_prompt=True, tokenize=False)
    example = tokenize_example(row, tokenizer, max_seq_len=512)
    assert row["input"] in _prompt(example, tokenizer)


def test_alpaca_template_without_chat_template(plain_tokenizer):
    example = tokenize_example(RECORD, plain_tokenizer, max_seq_len=512)
    prompt = _prompt(example, plain_tokenizer)

    assert prompt.startswith(plain_tokenizer.bos_token + "Below is an instruction")
    assert f"### Instruction:\n{RECORD['instruction']}\n\n### Response:\n" in prompt
    assert "<|im_start|>" not in prompt.replace(plain_tokenizer.bos_token, "", 1)
    assert _learned(example, plain_tokenizer) == RECORD["response"] + plain_tokenizer.eos_token

    with_input = tokenize_example({**RECORD, "input": "Mars, Jupiter"}, plain_tokenizer,
                                  max_seq_len=512)
    assert "### Input:\nMars, Jupiter\n\n### Response:\n" in _prompt(with_input, plain_tokenizer)


def test_truncation_is_counted_and_hopeless_examples_dropped(tokenizer):
    short = tokenize_example(RECORD, tokenizer, max_seq_len=512)
    limit = len(short.input_ids)  # RECORD fits exactly
    answer_room = sum(lab != IGNORE_INDEX for lab in short.labels)
    long_record = {**RECORD, "response": "very " * 200 + "long."}
    huge_prompt = {**RECORD, "instruction": "word " * 300}

    examples, stats = tokenize_records([RECORD, long_record, huge_prompt], tokenizer,
                                       max_seq_len=limit)

    assert stats.records == 3
    assert stats.truncated == 2  # the long answer, and the prompt that fills the row
    assert stats.dropped == 1  # ... which leaves no answer token, so it is not kept
    assert stats.examples == len(examples) == 2
    cut = examples[1]
    assert cut.truncated and len(cut.input_ids) == limit
    assert sum(lab != IGNORE_INDEX for lab in cut.labels) == answer_room
    assert not examples[0].truncated
    assert all(len(e.input_ids) <= limit for e in examples)


def test_packing_fills_rows_and_restarts_positions(tokenizer):
    records = [{"instruction": f"Say {w}.", "response": w} for w in ("one", "two", "three")]
    examples, _ = tokenize_records(records, tokenizer, max_seq_len=512)
    lens = [len(e.input_ids) for e in examples]

    rows = list(pack_examples(examples, max_seq_len=lens[0] + lens[1]))

    assert [r["seq_lens"] for r in rows] == [lens[:2], lens[2:]]
    assert [r["num_examples"] for r in rows] == [2, 1]
    batch = collate({k: [r[k] for r in rows] for k in ("input_ids", "labels", "seq_lens")},
                    pad_id=tokenizer.pad_token_id)
    first = batch["position_ids"][0].tolist()
    assert first == list(range(lens[0])) + list(range(lens[1]))
    # The short row is right-padded; pads are never learned.
    second = batch["labels"][1]
    assert (second[lens[2]:] == IGNORE_INDEX).all()
    assert batch["num_tokens"] == sum(lens)


def test_tokenize_batch_returns_training_rows(tokenizer):
    batch = {"instruction": [RECORD["instruction"]] * 3, "response": [RECORD["response"]] * 3}

    unpacked = tokenize_batch(batch, model_ref=EMBEDDED_LLM, max_seq_len=512, packing=False)
    packed = tokenize_batch(batch, model_ref=EMBEDDED_LLM, max_seq_len=512, packing=True)

    assert unpacked.num_rows == 3 and packed.num_rows == 1
    assert packed.column("num_examples").to_pylist() == [3]
    assert sum(packed.column("seq_lens").to_pylist()[0]) == len(
        packed.column("input_ids").to_pylist()[0])


def test_dataset_files_are_checked_before_reading(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{**RECORD, "id": "a"}]), good)
    no_response = tmp_path / "bad" / "part-0.parquet"
    no_response.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"instruction": "x", "answer": "y"}]), no_response)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()),
                             "response": pa.array([], pa.string())}), empty)

    assert validate_files(parquet_files(good)) == 1
    with pytest.raises(SFTDataError, match=r"part-0\.parquet has no 'response' column"):
        validate_files(parquet_files(no_response.parent))
    with pytest.raises(SFTDataError, match="has no rows"):
        validate_files([empty])
    with pytest.raises(SFTDataError, match="does not exist"):
        parquet_files(tmp_path / "missing")
