"""A body under the 16 MiB limit whose prompt is far past the context (issue 22, item 1), sent to the console script:
each route (count_tokens and a batch of raw prompts too) refuses it with its 400 "the prompt is at least N tokens
but the context holds C" within ANSWER_BOUND_S, having encoded only as far as the context (inference/text/
bounded.py); the server's RSS grows by less than RSS_BOUND, and `GET /health` answers within HEALTH_BOUND_S
throughout (the encoding runs on a worker thread, in pieces that release the GIL).

Before: such a body was tokenized whole before the context check, on the event loop or in one call that held the
GIL. On a 2-vCPU VM, 15 MB of code lines took 26.7 s to refuse, RSS +2.9 GB, /health stalled 16.5 s; 15 MB of one
letter, 13.2 s, +1.2 GB, /health 12.6 s."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from test_ops_body_limit import LIMIT, Watch, console_server, rss

TOKEN = "long-prompt-token-" + os.urandom(6).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXT_BYTES = 15_000_000  # the prompt's UTF-8 bytes in each body (bodies stay under the 16 MiB limit)
ANSWER_BOUND_S = 3.0  # each refusal arrives within this, from the request's start
RSS_BOUND = 300 << 20  # the server's RSS grows less than this over all of them
HEALTH_BOUND_S = 1.0  # every /health meanwhile answers within this


def code_lines(size: int) -> str:
    """Source-like text: about 5 M tokens in 15 MB, cut into pieces at its line starts and word ends."""
    lines = (f"    total += values[{i}] * {i % 97}  # step {i}: accumulate the weighted value\n" for i in range(size))
    out, n = [], 0
    for line in lines:
        if n + len(line) > size:
            break
        out.append(line)
        n += len(line)
    return "".join(out)


def prose(size: int) -> str:
    """Multilingual prose on one line (no newline at all): cut at word ends and CJK boundaries only."""
    unit = "The quick brown fox jumps over the lazy dog, 12 times; 快速的棕色狐狸跳过了懒狗。 "
    return unit * (size // len(unit.encode()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    with console_server(tmp_path_factory.mktemp("long") / "server.log", TOKEN) as served:
        yield served


def test_a_prompt_far_past_the_context_is_refused_cheaply_on_every_route(
        server: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    proc, port, log = server
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", headers=AUTH, json=chat, timeout=60).status_code == 200
    context = 131_072  # the demo's: the KV cache's cap below its 163,840-token context
    code, word = code_lines(TEXT_BYTES), "x" * TEXT_BYTES
    anthropic = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"}
    requests = [  # route, headers, body, whether the count stops near the context (else: a bound proves it)
        ("/v1/chat/completions", AUTH, {"model": "deepseek-chat", "messages": [{"role": "user", "content": code}]},
         True),
        ("/v1/chat/completions", AUTH, {"model": "deepseek-chat", "messages": [{"role": "user", "content": word}]},
         False),  # one pre-tokenizer piece: 15 MB of "x" is at least 15 M / 8 tokens, nothing encoded
        ("/v1/completions", AUTH, {"model": "deepseek-chat", "prompt": code, "max_tokens": 2}, True),
        ("/v1/messages", anthropic, {"model": "deepseek-chat", "max_tokens": 2,
                                     "messages": [{"role": "user", "content": prose(TEXT_BYTES)}]}, True),
        ("/v1/messages/count_tokens", anthropic, {"model": "deepseek-chat",
                                                  "messages": [{"role": "user", "content": code}]}, True),
        ("/v1/completions", AUTH, {"model": "deepseek-chat", "prompt": ["Say hi.", code], "max_tokens": 2}, True),
    ]
    bodies = [json.dumps(body, ensure_ascii=False).encode() for _, _, body, _ in requests]
    assert all(len(b) < LIMIT for b in bodies), [len(b) for b in bodies]
    baseline = min(rss(proc.pid) for _ in range(5))
    answers: list[tuple[float, httpx.Response]] = []
    with Watch(proc.pid, url) as watch, httpx.Client(base_url=url, timeout=120) as http:
        for (path, headers, _, _), body in zip(requests, bodies):
            start = time.monotonic()
            r = http.post(path, headers={**headers, "content-type": "application/json"}, content=body)
            answers.append((time.monotonic() - start, r))
    grown = max(watch.rss) - baseline
    slowest = max(s for s, _ in watch.health)
    print(f"answers {', '.join(f'{req[0]} {s:.2f} s' for req, (s, _) in zip(requests, answers))}; RSS "
          f"{baseline / 2**20:.0f} MB, grew at most {grown / 2**20:.0f} MB; /health slowest {slowest * 1000:.0f} ms "
          f"of {len(watch.health)}")
    for (path, _, body, near), (seconds, r) in zip(requests, answers):
        assert r.status_code == 400, (path, r.text[:500])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error", (path, r.text[:500])
        message = error["message"].removeprefix("prompt[1]: " if isinstance(body.get("prompt"), list) else "")
        assert message.startswith("the prompt is at least ") and f"the context holds {context} " in message, message
        counted = int(message.split()[5])
        assert counted >= context and (counted < context + 20_000 or not near), message  # stopped at the context
        assert seconds < ANSWER_BOUND_S, (path, seconds)
    assert grown < RSS_BOUND, f"RSS grew {grown / 2**20:.0f} MB"
    assert len(watch.health) >= 10 and {s for _, s in watch.health} == {200}, watch.health
    assert slowest < HEALTH_BOUND_S, watch.health
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
