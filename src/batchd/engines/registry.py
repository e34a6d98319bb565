"""The model registry: which served model id runs on which engine, read from a TOML file.

``batchd serve --config batchd.toml`` (or ``BATCHD_CONFIG``). Without a file, batchd serves the
embedded llama.cpp models of ``BATCHD_MODELS`` (the bundled SmolLM2 by default), as before.

    [llamacpp]                    # options shared by every embedded model (all optional)
    max_seqs = 32

    [models.smollm2]
    engine = "llamacpp"
    path = "/models/smollm2.gguf"  # omitted: the bundled SmolLM2-135M-Instruct
    aliases = ["default"]

    [models.llama-8b]
    engine = "openai-http"
    base_urls = ["http://gpu1:8000/v1", "http://gpu2:8000/v1"]   # or base_url = "..."
    upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
    api_key_env = "VLLM_API_KEY"   # the *name* of a variable; the key is never in the file
    max_concurrency = 64           # per base URL
    requests_per_minute = 6000     # per base URL
    tokens_per_minute = 2000000    # per base URL
    timeout_seconds = 600          # one HTTP attempt

Errors name the offending key (``models.llama-8b.max_concurrency``) or the TOML line; the CLI
turns them into exit status 2. Secrets are resolved here, once, from the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchd.errors import ConfigError
from batchd.toml_files import load_validated

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$"


class _Strict(BaseModel):
    # A misspelt key (``max_concurency``) must be an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaCppOptions(_Strict):
    """Options of the one embedded engine that runs every ``llamacpp`` model."""

    quant: Literal["q8_0", "as-is"] | None = None
    n_threads: int | None = Field(default=None, ge=1)
    ctx_size: int | None = Field(default=None, ge=256)
    max_seqs: int | None = Field(default=None, ge=2)
    prefix_sharing: bool | None = None
    prefix_cache: bool | None = None
    prefix_cache_cells: int | None = Field(default=None, ge=0)
    kv_type: Literal["f16", "q8_0"] | None = None


class LlamaCppModel(_Strict):
    engine: Literal["llamacpp"]
    path: Path | None = None  # None: the bundled model
    aliases: tuple[str, ...] = ()


class OpenAIHttpModel(_Strict):
    engine: Literal["openai-http"]
    base_url: str | None = None
    base_urls: tuple[str, ...] = ()
    upstream_model: str | None = None  # default: the served id itself
    api_key_env: str | None = None
    aliases: tuple[str, ...] = ()
    context_length: int | None = Field(default=None, ge=1)
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    timeout_seconds: float = Field(default=600, gt=0)
    # Tokens assumed for a completion whose body sets no max_tokens, until usage corrects it.
    default_completion_tokens: int = Field(default=256, ge=1)
    # How Responses API requests reach the upstream: "native" passes them to its own
    # /v1/responses (vLLM, OpenAI); "chat" (the default, for servers without one) sends
    # each as a chat completion and converts the answer back.
    responses: Literal["chat", "native"] = "chat"
    # Batch attempts' concurrency adapts (AIMD, openai_http/adaptive.py) between 1 and
    # max_concurrency: halved on a 429, a 5xx or an answer slower than the target, grown by
    # one a round otherwise, so batch work fills the upstream's spare capacity and no more.
    adaptive_concurrency: bool = False
    latency_target_seconds: float = Field(default=10.0, gt=0)

    @field_validator("base_url", "base_urls", mode="after")
    @classmethod
    def _http_urls(cls, value: Any) -> Any:
        for url in (value,) if isinstance(value, str) else value or ():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_pool(self) -> OpenAIHttpModel:
        if bool(self.base_url) == bool(self.base_urls):
            raise ValueError("give exactly one of base_url or base_urls (a non-empty list)")
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        urls = self.base_urls or (self.base_url or "",)
        return tuple(url.rstrip("/") for url in urls)


ModelEntry = Annotated[LlamaCppModel | OpenAIHttpModel, Field(discriminator="engine")]


class RegistryFile(_Strict):
    llamacpp: LlamaCppOptions = LlamaCppOptions()
    models: dict[Annotated[str, Field(pattern=MODEL_ID_PATTERN)], ModelEntry] = Field(min_length=1)


class Registry:
    """A validated registry, with each upstream's API key read from the environment."""

    def __init__(self, parsed: RegistryFile, api_keys: dict[str, str | None]) -> None:
        self.llamacpp = parsed.llamacpp
        self.models = parsed.models
        self.api_keys = api_keys  # model id -> key (None: send no Authorization header)

    def llamacpp_models(self) -> dict[str, LlamaCppModel]:
        return {k: v for k, v in self.models.items() if isinstance(v, LlamaCppModel)}

    def upstream_models(self) -> dict[str, OpenAIHttpModel]:
        return {k: v for k, v in self.models.items() if isinstance(v, OpenAIHttpModel)}


def _loc(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union tags ("openai-http") and the key-validation marker.
    parts = [str(p) for p in loc if p not in ("llamacpp", "openai-http", "[key]")]
    if loc and loc[0] == "llamacpp":
        parts.insert(0, "llamacpp")
    return ".".join(parts)


def parse(text: str, *, source: str, environ: dict[str, str] | None = None) -> Registry:
    env = os.environ if environ is None else environ
    parsed = load_validated(text, source=source, model=RegistryFile, key=_loc)
    names: dict[str, str] = {}
    keys: dict[str, str | None] = {}
    for model_id, entry in parsed.models.items():
        for name in (model_id, *entry.aliases):
            if names.setdefault(name, model_id) != model_id:
                raise ConfigError(
                    f"{source}: models.{model_id}.aliases: {name!r} already names "
                    f"model {names[name]!r}"
                )
        if isinstance(entry, OpenAIHttpModel):
            keys[model_id] = None
            if entry.api_key_env is not None:
                value = env.get(entry.api_key_env)
                if not value:
                    raise ConfigError(
                        f"{source}: models.{model_id}.api_key_env: the environment variable "
                        f"{entry.api_key_env} is not set"
                    )
                keys[model_id] = value
        elif entry.path is not None and not entry.path.expanduser().is_file():
            raise ConfigError(f"{source}: models.{model_id}.path: no such file: {entry.path}")
    return Registry(parsed, keys)


def load(path: Path, environ: dict[str, str] | None = None) -> Registry:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, source=str(path), environ=environ)
