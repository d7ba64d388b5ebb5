"""Load DeepSeek-V3 safetensors checkpoints (bf16/fp16/fp32, or FP8 e4m3 with 128x128 block scales).

Tensors are read one at a time from memory-mapped files straight into preallocated parameters, so peak RAM
stays near the final model size. Routed experts (`mlp.experts.{e}.{gate,up,down}_proj`) are copied into
stacked `[E, ...]` parameters. The multi-token-prediction layer (index >= num_hidden_layers) is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.layers import FP8_DTYPE
from deepseek_mcp.inference.model.transformer import Transformer

log = logging.getLogger(__name__)

_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$"
)
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


def _target(model: Transformer, name: str) -> tuple[torch.Tensor, int | None] | None:
    """The parameter a checkpoint tensor loads into, and the expert index for stacked experts."""
    m = _EXPERT.match(name)
    if m:
        prefix, expert, proj, kind = m.groups()
        experts = model.get_submodule(prefix)
        attr = proj if kind == "weight" else proj + "_scale_inv"
        t = getattr(experts, attr, None)
        return (t, int(expert)) if t is not None else None
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    t = getattr(module, attr, None)
    return (t, None) if isinstance(t, torch.Tensor) else None


def load_weights(model: Transformer, files: CheckpointFiles, *, progress: bool | None = None) -> None:
    """Copy every checkpoint tensor into `model`, checking names, shapes and dtypes."""
    cfg = model.cfg
    expected = _expected_names(model)
    loaded: set[str] = set()
    skipped_mtp = 0
    unknown: list[str] = []
    total_bytes = sum(f.stat().st_size for f in files.weight_files)
    bar = _progress_bar(total_bytes, progress)
    for path in files.weight_files:
        try:
            handle = safe_open(str(path), "pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        with handle as f:
            for name in f.keys():
                layer = _LAYER.match(name)
                if layer and int(layer.group(1)) >= cfg.num_layers:
                    skipped_mtp += 1  # multi-token-prediction layer: used for speculative decoding only
                    continue
                target = _target(model, name)
                if target is None:
                    unknown.append(name)
                    continue
                param, expert = target
                try:
                    src = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{path}: tensor {name} could not be read (truncated or corrupt "
                                          f"file?): {e}") from None
                _copy(param, expert, src, name, path)
                loaded.add(name)
                if bar is not None:
                    bar.update(src.numel() * src.element_size())
    if bar is not None:
        bar.close()
    check_loaded(files.root, expected, loaded, unknown)
    if skipped_mtp:
        log.info("skipped %d multi-token-prediction tensors", skipped_mtp)


def _copy(param: torch.Tensor, expert: int | None, src: torch.Tensor, name: str, path: Path) -> None:
    dst = param[expert] if expert is not None else param
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


def _expected_names(model: Transformer) -> set[str]:
    names: set[str] = set()
    cfg = model.cfg
    for pname, p in model.named_parameters():
        if p is None:
            continue
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$", pname)
        if m:
            kind = "weight_scale_inv" if m.group(3) else "weight"
            names.update(f"{m.group(1)}.{e}.{m.group(2)}.{kind}" for e in range(cfg.n_routed_experts))
        else:
            names.add(pname)
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


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
