"""GPU serving by Ray Serve LLM (vLLM engines): we configure it, we do not wrap vLLM.

Ray Serve LLM already manages engines, replicas, autoscaling and an OpenAI-compatible
API, so a ``vllm`` role becomes an ``LLMConfig`` in a ``build_openai_app`` application;
``LLMClient`` reaches it over HTTP with the ``openai`` transport.
"""

from __future__ import annotations

from typing import Any

VLLM_ROUTE_PREFIX = "/vllm"
EXTRA_HINT = "GPU serving needs the vllm extra: pip install 'teams-rl[vllm]'"


def llm_config_dict(*, role_cfg, model_source: str, serve_cfg) -> dict[str, Any]:
    """Plain-data ``ray.serve.llm.LLMConfig`` for one model (also written into Serve YAML)."""
    auto = serve_cfg.autoscaling
    config = {
        "model_loading_config": {"model_id": role_cfg.model, "model_source": model_source},
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": auto.min_replicas,
                "max_replicas": auto.max_replicas,
                "target_ongoing_requests": auto.target_ongoing_requests,
                "upscale_delay_s": auto.upscale_delay_s,
                "downscale_delay_s": auto.downscale_delay_s,
            },
            "max_ongoing_requests": serve_cfg.max_ongoing_requests,
        },
        "engine_kwargs": {"max_num_seqs": serve_cfg.max_batch_size, **role_cfg.engine_kwargs},
    }
    if role_cfg.accelerator_type:
        config["accelerator_type"] = role_cfg.accelerator_type
    return config


def build_vllm_app(llm_configs: list[dict[str, Any]]):
    """A Ray Serve LLM OpenAI app serving every ``vllm`` role's model."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise ImportError(f"{EXTRA_HINT} ({exc})") from exc
    return build_openai_app({"llm_configs": [LLMConfig(**c) for c in llm_configs]})
