"""How an SFT worker spreads the model over the process group: FSDP2 or DDP.

FSDP2 (``fully_shard``) makes one unit per decoder layer, then the root (embeddings, final
norm, lm_head), so only one layer is unsharded at a time; DDP replicates the model. On
CUDA both compute in bf16 with fp32 master weights (and fp32 gradient reduction under
FSDP). Torch is imported where used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any


def wrap_for_training(
    model: Any, *, strategy: str, device: Any, world_size: int, activation_checkpointing: bool
) -> tuple[Any, Callable[[], Any]]:
    """Shard (FSDP2) or replicate (DDP) ``model`` over the process group; on CUDA, compute
    in bf16 with fp32 master weights. Returns the model and the autocast context factory
    each forward pass runs under. The process group must be initialised."""
    import torch

    model.config.use_cache = False
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = device.type == "cuda"
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        # bf16 compute with fp32 master weights and fp32 gradient reduction on GPU.
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None,
            reduce_dtype=torch.float32 if bf16 else None,
        )
        # One FSDP unit per decoder layer: only one layer is unsharded at a time.
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # embeddings, final norm, lm_head
        return model, contextlib.nullcontext
    from torch.nn.parallel import DistributedDataParallel

    model.to(device)
    model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext)
    return model, autocast


def _local(t: Any) -> Any:
    """The part of a (possibly sharded DTensor) tensor that this rank stores."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: Any) -> int:
    local = _local(t)
    return local.numel() * local.element_size()


def _decoder_layers(model: Any) -> list[Any]:
    """The repeated transformer blocks, by the class names HF marks as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard")
    return layers
