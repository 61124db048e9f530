"""Backends behind one protocol (``serve.protocol.LLMBackend``), found by name.

Adding a backend is adding an entry; heavy packages are imported only when one is built.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS: dict[str, str] = {
    "transformers": "serve.backends.transformers_backend:TransformersBackend",
    "openai": "serve.backends.openai_backend:OpenAIBackend",
    "scripted": "serve.backends.scripted:ScriptedBackend",
}


def build_backend(name: str, **kwargs: Any):
    """Construct (not load) the backend ``name``; ``vllm`` is served by Ray Serve LLM."""
    if name == "vllm":
        raise ValueError("vllm roles are served by Ray Serve LLM; see serve.backends.vllm_backend")
    try:
        module_name, cls_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}, vllm") from None
    return getattr(importlib.import_module(module_name), cls_name)(**kwargs)


def backend_kwargs(role_cfg, serve_cfg) -> dict[str, Any]:
    """Constructor arguments for a role's backend inside an ``LLMServer`` replica."""
    if role_cfg.backend == "transformers":
        threads = serve_cfg.torch_threads or max(1, int(serve_cfg.num_cpus))
        return {"model": role_cfg.model, "torch_threads": threads}
    if role_cfg.backend == "scripted":
        return {"model": role_cfg.model, "script": dict(role_cfg.script)}
    if role_cfg.backend == "openai":
        return {
            "model": role_cfg.model,
            "base_url": role_cfg.base_url,
            "api_key_env": role_cfg.api_key_env,
            "score_mode": role_cfg.score_mode,
            "timeout_s": role_cfg.timeout_s,
            "max_retries": role_cfg.max_retries,
            "requests_per_minute": role_cfg.requests_per_minute,
        }
    raise ValueError(f"backend {role_cfg.backend!r} does not run inside LLMServer")
