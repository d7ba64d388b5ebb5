"""The MCP server on a tiny 4-bit checkpoint of each format (the full V3 vocabulary, so the bundled tokenizer's ids
fit): the `chat` tool answers what the engine generates for the rendered prompt."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp import Client
from quant_packers import int4_checkpoint_pair

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.text.parse import parse
from deepseek_mcp.inference.text.template import render_ids
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig
from deepseek_mcp.mcp_server.model_host import ModelHost
from deepseek_mcp.mcp_server.server import build_server
from deepseek_mcp.mcp_server.service import ChatService

pytest.importorskip("transformers")

FORMATS = {"compressed-tensors": (16, True), "gptq": (16, False), "awq": (16, True)}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chat_tool_serves_a_4bit_checkpoint(fmt: str, tmp_path: Path) -> None:
    group, zero_point = FORMATS[fmt]
    path = int4_checkpoint_pair(tmp_path, fmt, group, zero_point, vocab_size=129280)["q"]
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    assert engine.config.int4 is not None and engine.config.int4.fmt == fmt
    prompt_ids = render_ids([{"role": "user", "content": "Say hello."}], engine.tokenizer)
    want = engine.generate([prompt_ids], SamplingParams(max_tokens=4))[0]
    config = ServerConfig(cache_tokens=1024, sampling=SamplingDefaults(temperature=0.0),
                          limits=Limits(max_tokens=4, progress_interval_s=0.2))

    async def main() -> dict:
        host = ModelHost(config, loader=lambda: engine)
        async with host.running(), Client(build_server(ChatService(host, config))) as client:
            result = await client.call_tool("chat", {"prompt": "Say hello.", "max_tokens": 4})
            assert not result.is_error, result
            return result.structured_content

    out = anyio.run(main)
    assert out["usage"]["completion_tokens"] == len(want.token_ids) > 0
    assert out["text"] == parse(want.text).content and out["finish_reason"] == want.finish_reason
