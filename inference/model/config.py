"""Model configuration: a frozen view of a Hugging Face `config.json` for `DeepseekV3ForCausalLM`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepseek_mcp.inference.model.quant_formats import Int4Scheme

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


class ConfigError(ValueError):
    """A config.json that this engine cannot serve; the message names the key and what to change."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True  # DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...


@dataclass(frozen=True)
class QuantConfig:
    method: str = "fp8"
    fmt: str = "e4m3"
    block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # "ue8m0": power-of-two scales (DeepSeek-V3.1)
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    quant: QuantConfig | None = None  # FP8 block-scaled weights
    int4: Int4Scheme | None = None  # 4-bit weights (compressed-tensors, GPTQ, AWQ: quant_formats.py)
    num_nextn_predict_layers: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    name: str = "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Entries cached per token and layer: the normalized latent plus the roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found; a model directory needs the Hugging Face "
                              "config.json next to its safetensors files") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; this engine serves "
                f"DeepseekV3ForCausalLM checkpoints (model_type 'deepseek_v3': DeepSeek-V3, V3.1, V3.1-Terminus)")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                raise ConfigError(f"{source}: {key} must be a positive integer, found {raw.get(key)!r}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (DeepSeek-V3 uses 'silu')")
        scoring = raw.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError(f"{source}: scoring_func {scoring!r} is not supported (DeepSeek-V3 uses 'sigmoid')")
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias true is not supported (DeepSeek-V3 has none)")
        n_routed = int(raw.get("n_routed_experts") or 0)
        n_group = int(raw.get("n_group") or 1)
        topk_group = int(raw.get("topk_group") or n_group)
        top_k = int(raw.get("num_experts_per_tok") or 0)
        if n_routed:
            if n_routed % n_group:
                raise ConfigError(f"{source}: n_routed_experts {n_routed} is not divisible by n_group {n_group}")
            if not 0 < topk_group <= n_group:
                raise ConfigError(f"{source}: topk_group {topk_group} must be in 1..n_group ({n_group})")
            if not 0 < top_k <= topk_group * (n_routed // n_group):
                raise ConfigError(f"{source}: num_experts_per_tok {top_k} exceeds the experts in the "
                                  f"selected groups ({topk_group} x {n_routed // n_group})")
        eos = raw.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        quant = raw.get("quantization_config")
        int4 = _parse_int4(quant, source, str(dtype)) if quant and quant.get("quant_method") != "fp8" else None
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=int(raw.get("intermediate_size") or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            q_lora_rank=raw.get("q_lora_rank"),
            kv_lora_rank=raw["kv_lora_rank"],
            qk_nope_head_dim=raw["qk_nope_head_dim"],
            qk_rope_head_dim=raw["qk_rope_head_dim"],
            v_head_dim=raw["v_head_dim"],
            n_routed_experts=n_routed,
            n_shared_experts=int(raw.get("n_shared_experts") or 0),
            num_experts_per_tok=top_k,
            n_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=_parse_rope(raw, source),
            quant=None if int4 else _parse_quant(quant, source),
            int4=int4,
            num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
            bos_token_id=int(raw.get("bos_token_id") if raw.get("bos_token_id") is not None else 0),
            eos_token_id=int(eos if eos is not None else 1),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(dtype),
            name=str(raw.get("_name_or_path") or model_type),
        )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # Older files: `rope_theta` + `rope_scaling` ({"type": "yarn", ...}); newer: `rope_parameters`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    interleave = bool(raw.get("rope_interleave", True))
    if rope_type == "default":
        return RopeConfig(theta=theta, interleave=interleave)
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (DeepSeek-V3 uses 'yarn' or none)")
    max_pos = int(raw.get("max_position_embeddings", 4096))
    original = int(params.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=float(factor) if factor is not None else max_pos / original,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleave=interleave,
    )


def _parse_int4(q: dict[str, Any], source: str, model_dtype: str) -> Int4Scheme:
    from deepseek_mcp.inference.model.quant_formats import Int4FormatError, parse_scheme

    try:
        return parse_scheme(q, source, model_dtype.removeprefix("torch."))
    except Int4FormatError as e:
        raise ConfigError(str(e)) from None


def _parse_quant(q: dict[str, Any] | None, source: str) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                          "(this engine reads DeepSeek's block-scaled 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: quantization_config.fmt {fmt!r} is not supported (expected 'e4m3')")
    block = tuple(q.get("weight_block_size") or (128, 128))
    if len(block) != 2 or block[0] != block[1]:
        raise ConfigError(f"{source}: quantization_config.weight_block_size {list(block)} is not supported "
                          "(expected square blocks such as [128, 128])")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"{source}: quantization_config.scale_fmt {scale_fmt!r} is not supported "
                          "(expected 'ue8m0' or absent)")
    return QuantConfig(method="fp8", fmt=fmt, block_size=(int(block[0]), int(block[1])), scale_fmt=scale_fmt,
                       activation_scheme=q.get("activation_scheme", "dynamic"))
