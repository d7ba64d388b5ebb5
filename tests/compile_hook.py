"""Record what Triton compiles: on a GPU through Triton's JIT cache-miss hook (`triton.knobs.runtime.
jit_cache_hook` in Triton 3.4+, 3.6 and 3.9 included; `JITFunction.cache_hook` before), under the interpreter
(which compiles nothing) by the key a compile would have: kernel, argument dtypes, 16-byte pointer alignment,
constexpr values, integer specialization (== 1, % 16 == 0) and launch options, as Triton's cache keys them."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _spec(value: Any, constexpr: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if constexpr or isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return "1" if value == 1 else "16" if value % 16 == 0 else "i"
    return type(value).__name__


def _interpreter_key(fn: Any, args: tuple, kwargs: dict) -> tuple:
    params = list(inspect.signature(fn.fn).parameters.values())
    const = {p.name for p in params if "constexpr" in str(p.annotation)}
    named = dict(zip([p.name for p in params], args))
    named.update({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
    return (fn.fn.__name__, *sorted((k, _spec(v, k in const or k not in {p.name for p in params}))
                                    for k, v in named.items()))


@contextmanager
def record_compiles() -> Iterator[list]:
    """Yields a list that fills with one entry per compile (GPU) or per would-be compile key (interpreter;
    repeated keys are recorded each time: compare sets)."""
    import triton

    seen: list = []
    from deepseek_mcp.kernels.util import interpreting

    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def recorded(self, *args, **kwargs):
            seen.append(_interpreter_key(self, args, kwargs))
            return run(self, *args, **kwargs)

        InterpretedFunction.run = recorded
        try:
            yield seen
        finally:
            InterpretedFunction.run = run
        return

    def hook(*args: Any, **kwargs: Any) -> bool:
        seen.append(kwargs.get("repr"))
        return False  # False: compile as usual

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
        old = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = hook
        try:
            yield seen
        finally:
            knobs.runtime.jit_cache_hook = old
        return
    from triton.runtime.jit import JITFunction

    old = JITFunction.cache_hook
    JITFunction.cache_hook = hook
    try:
        yield seen
    finally:
        JITFunction.cache_hook = old
