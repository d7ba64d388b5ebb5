"""A guard that fails on any host read of a tensor (`.item()`, `.tolist()`, `bool()`, `int()`, `float()`,
`.cpu()`, `.numpy()`, and `nonzero`, whose output size is read back) made by our code: on a GPU each one waits
for the device. Triton's own frames (its CPU
interpreter reads tensors to emulate kernels) are allowed."""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

_BANNED = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
           torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.nonzero,
           torch.Tensor.nonzero}


class HostSyncError(AssertionError):
    pass


def _caller_is_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("triton"):
            return True
        if not name.startswith(("torch", __name__)):
            return False
        frame = frame.f_back
    return False


class NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _BANNED and not _caller_is_triton():
            caller = sys._getframe(1)
            raise HostSyncError(f"host read {func.__name__} inside the step at {caller.f_code.co_filename}:"
                                f"{caller.f_lineno}")
        return func(*args, **(kwargs or {}))
