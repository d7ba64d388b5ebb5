"""`GET /metrics` after a mixed run (the counters equal what was sent, the histograms count every request, the
engine's gauges read its state), behind the API's token; and a runtime failure reported as such, at once, by
/health, list_models and the next call (issue 22, item 8)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from api_server import LiveServer, live_server
from prometheus_client.parser import text_string_to_metric_families

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig

TOKEN = "metrics-test-token-" + os.urandom(6).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(None)


def _config() -> ServerConfig:
    return ServerConfig(cache_tokens=4096, token=TOKEN, sampling=SamplingDefaults(temperature=0.0),
                        limits=Limits(max_tokens=8, progress_interval_s=0.2))


@pytest.fixture
def server(engine: Engine) -> Iterator[LiveServer]:
    with live_server(_config(), lambda: engine) as s:
        yield s


def mcp_call(server: LiveServer, tool: str, args: dict[str, Any]) -> Any:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main() -> Any:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as http, \
                Client(streamable_http_client(server.url + "/mcp", http_client=http)) as mcp:
            return await mcp.call_tool(tool, args)

    return anyio.run(main)


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_what_was_sent(server: LiveServer) -> None:
    assert httpx.get(server.url + "/metrics").status_code == 401  # the API's token rules
    assert httpx.get(server.url + "/metrics", headers={**AUTH, "Host": "evil.example"}).status_code == 421
    prompt = completion = 0
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        for max_tokens in (3, 5):
            r = http.post("/v1/chat/completions", json={"model": "deepseek-chat", "messages": HELLO,
                                                        "max_tokens": max_tokens})
            u = r.json()["usage"]
            prompt, completion = prompt + u["prompt_tokens"], completion + u["completion_tokens"]
        body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
        u = httpx.Response(200, content=lines[-2].removeprefix("data: ")).json()["usage"]
        prompt, completion = prompt + u["prompt_tokens"], completion + u["completion_tokens"]
        r = http.post("/v1/completions", json={"model": "deepseek-chat", "prompt": "Once upon", "max_tokens": 2})
        u = r.json()["usage"]
        prompt, completion = prompt + u["prompt_tokens"], completion + u["completion_tokens"]
        r = http.post("/v1/messages", json={"model": "deepseek-chat", "messages": HELLO, "max_tokens": 6})
        u = r.json()["usage"]
        prompt, completion = prompt + u["input_tokens"], completion + u["output_tokens"]
        assert http.post("/v1/chat/completions", json={"model": "deepseek-chat", "messages": HELLO,
                                                       "max_tokens": -1}).status_code == 400  # never reaches it
    result = mcp_call(server, "chat", {"prompt": "hi", "max_tokens": 2})
    completion += result.structured_content["usage"]["completion_tokens"]
    prompt += result.structured_content["usage"]["prompt_tokens"]
    assert not mcp_call(server, "list_models", {}).is_error
    assert mcp_call(server, "chat", {"prompt": "hi", "max_tokens": 0}).is_error

    m = scrape(server)
    sent = 6  # engine requests that ran: 2 chat + 1 streamed chat + 1 completion + 1 message + 1 MCP chat
    assert total(m, "deepseek_mcp:request_success_total") == sent, m
    assert total(m, "deepseek_mcp:request_success_total", finished_reason="length") == sent
    assert total(m, "deepseek_mcp:prompt_tokens_total") == prompt
    assert total(m, "deepseek_mcp:generation_tokens_total") == completion == 3 + 5 + 4 + 2 + 6 + 2
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert total(m, f"deepseek_mcp:{histogram}_count") == sent, histogram
        assert total(m, f"deepseek_mcp:{histogram}_bucket", le="+Inf") == sent, histogram
    assert total(m, "deepseek_mcp:request_time_per_output_token_seconds_count") == sent  # each made 2+ tokens
    # one inter-token latency per token after the first of each request
    assert total(m, "deepseek_mcp:inter_token_latency_seconds_count") == completion - sent
    assert total(m, "deepseek_mcp:inter_token_latency_seconds_bucket", le="+Inf") == completion - sent
    assert 0 < total(m, "deepseek_mcp:inter_token_latency_seconds_sum") < total(
        m, "deepseek_mcp:e2e_request_latency_seconds_sum")
    assert 0 < total(m, "deepseek_mcp:time_to_first_token_seconds_sum") < total(
        m, "deepseek_mcp:e2e_request_latency_seconds_sum")
    assert total(m, "deepseek_mcp:request_aborted_total") == 0
    assert total(m, "deepseek_mcp:mcp_tool_calls_total", tool="chat", outcome="ok") == 1
    assert total(m, "deepseek_mcp:mcp_tool_calls_total", tool="chat", outcome="error") == 1
    assert total(m, "deepseek_mcp:mcp_tool_calls_total", tool="list_models", outcome="ok") == 1
    # the engine's state: idle now; its prefix cache saw every prompt token it admitted
    assert total(m, "deepseek_mcp:num_requests_running", model_name="deepseek-v3.1-demo") == 0
    assert total(m, "deepseek_mcp:num_requests_waiting") == 0
    assert 0 <= total(m, "deepseek_mcp:kv_cache_usage_perc") <= 1
    queries = total(m, "deepseek_mcp:prefix_cache_queries_total")
    assert queries == prompt and 0 <= total(m, "deepseek_mcp:prefix_cache_hits_total") <= queries
    assert total(m, "deepseek_mcp:num_preemptions_total") == server.aengine.stats().num_preemptions


def test_inter_token_latency_is_one_gap_per_token_after_the_first() -> None:
    """Outputs of 2, 1 and 3 tokens delivered at 1.0, 1.5 and 2.25 s (the engine's clock): the second token of
    the first output and the last two of the third came with another one (gap 0); the others waited 0.5 and
    0.75 s. Five observations for six tokens, summing to the 1.25 s from the first token to the last."""
    from types import SimpleNamespace

    from deepseek_mcp.inference.engine.sampling import SamplingParams
    from deepseek_mcp.mcp_server.engine_request import run_request
    from deepseek_mcp.mcp_server.metrics import Metrics

    class Steps:  # stands in for AsyncEngine: three outputs, then finished
        scheduler = None

        def abort(self, request_id: str) -> None:
            raise AssertionError("nothing to abort")

        async def stream(self, prompt_ids: list[int], params: Any, **_: Any) -> Any:
            ids: list[int] = []
            for i, (n, at) in enumerate([(2, 1.0), (1, 1.5), (3, 2.25)]):
                new = list(range(len(ids), len(ids) + n))
                ids = ids + new
                yield SimpleNamespace(new_token_ids=new, token_ids=ids, text_delta="x" * n, num_cached_tokens=0,
                                      finished=i == 2, finish_reason="length" if i == 2 else None, stop=None,
                                      stats=SimpleNamespace(elapsed_s=at, ttft_s=0.9, tokens_per_s=4.0))

    run = anyio.run(lambda: run_request(Steps(), [1, 2, 3], SamplingParams(max_tokens=6), time_limit_s=60))
    assert len(run.token_ids) == 6 and run.inter_token_s == [0.0, 0.5, 0.75, 0.0, 0.0], run.inter_token_s
    metrics = Metrics(SimpleNamespace(name="m", aengine=None))
    metrics.observe_run(run)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}
    assert total(samples, "deepseek_mcp:inter_token_latency_seconds_count") == 5
    assert total(samples, "deepseek_mcp:inter_token_latency_seconds_sum") == 1.25
    assert total(samples, "deepseek_mcp:inter_token_latency_seconds_bucket", le="0.01") == 3  # the three zeros
    assert total(samples, "deepseek_mcp:inter_token_latency_seconds_bucket", le="0.5") == 4


def test_a_client_gone_is_counted_as_aborted(server: LiveServer) -> None:
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 3000, "stream": True}
    with httpx.Client(base_url=server.url, headers=AUTH) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as r:
        next(line for line in r.iter_lines() if line)
    deadline = time.monotonic() + 10
    while total(scrape(server), "deepseek_mcp:request_aborted_total", reason="cancelled") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert total(scrape(server), "deepseek_mcp:request_success_total") == 0


def test_a_runtime_failure_is_reported_at_once_as_such(server: LiveServer) -> None:
    """The engine loop dies after a successful load (its step raises): /health, list_models and the next calls
    say the engine failed while serving, never that the model failed to load, never ok."""
    aengine = server.aengine

    def broken_step() -> Any:
        raise RuntimeError("device lost (test)")

    aengine.core.step = broken_step  # this server's engine core only
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2})
    assert r.status_code in (500, 503), r.text
    deadline = time.monotonic() + 2
    while (health := httpx.get(server.url + "/health")).status_code == 200:
        assert time.monotonic() < deadline, health.text
        time.sleep(0.02)
    body = health.json()
    assert health.status_code == 503 and body["status"] == "failed", body
    assert "failed while serving" in body["error"] and "device lost (test)" in body["error"], body
    info = mcp_call(server, "list_models", {}).structured_content["models"][0]
    assert info["status"] == "failed" and "failed while serving" in info["error"], info
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                   json={"model": "deepseek-chat", "messages": HELLO, "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 503 and "stopped serving" in err["message"] and "failed to load" not in err["message"]
    result = mcp_call(server, "chat", {"prompt": "hi", "max_tokens": 2})
    assert result.is_error and "stopped serving" in result.content[0].text
