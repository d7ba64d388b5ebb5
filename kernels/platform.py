"""Which path the engine runs: the Triton kernels on CUDA ("triton"), the model's own torch code elsewhere ("torch").

Pure detection only (cached, nothing mutable): the engine decides once at construction and passes the answer on.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from deepseek_mcp.kernels.util import interpreting

KERNELS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (it does not on macOS or Windows)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_kernels(device: torch.device | str, force: str | None = None) -> str:
    """-> "triton" or "torch". force None/"auto": Triton on CUDA when it imports, torch elsewhere.
    force "triton" fails loudly where it cannot run (no Triton, or a non-CUDA device outside the interpreter)."""
    dev = torch.device(device)
    choice = "auto" if force is None else force
    if choice not in KERNELS:
        raise ValueError(f"kernels {force!r} is not one of {', '.join(KERNELS)}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("kernels 'triton' were requested but triton is not installed")
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        raise ValueError(f"kernels 'triton' need a CUDA device (or TRITON_INTERPRET=1 on cpu), got {dev}")
    return "triton"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 e4m3 tensor-core GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability(dev.index if dev.index is not None else torch.cuda.current_device()) >= (8, 9)


def fp8_gemm_runs(device: torch.device | str, kernels: str) -> bool:
    """Whether FP8 weights run the FP8 tensor-core GEMMs: everywhere but the Triton path on a CUDA GPU below
    compute capability 8.9, where they run the W8A16 kernels instead (kernels/w4a16.py; the CPU interpreter
    emulates FP8)."""
    return not (kernels == "triton" and torch.device(device).type == "cuda" and not fp8_supported(device))


def fp8_unsupported_notice(device: torch.device | str) -> str:
    """One line to log when an FP8 checkpoint runs the W8A16 kernels instead of the FP8 GEMMs."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = _capability(index)
        where = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    else:
        where = f"device {dev}"
    return (f"FP8 GEMM kernels need compute capability >= 8.9; {where} lacks them, so FP8 weights stay FP8 and "
            "run the W8A16 kernels (dequantized in registers, bf16 activations)")


def use_user_cache(cache_dir: Path) -> Path:
    """Triton's cache (compiled kernels and, where Triton can, autotune results: kernels/tuning.py) under the
    project's cache dir, so a restart compiles and tunes nothing. An explicit TRITON_CACHE_DIR wins. Call before
    the first launch (Triton reads the variable when it compiles). -> the directory in use."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(cache_dir) / "triton"))
    return Path(os.environ["TRITON_CACHE_DIR"])
