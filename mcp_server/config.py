"""Server configuration: one pydantic model, read from a JSON file, then environment, then command-line flags.

`config.example.json` at the repository root mirrors `ServerConfig` key for key. Unknown keys are rejected with a
message that names them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TOKEN_ENV = "DEEPSEEK_MCP_TOKEN"
CONFIG_ENV = "DEEPSEEK_MCP_CONFIG"


class ConfigError(ValueError):
    """A configuration the server refuses; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(_Section):
    temperature: float = Field(0.6, ge=0.0, le=2.0, description="Default temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Default nucleus mass.")
    top_k: int = Field(0, ge=0, description="Default top-k (0 = off).")


class Limits(_Section):
    max_tokens: int = Field(512, gt=0, description="max_tokens when a call gives none.")
    thinking_budget: int | None = Field(
        None, gt=0, description="think's reasoning budget when a call gives none (null = half of max_tokens)."
    )
    max_wall_time_s: float = Field(
        50.0, gt=0, description="Generation time limit per call; the call returns what it has (finish 'time')."
    )
    load_wait_s: float = Field(600.0, gt=0, description="How long a call waits for a model still loading.")
    max_conversations: int = Field(
        256, gt=0, description="Stored conversations kept, and as many stored API responses (least recently used go).")
    max_conversation_tokens: int = Field(
        1_000_000, gt=0, description="Tokens all stored conversations may hold together (least recently used go)."
    )
    progress_interval_s: float = Field(0.5, gt=0, le=1.0, description="Seconds between progress notifications.")
    max_waiting: int = Field(
        256, ge=0, description="Requests that may wait for a batch slot; one more is refused at once (HTTP 429)."
    )
    max_request_bytes: int = Field(
        16 << 20, gt=0, description="Largest HTTP API request body; a larger one is refused while it is read (413). "
        "16 MiB holds a 163,840-token context with JSON escaping to spare.")
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="HTTP: an idle keep-alive connection (no request under way) is closed after this.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="HTTP: a request's headers must arrive within this from the connection opening (or "
        "the previous response); else the connection is closed (408 when part of a request came).")
    max_header_bytes: int = Field(
        16384, ge=1024, description="HTTP: the largest request head (request line and headers); a larger one is a 400.")
    body_timeout_s: float = Field(
        60.0, gt=0, description="HTTP: a request's whole body must arrive within this from its headers; else 408 "
        "and the connection is closed.")
    shutdown_grace_s: float = Field(
        1.0, ge=0, le=600, description="On SIGTERM/SIGINT: how long requests under way (MCP tool calls over stdio too) "
        "may run on; then streams end with their API's error event, other requests get 503, tool calls an error "
        "result. The process exits within this plus 1 s.")


class ServerConfig(_Section):
    model: str | None = Field(None, description="Checkpoint directory or Hugging Face id; null = demo checkpoint.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(None, description="null = engine default.")
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto", description="Which kernels run: triton (CUDA), torch, or auto (triton on CUDA, else torch).")
    cache_tokens: int | None = Field(None, gt=0, description="KV cache capacity in tokens (null = engine default).")
    max_num_seqs: int = Field(16, gt=0, description="Most requests decoded together.")
    enforce_eager: bool = Field(False, description="No CUDA graphs for decode steps (they are captured at load).")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks the model is split over: N-1 worker processes here (one per GPU), or torchrun's."
    )
    dist_timeout_s: float = Field(300.0, gt=0, description="Timeout of every collective between the ranks.")
    speculative_tokens: int = Field(
        0, ge=0, le=3, description="Speculative decoding with the checkpoint's multi-token-prediction layer: draft "
        "tokens per decode step (1-3), verified in one forward; the output tokens are the same. 0 = off (the "
        "layer is not loaded). Pays where a decode step is bound by reading the weights (GPU, batch 1).")
    constrained_decoding: bool = Field(
        True, description="Grammar-constrained tool calls and response_format (needs xgrammar: Linux, macOS)."
    )
    trusted_control_tokens: bool = Field(
        False, description="Encode control-token text in messages as control tokens (trusted clients only)."
    )
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    limits: Limits = Field(default_factory=Limits)
    transport: Literal["stdio", "http", "sse"] = "stdio"
    host: str = Field("127.0.0.1", description="HTTP/SSE bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP/SSE port (0 = any free port).")
    path: str = Field("/mcp", description="Streamable HTTP endpoint path.")
    token: str | None = Field(None, description=f"Bearer token for HTTP/SSE (or env {TOKEN_ENV}).")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Extra Host header values accepted over HTTP ('name:port' or 'name:*')."
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="Extra Origin values accepted over HTTP ('https://app.example')."
    )
    api_port: int | None = Field(
        None, ge=0, le=65535, description="Also serve the OpenAI/Anthropic API on this port (any transport)."
    )
    served_model_names: list[str] = Field(
        default_factory=list, description="Model names the API answers to (empty = the checkpoint's name, plus "
        "the aliases deepseek-chat and deepseek-reasoner)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="stderr log lines: text, or one JSON object per line (for log shippers).")

    def bind_is_loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _format_errors(err: ValidationError, source: str) -> str:
    unknown = [".".join(str(p) for p in e["loc"]) for e in err.errors() if e["type"] == "extra_forbidden"]
    lines = []
    if unknown:
        lines.append(f"{source}: unknown key(s) {', '.join(unknown)}; see config.example.json for valid keys")
    for e in err.errors():
        if e["type"] != "extra_forbidden":
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"{source}: {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ServerConfig:
    """File (`path`, or $DEEPSEEK_MCP_CONFIG), then $DEEPSEEK_MCP_TOKEN, then `overrides` (command-line flags)."""
    env = os.environ if environ is None else environ
    path = path or env.get(CONFIG_ENV) or None
    data: dict[str, Any] = read_config_file(path) if path else {}
    source = str(path) if path else "configuration"
    try:
        ServerConfig.model_validate(data)  # report file errors against the file, before merging flags
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    if data.get("token") == TOKEN_SHOWN_AS:
        raise ConfigError(f"{source}: token is {TOKEN_SHOWN_AS!r}, the placeholder --print-config writes; put the "
                          f"real token there, or set {TOKEN_ENV}")
    if env.get(TOKEN_ENV):
        data["token"] = env[TOKEN_ENV]
    data = _deep_merge(data, overrides or {})
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "command line")) from None


def check_serving_security(config: ServerConfig) -> None:
    """Refuse an HTTP/SSE bind beyond loopback without a bearer token."""
    if config.api_port is not None and not config.bind_is_loopback() and not config.token:
        raise ConfigError(f"refusing to serve the API on {config.host}: a non-loopback bind address needs a bearer "
                          f"token. Set \"token\", pass --token, or export {TOKEN_ENV}; or bind to 127.0.0.1.")
    if config.transport == "stdio":
        return
    if not config.bind_is_loopback() and not config.token:
        raise ConfigError(
            f"refusing to serve {config.transport} on {config.host}: a non-loopback bind address needs a bearer "
            f"token. Set \"token\" in the config file, pass --token, or export {TOKEN_ENV}; or bind to 127.0.0.1."
        )
    if not config.path.startswith("/"):
        raise ConfigError(f"path must start with '/', got {config.path!r}")


MIN_TOKEN_LENGTH = 16


def config_warnings(config: ServerConfig) -> list[str]:
    """Settings that work but are probably mistakes."""
    warnings = []
    if config.token and config.transport == "stdio":
        warnings.append("a bearer token is set but the transport is stdio, which has no authentication: the "
                        "token is unused (it applies to --transport http or sse)")
    if config.token and len(config.token) < MIN_TOKEN_LENGTH:
        warnings.append(f"the bearer token has only {len(config.token)} characters; use at least "
                        f"{MIN_TOKEN_LENGTH} random ones (e.g. python -c 'import secrets; "
                        "print(secrets.token_urlsafe(24))')")
    return warnings


TOKEN_SHOWN_AS = "(set, not shown)"


def printable(config: ServerConfig) -> str:
    """The resolved configuration as JSON, the token shown as set or not (never its value)."""
    data = config.model_dump(mode="json")
    data["token"] = TOKEN_SHOWN_AS if config.token else None
    return json.dumps(data, indent=2)

