"""The inference engine: DeepSeek-V3/V3.1 in-process, from checkpoint to streamed tokens.

- model: config, the model in the paper's order, checkpoint loading, the demo checkpoint
- engine: sequences, block manager, scheduler, batch, runner, the one step (`EngineCore`),
  `AsyncEngine` (the server's loop) and the synchronous `Engine` (the same step, driven to completion)
- text: tokenizer, the V3.1 chat template, the output parser
- constrained: grammar vocabulary, schema checks, grammars and their cache, planner, processors

The names users import are re-exported here (`from deepseek_mcp.inference import Engine, SamplingParams`);
they load on first use, so `import deepseek_mcp.inference` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "deepseek_mcp.inference.engine.engine",
    "GenerationOutput": "deepseek_mcp.inference.engine.engine",
    "AsyncEngine": "deepseek_mcp.inference.engine.async_engine",
    "RequestOutput": "deepseek_mcp.inference.engine.async_engine",
    "SamplingParams": "deepseek_mcp.inference.engine.sampling",
    "ModelConfig": "deepseek_mcp.inference.model.config",
    "Tokenizer": "deepseek_mcp.inference.text.tokenizer",
    "ChatTemplate": "deepseek_mcp.inference.text.template",
    "render_ids": "deepseek_mcp.inference.text.template",
    "StreamParser": "deepseek_mcp.inference.text.parse",
    "ConstraintFactory": "deepseek_mcp.inference.constrained.factory",
    "ConstraintError": "deepseek_mcp.inference.constrained.errors",
}

__all__ = [
    "AsyncEngine",
    "ChatTemplate",
    "ConstraintError",
    "ConstraintFactory",
    "Engine",
    "GenerationOutput",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "StreamParser",
    "Tokenizer",
    "render_ids",
]

if TYPE_CHECKING:
    from deepseek_mcp.inference.constrained.errors import ConstraintError
    from deepseek_mcp.inference.constrained.factory import ConstraintFactory
    from deepseek_mcp.inference.engine.async_engine import AsyncEngine, RequestOutput
    from deepseek_mcp.inference.engine.engine import Engine, GenerationOutput
    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.inference.model.config import ModelConfig
    from deepseek_mcp.inference.text.parse import StreamParser
    from deepseek_mcp.inference.text.template import ChatTemplate, render_ids
    from deepseek_mcp.inference.text.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
