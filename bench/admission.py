"""Fair admission on the AsyncEngine (a script, not a test): the time to first token of a 1-token prompt submitted
while a long prompt prefills, against the same request alone.

    .venv/bin/python bench/admission.py                       # demo checkpoint on CPU, 3 runs
    .venv/bin/python bench/admission.py --long-prompt 8192 --runs 5

Each run: the short request alone (nothing else in the engine); then a fresh random `--long-prompt`-token prompt
(no prefix-cache hits) is submitted, and once its first chunk is in the cache the short request is submitted
beside it. The scheduler shares each step's `--max-num-batched-tokens` between the prompts in prefill, so the
short one should get its first token within a step or two, not after the whole long prefill (issue 22, item 2:
a 20k-token prefill held a new 1-token request for 51 s). Reported: min / median / max over the runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import uuid

import anyio
import torch
from serving import device_name  # bench/serving.py: the machine line (the script's folder is on sys.path)

from deepseek_mcp.inference.engine.async_engine import AsyncEngine
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams

_FIRST = SamplingParams(max_tokens=1, ignore_eos=True)


async def first_token_s(aeng: AsyncEngine, prompt: list[int], request_id: str | None = None) -> float:
    """Seconds from submission to the request's first token."""
    start = time.perf_counter()
    async for out in aeng.stream(prompt, _FIRST, request_id=request_id):
        if out.new_token_ids:
            return time.perf_counter() - start
    raise RuntimeError("the request ended without a token")


async def one_run(aeng: AsyncEngine, long_len: int, vocab: int, g: torch.Generator) -> dict[str, float]:
    def short() -> list[int]:
        return torch.randint(1000, vocab, (1,), generator=g).tolist()

    alone = await first_token_s(aeng, short())
    long_prompt = torch.randint(1000, vocab, (long_len,), generator=g).tolist()
    long_id = f"long-{uuid.uuid4().hex[:8]}"
    result: dict[str, float] = {"alone_s": alone}

    async def long_request() -> None:
        result["long_ttft_s"] = await first_token_s(aeng, long_prompt, long_id)

    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        tg.start_soon(long_request)
        while True:  # until the long prompt's first chunk is in the cache: it is prefilling
            seq = aeng.scheduler.get(long_id)
            if seq is not None and seq.num_computed_tokens > 0:
                break
            await anyio.sleep(0.001)
        result["submitted_after_s"] = time.perf_counter() - started
        result["beside_s"] = await first_token_s(aeng, short())
        seq = aeng.scheduler.get(long_id)
        result["long_done_at_first"] = seq.num_computed_tokens / long_len if seq is not None else 1.0
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


async def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, dequantize_fp8="auto")
    load_s = time.perf_counter() - t0
    vocab = min(engine.config.vocab_size, 100_000)
    g = torch.Generator().manual_seed(args.seed)
    runs = []
    async with AsyncEngine(engine, max_num_seqs=4, max_num_batched_tokens=args.max_num_batched_tokens,
                           cache_tokens=args.long_prompt + 1024, block_size=args.block_size) as aeng:
        await first_token_s(aeng, torch.randint(1000, vocab, (64,), generator=g).tolist())  # warm-up
        for _ in range(args.runs):
            runs.append(await one_run(aeng, args.long_prompt, vocab, g))
        stats = aeng.stats()

    print("# Fair admission: TTFT of a 1-token prompt while a long prompt prefills (AsyncEngine)")
    print(f"machine : {device_name(engine.device)}; {platform.platform()}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}")
    print(f"model   : {engine.name} ({engine.config.num_layers} layers, hidden {engine.config.hidden_size}), "
          f"{engine.dtype}, {engine.kernels} kernels; load {load_s:.1f} s")
    print(f"settings: long prompt {args.long_prompt} tokens (random, no prefix hits), {args.max_num_batched_tokens} "
          f"batched tokens per step, block size {args.block_size}, max_tokens 1, {args.runs} runs")
    print()
    print("| request | TTFT s, min / median / max |")
    print("|---|---:|")
    print(f"| 1-token prompt alone | {spread([r['alone_s'] for r in runs])} |")
    print(f"| 1-token prompt during the long prefill | {spread([r['beside_s'] for r in runs])} |")
    print(f"| the long prompt itself (its whole prefill) | {spread([r['long_ttft_s'] for r in runs])} |")
    print()
    ratio = [r["beside_s"] / r["long_ttft_s"] for r in runs]
    done = [100 * r["long_done_at_first"] for r in runs]
    print(f"short request submitted {spread([r['submitted_after_s'] for r in runs])} s after the long one; "
          f"its TTFT is {spread(ratio)} of the long prefill; the long prompt was {min(done):.0f}-{max(done):.0f}% "
          "prefilled when the short one got its token")
    print(f"engine: {stats.num_steps} steps, {stats.num_preemptions} preemptions")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint path or repo id (default: the demo checkpoint)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    ap.add_argument("--long-prompt", type=int, default=8192,
                    help="tokens of the long prompt (default 8192: a run of 3 takes under a minute on 2 CPU cores)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (default 512)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    anyio.run(main, ap.parse_args())
