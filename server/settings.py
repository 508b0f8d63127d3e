"""alignd's configuration: one settings object, from CLI flags > ``ALIGND_*`` environment > YAML file > defaults.

The YAML file (``alignd serve --config FILE``; ``ALIGND_CONFIG``) has three sections::

    server:   {host, port, api_keys, max_body_bytes, max_concurrent_requests}
    models:   {name: {path, engine, url, dtype, max_model_len, task, chat_template, prompt_format, vllm}}
    recipes:  {name: {decoder, roles: {role: model | {model, system_prompt, prompt_format}}, params}}

Environment variables override single keys with ``__`` between levels, for example
``ALIGND_SERVER__PORT=9000`` or ``ALIGND_MODELS__gemma-3-270m__DTYPE=float32``.
A bad file is rejected before any model loads with :class:`ConfigError`, naming the file, key and reason.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from alignd.server.model_store import alignd_home

__all__ = [
    "ConfigError",
    "ModelSettings",
    "RecipeSettings",
    "RoleBinding",
    "ServerSettings",
    "Settings",
    "alignd_home",
    "default_config_path",
    "load_settings",
]


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names file, key and reason."""


def default_config_path() -> Path:
    """The configuration that ships with the package: the embedded default models and example recipes."""
    return Path(str(resources.files("alignd.server").joinpath("default_config.yaml")))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """One hosted model."""

    path: str = Field(description="Local folder or hub id of the checkpoint ({home} expands to ALIGND_HOME).")
    engine: Literal["local", "remote"] = Field(
        "local", description="local: an in-process vLLM AsyncLLM; remote: a `vllm serve` reached at `url`."
    )
    url: str | None = Field(None, description="Base URL of the remote vLLM OpenAI server (engine: remote).")
    api_key: str | None = Field(None, description="Key sent to the remote vLLM server, if it needs one.")
    served_name: str | None = Field(None, description="Model name on the remote server (default: `path`).")
    dtype: str = Field("auto", description="Weights dtype passed to vLLM: auto, float32, bfloat16, float16.")
    max_model_len: int | None = Field(None, gt=0, description="Context length (prompt plus completion).")
    task: Literal["generate", "reward"] = Field("generate", description="generate, or reward (pooling runner).")
    chat_template: str | None = Field(
        None, description="A Jinja chat template overriding the tokenizer's (a file path or the template)."
    )
    prompt_format: str | None = Field(
        None,
        description="How chat messages become a prompt when the model has no chat template: plain or urial.",
    )
    max_logprobs: int = Field(-1, description="vLLM max_logprobs; -1 allows full-vocabulary views.")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments, passed through.")

    @model_validator(mode="after")
    def _remote_needs_url(self) -> ModelSettings:
        if self.engine == "remote":
            if not self.url:
                raise ValueError("a remote engine needs `url` (the vLLM server's base URL)")
            # A remote model's `vllm:` map holds client options; check them now, not when the engine starts.
            from alignd.server.engines.vllm_remote import RemoteOptions

            RemoteOptions.from_mapping(self.vllm)
        return self


class RoleBinding(_Strict):
    """The model playing a role, optionally under its own system prompt and prompt format."""

    model: str
    system_prompt: str | None = None
    prompt_format: str | None = None


class RecipeSettings(_Strict):
    """A named recipe: a decoder, the models playing its roles, and its parameters."""

    decoder: str
    roles: dict[str, RoleBinding]
    params: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None

    @field_validator("roles", mode="before")
    @classmethod
    def _short_roles(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"model": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


class ServerSettings(_Strict):
    """The HTTP side."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys; empty: no auth.")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Larger request bodies get 413.")
    max_concurrent_requests: int = Field(256, gt=0, description="Beyond this, requests get 429.")
    cors_origins: list[str] = Field(default_factory=list)
    log_level: str = "info"


class Settings(BaseSettings):
    """Everything alignd reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    config: Path | None = Field(None, description="The YAML file these settings were read from.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    recipes: dict[str, RecipeSettings] = Field(default_factory=dict)
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache per in-process model on CPU (VLLM_CPU_KVCACHE_SPACE), GiB."
    )
    cpu_binding: Literal["spread", "vllm"] = Field(
        "spread",
        description="On vLLM's CPU backend, where the in-process models' worker threads run: 'spread' gives "
        "each model its own cores (vLLM's automatic binding puts every engine on the same core, so models that "
        "step together wait for each other; with fewer cores than models, the models of each configured recipe "
        "go to different cores where they can); 'vllm' leaves it to vLLM. VLLM_CPU_OMP_THREADS_BIND in the "
        "environment always wins.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init holds CLI flags and the YAML file (merged by load_settings, CLI on top); env beats both
        # file values but not CLI flags, which load_settings re-applies last.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        for name, recipe in self.recipes.items():
            if name in self.models:
                raise ValueError(f"recipes.{name}: a recipe cannot share its name with a model")
            for role, binding in recipe.roles.items():
                if binding.model not in self.models:
                    raise ValueError(
                        f"recipes.{name}.roles.{role}: unknown model {binding.model!r} "
                        f"(models: {', '.join(self.models) or 'none'})"
                    )
        return self


class _NoEnvSettings(Settings):
    """Settings read from their arguments alone (CLI overrides applied on top of file and environment)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _expand_home(data: dict[str, Any]) -> dict[str, Any]:
    home = str(alignd_home())
    for model in (data.get("models") or {}).values():
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            model["path"] = model["path"].replace("{home}", home)
    return data


def _format_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read settings: ``overrides`` (CLI flags, nested dicts) > environment > YAML file > defaults.

    The file is ``config``, else ``$ALIGND_CONFIG``, else the packaged default. Raises :class:`ConfigError`.
    """
    path = Path(config or os.environ.get("ALIGND_CONFIG") or default_config_path()).expanduser()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration in {path}: the top level must be a mapping")
    data = _expand_home(_deep_merge(raw, {"config": str(path)}))
    try:
        settings = Settings(**data)
        if overrides:
            # Re-validated without the environment source, so CLI flags stay on top of it.
            merged = _deep_merge(settings.model_dump(exclude_unset=False), overrides)
            settings = _NoEnvSettings(**_expand_home(merged))
    except ValidationError as exc:
        raise ConfigError(_format_error(str(path), exc)) from None
    return settings
