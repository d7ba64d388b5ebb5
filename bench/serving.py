"""Serving benchmark for the AsyncEngine (a script, not a test).

    .venv/bin/python bench/serving.py                 # demo checkpoint on CPU
    .venv/bin/python bench/serving.py --device cuda --model /path/to/checkpoint

Measures, in one run:
1. decode throughput with 1, 4 and 16 concurrent requests (distinct random prompts, `--max-tokens` each,
   EOS ignored): total generated tokens / wall time, and the decode rate after the first tokens;
2. time to first token of one `--long-prompt`-token prompt sent twice: the second is served from the prefix
   cache (all but its last block).
Targets: 16 concurrent >= 4x the tokens/s of 1; second TTFT >= 5x faster than the first.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import anyio
import torch

from deepseek_mcp.inference.engine.async_engine import AsyncEngine
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def random_prompt(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(1000, min(vocab, 100_000), (n,), generator=g).tolist()


async def concurrent_decode(aeng: AsyncEngine, n: int, prompt_len: int, max_tokens: int, vocab: int,
                            g: torch.Generator) -> dict[str, float]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prompts = [random_prompt(prompt_len, vocab, g) for _ in range(n)]
    firsts: list[float] = []
    ends: list[float] = []
    counts: list[int] = []

    async def one(p: list[int]) -> None:
        got = 0
        async for out in aeng.stream(p, params):
            if got == 0:
                firsts.append(time.perf_counter())
            got += len(out.new_token_ids)
        ends.append(time.perf_counter())
        counts.append(got)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for p in prompts:
            tg.start_soon(one, p)
    end = max(ends)
    total = sum(counts)
    decode_window = end - max(firsts)  # every request past its first token
    decode_tokens = sum(counts) - n  # tokens after the first, approximately all inside that window
    return {
        "requests": n,
        "tokens": total,
        "wall_s": end - start,
        "tok_s": total / (end - start),
        "decode_tok_s": decode_tokens / decode_window if decode_window > 0 else float("nan"),
        "mean_ttft_s": sum(f - start for f in firsts) / n,
    }


async def ttft(aeng: AsyncEngine, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    async for out in aeng.stream(prompt, SamplingParams(max_tokens=1, ignore_eos=True)):
        return time.perf_counter() - start, out.num_cached_tokens
    raise RuntimeError("no output")


async def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, dequantize_fp8="auto")
    load_s = time.perf_counter() - t0
    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    rows: list[dict[str, float]] = []
    async with AsyncEngine(engine, max_num_seqs=16, max_num_batched_tokens=args.max_num_batched_tokens,
                           cache_tokens=args.cache_tokens, block_size=args.block_size) as aeng:
        await concurrent_decode(aeng, 2, 8, 4, vocab, g)  # warm-up
        for n in (1, 4, 16):
            rows.append(await concurrent_decode(aeng, n, args.prompt_len, args.max_tokens, vocab, g))
        long_prompt = random_prompt(args.long_prompt, vocab, g)
        cold, cold_cached = await ttft(aeng, long_prompt)
        warm, warm_cached = await ttft(aeng, long_prompt)
        stats = aeng.stats()

    print("# AsyncEngine serving benchmark")
    print(f"machine : {device_name(engine.device)}; {platform.platform()}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}")
    print(f"model   : {engine.name} ({engine.config.num_layers} layers, hidden {engine.config.hidden_size}, "
          f"vocab {vocab}), {engine.dtype}, {engine.kernels} kernels, fp8 weights {engine.fp8}; "
          f"load {load_s:.1f} s")
    print(f"settings: block_size {args.block_size}, max_num_batched_tokens {args.max_num_batched_tokens}, "
          f"cache {aeng.cache_capacity_tokens} tokens, prompt {args.prompt_len} tokens, "
          f"max_tokens {args.max_tokens} (EOS ignored), greedy")
    print()
    print("| concurrent | tokens | wall s | tokens/s | decode tokens/s | mean TTFT s | vs 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["tok_s"]
    for r in rows:
        print(f"| {r['requests']:.0f} | {r['tokens']:.0f} | {r['wall_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['mean_ttft_s']:.3f} | {r['tok_s'] / base:.2f}x |")
    print()
    print(f"| {args.long_prompt}-token prompt | TTFT s | cached prompt tokens |")
    print("|---|---:|---:|")
    print(f"| first (cold) | {cold:.3f} | {cold_cached} |")
    print(f"| second (prefix cache) | {warm:.3f} | {warm_cached} |")
    print()
    speed16 = rows[-1]["tok_s"] / base
    print(f"16 concurrent vs 1: {speed16:.2f}x (target >= 4x: {'met' if speed16 >= 4 else 'NOT met'})")
    print(f"TTFT cold / cached: {cold / warm:.1f}x (target >= 5x: {'met' if cold / warm >= 5 else 'NOT met'})")
    print(f"engine: {stats.num_steps} steps, {stats.num_preemptions} preemptions, "
          f"prefix hit rate {stats.prefix_hit_rate:.2%}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint path or repo id (default: the demo checkpoint)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--cache-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    anyio.run(main, ap.parse_args())
