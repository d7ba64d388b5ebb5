"""The decode step's output head on the CPU: `inference.model.layers.cpu_linear` against `F.linear` on the same
bf16 weight, and a plain read of the same bytes (the bandwidth floor of one thread).

    python bench/head.py [--vocab 129280] [--hidden 256] [--threads 1] [--rounds 3]
    python bench/head.py --engine-batch 8 [--rounds 10]

Per round and batch: the median of 20 calls of each, run alternately in one process so a slow phase of a shared
machine hits all three alike. Prints one markdown table. With --engine-batch B: the whole decode step instead
(`EngineCore.step` on the bf16 copy of the demo, B sequences, 32 steps, the median step), with the model's head
through `cpu_linear` and through `F.linear`, alternated per round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import _timed, cpu_name  # noqa: E402
from inference.model.layers import cpu_linear  # noqa: E402


def _median_ms(fn) -> float:
    return _timed(fn, repeats=20) * 1e3


def engine_ab(batch: int, rounds: int) -> None:
    from bench.engine import _median, decode_step_times, dequantized_copy
    from inference.engine.engine import Engine
    from inference.model import layers
    from inference.model.demo import default_cache_dir, demo_checkpoint_path

    path = dequantized_copy(demo_checkpoint_path(), default_cache_dir() / "demo-dequantized-bfloat16", torch.bfloat16)
    eng = Engine.from_pretrained(path, device="cpu", dtype="bfloat16", backend="torch")

    def step_ms() -> float:
        return _median(decode_step_times(eng, batch, 32)) * 1e3

    print(f"# decode step, bf16 copy of the demo, batch {batch}, {cpu_name()}, {torch.get_num_threads()} thread(s): "
          "median ms per step, the head through F.linear then cpu_linear each round")
    print("| round | F.linear ms | cpu_linear ms | cpu_linear speed-up |")
    print("|---:|---:|---:|---:|")
    ours = layers.cpu_linear
    step_ms()  # warm-up
    try:
        for r in range(rounds):
            layers.cpu_linear = F.linear
            a = step_ms()
            layers.cpu_linear = ours
            b = step_ms()
            print(f"| {r + 1} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)
    finally:
        layers.cpu_linear = ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine-batch", type=int, default=0, help="instead: the whole decode step at this batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine_batch:
        engine_ab(args.engine_batch, args.rounds)
        return
    w = torch.randn(args.vocab, args.hidden, dtype=torch.bfloat16)  # [V, D]
    mb = w.numel() * w.element_size() / 1e6
    print(f"# output head {args.vocab} x {args.hidden} bf16 ({mb:.0f} MB), {cpu_name()}, {args.threads} thread(s), "
          f"torch {torch.__version__}: median ms of 20 calls")
    print("| batch | round | F.linear ms | cpu_linear ms | read the weight ms | cpu_linear speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 2, 8, 16):
        x = torch.randn(batch, args.hidden, dtype=torch.bfloat16)
        for r in range(args.rounds):
            a = _median_ms(lambda x=x: F.linear(x, w))
            b = _median_ms(lambda x=x: cpu_linear(x, w))
            c = _median_ms(lambda: w.view(torch.int16).max())
            print(f"| {batch} | {r + 1} | {a:.2f} | {b:.2f} | {c:.2f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
