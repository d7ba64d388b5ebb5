"""The inference engine: DeepSeek-V3/V3.1 in-process, from checkpoint to streamed tokens.

- inference.model: config, the model in the paper's order, checkpoint loading, the demo checkpoint
- inference.engine: sequences, block manager, scheduler, batch, runner, the one step (`EngineCore`),
  `AsyncEngine` (the server's loop) and the synchronous `Engine` (the same step, driven to completion)
- inference.text: tokenizer, the V3.1 chat template, the output parser
- inference.constrained: grammar vocabulary, schema checks, grammars and their cache, planner, processors

The names users import are re-exported here (`from inference import Engine, SamplingParams`); they load on
first use, so `import inference` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "inference.engine.engine",
    "GenerationOutput": "inference.engine.engine",
    "AsyncEngine": "inference.engine.async_engine",
    "RequestOutput": "inference.engine.async_engine",
    "SamplingParams": "inference.engine.sampling",
    "ModelConfig": "inference.model.config",
    "Tokenizer": "inference.text.tokenizer",
    "ChatTemplate": "inference.text.template",
    "render_ids": "inference.text.template",
    "StreamParser": "inference.text.parse",
    "ConstraintFactory": "inference.constrained.factory",
    "ConstraintError": "inference.constrained.errors",
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
    from inference.constrained.errors import ConstraintError
    from inference.constrained.factory import ConstraintFactory
    from inference.engine.async_engine import AsyncEngine, RequestOutput
    from inference.engine.engine import Engine, GenerationOutput
    from inference.engine.sampling import SamplingParams
    from inference.model.config import ModelConfig
    from inference.text.parse import StreamParser
    from inference.text.template import ChatTemplate, render_ids
    from inference.text.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
