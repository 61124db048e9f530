"""GPU serving by Ray Serve LLM (vLLM engines): we configure it, we do not wrap vLLM.

Ray Serve LLM already manages engines, replicas, autoscaling and an OpenAI-compatible
API, so a ``vllm`` role becomes an ``LLMConfig`` in a ``build_openai_app`` application;
``LLMClient`` reaches it over HTTP with the ``openai`` transport. Its ingress is our
subclass ``serve.backends.vllm_ingress:KeyedOpenAiIngress`` (Ray Serve LLM's
``ingress_cls_config``), which puts the same key check and body limit as our own
ingress in front of every route.
"""

from __future__ import annotations

from typing import Any

from serve.errors import MissingExtra

VLLM_ROUTE_PREFIX = "/vllm"
EXTRA_HINT = "GPU serving needs the vllm extra: pip install 'teams-rl[vllm]'"
KEYED_INGRESS = "serve.backends.vllm_ingress:KeyedOpenAiIngress"


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


def vllm_app_args(llm_configs: list[dict[str, Any]], serve_cfg) -> dict[str, Any]:
    """``build_openai_app`` arguments (``LLMServingArgs`` as plain data, also written into
    Serve YAML): the models, and our key-checking ingress with the key file's path."""
    return {
        "llm_configs": llm_configs,
        "ingress_cls_config": {
            "ingress_cls": KEYED_INGRESS,
            "ingress_extra_kwargs": {
                "host": serve_cfg.host,
                "api_key_file": serve_cfg.api_key_file,
                "max_request_bytes": serve_cfg.limits.max_request_bytes,
            },
        },
    }


def build_vllm_app(args: dict[str, Any]):
    """A Ray Serve LLM OpenAI app serving every ``vllm`` role's model (``vllm_app_args``)."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as exc:
        raise MissingExtra(f"{EXTRA_HINT} ({exc})") from exc
    return build_openai_app(args)
