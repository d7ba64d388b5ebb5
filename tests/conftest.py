"""Session-wide test settings, applied before any test module imports torch, triton or the engine."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest

# Kernels run through Triton's CPU interpreter where there is no GPU.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The demo checkpoint is written once per test session into a private cache, never the user's.
os.environ.setdefault("DEEPSEEK_MCP_CACHE", tempfile.mkdtemp(prefix="deepseek-mcp-test-cache-"))


# Shared by the constrained-decoding tests: the bundled V3.1 tokenizer and one factory (vocabulary + grammar
# cache) per module. Imported lazily: xgrammar is only needed by the modules that use them.
@pytest.fixture(scope="module")
def tok() -> Any:
    from inference.text.tokenizer import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="module")
def factory(tok: Any) -> Any:
    from inference.constrained.factory import ConstraintFactory

    return ConstraintFactory(tok)
