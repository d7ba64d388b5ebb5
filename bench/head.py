"""The CPU's linear layers on the demo's decode shapes: oneDNN with the weight packed once at load
(`inference/model/onednn.py`, what the engine runs) against `F.linear` on the same bf16 weight, with a plain
read of the same bytes (the bandwidth floor of one thread) for the output head.

    python bench/head.py [--threads 1] [--rounds 3]
    python bench/head.py --engine-batch 8 [--rounds 10]

Per round, shape and batch: the median of 20 calls of each, run alternately in one process so a slow phase of a
shared machine hits them alike. Shapes: the output head (129,280 x 256) and the demo's projections. Prints one
markdown table. With --engine-batch B: the whole decode step instead (`EngineCore.step` on the bf16 copy of the
demo, B sequences, 32 steps, the median step) and the prefill of a 512-token prompt, of an engine with packed
weights and one without (`cpu_prepack=False`), alternated per round.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from engine import _timed, cpu_name

from deepseek_mcp.inference.model import onednn

# (name, out features, in features) of the demo's bf16 weights a decode step reads
SHAPES = [("lm_head", 129280, 256), ("qkv_a (fused)", 288, 256), ("q_b", 384, 128), ("o_proj", 256, 256),
          ("dense gate+up", 1024, 256), ("dense down", 256, 512), ("shared down", 256, 128)]


def _median_ms(fn) -> float:
    return _timed(fn, repeats=20) * 1e3


def engine_ab(batch: int, rounds: int) -> None:
    from engine import _median, _prompts, decode_step_times, dequantized_copy

    from deepseek_mcp.inference.engine.batch import ScheduledSeq
    from deepseek_mcp.inference.engine.engine import Engine
    from deepseek_mcp.inference.model.demo import demo_checkpoint_path
    from deepseek_mcp.inference.resources import default_cache_dir

    path = dequantized_copy(demo_checkpoint_path(), default_cache_dir() / "demo-dequantized-bfloat16", torch.bfloat16)
    packed = Engine.from_pretrained(path, device="cpu", dtype="bfloat16", kernels="torch")
    plain = Engine.from_pretrained(path, device="cpu", dtype="bfloat16", kernels="torch", cpu_prepack=False)

    (prompt,) = _prompts(1, 512)
    runners = {id(e): e.make_runner(512 // 16, 16) for e in (packed, plain)}  # bench/engine.py's prefill

    def step_ms(eng: Engine) -> float:
        return _median(decode_step_times(eng, batch, 32)) * 1e3

    def prefill_ms(eng: Engine) -> float:
        runner = runners[id(eng)]
        return _timed(lambda: runner.run([ScheduledSeq(prompt, 0, list(range(runner.num_blocks)))]), repeats=3) * 1e3

    print(f"# decode step, bf16 copy of the demo, batch {batch}, {cpu_name()}, {torch.get_num_threads()} thread(s): "
          "median ms per decode step and of 3 prefills of a 512-token prompt (the last token's logits), "
          "unpacked (F.linear) then packed (oneDNN) each round")
    print("| round | decode F.linear ms | decode packed ms | decode speed-up | prefill F.linear ms | prefill packed ms "
          "| prefill speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    step_ms(plain), step_ms(packed)  # warm-up
    for r in range(rounds):
        a, b = step_ms(plain), step_ms(packed)
        c, d = prefill_ms(plain), prefill_ms(packed)
        print(f"| {r + 1} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {c:.1f} | {d:.1f} | {c / d:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine-batch", type=int, default=0, help="instead: the whole decode step at this batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn.probe(torch.bfloat16):
        sys.exit("this torch build cannot run oneDNN's packed bf16 linear: nothing to compare")
    if args.engine_batch:
        engine_ab(args.engine_batch, args.rounds)
        return
    print(f"# bf16 linear layers, {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}: median ms of "
          "20 calls (the read: of the weight's bytes)")
    print("| weight | N x K | batch | round | F.linear ms | packed ms | read ms | packed speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, n, k in SHAPES:
            w = torch.randn(n, k, dtype=torch.bfloat16)  # [N, K]
            wp = onednn.pack(w)
            for batch in (1, 8) if name != "lm_head" else (1, 2, 8, 16):
                x = torch.randn(batch, k, dtype=torch.bfloat16)
                for r in range(args.rounds):
                    a = _median_ms(lambda x=x, w=w: F.linear(x, w))
                    b = _median_ms(lambda x=x, wp=wp: onednn.linear(x, wp))
                    c = f"{_median_ms(lambda w=w: w.view(torch.int16).max()):.2f}" if name == "lm_head" else "-"
                    print(f"| {name} | {n} x {k} | {batch} | {r + 1} | {a:.3f} | {b:.3f} | {c} | {a / b:.2f}x |",
                          flush=True)


if __name__ == "__main__":
    main()
