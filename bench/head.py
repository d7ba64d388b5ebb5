"""The decode step's output head on the CPU: `inference.model.layers.cpu_linear` against `F.linear` on the same
bf16 weight, and a plain read of the same bytes (the bandwidth floor of one thread).

    python bench/head.py [--vocab 129280] [--hidden 256] [--threads 1] [--rounds 3]

Per round and batch: the median of 20 calls of each, run alternately in one process so a slow phase of a shared
machine hits all three alike. Prints one markdown table.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
