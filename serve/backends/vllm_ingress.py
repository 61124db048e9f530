"""Ray Serve LLM's OpenAI ingress behind our key check and body limit (GPU clusters).

Named by ``serve.backends.vllm_backend.vllm_app_args`` as the ``ingress_cls`` of
``build_openai_app``; importing it needs the vllm extra (``ray.serve.llm``).
"""

from __future__ import annotations

from ray.serve.llm.ingress import OpenAiIngress

from serve.auth import check_exposure, guard, load_api_key


class KeyedOpenAiIngress(OpenAiIngress):
    """``OpenAiIngress`` whose every route needs ``Authorization: Bearer <key>``."""

    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        host: str = "127.0.0.1",
        api_key_file: str | None = None,
        max_request_bytes: int = 1_048_576,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        # Read in the replica, from its environment or the mounted file; never an argument.
        self._key = load_api_key(api_key_file)
        check_exposure(host, self._key)
        self._max_request_bytes = max_request_bytes

    async def __serve_build_asgi_app__(self):
        # Serve calls this after the constructor and before the app starts.
        return guard(self.app, key=self._key, max_request_bytes=self._max_request_bytes)
