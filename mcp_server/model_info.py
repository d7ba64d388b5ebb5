"""What `list_models` (and the `deepseek://models` resource) says about the served model and its engine."""

from __future__ import annotations

import dataclasses
from typing import Any

from deepseek_mcp.mcp_server.config import ServerConfig
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.schemas import Architecture, ModelInfo


def count_parameters(engine: Any) -> int:
    counted = getattr(engine, "num_parameters", None)  # the whole model, also when split over ranks
    return counted if isinstance(counted, int) else sum(p.numel() for p in engine.model.parameters())


def describe_model(host: ModelHost, config: ServerConfig, num_parameters: int | None) -> ModelInfo:
    limits, sampling = config.limits, config.sampling
    info = ModelInfo(
        model=host.name, source=host.source, demo=host.demo, status=host.status, error=host.error,
        load_seconds=host.load_seconds,
        defaults={"max_tokens": limits.max_tokens, "temperature": sampling.temperature,
                  "top_p": sampling.top_p, "top_k": sampling.top_k,
                  "thinking_budget": limits.thinking_budget or "max_tokens // 2",
                  "max_wall_time_s": limits.max_wall_time_s},
    )
    engine = host.engine
    if engine is None:
        return info
    cfg = engine.config
    info.architecture = Architecture(
        model_type="deepseek_v3", num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads, vocab_size=cfg.vocab_size, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
    )
    info.parameters = num_parameters
    weight_bytes = getattr(engine, "weight_bytes", None)
    info.weight_bytes = weight_bytes if isinstance(weight_bytes, int) else None
    info.dtype = str(engine.dtype).removeprefix("torch.") + (" (fp8 e4m3 weights)" if engine.fp8 else "")
    info.device = str(engine.device)
    if getattr(engine, "parallel_description", None):
        info.device += f"; {engine.parallel_description}"
    info.kernels = engine.kernels
    if host.aengine is not None:
        info.cache_capacity_tokens = host.cache_capacity_tokens()
        info.context_tokens = host.context_tokens()
        info.context_limit = host.context_limit()
        info.stats = _jsonable(host.aengine.stats())
    return info


def _jsonable(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        stats = dataclasses.asdict(stats)
    elif hasattr(stats, "model_dump"):
        stats = stats.model_dump()
    elif not isinstance(stats, dict):
        stats = dict(vars(stats))
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None), list, dict))}
