"""Load DeepSeek-V3 safetensors checkpoints (bf16/fp16/fp32, or FP8 e4m3 with 128x128 block scales).

Tensors are read one at a time from memory-mapped files straight into preallocated parameters (a tensor-parallel
rank reads only its slices, `get_slice`), so peak RAM stays near what the rank holds. Routed experts
(`mlp.experts.{e}.{gate,up,down}_proj`) are copied into stacked `[E, ...]` parameters. The multi-token-prediction
layer (index >= num_hidden_layers) is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.layers import FP8_DTYPE, Linear
from deepseek_mcp.inference.model.moe import Experts
from deepseek_mcp.inference.model.parallel import Shard
from deepseek_mcp.inference.model.quant_formats import Int4FormatError, read_int4
from deepseek_mcp.inference.model.transformer import Transformer

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_LOADABLE_DTYPES = {torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    weight_files: tuple[Path, ...]
    tensor_to_file: dict[str, Path]


def resolve_model_path(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face repo id resolved through huggingface_hub's cache."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"{s}: not a model directory (expected a folder with config.json and "
                              "*.safetensors) nor a Hugging Face repo id like 'deepseek-ai/DeepSeek-V3.1'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json"]
    try:
        return Path(snapshot_download(s, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{s}: not in the Hugging Face cache and it cannot be downloaded now (offline?). Download it on a "
            f"connected machine with `huggingface-cli download {s}`, or pass a local directory") from None
    except Exception as e:  # network, auth, missing repo: say which and how to fix
        raise CheckpointError(f"{s}: could not fetch from the Hugging Face Hub ({type(e).__name__}: {e}). "
                              "Check the repo id, your network and HF_TOKEN, or pass a local directory") from None


def find_checkpoint_files(root: Path) -> CheckpointFiles:
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        tensor_to_file = {name: root / fname for name, fname in weight_map.items()}
        files = tuple(sorted(set(tensor_to_file.values())))
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {root}")
        return CheckpointFiles(root, files, tensor_to_file)
    if single.is_file():
        return CheckpointFiles(root, (single,), {name: single for name in _keys(single)})
    shards = sorted(root.glob("*.safetensors"))
    if len(shards) == 1:
        return CheckpointFiles(root, (shards[0],), {name: shards[0] for name in _keys(shards[0])})
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json found")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _local_names(model: Transformer) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Checkpoint tensor name -> (parameter, expert index into its stack) for everything this model holds."""
    names: dict[str, tuple[torch.Tensor, int | None]] = {}
    experts = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    int4 = {name for name, m in model.named_modules() if getattr(m, "int4_group", 0)}  # read by _load_int4
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p is None:
            continue
        prefix, _, attr = pname.rpartition(".")
        if prefix in int4:
            continue
        if prefix in experts:
            proj, kind = (attr.removesuffix("_scale_inv"), "weight_scale_inv") if attr.endswith("_scale_inv") \
                else (attr, "weight")
            for e in range(p.shape[0]):
                names[f"{prefix}.{e}.{proj}.{kind}"] = (p, e)
        else:
            names[pname] = (p, None)
    if model.cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    return {checkpoint_name(model, n): v for n, v in names.items()}


def checkpoint_name(model: Transformer, name: str) -> str:
    """A parameter's or module's name in the checkpoint: the model's own, but the multi-token-prediction layer
    (`mtp.*` here) is `model.layers.{num_hidden_layers}.*` there."""
    return f"model.layers.{model.cfg.num_layers}.{name.removeprefix('mtp.')}" if name.startswith("mtp.") else name


def _read_slice(f, name: str, shard: Shard, whole: tuple[int, ...]) -> torch.Tensor:
    """The slice `shard` of tensor `name`, whose whole shape must be `whole` (else CheckpointError)."""
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != whole:
        raise CheckpointError(f"tensor {name} has shape {shape}, expected {whole} from config.json")
    index = [slice(None)] * len(shape)
    index[shard.dim] = slice(shard.start, shard.start + shard.size)
    return sl[tuple(index)]


def _whole(part: torch.Tensor, shard: Shard) -> tuple[int, ...]:
    """The checkpoint shape of the tensor a slice `part` [.., size + padding, ..] comes from."""
    shape = list(part.shape)
    shape[shard.dim] = shard.full
    return tuple(shape)


def _read_dequantized(f, scale_file, name: str, shard: Shard, whole: tuple[int, ...], dtype: torch.dtype
                      ) -> torch.Tensor:
    """The FP8 slice of `name` times its UE8M0/fp32 block scales, exact in fp32, then `dtype`."""
    b = shard.dequant_block
    w = _read_slice(f, name, shard, whole)
    if w.dtype != FP8_DTYPE:
        raise CheckpointError(f"tensor {name} is {w.dtype}, but config.json declares FP8 weights")
    first, last = shard.start // b, -(-(shard.start + shard.size) // b)
    blocks = tuple(-(-n // b) for n in whole)
    scale = _read_slice(scale_file, name + "_scale_inv", Shard(shard.dim, first, last - first, blocks[shard.dim]),
                        blocks).float()
    other = 1 - shard.dim
    scale = scale.repeat_interleave(b, dim=other).narrow(other, 0, w.shape[other])
    scale = scale.repeat_interleave(b, dim=shard.dim).narrow(shard.dim, shard.start - first * b, shard.size)
    return (w.float() * scale).to(dtype)


def load_weights(model: Transformer, files: CheckpointFiles, *, progress: bool | None = None) -> None:
    """Copy into `model` what it holds of every checkpoint tensor, checking names, shapes and dtypes. A split
    parameter (tensor parallelism, parallel.py) reads only its slice through `get_slice`; an FP8 slice that cuts
    a scale block is dequantized as it is read; everything else is read whole. Files stay memory-mapped and one
    tensor is read at a time, so peak host memory stays near what this rank holds."""
    cfg = model.cfg
    local = _local_names(model)
    int4_read = _load_int4(model, files) if cfg.int4 is not None else set()
    cut = {name + "_scale_inv" for name, (p, _) in local.items()
           if getattr(p, "shard", None) is not None and p.shard.dequant_block}
    loaded: set[str] = set()
    unknown: list[str] = []
    skipped_mtp = 0
    bar = _progress_bar(sum(f.stat().st_size for f in files.weight_files), progress)
    for path in files.weight_files:  # each file (and a scale file it needs) open, so mapped, only while read
        with ExitStack() as stack:
            handles: dict[Path, object] = {}

            def handle(p: Path, stack: ExitStack = stack, handles: dict[Path, object] = handles):
                if p not in handles:
                    handles[p] = stack.enter_context(_open(p))
                return handles[p]

            f = handle(path)
            for name in f.keys():
                if name not in local:
                    layer = _LAYER.match(name)
                    if layer and int(layer.group(1)) >= cfg.num_layers:
                        # the multi-token-prediction layer (unless built), its copies of the embedding and head
                        skipped_mtp += 1
                    elif name not in cut and name not in int4_read:  # a cut slice's scales: read with its weight
                        unknown.append(name)
                    continue
                param, expert = local[name]
                dst = param if expert is None else param[expert]
                shard: Shard | None = getattr(param, "shard", None)
                try:
                    if shard is None:
                        src = f.get_tensor(name)
                    elif shard.dequant_block:
                        scale_file = handle(files.tensor_to_file.get(name + "_scale_inv", path))
                        src = _read_dequantized(f, scale_file, name, shard, _whole(dst, shard), param.dtype)
                    else:
                        src = _read_slice(f, name, shard, _whole(dst, shard))
                except CheckpointError as e:
                    raise CheckpointError(f"{path}: {e}") from None
                except Exception as e:
                    raise CheckpointError(f"{path}: tensor {name} could not be read (truncated or corrupt file?): "
                                          f"{type(e).__name__}: {e}") from None
                if shard is not None and src.shape[shard.dim] != dst.shape[shard.dim]:
                    dst = dst.narrow(shard.dim, 0, src.shape[shard.dim])  # vocabulary padding stays zero
                _copy(dst, src, name, path)
                loaded.add(name)
                if bar is not None:
                    bar.update(src.numel() * src.element_size())
    if bar is not None:
        bar.close()
    check_loaded(files.root, set(local), loaded, unknown)
    if skipped_mtp:
        log.info("skipped %d multi-token-prediction tensors", skipped_mtp)


def _int4_targets(model: Transformer) -> list[tuple[str, tuple[torch.Tensor, ...], int, int, Shard | None]]:
    """Every 4-bit weight this model holds: (checkpoint module, its (codes, scales, zeros) destinations, the
    checkpoint weight's whole [N, K], the slice held)."""
    out = []
    for module_name, m in model.named_modules():
        name = checkpoint_name(model, module_name)
        if isinstance(m, Linear) and m.int4_group:
            shard = getattr(m.weight, "shard", None)
            n = shard.full if shard is not None and shard.dim == 0 else m.out_features
            k = shard.full if shard is not None and shard.dim == 1 else m.in_features
            out.append((name, (m.weight, m.weight_scale, m.weight_zero), n, k, shard))
        elif isinstance(m, Experts) and m.int4_group:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                q, scale, zero = (getattr(m, proj + s) for s in ("", "_scale", "_zero"))
                shard = q.shard
                n, k = (shard.full, q.shape[-1] * 8) if shard.dim == 0 else (q.shape[1], shard.full)
                out += [(f"{name}.{e}.{proj}", (q[e], scale[e], zero[e]), n, k, shard) for e in range(q.shape[0])]
    return out


def _load_int4(model: Transformer, files: CheckpointFiles) -> set[str]:
    """Read every 4-bit weight (this rank's slice, quant_formats.py converting its format) into the model; the
    checkpoint tensor names read. Errors name the file (or the folder, for a missing tensor) and the tensor."""
    scheme, read = model.cfg.int4, set()
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        where: list[Path] = [files.root]

        def get(tensor: str):
            path = files.tensor_to_file.get(tensor)
            if path is None:
                module = tensor.rpartition(".")[0]
                hint = (f"; the checkpoint stores {module}.weight unquantized, so add {module} to the "
                        "quantization_config's ignore / modules_to_not_convert") \
                    if module + ".weight" in files.tensor_to_file else ""
                raise Int4FormatError(f"tensor {tensor} is missing ({scheme.fmt} 4-bit module){hint}")
            if path not in handles:
                handles[path] = stack.enter_context(_open(path))
            where[0] = path
            read.add(tensor)
            return handles[path].get_slice(tensor)

        for module, dst, n, k, shard in _int4_targets(model):
            where[0] = files.root
            try:
                parts = read_int4(scheme, get, module, n, k, shard)
                for d, src in zip(dst, parts):
                    if tuple(src.shape) != tuple(d.shape):
                        raise Int4FormatError(f"module {module} reads as {tuple(src.shape)}, expected "
                                              f"{tuple(d.shape)}")
                    if src.is_floating_point() and not torch.equal(src.to(d.dtype).to(src.dtype), src):
                        raise Int4FormatError(f"the scales of {module} are {src.dtype}, which {d.dtype} (the "
                                              "scale dtype of this format and config.json) cannot hold exactly")
                    with torch.no_grad():
                        d.copy_(src)
            except Int4FormatError as e:
                raise CheckpointError(f"{where[0]}: {e}") from None
            except Exception as e:
                raise CheckpointError(f"{where[0]}: 4-bit module {module} could not be read (truncated or corrupt "
                                      f"file?): {type(e).__name__}: {e}") from None
    return read


def _open(path: Path):
    try:
        return safe_open(str(path), "pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, path: Path) -> None:
    if src.dtype not in _LOADABLE_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {src.dtype} "
                              "(supported: float32, float16, bfloat16, float8_e4m3fn)")
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"{path}: tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)} "
                              "from config.json")
    if (src.dtype == FP8_DTYPE) != (dst.dtype == FP8_DTYPE):
        if dst.dtype == FP8_DTYPE:
            raise CheckpointError(f"{path}: tensor {name} is {src.dtype} but config.json declares FP8 weights "
                                  "(quantization_config); the checkpoint and its config disagree")
        raise CheckpointError(f"{path}: tensor {name} is FP8 but config.json has no quantization_config")
    with torch.no_grad():
        dst.copy_(src)


def _progress_bar(total_bytes: int, progress: bool | None):
    if progress is False or (progress is None and total_bytes < 1 << 30):
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr)


def checkpoint_is_fp8(files: CheckpointFiles, cfg: ModelConfig) -> bool:
    if cfg.quant is not None:
        return True
    return any(name.endswith("weight_scale_inv") for name in files.tensor_to_file)


def check_loaded(root: Path, expected: set[str], loaded: set[str], unknown: list[str]) -> None:
    """Every expected tensor was read (else CheckpointError naming them); unknown ones are logged."""
    missing = sorted(expected - loaded)
    if missing:
        extra = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{root}: missing tensor(s) {', '.join(missing[:5])}{extra}; the checkpoint "
                              "does not match its config.json")
    if unknown:
        log.warning("ignored %d tensor(s) this engine does not use, e.g. %s", len(unknown), unknown[0])
