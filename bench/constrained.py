"""Constrained-decoding overhead benchmark (a script, not a test).

    .venv/bin/python bench/constrained.py                      # demo checkpoint on CPU
    .venv/bin/python bench/constrained.py --device cuda --model /path/to/checkpoint

Decodes the same requests (temperature 1, seeded) through the AsyncEngine three ways:
  free       no processor (EOS ignored, `--max-tokens` tokens each);
  overlap    schema-constrained, the engine runs `prepare()` (matcher sync + token bitmask) on its prepare
             thread while the model computes;
  serial     schema-constrained with `prepare` hidden, so the mask work runs after the forward.
Workloads: a tool call (tool_choice "required", three realistic tools) and a JSON response_format. Reports
wall time per generated token, the constrained overhead against free decoding, and per token the time inside
the processor: `prepare` (bitmask fill + planning, overlappable), `__call__` (mask apply + budget steering, on the
critical path), and xgrammar's fill alone. Batch 1 and `--batch` concurrent requests.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import anyio
import torch

from deepseek_mcp.inference.constrained.factory import ConstraintFactory
from deepseek_mcp.inference.constrained.processors import GrammarProcessor
from deepseek_mcp.inference.engine.async_engine import AsyncEngine
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city"]}},
    {"name": "web_search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 3}, "filters": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"key": {"type": "string"}, "value": {"type": "number"}},
            "required": ["key", "value"]}}}, "required": ["query"]}},
    {"name": "create_event", "parameters": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "start": {"type": "string", "format": "date-time"},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email"}}},
        "required": ["title", "start"]}},
]
RESPONSE = {"type": "json_schema", "schema": {"type": "object", "properties": {
    "answer": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "sources": {"type": "array", "items": {"type": "string", "format": "uri"}, "maxItems": 4}},
    "required": ["answer", "confidence"]}}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


class Timed:
    """Wraps a processor, timing `prepare` and `__call__`; `overlap=False` hides `prepare` from the engine."""

    def __init__(self, proc: GrammarProcessor, overlap: bool) -> None:
        self.proc = proc
        self.prepare_s = 0.0
        self.call_s = 0.0
        if overlap:
            self.prepare = self._prepare

    def _prepare(self, output_ids: list[int]) -> None:
        t0 = time.perf_counter()
        self.proc.prepare(output_ids)
        self.prepare_s += time.perf_counter() - t0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.proc(output_ids, logits)
        self.call_s += time.perf_counter() - t0
        return out


async def run_mode(aeng: AsyncEngine, factory: ConstraintFactory, prompt: list[int], mode: str, workload: str,
                   batch: int, max_tokens: int, seed: int) -> dict[str, Any]:
    wrappers: list[Timed] = []
    counts: list[int] = []

    async def one(i: int) -> None:
        procs: list[Any] = []
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed + i, ignore_eos=mode == "free")
        if mode != "free":
            proc = (factory.for_tools(TOOLS, "required", max_tokens) if workload == "tool call"
                    else factory.for_response_format(RESPONSE, max_tokens))
            assert isinstance(proc, GrammarProcessor)
            wrappers.append(Timed(proc, overlap=mode == "overlap"))
            procs = [wrappers[-1]]
        n = 0
        async for out in aeng.stream(prompt, params, logits_processors=procs):
            n = len(out.token_ids)
        counts.append(n)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(batch):
            tg.start_soon(one, i)
    wall = time.perf_counter() - start
    tokens = sum(counts)
    row: dict[str, Any] = {"mode": mode, "workload": workload, "batch": batch, "tokens": tokens,
                           "ms_per_tok": 1e3 * wall / max(tokens, 1)}
    if wrappers:
        row["prepare_ms"] = 1e3 * sum(w.prepare_s for w in wrappers) / tokens
        row["call_ms"] = 1e3 * sum(w.call_s for w in wrappers) / tokens
        row["fill_ms"] = 1e3 * sum(w.proc.mask_seconds for w in wrappers) / tokens
        row["plan_ms"] = 1e3 * sum(w.proc.plan_seconds for w in wrappers) / tokens
        row["steered"] = sum(w.proc.steered for w in wrappers)
        row["complete"] = sum(w.proc.is_terminated for w in wrappers)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint path or repo id (default: the demo checkpoint)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    engine = Engine.from_pretrained(args.model, device=args.device)
    tok = engine.tokenizer
    t0 = time.perf_counter()
    factory = ConstraintFactory(tok, vocab_size=engine.config.vocab_size)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    factory.for_tools(TOOLS, "required", args.max_tokens)
    compile_tools = time.perf_counter() - t0
    t0 = time.perf_counter()
    factory.for_response_format(RESPONSE, args.max_tokens)
    compile_json = time.perf_counter() - t0
    t0 = time.perf_counter()
    factory.for_tools(TOOLS, "required", args.max_tokens)
    cached = time.perf_counter() - t0
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>What is the weather in Paris tomorrow?"
                        "<｜Assistant｜></think>")

    async def bench() -> list[dict[str, Any]]:
        rows = []
        async with AsyncEngine(engine, max_num_seqs=max(args.batch, 1)) as aeng:
            await run_mode(aeng, factory, prompt, "free", "tool call", 1, 8, args.seed)  # warm-up
            for workload in ("tool call", "json"):
                for batch in (1, args.batch):
                    for mode in ("free", "overlap", "serial"):
                        best = None
                        for _ in range(args.repeats):
                            row = await run_mode(aeng, factory, prompt, mode, workload, batch, args.max_tokens,
                                                 args.seed)
                            if best is None or row["ms_per_tok"] < best["ms_per_tok"]:
                                best = row
                        rows.append(best)
        return rows

    rows = anyio.run(bench)
    print(f"device: {device_name(engine.device)}; model: {engine.name} ({engine.dtype}); "
          f"max_tokens {args.max_tokens}; prompt {len(prompt)} tokens; temperature 1")
    print(f"factory setup (vocabulary, {factory.vocab.vocab_size} ids) {setup * 1e3:.0f} ms; grammar compile: "
          f"3 tools {compile_tools * 1e3:.1f} ms, response schema {compile_json * 1e3:.1f} ms, "
          f"cached {cached * 1e3:.2f} ms (per-request processor setup incl. first plan)")
    head = (f"{'workload':<10} {'batch':>5} {'mode':<8} {'tokens':>6} {'ms/tok':>8} {'overhead':>9} "
            f"{'prepare':>8} {'call':>7} {'fill':>7} {'plan':>7} {'steered':>8} {'complete':>8}")
    print(head)
    print("-" * len(head))
    free: dict[tuple[str, int], float] = {}
    for r in rows:
        key = (r["workload"], r["batch"])
        if r["mode"] == "free":
            free[key] = r["ms_per_tok"]
            print(f"{r['workload']:<10} {r['batch']:>5} {r['mode']:<8} {r['tokens']:>6} {r['ms_per_tok']:>8.2f}")
            continue
        over = r["ms_per_tok"] - free[key]
        print(f"{r['workload']:<10} {r['batch']:>5} {r['mode']:<8} {r['tokens']:>6} {r['ms_per_tok']:>8.2f} "
              f"{over:>+8.2f}  {r['prepare_ms']:>7.3f} {r['call_ms']:>7.3f} {r['fill_ms']:>7.3f} "
              f"{r['plan_ms']:>7.3f} {r['steered']:>4}/{r['batch']:<3} {r['complete']:>4}/{r['batch']:<3}")
    print("ms per generated token; overhead = constrained - free; prepare/call/fill/plan: processor time per "
          "token (prepare runs beside the forward in 'overlap', inside 'call' in 'serial').")


if __name__ == "__main__":
    main()
