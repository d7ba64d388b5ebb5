"""The OpenAI-compatible API with the official `openai` client against a live loopback server (demo model)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2 as httpx
import jsonschema
import openai
import pytest
from api_server import LiveServer, live_server
from openai import OpenAI

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig

TOKEN = "api-test-token-" + os.urandom(6).hex()
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "count", "description": "Count", "parameters": COUNT}}]
SCHEMAS = {"get_weather": CITY, "count": COUNT}
HELLO = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(None)


def config(**limits: Any) -> ServerConfig:
    return ServerConfig(cache_tokens=4096, token=TOKEN, sampling=SamplingDefaults(temperature=0.0),
                        limits=Limits(**{"max_tokens": 8, "progress_interval_s": 0.2, **limits}))


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[LiveServer]:
    with live_server(config(), lambda: engine) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(api_key=TOKEN, base_url=server.url + "/v1", max_retries=0)


def test_seed_example_verbatim(server: LiveServer) -> None:
    # The project's seed, only base_url and api_key changed.
    client = OpenAI(api_key=TOKEN, base_url=server.url + "/v1")
    response = client.chat.completions.create(
        model="deepseek-chat",
        messages=[
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "Hello"},
        ],
        stream=False,
        extra_body={"thinking": {"type": "enabled"}}
    )
    print(response.choices[0].message.content)
    msg = response.choices[0].message
    assert isinstance(msg.content, str) and msg.content
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] != ""
    assert response.model == "deepseek-chat" and response.object == "chat.completion"
    assert response.usage.completion_tokens_details.reasoning_tokens == 4  # the default budget: max_tokens // 2


def test_models_list_served_names(client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["deepseek-v3.1-demo", "deepseek-chat", "deepseek-reasoner"]


def reasoning(msg: Any) -> str | None:
    return (msg.model_extra or {}).get("reasoning_content")


@pytest.mark.parametrize(("extra", "thinks"), [
    ({}, False),
    ({"thinking": {"type": "enabled"}}, True),
    ({"thinking": {"type": "disabled"}}, False),
    ({"chat_template_kwargs": {"thinking": True}}, True),
    ({"chat_template_kwargs": {"thinking": False}}, False),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True),
    ({"chat_template_kwargs": {"enable_thinking": False}}, False),
    ({"reasoning_effort": "low"}, True),
    ({"reasoning_effort": "none"}, False),
    ({"thinking_budget": 3}, True),
])
def test_thinking_switches(client: OpenAI, extra: dict[str, Any], thinks: bool) -> None:
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=12, extra_body=extra)
    msg, usage = r.choices[0].message, r.usage
    if thinks:
        assert reasoning(msg), msg
        budget = {"reasoning_effort": 3, "thinking_budget": 3}.get(next(iter(extra)), 6)
        assert usage.completion_tokens_details.reasoning_tokens == budget
    else:
        assert reasoning(msg) is None and msg.content
        assert usage.completion_tokens_details.reasoning_tokens == 0
    # never the answer in reasoning_content when thinking is off, in the stream either
    chunks = list(client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=12,
                                                 extra_body=extra, stream=True))
    streamed_reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                                 for c in chunks if c.choices)
    assert streamed_reasoning == (reasoning(msg) or "")


def test_reasoner_alias_thinks_and_conflicting_switches_refused(client: OpenAI) -> None:
    r = client.chat.completions.create(model="deepseek-reasoner", messages=HELLO, max_tokens=8)
    assert reasoning(r.choices[0].message)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-chat", messages=HELLO, extra_body={
            "thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": False}})
    assert e.value.body["param"] == "thinking.type" and "disagree" in e.value.body["message"]


def joined(chunks: list[Any]) -> dict[str, Any]:
    """Assemble a chat.completion.chunk stream the way clients do."""
    out: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for ch in c.choices:
            o = out.setdefault(ch.index, {"content": "", "reasoning": "", "calls": {}, "finish": None})
            d = ch.delta
            o["content"] += d.content or ""
            o["reasoning"] += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                if tc.index not in o["calls"]:
                    assert tc.id and tc.type == "function" and tc.function.name, tc  # the first delta of a call
                    o["calls"][tc.index] = {"name": tc.function.name, "arguments": ""}
                o["calls"][tc.index]["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                o["finish"] = ch.finish_reason
    return out


@pytest.mark.parametrize("kind", ["plain", "thinking", "required", "named", "auto", "json_schema"])
def test_stream_equals_non_stream(client: OpenAI, kind: str) -> None:
    kw: dict[str, Any] = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 24, "seed": 7}
    if kind == "thinking":
        kw["extra_body"] = {"thinking": {"type": "enabled"}}
    elif kind in ("required", "auto"):
        kw.update(tools=TOOLS, tool_choice=kind)
    elif kind == "named":
        kw.update(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "count"}})
    elif kind == "json_schema":
        kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}
    full = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    got = joined(chunks)[0]
    msg = full.message
    assert got["content"] == (msg.content or "")
    assert got["reasoning"] == (reasoning(msg) or "")
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
    assert [got["calls"][i] for i in sorted(got["calls"])] == calls
    assert got["finish"] == full.finish_reason
    assert (full.finish_reason == "tool_calls") == bool(calls) or full.finish_reason == "length"
    if kind in ("required", "named"):
        assert calls and full.finish_reason == "tool_calls"
        for c in calls:
            jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
        if kind == "named":
            assert {c["name"] for c in calls} == {"count"}
    if kind == "json_schema":
        jsonschema.validate(json.loads(msg.content), CITY)


def test_tools_auto_validated_and_single_call(client: OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=40, temperature=1.0, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, tools=TOOLS, tool_choice="auto",
                                       max_tokens=40)
    for c in r.choices[0].message.tool_calls or []:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, tools=TOOLS, tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


def test_tools_after_reasoning(client: OpenAI) -> None:
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, tools=TOOLS, tool_choice="required",
                                       max_tokens=60, extra_body={"thinking": {"type": "enabled"},
                                                                  "thinking_budget": 6})
    msg = r.choices[0].message
    assert reasoning(msg) and r.usage.completion_tokens_details.reasoning_tokens == 6
    assert msg.tool_calls and r.choices[0].finish_reason == "tool_calls"
    for c in msg.tool_calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_tool_round_trip(client: OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="deepseek-chat", messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})})
    r2 = client.chat.completions.create(model="deepseek-chat", messages=messages, tools=TOOLS, tool_choice="none",
                                        max_tokens=8)
    assert r2.choices[0].message.content and r2.choices[0].finish_reason in ("stop", "length")
    # the resent history hits the prefix cache
    assert r2.usage.prompt_tokens_details.cached_tokens >= 16
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_n_penalties_and_json_object(client: OpenAI) -> None:
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, n=3, temperature=1.0, seed=1,
                                       max_tokens=6)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(6 for _ in r.choices)
    chunks = list(client.chat.completions.create(model="deepseek-chat", messages=HELLO, n=3, temperature=1.0,
                                                 seed=1, max_tokens=6, stream=True))
    streamed = joined(chunks)
    assert sorted(streamed) == [0, 1, 2] and all(streamed[i]["finish"] == "length" for i in streamed)
    assert [streamed[c.index]["content"] for c in r.choices] == [c.message.content for c in r.choices]
    plain = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=24).choices[0]
    penalized = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=24,
                                               frequency_penalty=-2.0, presence_penalty=-2.0).choices[0]
    # random weights never repeat a token by themselves: a negative penalty (a bonus) makes them
    assert penalized.message.content != plain.message.content
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=40,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the sampled token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    plain = client.chat.completions.create(model="deepseek-chat", messages=HELLO, max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def _entries(lp: Any) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in lp.content]


@pytest.mark.parametrize("extra", [{}, {"thinking": {"type": "enabled"}}, {"stop": ["ab", "xyz!"]},
                                   {"tools": TOOLS, "tool_choice": "required"}])
def test_stream_logprobs_equal_non_stream(client: OpenAI, extra: dict[str, Any]) -> None:
    # Each token's entry comes once, in order, on the chunk that completes its text (or the last chunk):
    # joined, the streamed entries are the non-streamed ones; reasoning and control tokens included.
    body: dict[str, Any] = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 12, "logprobs": True,
                            "top_logprobs": 2, "extra_body": {k: v for k, v in extra.items() if k == "thinking"},
                            **{k: v for k, v in extra.items() if k != "thinking"}}
    whole = client.chat.completions.create(**body)
    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        delta = c.delta
        text += (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
        if c.logprobs is not None and c.logprobs.content:
            assert delta.content or getattr(delta, "reasoning_content", None) or delta.tool_calls \
                or c.finish_reason, "entries ride a chunk that carries text (or the last one)"
            streamed += _entries(c.logprobs)
    expected = _entries(whole.choices[0].logprobs)
    assert len(expected) == whole.usage.completion_tokens
    assert streamed == expected


def test_completions_and_fim(client: OpenAI) -> None:
    r = client.completions.create(model="deepseek-v3.1-demo", prompt="def add(a, b):", max_tokens=5)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="deepseek-v3.1-demo", prompt="def add(a, b):", max_tokens=5, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    fim = client.completions.create(model="deepseek-v3.1-demo", prompt="def add(a, b):\n    return ",
                                    suffix="\n\nprint(add(1, 2))\n", max_tokens=5)
    # BOS, fim begin, prefix, hole, suffix, fim end
    assert fim.usage.prompt_tokens > r.usage.prompt_tokens + 3 and fim.choices[0].text


def test_completions_batch_of_prompts(client: OpenAI) -> None:
    # strings and token-id lists, n samples each: choice index = prompt index x n + sample, as alone
    singles = [client.completions.create(model="deepseek-chat", prompt=p, max_tokens=4) for p in ("def f():", "x = 1")]
    alone = [x.choices[0].text for x in singles]
    r = client.completions.create(model="deepseek-chat", prompt=["def f():", "x = 1"], max_tokens=4, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]  # greedy
    assert r.usage.prompt_tokens == sum(x.usage.prompt_tokens for x in singles)  # each prompt once
    assert r.usage.completion_tokens == 16
    ids = client.completions.create(model="deepseek-chat", prompt=[[0, 100, 101], [0, 102]], max_tokens=3)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    chunks = list(client.completions.create(model="deepseek-chat", prompt=["def f():", "x = 1"], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == {0: alone[0], 1: alone[1]} and chunks[-1].usage.completion_tokens == 8
    for bad in ([], [[]], [[-1]], ["a", 3]):
        code, body = status_of(lambda bad=bad: client.completions.create(model="deepseek-chat", prompt=bad,
                                                                           max_tokens=2))
        assert code == 400 and body["param"].startswith("prompt"), body


def test_completions_logprobs_legacy_shape(client: OpenAI) -> None:
    r = client.completions.create(model="deepseek-chat", prompt="def add(a, b):", max_tokens=6, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert all(c.text[o:].startswith(t) for t, o in zip(lp.tokens, lp.text_offset, strict=True))
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and top[t] == pytest.approx(v) and v == pytest.approx(max(top.values()))
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(model="deepseek-chat", prompt="def add(a, b):", max_tokens=6,
                                           logprobs=2, stream=True):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                for key in streamed:
                    streamed[key] += getattr(ch.logprobs, key)
    assert streamed == {key: getattr(lp, key) for key in streamed}
    code, body = status_of(lambda: client.completions.create(model="deepseek-chat", prompt="x", max_tokens=2,
                                                             logprobs=21))
    assert code == 400 and body["param"] == "logprobs"


def status_of(fn: Any) -> tuple[int, Any]:
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e.body
    raise AssertionError("no error")


def test_errors_by_status_and_shape(client: OpenAI, server: LiveServer) -> None:
    def chat(**kw: Any) -> Any:
        return lambda: client.chat.completions.create(**{"model": "deepseek-chat", "messages": HELLO, **kw})

    status, body = status_of(chat(temperature=5))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    status, body = status_of(chat(logit_bias={"1": 1.0}))
    assert status == 400 and body["param"] == "logit_bias" and body["code"] == "unsupported"
    status, body = status_of(chat(logprobs=True, top_logprobs=21, stream=True))
    assert status == 400 and body["param"] == "top_logprobs"
    status, body = status_of(chat(top_logprobs=2))
    assert status == 400 and body["param"] == "top_logprobs"
    status, body = status_of(chat(logit_bias={"5": 10}))
    assert status == 400 and body["param"] == "logit_bias"
    status, body = status_of(chat(model="gpt-4o"))
    assert status == 404 and body["code"] == "model_not_found" and "deepseek-chat" in body["message"]
    status, body = status_of(chat(max_tokens=10**6))
    assert status == 400 and "4096" in body["message"] and "max_tokens" in body["message"]
    status, body = status_of(chat(messages=[{"role": "user", "content": "x " * 5000}]))
    assert status == 400 and "context" in body["message"]
    status, body = status_of(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert status == 400 and body["param"] == "tool_choice"
    bad = OpenAI(api_key="wrong", base_url=server.url + "/v1", max_retries=0)
    status, body = status_of(lambda: bad.models.list())
    assert status == 401 and body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/nowhere", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"x-api-key": TOKEN})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/health")  # no token needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"})
    assert r.status_code == 421


def test_queue_full_and_loading(engine: Engine) -> None:
    # one batch slot, held by a long request, and a waiting bound of 0: every other request is refused
    cfg = config(max_waiting=0, max_tokens=4000).model_copy(update={"max_num_seqs": 1})
    with live_server(cfg, lambda: engine) as s, httpx.Client(base_url=s.url, timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, json={
                "model": "deepseek-chat", "messages": HELLO, "max_tokens": 3000, "stream": True}) as long:
        assert long.status_code == 200
        deadline = time.monotonic() + 30
        while s.service.host.aengine.stats().running != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        c = OpenAI(api_key=TOKEN, base_url=s.url + "/v1", max_retries=0)
        try:
            c.chat.completions.create(model="deepseek-chat", messages=HELLO)
            raise AssertionError("no error")
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.body["code"] == "queue_full" and e.response.headers["retry-after"]
        r = httpx.post(s.url + "/v1/messages", headers={"x-api-key": TOKEN}, json={
            "model": "deepseek-chat", "max_tokens": 4, "messages": HELLO[1:]})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert mcp_chat(s, {"prompt": "hi"}).is_error  # the MCP tools get a clear error result too
    release = threading.Event()

    def slow_load() -> Engine:
        release.wait(30)
        raise RuntimeError("checkpoint is corrupt (test)")

    with live_server(config(), slow_load, ready=False) as s:
        c = OpenAI(api_key=TOKEN, base_url=s.url + "/v1", max_retries=0)
        try:
            c.chat.completions.create(model="deepseek-chat", messages=HELLO)
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.response.headers["retry-after"]
            assert "loading" in e.body["message"]
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        release.set()
        deadline = time.monotonic() + 10
        while s.service.host.status != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = status_of(lambda: c.chat.completions.create(model="deepseek-chat", messages=HELLO))
        assert status == 503 and "checkpoint is corrupt" in body["message"]
        assert httpx.get(s.url + "/health").json() == {"status": "failed", "model": "deepseek-v3.1-demo",
                                                       "error": "RuntimeError: checkpoint is corrupt (test)"}


def mcp_chat(server: LiveServer, args: dict[str, Any]) -> Any:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main() -> Any:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http, \
                Client(streamable_http_client(server.url + "/mcp", http_client=http)) as mcp:
            return await mcp.call_tool("chat", args)

    result = anyio.run(main)
    if result.is_error:
        assert "queue is full" in result.content[0].text
    return result


def wait_idle(aengine: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (aengine.stats().running or aengine.block_manager.usage) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert aengine.stats().running == 0 and aengine.block_manager.usage == 0


def test_disconnect_non_stream_aborts(server: LiveServer) -> None:
    aengine = server.aengine
    body = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"x-api-key": TOKEN}, timeout=1.0)
    wait_idle(aengine)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
def test_disconnect_mid_stream_frees_cache(server: LiveServer, route: str, caplog: pytest.LogCaptureFixture) -> None:
    aengine = server.aengine
    body = {"model": "deepseek-chat", "messages": HELLO[1:], "max_tokens": 2000, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        with http.stream("POST", route, json=body) as r:
            lines = r.iter_lines()
            for _ in range(8):
                next(lines)
            assert aengine.stats().running == 1 and aengine.block_manager.usage > 0
            steps_at_close = aengine.num_steps
    wait_idle(aengine)
    freed_after = aengine.num_steps - steps_at_close
    print(f"{route}: cache freed {freed_after} steps after the client closed")
    assert freed_after <= 3
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_16_api_calls_with_mcp_calls(server: LiveServer) -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main() -> tuple[list[Any], list[Any]]:
        results: list[Any] = [None] * 16
        mcp_results: list[Any] = [None] * 4
        headers = {"Authorization": f"Bearer {TOKEN}"}
        # every client closed on this loop: one left open is closed by the garbage collector on a later test's
        async with openai.AsyncOpenAI(api_key=TOKEN, base_url=server.url + "/v1", max_retries=0) as aclient, \
                httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http, \
                Client(streamable_http_client(server.url + "/mcp", http_client=http)) as mcp:

            async def api_call(i: int) -> None:
                kw: dict[str, Any] = {"model": "deepseek-chat", "messages": HELLO, "max_tokens": 6, "seed": i,
                                      "temperature": 1.0}
                if i % 4 == 1:
                    kw.update(tools=TOOLS, tool_choice="required", max_tokens=40)
                if i % 4 == 2:
                    stream = await aclient.chat.completions.create(**kw, stream=True)
                    results[i] = [c async for c in stream]
                else:
                    results[i] = await aclient.chat.completions.create(**kw)

            async def mcp_call(i: int) -> None:
                mcp_results[i] = await mcp.call_tool("chat", {"prompt": f"hello {i}", "max_tokens": 6})

            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(api_call, i)
                for i in range(4):
                    tg.start_soon(mcp_call, i)
        return results, mcp_results

    results, mcp_results = anyio.run(main)
    for i, r in enumerate(results):
        if i % 4 == 2:
            assert r[-1].choices[0].finish_reason in ("stop", "length")
        elif i % 4 == 1:
            assert r.choices[0].message.tool_calls
        else:
            assert r.choices[0].message.content
    assert all(not r.is_error and r.structured_content["text"] for r in mcp_results)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
def test_failure_mid_stream_ends_with_an_error_event(server: LiveServer, monkeypatch: pytest.MonkeyPatch,
                                                     route: str) -> None:
    from deepseek_mcp.inference.text.parse import ContentDelta
    from deepseek_mcp.mcp_server.engine_request import Decoded
    from deepseek_mcp.mcp_server.failures import GenerationFailed

    async def failing_run(*args: Any, on_events: Any = None, **kw: Any) -> Any:
        on_events(Decoded("partial", [ContentDelta("partial")], [], 7))
        raise GenerationFailed("generation failed: the engine broke (test)")

    assert server.service is not None
    monkeypatch.setattr(server.service, "run", failing_run)
    body = {"model": "deepseek-chat", "messages": HELLO[1:], "max_tokens": 8, "stream": True}
    with httpx.Client(base_url=server.url, headers={"x-api-key": TOKEN}) as http, \
            http.stream("POST", route, json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert "partial" in "".join(lines)
    if route == "/v1/messages":
        last = json.loads(lines[-1].removeprefix("data: "))
        assert lines[-2] == "event: error" and last["type"] == "error"
        assert last["error"]["type"] == "api_error" and "engine broke" in last["error"]["message"]
    else:  # an error chunk, then [DONE] as every OpenAI stream ends (vLLM does the same)
        assert lines[-1] == "data: [DONE]" and sum("[DONE]" in line for line in lines) == 1
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "generation_failed"


def test_hostile_bodies_get_4xx_in_the_api_shape(server: LiveServer) -> None:
    """A body past limits.max_request_bytes is refused while it is read (413, declared or streamed), JSON nested
    100,000 deep, a tool schema nested 200 deep and a lone surrogate escape are 400s, never 500s; the server
    goes on serving."""
    limit = ServerConfig().limits.max_request_bytes
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as http:
        big = b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
        r = http.post("/v1/chat/completions", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        r = http.post("/v1/messages", content=big, headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model": "deepseek-chat", "prompt": "'
            for _ in range(limit // (1 << 16) + 2):
                yield b"y" * (1 << 16)
            yield b'"}'

        r = http.post("/v1/completions", content=chunks())
        assert r.status_code == 413, r.text
        r = http.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000)
        assert r.status_code == 400 and "JSON nested deeper than 128 levels" in r.json()["error"]["message"]
        schema: dict[str, Any] = {"type": "string"}
        for _ in range(200):
            schema = {"type": "object", "properties": {"a": schema}}
        r = http.post("/v1/chat/completions", json={
            "model": "deepseek-chat", "messages": HELLO, "max_tokens": 4, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "deep", "parameters": schema}}]})
        assert r.status_code == 400 and "JSON nested deeper than 128 levels" in r.text, r.text  # 400 levels
        r = http.post("/v1/completions", content=b'{"model": "deepseek-chat", "prompt": "a\\ud800b", "max_tokens": 2}')
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", content=b'{"model": "deepseek-chat", "prompt": "a\\ud83d\\ude00b", '
                                                 b'"max_tokens": 2}')
        assert r.status_code == 200, r.text  # a surrogate pair is one character: fine
        assert http.get("/health").json()["status"] == "ok"


def test_nesting_limits_are_400s_naming_the_limit_in_each_api_shape(server: LiveServer) -> None:
    """A body nested 129 levels (one past MAX_JSON_DEPTH) or 100,000, and a tool schema nested 65 JSON levels (one
    past MAX_SCHEMA_DEPTH), are 400s naming the limit in the route's own error shape: OpenAI's chat completions
    and Responses, Anthropic's messages; a body at the limits is served."""
    from test_json_depth import deep_schema

    openai_auth = {"Authorization": f"Bearer {TOKEN}"}
    anthropic_auth = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"}

    def message(r: httpx.Response, route: str) -> str:
        assert r.status_code == 400, (route, r.text)
        if route == "/v1/messages":
            body = r.json()
            assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
            return str(body["error"]["message"])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request", error
        return str(error["message"])

    def tools(route: str, schema: dict[str, Any]) -> list[dict[str, Any]]:
        if route == "/v1/messages":
            return [{"name": "deep", "description": "d", "input_schema": schema}]
        if route == "/v1/responses":
            return [{"type": "function", "name": "deep", "parameters": schema}]
        return [{"type": "function", "function": {"name": "deep", "parameters": schema}}]

    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    with httpx.Client(base_url=server.url, timeout=60) as http:
        for route in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
            auth = anthropic_auth if route == "/v1/messages" else openai_auth
            ask: dict[str, Any] = ({"input": "Hello", "max_output_tokens": 16} if route == "/v1/responses" else
                                   {"messages": HELLO[1:], "max_tokens": 2})
            base = {"model": "deepseek-chat", **ask}
            for raw in (json.dumps({**base, "x": nested(128)}).encode(), b"[" * 100_000 + b"]" * 100_000):
                got = message(http.post(route, content=raw, headers=auth), route)
                assert "JSON nested deeper than 128 levels" in got, (route, got)
            at_limit = http.post(route, headers=auth, json={**base, "x": nested(127)})  # 128 levels in all
            if route == "/v1/responses":  # a closed shape: the unknown field, not the depth, is refused
                assert message(at_limit, route) == "x: unknown field", at_limit.text
            else:
                assert at_limit.status_code == 200, (route, at_limit.text)
            got = message(http.post(route, headers=auth, json={**base, "tools": tools(route, deep_schema(65))}),
                          route)
            assert "JSON nested deeper than 64 levels" in got and "deep" in got, (route, got)
            fits = http.post(route, headers=auth, json={**base, "tools": tools(route, deep_schema(64))})
            assert fits.status_code == 200, (route, fits.text)
