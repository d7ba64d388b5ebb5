"""Count what a forward launches: Triton kernels (under the interpreter) and aten compute ops outside them
(view and metadata ops excluded: they launch nothing on a GPU)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_FREE = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "split", "split_with_sizes",
         "slice", "select", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "chunk", "unbind",
         "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "flatten", "unflatten",
         "_to_copy_noop", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
         "size", "stride", "numel", "is_contiguous", "_local_scalar_dense", "record_stream"}
# composite ops the mode sees whole: they launch something only when their result is a new tensor
_MAYBE_COPY = {"to", "reshape", "contiguous", "flatten", "float", "type_as", "view_as"}


class Launches:
    def __init__(self) -> None:
        self.triton: Counter[str] = Counter()
        self.aten: Counter[str] = Counter()
        self.in_kernel = 0

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.triton), Counter(self.aten)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, launches: Launches):
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        out = func(*args, **(kwargs or {}))
        if self.launches.in_kernel:
            return out
        if name in _MAYBE_COPY:
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is not None and isinstance(out, torch.Tensor) and \
                    out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
                self.launches.aten[name + " (copy)"] += 1
        elif name not in _FREE:
            self.launches.aten[name] += 1
        return out


@contextmanager
def count_launches() -> Iterator[Launches]:
    from triton.runtime.interpreter import InterpretedFunction

    launches = Launches()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches.triton[self.fn.__name__] += 1
        launches.in_kernel += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            launches.in_kernel -= 1

    InterpretedFunction.run = counted
    try:
        with _AtenCounter(launches):
            yield launches
    finally:
        InterpretedFunction.run = run
