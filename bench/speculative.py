"""Speculative decoding on the demo checkpoint: decode tokens/s at batch 1 and 8 for K = 0..3 drafts per step,
(1) with drafts replayed from a plain greedy run and made wrong at a chosen rate (acceptance 0, 0.5, 0.85, 1.0;
`speculative.ReplayDrafter`): the cost of verifying K + 1 positions in one forward, without a draft model's;
(2) with the checkpoint's own MTP layer drafting (`--speculative-tokens`, mtp_drafter.py): its forwards' cost
too. The demo's MTP layer has random weights, so its drafts are almost never accepted: rows (2) measure the
drafting overhead at acceptance ~0, not a speed-up; with released weights DeepSeek reports 85-90 % acceptance of
the first draft, which rows (1) at 0.85 model. Whether the outputs equal the plain run's is printed for every row
(verify-only steps run as a decode of one row per token, so also in bfloat16 they do).

    python bench/speculative.py [--tokens 32] [--runs 3] [--threads 1] [--dtype float32] [--device cpu]
                                [--batches 1,8]

Decode tokens/s = generated tokens after the first / time from the first token to the last (greedy, 16-token
prompts, through `EngineCore.step`), min-max over the runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.sequence import Sequence
from deepseek_mcp.inference.engine.speculative import ReplayDrafter


def run(engine: Engine, prompts: list[list[int]], tokens: int, drafter=None, k: int = 0
        ) -> tuple[float, list[list[int]], float]:
    """(decode tok/s, outputs, accepted drafts / drafted); k > 0 without a drafter: the MTP layer drafts."""
    core = EngineCore(engine, max_num_seqs=len(prompts), max_num_batched_tokens=256, cache_tokens=4096,
                      block_size=16, warm_up=False, drafter=drafter, speculative_tokens=k)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    seqs = [Sequence(str(i), p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        core.scheduler.add(s)
    first = None
    while core.scheduler.has_work():
        core.step()
        if first is None and all(s.num_output_tokens for s in seqs):
            first = time.perf_counter()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - first
    core.close()
    drafted = sum(s.num_drafted for s in seqs)
    rate = sum(s.num_accepted for s in seqs) / drafted if drafted else float("nan")
    return len(prompts) * (tokens - 1) / elapsed, [s.output_ids for s in seqs], rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(None, device=args.device, dtype=args.dtype, speculative_tokens=3)
    where = torch.cuda.get_device_name(0) if engine.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    print(f"# {where}, torch {torch.__version__}, demo checkpoint ({engine.model.rt.kernels} path, {args.dtype}), "
          f"{args.tokens} tokens per request, {args.runs} runs")
    g = torch.Generator().manual_seed(0)
    print("| batch | K | drafts | decode tok/s (min-max) | vs K = 0 | accepted / drafted | same tokens |")
    print("|---:|---:|---|---|---|---:|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [torch.randint(1000, 100000, (16,), generator=g).tolist() for _ in range(batch)]
        base, want, _ = run(engine, prompts, args.tokens)  # warm-up and the replayed outputs
        ref = {str(i): o for i, o in enumerate(want)}
        plain = [run(engine, prompts, args.tokens)[0] for _ in range(args.runs)]
        print(f"| {batch} | 0 | - | {min(plain):.1f}-{max(plain):.1f} | 1.00x | - | - |")
        mid = sorted(plain)[len(plain) // 2]
        for k in (1, 2, 3):
            for acceptance in (0.0, 0.5, 0.85, 1.0, None):  # None: the MTP layer drafts
                speeds, rates, same = [], [], True
                for _ in range(args.runs):
                    drafter = None if acceptance is None else \
                        ReplayDrafter(ref, vocab_size=engine.config.vocab_size, acceptance=acceptance)
                    tps, got, rate = run(engine, prompts, args.tokens, drafter, k)
                    same = same and got == want
                    speeds.append(tps)
                    rates.append(rate)
                label = "MTP layer (random)" if acceptance is None else f"replayed, {acceptance}"
                print(f"| {batch} | {k} | {label} | {min(speeds):.1f}-{max(speeds):.1f} | "
                      f"{min(speeds) / mid:.2f}-{max(speeds) / mid:.2f}x | {sum(rates) / len(rates):.2f} | "
                      f"{'yes' if same else 'NO'} |",
                      flush=True)


if __name__ == "__main__":
    main()
