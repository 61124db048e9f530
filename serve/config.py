"""Serving configuration: how each role is served and reached, and the Serve application.

The run config (``rl_system.config.TeamsRLConfig``) composes these models as its
``models:`` and ``serve:`` sections; ``serve/`` reads nothing else of it. A role's fields
depend on its ``backend``: each backend has its own model, so a field of another backend
is refused with its path (``models.expert.base_url: a field of backend openai``)::

    models:
      expert: {backend: openai, model: gpt-4o-mini, base_url: https://api.openai.com/v1}
      reviewer: {model: embedded:smollm2-135m-instruct}   # backend: transformers

Every default of these sections lives here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from serve.auth import API_KEY_ENV
from serve.errors import ConfigError

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"

ROLES = ("instructor", "reviewer", "expert")
DEFAULT_BACKEND = "transformers"


class ConfigSection(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(ConfigSection):
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1, le=32768, description="New tokens per completion.")


class _RoleBase(ConfigSection):
    """What every role has, whatever serves it."""

    model: str = Field(EMBEDDED_LLM, description="embedded:<name>, HF model id or local path.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(
        3, ge=0, le=20,
        description="Extra attempts after a transient failure (a dead replica, 429, 5xx).",
    )
    retry_backoff_s: float = Field(
        0.5, ge=0, description="Wait before the first retry; doubles with each attempt."
    )
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side rate limit.")

    @property
    def deployment_name(self) -> str:
        """Serve deployment for this role; roles with the same backend and model share one."""
        slug = "".join(c if c.isalnum() else "-" for c in self.model.split(":")[-1].lower())
        return f"llm-{self.backend}-{slug.strip('-')}"[:60]


_SCORE_MODE = Field(
    "auto",
    description="How score() works over HTTP: echo = completions with echo+logprobs "
    "(vLLM, our ingress); top_logprobs = first answer token (the OpenAI API).",
)


class TransformersRoleConfig(_RoleBase):
    """Our ``LLMServer`` deployment running a Hugging Face causal LM (CPU or GPU)."""

    backend: Literal["transformers"] = "transformers"
    max_prompt_tokens: int | None = Field(
        None, ge=1,
        description="Longest prompt a replica accepts (default: the model's context minus "
        "the request's max_tokens); a longer one fails alone.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 "
        "(avx512_bf16, AMX), float32 elsewhere (serve.devices).",
    )


class VLLMRoleConfig(_RoleBase):
    """Ray Serve LLM (vLLM engines) on GPUs, reached over its OpenAI API."""

    backend: Literal["vllm"] = "vllm"
    base_url: str | None = Field(
        None, description="The Ray Serve LLM endpoint; default: this cluster's /vllm route."
    )
    score_mode: Literal["auto", "echo", "top_logprobs"] = _SCORE_MODE
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments, e.g. tensor_parallel_size, max_model_len, "
        "gpu_memory_utilization.",
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type for the replicas, e.g. H100."
    )


class OpenAIRoleConfig(_RoleBase):
    """An external OpenAI-compatible endpoint (the OpenAI API, a vLLM server, ...)."""

    backend: Literal["openai"] = "openai"
    base_url: str | None = Field(
        None, description="Endpoint such as https://api.openai.com/v1 (None: the OpenAI API)."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the endpoint's key."
    )
    score_mode: Literal["auto", "echo", "top_logprobs"] = _SCORE_MODE


class ScriptedRoleConfig(_RoleBase):
    """Deterministic rules instead of a model: algorithm tests only, never a default."""

    backend: Literal["scripted"] = "scripted"
    script: dict[str, Any] = Field(default_factory=dict, description="Its deterministic rules.")


ROLE_BACKENDS: dict[str, type[_RoleBase]] = {
    "transformers": TransformersRoleConfig,
    "vllm": VLLMRoleConfig,
    "openai": OpenAIRoleConfig,
    "scripted": ScriptedRoleConfig,
}


def _default_backend(data: Any) -> Any:
    # The discriminator must be present; a role without one is served by transformers.
    if isinstance(data, dict) and "backend" not in data:
        return {"backend": DEFAULT_BACKEND, **data}
    return data


ModelRoleConfig = Annotated[
    TransformersRoleConfig | VLLMRoleConfig | OpenAIRoleConfig | ScriptedRoleConfig,
    Field(discriminator="backend"),
    BeforeValidator(_default_backend),
]
_ROLE_ADAPTER: TypeAdapter = TypeAdapter(ModelRoleConfig)


def role_config(data: dict[str, Any] | None = None, **fields: Any) -> _RoleBase:
    """Validate one role's mapping (``backend`` picks the model; default transformers)."""
    return _ROLE_ADAPTER.validate_python({**(data or {}), **fields})


def _reviewer_default() -> _RoleBase:
    return TransformersRoleConfig(sampling=SamplingConfig(temperature=0.0))


class ModelsConfig(ConfigSection):
    instructor: ModelRoleConfig = Field(default_factory=TransformersRoleConfig)
    reviewer: ModelRoleConfig = Field(
        default_factory=_reviewer_default,
        description="Judges by label log-probs; samples greedily unless its sampling says.",
    )
    expert: ModelRoleConfig = Field(default_factory=TransformersRoleConfig)
    encoder: str = Field(EMBEDDED_ENCODER, description="Sentence-embedding model.")

    @model_validator(mode="before")
    @classmethod
    def _greedy_reviewer(cls, data: Any) -> Any:
        # The reviewer is greedy by default even when its section sets other fields
        # (e.g. `--set models.reviewer.dtype=float32` alone).
        if isinstance(data, dict) and isinstance(data.get("reviewer"), dict):
            reviewer = dict(data["reviewer"])
            sampling = reviewer.get("sampling")
            if sampling is None:
                reviewer["sampling"] = {"temperature": 0.0}
            elif isinstance(sampling, dict) and "temperature" not in sampling:
                reviewer["sampling"] = {**sampling, "temperature": 0.0}
            data = {**data, "reviewer": reviewer}
        return data

    def role(self, name: str) -> _RoleBase:
        if name not in ROLES:
            raise ConfigError(f"models.{name}: unknown role; expected one of {', '.join(ROLES)}")
        return getattr(self, name)


class AutoscalingConfig(ConfigSection):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class ServeLimits(ConfigSection):
    """What one HTTP request to the ingress may ask for; larger requests get a 4xx."""

    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Request body size in bytes; larger bodies get 413 "
        "before they are parsed.",
    )
    max_tokens: int = Field(
        4096, ge=1, le=131072, description="Largest max_tokens (new tokens) one request may ask."
    )
    max_stop_strings: int = Field(4, ge=0, le=64, description="Stop strings per request.")
    max_choices: int = Field(
        16, ge=1, le=256, description="Choices per request: n times the prompts of a list prompt."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Prompt tokens per request (None: the model's context length "
        "less max_tokens). For the serving backends to enforce; not applied yet.",
    )


class ServeConfig(ConfigSection):
    host: str = Field(
        "127.0.0.1",
        description="Serve's HTTP bind address. Anything but loopback needs the ingress key "
        f"(${API_KEY_ENV} or serve.api_key_file).",
    )
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("teams-rl", description="Serve application holding every role.")
    api_key_file: str | None = Field(
        None,
        description=f"File holding the ingress key (a mounted secret); ${API_KEY_ENV} wins. "
        "The path, never the key, is config (serve.auth).",
    )
    limits: ServeLimits = Field(default_factory=ServeLimits)
    max_batch_size: int = Field(8, ge=1, le=512, description="Dynamic batching per replica.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)
    max_ongoing_requests: int = Field(64, ge=1)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per LLM replica.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per LLM replica.")
    request_timeout_s: float = Field(120.0, gt=0, description="Server-side limit per request.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per CPU replica (default: num_cpus)."
    )
    access_log: bool = Field(
        False,
        description="Serve's per-request access log lines (proxy and replicas); off by "
        "default, since one line per model call drowns a run's progress.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_config(cls, data: Any) -> Any:
        # A key in YAML or --set would land in job metadata, `ps` and config dumps.
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                f"serve.api_key: the ingress key is never a config value; export "
                f"{API_KEY_ENV}=<key> or set serve.api_key_file to a file holding it"
            )
        return data

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


SERVING_SECTIONS = ("models", "serve")


class ServingConfig(ConfigSection):
    """The part of a run config ``serve/`` reads: the roles and the Serve application.

    ``TeamsRLConfig`` extends it with the stage sections; anything with ``models`` and
    ``serve`` attributes of these types works with ``serve.app`` and ``serve.client``.
    """

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @classmethod
    def from_run_config(cls, data: dict[str, Any]) -> ServingConfig:
        """The serving sections of a run config mapping (other sections are ignored)."""
        return cls.model_validate({k: data[k] for k in SERVING_SECTIONS if k in data})


def _backends_with(field: str) -> list[str]:
    return [name for name, model in ROLE_BACKENDS.items() if field in model.model_fields]


def _error_line(e: dict[str, Any]) -> str:
    loc = [str(p) for p in e["loc"]]
    # A role's errors carry the backend tag in their location (models.expert.openai.x):
    # drop it, so the path is the one the user writes, and name the backend instead.
    backend = None
    for i in range(1, len(loc)):
        if loc[i - 1] in ROLES and loc[i] in ROLE_BACKENDS:
            backend = loc.pop(i)
            break
    path = ".".join(loc) or "<root>"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        owners = _backends_with(loc[-1]) if backend else []
        if owners:
            msg = (f"a field of backend {' / '.join(owners)}, not of {backend} (set "
                   f"{'.'.join(loc[:-1])}.backend, or drop the key)")
        else:
            msg = "unknown key (check the spelling; see configs/demo.yaml for valid keys)"
    elif e["type"] == "union_tag_invalid":
        path += ".backend"
        msg = f"expected one of {', '.join(ROLE_BACKENDS)}"
    return f"  {path}: {msg}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"serve.max_batch_size=4"`` -> ``("serve.max_batch_size", 4)``; values parse as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. serve.max_batch_size=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key, value


Config = TypeVar("Config", bound=BaseModel)


def load_yaml_config(model: type[Config], path: str | os.PathLike | None = None,
                     overrides: list[str] = (), *, sections: tuple[str, ...] | None = None
                     ) -> Config:
    """Read YAML (or start from defaults), apply ``key=value`` overrides, validate as
    ``model``; ``sections`` keeps only those top-level keys. Raises ``ConfigError``
    naming the file, line or field path."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
        source += f" + --set {key}"
    if sections is not None:
        data = {k: v for k, v in data.items() if k in sections}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid config ({source}):", *(_error_line(e) for e in err.errors())]
        raise ConfigError("\n".join(lines)) from None
