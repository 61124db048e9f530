"""Packing on the embedded SmolLM2: examples sharing a row never attend to each other."""

from __future__ import annotations

import pytest

from rl_system.config import EMBEDDED_LLM
from train.data import collate, load_tokenizer, pack_examples, tokenize_records


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_LLM)


def test_packed_examples_do_not_see_each_other(tokenizer):
    """A packed row gives every example the logits it gets alone (SDPA, no mask passed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from serve.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(EMBEDDED_LLM),
                                                 dtype=torch.float32).eval()
    records = [{"instruction": "Say hello.", "response": "Hello!"},
               {"instruction": "Count to three.", "response": "One, two, three."}]
    examples, _ = tokenize_records(records, tokenizer, max_seq_len=256)
    packed = collate({k: [r[k] for r in pack_examples(examples, max_seq_len=256)]
                      for k in ("input_ids", "labels", "seq_lens")}, pad_id=0)
    assert packed["input_ids"].shape[0] == 1  # both examples share one row

    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers ignores packing.
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         use_cache=False).logits[0]
        start = 0
        for example in examples:
            n = len(example.input_ids)
            alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(together[start:start + n], alone, atol=2e-4, rtol=1e-4)
            start += n
        # Control: without restarted positions the second example does see the first.
        unpacked = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(unpacked[start - n:start], alone, atol=1e-2)
