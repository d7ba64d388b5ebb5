"""Small helpers shared by the kernel wrappers: argument checks, launch arithmetic, device facts.

Nothing here imports Triton, so the torch twins work where Triton is not installed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_TRUE = ("1", "true", "yes", "on")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def check_tensor(
    t: torch.Tensor,
    name: str,
    *,
    shape: Sequence[int] | None = None,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_contiguous: bool = False,
) -> None:
    """Raise ValueError naming `name` when `t` does not have the given shape/rank/dtype/device/layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of: {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


def check_launchable(device: torch.device, what: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{what}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                     f"got a {device.type} tensor (`--kernels torch` serves those)")


def out_or_new(
    out: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device, name: str = "out"
) -> torch.Tensor:
    """Check a caller-provided output (exact shape, dtype, device, contiguous) or allocate one."""
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    check_tensor(out, name, shape=shape, dtypes=(dtype,), device=device)
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


@functools.cache
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 132, an H100's count, elsewhere)."""
    if device_index is None or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return num_sms(None)
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())
