"""A tiny random-weight Llama with the embedded SmolLM2's tokenizer, for tests whose
assertions are about orchestration (placement, resume, files), not what a model learns.

About 3.3M parameters: SFT steps, exports, lm-eval and MIA scoring take a fraction of a
second each, where SmolLM2-135M takes seconds to minutes on a 2-core machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_llama(target: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rl_system.config import EMBEDDED_LLM
    from serve.models import resolve_model

    if (target / "config.json").exists():
        return target
    source = Path(resolve_model(EMBEDDED_LLM))
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(staging)
    GenerationConfig.from_pretrained(source).save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, staging / name)
    staging.rename(target)
    return target
