"""Benchmark: bf16 SFT training steps on one GPU — tokens/s, MFU and peak memory.

Run on a CUDA machine: ``python bench/sft_gpu_step.py [--layers 16 --hidden 2048 ...]``.
It needs no Ray and no model download: the model is a randomly initialised Llama of the
shape given (default: Llama-3.2-1B's), since step time depends on the shape, not the
weights. Each strategy wraps it with ``train.parallel.wrap_for_training`` — the SFT
worker's own FSDP2 / DDP wrapping, bf16 compute with fp32 master weights — in a one-rank
NCCL group, and trains on random token rows whose first half is masked as the prompt, with
the loss of ``train.recipe.token_loss_sum``. Prints one JSON line::

    {"bench": "sft_gpu_step", "figures": {"fsdp": {...}, "ddp": {...}}, ...}

MFU is 6 x parameters x tokens/s over the GPU's dense bf16 peak (``--peak-tflops``,
default 989, an H100/H200 SXM's datasheet figure); attention FLOPs are left out, so it
is a slight underestimate at long sequence lengths.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_strategy(args: argparse.Namespace, strategy: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.data import IGNORE_INDEX
    from train.parallel import wrap_for_training
    from train.recipe import token_loss_sum

    device = torch.device("cuda", 0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # fp32 master weights, as the SFT worker loads them
    n_params = sum(p.numel() for p in model.parameters())
    model, autocast = wrap_for_training(
        model, strategy=strategy, device=device, world_size=1,
        activation_checkpointing=args.activation_checkpointing,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    labels = input_ids.clone()
    labels[:, : args.seq_len // 2] = IGNORE_INDEX
    position_ids = torch.arange(args.seq_len, device=device).expand(args.batch, -1)
    n_label_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())

    def step() -> torch.Tensor:
        with autocast():
            logits = model(input_ids=input_ids, position_ids=position_ids,
                           use_cache=False).logits
            loss = token_loss_sum(logits, labels) / n_label_tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens_per_s = args.batch * args.seq_len * args.steps / elapsed
    result = {
        "params": n_params,
        "step_s": round(elapsed / args.steps, 4),
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(6 * n_params * tokens_per_s / (args.peak_tflops * 1e12), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": round(float(loss), 3),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--strategies", default="fsdp,ddp")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():  # `make bench` runs every bench, on CPU machines too
        print(json.dumps({"bench": "sft_gpu_step", "skipped": "needs a CUDA GPU"}))
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    try:
        figures = {}
        for strategy in args.strategies.split(","):
            figures[strategy] = run_strategy(args, strategy)
            gc.collect()  # free one strategy's model and optimizer before the next
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    print(json.dumps({
        "bench": "sft_gpu_step",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads",
                                                  "kv_heads", "vocab", "seq_len", "batch")},
        "activation_checkpointing": args.activation_checkpointing,
        "figures": figures,
    }))


if __name__ == "__main__":
    main()
