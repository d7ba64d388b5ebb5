"""`--speculative-tokens` through the server (issue 24): the demo with its MTP layer drafting 2 tokens a step
answers every API and the MCP `chat` tool with the same greedy text as without, reports a `speculative` block in
each usage (the counts summing to the engine's), `list_models` stats and the spec-decode counters of /metrics; the
flag reaches the config and is bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from api_server import LiveServer, live_server
from test_ops_metrics import AUTH, TOKEN, mcp_call, scrape, total  # one token: these helpers send it

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.mcp_server.__main__ import build_parser, overrides
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig

HELLO = [{"role": "user", "content": "Write a line about caches."}]


def _config(k: int) -> ServerConfig:
    return ServerConfig(cache_tokens=4096, token=TOKEN, speculative_tokens=k,
                        sampling=SamplingDefaults(temperature=0.0), limits=Limits(max_tokens=12))


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LiveServer, LiveServer]]:
    plain = Engine.from_pretrained(None)
    spec = Engine.from_pretrained(None, speculative_tokens=2)
    with live_server(_config(0), lambda: plain) as a, live_server(_config(2), lambda: spec) as b:
        yield a, b


def _calls(server: LiveServer) -> tuple[list[str], list[dict[str, Any]]]:
    """The same requests on every route: (texts, usages)."""
    texts, usages = [], []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
        r = http.post("/v1/chat/completions", json={"model": "deepseek-chat", "messages": HELLO}).json()
        texts.append(r["choices"][0]["message"]["content"])
        usages.append(r["usage"])
        r = http.post("/v1/completions", json={"model": "deepseek-chat", "prompt": "Once upon a time"}).json()
        texts.append(r["choices"][0]["text"])
        usages.append(r["usage"])
        r = http.post("/v1/messages", json={"model": "deepseek-chat", "messages": HELLO, "max_tokens": 12}).json()
        texts.append("".join(b.get("text", "") for b in r["content"]))
        usages.append(r["usage"])
        r = http.post("/v1/responses", json={"model": "deepseek-chat", "input": "Write a line about caches.",
                                             "max_output_tokens": 12}).json()
        texts.append(r["output"][-1]["content"][0]["text"])
        usages.append(r["usage"])
    result = mcp_call(server, "chat", {"prompt": "hi", "max_tokens": 12})
    texts.append(result.structured_content["text"])
    usages.append(result.structured_content["usage"])
    return texts, usages


def test_same_text_and_a_speculative_block_in_every_usage(servers: tuple[LiveServer, LiveServer]) -> None:
    plain, spec = servers
    want, plain_usage = _calls(plain)
    got, usages = _calls(spec)
    assert got == want
    assert all("speculative" not in u or u["speculative"] is None for u in plain_usage)
    drafted = accepted = 0
    for u in usages:
        s = u["speculative"]
        assert s["draft_tokens"] > 0 and 0 <= s["accepted_tokens"] <= s["draft_tokens"], u
        assert s["acceptance_rate"] == round(s["accepted_tokens"] / s["draft_tokens"], 4)
        assert 1 <= s["mean_accepted_length"] <= 3
        drafted, accepted = drafted + s["draft_tokens"], accepted + s["accepted_tokens"]
    stats = spec.aengine.stats()
    assert (stats.speculative_tokens, stats.draft_tokens, stats.accepted_tokens) == (2, drafted, accepted)
    listed = mcp_call(spec, "list_models", {}).structured_content
    info = listed["models"][0]["stats"] if "models" in listed else listed["stats"]
    assert info["draft_tokens"] == drafted and info["speculative_tokens"] == 2
    m = scrape(spec)
    assert total(m, "deepseek_mcp:spec_decode_num_draft_tokens_total") == drafted
    assert total(m, "deepseek_mcp:spec_decode_num_accepted_tokens_total") == accepted
    assert total(m, "deepseek_mcp:spec_decode_num_drafts_total") == stats.verify_steps > 0
    assert total(scrape(plain), "deepseek_mcp:spec_decode_num_draft_tokens_total") == 0  # not exported


def test_the_flag_reaches_the_config_and_is_bounded() -> None:
    args = build_parser().parse_args(["--speculative-tokens", "3"])
    assert ServerConfig.model_validate(overrides(args)).speculative_tokens == 3
    with pytest.raises(ValueError, match="speculative_tokens"):
        ServerConfig(speculative_tokens=4)


def test_constrained_tool_call_under_speculation(servers: tuple[LiveServer, LiveServer]) -> None:
    """`tool_choice: required` with the MTP layer drafting: the grammar sees every verified position in order, so
    the call parses and validates, and it is the plain server's call."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}],
            "tools": [{"type": "function", "function": {"name": "forecast", "parameters": schema}}],
            "tool_choice": "required", "max_tokens": 64}
    calls = []
    for server in servers:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
            r = http.post("/v1/chat/completions", json=body).json()
        call = r["choices"][0]["message"]["tool_calls"][0]["function"]
        jsonschema.validate(json.loads(call["arguments"]), schema)
        calls.append(call)
        usage = r["usage"]
    assert calls[0] == calls[1]
    assert usage["speculative"]["draft_tokens"] > 0
