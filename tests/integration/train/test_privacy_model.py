"""Membership-inference attacks on a model that memorised its members, and on one that
saw neither set (a tiny random-weight Llama trained here for seconds)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from train.privacy import run_mia

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    adj = ["red", "quiet", "small", "bright", "old", "green", "tall", "warm", "soft", "cold"]
    noun = ["fox", "river", "teacher", "lamp", "garden", "robot", "violin", "bridge", "owl",
            "kettle", "comet", "farmer"]
    verb = ["paints", "follows", "repairs", "watches", "carries", "builds", "hides", "cleans"]
    place = ["market", "harbour", "library", "forest", "station", "kitchen", "valley", "roof"]
    return [
        f"The {rng.choice(adj)} {rng.choice(noun)} {rng.choice(verb)} the "
        f"{rng.choice(noun)} near the {rng.choice(place)} every {rng.choice(adj)} morning."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def memorised_model(tmp_path_factory):
    """A tiny randomly initialised Llama (SmolLM2's tokenizer) trained to memorise 16 texts.

    Same architecture family as the SFT model, ~100x fewer parameters, so it memorises in
    seconds on a loaded CPU; the attack code path is the one used on the real model.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from serve.models import resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    texts = _sentences(np.random.default_rng(1), 48)
    members, non_a, non_b = texts[:16], texts[16:32], texts[32:]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    batch = tok(members, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("mia_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, members, non_a, non_b, float(loss.detach())


@pytest.mark.slow  # ~15 s CPU (training + transformers import); minutes on a loaded box
def test_mia_detects_memorised_members(memorised_model):
    model_dir, members, non_a, _, final_loss = memorised_model
    result = run_mia(model_dir, members, non_a, min_k=0.2, batch_size=16)
    assert final_loss < 1.5, "the tiny model should have memorised its 16 texts"
    assert result["n_members"] == result["n_non_members"] == 16
    assert set(result["attacks"]) == {"loss", "zlib", "min_k"}
    assert result["attacks"]["loss"]["auc"] > 0.8
    assert result["attacks"]["min_k"]["auc"] > 0.8
    roc = result["attacks"]["loss"]["roc"]
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1


@pytest.mark.slow  # ~15 s CPU (training + transformers import); minutes on a loaded box
def test_mia_is_chance_between_non_members(memorised_model):
    model_dir, _, non_a, non_b, _ = memorised_model
    result = run_mia(model_dir, non_a, non_b, batch_size=16)
    for name, res in result["attacks"].items():
        assert abs(res["auc"] - 0.5) <= 0.2, (name, res["auc"])


@pytest.mark.slow  # ~15 s CPU (training + transformers import); minutes on a loaded box
def test_record_items_score_only_the_response(memorised_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data import IGNORE_INDEX, tokenize_example
    from train.privacy import token_logprobs

    model_dir = memorised_model[0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    record = {"instruction": "Hello", "response": "there friend"}
    plain, paired = token_logprobs(model, tok, ["Hello there friend", record])
    labels = tokenize_example(record, tok, max_seq_len=256).labels
    assert len(paired) == sum(label != IGNORE_INDEX for label in labels)
    assert len(plain) == len(tok("Hello there friend", add_special_tokens=False)["input_ids"]) - 1
