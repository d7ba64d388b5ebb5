"""`autotune`: triton.autotune with its results persisted in Triton's cache dir where the Triton version can.

Triton >= 3.2 takes `cache_results=True`: the chosen config per key is written next to the compiled kernels
(TRITON_CACHE_DIR, which `kernels.platform.use_user_cache` points under the project's cache), so a restart reads
it instead of re-benchmarking. Older versions tune again (correct, only slower at warm-up).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import triton


def _persists() -> bool:
    return "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(**kwargs: Any) -> Callable:
    if _persists():
        kwargs.setdefault("cache_results", True)
    return triton.autotune(**kwargs)
