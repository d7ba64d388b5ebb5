"""Memory plan of a tensor-parallel deployment, from `config.json` alone (nothing else is read or allocated).

Per rank: weight bytes by kind exactly as `Transformer(..., tp=...)` allocates them (FP8 e4m3 + fp32 128x128 block
scales where the checkpoint is FP8, slices that cut a scale block dequantized to the activation dtype, the
vocabulary padded to a multiple of N), the latent KV cache per token (replicated on every rank), an estimate of
the activations of one step and a headroom, and the cache tokens that fit in what is left.

`deepseek-mcp plan --model PATH_OR_ID --tensor-parallel-size N --gpu-memory-gib G` prints it and exits non-zero
when it does not fit, naming the smallest N (at G) and the smallest G (at N) that would.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from deepseek_mcp.inference.model.config import ConfigError, ModelConfig
from deepseek_mcp.inference.model.int4 import int4_nbytes, split_int4
from deepseek_mcp.inference.model.parallel import ParallelConfigError, TPContext, check_divisible, padded_vocab

KINDS = ("attention", "dense_mlp", "routed_experts", "shared_experts", "embedding_and_head", "norms_and_router",
         "mtp_layer")
GIB = 2**30
CANDIDATE_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _linear(n: int, k: int, fp8: bool, block: int, dtype_bytes: int) -> int:
    return n * k + _cdiv(n, block) * _cdiv(k, block) * 4 if fp8 else n * k * dtype_bytes


def _split(n_full: int, k_full: int, dim: int, rank: int, world: int, fp8: bool, block: int, dt: int) -> int:
    """Bytes of one rank's column (dim 0) or row (dim 1) slice of an [n_full, k_full] linear weight."""
    full = n_full if dim == 0 else k_full
    size = full // world
    start, end = rank * size, rank * size + size
    cut = fp8 and (start % block != 0 or (end % block != 0 and end != full))
    n, k = (size, k_full) if dim == 0 else (n_full, size)
    return _linear(n, k, fp8 and not cut, block, dt)


def weight_bytes(cfg: ModelConfig, world: int, rank: int = 0, *, fp8: bool, dtype_bytes: int = 2,
                 mtp: bool = False) -> dict[str, int]:
    """One rank's parameter bytes by kind as laid out for the step (`Transformer.prepare_for_kernels_`: kv_b_proj
    as dense W_UK / W_UV in the activation dtype, the router weight in fp32); the multi-token-prediction layer
    (`mtp`: loaded for speculative decoding) as one more block, its norms and eh_proj, all in `mtp_layer`. A 4-bit
    checkpoint (`cfg.int4`): the Linears its scheme quantizes as codes + fp32 scales + uint8 zero points per group
    (int4.py), the others in the activation dtype; a split cutting a group raises ParallelConfigError as the
    model would."""
    b, dt, d, h = cfg.quant.block_size[0] if cfg.quant else 128, dtype_bytes, cfg.hidden_size, cfg.num_heads
    q4, tp = cfg.int4, TPContext(rank, world)
    fp8 = fp8 and q4 is None
    out = dict.fromkeys(KINDS, 0)

    def lin(name: str, n: int, k: int, dim: int | None) -> int:  # dim: None replicated, 0 column, 1 row split
        g = q4.group_size if q4 is not None and q4.quantizes(name) else 0
        if g:
            if dim is not None:
                size = split_int4(n if dim == 0 else k, tp, dim, g, name).size
                n, k = (size, k) if dim == 0 else (n, size)
            return int4_nbytes(n, k, g, q4.scale_torch_dtype.itemsize)
        return _linear(n, k, fp8, b, dt) if dim is None else _split(n, k, dim, rank, world, fp8, b, dt)

    def mlp(prefix: str, inter: int) -> int:  # gate/up rows and down columns of an [inter]-wide SwiGLU
        return lin(prefix + "gate_proj", inter, d, 0) + lin(prefix + "up_proj", inter, d, 0) + \
            lin(prefix + "down_proj", d, inter, 1)

    main = out  # the main model's bytes, once the MTP layer's are counted apart
    for layer in range(cfg.num_layers + mtp):
        if layer == cfg.num_layers:  # the MTP layer: its block counted like the others, then moved to its kind
            main, out = out, dict.fromkeys(KINDS, 0)
            eh = f"model.layers.{layer}.eh_proj"
            out["norms_and_router"] += 3 * d * dt + lin(eh, d, 2 * d, None)  # enorm, hnorm, shared_head.norm
        a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        attn = lin(a + "kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, None) + cfg.kv_lora_rank * dt
        if cfg.q_lora_rank is None:
            attn += lin(a + "q_proj", h * cfg.qk_head_dim, d, 0)
        else:
            attn += lin(a + "q_a_proj", cfg.q_lora_rank, d, None) + cfg.q_lora_rank * dt
            attn += lin(a + "q_b_proj", h * cfg.qk_head_dim, cfg.q_lora_rank, 0)
        if q4 is not None and q4.quantizes(a + "kv_b_proj"):  # its split must still keep whole words
            split_int4(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), tp, 0, q4.group_size, a + "kv_b_proj")
        attn += _split(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, 0, rank, world, False, b, dt)
        attn += lin(a + "o_proj", d, h * cfg.v_head_dim, 1)
        out["attention"] += attn
        out["norms_and_router"] += 2 * d * dt
        if cfg.is_moe_layer(layer):
            i = cfg.moe_intermediate_size
            out["routed_experts"] += cfg.n_routed_experts * mlp(m + "experts.0.", i)  # every expert's slice of I
            out["norms_and_router"] += cfg.n_routed_experts * (d + 1) * 4  # fp32 weight and bias
            if cfg.n_shared_experts:
                out["shared_experts"] += mlp(m + "shared_experts.", i * cfg.n_shared_experts)
        else:
            out["dense_mlp"] += mlp(m, cfg.intermediate_size)
    if mtp:
        main["mtp_layer"], out = sum(out.values()), main
    rows = padded_vocab(cfg.vocab_size, world) // world
    out["embedding_and_head"] = rows * d * dt * (1 if cfg.tie_word_embeddings else 2)
    out["norms_and_router"] += d * dt
    return out


@dataclass(frozen=True)
class Plan:
    cfg: ModelConfig
    world_size: int
    memory_bytes: int  # per rank (one GPU)
    weights: dict[str, int]  # rank 0's, by kind
    weights_max: int  # the largest rank's total
    cache_bytes_per_token: int  # replicated on every rank
    activation_bytes: int
    headroom_bytes: int
    min_cache_tokens: int
    fp8: bool
    mtp: bool = False  # the multi-token-prediction layer loaded (speculative decoding)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def cache_tokens(self) -> int:
        free = self.memory_bytes - self.weights_max - self.activation_bytes - self.headroom_bytes
        return max(0, free // self.cache_bytes_per_token)

    @property
    def fits(self) -> bool:
        return self.cache_tokens >= self.min_cache_tokens


def activation_bytes(cfg: ModelConfig, world: int, batched_tokens: int, num_seqs: int) -> int:
    """An estimate of one step's transient buffers on the Triton path (fp32 where the step upcasts): hidden
    states, norms and residuals, the local heads' latent queries and outputs, the routed rows of the MoE, the
    local MLP slice, and the gathered fp32 logits on rank 0."""
    t, d, h = batched_tokens, cfg.hidden_size, cfg.num_heads // world
    per_token = 12 * d + 3 * h * cfg.kv_cache_dim + cfg.num_experts_per_tok * (d + 3 * cfg.moe_intermediate_size)
    per_token += 3 * max(cfg.intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts) // world
    return 4 * t * per_token + 2 * 4 * num_seqs * padded_vocab(cfg.vocab_size, world)


def plan(cfg: ModelConfig, world_size: int, memory_bytes: int, *, fp8: bool | None = None, dtype_bytes: int = 2,
         batched_tokens: int = 512, num_seqs: int = 16, min_cache_tokens: int = 4096, mtp: bool = False) -> Plan:
    """Raises ParallelConfigError for a size that does not split (as the engine would at start). `mtp`: with the
    multi-token-prediction layer (speculative decoding): its weights and one more layer of latent cache."""
    check_divisible(cfg, world_size)
    fp8 = cfg.quant is not None if fp8 is None else fp8
    weights = weight_bytes(cfg, world_size, 0, fp8=fp8, dtype_bytes=dtype_bytes, mtp=mtp)
    biggest = max(sum(weight_bytes(cfg, world_size, r, fp8=fp8, dtype_bytes=dtype_bytes, mtp=mtp).values())
                  for r in {0, world_size - 1})
    return Plan(cfg, world_size, memory_bytes, weights, biggest,
                cfg.kv_cache_dim * (cfg.num_layers + mtp) * dtype_bytes,
                activation_bytes(cfg, world_size, batched_tokens, num_seqs),
                max(GIB, memory_bytes // 20), min_cache_tokens, fp8, mtp)


def smallest_fit(cfg: ModelConfig, p: Plan, **kw) -> tuple[int | None, float]:
    """The smallest tensor-parallel size that fits at this memory, and the GiB per GPU that fit at this size."""
    size = None
    for n in CANDIDATE_SIZES:
        try:
            if plan(cfg, n, p.memory_bytes, fp8=p.fp8, mtp=p.mtp, **kw).fits:
                size = n
                break
        except ParallelConfigError:
            continue
    need = p.weights_max + p.activation_bytes + p.min_cache_tokens * p.cache_bytes_per_token
    gib = max(need + GIB, need / 0.95) / GIB  # the headroom: 1 GiB or 5 %
    return size, math.ceil(gib * 10) / 10


def render(p: Plan) -> str:
    cfg, g = p.cfg, lambda x: f"{x / GIB:9.2f} GiB"
    wfmt = "FP8 e4m3 + fp32 128x128 block scales" if p.fp8 else "activation dtype"
    if cfg.int4 is not None:
        q4 = cfg.int4
        wfmt = (f"4-bit {q4.fmt} (int4 codes + {q4.scale_dtype} scales + uint8 zero points per {q4.group_size} "
                "inputs) where quantized, the rest in the activation dtype")
    lines = [f"{cfg.name}: {p.world_size} rank(s) x {p.memory_bytes / GIB:.1f} GiB; weights {wfmt}, bf16 activations",
             "weights per rank (rank 0):"]
    lines += [f"  {kind:<20}{g(p.weights[kind])}" for kind in KINDS]
    lines.append(f"  {'total':<20}{g(p.weights_total)}" + (f"  (largest rank {g(p.weights_max).strip()})"
                                                           if p.weights_max != p.weights_total else ""))
    if cfg.num_nextn_predict_layers and not p.mtp:
        lines.append(f"  multi-token-prediction layer ({cfg.num_nextn_predict_layers}): skipped, not loaded "
                     "(loaded with --speculative-tokens)")
    layers = f"{cfg.num_layers} layers" + (" + the MTP layer" if p.mtp else "")
    lines += [
        f"latent KV cache: {p.cache_bytes_per_token:,} bytes/token ({layers} x {cfg.kv_cache_dim} "
        "x 2 bytes), replicated on every rank (each rank holds the full latent cache, as in DeepSeek's reference)",
        f"activations (estimate):{g(p.activation_bytes)}",
        f"headroom:              {g(p.headroom_bytes)}  (CUDA context, NCCL buffers, fragmentation)",
        f"cache tokens that fit: {p.cache_tokens:,} per rank (the same tokens on every rank)",
    ]
    return "\n".join(lines)


def read_config(model: str) -> ModelConfig:
    """A config.json file, a checkpoint directory, or a Hugging Face repo id (only its config.json)."""
    path = Path(model).expanduser()
    if path.is_file():
        return ModelConfig.from_file(path)
    if path.is_dir():
        return ModelConfig.from_file(path / "config.json")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ConfigError(f"{model}: not a config.json, a model directory, nor a Hugging Face repo id")
    from huggingface_hub import hf_hub_download

    try:
        return ModelConfig.from_file(hf_hub_download(model, "config.json"))
    except Exception as e:  # offline, unknown repo, auth: say which
        raise ConfigError(f"{model}: config.json could not be fetched ({type(e).__name__}: {e}); pass a local "
                          "config.json or checkpoint directory") from None


def main(argv: list[str] | None = None, prog: str = "deepseek-mcp plan") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Per-rank memory plan of a tensor-parallel deployment, "
                                 "from config.json only.")
    ap.add_argument("--model", required=True, help="config.json, checkpoint directory or Hugging Face repo id")
    ap.add_argument("--tensor-parallel-size", type=int, required=True, metavar="N")
    ap.add_argument("--gpu-memory-gib", type=float, required=True, metavar="G", help="memory of one GPU")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--min-cache-tokens", type=int, default=4096, help="cache tokens a plan must leave room for")
    ap.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                    help="K > 0: with the multi-token-prediction layer (its weights and latent cache)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    kw = dict(batched_tokens=args.max_num_batched_tokens, num_seqs=args.max_num_seqs,
              min_cache_tokens=args.min_cache_tokens)
    try:
        cfg = read_config(args.model)
        p = plan(cfg, args.tensor_parallel_size, int(args.gpu_memory_gib * GIB), mtp=args.speculative_tokens > 0,
                 **kw)
    except (ConfigError, ParallelConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"tensor_parallel_size": p.world_size, "weights_bytes": p.weights,
                          "cache_bytes_per_token": p.cache_bytes_per_token, "cache_tokens": p.cache_tokens,
                          "activation_bytes": p.activation_bytes, "headroom_bytes": p.headroom_bytes,
                          "fits": p.fits}, indent=2))
    else:
        print(render(p))
    if p.fits:
        return 0
    print(verdict(cfg, p, **kw), file=sys.stderr)
    return 1


def verdict(cfg: ModelConfig, p: Plan, **kw) -> str:
    size, gib = smallest_fit(cfg, p, **kw)
    at_g = (f"the smallest tensor-parallel size that fits at {p.memory_bytes / GIB:.0f} GiB per GPU is {size}"
            if size else f"no tensor-parallel size up to {CANDIDATE_SIZES[-1]} fits at that memory")
    return (f"does not fit: {p.world_size} rank(s) x {p.memory_bytes / GIB:.1f} GiB leave room for "
            f"{p.cache_tokens:,} cache tokens, fewer than the {p.min_cache_tokens:,} required; {at_g}, "
            f"or {gib:.1f} GiB per GPU at size {p.world_size}")


class PlanError(MemoryError):
    """The deployment's memory plan does not fit; raised before anything is loaded."""


def check_before_load(model: str | None, tensor_parallel_size: int, device: str = "auto", dtype: str | None = None,
                      *, max_num_seqs: int = 16, cache_tokens: int | None = None, mtp: bool = False) -> Plan | None:
    """The server's start: the plan for one GPU per rank (on CPU, a share of the host memory per rank), refused
    with the smallest size or memory that would fit. None where it does not apply (one rank on CPU)."""
    import torch

    from deepseek_mcp.inference.resources import available_memory

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if tensor_parallel_size == 1 and not cuda:
        return None
    if model is None:
        from deepseek_mcp.inference.model.demo import demo_checkpoint_path

        model = str(demo_checkpoint_path())
    cfg = read_config(model)
    if cuda:
        n = min(tensor_parallel_size, torch.cuda.device_count())
        memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(max(1, n)))
    else:
        memory = available_memory(torch.device("cpu")) // tensor_parallel_size
    dtype_bytes = 4 if (dtype or cfg.torch_dtype) in ("float32", "fp32") else 2
    p = plan(cfg, tensor_parallel_size, memory, dtype_bytes=dtype_bytes, num_seqs=max_num_seqs,
             min_cache_tokens=cache_tokens or min(4096, cfg.max_position_embeddings), mtp=mtp)
    if not p.fits:
        raise PlanError(verdict(cfg, p, dtype_bytes=dtype_bytes, num_seqs=max_num_seqs,
                                min_cache_tokens=p.min_cache_tokens) + "\n" + render(p))
    return p
