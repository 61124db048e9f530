"""Backends that run inside an ``LLMServer`` replica, behind one protocol
(``serve.protocol.LLMBackend``), found by name in a catalogue.

Adding a backend is adding an entry; each class builds its constructor arguments from its
role config (``config_kwargs(role_cfg, serve_cfg)``), and heavy packages are imported
only when one is built. ``vllm`` roles are served by Ray Serve LLM and ``openai`` roles are
external endpoints: ``LLMClient`` reaches both over HTTP, so neither is listed here.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS: dict[str, str] = {
    "transformers": "serve.backends.transformers_backend:TransformersBackend",
    "scripted": "serve.backends.scripted:ScriptedBackend",
}


def backend_class(name: str) -> type:
    try:
        module_name, cls_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(
            f"backend {name!r} does not run inside LLMServer; those that do: {', '.join(BACKENDS)}"
        ) from None
    return getattr(importlib.import_module(module_name), cls_name)


def build_backend(name: str, **kwargs: Any):
    """Construct (not load) the backend ``name``."""
    return backend_class(name)(**kwargs)


def backend_kwargs(role_cfg, serve_cfg) -> dict[str, Any]:
    """Constructor arguments for a role's backend inside an ``LLMServer`` replica."""
    return backend_class(role_cfg.backend).config_kwargs(role_cfg, serve_cfg)
