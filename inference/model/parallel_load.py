"""Per-rank loading: each rank reads only its slices of the safetensors shards (`get_slice`), never another
rank's experts, so peak host memory per rank stays near its share of the model.

A parameter built by `parallel.py` carries a `Shard` (dimension, start, size); replicated parameters are read
whole. FP8 slices aligned to the 128x128 scale blocks keep their FP8 data and the matching block rows/columns of
`weight_scale_inv`; a slice that cuts a block (e.g. 2 of the demo's 4 heads x 96 rows) is dequantized exactly
at load, reading the weight slice and the scale blocks that cover it.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from deepseek_mcp.inference.model.checkpoint import (
    _EXPERT,
    _LAYER,
    CheckpointError,
    CheckpointFiles,
    _copy,
    check_loaded,
)
from deepseek_mcp.inference.model.layers import FP8_DTYPE
from deepseek_mcp.inference.model.parallel import LocalExperts, Shard
from deepseek_mcp.inference.model.transformer import Transformer

log = logging.getLogger(__name__)


def _local_names(model: Transformer) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Checkpoint tensor name -> (parameter, local expert index) for everything this rank holds."""
    names: dict[str, tuple[torch.Tensor, int | None]] = {}
    experts = {name: m for name, m in model.named_modules() if isinstance(m, LocalExperts)}
    for pname, p in model.named_parameters(remove_duplicate=False):
        prefix, _, attr = pname.rpartition(".")
        if prefix in experts:
            ex = experts[prefix]
            proj, kind = (attr[: -len("_scale_inv")], "weight_scale_inv") if attr.endswith("_scale_inv") \
                else (attr, "weight")
            for j in range(ex.num_local):
                names[f"{prefix}.{ex.start + j}.{proj}.{kind}"] = (p, j)
        else:
            names[pname] = (p, None)
    if model.cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    return names


def _narrow_index(ndim: int, dim: int, start: int, size: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[dim] = slice(start, start + size)
    return tuple(index)


def _read_slice(f, name: str, shard: Shard) -> torch.Tensor:
    sl = f.get_slice(name)
    return sl[_narrow_index(len(sl.get_shape()), shard.dim, shard.start, shard.size)]


def _read_dequantized(f, scale_file, name: str, shard: Shard, dtype: torch.dtype) -> torch.Tensor:
    """The FP8 slice of `name` times its UE8M0/fp32 block scales, exact in fp32, then `dtype`."""
    b = shard.dequant_block
    w = _read_slice(f, name, shard)
    if w.dtype != FP8_DTYPE:
        raise CheckpointError(f"tensor {name} is {w.dtype}, but config.json declares FP8 weights")
    first, last = shard.start // b, -(-(shard.start + shard.size) // b)
    scale = _read_slice(scale_file, name + "_scale_inv", Shard(shard.dim, first, last - first)).float()
    other = 1 - shard.dim
    scale = scale.repeat_interleave(b, dim=other).narrow(other, 0, w.shape[other])
    scale = scale.repeat_interleave(b, dim=shard.dim).narrow(shard.dim, shard.start - first * b, shard.size)
    return (w.float() * scale).to(dtype)


def load_weights_sharded(model: Transformer, files: CheckpointFiles) -> None:
    """Copy this rank's slices of the checkpoint into `model` (built by `shard_model`), checking shapes."""
    cfg = model.cfg
    local = _local_names(model)
    cut = {name + "_scale_inv" for name, (p, _) in local.items()
           if getattr(p, "shard", None) is not None and p.shard.dequant_block}
    loaded: set[str] = set()
    unknown: list[str] = []
    handles: dict[Path, object] = {}
    with ExitStack() as stack:

        def handle(p: Path):
            if p not in handles:
                handles[p] = stack.enter_context(_open(p))
            return handles[p]

        for path in files.weight_files:
            f = handle(path)
            for name in f.keys():
                layer = _LAYER.match(name)
                if layer and int(layer.group(1)) >= cfg.num_layers:
                    continue  # multi-token-prediction layer
                if name not in local:
                    if name not in cut and not _EXPERT.match(name):  # other ranks' experts: never read
                        unknown.append(name)
                    continue
                param, expert = local[name]
                shard: Shard | None = getattr(param, "shard", None)
                try:
                    if shard is None:
                        src = f.get_tensor(name)
                    elif shard.dequant_block:
                        scale_path = files.tensor_to_file.get(name + "_scale_inv", path)
                        scale_file = handle(scale_path)
                        src = _read_dequantized(f, scale_file, name, shard, param.dtype)
                    else:
                        src = _read_slice(f, name, shard)
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{path}: tensor {name} could not be read: {type(e).__name__}: {e}") \
                        from None
                dst = param if expert is None else param[expert]
                if shard is not None and src.shape[shard.dim] != dst.shape[shard.dim]:
                    dst = dst.narrow(shard.dim, 0, src.shape[shard.dim])  # vocabulary padding stays zero
                _copy(dst, None, src, name, path)
                loaded.add(name)
    check_loaded(files.root, set(local), loaded, unknown)


def _open(path: Path):
    try:
        return safe_open(str(path), "pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None

