"""The CUDA code paths that CPU CI never reaches: bf16 serving, bf16 FSDP/DDP training
steps, and the membership-inference attack on the GPU.

Skipped without CUDA (``gpu`` marker). The model is the embedded SmolLM2, or the Hugging
Face directory in ``$TEAMS_RL_GPU_TEST_MODEL`` (e.g. a small random-weight model on a GPU
machine that lacks the embedded package). Ray is not needed: the training steps run the
SFT worker's own model wrapping in a one-rank process group.
"""

from __future__ import annotations

import os

import pytest

from tests.integration.test_report import check_mia_attacks

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir() -> str:
    if os.environ.get("TEAMS_RL_GPU_TEST_MODEL"):
        return os.environ["TEAMS_RL_GPU_TEST_MODEL"]
    from serve.models import resolve_model

    return resolve_model("embedded:smollm2-135m-instruct")


RECORDS = [
    {"instruction": f"What is the capital of {country}?", "response": f"It is {city}."}
    for country, city in (("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"),
                          ("Kenya", "Nairobi"))
]


def test_transformers_backend_serves_in_bf16_on_cuda(model_dir):
    import torch

    from serve.backends.transformers_backend import TransformersBackend
    from serve.protocol import ChatMessage, GenerationRequest, ScoreRequest

    backend = TransformersBackend(model_dir)
    backend.load()
    assert backend._device == "cuda"
    assert next(backend._model.parameters()).dtype == torch.bfloat16
    completions = backend.generate([
        GenerationRequest(messages=[ChatMessage(role="user", content=p)], max_tokens=8,
                          temperature=t)
        for p, t in (("Name a colour.", 0.0), ("Count to three.", 0.7))
    ])
    assert [c.completion_tokens > 0 for c in completions] == [True, True]
    [scored] = backend.score([ScoreRequest(messages=[ChatMessage(role="user", content="Hi")],
                                           candidates=["Hello", "Goodbye there"])])
    assert len(scored.logprobs) == 2 and all(lp < 0 for lp in scored.logprobs)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_training_steps_in_bf16_on_cuda_lower_the_loss(model_dir, strategy, monkeypatch):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.integration.conftest import free_port
    from train.data import collate, tokenize_records
    from train.parallel import wrap_for_training
    from train.recipe import token_loss_sum

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples, _ = tokenize_records(RECORDS, tokenizer, max_seq_len=64)
        batch = collate({"input_ids": [e.input_ids for e in examples],
                         "labels": [e.labels for e in examples]},
                        pad_id=tokenizer.pad_token_id or 0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model, autocast = wrap_for_training(model, strategy=strategy, device=device,
                                            world_size=1, activation_checkpointing=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        labels = batch["labels"].to(device)
        n_tokens = int((labels[:, 1:] != -100).sum())
        losses = []
        for _ in range(15):
            with autocast():
                logits = model(input_ids=batch["input_ids"].to(device),
                               position_ids=batch["position_ids"].to(device),
                               use_cache=False).logits
                loss = token_loss_sum(logits, labels) / n_tokens
            assert logits.dtype == torch.bfloat16  # bf16 compute under both strategies
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        master = next(model.parameters())
        master = master.to_local() if hasattr(master, "to_local") else master
        assert master.dtype == torch.float32 and master.is_cuda  # fp32 master weights
        # Every step lowers it, by more than a nat in all. (A random-weight model starts near
        # ln(vocab) and memorises more slowly than the pretrained SmolLM2 of the CPU test.)
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
        assert losses[-1] < losses[0] - 1.0, losses
    finally:
        dist.destroy_process_group()


def test_membership_inference_runs_on_cuda(model_dir):
    from train.privacy import run_mia

    members = list(RECORDS)
    non_members = [{"instruction": q, "response": a} for q, a in (
        ("What colour is the sky?", "Blue."), ("How many legs has a cat?", "Four."),
        ("What is ice?", "Frozen water."), ("Who wrote Hamlet?", "Shakespeare."))]
    out = run_mia(model_dir, members, non_members, device="cuda", max_tokens=32)
    assert out["n_members"] == out["n_non_members"] == 4
    check_mia_attacks(out)  # each AUC is the area under its own ROC points
    # The same attack on the CPU (fp32 both): the GPU path scores the same tokens.
    cpu = run_mia(model_dir, members, non_members, device="cpu", max_tokens=32)
    for attack in ("loss", "zlib", "min_k"):
        for key in ("member_score_mean", "non_member_score_mean"):
            assert out["attacks"][attack][key] == pytest.approx(
                cpu["attacks"][attack][key], rel=1e-3, abs=1e-4), (attack, key)
